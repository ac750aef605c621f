import os
import stat

import numpy as np
import pytest

from mer_pipeline import slot_pool
from mer_pipeline.slot_pool import EMPTY, LOADING, READY, SlotPool, SlotPoolError, SlotStateError


@pytest.fixture
def pool():
    data_name, table_name = slot_pool.pool_names("test")
    created = SlotPool.create(data_name, table_name, n_slots=4, slot_bytes=8192)
    try:
        yield created
    finally:
        created.unlink()
        created.close()


def snapshot(pool: SlotPool) -> tuple[bytes, bytes]:
    return pool.table.header.tobytes(), pool.table.records.tobytes()


def make_ready(pool: SlotPool, slot: int, expert: int) -> int:
    generation = pool.table.begin_load(slot, expert)
    pool.table.finish_load(slot)
    return generation


def test_table_layout_offsets():
    header = slot_pool.HEADER_DTYPE
    record = slot_pool.SLOT_DTYPE
    assert header.itemsize == 64
    assert {name: header.fields[name][1] for name in header.names} == {
        "magic": 0,
        "version": 4,
        "n_slots": 8,
        "slot_bytes": 16,
        "tick": 24,
    }
    assert record.itemsize == 128
    assert {name: record.fields[name][1] for name in record.names} == {
        "expert": 0,
        "state": 4,
        "generation": 8,
        "lease_mask": 16,
        "lease_count": 24,
        "pinned": 28,
        "last_use": 32,
        "ready_bytes": 40,
        "worker_leases": 64,
    }
    assert slot_pool.table_bytes(3) == 64 + 3 * 128


def test_create_writes_header_and_empty_slots(pool):
    header = pool.table.header
    assert int(header["magic"]) == slot_pool.TABLE_MAGIC
    assert int(header["version"]) == slot_pool.TABLE_VERSION
    assert int(header["n_slots"]) == 4
    assert int(header["slot_bytes"]) == 8192
    assert list(pool.table.records["expert"]) == [-1, -1, -1, -1]
    assert list(pool.table.records["state"]) == [EMPTY] * 4


def test_segments_have_mode_0600(pool):
    for name in (pool.data_name, pool.table_name):
        mode = stat.S_IMODE(os.stat(f"/dev/shm{name}").st_mode)
        assert mode == 0o600, f"{name} has mode {mode:o}"


def test_create_rejects_existing_name(pool):
    with pytest.raises(SlotPoolError, match="already exists"):
        SlotPool.create(pool.data_name, pool.table_name + "-other", 1, 4096)
    assert not os.path.exists(f"/dev/shm{pool.table_name}-other")


def test_create_rejects_unaligned_slot_bytes():
    data_name, table_name = slot_pool.pool_names("test")
    with pytest.raises(SlotPoolError, match="multiple of 4096"):
        SlotPool.create(data_name, table_name, 2, 5000)
    assert not os.path.exists(f"/dev/shm{data_name}")


def test_pool_names_unique():
    first = slot_pool.pool_names("p")
    second = slot_pool.pool_names("p")
    assert first != second
    assert first[0].startswith(f"/mer-p-{os.getuid()}-{os.getpid()}-")
    assert first[0].endswith("-data")
    assert first[1].endswith("-table")


def test_attach_shares_data_and_table(pool):
    other = SlotPool.attach(pool.data_name, pool.table_name)
    try:
        view = pool.slot_view(2)
        view[:5] = b"hello"
        generation = make_ready(pool, 2, 17)
        assert bytes(other.slot_view(2)[:5]) == b"hello"
        assert other.table.expert(2) == 17
        assert other.table.state(2) == READY
        assert other.table.generation(2) == generation
        assert other.slot_bytes == 8192
        assert other.n_slots == 4
        view.release()
    finally:
        other.close()


def test_attach_missing_segment_fails():
    with pytest.raises(SlotPoolError, match="not found"):
        SlotPool.attach("/mer-test-missing-data", "/mer-test-missing-table")


def test_slot_views_page_aligned(pool):
    for slot in range(pool.n_slots):
        view = pool.slot_view(slot)
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
        assert address % 4096 == 0
        assert len(view) == 8192
        view.release()
    with pytest.raises(IndexError):
        pool.slot_view(4)


def test_legal_transitions_full_cycle(pool):
    table = pool.table
    generation = table.begin_load(0, 5)
    assert (table.state(0), table.expert(0), table.generation(0)) == (LOADING, 5, 1)
    assert generation == 1
    table.finish_load(0)
    assert (table.state(0), table.expert(0), table.generation(0)) == (READY, 5, 1)

    # Eviction: READY -> LOADING for another expert bumps the generation.
    assert table.begin_load(0, 9) == 2
    assert (table.state(0), table.expert(0)) == (LOADING, 9)
    table.fail_load(0)
    assert (table.state(0), table.expert(0), table.generation(0)) == (EMPTY, -1, 3)

    make_ready(pool, 0, 11)
    table.evict(0)
    assert (table.state(0), table.expert(0), table.generation(0)) == (EMPTY, -1, 5)


