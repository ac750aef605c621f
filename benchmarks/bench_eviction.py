"""Eviction policies against Belady's offline optimum on the same access sequence.

Replays each routing trace (expert id = layer * n_experts + expert, token by token and
layer by layer) through a cache of 25%, 50% and 75% of the experts, and prints, per
policy, the hit rate and its ratio to Belady's hit rate computed here on the same
sequence. Traces: the bundled Mixtral decode trace and synthetic traces of the same
shape that no policy was tuned on (uniform, zipf:S skew, markov:P token-to-token reuse).

Besides the runtime's policies, one reference row: `oracle-next-visit` is the `layer`
policy told, for every cached expert, whether it is used at the next visit of its layer.
No online policy has that knowledge, so its ratio is a ceiling for policies that
forecast one visit ahead.

    .venv/bin/python benchmarks/bench_eviction.py [--trace FILE] [--tokens 340] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mer_pipeline.eviction import LayerPolicy, belady_hit_rate, lru_hit_rate, make_policy, simulate
from mer_pipeline.main_job import BUNDLED_TRACE
from mer_pipeline.trace import Trace, load_trace, synthetic_trace

SHARES = (0.25, 0.5, 0.75)
SYNTHETIC = ("uniform", "zipf:1.2", "markov:0.5", "markov:0.8")
# A forecast of "not used" still leaves a small value, so ties break by layer distance.
ORACLE_UNUSED_PROBABILITY = 0.05


class NextVisitOracle(LayerPolicy):
    """The `layer` policy with the true answer to "is it used at its layer's next visit"."""

    name = "oracle-next-visit"

    def __init__(self, trace: Trace) -> None:
        super().__init__(trace.n_layers, trace.n_experts)
        self._used_at: dict[tuple[int, int], set[int]] = {}
        self._step_of_access: list[tuple[int, int]] = []
        for token_index, token in enumerate(trace.tokens):
            for layer, experts in zip(token.layers, token.experts):
                self._used_at[(token_index, layer)] = {layer * trace.n_experts + e for e in experts}
                self._step_of_access += [(token_index, layer)] * len(experts)
        self._position = 0

    def record_access(self, expert: int) -> None:
        super().record_access(expert)
        self._position += 1

    def _use_probability(self, expert: int) -> float:
        token_index, layer = self._step_of_access[self._position - 1]
        expert_layer = expert // self.n_experts
        next_token = token_index if expert_layer > layer else token_index + 1
        return 1.0 if expert in self._used_at.get((next_token, expert_layer), ()) else ORACLE_UNUSED_PROBABILITY


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
