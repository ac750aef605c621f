import errno
import mmap
import os
import select
import time
from pathlib import Path

import pytest

from mer_pipeline import expert_reader
from mer_pipeline.config import IoConfig
from mer_pipeline.expert_reader import (
    DEMAND,
    DONE,
    FAILED,
    PARTIAL,
    PREFETCH,
    RETRY,
    ExpertRead,
    ExpertReader,
    request_outcome,
)

KIB = 1024
TIMEOUT_S = 30.0


@pytest.fixture
def data_file(tmp_path):
    """A file on the test's tmp dir (ext4 here, so O_DIRECT works) with random bytes."""
    path = tmp_path / "experts.bin"
    path.write_bytes(os.urandom(1024 * KIB))
    return path


def read_all(reader: ExpertReader, count: int) -> list[ExpertRead]:
    finished: list[ExpertRead] = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(finished) < count:
        assert time.monotonic() < deadline, f"only {len(finished)} of {count} reads finished in {TIMEOUT_S} s"
        select.select([reader.fileno()], [], [], 1.0)
        finished.extend(reader.reap())
    return finished


def check_reads_bit_identical(config: IoConfig, path: Path, expected_path: str) -> None:
    data = path.read_bytes()
    buffer = mmap.mmap(-1, 512 * KIB)
    view = memoryview(buffer)
    reader = ExpertReader(config, [path])
    try:
        assert reader.io_path == expected_path
        # Region sizes that are and are not multiples of the request size (16 KiB).
        regions = [(0, 0, 64 * KIB), (1, 64 * KIB, 24 * KIB), (2, 512 * KIB, 4 * KIB), (3, 128 * KIB, 300 * KIB)]
        placements = {0: 0, 1: 64 * KIB, 2: 88 * KIB, 3: 92 * KIB}
        for tag, offset, length in regions:
            start = placements[tag]
            reader.submit(ExpertRead(tag, path, offset, length, view[start : start + length], DEMAND if tag % 2 else PREFETCH))
        finished = read_all(reader, len(regions))
        assert sorted(read.tag for read in finished) == [0, 1, 2, 3]
        for read in finished:
            assert read.error is None
            assert read.ready_bytes == read.length
        for tag, offset, length in regions:
            start = placements[tag]
            assert bytes(view[start : start + length]) == data[offset : offset + length], f"region {tag} differs"
        assert reader.stats.io_reads == 4
        assert reader.stats.io_bytes == sum(length for _, _, length in regions)
        assert reader.stats.io_errors == 0
    finally:
        del finished
        reader.close()
        view.release()
        buffer.close()


def test_io_uring_direct_bit_identical(data_file):
    config = IoConfig(engine="io_uring", direct="direct", ring_depth=4, read_size_kib=16)
    check_reads_bit_identical(config, data_file, "io_uring+o_direct")


def test_preadv_fallback_bit_identical(data_file):
    config = IoConfig(engine="preadv", direct="direct", ring_depth=4, read_size_kib=16)
    check_reads_bit_identical(config, data_file, "preadv+o_direct")


def test_buffered_bit_identical(data_file):
    config = IoConfig(engine="io_uring", direct="buffered", ring_depth=4, read_size_kib=16)
    check_reads_bit_identical(config, data_file, "io_uring+buffered")


def test_o_direct_rejected_at_open_falls_back(data_file, monkeypatch):
    """EINVAL from open(O_DIRECT), as on filesystems without O_DIRECT, selects buffered reads."""
    real_open = os.open

    def open_without_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(expert_reader.os, "open", open_without_direct)
    config = IoConfig(engine="auto", direct="auto", ring_depth=4, read_size_kib=16)
    check_reads_bit_identical(config, data_file, "io_uring+buffered")


def test_o_direct_required_but_rejected(data_file, monkeypatch):
    real_open = os.open

    def open_without_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(expert_reader.os, "open", open_without_direct)
    with pytest.raises(expert_reader.ReaderSetupError, match="O_DIRECT"):
        ExpertReader(IoConfig(direct="direct"), [data_file])


