"""Eviction policies of the slot pool, an offline simulator and Belady's optimum.

A policy receives every lookup (`record_access`) and, when the pool needs a slot, picks a
victim among the experts the caller offers (`choose_victim`). The caller offers only
evictable experts: the I/O daemon leaves out pinned slots, leased slots and slots with
a read in flight, so no policy can take one of those. `reuse_distance_steps` estimates
how many layer steps remain until an expert is used again; the I/O daemon compares it
with a prefetch hint's `steps_ahead` so a prefetch never evicts an expert needed sooner.

Policies:

    lru    the least recently used expert.
    layer  decode visits layers 0..L-1 and wraps, so an expert of layer l can next be used
           only when the visit reaches l again. The policy learns, per expert, how often
           it is used at a visit of its layer given how many visits ago it was last used,
           scales that by how often the expert is chosen among its layer's experts, and
           evicts the expert with the lowest expected uses per layer step until its layer
           comes round again.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np

# The `layer` policy's half-life of per-expert shares, in visits of the expert's layer. On
# the bundled Mixtral trace it raised the hit rate at 25% of experts cached from 0.386 to
# 0.394 (benchmarks/bench_eviction.py, layer vs layer-nodecay).
LAYER_SHARE_HALF_LIFE_VISITS = 32.0

# Visits since last use are bucketed: 1, 2, 3, 4-7, 8-15, 16+.
_GAP_BUCKET_EDGES = (1, 2, 3, 4, 8, 16)


def _gap_bucket(gap: int) -> int:
    bucket = 0
    for index, edge in enumerate(_GAP_BUCKET_EDGES):
        if gap >= edge:
            bucket = index
    return bucket


# `_gap_bucket` of gaps 0 up to the last edge. Larger gaps share the last edge's bucket.
_GAP_BUCKET_TABLE = np.array([_gap_bucket(gap) for gap in range(_GAP_BUCKET_EDGES[-1] + 1)])


def _gap_buckets(gaps: np.ndarray) -> np.ndarray:
    """Return `_gap_bucket` of each gap (at least 0)."""
    return _GAP_BUCKET_TABLE[np.minimum(gaps, _GAP_BUCKET_EDGES[-1])]


class EvictionPolicy:
    """The interface the I/O daemon and the simulator use."""

    name = ""

    def record_access(self, expert: int) -> None:
        raise NotImplementedError

    def choose_victim(self, candidates: Sequence[int]) -> int:
        """Return the expert among `candidates` (non-empty) to evict."""
        raise NotImplementedError

    def reuse_distance_steps(self, expert: int) -> float:
        """Return the expected layer steps until `expert` is used again (an estimate)."""
        raise NotImplementedError

    def forget(self, expert: int) -> None:
        """Drop per-expert recency state when `expert` leaves the pool (learned rates stay)."""


class LruPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        self._last_use: dict[int, int] = {}
        self._clock = 0

    def record_access(self, expert: int) -> None:
        self._clock += 1
        self._last_use[expert] = self._clock

    def choose_victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda expert: self._last_use.get(expert, 0))

    def reuse_distance_steps(self, expert: int) -> float:
        # LRU has no model of the future; it assumes an expert idle for N accesses stays
        # idle for N more.
        return float(self._clock - self._last_use.get(expert, 0))

    def forget(self, expert: int) -> None:
        self._last_use.pop(expert, None)


class LayerPolicy(EvictionPolicy):
    """Evict by expected uses per layer step, knowing layers are visited in a cycle.

    State per layer: the visit counter. A new visit of layer l starts when an access to
    l follows an access to another layer, or repeats an expert already used in this
    visit (one-layer models). Per expert: the visit at which it was last used.

    Learned rates: for each (layer, gap bucket), how often an expert with that gap was
    used at a visit, with a prior shared by all layers. Per expert, the share of its
    layer's visits that used it, shrunk toward the uniform share `1 / n_experts` with
    `share_prior_visits` pseudo-visits.

    The state is kept in NumPy arrays because `choose_victim` scores every expert in the
    pool at each miss.
    """

    name = "layer"

    def __init__(
        self,
        n_layers: int,
        n_experts: int,
        prior_weight: float = 4.0,
        share_prior_visits: float = 16.0,
        share_half_life_visits: float = 0.0,
    ) -> None:
        if n_layers <= 0 or n_experts <= 0:
            raise ValueError(f"n_layers ({n_layers}) and n_experts ({n_experts}) must be positive")
        self.n_layers = n_layers
        self.n_experts = n_experts
        self.prior_weight = prior_weight
        self.share_prior_visits = share_prior_visits
        # Per visit of its layer, an expert's use count and its layer's visit count are
        # multiplied by `_decay`, so the share follows a change of workload (0: no decay).
        self._decay = 0.5 ** (1.0 / share_half_life_visits) if share_half_life_visits > 0 else 1.0
        self._uses = np.zeros(n_layers * n_experts)
        self._decayed_visits = np.zeros(n_layers)
        n_buckets = len(_GAP_BUCKET_EDGES)
        self._visits = np.zeros(n_layers, dtype=np.int64)
        self._current_layer = n_layers - 1
        self._current_visit_experts: set[int] = set()
        # The visit of its layer at which each expert was last used (-1 if never used).
        self._last_visit_used = np.full(n_layers * n_experts, -1, dtype=np.int64)
        # Exposure and use counts per (layer, gap bucket), and summed over layers.
        self._seen = np.zeros((n_layers, n_buckets), dtype=np.int64)
        self._used = np.zeros((n_layers, n_buckets), dtype=np.int64)
        self._seen_all = np.zeros(n_buckets, dtype=np.int64)
        self._used_all = np.zeros(n_buckets, dtype=np.int64)

    def _layer(self, expert: int) -> int:
        if not 0 <= expert < len(self._uses):
            raise ValueError(
                f"expert id {expert} is outside 0..{len(self._uses) - 1} "
                f"({self.n_layers} layers x {self.n_experts} experts)"
            )
        return expert // self.n_experts

    def _expert_array(self, experts: Sequence[int]) -> np.ndarray:
        """Convert `experts` to an index array, raising ValueError on an id outside the model."""
        ids = np.asarray(experts, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self._uses)):
            self._layer(int(ids[(ids < 0) | (ids >= len(self._uses))][0]))
        return ids

    def _start_visit(self, layer: int) -> None:
        """Count a finished visit of `layer` for every expert of the layer that was used before."""
        self._visits[layer] += 1
        visit = int(self._visits[layer])
        base = layer * self.n_experts
        self._decayed_visits[layer] = self._decayed_visits[layer] * self._decay + 1.0
        if self._decay != 1.0:
            self._uses[base : base + self.n_experts] *= self._decay
        last = self._last_visit_used[base : base + self.n_experts]
        buckets = _gap_buckets(visit - last[last >= 0])
        np.add.at(self._seen[layer], buckets, 1)
        np.add.at(self._seen_all, buckets, 1)

    def record_access(self, expert: int) -> None:
        layer = self._layer(expert)
        if layer != self._current_layer or expert in self._current_visit_experts:
            self._start_visit(layer)
            self._current_layer = layer
            self._current_visit_experts = set()
        self._current_visit_experts.add(expert)
        self._uses[expert] += 1
        visit = self._visits[layer]
        last = self._last_visit_used[expert]
        if 0 <= last < visit:
            bucket = _gap_bucket(int(visit - last))
            self._used[layer, bucket] += 1
            self._used_all[bucket] += 1
        self._last_visit_used[expert] = visit

    def _use_probabilities(self, experts: np.ndarray) -> np.ndarray:
        """Estimate, per expert, the probability that it is used at the next visit of its layer."""
        layers = experts // self.n_experts
        last = self._last_visit_used[experts]
        # The gap as seen at the next visit. An expert never used falls in the last bucket.
        gaps = np.where(last >= 0, self._visits[layers] + 1 - last, 1 << 20)
        prior_rates = (self._used_all + 1.0) / (self._seen_all + 2.0)
        gap_rates = (self._used + self.prior_weight * prior_rates) / (self._seen + self.prior_weight)
        uniform_share = 1.0 / self.n_experts
        shares = (self._uses[experts] + self.share_prior_visits * uniform_share) / (
            self._decayed_visits[layers] + self.share_prior_visits
        )
        return np.minimum(gap_rates[layers, _gap_buckets(gaps)] * shares / uniform_share, 1.0)

    def _steps_until_visit(self, layers: np.ndarray) -> np.ndarray:
        """Layer steps until each layer is visited again (the current layer: one whole cycle)."""
        steps = (layers - self._current_layer) % self.n_layers
        return np.where(steps == 0, self.n_layers, steps)

    def values_per_step(self, experts: Sequence[int]) -> np.ndarray:
        """Expected uses per layer step kept in the pool, per expert: the eviction score (lowest goes)."""
        ids = self._expert_array(experts)
        return self._use_probabilities(ids) / self._steps_until_visit(ids // self.n_experts)

    def value_per_step(self, expert: int) -> float:
        """Expected uses per layer step kept in the pool: the eviction score (lowest goes)."""
        return float(self.values_per_step([expert])[0])

    def choose_victim(self, candidates: Sequence[int]) -> int:
        # argmin takes the first of equal scores, so ties go to the earliest candidate.
        return candidates[int(np.argmin(self.values_per_step(candidates)))]

    def reuse_distance_steps(self, expert: int) -> float:
        # Visits until use follow a geometric law with the next visit's use probability.
        ids = self._expert_array([expert])
        probability = max(float(self._use_probabilities(ids)[0]), 1e-6)
        steps = int(self._steps_until_visit(ids // self.n_experts)[0])
        return steps + self.n_layers * (1.0 - probability) / probability


def make_policy(name: str, n_layers: int, n_experts: int) -> EvictionPolicy:
    if name == "lru":
        return LruPolicy()
    if name == "layer":
        return LayerPolicy(n_layers, n_experts, share_half_life_visits=LAYER_SHARE_HALF_LIFE_VISITS)
    raise ValueError(f"eviction policy {name!r} is unknown; choose lru or layer")


def simulate(trace_ids: Iterable[int], capacity: int, policy: EvictionPolicy) -> float:
    """Replay expert ids through a cache of `capacity` experts; return the hit rate."""
    if capacity <= 0:
        raise ValueError(f"capacity {capacity} must be positive")
    cached: set[int] = set()
    hits = accesses = 0
    for expert in trace_ids:
        accesses += 1
        if expert in cached:
            hits += 1
        else:
            if len(cached) >= capacity:
                victim = policy.choose_victim(list(cached))
                cached.remove(victim)
                policy.forget(victim)
            cached.add(expert)
        policy.record_access(expert)
    return hits / accesses if accesses else 0.0


def belady_hit_rate(trace_ids: Sequence[int], capacity: int) -> float:
    """Return the hit rate of Belady's offline optimum: evict the expert used furthest in the future."""
    if capacity <= 0:
        raise ValueError(f"capacity {capacity} must be positive")
    ids = list(trace_ids)
    next_use = [math.inf] * len(ids)
    seen_at: dict[int, int] = {}
    for index in range(len(ids) - 1, -1, -1):
        next_use[index] = seen_at.get(ids[index], math.inf)
        seen_at[ids[index]] = index

    # Max-heap of (next use, expert); stale entries are skipped when popped.
    cached: dict[int, float] = {}
    heap: list[tuple[float, int]] = []
    hits = 0
    for index, expert in enumerate(ids):
        if expert in cached:
            hits += 1
        elif len(cached) >= capacity:
            while True:
                negative_next, victim = heapq.heappop(heap)
                if cached.get(victim) == -negative_next:
                    del cached[victim]
                    break
        cached[expert] = next_use[index]
        heapq.heappush(heap, (-next_use[index], expert))
    return hits / len(ids) if ids else 0.0


def lru_hit_rate(trace_ids: Iterable[int], capacity: int) -> float:
    """Return the LRU hit rate, computed directly (faster than `simulate` with LruPolicy)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = accesses = 0
    for expert in trace_ids:
        accesses += 1
        if expert in cache:
            hits += 1
            cache.move_to_end(expert)
        else:
            if len(cache) >= capacity:
                cache.popitem(last=False)
            cache[expert] = None
    return hits / accesses if accesses else 0.0
