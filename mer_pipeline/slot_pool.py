"""The slot pool: expert regions in POSIX shared memory, shared by the I/O daemon and workers.

The launcher creates the pool, so it outlives an I/O daemon restart. It is two segments:

    data segment  /mer-NAME-UID-PID-RAND-data   n_slots x slot_bytes, mmapped
    table segment /mer-NAME-UID-PID-RAND-table  header + one record per slot

Data segment: slot s occupies bytes [s * slot_bytes, (s + 1) * slot_bytes). slot_bytes
is a multiple of 4096 and the mapping is page-aligned, so every slot starts on a page
boundary and O_DIRECT reads land in it directly.

Table segment (little-endian, every field naturally aligned):

    offset  size  header field
    0       4     magic        uint32  0x544F4C53 ("SLOT")
    4       4     version      uint32  TABLE_VERSION
    8       4     n_slots      uint32
    12      4     (padding)
    16      8     slot_bytes   uint64
    24      8     tick         uint64  the I/O daemon's access counter, kept across restarts
    32      32    (reserved)
    64            slot records, RECORD_BYTES (128) each: record s at 64 + 128 * s

    offset  size  slot record field
    0       4     expert       int32   expert id (layer * n_experts + expert), -1 when EMPTY
    4       4     state        uint32  EMPTY 0, LOADING 1, READY 2
    8       8     generation   uint64  bumped whenever the slot's content changes
    16      8     lease_mask   uint64  bit w set while worker w holds at least one lease
    24      4     lease_count  uint32  leases held, all workers together
    28      4     pinned       uint32  1: never evicted
    32      8     last_use     uint64  header tick of the latest lookup that hit this slot
    40      8     ready_bytes  uint64  bytes from the region's start that a LOADING read has
                                       already written (the contiguous prefix)
    48      16    (reserved)
    64      64    worker_leases uint8[64]  leases held by each worker index

Legal slot transitions (methods of SlotTable; any other raises SlotStateError and
leaves the table unchanged):

    EMPTY   --begin_load-->  LOADING   (a read is queued into the slot; ready_bytes = 0)
    LOADING --set_ready_bytes--> LOADING (more of the region's prefix has arrived)
    READY   --begin_load-->  LOADING   (eviction: only with lease_count 0 and not pinned)
    LOADING --finish_load--> READY     (every byte read and the checksum matched)
    LOADING --fail_load-->   EMPTY     (read error or checksum mismatch; adopting a table
                                        whose daemon died mid-read)
    READY   --evict-->       EMPTY     (only with lease_count 0 and not pinned)
    READY   --lease/release/reclaim--> READY (lease fields only)

Writers: the I/O daemon is the only process that writes the table or slot data after
`create`. Workers and tools map both segments and only read them. A worker reads the
data of a slot only while it holds a lease, which the I/O daemon grants by message and
only on a READY slot; a leased slot is never reloaded, so its data stays fixed.

Write order that keeps an unleased reader (a tool) safe, used like a seqlock:

    begin_load:  state = LOADING, then generation += 1, then expert; then the data
    finish_load: the data is complete, then state = READY
    fail_load / evict: state = EMPTY, then generation += 1, then expert = -1

A reader reads generation and state, copies the data, then reads generation again; the
copy is valid only if the state was READY and both generations are equal. On x86-64 the
stores become visible in program order, which this relies on.

Reading a LOADING slot (a worker computing while the read arrives): the I/O daemon sets
ready_bytes only after the kernel has reported every byte of that prefix read, so the
bytes below ready_bytes are final for this generation. Such a reader holds no lease. Its
result counts only if it is later granted a lease on the same slot at the same
generation, which proves that the slot was not failed or reloaded in between.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets

import numpy as np
import posix_ipc

log = logging.getLogger(__name__)

TABLE_MAGIC = 0x544F4C53
TABLE_VERSION = 2
HEADER_BYTES = 64
RECORD_BYTES = 128
PAGE_BYTES = 4096
MAX_WORKERS = 64
# A worker may hold this many leases on one slot at once (worker_leases is uint8).
MAX_LEASES_PER_WORKER = 255

EMPTY = 0
LOADING = 1
READY = 2
STATE_NAMES = {EMPTY: "EMPTY", LOADING: "LOADING", READY: "READY"}

HEADER_DTYPE = np.dtype(
    {
        "names": ["magic", "version", "n_slots", "slot_bytes", "tick"],
        "formats": ["<u4", "<u4", "<u4", "<u8", "<u8"],
        "offsets": [0, 4, 8, 16, 24],
        "itemsize": HEADER_BYTES,
    }
)

SLOT_DTYPE = np.dtype(
    {
        "names": [
            "expert", "state", "generation", "lease_mask", "lease_count", "pinned", "last_use", "ready_bytes",
            "worker_leases",
        ],
        "formats": ["<i4", "<u4", "<u8", "<u8", "<u4", "<u4", "<u8", "<u8", ("u1", MAX_WORKERS)],
        "offsets": [0, 4, 8, 16, 24, 28, 32, 40, 64],
        "itemsize": RECORD_BYTES,
    }
)


class SlotPoolError(RuntimeError):
    """A pool segment that cannot be created, attached or is not a MER slot table."""


class SlotStateError(RuntimeError):
    """An illegal slot transition; the table is unchanged."""


def table_bytes(n_slots: int) -> int:
    return HEADER_BYTES + RECORD_BYTES * n_slots


def round_slot_bytes(region_bytes: int) -> int:
    """Return the slot size for an expert region: rounded up to a whole page."""
    return -(-region_bytes // PAGE_BYTES) * PAGE_BYTES


def pool_names(pipeline_name: str) -> tuple[str, str]:
    """Return (data_name, table_name), unique per running pipeline."""
    stem = f"/mer-{pipeline_name}-{os.getuid()}-{os.getpid()}-{secrets.token_hex(4)}"
    return f"{stem}-data", f"{stem}-table"


class SlotTable:
    """The slot table, a numpy structured view of the table segment, with its transitions.

    Each transition checks every precondition before it writes, so a rejected one changes
    nothing. Only the I/O daemon calls the writing methods.
    """

    def __init__(self, buffer: mmap.mmap | memoryview) -> None:
        self.header = np.ndarray((), dtype=HEADER_DTYPE, buffer=buffer, offset=0)
        n_slots = int(self.header["n_slots"])
        self.records = np.ndarray((n_slots,), dtype=SLOT_DTYPE, buffer=buffer, offset=HEADER_BYTES)

    @property
    def n_slots(self) -> int:
        return len(self.records)

    def state(self, slot: int) -> int:
        return int(self.records[slot]["state"])

    def expert(self, slot: int) -> int:
        return int(self.records[slot]["expert"])

    def generation(self, slot: int) -> int:
        return int(self.records[slot]["generation"])

    def ready_bytes(self, slot: int) -> int:
        return int(self.records[slot]["ready_bytes"])

    def lease_count(self, slot: int) -> int:
        return int(self.records[slot]["lease_count"])

    def is_pinned(self, slot: int) -> bool:
        return bool(self.records[slot]["pinned"])

    def worker_lease_count(self, slot: int, worker: int) -> int:
        return int(self.records[slot]["worker_leases"][worker])

    def describe(self, slot: int) -> str:
        record = self.records[slot]
        return (
            f"slot {slot} (state={STATE_NAMES.get(int(record['state']), record['state'])} "
            f"expert={int(record['expert'])} generation={int(record['generation'])} "
            f"leases={int(record['lease_count'])} pinned={bool(record['pinned'])})"
        )

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise SlotStateError(f"slot {slot} is outside 0..{self.n_slots - 1}")

    def _check_worker(self, worker: int) -> None:
        if not 0 <= worker < MAX_WORKERS:
            raise SlotStateError(f"worker index {worker} is outside 0..{MAX_WORKERS - 1}")

    def _check_evictable(self, slot: int, action: str) -> None:
        record = self.records[slot]
        if record["lease_count"]:
            raise SlotStateError(f"cannot {action} {self.describe(slot)}: it is leased")
        if record["pinned"]:
            raise SlotStateError(f"cannot {action} {self.describe(slot)}: it is pinned")

    # --- content transitions -------------------------------------------------------

    def begin_load(self, slot: int, expert: int) -> int:
        """Mark `slot` LOADING for `expert` before its data is overwritten; return the new generation."""
        self._check_slot(slot)
        if expert < 0:
            raise SlotStateError(f"cannot load expert {expert} into slot {slot}: expert ids are >= 0")
        state = self.state(slot)
        if state == READY:
            self._check_evictable(slot, "reload")
        elif state != EMPTY:
            raise SlotStateError(f"cannot begin a load into {self.describe(slot)}: only EMPTY or READY slots can load")
        record = self.records[slot]
        record["state"] = LOADING
        record["generation"] += 1
        record["expert"] = expert
        record["ready_bytes"] = 0
        return int(record["generation"])

    def set_ready_bytes(self, slot: int, ready_bytes: int) -> None:
        """Publish that the first `ready_bytes` of a LOADING slot's region are read."""
        self._check_slot(slot)
        if self.state(slot) != LOADING:
            raise SlotStateError(f"cannot publish read progress of {self.describe(slot)}: it is not LOADING")
        record = self.records[slot]
        if ready_bytes < int(record["ready_bytes"]):
            raise SlotStateError(
                f"cannot move ready_bytes of {self.describe(slot)} back from {int(record['ready_bytes'])} to {ready_bytes}"
            )
        record["ready_bytes"] = ready_bytes

    def finish_load(self, slot: int) -> None:
        """Mark a LOADING slot READY; its data must be complete and verified."""
        self._check_slot(slot)
        if self.state(slot) != LOADING:
            raise SlotStateError(f"cannot finish a load of {self.describe(slot)}: it is not LOADING")
        self.records[slot]["state"] = READY

    def fail_load(self, slot: int) -> None:
        """Return a LOADING slot to EMPTY after a failed read."""
        self._check_slot(slot)
        if self.state(slot) != LOADING:
            raise SlotStateError(f"cannot fail a load of {self.describe(slot)}: it is not LOADING")
        self._make_empty(slot)

    def evict(self, slot: int) -> None:
        """Drop the expert of an unleased, unpinned READY slot."""
        self._check_slot(slot)
        if self.state(slot) != READY:
            raise SlotStateError(f"cannot evict {self.describe(slot)}: it is not READY")
        self._check_evictable(slot, "evict")
        self._make_empty(slot)

    def _make_empty(self, slot: int) -> None:
        record = self.records[slot]
        record["state"] = EMPTY
        record["generation"] += 1
        record["expert"] = -1
        record["pinned"] = 0
        record["ready_bytes"] = 0

    # --- leases ------------------------------------------------------------------

    def lease(self, slot: int, worker: int) -> int:
        """Add one lease of `worker` on a READY slot; return the slot's generation."""
        self._check_slot(slot)
        self._check_worker(worker)
        if self.state(slot) != READY:
            raise SlotStateError(f"cannot lease {self.describe(slot)} to worker {worker}: it is not READY")
        record = self.records[slot]
        if record["worker_leases"][worker] >= MAX_LEASES_PER_WORKER:
            raise SlotStateError(
                f"cannot lease {self.describe(slot)} to worker {worker}: it already has "
                f"{MAX_LEASES_PER_WORKER} leases on it, the maximum"
            )
        record["worker_leases"][worker] += 1
        record["lease_mask"] |= np.uint64(1 << worker)
        record["lease_count"] += 1
        return int(record["generation"])

    def release(self, slot: int, worker: int, generation: int) -> None:
        """Drop one lease of `worker` on `slot`, granted at `generation`."""
        self._check_slot(slot)
        self._check_worker(worker)
        record = self.records[slot]
        if int(record["generation"]) != generation:
            raise SlotStateError(
                f"cannot release {self.describe(slot)} for worker {worker}: the lease was granted "
                f"at generation {generation}"
            )
        if record["worker_leases"][worker] == 0:
            raise SlotStateError(f"cannot release {self.describe(slot)} for worker {worker}: the worker has no lease on it")
        record["worker_leases"][worker] -= 1
        if record["worker_leases"][worker] == 0:
            record["lease_mask"] &= ~np.uint64(1 << worker)
        record["lease_count"] -= 1

    def reclaim(self, worker: int) -> int:
        """Drop every lease of `worker` (a dead worker); return how many were dropped."""
        self._check_worker(worker)
        bit = np.uint64(1 << worker)
        dropped = 0
        for slot in np.flatnonzero(self.records["lease_mask"] & bit):
            record = self.records[slot]
            count = int(record["worker_leases"][worker])
            record["worker_leases"][worker] = 0
            record["lease_mask"] &= ~bit
            record["lease_count"] -= count
            dropped += count
        return dropped

    # --- bookkeeping ---------------------------------------------------------------

    def set_pinned(self, slot: int, pinned: bool) -> None:
        """Pin or unpin a LOADING or READY slot."""
        self._check_slot(slot)
        if self.state(slot) == EMPTY:
            raise SlotStateError(f"cannot pin {self.describe(slot)}: it is EMPTY")
        self.records[slot]["pinned"] = int(pinned)

    def touch(self, slot: int) -> int:
        """Advance the header tick and stamp it as the slot's last use; return the tick."""
        self._check_slot(slot)
        self.header["tick"] += 1
        tick = int(self.header["tick"])
        self.records[slot]["last_use"] = tick
        return tick


