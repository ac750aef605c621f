"""`mer stats --plot FILE`: per-stage latency distributions and hit rate over time.

The latency panel draws each stage's cumulative distribution on a log time axis from
the merged HDR histograms, with dots at p50 and p99, the values `mer stats` prints. The
hit-rate panel bins the workers' lease-wait spans (each records whether the lease was
a hit) by time, so it covers the spans the workers still keep (see observe/spans.py).

Needs matplotlib, the optional `plot` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

from mer_pipeline.histograms import STAGES
from mer_pipeline.observe.stages import recorded_values

HIT_RATE_BINS = 40


class PlotError(RuntimeError):
    """The plot cannot be drawn, for example because matplotlib is missing."""


def latency_curves(stages: dict[str, HdrHistogram]) -> dict[str, dict[str, Any]]:
    """Return, per stage, the CDF points (values_us, fraction at or below) and p50/p99/count."""
    curves = {}
    for stage in [s for s in STAGES if s in stages] + sorted(set(stages) - set(STAGES)):
        histogram = stages[stage]
        values, counts = recorded_values(histogram)
        total = int(counts.sum())
        if not total:
            continue
        curves[stage] = {
            "values_us": values,
            "fraction": np.cumsum(counts) / total,
            "count": total,
            "p50_us": histogram.get_value_at_percentile(50),
            "p99_us": histogram.get_value_at_percentile(99),
            "max_us": histogram.get_max_value(),
        }
    return curves


def hit_rate_series(processes: dict[str, dict[str, Any]], bins: int = HIT_RATE_BINS) -> dict[str, np.ndarray]:
    """Bin the workers' lease waits by their end time; return bin centers (s), hit rate, lookups."""
    ends, hits = [], []
    for process, entry in processes.items():
        if not process.startswith("worker:"):
            continue
        for name, _, end_ns, args in entry["spans"]:
            if name == "lease_wait":
                ends.append(end_ns)
                hits.append(bool(args.get("hit")))
    if not ends:
        return {"time_s": np.zeros(0), "hit_rate": np.zeros(0), "lookups": np.zeros(0, dtype=np.int64)}
    ends_s = (np.asarray(ends) - min(ends)) / 1e9
    edges = np.linspace(0.0, max(ends_s.max(), 1e-3), bins + 1)
    lookups, _ = np.histogram(ends_s, edges)
    hit_counts, _ = np.histogram(ends_s, edges, weights=np.asarray(hits, dtype=np.float64))
    keep = lookups > 0
    return {
        "time_s": ((edges[:-1] + edges[1:]) / 2)[keep],
        "hit_rate": hit_counts[keep] / lookups[keep],
        "lookups": lookups[keep],
    }


def plot_latency(stages: dict[str, HdrHistogram], processes: dict[str, dict[str, Any]] | None, path: str | Path) -> dict[str, Any]:
    """Draw the figure to `path` (the format follows the suffix); return the plotted data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotError(f"plotting needs matplotlib ({exc}); install it with: pip install 'mer[plot]'") from exc

    curves = latency_curves(stages)
    series = hit_rate_series(processes or {})
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(12, 9), height_ratios=[3, 2])
    for stage, curve in curves.items():
        (line,) = top.step(curve["values_us"], curve["fraction"], where="post", label=f"{stage} (n={curve['count']})")
        for key, marker in (("p50_us", "o"), ("p99_us", "s")):
            top.plot([curve[key]], [_fraction_at(curve, curve[key])], marker=marker, color=line.get_color(), markersize=5)
    top.set_xscale("log")
    top.set_xlabel("latency (us, log scale)")
    top.set_ylabel("fraction at or below")
    top.set_title("stage latency distributions (circle: p50, square: p99)")
    top.grid(True, which="both", alpha=0.3)
    if curves:
        top.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))

    if len(series["time_s"]):
        bottom.plot(series["time_s"], series["hit_rate"], marker=".", label="hit rate")
        bottom.set_ylim(0, 1.05)
        counts_axis = bottom.twinx()
        counts_axis.bar(series["time_s"], series["lookups"], width=_bar_width(series["time_s"]), alpha=0.2, color="gray")
        counts_axis.set_ylabel("lookups per bin")
        # Draw the hit-rate line above the count bars.
        bottom.set_zorder(counts_axis.get_zorder() + 1)
        bottom.patch.set_visible(False)
    else:
        bottom.text(0.5, 0.5, "no lease-wait spans recorded yet", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_xlabel("time since the first retained lease (s)")
    bottom.set_ylabel("hit rate")
    bottom.set_title("hit rate over time (workers' lease waits)")
    bottom.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return {"curves": curves, "hit_rate": series}


def _fraction_at(curve: dict[str, Any], value_us: int) -> float:
    index = int(np.searchsorted(curve["values_us"], value_us, side="right")) - 1
    return float(curve["fraction"][max(index, 0)])


def _bar_width(times: np.ndarray) -> float:
    return float(np.min(np.diff(times)) * 0.8) if len(times) > 1 else 0.1
