"""The predictor daemon: receives routing observations from the compute daemon (PULL at
predictor.sock), learns the routing, and sends prefetch hints to the I/O daemon.

Losing this process loses only prefetching: the compute daemon drops observations it
cannot send, and the I/O daemon keeps serving demand reads.
"""

from __future__ import annotations

import collections
import logging
import os
import time

import zmq

from mer_pipeline import wire
from mer_pipeline.observe.spans import SpanRecorder
from mer_pipeline.predictor import make_predictor
from mer_pipeline.runtime import (
    IO_SOCKET,
    PREDICTOR_SOCKET,
    PipelineInfo,
    RateLimitedWarning,
    parent_alive,
    run_daemon,
)
from mer_pipeline.store import open_store

log = logging.getLogger(__name__)

POLL_MS = 500


class PredictorDaemon:
    def __init__(self, info: PipelineInfo) -> None:
        self.info = info
        self.config = info.config.predictor
        store = open_store(info.store)
        self.predictor = make_predictor(self.config.kind, store.shape.n_layers, store.shape.n_experts)
        self.n_layers = store.shape.n_layers
        self.n_experts = store.shape.n_experts
        self.context = zmq.Context()
        self.inbox = self.context.socket(zmq.ROUTER)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.bind(info.endpoint(PREDICTOR_SOCKET))
        self.io = self.context.socket(zmq.DEALER)
        self.io.setsockopt(zmq.LINGER, 0)
        self.io.setsockopt(zmq.SNDHWM, 1000)
        self.io.setsockopt(zmq.IDENTITY, f"predictor:{os.getpid()}".encode())
        self.io.connect(info.endpoint(IO_SOCKET))
        self.counters = collections.Counter()
        self.spans = SpanRecorder("predictor")
        self.warn = RateLimitedWarning(log)

    def on_observation(self, observation: wire.Observation) -> None:
        layer, experts = observation.layer, observation.experts
        first_id = layer * self.n_experts
        if not 0 <= layer < self.n_layers or not all(first_id <= e < first_id + self.n_experts for e in experts):
            self.counters["rejected_messages"] += 1
            self.warn.warning("observation", "observation rejected layer=%d experts=%s error=out of range", layer, experts[:8])
            return
        start_ns = time.monotonic_ns()
        self.counters["observations"] += 1
        self.predictor.observe(observation.token, observation.layer, observation.experts)
        hints = self.predictor.predict(
            observation.layer, self.config.lookahead_layers, self.config.max_hints_per_step, self.config.min_confidence
        )
        for hint in hints:
            try:
                self.io.send(wire.PrefetchHint(hint.expert, hint.steps_ahead, hint.confidence).encode(), zmq.NOBLOCK)
                self.counters["hints_sent"] += 1
            except zmq.Again:
                self.counters["hints_dropped"] += 1
        # The hints are sent by the end of this span; the timeline links each to its read.
        self.spans.record(
            "predict", start_ns, time.monotonic_ns(), token=observation.token, layer=layer, hints=[h.expert for h in hints]
        )

    def serve(self) -> None:
        log.info("predictor ready kind=%s lookahead_layers=%d pid=%d", self.config.kind, self.config.lookahead_layers, os.getpid())
        while True:
            if not self.inbox.poll(POLL_MS):
                if not parent_alive(self.info.launcher_pid):
                    log.info("predictor stop reason=launcher_gone")
                    return
                continue
            parts = self.inbox.recv_multipart()
            # PUSH peers send one frame after the identity; ROUTER/DEALER peers too.
            sender, frame = parts[0], parts[-1]
            try:
                message = wire.decode(frame, (wire.Observation, wire.StatsRequest, wire.SpansRequest, wire.Shutdown))
            except wire.WireError as exc:
                self.counters["rejected_messages"] += 1
                self.warn.warning("message", "message rejected error=%s", exc)
                continue
            if isinstance(message, wire.Observation):
                self.on_observation(message)
            elif isinstance(message, wire.StatsRequest):
                counters = dict(self.counters)
                counters["kind"] = self.config.kind
                self.inbox.send_multipart([sender, wire.StatsReply(message.request_id, "predictor", counters, {}).encode()])
            elif isinstance(message, wire.SpansRequest):
                self.inbox.send_multipart([sender, self.spans.reply(message).encode()])
            else:
                log.info("predictor stop reason=shutdown_request observations=%d", self.counters["observations"])
                return

    def close(self) -> None:
        self.inbox.close(0)
        self.io.close(0)
        self.context.term()


def main(argv: list[str] | None = None) -> None:
    run_daemon("python -m mer_pipeline.predictor_daemon", "predictor", argv, lambda config: config.predictor.cpus, PredictorDaemon)


if __name__ == "__main__":
    main()
