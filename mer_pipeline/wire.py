"""Wire messages between MER processes: one dataclass per message, msgpack on the wire.

A frame is msgpack `[type_name, {field: value}]`. Decoding checks the type name, that
the fields are exactly the declared ones, each value's type, and the frame size, and
raises WireError naming the problem. Arrays travel as raw bytes (float32, C order)
with their shape in separate fields. No pickle.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

import msgpack
import numpy as np

# Largest frame any socket accepts: a 64-token batch of d_model 16384 float32 is 4 MiB.
MAX_FRAME_BYTES = 64 * 1024 * 1024


class WireError(ValueError):
    """A frame that is not a valid MER message."""


_REGISTRY: dict[str, type["Message"]] = {}


@dataclasses.dataclass
class Message:
    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            _REGISTRY[cls.TYPE] = cls

    def encode(self) -> bytes:
        fields = {name: getattr(self, name) for name in _schema(type(self))}
        return msgpack.packb([self.TYPE, fields], use_bin_type=True)


_SCHEMAS: dict[type, dict[str, Any]] = {}


def _schema(cls: type) -> dict[str, Any]:
    """Return {field name: type annotation} of a message class, computed once per class."""
    schema = _SCHEMAS.get(cls)
    if schema is None:
        hints = typing.get_type_hints(cls)
        schema = _SCHEMAS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return schema


_SCALARS = {int: (int,), float: (float, int), str: (str,), bytes: (bytes,), bool: (bool,)}


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise WireError(f"{where}: expected a list, got {type(value).__name__}")
        return [_check_value(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise WireError(f"{where}: expected a map, got {type(value).__name__}")
        return value
    if annotation is Any:
        return value
    allowed = _SCALARS[annotation]
    # bool is a subclass of int; reject it where an int or float is declared.
    if not isinstance(value, allowed) or (annotation is not bool and isinstance(value, bool)):
        raise WireError(f"{where}: expected {annotation.__name__}, got {type(value).__name__}")
    return float(value) if annotation is float else value


def decode(frame: bytes, expected: tuple[type[Message], ...] | None = None) -> Message:
    """Decode one frame; raise WireError if it is malformed, oversized or unexpected."""
    if len(frame) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(frame)} bytes exceeds the limit of {MAX_FRAME_BYTES}")
    try:
        payload = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME_BYTES)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireError(f"frame is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not (isinstance(payload, list) and len(payload) == 2 and isinstance(payload[0], str)):
        raise WireError("frame is not a [type, fields] pair")
    type_name, fields = payload
    cls = _REGISTRY.get(type_name)
    if cls is None:
        raise WireError(f"unknown message type {type_name[:64]!r}")
    if expected is not None and cls not in expected:
        raise WireError(f"message type {type_name!r} is not accepted on this socket")
    if not isinstance(fields, dict):
        raise WireError(f"{type_name}: fields must be a map")
    schema = _schema(cls)
    declared = set(schema)
    if set(fields) != declared:
        missing = sorted(declared - set(fields))
        extra = sorted(str(k) for k in set(fields) - declared)
        raise WireError(f"{type_name}: missing fields {missing}, unknown fields {extra[:8]}")
    values = {name: _check_value(fields[name], hint, f"{cls.__name__}.{name}") for name, hint in schema.items()}
    return cls(**values)


def array_to_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=np.float32).tobytes()


def bytes_to_array(data: bytes, rows: int, cols: int, where: str) -> np.ndarray:
    if rows < 0 or cols < 0 or len(data) != rows * cols * 4:
        raise WireError(f"{where}: {len(data)} bytes do not hold a float32 array of ({rows}, {cols})")
    return np.frombuffer(data, dtype=np.float32).reshape(rows, cols)


# --- I/O daemon (ROUTER at io.sock) -------------------------------------------------


@dataclasses.dataclass
class LeaseRequest(Message):
    """A worker requests a read-only lease on the slot holding `expert`.

    With `stream`, the I/O daemon first replies LoadStarted to a miss once the expert's
    read is in flight, so the worker can compute on the bytes that have arrived.
    """

    TYPE: ClassVar[str] = "lease"
    request_id: int
    worker: int
    expert: int
    stream: bool = False


@dataclasses.dataclass
class LeaseGranted(Message):
    TYPE: ClassVar[str] = "granted"
    request_id: int
    expert: int
    slot: int
    generation: int
    hit: bool
    wait_us: int


@dataclasses.dataclass
class LoadStarted(Message):
    """The read of a streaming request's expert is in flight into `slot`; this is no lease.

    While the slot is LOADING at `generation`, the worker may read the bytes below the
    slot's ready_bytes. The LeaseGranted or LeaseFailed of the same request follows.
    """

    TYPE: ClassVar[str] = "load_started"
    request_id: int
    expert: int
    slot: int
    generation: int


@dataclasses.dataclass
class LeaseFailed(Message):
    TYPE: ClassVar[str] = "lease_failed"
    request_id: int
    expert: int
    error: str


@dataclasses.dataclass
class Release(Message):
    """A worker gives a lease back; no reply."""

    TYPE: ClassVar[str] = "release"
    worker: int
    slot: int
    generation: int


@dataclasses.dataclass
class PrefetchHint(Message):
    """The predictor requests that the I/O daemon load `expert` before it is needed; no reply.

    `steps_ahead` is how many layer steps from now the expert is expected to be used.
    """

    TYPE: ClassVar[str] = "hint"
    expert: int
    steps_ahead: int
    confidence: float


@dataclasses.dataclass
class ReclaimLeases(Message):
    """The launcher reports a dead worker; the I/O daemon drops its leases. No reply."""

    TYPE: ClassVar[str] = "reclaim"
    worker: int


# --- compute daemon (ROUTER at compute.sock) ------------------------------------------


@dataclasses.dataclass
class TokenRequest(Message):
    """Run one token through a list of layer steps.

    For each step i: h += sum_k probs[i][k] * FFN(layers[i], experts[i][k])(rmsnorm(h)).
    """

    TYPE: ClassVar[str] = "token"
    request_id: int
    token: int
    hidden: bytes
    layers: list[int]
    experts: list[list[int]]
    probs: list[list[float]]


@dataclasses.dataclass
class TokenResult(Message):
    TYPE: ClassVar[str] = "token_result"
    request_id: int
    hidden: bytes
    cycle_us: int
    io_wait_us: int
    compute_us: int


@dataclasses.dataclass
class ExpertRequest(Message):
    """Compute y = FFN(expert)(x) for a batch of rows of x (no norm, no residual)."""

    TYPE: ClassVar[str] = "expert_request"
    request_id: int
    expert: int
    rows: int
    x: bytes


@dataclasses.dataclass
class ExpertResult(Message):
    TYPE: ClassVar[str] = "expert_result"
    request_id: int
    rows: int
    y: bytes


@dataclasses.dataclass
class RequestFailed(Message):
    """A request that could not complete. `retryable` is true when sending it again may work."""

    TYPE: ClassVar[str] = "failed"
    request_id: int
    error: str
    retryable: bool


# --- workers (DEALER, connected to the compute daemon's ROUTER at tasks.sock) ---------


@dataclasses.dataclass
class WorkerReady(Message):
    TYPE: ClassVar[str] = "worker_ready"
    worker: int
    pid: int


@dataclasses.dataclass
class Task(Message):
    TYPE: ClassVar[str] = "task"
    task_id: int
    expert: int
    rows: int
    x: bytes


@dataclasses.dataclass
class TaskResult(Message):
    TYPE: ClassVar[str] = "task_result"
    task_id: int
    worker: int
    rows: int
    y: bytes
    lease_wait_us: int
    compute_us: int
    hit: bool


@dataclasses.dataclass
class TaskFailed(Message):
    TYPE: ClassVar[str] = "task_failed"
    task_id: int
    worker: int
    error: str


# --- predictor (PULL at predictor.sock) -----------------------------------------------


@dataclasses.dataclass
class Observation(Message):
    """The compute daemon reports the experts a layer step routed to; no reply."""

    TYPE: ClassVar[str] = "observe"
    token: int
    layer: int
    experts: list[int]


# --- control (every daemon's main socket serves these) -------------------------------


@dataclasses.dataclass
class StatsRequest(Message):
    TYPE: ClassVar[str] = "stats"
    request_id: int


@dataclasses.dataclass
class StatsReply(Message):
    """Counters and HDR histograms (encoded, base64 text as hdrhistogram writes it)."""

    TYPE: ClassVar[str] = "stats_reply"
    request_id: int
    daemon: str
    counters: dict[str, Any]
    histograms: dict[str, Any]


@dataclasses.dataclass
class SpansRequest(Message):
    """A request for the spans a daemon recorded that end at or after `since_ns` (CLOCK_MONOTONIC)."""

    TYPE: ClassVar[str] = "spans"
    request_id: int
    since_ns: int


@dataclasses.dataclass
class SpansReply(Message):
    """Spans of one or more processes: {process: {pid, capacity, dropped, spans}}, with each
    span a [name, start_ns, end_ns, args] list; mer_pipeline.observe.spans checks the layout.
    The compute daemon's reply includes its workers."""

    TYPE: ClassVar[str] = "spans_reply"
    request_id: int
    processes: dict[str, Any]


@dataclasses.dataclass
class Shutdown(Message):
    TYPE: ClassVar[str] = "shutdown"
    request_id: int


# --- launcher control (ROUTER at launcher.sock) ---------------------------------------


@dataclasses.dataclass
class ControlRequest(Message):
    """`command` is "status", "restart" (target: io, predictor, compute or worker:N) or "stop"."""

    TYPE: ClassVar[str] = "control"
    request_id: int
    command: str
    target: str


@dataclasses.dataclass
class ControlReply(Message):
    TYPE: ClassVar[str] = "control_reply"
    request_id: int
    ok: bool
    error: str
    payload: dict[str, Any]
