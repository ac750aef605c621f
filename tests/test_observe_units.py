"""Observability pieces without a pipeline: span rings, the spans wire messages, trace-event
building, histogram helpers and trace statistics."""

import collections
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mer_pipeline import wire
from mer_pipeline.cli import app
from mer_pipeline.histograms import new_histogram
from mer_pipeline.observe.spans import SpanRecorder, check_processes
from mer_pipeline.observe.stages import cumulative_counts, percentile_of_counts, recorded_values, window_counts
from mer_pipeline.observe.timeline import assign_lanes, build_trace
from mer_pipeline.observe.trace_stats import lru_hit_rates, reuse_distances, trace_stats
from mer_pipeline.trace import load_trace

BUNDLED = Path(__file__).resolve().parents[1] / "mer_pipeline" / "data" / "humaneval-decode.jsonl"


def test_span_ring_keeps_last_spans():
    recorder = SpanRecorder("io", capacity=3)
    for i in range(5):
        recorder.record("read", i * 10, i * 10 + 5, expert=i)
    payload = recorder.payload()
    assert [span[3]["expert"] for span in payload["spans"]] == [2, 3, 4]
    assert payload["dropped"] == 2
    assert payload["capacity"] == 3
    assert [span[3]["expert"] for span in recorder.payload(since_ns=35)["spans"]] == [3, 4]


def test_spans_messages_round_trip():
    recorder = SpanRecorder("worker:0")
    recorder.record("kernel", 100, 200, task=1, expert=9)
    reply = recorder.reply(wire.SpansRequest(7, 0))
    decoded = wire.decode(reply.encode())
    assert isinstance(decoded, wire.SpansReply)
    assert decoded.request_id == 7
    processes = check_processes(decoded.processes, "test")
    assert processes["worker:0"]["spans"] == [["kernel", 100, 200, {"task": 1, "expert": 9}]]
    request = wire.decode(wire.SpansRequest(3, 12345).encode())
    assert request == wire.SpansRequest(3, 12345)


@pytest.mark.parametrize(
    "entry",
    [
        {"pid": 1, "capacity": 4, "dropped": 0},
        {"pid": 1, "capacity": 4, "dropped": 0, "spans": [["read", 5, 4, {}]]},
        {"pid": 1, "capacity": 4, "dropped": 0, "spans": [["read", 1, 2]]},
        {"pid": "1", "capacity": 4, "dropped": 0, "spans": []},
    ],
)
def test_check_processes_rejects_malformed(entry):
    with pytest.raises(wire.WireError):
        check_processes({"io": entry}, "test")


def test_lanes_never_overlap():
    rng = np.random.default_rng(1)
    starts = rng.integers(0, 1000, 200)
    spans = [["read", int(s), int(s + rng.integers(1, 100)), {}] for s in starts]
    lanes = collections.defaultdict(list)
    for lane, span in assign_lanes(spans):
        lanes[lane].append(span)
    assert sum(len(v) for v in lanes.values()) == len(spans)
    for placed in lanes.values():
        for first, second in zip(placed, placed[1:]):
            assert first[2] <= second[1]


def _synthetic_processes():
    entry = {"pid": 1, "capacity": 16, "dropped": 0}
    return {
        "io": {**entry, "spans": [
            ["read", 1_000, 5_000, {"expert": 3, "hint_ns": 0, "demands": [[0, 7]]}],
            ["read", 2_000, 6_000, {"expert": 4, "hint_ns": 1_500, "demands": []}],
        ]},
        "predictor": {**entry, "spans": [["predict", 1_400, 1_600, {"hints": [4, 5]}]]},
        "worker:0": {**entry, "spans": [
            ["lease_wait", 900, 5_200, {"request_id": 7, "hit": False}],
            ["kernel", 5_200, 5_900, {"task": 1}],
        ]},
        "compute": {**entry, "spans": [["token", 800, 6_000, {"token": 0}]]},
    }


