"""The I/O daemon as a real process: real store files, shared memory, io_uring and ZeroMQ."""

import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from mer_pipeline import runtime, slot_pool, wire
from mer_pipeline.config import PipelineConfig
from mer_pipeline.quant import expert_layout
from mer_pipeline.slot_pool import EMPTY, LOADING, READY, SlotPool
from mer_pipeline.store import checksum_bytes

REPO = Path(__file__).resolve().parents[1]
N_LAYERS = 2
N_EXPERTS = 4
D_MODEL = 32
D_FF = 64
REPLY_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 30.0


def write_store(root: Path, corrupt_expert: int | None = None) -> list[bytes]:
    """Write a small f32 store of random bytes; return each expert's region."""
    layout = expert_layout(D_MODEL, D_FF, "f32")
    rng = np.random.default_rng(0)
    regions = [rng.integers(0, 256, layout.region_bytes, dtype=np.uint8).tobytes() for _ in range(N_LAYERS * N_EXPERTS)]
    experts = []
    for expert_id, region in enumerate(regions):
        checksum = checksum_bytes(region)
        if expert_id == corrupt_expert:
            checksum = "0" * 16
        experts.append(
            {
                "layer": expert_id // N_EXPERTS,
                "expert": expert_id % N_EXPERTS,
                "file": "experts.bin",
                "offset": expert_id * layout.region_bytes,
                "length": layout.region_bytes,
                "checksum": checksum,
            }
        )
    manifest = {
        "format": "mer-expert-store",
        "format_version": 1,
        "model": {"n_layers": N_LAYERS, "n_experts": N_EXPERTS, "top_k": 2, "d_model": D_MODEL, "d_ff": D_FF},
        "dtype": "f32",
        "align_bytes": 4096,
        "experts": experts,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "experts.bin").write_bytes(b"".join(regions))
    (root / "manifest.json").write_text(json.dumps(manifest))
    return regions


@dataclasses.dataclass
class Pipeline:
    """A store, a pool and pipeline.json in a tmp dir, and the daemon processes started on them."""

    socket_dir: Path
    pool: SlotPool
    regions: list[bytes]
    info: runtime.PipelineInfo
    pipeline_path: Path
    processes: list[subprocess.Popen]

    def start(self) -> subprocess.Popen:
        log_path = self.socket_dir / f"io_daemon-{len(self.processes)}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "io_daemon", "--pipeline", str(self.pipeline_path)],
                cwd=REPO,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process

    def log_text(self) -> str:
        return "\n".join(path.read_text() for path in sorted(self.socket_dir.glob("io_daemon-*.log")))

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=EXIT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


class Client:
    """A DEALER connected to the daemon's ROUTER."""

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.request_ids = itertools.count(1)

    def send(self, message: wire.Message) -> None:
        self.socket.send(message.encode())

    def receive(self, timeout_s: float = REPLY_TIMEOUT_S) -> wire.Message:
        if not self.socket.poll(int(timeout_s * 1000)):
            raise AssertionError(f"no reply from the I/O daemon within {timeout_s} s")
        return wire.decode(self.socket.recv())

    def lease(self, expert: int, worker: int = 0) -> wire.Message:
        self.send(wire.LeaseRequest(next(self.request_ids), worker, expert))
        return self.receive()

    def stats(self) -> dict:
        self.send(wire.StatsRequest(next(self.request_ids)))
        reply = self.receive()
        assert isinstance(reply, wire.StatsReply)
        return reply.counters

    def close(self) -> None:
        self.socket.close(linger=0)


def make_pipeline(n_slots: int = 4, corrupt_expert: int | None = None, **settings) -> Pipeline:
    socket_dir = Path(tempfile.mkdtemp(prefix="mer-io-test-", dir="/tmp"))
    regions = write_store(socket_dir / "store", corrupt_expert)
    slot_bytes = slot_pool.round_slot_bytes(len(regions[0]))
    data_name, table_name = slot_pool.pool_names("iotest")
    pool = SlotPool.create(data_name, table_name, n_slots, slot_bytes)
    config = PipelineConfig(name="iotest")
    config.io.read_size_kib = 8
    config.io.ring_depth = 4
    config.runtime.request_timeout_s = 60.0
    for dotted, value in settings.items():
        section, name = dotted.split("__")
        setattr(getattr(config, section), name, value)
    info = runtime.PipelineInfo(
        config=config,
        socket_dir=str(socket_dir),
        store=str(socket_dir / "store"),
        pool_data_name=data_name,
        pool_table_name=table_name,
        pool_slots=n_slots,
        slot_bytes=slot_bytes,
        worker_cpus=[],
        launcher_pid=os.getpid(),
    )
    pipeline_path = socket_dir / runtime.PIPELINE_FILE
    info.save(pipeline_path)
    return Pipeline(socket_dir, pool, regions, info, pipeline_path, [])


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    # destroy closes sockets a failed test left open; term alone would wait for them.
    ctx.destroy(linger=0)


