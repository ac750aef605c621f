"""Wire messages: round trips and strict rejection of malformed frames."""

import msgpack
import numpy as np
import pytest

from mer_pipeline import wire


def test_round_trip_every_type():
    messages = [
        wire.LeaseRequest(1, 2, 3),
        wire.LeaseRequest(2, 2, 3, stream=True),
        wire.LeaseGranted(1, 3, 4, 5, True, 17),
        wire.LoadStarted(2, 3, 4, 6),
        wire.TokenRequest(9, 0, b"\x00" * 8, [0, 1], [[1, 2], [3, 4]], [[0.5, 0.5], [0.25, 0.75]]),
        wire.StatsReply(1, "io", {"hits": 3, "nested": {"a": 1}}, {"io_device": "abc"}),
        wire.ControlRequest(4, "restart", "worker:0"),
    ]
    for message in messages:
        assert wire.decode(message.encode()) == message


def test_rejects_unknown_type():
    frame = msgpack.packb(["no_such_message", {}])
    with pytest.raises(wire.WireError, match="unknown message type"):
        wire.decode(frame)


def test_rejects_missing_and_extra_fields():
    frame = msgpack.packb(["lease", {"request_id": 1, "worker": 2, "stream": False}])
    with pytest.raises(wire.WireError, match="missing fields \\['expert'\\]"):
        wire.decode(frame)
    frame = msgpack.packb(["lease", {"request_id": 1, "worker": 2, "expert": 3, "stream": False, "evil": 1}])
    with pytest.raises(wire.WireError, match="unknown fields \\['evil'\\]"):
        wire.decode(frame)


def test_rejects_wrong_field_types():
    frame = msgpack.packb(["lease", {"request_id": "1", "worker": 2, "expert": 3, "stream": False}])
    with pytest.raises(wire.WireError, match="LeaseRequest.request_id: expected int"):
        wire.decode(frame)
    frame = msgpack.packb(["lease", {"request_id": True, "worker": 2, "expert": 3, "stream": False}])
    with pytest.raises(wire.WireError, match="expected int, got bool"):
        wire.decode(frame)
    frame = msgpack.packb(["token", {"request_id": 1, "token": 0, "hidden": b"", "layers": [0], "experts": [[1, "x"]], "probs": [[1.0]]}])
    with pytest.raises(wire.WireError, match=r"TokenRequest.experts\[0\]\[1\]"):
        wire.decode(frame)


def test_rejects_oversized_and_garbage_frames():
    with pytest.raises(wire.WireError, match="exceeds the limit"):
        wire.decode(b"\x00" * (wire.MAX_FRAME_BYTES + 1))
    with pytest.raises(wire.WireError):
        wire.decode(b"\xc1\xc1\xc1")
    with pytest.raises(wire.WireError, match="not a \\[type, fields\\] pair"):
        wire.decode(msgpack.packb({"a": 1}))


def test_rejects_type_not_accepted_on_socket():
    frame = wire.Release(1, 2, 3).encode()
    with pytest.raises(wire.WireError, match="not accepted on this socket"):
        wire.decode(frame, (wire.LeaseRequest,))


def test_array_bytes_shape_checked():
    data = wire.array_to_bytes(np.arange(6, dtype=np.float32))
    assert wire.bytes_to_array(data, 2, 3, "x").shape == (2, 3)
    with pytest.raises(wire.WireError, match="do not hold a float32 array of \\(4, 3\\)"):
        wire.bytes_to_array(data, 4, 3, "x")
