"""Read engines of the I/O daemon: expert regions from the store into slot memory.

An expert read is split into requests of at most `io.read_size_kib`; up to
`io.ring_depth` requests are in flight. Requests of demand reads are always submitted
before those of prefetch reads, and prefetch requests never fill more than
PREFETCH_SHARE of the queue, so a demand read that arrives finds room at once.

A completion can be short or fail with -EAGAIN (large O_DIRECT requests may stop part
way); `request_outcome` decides, and the remainder is resubmitted.

Engines, chosen once at start (`io.engine`, `io.direct`) and reported as `io_path`:

    io_uring + O_DIRECT   the main path: readv into the mmapped slot, no page-cache copy
    preadv thread pool    when io_uring setup fails (e.g. kernel.io_uring_disabled=2)
    buffered              when O_DIRECT is rejected with EINVAL at open or at the first
                          read (filesystems without O_DIRECT; tmpfs accepts it on Linux
                          6.18). Each finished expert's file range is dropped with
                          POSIX_FADV_DONTNEED, so the page cache keeps no second copy.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from mer_pipeline.config import IoConfig

log = logging.getLogger(__name__)

DIRECT_ALIGN_BYTES = 4096
# Share of ring_depth that prefetch requests may occupy.
PREFETCH_SHARE = 0.75

DEMAND = 0
PREFETCH = 1

# request_outcome results
DONE = "done"
RETRY = "retry"
PARTIAL = "partial"
FAILED = "failed"


class ReaderSetupError(RuntimeError):
    """An I/O engine or file mode that was required by the config cannot be used."""


def request_outcome(needed_bytes: int, result: int) -> tuple[str, int]:
    """Classify one completion of a request that must deliver `needed_bytes`.

    `result` is the byte count or a negative errno, as io_uring reports it. Returns
    (DONE, bytes), or (PARTIAL, bytes) for a short read whose remainder must be
    resubmitted, or (RETRY, 0) for -EAGAIN and -EINTR, or (FAILED, errno). End of file
    before `needed_bytes` fails with ENODATA.
    """
    if result in (-errno.EAGAIN, -errno.EINTR):
        return RETRY, 0
    if result < 0:
        return FAILED, -result
    if result >= needed_bytes:
        return DONE, result
    if result == 0:
        return FAILED, errno.ENODATA
    return PARTIAL, result


@dataclasses.dataclass(eq=False)
class ExpertRead:
    """One expert region to read into `dest`; `tag` is the caller's key (the expert id)."""

    tag: Any
    path: Path
    offset: int
    length: int
    dest: memoryview
    priority: int = DEMAND
    queued_ns: int = 0
    submitted_ns: int = 0
    completed_ns: int = 0
    error: str | None = None
    # Bytes from the region's start that are read (the contiguous prefix). Requests
    # complete out of order, so a finished request past the prefix waits in _done_ends.
    ready_bytes: int = 0
    # Bytes of the region not yet cut into requests, and requests cut but not finished
    # (in flight or waiting for resubmission).
    _next_byte: int = 0
    _outstanding: int = 0
    _done_ends: dict[int, int] = dataclasses.field(default_factory=dict)

    def _mark_done(self, start: int, end: int) -> None:
        """Record that region bytes [start, end) are read and advance `ready_bytes`."""
        self._done_ends[start] = end
        while self.ready_bytes in self._done_ends:
            self.ready_bytes = self._done_ends.pop(self.ready_bytes)

    @property
    def unsubmitted(self) -> bool:
        return self._next_byte < self.length and self.error is None


@dataclasses.dataclass(eq=False)
class _Request:
    read: ExpertRead
    file_offset: int
    dest: memoryview
    needed_bytes: int
    direct: bool
    # The region bytes [region_start, region_end) this request was cut for; a short
    # read's remainder keeps them.
    region_start: int = 0
    region_end: int = 0
    counts_as_prefetch: bool = False


class _DataFile:
    """One open store file; `direct` is True when the fd was opened with O_DIRECT."""

    def __init__(self, path: Path, direct_mode: str) -> None:
        self.path = path
        self.direct = False
        self.direct_confirmed = False
        self.fd = -1
        # Descriptors replaced by fall_back_to_buffered stay open until close, because
        # requests submitted on them may still be in flight.
        self._retired_fds: list[int] = []
        if direct_mode != "buffered":
            try:
                self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL or direct_mode == "direct":
                    raise ReaderSetupError(f"cannot open {path} with O_DIRECT: {exc}") from exc
                log.warning("o_direct rejected at open, using buffered reads file=%s error=%s", path, exc)
        if self.fd < 0:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def fall_back_to_buffered(self) -> None:
        self._retired_fds.append(self.fd)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.direct = False

    def close(self) -> None:
        for fd in [self.fd, *self._retired_fds]:
            os.close(fd)


