"""Predictors learn routing online; checked on synthetic traces with known structure
and on the bundled Mixtral trace."""

from pathlib import Path

from mer_pipeline.predictor import compare, evaluate, make_predictor
from mer_pipeline.trace import load_trace, synthetic_trace

BUNDLED = Path(__file__).resolve().parents[1] / "mer_pipeline" / "data" / "humaneval-decode.jsonl"


def _steps(trace):
    return [
        (t, layer, [layer * trace.n_experts + e for e in experts])
        for t, token in enumerate(trace.tokens)
        for layer, experts in zip(token.layers, token.experts)
    ]


def test_none_predicts_nothing():
    trace = synthetic_trace("uniform", 4, 8, 2, 5)
    scores = evaluate(make_predictor("none", 4, 8), _steps(trace), 2, 4)
    assert scores[1]["recall"] == 0.0


def test_transition_learns_repeating_tokens():
    # Each token repeats the previous token's experts with probability 0.9, so the
    # step that wraps to the next token is predictable from this token's routing.
    trace = synthetic_trace("markov:0.9", 4, 8, 2, 300, seed=1)
    scores = evaluate(make_predictor("transition", 4, 8), _steps(trace), 4, 8)
    assert scores[4]["recall"] > 0.7
    assert scores[4]["precision"] > 0.7


def test_frequency_finds_popular_experts():
    trace = synthetic_trace("zipf:2.0", 4, 8, 2, 300, seed=2)
    scores = evaluate(make_predictor("frequency", 4, 8), _steps(trace), 1, 2)
    uniform = evaluate(make_predictor("frequency", 4, 8), _steps(synthetic_trace("uniform", 4, 8, 2, 300, seed=2)), 1, 2)
    assert scores[1]["precision"] > uniform[1]["precision"] + 0.2


def test_transition_beats_chance_on_mixtral_trace():
    trace = load_trace(BUNDLED)
    scores = evaluate(make_predictor("transition", 32, 8), _steps(trace), 4, 8)
    # Chance: 2 hints of 8 experts per distance are right 2/8 of the time.
    for distance in (1, 2, 3, 4):
        assert scores[distance]["precision"] > 0.25


def test_previous_repeats_last_visit():
    predictor = make_predictor("previous", 4, 8)
    predictor.observe(0, 1, [9, 12])
    predictor.observe(0, 2, [16, 17])
    hints = predictor.predict(2, 3, 8, 0.0)
    # Layer 3 has no visit yet; layer 1 comes 3 steps ahead (next token).
    assert {(h.expert, h.steps_ahead) for h in hints} == {(9, 3), (12, 3)}


def test_compare_runs_baselines():
    trace = synthetic_trace("markov:0.9", 4, 8, 2, 200, seed=3)
    scores = compare(_steps(trace), 4, 8, 4, 8)
    assert set(scores) == {"frequency", "previous", "transition"}
    # Tokens repeat the previous token's experts 90% of the time, so at the step that
    # wraps to the next token the `previous` baseline is right most of the time.
    assert scores["previous"][4]["precision"] > 0.85
    assert scores["previous"][4]["precision"] > scores["frequency"][4]["precision"]
