"""Per-process span ring buffers, the source of the timelines.

Every daemon keeps the last SPAN_CAPACITY spans it recorded in a ring buffer and
returns them on a SpansRequest. A span is a list on the wire:

    [name, start_ns, end_ns, args]

with start_ns and end_ns read from time.monotonic_ns() (CLOCK_MONOTONIC). That clock
is system-wide on Linux, so spans of different processes line up on one time axis.
`args` is a map of small values (ints, floats, strings, lists of ints) that the
timeline shows and uses to draw flow arrows.
"""

from __future__ import annotations

import collections
import os
from typing import Any

from mer_pipeline import wire

# Spans kept per process. The bundled 338-token trace makes 21,632 expert tasks, so a
# full replay on few workers overflows this and the timeline keeps its last spans.
SPAN_CAPACITY = 16384


class SpanRecorder:
    """A bounded ring of spans for one process. Not thread-safe."""

    def __init__(self, process: str, capacity: int = SPAN_CAPACITY) -> None:
        self.process = process
        self.capacity = capacity
        self.spans: collections.deque[list[Any]] = collections.deque(maxlen=capacity)
        self.recorded = 0

    def record(self, name: str, start_ns: int, end_ns: int, **args: Any) -> None:
        self.spans.append([name, start_ns, end_ns, args])
        self.recorded += 1

    def payload(self, since_ns: int = 0) -> dict[str, Any]:
        """Return this process's entry of a SpansReply: spans that end at or after since_ns."""
        return {
            "pid": os.getpid(),
            "capacity": self.capacity,
            "dropped": self.recorded - len(self.spans),
            "spans": [span for span in self.spans if span[2] >= since_ns],
        }

    def reply(self, request: wire.SpansRequest) -> wire.SpansReply:
        return wire.SpansReply(request.request_id, {self.process: self.payload(request.since_ns)})


def check_processes(processes: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """Validate the `processes` map of a SpansReply and return it; raise wire.WireError."""
    for name, entry in processes.items():
        if not isinstance(entry, dict) or set(entry) != {"pid", "capacity", "dropped", "spans"}:
            raise wire.WireError(f"{where}: process {name!r} must map to pid, capacity, dropped and spans")
        for key in ("pid", "capacity", "dropped"):
            if not isinstance(entry[key], int) or isinstance(entry[key], bool):
                raise wire.WireError(f"{where}: process {name!r} {key} must be an int, got {entry[key]!r}")
        if not isinstance(entry["spans"], list):
            raise wire.WireError(f"{where}: process {name!r} spans must be a list")
        for index, span in enumerate(entry["spans"]):
            valid = (
                isinstance(span, list)
                and len(span) == 4
                and isinstance(span[0], str)
                and isinstance(span[1], int)
                and isinstance(span[2], int)
                and isinstance(span[3], dict)
                and span[1] <= span[2]
            )
            if not valid:
                raise wire.WireError(
                    f"{where}: process {name!r} span {index} must be [name, start_ns, end_ns, args] "
                    f"with start_ns <= end_ns, got {span!r:.200}"
                )
    return processes
