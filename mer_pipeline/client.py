"""Request/reply over a daemon's ROUTER socket, with a time-out on every wait."""

from __future__ import annotations

import itertools

import zmq

from mer_pipeline import wire


class DaemonTimeout(TimeoutError):
    """A daemon did not reply in time."""


class DaemonClient:
    """A DEALER connected to one daemon endpoint. Not thread-safe."""

    def __init__(self, endpoint: str, daemon: str, context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.daemon = daemon
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    def send(self, message: wire.Message) -> None:
        self.socket.send(message.encode())

    def receive(self, timeout_s: float, setting: str) -> wire.Message:
        if not self.socket.poll(int(timeout_s * 1000)):
            raise DaemonTimeout(
                f"the {self.daemon} daemon at {self.endpoint} did not reply within {timeout_s:.1f} s; "
                f"check that the pipeline is running (`mer ctl status`) or raise {setting}"
            )
        return wire.decode(self.socket.recv())

    def request(self, message: wire.Message, timeout_s: float, setting: str = "runtime.request_timeout_s") -> wire.Message:
        """Send one request and return the reply with the same request_id."""
        self.send(message)
        while True:
            reply = self.receive(timeout_s, setting)
            if getattr(reply, "request_id", None) == message.request_id:
                return reply

    def stats(self, timeout_s: float = 5.0) -> wire.StatsReply:
        reply = self.request(wire.StatsRequest(self.next_id()), timeout_s)
        if not isinstance(reply, wire.StatsReply):
            raise wire.WireError(f"{self.daemon} replied {reply.TYPE} to a stats request")
        return reply

    def close(self) -> None:
        self.socket.close(0)
