"""Supervision of one daemon process: its state table and restart policy.

    event \\ state   starting   running    backoff    stopping   exited
    ready            running    -          -          -          -
    exit (unwanted)  backoff    backoff    -          exited     -
    exit (wanted)    -          -          -          exited     -
    backoff_over     -          -          starting   -          -
    stop             stopping   stopping   exited     -          -
    give_up          exited     exited     exited     -          -

"-" is an illegal event: `Supervised.handle` raises SupervisorError and leaves the
state unchanged. A daemon that exits unexpectedly more than `max_restarts` times within
`restart_window_s` is given up on, and the launcher stops the pipeline.
"""

from __future__ import annotations

import dataclasses
import enum
import time


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"


class Event(enum.Enum):
    READY = "ready"
    EXIT_UNWANTED = "exit_unwanted"
    EXIT_WANTED = "exit_wanted"
    BACKOFF_OVER = "backoff_over"
    STOP = "stop"
    GIVE_UP = "give_up"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.STARTING, Event.READY): State.RUNNING,
    (State.STARTING, Event.EXIT_UNWANTED): State.BACKOFF,
    (State.RUNNING, Event.EXIT_UNWANTED): State.BACKOFF,
    (State.STOPPING, Event.EXIT_UNWANTED): State.EXITED,
    (State.STOPPING, Event.EXIT_WANTED): State.EXITED,
    (State.BACKOFF, Event.BACKOFF_OVER): State.STARTING,
    (State.STARTING, Event.STOP): State.STOPPING,
    (State.RUNNING, Event.STOP): State.STOPPING,
    (State.BACKOFF, Event.STOP): State.EXITED,
    (State.STARTING, Event.GIVE_UP): State.EXITED,
    (State.RUNNING, Event.GIVE_UP): State.EXITED,
    (State.BACKOFF, Event.GIVE_UP): State.EXITED,
}


class SupervisorError(RuntimeError):
    """An event that is not legal in the daemon's current state."""


@dataclasses.dataclass
class RestartPolicy:
    max_restarts: int = 5
    restart_window_s: float = 60.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0


@dataclasses.dataclass
class Supervised:
    name: str
    policy: RestartPolicy = dataclasses.field(default_factory=RestartPolicy)
    state: State = State.STARTING
    restarts: int = 0
    exit_times_s: list[float] = dataclasses.field(default_factory=list)
    backoff_until_s: float = 0.0
    started_s: float = dataclasses.field(default_factory=time.monotonic)

    def handle(self, event: Event, now_s: float | None = None) -> State:
        now_s = time.monotonic() if now_s is None else now_s
        target = TRANSITIONS.get((self.state, event))
        if target is None:
            raise SupervisorError(f"{self.name}: event {event.value} is not legal in state {self.state.value}")
        if event is Event.EXIT_UNWANTED and target is State.BACKOFF:
            self.exit_times_s = [t for t in self.exit_times_s if now_s - t <= self.policy.restart_window_s]
            self.exit_times_s.append(now_s)
            delay_s = min(self.policy.backoff_max_s, self.policy.backoff_initial_s * 2 ** (len(self.exit_times_s) - 1))
            self.backoff_until_s = now_s + delay_s
        if event is Event.BACKOFF_OVER:
            self.restarts += 1
            self.started_s = now_s
        self.state = target
        return target

    def should_give_up(self) -> bool:
        return len(self.exit_times_s) > self.policy.max_restarts
