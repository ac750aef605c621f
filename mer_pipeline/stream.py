"""`mer stream`: replay a routing trace through a running pipeline and summarize the run.

For each token t in trace order, h = row t of the inputs (else seeded N(0, 1) float32);
for each layer l with a known routing cell,
    h = h + sum_k p_k * FFN(l, e_k)(rmsnorm(h)),  rmsnorm(v) = v / sqrt(mean(v^2) + 1e-5).
The compute daemon does the arithmetic; this module sends one token at a time, as
decode does, and collects the final h of every token.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mer_pipeline import wire
from mer_pipeline.client import DaemonClient
from mer_pipeline.histograms import new_histogram, subtract, summarize_all
from mer_pipeline.runtime import COMPUTE_SOCKET, IO_SOCKET, LAUNCHER_SOCKET, PIPELINE_FILE, PREDICTOR_SOCKET, PipelineInfo
from mer_pipeline.store import open_store
from mer_pipeline.trace import Trace, TraceError, iter_inputs

STATS_TIMEOUT_S = 10.0
# How often a waiting client checks whether the compute daemon restarted.
RESUME_CHECK_S = 1.0
MAX_ATTEMPTS = 5


class StreamError(RuntimeError):
    """The pipeline failed a token, or the trace does not fit the store."""


@dataclasses.dataclass
class PipelineStats:
    io: wire.StatsReply
    compute: wire.StatsReply
    predictor: wire.StatsReply | None


def load_pipeline(socket_dir: str | Path) -> PipelineInfo:
    path = Path(socket_dir) / PIPELINE_FILE
    if not path.is_file():
        raise StreamError(
            f"no running pipeline: {path} not found; start one with `mer-launch --topology NAME --store S`, "
            "and pass the same --topology or --socket-dir to this command"
        )
    return PipelineInfo.load(path)


def collect_stats(info: PipelineInfo) -> PipelineStats:
    clients = {name: DaemonClient(info.endpoint(socket), name) for name, socket in (("io", IO_SOCKET), ("compute", COMPUTE_SOCKET), ("predictor", PREDICTOR_SOCKET))}
    try:
        io = clients["io"].stats(STATS_TIMEOUT_S)
        compute = clients["compute"].stats(STATS_TIMEOUT_S)
        try:
            predictor = clients["predictor"].stats(2.0)
        except TimeoutError:
            predictor = None  # a dead predictor only costs prefetching
    finally:
        for client in clients.values():
            client.close()
    return PipelineStats(io, compute, predictor)


def check_trace_fits(trace: Trace, info: PipelineInfo) -> None:
    store = open_store(info.store)
    if trace.n_layers > store.shape.n_layers or trace.n_experts != store.shape.n_experts:
        raise TraceError(
            f"the trace has {trace.n_layers} layers x {trace.n_experts} experts but the store {info.store} has "
            f"{store.shape.n_layers} layers x {store.shape.n_experts} experts"
        )


def stream_trace(
    info: PipelineInfo,
    trace: Trace,
    inputs: np.ndarray | None,
    n_tokens: int | None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Send every token of the trace through the pipeline; return (final h per token, summary)."""
    check_trace_fits(trace, info)
    store = open_store(info.store)
    d_model = store.shape.d_model
    tokens = trace.tokens[: n_tokens] if n_tokens else trace.tokens
    timeout_s = info.config.runtime.request_timeout_s
    pids_before = daemon_pids(info)
    before = collect_stats(info)

    outputs = np.zeros((len(tokens), d_model), dtype=np.float32)
    cycle_us = np.zeros(len(tokens), dtype=np.int64)
    client = DaemonClient(info.endpoint(COMPUTE_SOCKET), "compute")
    start_s = time.perf_counter()
    columns = (TextColumn("streaming"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeRemainingColumn())
    try:
        with Progress(*columns, disable=not progress, transient=True) as bar:
            task = bar.add_task("stream", total=len(tokens))
            for index, (routing, hidden) in enumerate(zip(tokens, iter_inputs(len(tokens), d_model, inputs, seed))):
                request = wire.TokenRequest(
                    client.next_id(), index, wire.array_to_bytes(hidden), routing.layers, routing.experts, routing.probs
                )
                reply = resumable_request(info, client, request, timeout_s)
                if isinstance(reply, wire.RequestFailed):
                    raise StreamError(f"token {index} failed: {reply.error}" + (" (retryable)" if reply.retryable else ""))
                if not isinstance(reply, wire.TokenResult):
                    raise StreamError(f"token {index}: unexpected reply {reply.TYPE}")
                outputs[index] = wire.bytes_to_array(reply.hidden, 1, d_model, "token_result.hidden")[0]
                cycle_us[index] = reply.cycle_us
                bar.advance(task)
    finally:
        client.close()
    elapsed_s = time.perf_counter() - start_s
    after = collect_stats(info)
    pids_after = daemon_pids(info)
    restarted = sorted(name for name, pid in pids_after.items() if pid != pids_before.get(name))
    summary = summarize_run(info, store.dtype, tokens, trace, before, after, elapsed_s, cycle_us, restarted)
    return outputs, summary


def daemon_pids(info: PipelineInfo) -> dict[str, int | None]:
    """Return each daemon's pid as the launcher reports it (None while it is not running),
    or an empty dict if the launcher does not reply."""
    client = DaemonClient(info.endpoint(LAUNCHER_SOCKET), "launcher")
    try:
        reply = client.request(wire.ControlRequest(client.next_id(), "status", ""), 2.0)
    except TimeoutError:
        return {}
    finally:
        client.close()
    if not isinstance(reply, wire.ControlReply) or not reply.ok:
        return {}
    return {
        name: daemon.get("pid") if daemon.get("state") == "running" else None
        for name, daemon in reply.payload["daemons"].items()
    }


def compute_pid(info: PipelineInfo) -> int | None:
    """Return the compute daemon's pid as the launcher reports it, or None if unknown."""
    return daemon_pids(info).get("compute")


def pipeline_stop_reason(info: PipelineInfo) -> str | None:
    """Return why the pipeline `info` describes has stopped, or None while its launcher runs."""
    try:
        os.kill(info.launcher_pid, 0)
    except ProcessLookupError:
        return f"its launcher (pid {info.launcher_pid}) has exited"
    except PermissionError:
        pass
    if not (Path(info.socket_dir) / PIPELINE_FILE).exists():
        return f"{Path(info.socket_dir) / PIPELINE_FILE} was removed"
    return None


def resumable_request(info: PipelineInfo, client: DaemonClient, request: wire.Message, timeout_s: float) -> wire.Message:
    """Send a request to the compute daemon and return its reply, sending it again if the
    compute daemon restarts or reports a retryable failure meanwhile.

    Token and expert requests are pure functions of their inputs, so a second
    computation gives the same result.
    """
    deadline = time.monotonic() + timeout_s
    serving_pid = compute_pid(info)
    client.send(request)
    attempts = 1
    while time.monotonic() < deadline:
        try:
            reply = client.receive(RESUME_CHECK_S, "runtime.request_timeout_s")
        except TimeoutError:
            stop_reason = pipeline_stop_reason(info)
            if stop_reason is not None:
                raise StreamError(
                    f"request {request.request_id} failed: the pipeline stopped ({stop_reason}); "
                    "start it again with mer-launch"
                ) from None
            pid = compute_pid(info)
            if pid is not None and pid != serving_pid:
                serving_pid = pid
                attempts += 1
                client.send(request)
            continue
        if getattr(reply, "request_id", None) != request.request_id:
            continue
        if isinstance(reply, wire.RequestFailed) and reply.retryable and attempts < MAX_ATTEMPTS:
            attempts += 1
            client.send(request)
            continue
        return reply
    raise StreamError(
        f"request {request.request_id} got no reply from the compute daemon within runtime.request_timeout_s="
        f"{timeout_s:.0f} s ({attempts} attempts); check `mer ctl status` and the compute daemon's log"
    )


def _delta(after: dict[str, Any], before: dict[str, Any], key: str) -> int:
    return int(after.get(key, 0)) - int(before.get(key, 0))


def _worker_totals(compute: wire.StatsReply) -> dict[str, int]:
    totals: dict[str, int] = {}
    for worker in compute.counters.get("workers", {}).values():
        for key, value in worker["counters"].items():
            if isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
    return totals


def _since(after: dict[str, Any], before: dict[str, Any], restarted: bool) -> tuple[dict[str, int], bool]:
    """Return one daemon's integer counters counted since `before`, and whether the daemon
    restarted in between (then the counters since its restart are returned). A restart
    the launcher did not report still shows as a counter that went down."""
    numeric = {k: v for k, v in after.items() if isinstance(v, int) and not isinstance(v, bool)}
    previous = {k: v for k, v in before.items() if isinstance(v, int) and not isinstance(v, bool)}
    if restarted or any(value < previous.get(key, 0) for key, value in numeric.items()):
        return numeric, True
    return {key: value - previous.get(key, 0) for key, value in numeric.items()}, False


def _histograms_since(after: dict[str, str], before: dict[str, str]) -> dict[str, HdrHistogram]:
    """Return one process's stage histograms recorded since `before` (all of them if the
    process restarted in between)."""
    result = {}
    for stage, text in after.items():
        now = HdrHistogram.decode(text.encode("ascii"))
        if stage not in before:
            result[stage] = now
            continue
        difference = subtract(now, HdrHistogram.decode(before[stage].encode("ascii")))
        result[stage] = now if difference is None else difference
    return result


def summarize_run(
    info, dtype, tokens, trace, before: PipelineStats, after: PipelineStats, elapsed_s: float, cycle_us: np.ndarray,
    restarted_daemons: list[str],
) -> dict[str, Any]:
    """Summarize one stream: counters and stage histograms counted since `before`."""
    restarted = set(restarted_daemons)
    io, io_reset = _since(after.io.counters, before.io.counters, "io" in restarted)
    if io_reset:
        restarted.add("io")
    compute_reset = "compute" in restarted
    workers_before = before.compute.counters.get("workers", {})
    workers_after = after.compute.counters.get("workers", {})
    worker_totals: dict[str, int] = {}
    per_process = [
        _histograms_since(after.io.histograms, {} if io_reset else before.io.histograms),
        _histograms_since(after.compute.histograms, {} if compute_reset else before.compute.histograms),
    ]
    for name, worker in workers_after.items():
        previous = workers_before.get(name, {"counters": {}, "histograms": {}})
        counters, reset = _since(worker["counters"], previous["counters"], name in restarted)
        if reset:
            restarted.add(name)
        for key, value in counters.items():
            worker_totals[key] = worker_totals.get(key, 0) + value
        per_process.append(_histograms_since(worker["histograms"], {} if reset else previous["histograms"]))
    merged: dict[str, HdrHistogram] = {}
    for histograms in per_process:
        for stage, histogram in histograms.items():
            merged.setdefault(stage, new_histogram()).add(histogram)
    stages = summarize_all(merged)

    lookups, hits, misses = io.get("lookups", 0), io.get("hits", 0), io.get("misses", 0)
    io_bytes, io_busy_us = io.get("io_bytes", 0), io.get("io_busy_us", 0)
    lease_wait_us = worker_totals.get("lease_wait_us", 0)
    compute_us = worker_totals.get("compute_us", 0)
    expert_tasks = worker_totals.get("tasks", 0)
    n_tokens = len(tokens)
    layer_steps = sum(len(t.layers) for t in tokens)
    busy_us = lease_wait_us + compute_us
    return {
        "tokens": n_tokens,
        "layer_steps": layer_steps,
        "skipped_layer_steps": sum(trace.n_layers - len(t.layers) for t in tokens),
        "lookups": lookups,
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / lookups if lookups else 0.0,
        "prefetch_issued": io.get("prefetch_issued", 0),
        "prefetch_useful": io.get("prefetch_useful", 0),
        "prefetch_wasted": io.get("prefetch_wasted", 0),
        "prefetch_late": io.get("prefetch_late", 0),
        # Expert tasks whose kernel ran while the expert was being read (workers.compute_during_read).
        "computed_during_read": worker_totals.get("computed_during_read", 0),
        "io_path": after.io.counters.get("io_path", "unknown"),
        "io_reads": io.get("io_reads", 0),
        "io_bytes": io_bytes,
        "io_mib_per_s": io_bytes / 2**20 / (io_busy_us / 1e6) if io_busy_us else 0.0,
        "io_latency_us": stages.get("io_device", {}),
        "compute_us": stages.get("compute_expert", {}),
        "cycle_us": {"mean": float(cycle_us.mean()) if n_tokens else 0.0, "p50": float(np.median(cycle_us)) if n_tokens else 0.0},
        "io_wait_us_per_token": lease_wait_us / n_tokens if n_tokens else 0.0,
        "compute_us_per_token": compute_us / n_tokens if n_tokens else 0.0,
        "io_share": lease_wait_us / busy_us if busy_us else 0.0,
        "expert_ffn_per_s": expert_tasks / elapsed_s if elapsed_s else 0.0,
        "tokens_per_s": n_tokens / elapsed_s if elapsed_s else 0.0,
        "elapsed_s": elapsed_s,
        "cache_slots": info.pool_slots - len(info.config.pool.pinned),
        "pool_slots": info.pool_slots,
        "experts_total": trace.n_layers * trace.n_experts,
        "dtype": dtype,
        "pinned": len(info.config.pool.pinned),
        "predictor": info.config.predictor.kind,
        "eviction": info.config.io.eviction,
        "workers": len(info.worker_cpus),
        "stages": stages,
        # Daemons that restarted during the run: their counters cover only the time since.
        "restarted_during_run": sorted(restarted),
    }
