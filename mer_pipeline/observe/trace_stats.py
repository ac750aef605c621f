"""`mer trace-stats FILE`: routing statistics of a trace, the numbers that size a cache.

- popularity: per layer, the share of the layer's routing slots that went to each expert
  (each token routes top_k slots per layer), with the layer's routing entropy in bits
  (log2 n_experts for uniform routing).
- co-activation: for each pair of adjacent layers (l, l+1), how often expert i at l and
  expert j at l+1 were routed in the same token, and the mutual information between the
  two layers' choices in bits. A transition predictor gains most where it is high.
  NOTE: mutual information estimated from few tokens is biased upwards, by roughly
  (n_experts - 1)^2 / (2 N ln 2) bits for N co-routed pairs.
- reuse distance: for each expert access in replay order (the order `mer stream` sends
  them), the number of distinct other experts accessed since the same expert's previous
  access (the LRU stack distance). An LRU cache of C experts hits exactly the accesses
  with a distance below C, which gives the hit-rate curve.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mer_pipeline.trace import Trace

REUSE_PERCENTILES = (50, 90, 99)


def popularity(trace: Trace) -> np.ndarray:
    """Return (n_layers, n_experts) routing counts."""
    counts = np.zeros((trace.n_layers, trace.n_experts), dtype=np.int64)
    for token in trace.tokens:
        for layer, experts in zip(token.layers, token.experts):
            counts[layer, experts] += 1
    return counts


def coactivation(trace: Trace) -> np.ndarray:
    """Return (n_layers - 1, n_experts, n_experts) counts: [l, i, j] counts tokens that routed
    to expert i at layer l and expert j at layer l + 1."""
    counts = np.zeros((max(trace.n_layers - 1, 0), trace.n_experts, trace.n_experts), dtype=np.int64)
    for token in trace.tokens:
        routed = dict(zip(token.layers, token.experts))
        for layer, experts in routed.items():
            following = routed.get(layer + 1)
            if following is None:
                continue
            for i in experts:
                counts[layer, i, following] += 1
    return counts


def entropy_bits(counts: np.ndarray) -> float:
    total = counts.sum()
    if not total:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def mutual_information_bits(joint: np.ndarray) -> float:
    """Return the mutual information of the pair distribution given by joint counts."""
    total = joint.sum()
    if not total:
        return 0.0
    p = joint / total
    rows, cols = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
    mask = p > 0
    return float((p[mask] * np.log2(p[mask] / (rows @ cols)[mask])).sum())


def reuse_distances(accesses: list[int]) -> np.ndarray:
    """Return the LRU stack distance of each access; -1 for a first access."""
    stack: list[int] = []  # most recent last
    distances = np.empty(len(accesses), dtype=np.int64)
    for index, expert in enumerate(accesses):
        try:
            position = stack.index(expert)
        except ValueError:
            distances[index] = -1
        else:
            distances[index] = len(stack) - 1 - position
            del stack[position]
        stack.append(expert)
    return distances


def lru_hit_rates(distances: np.ndarray, cache_sizes: list[int]) -> dict[int, float]:
    """Return the hit rate of an LRU cache of each size (in experts), counting first accesses as misses."""
    if not len(distances):
        return {size: 0.0 for size in cache_sizes}
    reused = distances[distances >= 0]
    return {size: float(np.count_nonzero(reused < size) / len(distances)) for size in cache_sizes}


def trace_stats(trace: Trace) -> dict[str, Any]:
    """Compute every statistic of the module docstring; return JSON-ready values."""
    counts = popularity(trace)
    joint = coactivation(trace)
    distances = reuse_distances(trace.access_ids())
    reused = distances[distances >= 0]
    n_total = trace.n_layers * trace.n_experts
    sizes = sorted({max(1, round(n_total * share)) for share in (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)})
    layers = []
    for layer in range(trace.n_layers):
        row = counts[layer]
        total = int(row.sum())
        layers.append(
            {
                "layer": layer,
                "slots": total,
                "share": [round(float(c) / total, 4) if total else 0.0 for c in row],
                "top_expert": int(row.argmax()),
                "top_share": round(float(row.max()) / total, 4) if total else 0.0,
                "entropy_bits": round(entropy_bits(row), 4),
            }
        )
    pairs = [
        {
            "layers": [layer, layer + 1],
            "mutual_information_bits": round(mutual_information_bits(joint[layer]), 4),
            "top_pair": [int(x) for x in np.unravel_index(int(joint[layer].argmax()), joint[layer].shape)],
            "counts": joint[layer].tolist(),
        }
        for layer in range(len(joint))
    ]
    return {
        "tokens": len(trace.tokens),
        "n_layers": trace.n_layers,
        "n_experts": trace.n_experts,
        "top_k": trace.top_k,
        "accesses": int(len(distances)),
        "missing_cells": trace.missing_cells,
        "uniform_entropy_bits": round(math.log2(trace.n_experts), 4) if trace.n_experts else 0.0,
        "popularity": layers,
        "coactivation": pairs,
        "reuse_distance": {
            "first_accesses": int(np.count_nonzero(distances < 0)),
            "mean": round(float(reused.mean()), 2) if len(reused) else 0.0,
            **{f"p{p}": int(np.percentile(reused, p, method="inverted_cdf")) if len(reused) else 0 for p in REUSE_PERCENTILES},
            "histogram": np.bincount(reused, minlength=n_total).tolist() if len(reused) else [],
            "lru_hit_rate": {str(size): round(rate, 4) for size, rate in lru_hit_rates(distances, sizes).items()},
        },
    }


def print_trace_stats(stats: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    console.print(
        f"{stats['tokens']} tokens, {stats['n_layers']} layers x {stats['n_experts']} experts, top-{stats['top_k']}, "
        f"{stats['accesses']} expert accesses, {stats['missing_cells']} unknown cells",
        highlight=False,
    )
    table = Table(title=f"popularity per layer (uniform entropy {stats['uniform_entropy_bits']} bits)", title_justify="left")
    for column in ("layer", "top expert", "top share", "entropy bits", "share per expert (%)"):
        table.add_column(column, justify="left" if column.startswith("share") else "right")
    for row in stats["popularity"]:
        shares = " ".join(f"{s * 100:2.0f}" for s in row["share"])
        table.add_row(str(row["layer"]), str(row["top_expert"]), f"{row['top_share']:.3f}", f"{row['entropy_bits']:.3f}", shares)
    console.print(table)

    table = Table(title="co-activation of adjacent layers", title_justify="left")
    for column in ("layers", "mutual information bits", "most frequent pair (i at l, j at l+1)"):
        table.add_column(column, justify="right")
    for pair in stats["coactivation"]:
        i, j = pair["top_pair"]
        table.add_row(f"{pair['layers'][0]}->{pair['layers'][1]}", f"{pair['mutual_information_bits']:.3f}", f"{i} -> {j} ({pair['counts'][i][j]})")
    console.print(table)

    reuse = stats["reuse_distance"]
    console.print(
        f"reuse distance (distinct experts between two uses): mean {reuse['mean']}, "
        + ", ".join(f"p{p} {reuse[f'p{p}']}" for p in REUSE_PERCENTILES)
        + f"; {reuse['first_accesses']} first accesses",
        highlight=False,
    )
    curve = ", ".join(f"{size} experts {rate:.3f}" for size, rate in reuse["lru_hit_rate"].items())
    console.print(f"LRU hit rate by cache size: {curve}", highlight=False)


def plot_trace_stats(stats: dict[str, Any], path: str | Path) -> None:
    """Draw popularity, adjacent-layer mutual information and the reuse-distance curve to `path`."""
    from mer_pipeline.observe.plots import PlotError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotError(f"plotting needs matplotlib ({exc}); install it with: pip install 'mer[plot]'") from exc

    figure, axes = plt.subplots(1, 3, figsize=(16, 5))
    shares = np.array([row["share"] for row in stats["popularity"]])
    image = axes[0].imshow(shares.T, aspect="auto", origin="lower", cmap="viridis")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("expert")
    axes[0].set_title("expert popularity (share of the layer's routing)")
    figure.colorbar(image, ax=axes[0])

    information = [pair["mutual_information_bits"] for pair in stats["coactivation"]]
    axes[1].bar(range(len(information)), information)
    axes[1].set_xlabel("layer l (pair l -> l+1)")
    axes[1].set_ylabel("mutual information (bits)")
    axes[1].set_title("co-activation of adjacent layers")

    reuse = stats["reuse_distance"]
    histogram = np.asarray(reuse["histogram"], dtype=np.float64)
    if histogram.sum():
        covered = np.cumsum(histogram) / stats["accesses"]
        axes[2].plot(np.arange(1, len(covered) + 1), covered)
    axes[2].set_xlabel("LRU cache size (experts)")
    axes[2].set_ylabel("hit rate")
    axes[2].set_ylim(0, 1)
    axes[2].set_title(f"hit rate from reuse distance (p50 distance {reuse['p50']})")
    axes[2].grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