@pytest.fixture
def pipelines():
    """Build pipelines with make_pipeline(...); every daemon, segment and dir is removed after."""
    created: list[Pipeline] = []

    def build(**kwargs) -> Pipeline:
        pipeline = make_pipeline(**kwargs)
        created.append(pipeline)
        return pipeline

    try:
        yield build
    finally:
        logs = []
        for pipeline in created:
            try:
                pipeline.stop_all()
                logs.append(pipeline.log_text())
            finally:
                pipeline.pool.unlink()
                pipeline.pool.close()
                shutil.rmtree(pipeline.socket_dir, ignore_errors=True)
        for pipeline in created:
            for name in (pipeline.info.pool_data_name, pipeline.info.pool_table_name):
                assert not os.path.exists(f"/dev/shm{name}")
        for text in logs:
            assert "Traceback" not in text, text


def start_daemon(pipeline: Pipeline, context: zmq.Context) -> tuple[subprocess.Popen, Client]:
    process = pipeline.start()
    client = Client(context, pipeline.info.endpoint(runtime.IO_SOCKET))
    # DEALER queues the request until the daemon binds, so one request is enough.
    client.send(wire.StatsRequest(0))
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while not client.socket.poll(200):
        assert process.poll() is None, f"io_daemon exited with {process.returncode}:\n{pipeline.log_text()}"
        assert time.monotonic() < deadline, f"io_daemon not ready in {REPLY_TIMEOUT_S} s:\n{pipeline.log_text()}"
    assert isinstance(wire.decode(client.socket.recv()), wire.StatsReply)
    return process, client


def slot_bytes_of(pipeline: Pipeline, slot: int, length: int) -> bytes:
    view = pipeline.pool.slot_view(slot)
    try:
        return bytes(view[:length])
    finally:
        view.release()


def stop_daemon(process: subprocess.Popen, client: Client) -> int:
    client.send(wire.Shutdown(99))
    client.close()
    return process.wait(timeout=EXIT_TIMEOUT_S)


def test_streaming_miss_gets_load_started_then_that_slot(pipelines, context):
    pipeline = pipelines()
    process, client = start_daemon(pipeline, context)
    client.send(wire.LeaseRequest(1, 0, 6, stream=True))
    started = client.receive()
    assert isinstance(started, wire.LoadStarted), started
    assert (started.request_id, started.expert) == (1, 6)
    granted = client.receive()
    assert isinstance(granted, wire.LeaseGranted), granted
    assert (granted.slot, granted.generation) == (started.slot, started.generation)
    assert slot_bytes_of(pipeline, granted.slot, len(pipeline.regions[6])) == pipeline.regions[6]
    client.send(wire.Release(0, granted.slot, granted.generation))
    # A hit is granted at once, with no LoadStarted.
    client.send(wire.LeaseRequest(2, 0, 6, stream=True))
    hit = client.receive()
    assert isinstance(hit, wire.LeaseGranted) and hit.hit
    client.send(wire.Release(0, hit.slot, hit.generation))
    assert client.stats()["loads_started_sent"] == 1
    assert stop_daemon(process, client) == 0


def test_streaming_damaged_expert_fails(pipelines, context):
    pipeline = pipelines(corrupt_expert=5)
    process, client = start_daemon(pipeline, context)
    client.send(wire.LeaseRequest(1, 0, 5, stream=True))
    started = client.receive()
    assert isinstance(started, wire.LoadStarted), started
    failed = client.receive()
    assert isinstance(failed, wire.LeaseFailed), failed
    assert "checksum" in failed.error
    # The slot left that generation, so a worker's partial result from it is discarded.
    assert pipeline.pool.table.generation(started.slot) != started.generation
    assert stop_daemon(process, client) == 0


def test_miss_then_hit_bit_identical(pipelines, context):
    pipeline = pipelines()
    process, client = start_daemon(pipeline, context)

    granted = client.lease(5, worker=2)
    assert isinstance(granted, wire.LeaseGranted), granted
    assert granted.expert == 5
    assert granted.hit is False
    assert slot_bytes_of(pipeline, granted.slot, len(pipeline.regions[5])) == pipeline.regions[5]
    table = pipeline.pool.table
    assert table.state(granted.slot) == READY
    assert table.expert(granted.slot) == 5
    assert table.worker_lease_count(granted.slot, 2) == 1

    client.send(wire.Release(2, granted.slot, granted.generation))
    again = client.lease(5, worker=2)
    assert isinstance(again, wire.LeaseGranted)
    assert again.hit is True
    assert again.slot == granted.slot
    assert again.generation == granted.generation

    stats = client.stats()
    assert stats["io_path"] == "io_uring+o_direct"
    assert stats["lookups"] == 2
    assert stats["hits"] == 1
    assert stats["misses"] == 1
    assert stats["io_reads"] == 1
    assert stats["io_bytes"] == len(pipeline.regions[5])
    assert stats["pool_slots"] == 4
    assert stop_daemon(process, client) == 0
    assert "io_daemon ready io_path=io_uring+o_direct" in pipeline.log_text()


