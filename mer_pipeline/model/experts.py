"""Expert backends: where the model's expert FFNs run.

A backend takes one layer's work as a list of (expert, rows of x) and returns
FFN(expert)(x) for each, in the same order. `LocalExperts` reads regions from the store
and runs kernels.swiglu in this process (tests, references, the compute-bound figure).
`PipelineExperts` sends one ExpertRequest per expert to the running pipeline's compute
daemon, all of a layer's requests in flight at once, reports the routing to the
predictor and may send prefetch hints to the I/O daemon.
"""

from __future__ import annotations

import collections
import logging
import time

import numpy as np
import zmq

from mer_pipeline import kernels, wire
from mer_pipeline.client import DaemonClient
from mer_pipeline.runtime import COMPUTE_SOCKET, IO_SOCKET, PREDICTOR_SOCKET, PipelineInfo
from mer_pipeline.store import Store
from mer_pipeline.stream import MAX_ATTEMPTS, RESUME_CHECK_S, StreamError, compute_pid

log = logging.getLogger(__name__)

# Rows one ExpertRequest carries: the most the workers' kernel takes in one call.
MAX_ROWS_PER_REQUEST = kernels.MAX_TOKENS


class ExpertBackend:
    """Runs expert FFNs; the base class only counts."""

    def __init__(self) -> None:
        self.counters: collections.Counter[str] = collections.Counter()

    def run(self, layer: int, work: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        """Return FFN(layer, expert)(x) as float32 [rows, d_model] for each (expert, x) of `work`."""
        raise NotImplementedError

    def observe(self, token: int, layer: int, experts: list[int]) -> None:
        """Report that `token` routed to `experts` (ids within the layer) at `layer`."""

    def hint(self, layer: int, experts: list[int], steps_ahead: int, confidence: float) -> None:
        """Ask for experts of `layer` that are expected `steps_ahead` layer steps from now."""

    def close(self) -> None:
        pass


class LocalExperts(ExpertBackend):
    """Reads each expert region from the store with buffered I/O and runs kernels.swiglu here.

    `resident` keeps every region read in memory, so a second use costs no read.
    """

    def __init__(self, store: Store, resident: bool = True) -> None:
        super().__init__()
        self.store = store
        self.resident = resident
        self.regions: dict[int, np.ndarray] = {}

    def region(self, expert_id: int) -> np.ndarray:
        region = self.regions.get(expert_id)
        if region is None:
            # read_expert returns a read-only view of bytes; the kernels' default
            # specialization is for writable buffers.
            region = np.array(self.store.read_expert(expert_id))
            self.counters["reads"] += 1
            self.counters["read_bytes"] += region.nbytes
            if self.resident:
                self.regions[expert_id] = region
        else:
            self.counters["resident_hits"] += 1
        return region

    def run(self, layer: int, work: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        outputs = []
        for expert, x in work:
            region = self.region(self.store.expert_id(layer, expert))
            y = np.empty_like(x)
            for start in range(0, x.shape[0], kernels.MAX_TOKENS):
                y[start : start + kernels.MAX_TOKENS] = kernels.swiglu(region, self.store.layout, x[start : start + kernels.MAX_TOKENS])
            self.counters["expert_calls"] += 1
            outputs.append(y)
        return outputs


class PipelineExperts(ExpertBackend):
    """Sends expert work to a running pipeline's compute daemon.

    Every request of a layer is sent before any reply is awaited, so the daemon can give
    them to all its workers at once. A request is sent again when the compute daemon
    restarts (its pid changes) or replies with a retryable failure, as
    stream.resumable_request does for one request. Expert requests are pure functions of
    their inputs, so a second computation gives the same bits.
    """

    def __init__(self, info: PipelineInfo, n_experts: int, d_model: int, timeout_s: float | None = None) -> None:
        super().__init__()
        self.info = info
        self.n_experts = n_experts
        self.d_model = d_model
        self.timeout_s = timeout_s or info.config.runtime.request_timeout_s
        self.client = DaemonClient(info.endpoint(COMPUTE_SOCKET), "compute")
        context = self.client.context
        self.predictor = self._push(context, info.endpoint(PREDICTOR_SOCKET))
        self.io = self._push(context, info.endpoint(IO_SOCKET))
        self.serving_pid = compute_pid(info)

    @staticmethod
    def _push(context: zmq.Context, endpoint: str) -> zmq.Socket:
        # DEALER, as the compute daemon and the predictor use for one-way messages to a ROUTER.
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 1000)
        socket.connect(endpoint)
        return socket

    def _send_nowait(self, socket: zmq.Socket, message: wire.Message, dropped: str) -> None:
        try:
            socket.send(message.encode(), zmq.NOBLOCK)
        except zmq.Again:
            self.counters[dropped] += 1

    def observe(self, token: int, layer: int, experts: list[int]) -> None:
        ids = [layer * self.n_experts + e for e in experts]
        self._send_nowait(self.predictor, wire.Observation(token, layer, ids), "observations_dropped")
        self.counters["observations"] += 1

    def hint(self, layer: int, experts: list[int], steps_ahead: int, confidence: float) -> None:
        for expert in experts:
            hint = wire.PrefetchHint(layer * self.n_experts + expert, steps_ahead, confidence)
            self._send_nowait(self.io, hint, "hints_dropped")
            self.counters["hints"] += 1

    def run(self, layer: int, work: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        # request id -> (index in work, first row, request)
        pending: dict[int, tuple[int, int, wire.ExpertRequest]] = {}
        outputs = [np.empty((x.shape[0], self.d_model), np.float32) for _, x in work]
        for index, (expert, x) in enumerate(work):
            expert_id = layer * self.n_experts + expert
            for start in range(0, x.shape[0], MAX_ROWS_PER_REQUEST):
                part = x[start : start + MAX_ROWS_PER_REQUEST]
                request = wire.ExpertRequest(self.client.next_id(), expert_id, part.shape[0], wire.array_to_bytes(part))
                pending[request.request_id] = (index, start, request)
                self.client.send(request)
                self.counters["requests"] += 1
        self._collect(pending, outputs)
        return outputs

    def _collect(self, pending: dict[int, tuple[int, int, wire.ExpertRequest]], outputs: list[np.ndarray]) -> None:
        attempts = {request_id: 1 for request_id in pending}
        deadline = time.monotonic() + self.timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise StreamError(
                    f"{len(pending)} expert requests got no reply from the compute daemon within "
                    f"runtime.request_timeout_s={self.timeout_s:.0f} s; check `mer ctl status` and the compute daemon's log"
                )
            try:
                reply = self.client.receive(RESUME_CHECK_S, "runtime.request_timeout_s")
            except TimeoutError:
                self._resend_if_restarted(pending, attempts)
                continue
            entry = pending.get(getattr(reply, "request_id", None))
            if entry is None:
                continue  # a late reply to a request that already has its result
            index, start, request = entry
            if isinstance(reply, wire.RequestFailed):
                if reply.retryable and attempts[request.request_id] < MAX_ATTEMPTS:
                    attempts[request.request_id] += 1
                    self.counters["retries"] += 1
                    log.warning("expert request retried request_id=%d expert=%d error=%s",
                                request.request_id, request.expert, reply.error)
                    self.client.send(request)
                    continue
                raise StreamError(f"expert {request.expert} failed in the pipeline: {reply.error}")
            if not isinstance(reply, wire.ExpertResult):
                raise StreamError(f"the compute daemon replied {reply.TYPE} to an expert request")
            y = wire.bytes_to_array(reply.y, reply.rows, self.d_model, "expert_result.y")
            outputs[index][start : start + reply.rows] = y
            del pending[request.request_id]
            deadline = time.monotonic() + self.timeout_s

    def _resend_if_restarted(self, pending, attempts) -> None:
        pid = compute_pid(self.info)
        if pid is None or pid == self.serving_pid:
            return
        log.warning("compute daemon restarted; resending requests old_pid=%s new_pid=%d pending=%d",
                    self.serving_pid, pid, len(pending))
        self.serving_pid = pid
        for request_id, (_, _, request) in pending.items():
            attempts[request_id] += 1
            self.counters["retries"] += 1
            self.client.send(request)

    def close(self) -> None:
        for socket in (self.predictor, self.io):
            socket.close(0)
        self.client.close()
