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
        self._uses = [0.0] * (n_layers * n_experts)
        self._decayed_visits = [0.0] * n_layers
        n_buckets = len(_GAP_BUCKET_EDGES)
        self._visits = [0] * n_layers
        self._current_layer = n_layers - 1
        self._current_visit_experts: set[int] = set()
        self._last_visit_used: dict[int, int] = {}
        # Exposure and use counts per (layer, gap bucket), and summed over layers.
        self._seen = [[0] * n_buckets for _ in range(n_layers)]
        self._used = [[0] * n_buckets for _ in range(n_layers)]
        self._seen_all = [0] * n_buckets
        self._used_all = [0] * n_buckets

    def _layer(self, expert: int) -> int:
        if not 0 <= expert < len(self._uses):
            raise ValueError(
                f"expert id {expert} is outside 0..{len(self._uses) - 1} "
                f"({self.n_layers} layers x {self.n_experts} experts)"
            )
        return expert // self.n_experts

    def _start_visit(self, layer: int) -> None:
        """Count a finished visit of `layer` for every expert of the layer that was used before."""
        self._visits[layer] += 1
        visit = self._visits[layer]
        base = layer * self.n_experts
        self._decayed_visits[layer] = self._decayed_visits[layer] * self._decay + 1.0
        if self._decay != 1.0:
            for expert in range(base, base + self.n_experts):
                self._uses[expert] *= self._decay
        for expert in range(base, base + self.n_experts):
            last = self._last_visit_used.get(expert)
            if last is None:
                continue
            bucket = _gap_bucket(visit - last)
            self._seen[layer][bucket] += 1
            self._seen_all[bucket] += 1

    def record_access(self, expert: int) -> None:
        layer = self._layer(expert)
        if layer != self._current_layer or expert in self._current_visit_experts:
            self._start_visit(layer)
            self._current_layer = layer
            self._current_visit_experts = set()
        self._current_visit_experts.add(expert)
        self._uses[expert] += 1
        visit = self._visits[layer]
        last = self._last_visit_used.get(expert)
        if last is not None and last < visit:
            bucket = _gap_bucket(visit - last)
            self._used[layer][bucket] += 1
            self._used_all[bucket] += 1
        self._last_visit_used[expert] = visit

    def _use_probability(self, expert: int) -> float:
        """Estimate the probability that `expert` is used at the next visit of its layer."""
        layer = self._layer(expert)
        bucket = _gap_bucket(self._next_gap(expert, layer))
        prior_rate = (self._used_all[bucket] + 1.0) / (self._seen_all[bucket] + 2.0)
        gap_rate = (self._used[layer][bucket] + self.prior_weight * prior_rate) / (
            self._seen[layer][bucket] + self.prior_weight
        )
        uniform_share = 1.0 / self.n_experts
        share = (self._uses[expert] + self.share_prior_visits * uniform_share) / (
            self._decayed_visits[layer] + self.share_prior_visits
        )
        return min(gap_rate * share / uniform_share, 1.0)

    def _steps_until_visit(self, layer: int) -> int:
        """Layer steps until `layer` is visited again (the current layer: one whole cycle)."""
        steps = (layer - self._current_layer) % self.n_layers
        return steps or self.n_layers

    def _next_gap(self, expert: int, layer: int) -> int:
        """Visits since last use as seen at the next visit of the expert's layer."""
        last = self._last_visit_used.get(expert)
        if last is None:
            return 1 << 20
        return self._visits[layer] + 1 - last

    def value_per_step(self, expert: int) -> float:
        """Expected uses per layer step kept in the pool: the eviction score (lowest goes)."""
        return self._use_probability(expert) / self._steps_until_visit(self._layer(expert))

    def choose_victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=self.value_per_step)

    def reuse_distance_steps(self, expert: int) -> float:
        # Visits until use follow a geometric law with the next visit's use probability.
        probability = max(self._use_probability(expert), 1e-6)
        return self._steps_until_visit(self._layer(expert)) + self.n_layers * (1.0 - probability) / probability


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
