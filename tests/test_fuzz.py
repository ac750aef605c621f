"""Hostile input: random and mutated messages at every daemon's socket, random bytes at
the store and trace readers. Nothing may crash a daemon or escape as an unexpected
exception type."""

import json
import os
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mer_pipeline import wire
from mer_pipeline.client import DaemonClient
from mer_pipeline.main_job import launched_pipeline
from mer_pipeline.runtime import COMPUTE_SOCKET, IO_SOCKET, LAUNCHER_SOCKET, PREDICTOR_SOCKET
from mer_pipeline.store import StoreError, open_store
from mer_pipeline.synth import SynthConfig, write_synth_store
from mer_pipeline.trace import TraceError, load_trace

SOCKETS = [IO_SOCKET, COMPUTE_SOCKET, PREDICTOR_SOCKET, LAUNCHER_SOCKET]

VALID = [
    wire.LeaseRequest(1, 0, 3),
    wire.Release(0, 2, 1),
    wire.PrefetchHint(5, 2, 0.5),
    wire.ReclaimLeases(0),
    wire.TokenRequest(1, 0, b"\x00" * 256, [0], [[1, 2]], [[0.5, 0.5]]),
    wire.ExpertRequest(1, 3, 1, b"\x00" * 256),
    wire.Observation(0, 1, [8, 9]),
    wire.StatsRequest(1),
    wire.ControlRequest(1, "status", ""),
]

# Values that are the right msgpack type but out of every valid range.
HOSTILE_INTS = st.sampled_from([-1, -(2**63), 2**63 - 1, 2**31, 10**9, 0, 1])


def _mutations():
    mutated_fields = st.tuples(st.sampled_from(VALID), st.dictionaries(st.sampled_from(["request_id", "worker", "expert", "slot", "generation", "layer", "token", "rows", "steps_ahead", "layers", "experts", "probs", "x", "hidden", "confidence", "command", "target"]), st.one_of(HOSTILE_INTS, st.binary(max_size=64), st.lists(HOSTILE_INTS, max_size=4), st.lists(st.lists(HOSTILE_INTS, max_size=3), max_size=3), st.text(max_size=8), st.floats()), max_size=3)).map(
        lambda pair: msgpack.packb([pair[0].TYPE, {**{k: v for k, v in pair[0].__dict__.items()}, **{k: v for k, v in pair[1].items() if k in pair[0].__dict__}}], use_bin_type=True)
    )
    flipped = st.tuples(st.sampled_from(VALID), st.integers(0, 10_000), st.integers(1, 255)).map(
        lambda t: _flip(t[0].encode(), t[1], t[2])
    )
    return st.one_of(st.binary(max_size=512), mutated_fields, flipped)


def _flip(frame: bytes, position: int, mask: int) -> bytes:
    data = bytearray(frame)
    data[position % len(data)] ^= mask
    return bytes(data)


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    store = root / "store"
    write_synth_store(store, SynthConfig(n_layers=4, n_experts=8, top_k=2, d_model=64, d_ff=128, dtype="q4_0", seed=3))
    with launched_pipeline(store, root / "sock", ["--slots", "8"]) as info:
        context = zmq.Context.instance()
        sockets = {}
        for name in SOCKETS:
            socket = context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(info.endpoint(name))
            sockets[name] = socket
        yield info, sockets
        for socket in sockets.values():
            socket.close(0)


def test_daemons_survive_hostile_frames(running):
    info, sockets = running

    @settings(max_examples=300, deadline=None)
    @given(target=st.sampled_from(SOCKETS), frames=st.lists(_mutations(), min_size=1, max_size=3))
    def send(target, frames):
        sockets[target].send_multipart(frames)

    send()
    time.sleep(1.0)
    for name in (IO_SOCKET, COMPUTE_SOCKET, PREDICTOR_SOCKET):
        client = DaemonClient(info.endpoint(name), name)
        try:
            assert isinstance(client.stats(10.0), wire.StatsReply)
        finally:
            client.close()
    client = DaemonClient(info.endpoint(LAUNCHER_SOCKET), "launcher")
    try:
        status = client.request(wire.ControlRequest(client.next_id(), "status", ""), 10.0).payload
    finally:
        client.close()
    for name, daemon in status["daemons"].items():
        assert daemon["restarts"] == 0, f"{name} restarted during the fuzz test"
        assert daemon["state"] == "running", f"{name} is {daemon['state']}"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_trace_reader_random_bytes(tmp_path, data):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    try:
        load_trace(path)
    except (TraceError, UnicodeDecodeError):
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(manifest=st.one_of(st.binary(max_size=512), st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)), lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=6)), max_leaves=20).map(lambda v: json.dumps(v).encode())))
def test_store_reader_random_manifest(tmp_path, manifest):
    (tmp_path / "manifest.json").write_bytes(manifest)
    with pytest.raises(StoreError):
        open_store(tmp_path)
