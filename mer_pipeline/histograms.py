"""Per-stage latency histograms (HDR histograms, microseconds) that merge exactly.

Each process records into its own `StageHistograms`, and `encode` turns them into
base64 text (the HdrHistogram wire format). `merge_encoded` adds encoded histograms
from several processes bucket by bucket. Merged percentiles are therefore exact to
the histogram's 3 significant digits, never averages of percentiles.
"""

from __future__ import annotations

from typing import Iterable

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour
SIGNIFICANT_DIGITS = 3

# Stages in pipeline order, with what each one measures.
STAGES = {
    "dispatch": "client request received to its first task sent (compute daemon)",
    "lease_wait": "worker lease request sent to lease granted, less kernel time during the read (worker)",
    "io_queue": "read queued to first request submitted (I/O daemon)",
    "io_device": "first request submitted to last completion of an expert read (I/O daemon)",
    "slot_ready": "read complete to lease granted to the waiting worker (I/O daemon)",
    "compute_expert": "kernel time for one expert task, time during the read included (worker)",
    "task_round_trip": "task sent to a worker to its result received, lease and kernel included (compute daemon)",
    "task_overhead": "task round trip minus the worker's kernel time: messages, lease and copies (compute daemon)",
    "layer_step": "one layer step of one token, all its experts (compute daemon)",
    "token": "one token through all of its layer steps (compute daemon)",
}


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


class StageHistograms:
    """Histograms of one process, keyed by stage name."""

    def __init__(self) -> None:
        self._histograms: dict[str, HdrHistogram] = {}

    def record_us(self, stage: str, value_us: float) -> None:
        histogram = self._histograms.get(stage)
        if histogram is None:
            histogram = self._histograms[stage] = new_histogram()
        histogram.record_value(min(max(int(value_us), LOWEST_US), HIGHEST_US))

    def encode(self) -> dict[str, str]:
        return {stage: h.encode().decode("ascii") for stage, h in self._histograms.items()}

    def reset(self) -> None:
        self._histograms.clear()


def merge_encoded(encoded: Iterable[dict[str, str]]) -> dict[str, HdrHistogram]:
    """Add the histograms of several processes, stage by stage."""
    merged: dict[str, HdrHistogram] = {}
    for per_process in encoded:
        for stage, text in per_process.items():
            histogram = HdrHistogram.decode(text.encode("ascii"))
            if stage not in merged:
                merged[stage] = new_histogram()
            merged[stage].add(histogram)
    return merged


def summarize(histogram: HdrHistogram) -> dict[str, int]:
    """Return count, p50, p95, p99 and max in microseconds."""
    return {
        "count": histogram.get_total_count(),
        "p50_us": histogram.get_value_at_percentile(50),
        "p95_us": histogram.get_value_at_percentile(95),
        "p99_us": histogram.get_value_at_percentile(99),
        "max_us": histogram.get_max_value(),
    }


def summarize_all(merged: dict[str, HdrHistogram]) -> dict[str, dict[str, int]]:
    order = list(STAGES) + sorted(set(merged) - set(STAGES))
    return {stage: summarize(merged[stage]) for stage in order if stage in merged}


def subtract(after: HdrHistogram, before: HdrHistogram) -> HdrHistogram | None:
    """Return the values recorded between two snapshots of one histogram, bucket by
    bucket. Return None if `before` contains values that `after` lacks, because the
    recording process restarted in between and its counts started again from zero."""
    difference = new_histogram()
    for item in after.get_recorded_iterator():
        value = item.value_iterated_to
        count = item.count_at_value_iterated_to - before.get_count_at_value(value)
        if count < 0:
            return None
        if count:
            difference.record_value(value, count)
    if difference.get_total_count() != after.get_total_count() - before.get_total_count():
        return None
    return difference
