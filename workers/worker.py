"""A compute worker: takes expert tasks from the compute daemon, leases the expert's slot
from the I/O daemon, runs the SwiGLU kernel on the slot, releases the lease, replies.

A worker trusts slot data only between LeaseGranted and its Release, so the I/O daemon
never overwrites a slot under it. The kernel runs single-threaded: each worker is
pinned to its own CPU set.

Computing during the read (workers.compute_during_read): on a miss the I/O daemon
replies LoadStarted first, and the worker runs the kernel on the slot's bytes below
ready_bytes while the rest arrives (kernels.SwigluProgress). The partial result is kept
only if the LeaseGranted that follows has the same slot and generation, because then
the bytes were this read's. Otherwise the worker computes again on the leased slot.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import time
from typing import Any

import numpy as np
import zmq

from mer_pipeline import wire
from mer_pipeline.histograms import StageHistograms
from mer_pipeline.observe.spans import SpanRecorder
from mer_pipeline.runtime import (
    IO_SOCKET,
    TASKS_SOCKET,
    PipelineInfo,
    exit_with_parent,
    parent_alive,
    pin_cpus,
    setup_logging,
)
from mer_pipeline.slot_pool import EMPTY, READY, SlotPool
from mer_pipeline.store import open_store

log = logging.getLogger(__name__)

POLL_INTERVAL_MS = 500
# How long a worker computing during a read waits for more bytes once the kernel has
# caught up with the read. A reply from the I/O daemon ends the wait at once.
READ_PROGRESS_POLL_MS = 1
STATS_INTERVAL_S = 1.0


@dataclasses.dataclass
class ReadCompute:
    """Kernel work a task did while its expert was being read."""

    started: wire.LoadStarted | None = None
    # kernels.SwigluProgress, made when the read starts (kernels is imported late).
    progress: Any = None
    kernel_s: float = 0.0
    start_ns: int = 0
    end_ns: int = 0


class LeaseError(RuntimeError):
    """The I/O daemon could not provide an expert's slot."""