def test_leases_and_release(pool):
    table = pool.table
    generation = make_ready(pool, 1, 3)
    assert table.lease(1, 0) == generation
    table.lease(1, 0)
    table.lease(1, 63)
    record = table.records[1]
    assert int(record["lease_count"]) == 3
    assert int(record["lease_mask"]) == (1 << 0) | (1 << 63)
    assert table.worker_lease_count(1, 0) == 2

    table.release(1, 0, generation)
    assert table.worker_lease_count(1, 0) == 1
    assert int(record["lease_mask"]) == (1 << 0) | (1 << 63)
    table.release(1, 63, generation)
    assert int(record["lease_mask"]) == 1
    assert int(record["lease_count"]) == 1


def test_reclaim_drops_only_that_worker(pool):
    table = pool.table
    make_ready(pool, 0, 1)
    make_ready(pool, 1, 2)
    for _ in range(3):
        table.lease(0, 7)
    table.lease(1, 7)
    table.lease(1, 8)
    assert table.reclaim(7) == 4
    assert int(table.records[0]["lease_count"]) == 0
    assert int(table.records[0]["lease_mask"]) == 0
    assert int(table.records[1]["lease_count"]) == 1
    assert int(table.records[1]["lease_mask"]) == 1 << 8
    assert table.reclaim(7) == 0


def test_pin_and_touch(pool):
    table = pool.table
    make_ready(pool, 2, 4)
    table.set_pinned(2, True)
    assert table.is_pinned(2)
    first = table.touch(2)
    second = table.touch(2)
    assert second == first + 1
    assert int(table.records[2]["last_use"]) == second
    assert int(table.header["tick"]) == second


def illegal_cases():
    """(name, setup, action) triples; each action must raise and change nothing."""

    def leased_ready(pool):
        make_ready(pool, 0, 1)
        pool.table.lease(0, 2)

    def pinned_ready(pool):
        make_ready(pool, 0, 1)
        pool.table.set_pinned(0, True)

    def loading(pool):
        pool.table.begin_load(0, 1)

    def ready(pool):
        make_ready(pool, 0, 1)

    def empty(pool):
        pass

    return [
        ("finish EMPTY", empty, lambda t: t.finish_load(0)),
        ("fail EMPTY", empty, lambda t: t.fail_load(0)),
        ("evict EMPTY", empty, lambda t: t.evict(0)),
        ("lease EMPTY", empty, lambda t: t.lease(0, 0)),
        ("pin EMPTY", empty, lambda t: t.set_pinned(0, True)),
        ("begin LOADING", loading, lambda t: t.begin_load(0, 2)),
        ("evict LOADING", loading, lambda t: t.evict(0)),
        ("lease LOADING", loading, lambda t: t.lease(0, 0)),
        ("finish READY", ready, lambda t: t.finish_load(0)),
        ("fail READY", ready, lambda t: t.fail_load(0)),
        ("reload leased", leased_ready, lambda t: t.begin_load(0, 2)),
        ("evict leased", leased_ready, lambda t: t.evict(0)),
        ("reload pinned", pinned_ready, lambda t: t.begin_load(0, 2)),
        ("evict pinned", pinned_ready, lambda t: t.evict(0)),
        ("release without lease", ready, lambda t: t.release(0, 3, 1)),
        ("release wrong generation", leased_ready, lambda t: t.release(0, 2, 99)),
        ("lease bad worker", ready, lambda t: t.lease(0, 64)),
        ("reclaim bad worker", ready, lambda t: t.reclaim(-1)),
        ("bad slot", ready, lambda t: t.begin_load(4, 1)),
        ("negative expert", empty, lambda t: t.begin_load(0, -1)),
    ]


@pytest.mark.parametrize("name,setup,action", illegal_cases(), ids=[case[0] for case in illegal_cases()])
def test_illegal_transition_changes_nothing(pool, name, setup, action):
    setup(pool)
    before = snapshot(pool)
    with pytest.raises(SlotStateError):
        action(pool.table)
    assert snapshot(pool) == before


def test_lease_count_limit_per_worker(pool):
    make_ready(pool, 0, 1)
    for _ in range(slot_pool.MAX_LEASES_PER_WORKER):
        pool.table.lease(0, 5)
    before = snapshot(pool)
    with pytest.raises(SlotStateError, match="maximum"):
        pool.table.lease(0, 5)
    assert snapshot(pool) == before


def test_unlink_removes_names():
    data_name, table_name = slot_pool.pool_names("test")
    pool = SlotPool.create(data_name, table_name, 1, 4096)
    pool.unlink()
    pool.close()
    assert not os.path.exists(f"/dev/shm{data_name}")
    assert not os.path.exists(f"/dev/shm{table_name}")
    assert slot_pool.unlink_segment(data_name) is False


def test_ready_bytes_only_grows_during_a_load(pool):
    table = pool.table
    generation = table.begin_load(1, 7)
    assert table.ready_bytes(1) == 0
    table.set_ready_bytes(1, 4096)
    table.set_ready_bytes(1, 8192)
    with pytest.raises(SlotStateError, match="back from 8192 to 4096"):
        table.set_ready_bytes(1, 4096)
    assert table.ready_bytes(1) == 8192
    table.finish_load(1)
    with pytest.raises(SlotStateError, match="not LOADING"):
        table.set_ready_bytes(1, 16384)
    # A reload starts from zero under a new generation; a failed load leaves zero.
    assert table.begin_load(1, 9) == generation + 1
    assert table.ready_bytes(1) == 0
    table.set_ready_bytes(1, 4096)
    table.fail_load(1)
    assert table.ready_bytes(1) == 0
