"""The I/O daemon: the only writer of the slot pool.

It serves, on a ROUTER socket at SOCKET_DIR/io.sock:

    LeaseRequest  -> LeaseGranted at once on a hit; on a miss after a demand read, or
                     LeaseFailed (bad id, read error, checksum mismatch, time-out). With
                     `stream`, a miss first gets LoadStarted when its read is in flight;
                     the slot's ready_bytes then counts the region's bytes that have arrived
    Release       drops one lease (no reply)
    PrefetchHint  loads an expert early when a slot is free or its victim is needed
                  later than the hint (no reply)
    ReclaimLeases drops every lease of a dead worker (no reply)
    StatsRequest  -> StatsReply with counters and the io_queue, io_device and slot_ready
                     histograms
    SpansRequest  -> SpansReply with the last spans: one "read" span per expert read
    Shutdown      stops the daemon (no reply)

At most one read per expert is in flight. Requests for an expert that is being read
wait on that read, and all of them are granted when it completes. A request that finds no evictable
slot (all leased, pinned or loading) waits until a lease is released, at most
runtime.request_timeout_s.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from mer_pipeline import runtime, wire
from mer_pipeline.eviction import EvictionPolicy, make_policy
from mer_pipeline.expert_reader import DEMAND, PREFETCH, ExpertRead, ExpertReader
from mer_pipeline.histograms import StageHistograms
from mer_pipeline.observe.spans import SpanRecorder
from mer_pipeline.slot_pool import EMPTY, LOADING, MAX_WORKERS, READY, SlotPool, SlotStateError
from mer_pipeline.store import Store, checksum_hasher, open_store

log = logging.getLogger(__name__)

ACCEPTED = (
    wire.LeaseRequest, wire.Release, wire.PrefetchHint, wire.ReclaimLeases, wire.StatsRequest, wire.SpansRequest, wire.Shutdown
)
# Messages handled per loop turn before completions are reaped again.
MAX_MESSAGES_PER_TURN = 256
POLL_INTERVAL_MS = 500
# Weight of the newest value in the read-time and layer-step moving averages.
EWMA_WEIGHT = 0.1
STEP_IDLE_US = 2_000_000
COUNTER_NAMES = (
    "lookups",
    "hits",
    "misses",
    "prefetch_hints",
    "prefetch_issued",
    "prefetch_useful",
    "prefetch_wasted",
    "prefetch_late",
    "prefetch_skipped",
    # Hints not started: the prefetch reads in flight reached io.prefetch_max_inflight, or
    # the read could not finish before its layer step (io.prefetch_deadline_slack).
    "prefetch_skipped_inflight",
    "prefetch_skipped_late",
    # Lookups that would miss without prefetch: the prefetch had finished (hidden), was
    # still reading (partly hidden), or was never started (not hidden).
    "misses_hidden",
    "misses_partly_hidden",
    "misses_not_hidden",
    "evictions",
    "lease_failed",
    "read_errors",
    "checksum_errors",
    "bad_messages",
    "release_errors",
    "slot_waits",
    # LoadStarted replies sent to streaming lease requests.
    "loads_started_sent",
)


class DaemonError(RuntimeError):
    """A pool, store or config that the I/O daemon cannot start with."""


@dataclasses.dataclass
class Waiter:
    """A LeaseRequest without a reply yet."""

    envelope: list[bytes]
    request_id: int
    worker: int
    expert: int
    received_ns: int
    deadline_s: float
    stream: bool = False


@dataclasses.dataclass
class Load:
    """A read in flight into `slot`."""

    slot: int
    read: ExpertRead
    waiters: list[Waiter]
    prefetch: bool
    generation: int
    # When the hint that started this read arrived (monotonic ns); 0 for a demand read.
    hint_ns: int = 0
    # ready_bytes last written to the slot table.
    published_bytes: int = 0
    # The checksum of the region's prefix, updated as the prefix grows, so that little
    # is left to hash when the read completes.
    hasher: Any = dataclasses.field(default_factory=checksum_hasher)
    hashed_bytes: int = 0


class IoDaemon:
    def __init__(self, info: runtime.PipelineInfo) -> None:
        self.info = info
        self.config = info.config
        self.warn = runtime.RateLimitedWarning(log)
        self.store: Store = open_store(info.store)
        self.pool = SlotPool.attach(info.pool_data_name, info.pool_table_name)
        self.table = self.pool.table
        if self.pool.slot_bytes < self.store.region_bytes:
            raise DaemonError(
                f"pool slot_bytes ({self.pool.slot_bytes}) is smaller than the store's expert region "
                f"({self.store.region_bytes} bytes); recreate the pool for this store"
            )
        shape = self.store.shape
        self.policy: EvictionPolicy = make_policy(self.config.io.eviction, shape.n_layers, shape.n_experts)
        self.reader = ExpertReader(self.config.io, _data_paths(self.store))
        self.histograms = StageHistograms()
        self.spans = SpanRecorder("io")
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.pinned_experts = set(self.config.pool.pinned)
        self.slot_of: dict[int, int] = {}
        self.loads: dict[int, Load] = {}
        # Slot of a finished prefetch not yet demanded -> when its hint arrived (monotonic ns).
        self.prefetched_unused: dict[int, int] = {}
        # Moving averages that decide whether a prefetch can finish in time: the device
        # time of one expert read, and the time between lease requests of two layers.
        self.read_ewma_us = 0.0
        self.step_ewma_us = 0.0
        self.last_step_layer = -1
        self.last_step_ns = 0
        self.waiting: collections.deque[Waiter] = collections.deque()
        self.socket: zmq.Socket | None = None
        self.stopping = False

    # --- start ---------------------------------------------------------------------

    def adopt_table(self) -> None:
        """Take over the table of a previous daemon: keep READY slots, reset LOADING ones."""
        reset = kept = 0
        for slot in range(self.table.n_slots):
            state = self.table.state(slot)
            if state == LOADING:
                self.table.fail_load(slot)
                reset += 1
            elif state == READY:
                expert = self.table.expert(slot)
                if expert >= self.store.n_experts_total or expert in self.slot_of:
                    self._drop_adopted(slot, expert)
                    continue
                self.slot_of[expert] = slot
                self.table.set_pinned(slot, expert in self.pinned_experts)
                kept += 1
        leased = int(np.count_nonzero(self.table.records["lease_count"]))
        log.info("table adopted ready=%d reset_loading=%d leased_slots=%d", kept, reset, leased)

    def _drop_adopted(self, slot: int, expert: int) -> None:
        try:
            self.table.set_pinned(slot, False)
            self.table.evict(slot)
        except SlotStateError as exc:
            log.error("adopted slot cannot be dropped slot=%d expert=%d error=%s", slot, expert, exc)

    def load_pinned(self) -> None:
        """Load every pinned expert that is not already in the pool, and wait for the reads."""
        if len(self.pinned_experts) > self.table.n_slots:
            raise DaemonError(
                f"pool.pinned lists {len(self.pinned_experts)} experts but the pool has only "
                f"{self.table.n_slots} slots"
            )
        for expert in sorted(self.pinned_experts):
            if not 0 <= expert < self.store.n_experts_total:
                raise DaemonError(f"pool.pinned expert id {expert} is outside 0..{self.store.n_experts_total - 1}")
            if expert in self.slot_of:
                continue
            slot = self._acquire_slot()
            if slot is None:
                raise DaemonError(f"no free slot for pinned expert {expert}; all slots are leased or pinned")
            self._start_load(expert, slot, DEMAND, [])
        timeout_s = self.config.runtime.request_timeout_s
        if not self.reader.wait_idle(timeout_s, self._on_read_finished):
            raise DaemonError(f"pinned experts did not load within runtime.request_timeout_s={timeout_s} s")
        failed = sorted(self.pinned_experts - set(self.slot_of))
        if failed:
            raise DaemonError(f"pinned experts {failed} failed to load; see the errors above")
        if self.pinned_experts:
            log.info("pinned experts loaded count=%d", len(self.pinned_experts))

    def bind(self, context: zmq.Context) -> None:
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.socket.bind(self.info.endpoint(runtime.IO_SOCKET))

    # --- main loop -----------------------------------------------------------------

    def run(self, wakeup_fd: int | None = None) -> None:
        assert self.socket is not None
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.reader.fileno(), zmq.POLLIN)
        if wakeup_fd is not None:
            poller.register(wakeup_fd, zmq.POLLIN)
        while not self.stopping:
            events = dict(poller.poll(self._poll_timeout_ms()))
            if wakeup_fd is not None and wakeup_fd in events:
                _drain_fd(wakeup_fd)
            if self.reader.fileno() in events:
                for read in self.reader.reap():
                    self._on_read_finished(read)
                self._publish_progress()
            if self.socket in events:
                self._handle_messages()
            self._expire_waiters()
            if not runtime.parent_alive(self.info.launcher_pid):
                log.warning("launcher exited, stopping launcher_pid=%d", self.info.launcher_pid)
                self.stopping = True

    def _poll_timeout_ms(self) -> int:
        deadlines = [w.deadline_s for w in self.waiting]
        deadlines += [w.deadline_s for load in self.loads.values() for w in load.waiters]
        if not deadlines:
            return POLL_INTERVAL_MS
        until_ms = int((min(deadlines) - time.monotonic()) * 1000) + 1
        return max(0, min(POLL_INTERVAL_MS, until_ms))

    def _handle_messages(self) -> None:
        assert self.socket is not None
        for _ in range(MAX_MESSAGES_PER_TURN):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            envelope, payload = frames[:-1], frames[-1]
            try:
                message = wire.decode(payload, ACCEPTED)
            except wire.WireError as exc:
                self.counters["bad_messages"] += 1
                self.warn.warning("message", "message rejected error=%s", exc)
                continue
            self._dispatch(envelope, message)
            if self.stopping:
                return

    def _dispatch(self, envelope: list[bytes], message: wire.Message) -> None:
        if isinstance(message, wire.LeaseRequest):
            self._on_lease_request(envelope, message)
        elif isinstance(message, wire.Release):
            self._on_release(message)
        elif isinstance(message, wire.PrefetchHint):
            self._on_prefetch_hint(message)
        elif isinstance(message, wire.ReclaimLeases):
            self._on_reclaim(message)
        elif isinstance(message, wire.StatsRequest):
            self._send(envelope, self.stats_reply(message.request_id))
        elif isinstance(message, wire.SpansRequest):
            self._send(envelope, self.spans.reply(message))
        elif isinstance(message, wire.Shutdown):
            log.info("shutdown requested request_id=%d", message.request_id)
            self.stopping = True

    def _send(self, envelope: list[bytes], message: wire.Message) -> None:
        assert self.socket is not None
        try:
            self.socket.send_multipart([*envelope, message.encode()], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("reply not sent type=%s error=%s", message.TYPE, exc)

    # --- leases --------------------------------------------------------------------

    def _on_lease_request(self, envelope: list[bytes], request: wire.LeaseRequest) -> None:
        self.counters["lookups"] += 1
        if not 0 <= request.worker < MAX_WORKERS:
            self._reject(envelope, request.request_id, request.expert, f"worker index {request.worker} is outside 0..{MAX_WORKERS - 1}")
            return
        if not 0 <= request.expert < self.store.n_experts_total:
            self._reject(
                envelope,
                request.request_id,
                request.expert,
                f"expert id {request.expert} is outside 0..{self.store.n_experts_total - 1}",
            )
            return
        self.policy.record_access(request.expert)
        self._time_layer_step(request.expert)
        waiter = Waiter(
            envelope,
            request.request_id,
            request.worker,
            request.expert,
            time.monotonic_ns(),
            time.monotonic() + self.config.runtime.request_timeout_s,
            request.stream,
        )
        slot = self.slot_of.get(request.expert)
        if slot is not None and self.table.state(slot) == READY:
            self.counters["hits"] += 1
            hint_ns = self.prefetched_unused.pop(slot, None)
            if hint_ns is not None:
                self.counters["prefetch_useful"] += 1
                self.counters["misses_hidden"] += 1
                self.histograms.record_us("prefetch_lead", (time.monotonic_ns() - hint_ns) / 1000)
            self._grant(waiter, slot, hit=True)
            return
        self.counters["misses"] += 1
        load = self.loads.get(request.expert)
        if load is not None and load.prefetch:
            self.counters["misses_partly_hidden"] += 1
            self.histograms.record_us("prefetch_lead", (time.monotonic_ns() - load.hint_ns) / 1000)
        else:
            self.counters["misses_not_hidden"] += 1
        self._serve_miss(waiter)

    def _serve_miss(self, waiter: Waiter) -> None:
        """Join the expert's read in flight, start a demand read, or wait for a free slot."""
        load = self.loads.get(waiter.expert)
        if load is not None:
            if load.prefetch:
                load.prefetch = False
                self.counters["prefetch_late"] += 1
                self.reader.promote(load.read)
            load.waiters.append(waiter)
            self._send_load_started(waiter, load)
            return
        slot = self._acquire_slot()
        if slot is None:
            self.counters["slot_waits"] += 1
            self.waiting.append(waiter)
            return
        self._start_load(waiter.expert, slot, DEMAND, [waiter])

    def _send_load_started(self, waiter: Waiter, load: Load) -> None:
        """Tell a streaming request that its expert's read is in flight into `load.slot`."""
        if not waiter.stream:
            return
        self.counters["loads_started_sent"] += 1
        self._send(waiter.envelope, wire.LoadStarted(waiter.request_id, waiter.expert, load.slot, load.generation))

    def _publish_progress(self) -> None:
        """Write each read's contiguous prefix to its slot's ready_bytes and hash the new bytes."""
        for load in self.loads.values():
            ready_bytes = load.read.ready_bytes
            if ready_bytes > load.published_bytes:
                self.table.set_ready_bytes(load.slot, ready_bytes)
                load.published_bytes = ready_bytes
                self._hash_prefix(load, ready_bytes)

    def _hash_prefix(self, load: Load, end_bytes: int) -> None:
        """Add the slot's bytes from load.hashed_bytes to `end_bytes` to the load's checksum."""
        if end_bytes <= load.hashed_bytes:
            return
        view = self.pool.slot_view(load.slot)
        try:
            load.hasher.update(view[load.hashed_bytes : end_bytes])
        finally:
            view.release()
        load.hashed_bytes = end_bytes

    def _grant(self, waiter: Waiter, slot: int, hit: bool) -> None:
        generation = self.table.lease(slot, waiter.worker)
        self.table.touch(slot)
        wait_us = (time.monotonic_ns() - waiter.received_ns) // 1000
        self._send(
            waiter.envelope,
            wire.LeaseGranted(waiter.request_id, waiter.expert, slot, generation, hit, wait_us),
        )

    def _reject(self, envelope: list[bytes], request_id: int, expert: int, error: str) -> None:
        self.counters["lease_failed"] += 1
        self._send(envelope, wire.LeaseFailed(request_id, expert, error))

    def _on_release(self, message: wire.Release) -> None:
        try:
            self.table.release(message.slot, message.worker, message.generation)
        except SlotStateError as exc:
            self.counters["release_errors"] += 1
            self.warn.warning("release", "release rejected worker=%d slot=%d error=%s", message.worker, message.slot, exc)
            return
        self._serve_waiting()

    def _on_reclaim(self, message: wire.ReclaimLeases) -> None:
        try:
            dropped = self.table.reclaim(message.worker)
        except SlotStateError as exc:
            self.warn.warning("reclaim", "reclaim rejected worker=%d error=%s", message.worker, exc)
            return
        log.info("leases reclaimed worker=%d leases=%d", message.worker, dropped)
        self._serve_waiting()

    def _serve_waiting(self) -> None:
        while self.waiting:
            waiter = self.waiting[0]
            if waiter.expert in self.loads or waiter.expert in self.slot_of:
                self.waiting.popleft()
                slot = self.slot_of.get(waiter.expert)
                if slot is not None and self.table.state(slot) == READY:
                    self._grant(waiter, slot, hit=False)
                else:
                    self._serve_miss(waiter)
                continue
            slot = self._acquire_slot()
            if slot is None:
                return
            self.waiting.popleft()
            self._start_load(waiter.expert, slot, DEMAND, [waiter])

    def _expire_waiters(self) -> None:
        now_s = time.monotonic()
        timeout_s = self.config.runtime.request_timeout_s
        expired = [w for w in self.waiting if w.deadline_s <= now_s]
        for waiter in expired:
            self.waiting.remove(waiter)
            self._reject(
                waiter.envelope,
                waiter.request_id,
                waiter.expert,
                f"no slot for expert {waiter.expert} within runtime.request_timeout_s={timeout_s} s: "
                f"all {self.table.n_slots} slots are leased, pinned or loading; raise pool.slots or "
                "release leases sooner",
            )
        for load in self.loads.values():
            late = [w for w in load.waiters if w.deadline_s <= now_s]
            for waiter in late:
                load.waiters.remove(waiter)
                self._reject(
                    waiter.envelope,
                    waiter.request_id,
                    waiter.expert,
                    f"read of expert {waiter.expert} did not finish within runtime.request_timeout_s={timeout_s} s",
                )
        if expired:
            log.warning("lease requests timed out waiting for a slot count=%d timeout_s=%s", len(expired), timeout_s)

    # --- slots and reads -----------------------------------------------------------

    def _acquire_slot(self, needed_within_steps: float | None = None) -> int | None:
        """Return an EMPTY slot, or evict the policy's victim; None if nothing can be freed.

        With `needed_within_steps` (a prefetch), a victim is taken only if the policy
        expects it to be used later than that.
        """
        records = self.table.records
        empty = np.flatnonzero(records["state"] == EMPTY)
        if len(empty):
            return int(empty[0])
        evictable = np.flatnonzero((records["state"] == READY) & (records["lease_count"] == 0) & (records["pinned"] == 0))
        if not len(evictable):
            return None
        experts = [int(records["expert"][slot]) for slot in evictable]
        victim = self.policy.choose_victim(experts)
        if needed_within_steps is not None and self.policy.reuse_distance_steps(victim) <= needed_within_steps:
            return None
        slot = self.slot_of.pop(victim)
        self.policy.forget(victim)
        self.counters["evictions"] += 1
        if self.prefetched_unused.pop(slot, None) is not None:
            self.counters["prefetch_wasted"] += 1
        return slot

    def _start_load(self, expert: int, slot: int, priority: int, waiters: list[Waiter]) -> None:
        entry = self.store.entry(expert)
        generation = self.table.begin_load(slot, expert)
        if expert in self.pinned_experts:
            self.table.set_pinned(slot, True)
        self.slot_of[expert] = slot
        read = ExpertRead(
            tag=expert,
            path=self.store.data_path(entry),
            offset=entry.offset,
            length=entry.length,
            dest=self.pool.slot_view(slot),
            priority=priority,
        )
        load = self.loads[expert] = Load(slot, read, waiters, prefetch=priority == PREFETCH, generation=generation)
        self.reader.submit(read)
        for waiter in waiters:
            self._send_load_started(waiter, load)

    def _on_read_finished(self, read: ExpertRead) -> None:
        expert = read.tag
        load = self.loads.pop(expert)
        slot = load.slot
        self.histograms.record_us("io_queue", (read.submitted_ns - read.queued_ns) / 1000)
        self.histograms.record_us("io_device", (read.completed_ns - read.submitted_ns) / 1000)
        error = read.error
        verify_started_ns = time.monotonic_ns()
        if error is not None:
            self.counters["read_errors"] += 1
        else:
            error = self._verify(expert, load)
        self.spans.record(
            "read",
            read.queued_ns,
            max(read.completed_ns, read.queued_ns),
            expert=expert,
            slot=slot,
            bytes=read.length,
            hint_ns=load.hint_ns,
            demands=[[waiter.worker, waiter.request_id] for waiter in load.waiters],
            # Checksum time after the last byte arrived: the part not hashed during the read.
            verify_tail_us=(time.monotonic_ns() - verify_started_ns) // 1000,
            error=error or "",
        )
        if error is not None:
            self.table.fail_load(slot)
            del self.slot_of[expert]
            message = f"{self._describe_expert(expert)}: {error}"
            log.error("expert load failed %s", message)
            for waiter in load.waiters:
                self._reject(waiter.envelope, waiter.request_id, expert, message)
            self._serve_waiting()
            return
        self.table.finish_load(slot)
        if load.prefetch and not load.waiters:
            self.prefetched_unused[slot] = load.hint_ns
        if load.prefetch:
            self.histograms.record_us("prefetch_read", (read.completed_ns - read.queued_ns) / 1000)
        self.read_ewma_us = _ewma(self.read_ewma_us, (read.completed_ns - read.submitted_ns) / 1000)
        completed_ns = time.monotonic_ns()
        for waiter in load.waiters:
            self._grant(waiter, slot, hit=False)
            self.histograms.record_us("slot_ready", (time.monotonic_ns() - completed_ns) / 1000)

    def _verify(self, expert: int, load: Load) -> str | None:
        """Finish the load's checksum over the whole region; return an error if it does not match."""
        entry = self.store.entry(expert)
        self._hash_prefix(load, entry.length)
        actual = load.hasher.hexdigest()
        if actual != entry.checksum:
            self.counters["checksum_errors"] += 1
            return (
                f"checksum {actual} does not match the manifest's {entry.checksum}; the store is damaged. "
                "Run `mer store verify` to list every bad expert, then import or synthesize the store again"
            )
        return None

    def _describe_expert(self, expert: int) -> str:
        entry = self.store.entry(expert)
        return (
            f"expert {expert} (layer {entry.layer}, expert {entry.expert}) in "
            f"{self.store.data_path(entry)} at offset {entry.offset}"
        )

    # --- prefetch ------------------------------------------------------------------

    def _on_prefetch_hint(self, hint: wire.PrefetchHint) -> None:
        self.counters["prefetch_hints"] += 1
        if not 0 <= hint.expert < self.store.n_experts_total:
            self.counters["bad_messages"] += 1
            self.warn.warning("hint", "prefetch hint rejected expert=%d error=expert id out of range", hint.expert)
            return
        if hint.expert in self.slot_of or self.waiting:
            # Already cached or loading, or demand requests are waiting for slots.
            self.counters["prefetch_skipped"] += 1
            return
        prefetches_in_flight = sum(1 for load in self.loads.values() if load.prefetch)
        if prefetches_in_flight >= self.config.io.prefetch_max_inflight:
            self.counters["prefetch_skipped_inflight"] += 1
            return
        if not self._prefetch_in_time(hint.steps_ahead):
            self.counters["prefetch_skipped_late"] += 1
            return
        slot = self._acquire_slot(needed_within_steps=max(hint.steps_ahead, 0))
        if slot is None:
            self.counters["prefetch_skipped"] += 1
            return
        self.counters["prefetch_issued"] += 1
        self._start_load(hint.expert, slot, PREFETCH, [])
        self.loads[hint.expert].hint_ns = time.monotonic_ns()

    def _prefetch_in_time(self, steps_ahead: int) -> bool:
        """Estimate whether a read started now, behind the reads in flight, finishes before
        `steps_ahead` layer steps have passed; True until both times have been measured."""
        slack = self.config.io.prefetch_deadline_slack
        if slack <= 0 or not self.read_ewma_us or not self.step_ewma_us:
            return True
        # Reads share the device, so the reads in flight finish before this one (an estimate).
        finish_us = (len(self.loads) + 1) * self.read_ewma_us
        return finish_us <= max(steps_ahead, 0) * self.step_ewma_us * slack

    def _time_layer_step(self, expert: int) -> None:
        """Update the time between layer steps from a lease request's layer."""
        layer = expert // self.store.shape.n_experts
        if layer == self.last_step_layer:
            return
        now_ns = time.monotonic_ns()
        interval_us = (now_ns - self.last_step_ns) / 1000
        # A pause longer than this is idle time between runs, not a layer step.
        if self.last_step_ns and interval_us < STEP_IDLE_US:
            self.step_ewma_us = _ewma(self.step_ewma_us, interval_us)
        self.last_step_layer = layer
        self.last_step_ns = now_ns

    # --- stats and stop ------------------------------------------------------------

    def stats_reply(self, request_id: int) -> wire.StatsReply:
        reader_stats = dataclasses.asdict(self.reader.stats)
        states = self.table.records["state"]
        counters = {
            **self.counters,
            **reader_stats,
            "io_path": self.reader.io_path,
            "pool_slots": self.table.n_slots,
            "pinned": int(np.count_nonzero(self.table.records["pinned"])),
            "slots_ready": int(np.count_nonzero(states == READY)),
            "slots_loading": int(np.count_nonzero(states == LOADING)),
            "requests_waiting_for_slot": len(self.waiting),
        }
        return wire.StatsReply(request_id, "io", counters, self.histograms.encode())

    def stop(self) -> None:
        """Finish reads in flight, fail every unanswered request, and release the pool."""
        stop_timeout_s = self.config.runtime.stop_timeout_s
        for read in self.reader.cancel_queued():
            self._on_read_finished(read)
        if not self.reader.wait_idle(stop_timeout_s, self._on_read_finished):
            log.warning("reads still in flight at stop timeout_s=%s", stop_timeout_s)
        for expert in list(self.loads):
            load = self.loads.pop(expert)
            self.table.fail_load(load.slot)
            self.slot_of.pop(expert, None)
            for waiter in load.waiters:
                self._reject(waiter.envelope, waiter.request_id, expert, "the I/O daemon is stopping")
        for waiter in self.waiting:
            self._reject(waiter.envelope, waiter.request_id, waiter.expert, "the I/O daemon is stopping")
        self.waiting.clear()
        if self.socket is not None:
            self.socket.close(linger=0)
        self.reader.close()
        self.table = None  # type: ignore[assignment]
        self.pool.close()


def _ewma(average: float, value: float) -> float:
    """Return the moving average updated with `value`; the first value starts it."""
    return value if not average else average + EWMA_WEIGHT * (value - average)


def _drain_fd(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _data_paths(store: Store) -> list[Path]:
    return sorted({store.data_path(entry) for entry in store.experts})