class Worker:
    def __init__(self, info: PipelineInfo, index: int) -> None:
        from mer_pipeline import kernels  # imported here so pinning happens before numba starts threads

        self.info = info
        self.index = index
        self.kernels = kernels
        self.store = open_store(info.store)
        self.layout = self.store.layout
        self.pool = SlotPool.attach(info.pool_data_name, info.pool_table_name)
        self.context = zmq.Context()
        self.tasks = self.context.socket(zmq.DEALER)
        self.tasks.setsockopt(zmq.IDENTITY, f"worker:{index}".encode())
        self.tasks.setsockopt(zmq.LINGER, 0)
        self.tasks.connect(info.endpoint(TASKS_SOCKET))
        self.io = self.context.socket(zmq.DEALER)
        self.io.setsockopt(zmq.IDENTITY, f"worker:{index}:{os.getpid()}".encode())
        self.io.setsockopt(zmq.LINGER, 0)
        self.io.connect(info.endpoint(IO_SOCKET))
        self.histograms = StageHistograms()
        self.spans = SpanRecorder(f"worker:{index}")
        self.counters = {
            "tasks": 0, "task_errors": 0, "hits": 0, "misses": 0, "lease_wait_us": 0, "compute_us": 0, "lease_retries": 0,
            # Misses computed during the read, and those whose partial result was discarded.
            "computed_during_read": 0, "during_read_discarded": 0,
        }
        self.next_request_id = 1
        self.running = True

    def lease(self, expert: int, on_load_started=None) -> wire.LeaseGranted:
        """Return a lease on the slot holding `expert`, waiting for a read if needed.

        With `on_load_started`, the request sets `stream`, and the callback runs with the
        LoadStarted reply while the read is in flight.

        A request unanswered for runtime.lease_retry_s is sent again, because the I/O
        daemon may have restarted and lost it. The worker holds no lease while it
        waits, so before retrying it reclaims every lease the table records for it
        (a grant whose reply died with the old daemon), and it releases any grant
        that replies to an older request.
        """
        runtime_config = self.info.config.runtime
        deadline = time.monotonic() + runtime_config.request_timeout_s
        stream = on_load_started is not None
        request_id = self._send_lease_request(expert, reclaim_first=False, stream=stream)
        retry_at = time.monotonic() + runtime_config.lease_retry_s
        while time.monotonic() < deadline:
            if not self.io.poll(POLL_INTERVAL_MS):
                if not parent_alive(self.info.launcher_pid):
                    raise SystemExit(0)
                if time.monotonic() >= retry_at:
                    self.counters["lease_retries"] += 1
                    log.warning("lease request unanswered, retrying worker=%d expert=%d request_id=%d", self.index, expert, request_id)
                    request_id = self._send_lease_request(expert, reclaim_first=True, stream=stream)
                    retry_at = time.monotonic() + runtime_config.lease_retry_s
                continue
            try:
                reply = wire.decode(self.io.recv(), (wire.LeaseGranted, wire.LeaseFailed, wire.LoadStarted))
            except wire.WireError as exc:
                log.warning("rejected message from the io daemon error=%s", exc)
                continue
            if isinstance(reply, wire.LoadStarted):
                if reply.request_id == request_id and on_load_started is not None:
                    on_load_started(reply)
                    retry_at = time.monotonic() + runtime_config.lease_retry_s
                continue
            if reply.request_id != request_id:
                if isinstance(reply, wire.LeaseGranted):
                    self.io.send(wire.Release(self.index, reply.slot, reply.generation).encode())
                continue
            if isinstance(reply, wire.LeaseFailed):
                raise LeaseError(reply.error)
            return reply
        raise LeaseError(
            f"worker:{self.index} timed out after {runtime_config.request_timeout_s:.0f} s waiting for the io daemon "
            f"to provide expert {expert}; check the io daemon's log or raise runtime.request_timeout_s"
        )

    def _send_lease_request(self, expert: int, reclaim_first: bool, stream: bool) -> int:
        request_id = self.next_request_id
        self.next_request_id += 1
        if reclaim_first:
            self.io.send(wire.ReclaimLeases(self.index).encode())
        self.io.send(wire.LeaseRequest(request_id, self.index, expert, stream).encode())
        return request_id

    def compute_during_read(self, started: wire.LoadStarted, progress) -> float:
        """Advance `progress` on the slot's bytes as they arrive; return the kernel seconds.

        It returns when the kernel is done or a reply from the I/O daemon is waiting. It
        also returns when the slot changed generation or became EMPTY (the read failed),
        or when no byte arrived for runtime.lease_retry_s (the daemon may be gone).
        """
        table = self.pool.table
        slot, generation = started.slot, started.generation
        stall_limit_s = self.info.config.runtime.lease_retry_s
        payload_bytes = self.layout.payload_bytes
        kernel_s = 0.0
        last_progress_s = time.monotonic()
        view = self.pool.slot_view(slot)
        try:
            while not progress.done:
                state = table.state(slot)
                if table.generation(slot) != generation or state == EMPTY:
                    return kernel_s
                ready_bytes = payload_bytes if state == READY else table.ready_bytes(slot)
                began_s = time.perf_counter()
                if progress.advance(view, ready_bytes):
                    kernel_s += time.perf_counter() - began_s
                    last_progress_s = time.monotonic()
                    continue
                if self.io.poll(READ_PROGRESS_POLL_MS) or time.monotonic() - last_progress_s > stall_limit_s:
                    return kernel_s
        finally:
            view.release()
        return kernel_s

    def run_task(self, task: wire.Task) -> wire.Message:
        start_ns = time.monotonic_ns()
        start = time.perf_counter()
        try:
            x = wire.bytes_to_array(task.x, task.rows, self.layout.d_model, "task.x")
        except wire.WireError as exc:
            self.counters["task_errors"] += 1
            return wire.TaskFailed(task.task_id, self.index, str(exc))
        during_read = ReadCompute()

        def on_load_started(started: wire.LoadStarted) -> None:
            during_read.started = started
            during_read.start_ns = time.monotonic_ns()
            if during_read.progress is None:
                during_read.progress = self.kernels.SwigluProgress(self.layout, x)
            during_read.kernel_s += self.compute_during_read(started, during_read.progress)
            during_read.end_ns = time.monotonic_ns()

        stream = self.info.config.workers.compute_during_read
        try:
            grant = self.lease(task.expert, on_load_started if stream else None)
        except LeaseError as exc:
            self.counters["task_errors"] += 1
            log.error("lease failed task=%d expert=%d error=%s", task.task_id, task.expert, exc)
            return wire.TaskFailed(task.task_id, self.index, str(exc))
        leased = time.perf_counter()
        leased_ns = time.monotonic_ns()
        started, progress = during_read.started, during_read.progress
        try:
            view = self.pool.slot_view(grant.slot)
            try:
                if started is not None and (started.slot, started.generation) == (grant.slot, grant.generation):
                    progress.advance(view, self.layout.payload_bytes)
                    y = progress.result()
                    self.counters["computed_during_read"] += 1
                else:
                    if started is not None:
                        self.counters["during_read_discarded"] += 1
                    y = self.kernels.swiglu(view, self.layout, x)
            finally:
                view.release()
        finally:
            self.io.send(wire.Release(self.index, grant.slot, grant.generation).encode())
        done = time.perf_counter()
        self.spans.record(
            "lease_wait", start_ns, leased_ns, task=task.task_id, expert=task.expert, request_id=grant.request_id, hit=grant.hit
        )
        if started is not None:
            self.spans.record(
                "kernel_during_read", during_read.start_ns, during_read.end_ns, task=task.task_id, expert=task.expert
            )
        self.spans.record("kernel", leased_ns, time.monotonic_ns(), task=task.task_id, expert=task.expert, rows=task.rows)
        # Kernel time during the read counts as compute, not as waiting for the lease.
        kernel_during_read_s = during_read.kernel_s
        lease_wait_us = int((leased - start - kernel_during_read_s) * 1e6)
        compute_us = int((done - leased + kernel_during_read_s) * 1e6)
        self.histograms.record_us("lease_wait", lease_wait_us)
        self.histograms.record_us("compute_expert", compute_us)
        self.counters["tasks"] += 1
        self.counters["hits" if grant.hit else "misses"] += 1
        self.counters["lease_wait_us"] += lease_wait_us
        self.counters["compute_us"] += compute_us
        return wire.TaskResult(
            task.task_id, self.index, task.rows, wire.array_to_bytes(y), lease_wait_us, compute_us, grant.hit
        )

    def stats(self, request_id: int) -> wire.StatsReply:
        return wire.StatsReply(request_id, f"worker:{self.index}", dict(self.counters), self.histograms.encode())

    def request_stop(self, signum: int, frame: object) -> None:
        """Stop after the task in hand (SIGTERM): a graceful restart loses no work."""
        log.info("worker stop requested index=%d signal=%d", self.index, signum)
        self.running = False

    def serve(self) -> None:
        self.tasks.send(wire.WorkerReady(self.index, os.getpid()).encode())
        log.info("worker ready index=%d pid=%d cpus=%s", self.index, os.getpid(), sorted(os.sched_getaffinity(0)))
        heartbeat_s = self.info.config.runtime.heartbeat_s
        last_sent_s = time.monotonic()
        while self.running:
            if not self.tasks.poll(POLL_INTERVAL_MS):
                if not parent_alive(self.info.launcher_pid):
                    log.info("worker stop index=%d reason=launcher_gone", self.index)
                    return
                if time.monotonic() - last_sent_s >= heartbeat_s:
                    # Lets a restarted compute daemon find this worker.
                    self.tasks.send(wire.WorkerReady(self.index, os.getpid()).encode())
                    last_sent_s = time.monotonic()
                continue
            last_sent_s = time.monotonic()
            frame = self.tasks.recv()
            try:
                message = wire.decode(frame, (wire.Task, wire.StatsRequest, wire.SpansRequest, wire.Shutdown))
            except wire.WireError as exc:
                log.warning("rejected message on tasks socket error=%s", exc)
                continue
            if isinstance(message, wire.Task):
                self.tasks.send(self.run_task(message).encode())
            elif isinstance(message, wire.StatsRequest):
                self.tasks.send(self.stats(message.request_id).encode())
            elif isinstance(message, wire.SpansRequest):
                self.tasks.send(self.spans.reply(message).encode())
            else:
                log.info("worker stop index=%d reason=shutdown tasks=%d", self.index, self.counters["tasks"])
                return

    def close(self) -> None:
        self.tasks.close(0)
        self.io.close(0)
        self.context.term()
        self.pool.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers", description="MER compute worker")
    parser.add_argument("--pipeline", required=True, help="path of the pipeline.json the launcher wrote")
    parser.add_argument("--index", type=int, required=True, help="worker index, 0-based")
    args = parser.parse_args(argv)

    info = PipelineInfo.load(args.pipeline)
    setup_logging(f"worker:{args.index}", info.config.runtime.log_level)
    exit_with_parent()
    pin_cpus(info.worker_cpus[args.index], f"worker:{args.index}")
    os.environ["NUMBA_NUM_THREADS"] = "1"
    worker = Worker(info, args.index)
    signal.signal(signal.SIGTERM, worker.request_stop)
    worker.kernels.set_num_threads(1)
    worker.kernels.warmup()
    try:
        worker.serve()
    finally:
        worker.close()
