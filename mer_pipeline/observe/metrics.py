"""Prometheus metrics: `mer-launch --metrics-port N` serves the text exposition on 127.0.0.1.

A custom collector requests the daemons' StatsReply on each scrape, so a scrape
costs one stats round trip (the compute daemon gathers its workers' stats for at most
2 s) and nothing runs between scrapes. Metric names:

    mer_lookups_total, mer_hits_total, mer_misses_total      lease lookups (I/O daemon)
    mer_reads_total, mer_read_bytes_total                    expert reads from the store
    mer_prefetches_total{outcome}                            issued, useful, wasted, late, skipped
    mer_evictions_total, mer_read_errors_total, mer_checksum_errors_total
    mer_tokens_total, mer_layer_steps_total, mer_expert_tasks_total    (compute daemon)
    mer_worker_lease_wait_seconds_total{worker}, mer_worker_compute_seconds_total{worker}
    mer_predictor_observations_total, mer_predictor_hints_sent_total
    mer_daemon_restarts_total{daemon}, mer_daemon_state{daemon,state}  (the launcher)
    mer_pool_slots, mer_pool_slots_ready, mer_pool_slots_loading
    mer_stage_<stage>_seconds                                histogram per stage
    mer_stage_max_seconds{stage}                             the largest value per stage
    mer_stats_up                                             1 if every daemon replied

The histograms come from the merged HDR histograms (see observe/stages.py), with
buckets that fit each stage: microseconds for dispatch and queueing, milliseconds for
reads and kernels, seconds for tokens. Counters restart at zero when their daemon
restarts, which Prometheus' rate() treats as a counter reset.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from mer_pipeline import wire
from mer_pipeline.client import DaemonTimeout
from mer_pipeline.histograms import STAGES
from mer_pipeline.observe.stages import cumulative_counts, merged_stages
from mer_pipeline.runtime import PipelineInfo
from mer_pipeline.stream import PipelineStats, collect_stats

log = logging.getLogger(__name__)

METRICS_HOST = "127.0.0.1"
SCRAPE_FAILURE_LOG_INTERVAL_S = 30.0


def _series_1_2_5(low_us: float, high_us: float) -> list[float]:
    bounds = []
    decade = low_us
    while decade <= high_us:
        bounds += [decade * m for m in (1, 2, 5) if decade * m <= high_us]
        decade *= 10
    return bounds


# Bucket upper bounds in microseconds, per stage.
FAST_BOUNDS_US = _series_1_2_5(1, 100_000)  # 1 us .. 100 ms
READ_BOUNDS_US = _series_1_2_5(10, 10_000_000)  # 10 us .. 10 s
TOKEN_BOUNDS_US = _series_1_2_5(1_000, 100_000_000)  # 1 ms .. 100 s
STAGE_BOUNDS_US = {
    "dispatch": FAST_BOUNDS_US,
    "io_queue": FAST_BOUNDS_US,
    "slot_ready": FAST_BOUNDS_US,
    "lease_wait": READ_BOUNDS_US,
    "io_device": READ_BOUNDS_US,
    "compute_expert": READ_BOUNDS_US,
    "task_round_trip": READ_BOUNDS_US,
    "layer_step": READ_BOUNDS_US,
    "token": TOKEN_BOUNDS_US,
}

# (metric name, I/O daemon counter, help)
IO_COUNTERS = (
    ("mer_lookups", "lookups", "Lease lookups: one per expert task"),
    ("mer_hits", "hits", "Lookups that found the expert in the pool"),
    ("mer_misses", "misses", "Lookups that needed a read or joined one in flight"),
    ("mer_reads", "io_reads", "Expert reads from the store"),
    ("mer_read_bytes", "io_bytes", "Bytes read from the store"),
    ("mer_evictions", "evictions", "Experts evicted from the pool"),
    ("mer_read_errors", "read_errors", "Expert reads that failed"),
    ("mer_checksum_errors", "checksum_errors", "Expert reads whose checksum did not match"),
)
PREFETCH_OUTCOMES = ("issued", "useful", "wasted", "late", "skipped")
COMPUTE_COUNTERS = (
    ("mer_tokens", "tokens", "Tokens through all of their layer steps"),
    ("mer_layer_steps", "layer_steps", "Layer steps of tokens"),
    ("mer_expert_tasks", "tasks", "Expert tasks sent to workers"),
)
DAEMON_STATES = ("starting", "running", "backoff", "stopping", "exited")


def stage_metric(stage: str, histogram: Any) -> HistogramMetricFamily:
    bounds_us = STAGE_BOUNDS_US.get(stage, READ_BOUNDS_US)
    cumulative = cumulative_counts(histogram, bounds_us)
    total = histogram.get_total_count()
    buckets = [(f"{bound / 1e6:.6g}", count) for bound, count in zip(bounds_us, cumulative)]
    buckets.append(("+Inf", total))
    # HDR keeps no exact sum, so the sum is the histogram's mean (of bucket midpoints)
    # times the count, accurate to about its 3 significant digits.
    sum_s = histogram.get_mean_value() * total / 1e6
    family = HistogramMetricFamily(f"mer_stage_{stage}_seconds", f"Stage latency: {STAGES.get(stage, stage)}")
    family.add_metric([], buckets, sum_s)
    return family


class PipelineCollector:
    """Builds every metric from one stats round trip per scrape."""

    def __init__(self, info: PipelineInfo, daemon_states: Callable[[], dict[str, tuple[str, int]]] | None = None) -> None:
        self.info = info
        self.daemon_states = daemon_states
        self._failure_logged_s = 0.0

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("mer_stats_up", "1 if the I/O and compute daemons replied to this scrape's stats request")
        if self.daemon_states is not None:
            yield from self._daemon_metrics(self.daemon_states())
        try:
            stats = collect_stats(self.info)
        except (DaemonTimeout, wire.WireError) as exc:
            now = time.monotonic()
            if now - self._failure_logged_s > SCRAPE_FAILURE_LOG_INTERVAL_S:
                self._failure_logged_s = now
                log.warning("metrics scrape without daemon stats error=%s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self._stats_metrics(stats)

    def _daemon_metrics(self, states: dict[str, tuple[str, int]]) -> Iterator[Metric]:
        restarts = CounterMetricFamily("mer_daemon_restarts", "Restarts of each daemon by the launcher", labels=["daemon"])
        state_gauge = GaugeMetricFamily("mer_daemon_state", "1 for each daemon's current supervisor state", labels=["daemon", "state"])
        for daemon, (state, count) in states.items():
            restarts.add_metric([daemon], count)
            for name in DAEMON_STATES:
                state_gauge.add_metric([daemon, name], 1 if name == state else 0)
        yield restarts
        yield state_gauge

    def _stats_metrics(self, stats: PipelineStats) -> Iterator[Metric]:
        io = stats.io.counters
        for name, key, text in IO_COUNTERS:
            yield CounterMetricFamily(name, text, value=io.get(key, 0))
        prefetches = CounterMetricFamily("mer_prefetches", "Prefetch reads by outcome", labels=["outcome"])
        for outcome in PREFETCH_OUTCOMES:
            prefetches.add_metric([outcome], io.get(f"prefetch_{outcome}", 0))
        yield prefetches
        for name, key, text in (
            ("mer_pool_slots", "pool_slots", "Slots in the pool"),
            ("mer_pool_slots_ready", "slots_ready", "Slots holding a complete expert"),
            ("mer_pool_slots_loading", "slots_loading", "Slots being read into"),
        ):
            yield GaugeMetricFamily(name, text, value=io.get(key, 0))

        compute = stats.compute.counters
        for name, key, text in COMPUTE_COUNTERS:
            yield CounterMetricFamily(name, text, value=compute.get(key, 0))
        lease_wait = CounterMetricFamily("mer_worker_lease_wait_seconds", "Time workers waited for leases", labels=["worker"])
        kernel = CounterMetricFamily("mer_worker_compute_seconds", "Time workers spent in the kernel", labels=["worker"])
        for worker, entry in sorted(compute.get("workers", {}).items()):
            lease_wait.add_metric([worker], entry["counters"].get("lease_wait_us", 0) / 1e6)
            kernel.add_metric([worker], entry["counters"].get("compute_us", 0) / 1e6)
        yield lease_wait
        yield kernel

        if stats.predictor is not None:
            predictor = stats.predictor.counters
            yield CounterMetricFamily("mer_predictor_observations", "Routing observations the predictor received", value=predictor.get("observations", 0))
            yield CounterMetricFamily("mer_predictor_hints_sent", "Prefetch hints the predictor sent", value=predictor.get("hints_sent", 0))

        merged = merged_stages(stats)
        maximum = GaugeMetricFamily("mer_stage_max_seconds", "Largest latency recorded per stage", labels=["stage"])
        for stage, histogram in merged.items():
            yield stage_metric(stage, histogram)
            maximum.add_metric([stage], histogram.get_max_value() / 1e6)
        yield maximum


def serve_metrics(
    port: int, info: PipelineInfo, daemon_states: Callable[[], dict[str, tuple[str, int]]] | None = None
) -> tuple[WSGIServer, threading.Thread]:
    """Serve the exposition on 127.0.0.1:port from a daemon thread; return (server, thread).

    Port 0 picks a free port: read it from server.server_port.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(info, daemon_states))
    server, thread = start_http_server(port, addr=METRICS_HOST, registry=registry)
    log.info("metrics served address=http://%s:%d/metrics", METRICS_HOST, server.server_port)
    return server, thread