class _UringBackend:
    name = "io_uring"

    def __init__(self, depth: int, event_fd: int) -> None:
        import liburing

        self._liburing = liburing
        self._ring = liburing.io_uring()
        self._cqe = liburing.io_uring_cqe()
        result = liburing.io_uring_queue_init(depth, self._ring, 0)
        if result < 0:
            raise OSError(-result, f"io_uring_queue_init(depth={depth}) failed: {os.strerror(-result)}")
        result = liburing.io_uring_register_eventfd(self._ring, event_fd)
        if result < 0:
            liburing.io_uring_queue_exit(self._ring)
            raise OSError(-result, f"io_uring_register_eventfd failed: {os.strerror(-result)}")
        # The iovec objects must stay alive until their completion arrives.
        self._iovecs: dict[int, Any] = {}

    def prepare(self, user_data: int, fd: int, dest: memoryview, offset: int) -> None:
        sqe = self._liburing.io_uring_get_sqe(self._ring)
        if sqe is None:
            raise RuntimeError("io_uring submission queue is full; more requests in flight than ring_depth")
        iovec = self._liburing.iovec([dest])
        self._liburing.io_uring_prep_readv(sqe, fd, iovec, offset)
        sqe.user_data = user_data
        self._iovecs[user_data] = iovec

    def submit(self) -> None:
        result = self._liburing.io_uring_submit(self._ring)
        if result < 0:
            raise OSError(-result, f"io_uring_submit failed: {os.strerror(-result)}")

    def reap(self) -> list[tuple[int, int]]:
        completions = []
        while self._liburing.io_uring_peek_cqe(self._ring, self._cqe) == 0:
            entry = self._cqe[0]
            completions.append((entry.user_data, entry.res))
            self._liburing.io_uring_cqe_seen(self._ring, entry)
            self._iovecs.pop(entry.user_data, None)
        return completions

    def close(self) -> None:
        self._liburing.io_uring_queue_exit(self._ring)
        self._iovecs.clear()


class _PreadvBackend:
    """A thread pool of os.preadv calls; completions are signalled on the eventfd."""

    name = "preadv"

    def __init__(self, depth: int, event_fd: int) -> None:
        self._event_fd = event_fd
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(depth, 32), thread_name_prefix="preadv")
        self._done: collections.deque[tuple[int, int]] = collections.deque()
        self._staged: list[tuple[int, int, memoryview, int]] = []

    def prepare(self, user_data: int, fd: int, dest: memoryview, offset: int) -> None:
        self._staged.append((user_data, fd, dest, offset))

    def submit(self) -> None:
        for job in self._staged:
            self._pool.submit(self._run, *job)
        self._staged.clear()

    def _run(self, user_data: int, fd: int, dest: memoryview, offset: int) -> None:
        try:
            result = os.preadv(fd, [dest], offset)
        except OSError as exc:
            result = -(exc.errno or errno.EIO)
        self._done.append((user_data, result))
        os.eventfd_write(self._event_fd, 1)

    def reap(self) -> list[tuple[int, int]]:
        completions = []
        while self._done:
            completions.append(self._done.popleft())
        return completions

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclasses.dataclass
class ReaderStats:
    io_reads: int = 0
    io_requests: int = 0
    io_retries: int = 0
    io_bytes: int = 0
    io_errors: int = 0
    io_busy_us: int = 0