class SlotPool:
    """Both segments of a pool, mapped into this process."""

    def __init__(
        self,
        data_name: str,
        table_name: str,
        data_memory: posix_ipc.SharedMemory,
        table_memory: posix_ipc.SharedMemory,
    ) -> None:
        self.data_name = data_name
        self.table_name = table_name
        self._data_map = _map(data_memory)
        self._table_map = _map(table_memory)
        self.table = SlotTable(self._table_map)
        self.n_slots = self.table.n_slots
        self.slot_bytes = int(self.table.header["slot_bytes"])
        self._data_view = memoryview(self._data_map)
        data_size = self._data_map.size()
        if data_size < self.n_slots * self.slot_bytes:
            self.close()
            raise SlotPoolError(
                f"data segment {data_name} has {data_size} bytes, less than "
                f"{self.n_slots} slots x {self.slot_bytes} bytes"
            )

    @classmethod
    def create(cls, data_name: str, table_name: str, n_slots: int, slot_bytes: int) -> "SlotPool":
        """Create both segments (mode 0600); raise SlotPoolError if either name exists."""
        if n_slots <= 0:
            raise SlotPoolError(f"n_slots {n_slots} must be positive")
        if slot_bytes <= 0 or slot_bytes % PAGE_BYTES:
            raise SlotPoolError(f"slot_bytes {slot_bytes} must be a positive multiple of {PAGE_BYTES}")
        data_memory = _create_segment(data_name, n_slots * slot_bytes)
        try:
            table_memory = _create_segment(table_name, table_bytes(n_slots))
        except SlotPoolError:
            posix_ipc.unlink_shared_memory(data_name)
            raise
        table_map = _map(table_memory, close_fd=False)
        header = np.ndarray((), dtype=HEADER_DTYPE, buffer=table_map)
        header["n_slots"] = n_slots
        header["slot_bytes"] = slot_bytes
        records = np.ndarray((n_slots,), dtype=SLOT_DTYPE, buffer=table_map, offset=HEADER_BYTES)
        records["expert"] = -1
        # The magic is written last, so attach rejects a table that is not yet initialized.
        header["version"] = TABLE_VERSION
        header["magic"] = TABLE_MAGIC
        del header, records
        table_map.close()
        log.info(
            "slot pool created data=%s table=%s slots=%d slot_bytes=%d", data_name, table_name, n_slots, slot_bytes
        )
        return cls(data_name, table_name, data_memory, table_memory)

    @classmethod
    def attach(cls, data_name: str, table_name: str) -> "SlotPool":
        """Map an existing pool; raise SlotPoolError if a segment is missing or not a slot table."""
        try:
            table_memory = posix_ipc.SharedMemory(table_name)
            data_memory = posix_ipc.SharedMemory(data_name)
        except posix_ipc.ExistentialError as exc:
            raise SlotPoolError(
                f"slot pool segment not found ({exc}); the launcher creates the pool before it starts the daemons"
            ) from exc
        if table_memory.size < HEADER_BYTES:
            raise SlotPoolError(f"table segment {table_name} has {table_memory.size} bytes, less than a header")
        header = np.frombuffer(os.pread(table_memory.fd, HEADER_BYTES, 0), dtype=HEADER_DTYPE)[0]
        if header["magic"] != TABLE_MAGIC or header["version"] != TABLE_VERSION:
            raise SlotPoolError(
                f"table segment {table_name} is not a MER slot table of version {TABLE_VERSION} "
                f"(magic={int(header['magic']):#x} version={int(header['version'])})"
            )
        if table_memory.size < table_bytes(int(header["n_slots"])):
            raise SlotPoolError(
                f"table segment {table_name} has {table_memory.size} bytes, less than "
                f"{table_bytes(int(header['n_slots']))} for {int(header['n_slots'])} slots"
            )
        return cls(data_name, table_name, data_memory, table_memory)

    def slot_view(self, slot: int) -> memoryview:
        """Return the slot's bytes (uint8, slot_bytes long), mapped, not copied."""
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"slot {slot} is outside 0..{self.n_slots - 1}")
        start = slot * self.slot_bytes
        return self._data_view[start : start + self.slot_bytes]

    def close(self) -> None:
        """Unmap both segments. Every view from slot_view must be released first."""
        self.table = None  # type: ignore[assignment]
        self._data_view.release()
        self._data_map.close()
        self._table_map.close()

    def unlink(self) -> None:
        """Remove both names from /dev/shm; mappings stay valid until closed."""
        for name in (self.data_name, self.table_name):
            unlink_segment(name)


def unlink_segment(name: str) -> bool:
    """Remove one segment name; return False if it did not exist."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True


def _create_segment(name: str, size: int) -> posix_ipc.SharedMemory:
    try:
        return posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    except posix_ipc.ExistentialError as exc:
        raise SlotPoolError(
            f"shared memory {name} already exists; another pipeline uses this name, or a crashed "
            f"one left it behind (remove /dev/shm{name} if no pipeline is running)"
        ) from exc


def _map(memory: posix_ipc.SharedMemory, close_fd: bool = True) -> mmap.mmap:
    mapping = mmap.mmap(memory.fd, memory.size)
    if close_fd:
        memory.close_fd()
    return mapping
