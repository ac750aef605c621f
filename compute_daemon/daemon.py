"""The compute daemon.

Clients send TokenRequest (a token through a list of layer steps) or ExpertRequest (one
expert on a batch of rows) to the ROUTER at compute.sock. For each layer step the daemon
normalizes the hidden state and sends one Task per routed expert to an idle worker over
the ROUTER at tasks.sock. It also reports the step's experts to the predictor. When
every result is in, it adds them to the residual stream in routing order, so the result
does not depend on which worker ran a task or when it finished.

Task delivery is at least once, and results are applied exactly once. A task is sent
again when its worker restarts (a new WorkerReady from the same worker name with a new
pid) or stays silent past runtime.request_timeout_s. A second result for a task id that
is already done is dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time

import numpy as np
import zmq

from mer_pipeline import wire
from mer_pipeline.histograms import StageHistograms
from mer_pipeline.observe.spans import SpanRecorder
from mer_pipeline.runtime import (
    COMPUTE_SOCKET,
    PREDICTOR_SOCKET,
    TASKS_SOCKET,
    PipelineInfo,
    RateLimitedWarning,
    parent_alive,
    run_daemon,
)
from mer_pipeline.store import open_store

log = logging.getLogger(__name__)

RMS_EPS = 1e-5
POLL_MS = 100
STATS_GATHER_TIMEOUT_S = 2.0
MAX_TASK_ATTEMPTS = 3


def rmsnorm(h: np.ndarray) -> np.ndarray:
    """v / sqrt(mean(v^2) + 1e-5), in float32."""
    return (h / np.sqrt(np.mean(h * h, dtype=np.float32) + np.float32(RMS_EPS))).astype(np.float32)


@dataclasses.dataclass
class Job:
    """One client request in progress."""

    client: bytes
    request: wire.TokenRequest | wire.ExpertRequest
    received_s: float
    received_ns: int = dataclasses.field(default_factory=time.monotonic_ns)
    hidden: np.ndarray | None = None
    step: int = 0
    step_started_s: float = 0.0
    outputs: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    expected: int = 0
    io_wait_us: int = 0
    compute_us: int = 0
    dispatched: bool = False
    failed: bool = False


@dataclasses.dataclass
class TaskRecord:
    task_id: int
    job: Job
    slot_in_step: int
    expert: int
    rows: int
    x: bytes
    worker: bytes | None = None
    sent_s: float = 0.0
    attempts: int = 0


@dataclasses.dataclass
class WorkerState:
    name: bytes
    pid: int
    task_id: int | None = None


@dataclasses.dataclass
class StatsGather:
    client: bytes
    request_id: int
    waiting: set[bytes]
    deadline_s: float
    replies: dict[str, dict] = dataclasses.field(default_factory=dict)
    # Set for a SpansRequest: the gather collects spans instead of stats.
    spans_since_ns: int | None = None


class ComputeDaemon:
    def __init__(self, info: PipelineInfo) -> None:
        self.info = info
        store = open_store(info.store)
        self.n_experts = store.shape.n_experts
        self.n_experts_total = store.n_experts_total
        self.d_model = store.shape.d_model
        self.timeout_s = info.config.runtime.request_timeout_s

        self.context = zmq.Context()
        self.clients = self._bind(zmq.ROUTER, COMPUTE_SOCKET)
        self.tasks_socket = self._bind(zmq.ROUTER, TASKS_SOCKET)
        # A restarted worker reconnects under its old name before the dead connection
        # is gone; handover routes that name to the new connection.
        self.tasks_socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.predictor = self.context.socket(zmq.DEALER)
        self.predictor.setsockopt(zmq.LINGER, 0)
        self.predictor.setsockopt(zmq.SNDHWM, 1000)
        self.predictor.connect(info.endpoint(PREDICTOR_SOCKET))

        self.workers: dict[bytes, WorkerState] = {}
        self.queue: collections.deque[int] = collections.deque()
        self.tasks: dict[int, TaskRecord] = {}
        self.gathers: dict[int, StatsGather] = {}
        self.next_task_id = 1
        self.next_gather_id = 1
        self.histograms = StageHistograms()
        self.spans = SpanRecorder("compute")
        self.counters = collections.Counter()
        self.warn = RateLimitedWarning(log)
        self.running = True

    def _bind(self, kind: int, name: str) -> zmq.Socket:
        socket = self.context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        socket.bind(self.info.endpoint(name))
        return socket

    # --- client requests ------------------------------------------------------------

    def on_client(self, client: bytes, frame: bytes) -> None:
        try:
            message = wire.decode(
                frame, (wire.TokenRequest, wire.ExpertRequest, wire.StatsRequest, wire.SpansRequest, wire.Shutdown)
            )
        except wire.WireError as exc:
            self._reject(client, frame, exc)
            return
        if isinstance(message, wire.StatsRequest):
            self.start_stats_gather(client, message.request_id)
        elif isinstance(message, wire.SpansRequest):
            self.start_stats_gather(client, message.request_id, spans_since_ns=message.since_ns)
        elif isinstance(message, wire.Shutdown):
            log.info("compute_daemon stop reason=shutdown_request")
            self.running = False
        elif isinstance(message, wire.TokenRequest):
            self.start_token(client, message)
        else:
            self.start_expert_request(client, message)

    def _reject(self, client: bytes, frame: bytes, exc: Exception) -> None:
        self.counters["rejected_messages"] += 1
        self.warn.warning("message", "message rejected bytes=%d error=%s", len(frame), exc)

    def _fail(self, job: Job, error: str, retryable: bool) -> None:
        job.failed = True
        self.counters["failed_requests"] += 1
        log.error("request failed request_id=%d error=%s", job.request.request_id, error)
        self._send_client(job.client, wire.RequestFailed(job.request.request_id, error, retryable))

    def _send_client(self, client: bytes, message: wire.Message) -> None:
        try:
            self.clients.send_multipart([client, message.encode()])
        except zmq.ZMQError as exc:
            # A client that stopped waiting (a stats request that timed out) has closed its socket.
            log.warning("reply dropped, the requesting client is gone type=%s error=%s", message.TYPE, exc)

    def start_token(self, client: bytes, request: wire.TokenRequest) -> None:
        job = Job(client, request, time.perf_counter())
        steps = len(request.layers)
        if len(request.experts) != steps or len(request.probs) != steps:
            self._fail(job, "layers, experts and probs must have one entry per layer step", False)
            return
        for layer, experts, probs in zip(request.layers, request.experts, request.probs):
            if len(experts) != len(probs) or not experts:
                self._fail(job, f"layer {layer}: experts and probs must be non-empty and of equal length", False)
                return
            for expert in experts:
                expert_id = layer * self.n_experts + expert
                if not (0 <= expert < self.n_experts and 0 <= expert_id < self.n_experts_total):
                    self._fail(job, f"layer {layer} expert {expert} is outside the store's experts", False)
                    return
        try:
            hidden = wire.bytes_to_array(request.hidden, 1, self.d_model, "token.hidden")[0].copy()
        except wire.WireError as exc:
            self._fail(job, str(exc), False)
            return
        job.hidden = hidden
        self.start_step(job)

    def start_step(self, job: Job) -> None:
        request = job.request
        assert isinstance(request, wire.TokenRequest)
        if job.step == len(request.layers):
            self.finish_token(job)
            return
        layer = request.layers[job.step]
        experts = request.experts[job.step]
        x = wire.array_to_bytes(rmsnorm(job.hidden))
        job.step_started_s = time.perf_counter()
        job.outputs = {}
        job.expected = len(experts)
        expert_ids = [layer * self.n_experts + e for e in experts]
        self.observe(request.token, layer, expert_ids)
        for index, expert_id in enumerate(expert_ids):
            self.enqueue(job, index, expert_id, 1, x)

    def start_expert_request(self, client: bytes, request: wire.ExpertRequest) -> None:
        job = Job(client, request, time.perf_counter())
        if not 0 <= request.expert < self.n_experts_total:
            self._fail(job, f"expert id {request.expert} is outside 0..{self.n_experts_total - 1}", False)
            return
        try:
            wire.bytes_to_array(request.x, request.rows, self.d_model, "expert_request.x")
        except wire.WireError as exc:
            self._fail(job, str(exc), False)
            return
        job.expected = 1
        job.step_started_s = time.perf_counter()
        self.enqueue(job, 0, request.expert, request.rows, request.x)

    def observe(self, token: int, layer: int, expert_ids: list[int]) -> None:
        try:
            self.predictor.send(wire.Observation(token, layer, expert_ids).encode(), zmq.NOBLOCK)
        except zmq.Again:
            self.counters["observations_dropped"] += 1

    def enqueue(self, job: Job, slot_in_step: int, expert: int, rows: int, x: bytes) -> None:
        task_id = self.next_task_id
        self.next_task_id += 1
        self.tasks[task_id] = TaskRecord(task_id, job, slot_in_step, expert, rows, x)
        self.queue.append(task_id)

    def finish_token(self, job: Job) -> None:
        request = job.request
        cycle_us = int((time.perf_counter() - job.received_s) * 1e6)
        self.histograms.record_us("token", cycle_us)
        self.spans.record(
            "token", job.received_ns, time.monotonic_ns(), token=request.token, request_id=request.request_id, layer_steps=job.step
        )
        self.counters["tokens"] += 1
        reply = wire.TokenResult(request.request_id, wire.array_to_bytes(job.hidden), cycle_us, job.io_wait_us, job.compute_us)
        self._send_client(job.client, reply)

    # --- workers --------------------------------------------------------------------

    def on_worker(self, name: bytes, frame: bytes) -> None:
        try:
            message = wire.decode(frame, (wire.WorkerReady, wire.TaskResult, wire.TaskFailed, wire.StatsReply, wire.SpansReply))
        except wire.WireError as exc:
            self._reject(name, frame, exc)
            return
        if isinstance(message, wire.WorkerReady):
            self.on_worker_ready(name, message)
        elif isinstance(message, (wire.StatsReply, wire.SpansReply)):
            self.on_worker_stats(name, message)
        else:
            self.on_task_done(name, message)

    def on_worker_ready(self, name: bytes, message: wire.WorkerReady) -> None:
        """Register a worker, or take an idle worker's heartbeat (same name and pid)."""
        previous = self.workers.get(name)
        if previous is not None and previous.pid == message.pid:
            return
        if previous is not None and previous.task_id is not None:
            self.requeue(previous.task_id, f"{name.decode()} restarted")
        self.workers[name] = WorkerState(name, message.pid)
        self.counters["worker_starts"] += 1
        log.info("worker registered name=%s pid=%d workers=%d", name.decode(), message.pid, len(self.workers))

    def requeue(self, task_id: int, reason: str) -> None:
        record = self.tasks.get(task_id)
        if record is None:
            return
        if record.worker in self.workers and self.workers[record.worker].task_id == task_id:
            self.workers[record.worker].task_id = None
        record.worker = None
        if record.attempts >= MAX_TASK_ATTEMPTS:
            del self.tasks[task_id]
            if not record.job.failed:
                self._fail(record.job, f"expert {record.expert} task failed {record.attempts} times, last: {reason}", True)
            return
        self.counters["task_retries"] += 1
        log.warning("task requeued task=%d expert=%d attempt=%d reason=%s", task_id, record.expert, record.attempts, reason)
        self.queue.appendleft(task_id)

    def on_task_done(self, name: bytes, message: wire.TaskResult | wire.TaskFailed) -> None:
        worker = self.workers.get(name)
        if worker is not None and worker.task_id == message.task_id:
            worker.task_id = None
        record = self.tasks.pop(message.task_id, None)
        if record is None:
            self.counters["duplicate_results"] += 1
            return
        job = record.job
        if job.failed:
            return
        if isinstance(message, wire.TaskFailed):
            job.failed = True
            self._drop_job_tasks(job)
            self._fail(job, message.error, False)
            return
        try:
            y = wire.bytes_to_array(message.y, message.rows, self.d_model, "task_result.y")
        except wire.WireError as exc:
            self.tasks[message.task_id] = record
            self.requeue(message.task_id, str(exc))
            return
        job.outputs[record.slot_in_step] = y
        round_trip_us = (time.perf_counter() - record.sent_s) * 1e6
        self.histograms.record_us("task_round_trip", round_trip_us)
        self.histograms.record_us("task_overhead", round_trip_us - message.compute_us)
        job.io_wait_us += message.lease_wait_us
        job.compute_us += message.compute_us
        if len(job.outputs) == job.expected:
            self.finish_step(job)

    def _drop_job_tasks(self, job: Job) -> None:
        for task_id in [t for t, record in self.tasks.items() if record.job is job]:
            del self.tasks[task_id]

    def finish_step(self, job: Job) -> None:
        self.histograms.record_us("layer_step", (time.perf_counter() - job.step_started_s) * 1e6)
        request = job.request
        if isinstance(request, wire.ExpertRequest):
            self._send_client(job.client, wire.ExpertResult(request.request_id, request.rows, wire.array_to_bytes(job.outputs[0])))
            return
        self.counters["layer_steps"] += 1
        for index, p in enumerate(request.probs[job.step]):
            job.hidden += np.float32(p) * job.outputs[index][0]
        job.step += 1
        self.start_step(job)

    def dispatch(self) -> None:
        idle = [w for w in self.workers.values() if w.task_id is None]
        while idle and self.queue:
            task_id = self.queue.popleft()
            record = self.tasks.get(task_id)
            if record is None or record.job.failed:
                continue
            worker = idle.pop()
            record.worker = worker.name
            record.sent_s = time.perf_counter()
            record.attempts += 1
            if not record.job.dispatched:
                record.job.dispatched = True
                self.histograms.record_us("dispatch", (record.sent_s - record.job.received_s) * 1e6)
            try:
                self.tasks_socket.send_multipart([worker.name, wire.Task(task_id, record.expert, record.rows, record.x).encode()])
            except zmq.ZMQError as exc:
                log.warning("worker unreachable name=%s error=%s", worker.name.decode(), exc)
                del self.workers[worker.name]
                record.worker = None
                self.queue.appendleft(task_id)
                continue
            worker.task_id = task_id
            self.counters["tasks"] += 1

    def check_timeouts(self) -> None:
        now = time.perf_counter()
        for worker in list(self.workers.values()):
            if worker.task_id is None:
                continue
            record = self.tasks.get(worker.task_id)
            if record is None:
                worker.task_id = None
            elif now - record.sent_s > self.timeout_s:
                self.requeue(worker.task_id, f"{worker.name.decode()} gave no result within runtime.request_timeout_s={self.timeout_s:.0f} s")

    # --- stats ------------------------------------------------------------------------

    def start_stats_gather(self, client: bytes, request_id: int, spans_since_ns: int | None = None) -> None:
        gather_id = self.next_gather_id
        self.next_gather_id += 1
        gather = StatsGather(client, request_id, set(self.workers), time.monotonic() + STATS_GATHER_TIMEOUT_S)
        gather.spans_since_ns = spans_since_ns
        self.gathers[gather_id] = gather
        if spans_since_ns is None:
            request: wire.Message = wire.StatsRequest(gather_id)
        else:
            request = wire.SpansRequest(gather_id, spans_since_ns)
        for name in list(gather.waiting):
            try:
                self.tasks_socket.send_multipart([name, request.encode()])
            except zmq.ZMQError:
                gather.waiting.discard(name)
        self.finish_gathers()

    def on_worker_stats(self, name: bytes, reply: wire.StatsReply | wire.SpansReply) -> None:
        gather = self.gathers.get(reply.request_id)
        if gather is None or isinstance(reply, wire.SpansReply) != (gather.spans_since_ns is not None):
            return
        gather.waiting.discard(name)
        if isinstance(reply, wire.SpansReply):
            gather.replies.update(reply.processes)
        else:
            gather.replies[reply.daemon] = {"counters": reply.counters, "histograms": reply.histograms}
        self.finish_gathers()

    def finish_gathers(self) -> None:
        now = time.monotonic()
        for gather_id, gather in list(self.gathers.items()):
            if gather.waiting and now < gather.deadline_s:
                continue
            del self.gathers[gather_id]
            if gather.spans_since_ns is not None:
                processes = {"compute": self.spans.payload(gather.spans_since_ns), **gather.replies}
                self._send_client(gather.client, wire.SpansReply(gather.request_id, processes))
                continue
            counters = dict(self.counters)
            counters["workers_ready"] = len(self.workers)
            counters["workers_missing_stats"] = len(gather.waiting)
            counters["workers"] = gather.replies
            counters["queued_tasks"] = len(self.queue)
            self._send_client(gather.client, wire.StatsReply(gather.request_id, "compute", counters, self.histograms.encode()))

    # --- loop -------------------------------------------------------------------------

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.clients, zmq.POLLIN)
        poller.register(self.tasks_socket, zmq.POLLIN)
        log.info("compute_daemon ready pid=%d endpoint=%s", os.getpid(), self.info.endpoint(COMPUTE_SOCKET))
        last_check_s = time.monotonic()
        while self.running:
            events = dict(poller.poll(POLL_MS))
            if self.tasks_socket in events:
                while self.tasks_socket.poll(0):
                    name, frame = self.tasks_socket.recv_multipart()
                    self.on_worker(name, frame)
            if self.clients in events:
                while self.clients.poll(0):
                    parts = self.clients.recv_multipart()
                    if len(parts) != 2:
                        self._reject(parts[0], b"".join(parts[1:]), wire.WireError(f"expected 1 frame, got {len(parts) - 1}"))
                        continue
                    self.on_client(parts[0], parts[1])
            self.dispatch()
            now = time.monotonic()
            if now - last_check_s > 0.5:
                last_check_s = now
                self.check_timeouts()
                self.finish_gathers()
                if not parent_alive(self.info.launcher_pid):
                    log.info("compute_daemon stop reason=launcher_gone")
                    return
        self.shutdown_workers()

    def shutdown_workers(self) -> None:
        for name in self.workers:
            try:
                self.tasks_socket.send_multipart([name, wire.Shutdown(0).encode()], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def close(self) -> None:
        for socket in (self.clients, self.tasks_socket, self.predictor):
            socket.close(0)
        self.context.term()


def main(argv: list[str] | None = None) -> None:
    run_daemon("python -m compute_daemon", "compute", argv, lambda config: config.compute.cpus, ComputeDaemon)