def test_build_trace_links_demand_and_hint():
    trace = build_trace(_synthetic_processes())
    events = trace["traceEvents"]
    names = {e["args"]["name"].split(" (")[0] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {"I/O daemon", "predictor", "compute daemon", "worker:0"}
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    finishes = {e["id"]: e for e in events if e["ph"] == "f"}
    assert set(starts) == set(finishes)
    assert sorted(e["name"] for e in starts.values()) == ["demand", "hint"]
    slices = [e for e in events if e["ph"] == "X"]
    for end in list(starts.values()) + list(finishes.values()):
        inside = [s for s in slices if (s["pid"], s["tid"]) == (end["pid"], end["tid"]) and s["ts"] <= end["ts"] <= s["ts"] + s["dur"]]
        assert len(inside) == 1
    json.dumps(trace)


def test_cumulative_counts_agree_with_percentiles():
    histogram = new_histogram()
    rng = np.random.default_rng(2)
    for value in rng.lognormal(7, 1.5, 5000).astype(int) + 1:
        histogram.record_value(int(value))
    values, counts = recorded_values(histogram)
    assert counts.sum() == histogram.get_total_count()
    assert values[-1] == histogram.get_max_value()
    total = histogram.get_total_count()
    for percentile in (50, 95, 99):
        value = histogram.get_value_at_percentile(percentile)
        target = max(int(percentile * total / 100 + 0.5), 1)
        below, at = cumulative_counts(histogram, [value - 1, value])
        assert below < target <= at
        all_counts = window_counts(None, histogram)
        assert percentile_of_counts(histogram, all_counts, percentile) == value


def test_window_counts_subtract_snapshots():
    before, after = new_histogram(), new_histogram()
    for value in (10, 20, 30):
        before.record_value(value)
        after.record_value(value)
    for value in (1000, 2000):
        after.record_value(value)
    counts = window_counts(before, after)
    assert counts.sum() == 2
    assert percentile_of_counts(after, counts, 50) == after.get_highest_equivalent_value(1000)
    assert window_counts(after, before).sum() == 0


def test_reuse_distance_small_sequence():
    distances = reuse_distances([1, 2, 3, 1, 1, 2, 4, 3])
    assert distances.tolist() == [-1, -1, -1, 2, 0, 2, -1, 3]


def _simulate_lru(accesses, size):
    cache = collections.OrderedDict()
    hits = 0
    for expert in accesses:
        if expert in cache:
            hits += 1
            cache.move_to_end(expert)
        else:
            cache[expert] = True
            if len(cache) > size:
                cache.popitem(last=False)
    return hits / len(accesses)


def test_lru_hit_rate_matches_simulation():
    trace = load_trace(BUNDLED)
    accesses = trace.access_ids()[:4000]
    distances = reuse_distances(accesses)
    rates = lru_hit_rates(distances, [16, 64, 100, 200])
    for size, rate in rates.items():
        assert rate == pytest.approx(_simulate_lru(accesses, size), abs=1e-12)


def test_trace_stats_totals():
    trace = load_trace(BUNDLED)
    stats = trace_stats(trace)
    assert stats["accesses"] == len(trace.access_ids())
    assert len(stats["popularity"]) == trace.n_layers
    for row in stats["popularity"]:
        assert sum(row["share"]) == pytest.approx(1.0, abs=1e-3)
        assert 0 < row["entropy_bits"] <= stats["uniform_entropy_bits"]
    cells = {layer: 0 for layer in range(trace.n_layers)}
    for token in trace.tokens:
        for layer in token.layers:
            cells[layer] += 1
    for pair in stats["coactivation"]:
        layer = pair["layers"][0]
        both = sum(1 for t in trace.tokens if layer in t.layers and layer + 1 in t.layers)
        assert np.sum(pair["counts"]) == both * trace.top_k**2
        assert pair["mutual_information_bits"] >= 0
    reuse = stats["reuse_distance"]
    assert reuse["first_accesses"] == trace.n_layers * trace.n_experts
    assert sum(reuse["histogram"]) + reuse["first_accesses"] == stats["accesses"]


def test_trace_stats_cli_json(tmp_path):
    result = CliRunner().invoke(app, ["trace-stats", str(BUNDLED), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["tokens"] == 338


def test_trace_stats_cli_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) is not installed")
    out = tmp_path / "routing.png"
    result = CliRunner().invoke(app, ["trace-stats", str(BUNDLED), "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trace_stats_cli_rejects_bad_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"layer": 0}\n')
    result = CliRunner().invoke(app, ["trace-stats", str(bad)])
    assert result.exit_code == 2
    assert "missing key" in result.output
