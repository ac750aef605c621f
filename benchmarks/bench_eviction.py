"""Eviction policies against Belady's offline optimum on the same access sequence.

Replays each routing trace (expert id = layer * n_experts + expert, token by token and
layer by layer) through a cache of 25%, 50% and 75% of the experts, and prints, per
policy, the hit rate and its ratio to Belady's hit rate computed here on the same
sequence. Traces: the bundled Mixtral decode trace and synthetic traces of the same
shape that no policy was tuned on (uniform, zipf:S skew, markov:P token-to-token reuse).

Besides the runtime's policies, reference rows that see part of the future, which no
online policy does:

    oracle-next-visit  the `layer` policy told, for every cached expert, whether it is used
                       at the next visit of its layer. It is a ceiling for one-visit forecasts.
    oracle-window:W    told the exact next use of every cached expert if it falls within
                       the next W tokens (W visits of each layer). It evicts an expert with
                       no use in the window, the `layer` policy choosing among those, else
                       the expert whose next use comes last. The rows show how many tokens
                       of foresight it takes to reach 0.9 x Belady.

    .venv/bin/python benchmarks/bench_eviction.py [--trace FILE] [--tokens 340] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mer_pipeline.eviction import (
    LAYER_SHARE_HALF_LIFE_VISITS,
    LayerPolicy,
    belady_hit_rate,
    lru_hit_rate,
    make_policy,
    simulate,
)
from mer_pipeline.main_job import BUNDLED_TRACE
from mer_pipeline.trace import Trace, load_trace, synthetic_trace

SHARES = (0.25, 0.5, 0.75)
SYNTHETIC = ("uniform", "zipf:1.2", "markov:0.5", "markov:0.8")
# A forecast of "not used" still leaves a small value, so ties break by layer distance.
ORACLE_UNUSED_PROBABILITY = 0.05
WINDOW_SIZES_TOKENS = (1, 2, 4, 8)


class NextVisitOracle(LayerPolicy):
    """The `layer` policy with the true answer to "is it used at its layer's next visit"."""

    name = "oracle-next-visit"

    def __init__(self, trace: Trace) -> None:
        super().__init__(trace.n_layers, trace.n_experts)
        # Per token, whether each expert id is used. The extra last row, all False, is
        # the token after the end of the trace.
        self._used_at = np.zeros((len(trace.tokens) + 1, trace.n_layers * trace.n_experts), dtype=bool)
        self._step_of_access: list[tuple[int, int]] = []
        for token_index, token in enumerate(trace.tokens):
            for layer, experts in zip(token.layers, token.experts):
                self._used_at[token_index, [layer * trace.n_experts + e for e in experts]] = True
                self._step_of_access += [(token_index, layer)] * len(experts)
        self._position = 0

    def record_access(self, expert: int) -> None:
        super().record_access(expert)
        self._position += 1

    def _use_probabilities(self, experts: np.ndarray) -> np.ndarray:
        token_index, layer = self._step_of_access[self._position - 1]
        # The next visit of a later layer is in this token, of any other layer in the next.
        next_tokens = np.where(experts // self.n_experts > layer, token_index, token_index + 1)
        return np.where(self._used_at[next_tokens, experts], 1.0, ORACLE_UNUSED_PROBABILITY)


class WindowOracle(LayerPolicy):
    """The `layer` policy plus the exact next use of each cached expert within `window_tokens`.

    The window runs from the access being served to the same layer `window_tokens` tokens
    later, so it contains `window_tokens` visits of every layer, and also the rest of the
    current layer's top-k, which the router picks at once. The policy has no information
    beyond the window. It assumes, as `simulate` does, that `choose_victim` serves the access
    after the last recorded one.
    """

    def __init__(self, trace: Trace, window_tokens: int) -> None:
        super().__init__(trace.n_layers, trace.n_experts, share_half_life_visits=LAYER_SHARE_HALF_LIFE_VISITS)
        self.name = f"oracle-window:{window_tokens}"
        self._window_steps = window_tokens * trace.n_layers
        ids = trace.access_ids()
        # Layer step of each access, plus a sentinel step past any window for "no next use".
        steps = [
            token_index * trace.n_layers + layer
            for token_index, token in enumerate(trace.tokens)
            for layer, experts in zip(token.layers, token.experts)
            for _ in experts
        ]
        self._step_of_access = np.array(steps + [1 << 62], dtype=np.int64)
        self._next_use_of_access = _next_use_indices(ids)
        # The next use (access index) of each expert after its last recorded access.
        self._next_use = np.full(trace.n_layers * trace.n_experts, len(ids), dtype=np.int64)
        self._position = 0

    def record_access(self, expert: int) -> None:
        super().record_access(expert)
        self._next_use[expert] = self._next_use_of_access[self._position]
        self._position += 1

    def choose_victim(self, candidates: Sequence[int]) -> int:
        ids = np.asarray(candidates, dtype=np.int64)
        next_uses = self._next_use[ids]
        current_step = self._step_of_access[min(self._position, len(self._step_of_access) - 2)]
        unseen = self._step_of_access[next_uses] > current_step + self._window_steps
        if unseen.any():
            return super().choose_victim([int(expert) for expert in ids[unseen]])
        return int(ids[np.argmax(next_uses)])


def _next_use_indices(ids: Sequence[int]) -> np.ndarray:
    """Return, per access, the index of the next access to the same expert (len(ids) if none)."""
    next_use = np.full(len(ids), len(ids), dtype=np.int64)
    seen_at: dict[int, int] = {}
    for index in range(len(ids) - 1, -1, -1):
        next_use[index] = seen_at.get(ids[index], len(ids))
        seen_at[ids[index]] = index
    return next_use


def policy_rows(trace: Trace) -> list[dict]:
    ids = trace.access_ids()
    n_total = trace.n_layers * trace.n_experts
    rows = []
    for share in SHARES:
        capacity = max(1, int(n_total * share))
        belady = belady_hit_rate(ids, capacity)
        results = {
            "lru": lru_hit_rate(ids, capacity),
            "layer": simulate(ids, capacity, make_policy("layer", trace.n_layers, trace.n_experts)),
            "layer-nodecay": simulate(ids, capacity, LayerPolicy(trace.n_layers, trace.n_experts)),
            NextVisitOracle.name: simulate(ids, capacity, NextVisitOracle(trace)),
        }
        for window_tokens in WINDOW_SIZES_TOKENS:
            oracle = WindowOracle(trace, window_tokens)
            results[oracle.name] = simulate(ids, capacity, oracle)
        for policy, hit_rate in results.items():
            rows.append({
                "share": share,
                "capacity": capacity,
                "policy": policy,
                "hit_rate": hit_rate,
                "belady": belady,
                "ratio": hit_rate / belady if belady else 0.0,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=BUNDLED_TRACE, help="a JSON-lines routing trace (32 layers x 8 experts)")
    parser.add_argument("--tokens", type=int, default=340, help="tokens of each synthetic trace")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()

    traces = {"mixtral-humaneval": load_trace(args.trace)}
    for seed, kind in enumerate(SYNTHETIC):
        traces[kind] = synthetic_trace(kind, 32, 8, 2, args.tokens, seed=100 + seed)

    started_s = time.perf_counter()
    results = []
    for name, trace in traces.items():
        for row in policy_rows(trace):
            results.append({"trace": name, **row})
            if not args.json:
                print(
                    f"{name:>18} share={row['share']:.2f} {row['policy']:>18} hit_rate={row['hit_rate']:.3f} "
                    f"belady={row['belady']:.3f} ratio={row['ratio']:.3f}",
                    flush=True,
                )
    if args.json:
        print(json.dumps({"rows": results, "elapsed_s": time.perf_counter() - started_s}, indent=1))


if __name__ == "__main__":
    main()