def test_duplicate_requests_share_one_read(pipelines, context):
    pipeline = pipelines()
    process, client = start_daemon(pipeline, context)
    other = Client(context, pipeline.info.endpoint(runtime.IO_SOCKET))
    try:
        for request_id in (1, 2, 3):
            client.send(wire.LeaseRequest(request_id, 0, 6))
        other.send(wire.LeaseRequest(4, 1, 6))
        replies = [client.receive() for _ in range(3)] + [other.receive()]
        assert all(isinstance(reply, wire.LeaseGranted) for reply in replies), replies
        assert sorted(reply.request_id for reply in replies) == [1, 2, 3, 4]
        assert len({reply.slot for reply in replies}) == 1
        slot = replies[0].slot
        assert pipeline.pool.table.lease_count(slot) == 4
        stats = client.stats()
        assert stats["io_reads"] == 1
        assert stats["lookups"] == 4
    finally:
        other.close()
    assert stop_daemon(process, client) == 0


def test_checksum_mismatch_fails_only_that_expert(pipelines, context):
    pipeline = pipelines(corrupt_expert=5)
    process, client = start_daemon(pipeline, context)

    failed = client.lease(5)
    assert isinstance(failed, wire.LeaseFailed), failed
    assert "layer 1, expert 1" in failed.error
    assert "experts.bin" in failed.error
    assert f"offset {5 * len(pipeline.regions[0])}" in failed.error
    assert "checksum" in failed.error

    good = client.lease(2)
    assert isinstance(good, wire.LeaseGranted), good
    assert slot_bytes_of(pipeline, good.slot, len(pipeline.regions[2])) == pipeline.regions[2]
    stats = client.stats()
    assert stats["checksum_errors"] == 1
    assert stats["lease_failed"] == 1
    states = pipeline.pool.table.records["state"]
    assert int(np.count_nonzero(states == READY)) == 1
    assert int(np.count_nonzero(states == LOADING)) == 0
    assert stop_daemon(process, client) == 0


def test_eviction_spares_leased_slots(pipelines, context):
    pipeline = pipelines(n_slots=2)
    process, client = start_daemon(pipeline, context)
    held = client.lease(0, worker=1)
    assert isinstance(held, wire.LeaseGranted)
    for expert in (1, 2, 3, 4, 5):
        granted = client.lease(expert, worker=1)
        assert isinstance(granted, wire.LeaseGranted), granted
        assert granted.slot != held.slot
        assert slot_bytes_of(pipeline, granted.slot, len(pipeline.regions[expert])) == pipeline.regions[expert]
        client.send(wire.Release(1, granted.slot, granted.generation))
    table = pipeline.pool.table
    assert table.expert(held.slot) == 0
    assert table.generation(held.slot) == held.generation
    assert client.stats()["evictions"] == 4
    assert stop_daemon(process, client) == 0


def test_no_free_slot_waits_then_times_out(pipelines, context):
    pipeline = pipelines(n_slots=2, runtime__request_timeout_s=1.0)
    process, client = start_daemon(pipeline, context)
    first = client.lease(0)
    second = client.lease(1)
    assert isinstance(first, wire.LeaseGranted)
    assert isinstance(second, wire.LeaseGranted)

    failed = client.lease(2)
    assert isinstance(failed, wire.LeaseFailed), failed
    assert "request_timeout_s" in failed.error

    # A request that is waiting is served when a lease is released.
    client.send(wire.LeaseRequest(50, 0, 3))
    client.send(wire.Release(0, first.slot, first.generation))
    granted = client.receive()
    assert isinstance(granted, wire.LeaseGranted), granted
    assert granted.expert == 3
    assert granted.slot == first.slot
    assert client.stats()["slot_waits"] == 2
    assert stop_daemon(process, client) == 0


def test_reclaim_drops_dead_worker_leases(pipelines, context):
    pipeline = pipelines()
    process, client = start_daemon(pipeline, context)
    granted = [client.lease(expert, worker=5) for expert in (0, 1, 1)]
    assert all(isinstance(reply, wire.LeaseGranted) for reply in granted)
    client.lease(2, worker=6)
    client.send(wire.ReclaimLeases(5))
    client.stats()  # the daemon handles messages in order, so the reclaim is done
    records = pipeline.pool.table.records
    assert int(records["lease_count"].sum()) == 1
    assert int(np.bitwise_or.reduce(records["lease_mask"])) == 1 << 6
    assert stop_daemon(process, client) == 0