class FlakyBackend:
    """Wraps a real backend and rewrites chosen completions, as the kernel might report them."""

    def __init__(self, inner, rewrite):
        self.inner = inner
        self.name = inner.name
        self.rewrite = rewrite
        self.seen = 0

    def prepare(self, user_data, fd, dest, offset):
        self.inner.prepare(user_data, fd, dest, offset)

    def submit(self):
        self.inner.submit()

    def reap(self):
        completions = []
        for user_data, result in self.inner.reap():
            self.seen += 1
            completions.append((user_data, self.rewrite(self.seen, result)))
        return completions

    def close(self):
        self.inner.close()


def test_eagain_and_einval_resubmitted(data_file):
    """-EAGAIN is retried; EINVAL on the first O_DIRECT read switches the file to buffered."""
    data = data_file.read_bytes()
    reader = ExpertReader(IoConfig(engine="io_uring", ring_depth=2, read_size_kib=16), [data_file])
    reader._backend = FlakyBackend(
        reader._backend, lambda n, result: {1: -errno.EINVAL, 3: -errno.EAGAIN}.get(n, result)
    )
    buffer = mmap.mmap(-1, 64 * KIB)
    view = memoryview(buffer)
    try:
        reader.submit(ExpertRead(0, data_file, 4096, 64 * KIB, view))
        (read,) = read_all(reader, 1)
        assert read.error is None
        assert bytes(view) == data[4096 : 4096 + 64 * KIB]
        assert reader.io_path == "io_uring+buffered"
        assert reader.stats.io_retries >= 1
    finally:
        del read
        reader.close()
        view.release()
        buffer.close()


def test_real_error_fails_read(data_file):
    reader = ExpertReader(IoConfig(engine="io_uring", ring_depth=2, read_size_kib=16), [data_file])
    reader._backend = FlakyBackend(reader._backend, lambda n, result: -errno.EIO if n == 2 else result)
    buffer = mmap.mmap(-1, 64 * KIB)
    view = memoryview(buffer)
    try:
        reader.submit(ExpertRead(7, data_file, 0, 64 * KIB, view))
        (read,) = read_all(reader, 1)
        assert read.tag == 7
        assert "Input/output error" in read.error
        assert reader.stats.io_errors == 1
        assert not reader.busy
    finally:
        del read
        reader.close()
        view.release()
        buffer.close()


def test_read_past_end_fails(data_file):
    reader = ExpertReader(IoConfig(engine="io_uring", ring_depth=2, read_size_kib=16), [data_file])
    buffer = mmap.mmap(-1, 64 * KIB)
    view = memoryview(buffer)
    try:
        reader.submit(ExpertRead(1, data_file, 1024 * KIB - 16 * KIB, 64 * KIB, view))
        (read,) = read_all(reader, 1)
        assert "No data available" in read.error
    finally:
        del read
        reader.close()
        view.release()
        buffer.close()


@pytest.mark.parametrize(
    "needed,result,expected",
    [
        (4096, 4096, (DONE, 4096)),
        (4096, 8192, (DONE, 8192)),
        (8192, 4096, (PARTIAL, 4096)),
        (8192, 0, (FAILED, errno.ENODATA)),
        (8192, -errno.EAGAIN, (RETRY, 0)),
        (8192, -errno.EINTR, (RETRY, 0)),
        (8192, -errno.EIO, (FAILED, errno.EIO)),
    ],
)
def test_request_outcome(needed, result, expected):
    assert request_outcome(needed, result) == expected


def test_short_read_resubmits_remainder(data_file):
    """A completion of fewer bytes than requested is resubmitted for the rest."""
    data = data_file.read_bytes()
    reader = ExpertReader(IoConfig(engine="io_uring", ring_depth=4, read_size_kib=64), [data_file])
    inner = reader._backend
    truncated: list[int] = []

    class ShortFirstRead(FlakyBackend):
        def prepare(self, user_data, fd, dest, offset):
            # The first request reads only its first 8 KiB, as a short O_DIRECT read would.
            if not truncated:
                truncated.append(user_data)
                dest = dest[: 8 * KIB]
            self.inner.prepare(user_data, fd, dest, offset)

    reader._backend = ShortFirstRead(inner, lambda n, result: result)
    buffer = mmap.mmap(-1, 128 * KIB)
    view = memoryview(buffer)
    try:
        reader.submit(ExpertRead(0, data_file, 0, 128 * KIB, view))
        (read,) = read_all(reader, 1)
        assert read.error is None
        assert bytes(view) == data[: 128 * KIB]
        assert read.ready_bytes == 128 * KIB
        assert reader.stats.io_retries == 1
        assert reader.stats.io_requests == 3
    finally:
        del read
        reader.close()
        view.release()
        buffer.close()


