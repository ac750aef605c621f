from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mer_pipeline import eviction
from mer_pipeline.eviction import LayerPolicy, LruPolicy, belady_hit_rate, lru_hit_rate, simulate

TRACE_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mixtral-routing" / "humaneval-decode.jsonl"


@pytest.fixture(scope="module")
def trace_ids():
    if not TRACE_PATH.is_file():
        pytest.skip(f"routing trace not found at {TRACE_PATH}")
    from mer_pipeline.trace import load_trace

    return load_trace(TRACE_PATH).access_ids()


def test_lru_evicts_least_recent():
    policy = LruPolicy()
    for expert in (1, 2, 3, 1):
        policy.record_access(expert)
    assert policy.choose_victim([1, 2, 3]) == 2
    assert policy.choose_victim([3, 1]) == 3


def test_belady_small_sequence():
    # Capacity 2 on a b c a b: Belady keeps a on the miss of c and evicts b, so a hits.
    assert belady_hit_rate([0, 1, 2, 0, 1], 2) == pytest.approx(1 / 5)
    assert belady_hit_rate([0, 0, 0], 1) == pytest.approx(2 / 3)


def test_lru_simulation_matches_direct_lru():
    ids = [0, 1, 2, 0, 3, 1, 0, 2, 2, 4, 0, 1] * 5
    for capacity in (1, 2, 3, 4):
        assert simulate(ids, capacity, LruPolicy()) == pytest.approx(lru_hit_rate(ids, capacity))


def test_layer_policy_prefers_far_layer():
    # Two layers of 2 experts, visits alternate layers; after a visit of layer 1, layer 0
    # comes next, so an expert of layer 1 is the better victim at equal statistics.
    policy = LayerPolicy(n_layers=2, n_experts=2)
    for _ in range(10):
        policy.record_access(0)
        policy.record_access(2)
    assert policy.choose_victim([0, 2]) == 2
    assert policy.reuse_distance_steps(0) < policy.reuse_distance_steps(2)


def test_layer_share_decay_follows_change():
    # Two layers of 4 experts, top-2. Layer 0's visits use {0, 2} 200 times, then {1, 3}
    # 40 times, then {0, 1}, so 0 and 1 have the same gap and differ only in their
    # shares. With a half-life of 8 visits the recent expert 1 has the larger share.
    visits = [(0, 2)] * 200 + [(1, 3)] * 40 + [(0, 1)]
    decayed = LayerPolicy(n_layers=2, n_experts=4, share_half_life_visits=8)
    plain = LayerPolicy(n_layers=2, n_experts=4)
    for first, second in visits:
        for expert in (first, second, 4):  # expert 4 is in layer 1, so it ends each visit of layer 0
            decayed.record_access(expert)
            plain.record_access(expert)
    assert decayed.choose_victim([0, 1]) == 0
    assert plain.choose_victim([0, 1]) == 1


def test_layer_policy_rejects_bad_expert():
    policy = LayerPolicy(n_layers=2, n_experts=2)
    with pytest.raises(ValueError, match="outside"):
        policy.record_access(4)


def test_make_policy_unknown_name():
    with pytest.raises(ValueError, match="unknown"):
        eviction.make_policy("fifo", 2, 2)


@settings(max_examples=100, deadline=None)
@given(
    accesses=st.lists(st.integers(min_value=0, max_value=15), min_size=1, max_size=80),
    protected=st.sets(st.integers(min_value=0, max_value=15), max_size=6),
    name=st.sampled_from(["lru", "layer"]),
)
def test_victim_never_protected(accesses, protected, name):
    """A victim always comes from the offered candidates, so leased and pinned experts are safe."""
    policy = eviction.make_policy(name, n_layers=4, n_experts=4)
    cached: list[int] = []
    capacity = 8
    for expert in accesses:
        policy.record_access(expert)
        if expert in cached:
            continue
        if len(cached) >= capacity:
            candidates = [e for e in cached if e not in protected]
            if not candidates:
                continue
            victim = policy.choose_victim(candidates)
            assert victim in candidates
            assert victim not in protected
            cached.remove(victim)
            policy.forget(victim)
        cached.append(expert)


def test_trace_hit_rates(trace_ids):
    """On the real trace, `layer` beats LRU and stays below Belady at each cache size."""
    for share in (0.25, 0.5, 0.75):
        capacity = int(256 * share)
        lru = lru_hit_rate(trace_ids, capacity)
        belady = belady_hit_rate(trace_ids, capacity)
        layer = simulate(trace_ids, capacity, eviction.make_policy("layer", 32, 8))
        print(f"capacity={capacity} lru={lru:.3f} layer={layer:.3f} belady={belady:.3f}")
        assert layer > lru + 0.02, f"capacity {capacity}: layer {layer:.3f} vs lru {lru:.3f}"
        assert layer <= belady
