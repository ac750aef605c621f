"""Routing trace reader: the bundled Mixtral trace, missing cells, malformed rows."""

import json
from pathlib import Path

import pytest

from mer_pipeline.trace import TraceError, load_trace, synthetic_trace

BUNDLED = Path(__file__).resolve().parents[1] / "mer_pipeline" / "data" / "humaneval-decode.jsonl"


def test_bundled_trace_shape():
    trace = load_trace(BUNDLED)
    rows = sum(1 for line in BUNDLED.open() if line.strip())
    assert trace.top_k == 2
    assert sum(len(t.layers) for t in trace.tokens) == rows
    assert len(trace.tokens) * 32 - trace.missing_cells == rows
    assert len(trace.access_ids()) == 2 * rows
    first = trace.tokens[0]
    assert first.layers == sorted(first.layers)


def _write(tmp_path, rows):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"problem_id": "p", "layer": 0, "token_idx": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4]}


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "invalid JSON"),
        ({k: v for k, v in GOOD.items() if k != "experts"}, "missing key 'experts'"),
        ({**GOOD, "experts": [1, 9]}, "expert id 9 is outside 0..7"),
        ({**GOOD, "experts": [1]}, "gating_probs .* must have one weight per expert"),
        ({**GOOD, "layer": 32}, "layer 32 is outside 0..31"),
        ({**GOOD, "gating_probs": [0.5, "x"]}, "gating_probs .* must be finite numbers"),
    ],
)
def test_malformed_row_names_line(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, bad])
    with pytest.raises(TraceError, match=f"{path.name}:2: {message}"):
        load_trace(path)


def test_missing_cell_is_skipped_not_error(tmp_path):
    rows = [GOOD, {**GOOD, "layer": 2}, {**GOOD, "token_idx": 1}]
    trace = load_trace(_write(tmp_path, rows), n_layers=3)
    assert [t.layers for t in trace.tokens] == [[0, 2], [0]]
    assert trace.missing_cells == 1 + 2


def test_synthetic_traces_are_seeded():
    for kind in ("uniform", "zipf:1.2", "markov:0.7"):
        a = synthetic_trace(kind, 4, 8, 2, 10, seed=3)
        b = synthetic_trace(kind, 4, 8, 2, 10, seed=3)
        assert a.access_ids() == b.access_ids()
        assert all(len(set(e)) == 2 for t in a.tokens for e in t.experts)
    with pytest.raises(TraceError, match="unknown"):
        synthetic_trace("gaussian", 4, 8, 2, 10)
