"""The merged stage histograms of a pipeline snapshot, shared by every view.

`mer stats` (text and JSON), the Prometheus exposition, the live view and the plot all
read percentiles and bucket counts from the same merged HDR histograms through this
module, so they agree on the same run.
"""

from __future__ import annotations

import numpy as np
from hdrh.histogram import HdrHistogram

from mer_pipeline.histograms import merge_encoded
from mer_pipeline.stream import PipelineStats


def encoded_histograms(stats: PipelineStats) -> list[dict[str, str]]:
    """Return the encoded histograms of the I/O daemon, the compute daemon and each worker."""
    encoded = [stats.io.histograms, stats.compute.histograms]
    encoded += [worker["histograms"] for worker in stats.compute.counters.get("workers", {}).values()]
    return encoded


def merged_stages(stats: PipelineStats) -> dict[str, HdrHistogram]:
    return merge_encoded(encoded_histograms(stats))


def recorded_values(histogram: HdrHistogram) -> tuple[np.ndarray, np.ndarray]:
    """Return (values_us, counts) of every non-empty HDR bucket, values ascending.

    A value is its bucket's highest equivalent value, the value that
    get_value_at_percentile and get_max_value report, so a count of values at or
    below a bound agrees with the percentiles.
    """
    counts = np.ctypeslib.as_array(histogram.counts)[: histogram.counts_len]
    indices = np.flatnonzero(counts)
    values = [histogram.get_highest_equivalent_value(histogram.get_value_from_index(int(i))) for i in indices]
    return np.asarray(values, dtype=np.int64), counts[indices].astype(np.int64)


def cumulative_counts(histogram: HdrHistogram, bounds_us: list[float]) -> list[int]:
    """Return, for each bound, how many recorded values are at or below it."""
    values, counts = recorded_values(histogram)
    totals = np.concatenate([[0], np.cumsum(counts)])
    return [int(totals[np.searchsorted(values, bound, side="right")]) for bound in bounds_us]


def window_counts(before: HdrHistogram | None, after: HdrHistogram) -> np.ndarray:
    """Return the per-bucket counts recorded between two snapshots of one merged histogram.

    A daemon restart resets its histograms, so a bucket can shrink; the window is then
    empty rather than negative.
    """
    counts = np.ctypeslib.as_array(after.counts)[: after.counts_len].astype(np.int64)
    if before is not None:
        counts = counts - np.ctypeslib.as_array(before.counts)[: before.counts_len].astype(np.int64)
    if (counts < 0).any():
        return np.zeros_like(counts)
    return counts


def percentile_of_counts(histogram: HdrHistogram, counts: np.ndarray, percentile: float) -> int:
    """Return the value at `percentile` of bucket counts laid out like `histogram`'s, the way
    HdrHistogram.get_value_at_percentile computes it; 0 when counts is empty."""
    total = int(counts.sum())
    if not total:
        return 0
    target = max(int(min(percentile, 100.0) * total / 100 + 0.5), 1)
    index = int(np.searchsorted(np.cumsum(counts), target))
    return histogram.get_highest_equivalent_value(histogram.get_value_from_index(index))