def test_ready_bytes_is_the_contiguous_prefix():
    read = ExpertRead(0, Path("unused"), 0, 12 * KIB, memoryview(b""))
    read._mark_done(8 * KIB, 12 * KIB)
    assert read.ready_bytes == 0
    read._mark_done(0, 4 * KIB)
    assert read.ready_bytes == 4 * KIB
    read._mark_done(4 * KIB, 8 * KIB)
    assert read.ready_bytes == 12 * KIB


def test_ready_bytes_prefix_is_read_during_the_read(data_file):
    """After every reap, the bytes below ready_bytes are already the file's."""
    data = data_file.read_bytes()
    reader = ExpertReader(IoConfig(engine="io_uring", direct="direct", ring_depth=4, read_size_kib=16), [data_file])
    buffer = mmap.mmap(-1, 1024 * KIB)
    view = memoryview(buffer)
    read = ExpertRead(0, data_file, 0, 1024 * KIB, view)
    seen: list[int] = []
    try:
        reader.submit(read)
        deadline = time.monotonic() + TIMEOUT_S
        finished: list[ExpertRead] = []
        while not finished:
            assert time.monotonic() < deadline, "the read did not finish"
            select.select([reader.fileno()], [], [], 1.0)
            finished = reader.reap()
            ready_bytes = read.ready_bytes
            assert bytes(view[:ready_bytes]) == data[:ready_bytes]
            seen.append(ready_bytes)
        assert seen == sorted(seen)
        assert seen[-1] == 1024 * KIB
        assert len(set(seen)) > 2, f"ready_bytes never advanced before the end: {seen}"
    finally:
        del finished
        reader.close()
        view.release()
        buffer.close()


def test_demand_requests_go_first(data_file):
    """Requests of a demand read queued after a prefetch read are submitted before its rest."""
    reader = ExpertReader(IoConfig(engine="io_uring", ring_depth=2, read_size_kib=16), [data_file])
    order: list[int] = []

    class Recording(FlakyBackend):
        def prepare(self, user_data, fd, dest, offset):
            order.append(offset)
            self.inner.prepare(user_data, fd, dest, offset)

    reader._backend = Recording(reader._backend, lambda n, result: result)
    buffer = mmap.mmap(-1, 256 * KIB)
    view = memoryview(buffer)
    try:
        reader.submit(ExpertRead("prefetch", data_file, 0, 128 * KIB, view[: 128 * KIB], PREFETCH))
        reader.submit(ExpertRead("demand", data_file, 512 * KIB, 64 * KIB, view[128 * KIB : 192 * KIB], DEMAND))
        finished = read_all(reader, 2)
        assert [read.tag for read in finished] == ["demand", "prefetch"]
        demand_positions = [i for i, offset in enumerate(order) if offset >= 512 * KIB]
        # The queue holds 2 requests: the prefetch read may have at most one in flight
        # (PREFETCH_SHARE of 2), so the demand read's 4 requests are the next ones submitted.
        assert demand_positions == [1, 2, 3, 4]
    finally:
        del finished
        reader.close()
        view.release()
        buffer.close()


def test_io_uring_setup_failure_falls_back(data_file, monkeypatch):
    def failing_backend(depth, event_fd):
        raise OSError(errno.EPERM, "io_uring_queue_init failed: Operation not permitted")

    monkeypatch.setattr(expert_reader, "_UringBackend", failing_backend)
    reader = ExpertReader(IoConfig(engine="auto", ring_depth=2), [data_file])
    try:
        assert reader.io_path == "preadv+o_direct"
    finally:
        reader.close()
    with pytest.raises(expert_reader.ReaderSetupError, match="io_uring"):
        ExpertReader(IoConfig(engine="io_uring", ring_depth=2), [data_file])