class ExpertReader:
    """Schedules expert reads on one engine; the owner polls `fileno()` and calls `reap`."""

    def __init__(self, config: IoConfig, paths: Iterable[Path]) -> None:
        self.ring_depth = config.ring_depth
        self.request_bytes = config.read_size_kib * 1024
        self.prefetch_limit = max(1, int(config.ring_depth * PREFETCH_SHARE))
        self.stats = ReaderStats()
        self._direct_mode = config.direct
        self._event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._files: dict[Path, _DataFile] = {}
        self._queues: tuple[collections.deque[ExpertRead], collections.deque[ExpertRead]] = (
            collections.deque(),
            collections.deque(),
        )
        self._resubmit: collections.deque[_Request] = collections.deque()
        self._requests: dict[int, _Request] = {}
        self._next_user_data = 1
        self._prefetch_in_flight = 0
        self._busy_since_ns = 0
        # Reads that finished inside _fill (a failed read whose last remainder was dropped);
        # the next reap returns them.
        self._orphans: list[ExpertRead] = []
        try:
            for path in paths:
                self._files[Path(path)] = _DataFile(Path(path), config.direct)
            self._backend = self._make_backend(config)
        except BaseException:
            self.close()
            raise

    def _make_backend(self, config: IoConfig) -> _UringBackend | _PreadvBackend:
        if config.engine == "preadv":
            return _PreadvBackend(config.ring_depth, self._event_fd)
        try:
            return _UringBackend(config.ring_depth, self._event_fd)
        except (OSError, ImportError) as exc:
            if config.engine == "io_uring":
                raise ReaderSetupError(f"io.engine is io_uring but io_uring setup failed: {exc}") from exc
            log.warning("io_uring unavailable, using the preadv thread pool error=%s", exc)
            return _PreadvBackend(config.ring_depth, self._event_fd)

    @property
    def io_path(self) -> str:
        direct = bool(self._files) and all(f.direct for f in self._files.values())
        return f"{self._backend.name}+{'o_direct' if direct else 'buffered'}"

    def fileno(self) -> int:
        """Return the eventfd that becomes readable when completions are waiting."""
        return self._event_fd

    @property
    def busy(self) -> bool:
        return bool(self._requests or self._resubmit or self._queues[DEMAND] or self._queues[PREFETCH])

    def submit(self, read: ExpertRead) -> None:
        """Queue an expert read and submit as many of its requests as the queue allows."""
        path = Path(read.path)
        if path not in self._files:
            self._files[path] = _DataFile(path, self._direct_mode)
        if len(read.dest) < read.length:
            raise ValueError(f"destination of {len(read.dest)} bytes cannot hold a {read.length}-byte region")
        read.queued_ns = time.monotonic_ns()
        self._queues[read.priority].append(read)
        self._fill()

    def promote(self, read: ExpertRead) -> None:
        """Make a queued prefetch read a demand read (a worker is now waiting for it)."""
        if read.priority == DEMAND:
            return
        if read in self._queues[PREFETCH]:
            self._queues[PREFETCH].remove(read)
            self._queues[DEMAND].append(read)
        read.priority = DEMAND
        self._fill()

    def reap(self) -> list[ExpertRead]:
        """Process completions; return the expert reads that finished (check `.error`)."""
        try:
            os.eventfd_read(self._event_fd)
        except BlockingIOError:
            pass
        finished, self._orphans = self._orphans, []
        for user_data, result in self._backend.reap():
            request = self._requests.pop(user_data)
            if request.counts_as_prefetch:
                self._prefetch_in_flight -= 1
            self._complete(request, result, finished)
        if not self._requests and self._busy_since_ns:
            self.stats.io_busy_us += (time.monotonic_ns() - self._busy_since_ns) // 1000
            self._busy_since_ns = 0
        self._fill()
        finished.extend(self._orphans)
        self._orphans = []
        return finished

    def _complete(self, request: _Request, result: int, finished: list[ExpertRead]) -> None:
        read = request.read
        data_file = self._files[Path(read.path)]
        outcome, value = request_outcome(request.needed_bytes, result)
        if outcome == FAILED and value == errno.EINVAL and request.direct and not data_file.direct_confirmed:
            if self._direct_mode == "direct":
                read.error = f"O_DIRECT read rejected with EINVAL and io.direct is 'direct': {os.strerror(value)}"
            else:
                if data_file.direct:
                    log.warning("o_direct rejected at first read, using buffered reads file=%s", data_file.path)
                    data_file.fall_back_to_buffered()
                request.direct = False
                self._resubmit.append(request)
                return
        elif outcome == RETRY:
            self.stats.io_retries += 1
            self._resubmit.append(request)
            return
        elif outcome == PARTIAL:
            self.stats.io_retries += 1
            self.stats.io_bytes += value
            request.file_offset += value
            request.dest = request.dest[value:]
            request.needed_bytes -= value
            self._resubmit.append(request)
            return
        elif outcome == FAILED:
            read.error = (
                f"read of {request.needed_bytes} bytes at offset {request.file_offset} of {data_file.path} "
                f"failed: {os.strerror(value)} (errno {value})"
            )
        else:
            self.stats.io_bytes += request.needed_bytes
            if request.direct:
                data_file.direct_confirmed = True
            read._mark_done(request.region_start, request.region_end)

        read._outstanding -= 1
        if read._outstanding == 0 and (read.error is not None or read._next_byte >= read.length):
            self._finish(read, finished)

    def _finish(self, read: ExpertRead, finished: list[ExpertRead]) -> None:
        read.completed_ns = time.monotonic_ns()
        read.dest = memoryview(b"")
        data_file = self._files[Path(read.path)]
        if not data_file.direct:
            # Buffered reads leave the region in the page cache; drop that second copy.
            os.posix_fadvise(data_file.fd, read.offset, read.length, os.POSIX_FADV_DONTNEED)
        if read.error is None:
            self.stats.io_reads += 1
        else:
            self.stats.io_errors += 1
        finished.append(read)

    def _fill(self) -> None:
        staged = 0
        while len(self._requests) < self.ring_depth:
            request = self._next_request()
            if request is None:
                break
            self._stage(request)
            staged += 1
        if staged:
            if not self._busy_since_ns:
                self._busy_since_ns = time.monotonic_ns()
            self._backend.submit()

    def _next_request(self) -> _Request | None:
        while self._resubmit:
            request = self._resubmit.popleft()
            if request.read.error is None:
                return request
            # A sibling request already failed the read: this remainder is not needed.
            request.read._outstanding -= 1
            if request.read._outstanding == 0:
                self._finish(request.read, self._orphans)
        demand, prefetch = self._queues
        while demand and not demand[0].unsubmitted:
            demand.popleft()
        if demand:
            return self._cut_request(demand[0])
        while prefetch and not prefetch[0].unsubmitted:
            prefetch.popleft()
        if prefetch and self._prefetch_in_flight < self.prefetch_limit:
            return self._cut_request(prefetch[0])
        return None

    def _cut_request(self, read: ExpertRead) -> _Request:
        start = read._next_byte
        needed = min(self.request_bytes, read.length - start)
        read._next_byte = start + needed
        read._outstanding += 1
        data_file = self._files[Path(read.path)]
        if read.submitted_ns == 0:
            read.submitted_ns = time.monotonic_ns()
        return _Request(
            read, read.offset + start, read.dest[start : start + needed], needed, data_file.direct, start, start + needed
        )

    def _stage(self, request: _Request) -> None:
        data_file = self._files[Path(request.read.path)]
        if request.direct and not data_file.direct:
            request.direct = False
        length = request.needed_bytes
        if request.direct and length % DIRECT_ALIGN_BYTES:
            # O_DIRECT lengths must be whole blocks; the slot has room up to its page size.
            length = min(-(-length // DIRECT_ALIGN_BYTES) * DIRECT_ALIGN_BYTES, len(request.dest))
        user_data = self._next_user_data
        self._next_user_data += 1
        request.counts_as_prefetch = request.read.priority == PREFETCH
        self._prefetch_in_flight += int(request.counts_as_prefetch)
        self._requests[user_data] = request
        self.stats.io_requests += 1
        self._backend.prepare(user_data, data_file.fd, request.dest[:length], request.file_offset)

    def wait_idle(self, timeout_s: float, on_finished: Callable[[ExpertRead], None] | None = None) -> bool:
        """Reap until no request is in flight or `timeout_s` passes; return True when idle."""
        import select

        deadline = time.monotonic() + timeout_s
        while self._requests or self._resubmit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select([self._event_fd], [], [], min(remaining, 0.5))
            for read in self.reap():
                if on_finished is not None:
                    on_finished(read)
        return True

    def cancel_queued(self) -> list[ExpertRead]:
        """Stop cutting requests for queued reads; return the reads that had none outstanding."""
        dropped = []
        for queue in self._queues:
            for read in queue:
                read.error = read.error or "cancelled"
                if read._outstanding == 0:
                    dropped.append(read)
            queue.clear()
        return dropped

    def close(self) -> None:
        backend = getattr(self, "_backend", None)
        if backend is not None:
            backend.close()
        for data_file in self._files.values():
            data_file.close()
        self._files.clear()
        if self._event_fd >= 0:
            os.close(self._event_fd)
            self._event_fd = -1
