"""`mer stats --watch`: a live terminal view of a running pipeline, refreshed every second.

Each refresh takes one sample: the daemons' StatsReply, the launcher's status, and the
slot table, which this process maps and only reads. The view shows each stage over the
last window (rate, p50, p99) and since the daemons started (count, p50, p95, p99, max).
Window percentiles come from the difference of two merged HDR snapshots. Below the
stages it shows hit rate, I/O share and prefetch outcomes, over the window and in
total, then each daemon's state and restarts, and the pool's experts per layer.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mer_pipeline import wire
from mer_pipeline.client import DaemonClient, DaemonTimeout
from mer_pipeline.histograms import STAGES
from mer_pipeline.observe.stages import merged_stages, percentile_of_counts, window_counts
from mer_pipeline.runtime import LAUNCHER_SOCKET, PipelineInfo
from mer_pipeline.slot_pool import LOADING, READY, SlotPool, SlotPoolError
from mer_pipeline.store import open_store
from mer_pipeline.stream import PipelineStats, collect_stats

STATUS_TIMEOUT_S = 2.0
BLOCKS = " ▁▂▃▄▅▆▇█"
LAYERS_PER_ROW = 16


@dataclasses.dataclass
class Sample:
    """The readings of one refresh. A part that could not be read is None, with its error in `errors`."""

    time_s: float
    stats: PipelineStats | None
    stages: dict[str, HdrHistogram]
    status: dict[str, Any] | None
    # Per layer: slots READY, slots LOADING, leases held.
    occupancy: np.ndarray | None
    errors: list[str]


def launcher_status(info: PipelineInfo) -> dict[str, Any]:
    client = DaemonClient(info.endpoint(LAUNCHER_SOCKET), "launcher")
    try:
        reply = client.request(wire.ControlRequest(client.next_id(), "status", ""), STATUS_TIMEOUT_S)
    finally:
        client.close()
    if not isinstance(reply, wire.ControlReply) or not reply.ok:
        raise wire.WireError(f"the launcher did not return its status ({getattr(reply, 'error', reply.TYPE)})")
    return reply.payload


def layer_occupancy(pool: SlotPool, n_layers: int, n_experts: int) -> np.ndarray:
    """Return an (n_layers, 3) array: READY slots, LOADING slots and leases, per layer."""
    records = pool.table.records.copy()
    occupancy = np.zeros((n_layers, 3), dtype=np.int64)
    experts = records["expert"]
    valid = (experts >= 0) & (experts < n_layers * n_experts)
    layers = experts[valid] // n_experts
    states = records["state"][valid]
    np.add.at(occupancy[:, 0], layers[states == READY], 1)
    np.add.at(occupancy[:, 1], layers[states == LOADING], 1)
    np.add.at(occupancy[:, 2], layers, records["lease_count"][valid].astype(np.int64))
    return occupancy


class Watcher:
    """Takes samples of one pipeline and renders the view from the latest two."""

    def __init__(self, info: PipelineInfo) -> None:
        self.info = info
        shape = open_store(info.store).shape
        self.n_layers = shape.n_layers
        self.n_experts = shape.n_experts
        self.pool: SlotPool | None = None

    def sample(self) -> Sample:
        errors = []
        stats = None
        stages: dict[str, HdrHistogram] = {}
        try:
            stats = collect_stats(self.info)
            stages = merged_stages(stats)
        except (DaemonTimeout, wire.WireError) as exc:
            errors.append(f"stats: {exc}")
        status = None
        try:
            status = launcher_status(self.info)
        except (DaemonTimeout, wire.WireError) as exc:
            errors.append(f"launcher: {exc}")
        occupancy = None
        try:
            if self.pool is None:
                self.pool = SlotPool.attach(self.info.pool_data_name, self.info.pool_table_name)
            occupancy = layer_occupancy(self.pool, self.n_layers, self.n_experts)
        except SlotPoolError as exc:
            errors.append(f"pool: {exc}")
        return Sample(time.monotonic(), stats, stages, status, occupancy, errors)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def render(self, before: Sample | None, now: Sample) -> Group:
        window_s = now.time_s - before.time_s if before is not None else 0.0
        parts: list[Any] = [Text(f"pipeline {self.info.config.name}  window {window_s:.1f} s  socket dir {self.info.socket_dir}", style="bold")]
        parts += [Text(error, style="red") for error in now.errors]
        if now.stats is not None:
            parts.append(self.stage_table(before, now, window_s))
            parts.append(self.cache_table(before, now))
        if now.status is not None:
            parts.append(daemon_table(now.status))
        if now.occupancy is not None:
            parts.append(self.occupancy_table(now.occupancy))
        return Group(*parts)

    def stage_table(self, before: Sample | None, now: Sample, window_s: float) -> Table:
        table = Table(title="stages: window | since start", title_justify="left")
        for column in ("stage", "rate/s", "p50", "p99", "count", "p50", "p95", "p99", "max"):
            table.add_column(column, justify="left" if column == "stage" else "right")
        order = [s for s in STAGES if s in now.stages] + sorted(set(now.stages) - set(STAGES))
        for stage in order:
            histogram = now.stages[stage]
            previous = before.stages.get(stage) if before is not None and before.stats is not None else None
            counts = window_counts(previous, histogram)
            in_window = int(counts.sum())
            rate = f"{in_window / window_s:.1f}" if window_s > 0 else "-"
            table.add_row(
                stage,
                rate,
                format_us(percentile_of_counts(histogram, counts, 50)) if in_window else "-",
                format_us(percentile_of_counts(histogram, counts, 99)) if in_window else "-",
                str(histogram.get_total_count()),
                format_us(histogram.get_value_at_percentile(50)),
                format_us(histogram.get_value_at_percentile(95)),
                format_us(histogram.get_value_at_percentile(99)),
                format_us(histogram.get_max_value()),
            )
        return table

    def cache_table(self, before: Sample | None, now: Sample) -> Table:
        table = Table(title="cache and prefetch: window | since start", title_justify="left")
        for column in ("", "window", "since start"):
            table.add_column(column, justify="left" if not column else "right")
        total = cache_figures(now.stats)
        window = None
        if before is not None and before.stats is not None:
            base = cache_figures(before.stats)
            window = {key: total[key] - base[key] for key in total}
        for label, render in (
            ("hit rate", lambda f: ratio(f["hits"], f["lookups"])),
            ("I/O share of worker time", lambda f: ratio(f["lease_wait_us"], f["lease_wait_us"] + f["compute_us"])),
            ("lookups", lambda f: str(f["lookups"])),
            ("reads", lambda f: f"{f['io_reads']} ({f['io_bytes'] / 2**20:.1f} MiB)"),
            ("prefetch useful", lambda f: str(f["prefetch_useful"])),
            ("prefetch wasted", lambda f: str(f["prefetch_wasted"])),
            ("prefetch late", lambda f: str(f["prefetch_late"])),
        ):
            table.add_row(label, render(window) if window is not None and min(window.values()) >= 0 else "-", render(total))
        return table

    def occupancy_table(self, occupancy: np.ndarray) -> Table:
        table = Table(title=f"pool by layer: experts in the pool out of {self.n_experts} (loading, leases)", title_justify="left")
        table.add_column("layers")
        table.add_column("ready")
        table.add_column("loading", justify="right")
        table.add_column("leases", justify="right")
        for first in range(0, self.n_layers, LAYERS_PER_ROW):
            rows = occupancy[first : first + LAYERS_PER_ROW]
            bars = "".join(BLOCKS[min(len(BLOCKS) - 1, round(ready * (len(BLOCKS) - 1) / self.n_experts))] for ready in rows[:, 0])
            table.add_row(f"{first}-{first + len(rows) - 1}", bars, str(int(rows[:, 1].sum())), str(int(rows[:, 2].sum())))
        table.add_row("all", f"{int(occupancy[:, 0].sum())} ready", str(int(occupancy[:, 1].sum())), str(int(occupancy[:, 2].sum())))
        return table


def cache_figures(stats: PipelineStats) -> dict[str, int]:
    """Return the cumulative counters the cache table shows."""
    io = stats.io.counters
    figures = {key: int(io.get(key, 0)) for key in ("lookups", "hits", "io_reads", "io_bytes", "prefetch_useful", "prefetch_wasted", "prefetch_late")}
    figures["lease_wait_us"] = figures["compute_us"] = 0
    for worker in stats.compute.counters.get("workers", {}).values():
        figures["lease_wait_us"] += int(worker["counters"].get("lease_wait_us", 0))
        figures["compute_us"] += int(worker["counters"].get("compute_us", 0))
    return figures


def daemon_table(status: dict[str, Any]) -> Table:
    table = Table(title=f"daemons (launcher pid {status['launcher_pid']})", title_justify="left")
    for column in ("daemon", "pid", "state", "uptime_s", "restarts"):
        table.add_column(column)
    for name, daemon in status["daemons"].items():
        style = "" if daemon["state"] == "running" else "yellow"
        table.add_row(name, str(daemon["pid"]), Text(daemon["state"], style=style), f"{daemon['uptime_s']:.1f}", str(daemon["restarts"]))
    return table


def ratio(part: int, whole: int) -> str:
    return f"{part / whole:.3f}" if whole else "-"


def format_us(value_us: float) -> str:
    if value_us >= 1_000_000:
        return f"{value_us / 1e6:.2f}s"
    if value_us >= 1000:
        return f"{value_us / 1000:.2f}ms"
    return f"{value_us:.0f}us"


def watch(info: PipelineInfo, duration_s: float | None = None, refresh_s: float = 1.0, console: Console | None = None) -> None:
    """Refresh the view every refresh_s until duration_s has passed (None: until Ctrl-C)."""
    console = console or Console()
    watcher = Watcher(info)
    end_s = None if duration_s is None else time.monotonic() + duration_s
    try:
        previous = watcher.sample()
        with Live(watcher.render(None, previous), console=console, auto_refresh=False) as live:
            while end_s is None or time.monotonic() < end_s:
                wait_s = refresh_s if end_s is None else min(refresh_s, max(0.0, end_s - time.monotonic()))
                time.sleep(wait_s)
                now = watcher.sample()
                live.update(watcher.render(previous, now), refresh=True)
                previous = now
    except KeyboardInterrupt:
        pass
    finally:
        watcher.close()