def test_prefetch_hint_loads_expert(pipelines, context):
    pipeline = pipelines()
    process, client = start_daemon(pipeline, context)
    client.send(wire.PrefetchHint(expert=7, steps_ahead=1, confidence=0.9))
    client.send(wire.PrefetchHint(expert=99, steps_ahead=1, confidence=0.9))
    granted = client.lease(7)
    assert isinstance(granted, wire.LeaseGranted)
    assert slot_bytes_of(pipeline, granted.slot, len(pipeline.regions[7])) == pipeline.regions[7]
    stats = client.stats()
    assert stats["prefetch_issued"] == 1
    # Whether the read finished before the request depends on timing; it counts once either way.
    assert stats["prefetch_useful"] + stats["prefetch_late"] == 1
    assert stats["io_reads"] == 1
    assert stats["bad_messages"] == 1
    assert stop_daemon(process, client) == 0


def test_prefetch_skipped_when_all_leased(pipelines, context):
    pipeline = pipelines(n_slots=2)
    process, client = start_daemon(pipeline, context)
    client.lease(0)
    client.lease(1)
    client.send(wire.PrefetchHint(expert=2, steps_ahead=1, confidence=0.9))
    stats = client.stats()
    assert stats["prefetch_issued"] == 0
    assert stats["prefetch_skipped"] == 1
    assert stop_daemon(process, client) == 0


def test_restart_keeps_ready_slots(pipelines, context):
    pipeline = pipelines()
    process, client = start_daemon(pipeline, context)
    first = client.lease(3)
    assert isinstance(first, wire.LeaseGranted)
    client.send(wire.Release(0, first.slot, first.generation))
    assert stop_daemon(process, client) == 0

    # A daemon that died mid-read leaves a LOADING slot behind.
    table = pipeline.pool.table
    loading_slot = next(slot for slot in range(table.n_slots) if table.state(slot) == EMPTY)
    table.begin_load(loading_slot, 6)

    process, client = start_daemon(pipeline, context)
    assert table.state(loading_slot) == EMPTY
    again = client.lease(3)
    assert isinstance(again, wire.LeaseGranted)
    assert again.hit is True
    assert again.slot == first.slot
    assert again.generation == first.generation
    assert client.stats()["io_reads"] == 0
    assert stop_daemon(process, client) == 0
    assert "reset_loading=1" in pipeline.log_text()


def test_pinned_loaded_at_start(pipelines, context):
    pipeline = pipelines(pool__pinned=[1, 6])
    process, client = start_daemon(pipeline, context)
    table = pipeline.pool.table
    pinned_slots = [slot for slot in range(table.n_slots) if table.is_pinned(slot)]
    assert sorted(table.expert(slot) for slot in pinned_slots) == [1, 6]
    assert all(table.state(slot) == READY for slot in pinned_slots)
    granted = client.lease(6)
    assert isinstance(granted, wire.LeaseGranted)
    assert granted.hit is True
    assert client.stats()["pinned"] == 2
    assert stop_daemon(process, client) == 0


def test_preadv_engine_daemon(pipelines, context):
    pipeline = pipelines(io__engine="preadv", io__direct="buffered")
    process, client = start_daemon(pipeline, context)
    granted = client.lease(4)
    assert isinstance(granted, wire.LeaseGranted)
    assert slot_bytes_of(pipeline, granted.slot, len(pipeline.regions[4])) == pipeline.regions[4]
    assert client.stats()["io_path"] == "preadv+buffered"
    assert stop_daemon(process, client) == 0


def test_bad_requests_rejected(pipelines, context):
    pipeline = pipelines()
    process, client = start_daemon(pipeline, context)
    client.socket.send(b"not msgpack at all")
    out_of_range = client.lease(8)
    assert isinstance(out_of_range, wire.LeaseFailed)
    assert "outside 0..7" in out_of_range.error
    bad_worker = client.lease(0, worker=64)
    assert isinstance(bad_worker, wire.LeaseFailed)
    client.send(wire.Release(0, 0, 12345))
    stats = client.stats()
    assert stats["bad_messages"] == 1
    assert stats["release_errors"] == 1
    assert process.poll() is None
    assert stop_daemon(process, client) == 0


def test_sigterm_stops_cleanly(pipelines, context):
    pipeline = pipelines()
    process, client = start_daemon(pipeline, context)
    client.close()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=EXIT_TIMEOUT_S) == 0
    assert "io_daemon stopped" in pipeline.log_text()
