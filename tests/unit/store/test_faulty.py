"""The fault-injecting store's own model: faults, writeback failure, power cuts, tearing.

A checker that cannot fail proves nothing: each test here shows the store losing exactly what
a disk would lose, and keeping exactly what a disk would keep. (That it behaves like the store
it wraps when no fault is armed is in test_conformance.py.)
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from blockmirror.store.base import Buffer, Capabilities, Extent, Store
from blockmirror.store.faulty import CHANGES, PAGE, FaultyStore, Power
from blockmirror.store.volume import Volume

SIZE = 64 * PAGE


def page(value: int, n: int = 1) -> bytes:
    return bytes([value]) * (PAGE * n)


def pages_of(store: Store, first: int = 0, count: int = SIZE // PAGE) -> list[int]:
    """The first byte of each page (the tests write whole pages of one value)."""
    data = store.pread(first * PAGE, count * PAGE)
    return [data[i * PAGE] for i in range(count)]


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    with Volume.open(tmp_path / "v.img", size=SIZE) as vol:
        yield vol


def reopen(tmp_path: Path) -> Volume:
    """What a restarted machine reads from the file."""
    return Volume.open(tmp_path / "v.img", size=SIZE, create=False)


def test_a_power_cut_loses_what_no_flush_covered(volume: Volume, tmp_path: Path) -> None:
    store = FaultyStore(volume)
    store.pwrite(0, page(1, 2))
    store.flush()
    store.pwrite(PAGE, page(2, 2))  # page 1 rewritten, page 2 new: neither flushed
    assert store.unsynced_pages() == 2
    assert store.durable(0, 3 * PAGE) == page(1, 2) + page(0)
    assert store.power_cut() == 2
    assert store.dead
    with pytest.raises(OSError) as off:
        store.pread(0, 1)
    assert off.value.errno == errno.EIO
    with pytest.raises(OSError):
        store.pwrite(0, b"x")
    store.close()
    with reopen(tmp_path) as again:
        assert pages_of(again, 0, 4) == [1, 1, 0, 0]


def test_a_power_cut_keeps_partial_writes_to_the_page(volume: Volume, tmp_path: Path) -> None:
    """Durability is per page: a flushed page written again in part loses only that part."""
    store = FaultyStore(volume)
    store.pwrite(100, b"a" * 50)
    store.flush()
    store.pwrite(120, b"b" * 10)
    store.pwrite(PAGE - 5, b"c" * 10)  # straddles pages 0 and 1
    store.power_cut()
    store.close()
    with reopen(tmp_path) as again:
        assert again.pread(0, 2 * PAGE) == bytes(100) + b"a" * 50 + bytes(2 * PAGE - 150)


def test_keep_chooses_pages_written_back_anyway_under_a_seed(tmp_path: Path) -> None:
    runs = iter(range(100))

    def run(seed: int, keep: float) -> list[int]:
        with Volume.open(tmp_path / f"{next(runs)}.img", size=SIZE) as vol:
            store = FaultyStore(vol, seed=seed)
            for i in range(SIZE // PAGE):
                store.pwrite(i * PAGE, page(i + 1))
            store.power_cut(keep=keep)
            return pages_of(vol)

    assert run(1, 0.0) == [0] * 64
    assert run(1, 1.0) == list(range(1, 65))
    half = run(1, 0.5)
    assert half == run(1, 0.5), "the same seed chooses the same pages"
    assert 0 < sum(v != 0 for v in half) < 64
    assert any(run(seed, 0.5) != half for seed in (2, 3, 4))


def test_a_failed_flush_loses_its_pages_and_every_later_flush_fails(
    volume: Volume, tmp_path: Path
) -> None:
    """Linux's writeback failure: the pages read back until evicted, but never reach the
    disk, and no later sync can say otherwise."""
    store = FaultyStore(volume)
    store.pwrite(0, page(1, 2))
    store.flush()
    store.pwrite(0, page(2))
    store.fail("flush")
    with pytest.raises(OSError):
        store.flush()
    assert store.sync_error is not None
    assert pages_of(store, 0, 2) == [2, 1]  # still in the cache
    assert store.durable(0, PAGE) == page(1)
    with pytest.raises(OSError):
        store.flush()
    assert store.evict_lost() == 1
    assert pages_of(store, 0, 2) == [1, 1]  # the kernel dropped it: the disk's content
    store.pwrite(PAGE, page(3))
    store.power_cut()
    store.close()
    with reopen(tmp_path) as again:
        assert pages_of(again, 0, 2) == [1, 1]


def test_a_lost_page_written_again_is_dirty_again(volume: Volume) -> None:
    store = FaultyStore(volume)
    store.pwrite(0, page(1))
    store.fail("flush")
    with pytest.raises(OSError):
        store.flush()
    store.pwrite(0, page(2))
    assert store.unsynced_pages() == 1
    assert store.durable(0, PAGE) == page(0)
    assert store.power_cut() == 1
    assert pages_of(volume, 0, 1) == [0]


def test_faults_fire_after_n_calls_for_a_number_of_times(volume: Volume) -> None:
    store = FaultyStore(volume)
    fault = store.fail("pwrite", errno.ENOSPC, after=2, times=2)
    outcomes = []
    for i in range(6):
        try:
            store.pwrite(i * PAGE, page(i + 1))
            outcomes.append("ok")
        except OSError as exc:
            outcomes.append(errno.errorcode[exc.errno or 0])
    assert outcomes == ["ok", "ok", "ENOSPC", "ENOSPC", "ok", "ok"]
    assert (fault.seen, fault.fired) == (6, 2)
    # A refused change changed nothing.
    assert pages_of(store, 0, 6) == [1, 2, 0, 0, 5, 6]
    assert store.calls["pwrite"] == 6


def test_a_fault_from_then_on_fails_until_healed(volume: Volume) -> None:
    store = FaultyStore(volume)
    store.fail(CHANGES, errno.ENOSPC, times=None)
    refused: list[Callable[[], None]] = [
        lambda: store.pwrite(0, b"x"),
        lambda: store.pwritev(0, [b"x", b"y"]),
        lambda: store.trim(0, PAGE),
        lambda: store.write_zeroes(0, PAGE, may_trim=False),
        lambda: store.write_zeroes(0, PAGE, may_trim=True),
    ]
    volume.pwrite(0, page(9))
    for _ in range(2):
        for call in refused:
            with pytest.raises(OSError) as caught:
                call()
            assert caught.value.errno == errno.ENOSPC
    assert pages_of(store, 0, 1) == [9]
    assert store.unsynced_pages() == 0  # nothing was changed, so nothing is at risk
    store.flush()  # flushes are not changes
    store.heal()
    store.pwrite(0, b"x")
    assert store.pread(0, 1) == b"x"


@pytest.mark.parametrize("op", ["pread", "flush", "trim", "write_zeroes", "pwrite"])
def test_every_operation_can_be_failed(volume: Volume, op: str) -> None:
    store = FaultyStore(volume)
    store.fail(op, errno.EIO)  # type: ignore[arg-type]
    calls: dict[str, Callable[[], None]] = {
        "pread": lambda: store.preadinto(0, bytearray(8)),
        "flush": store.flush,
        "trim": lambda: store.trim(0, PAGE),
        "write_zeroes": lambda: store.write_zeroes(0, PAGE, may_trim=False),
        "pwrite": lambda: store.pwritev(0, [b"a"]),
    }
    with pytest.raises(OSError) as caught:
        calls[op]()
    assert caught.value.errno == errno.EIO
    if op == "flush":
        with pytest.raises(OSError):  # sync_error: a failed flush is never followed by a good one
            store.flush()
    else:
        calls[op]()  # once only


class Gate:
    """A store whose writes wait at a gate: a write in flight, held there by the test."""

    def __init__(self, inner: Volume) -> None:
        self.inner = inner
        self.path, self.size, self.read_only = inner.path, inner.size, inner.read_only
        self.sync_error: OSError | None = None
        self.entered = threading.Event()
        self.release = threading.Event()

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def preadinto(self, offset: int, buf: memoryview | bytearray) -> None:
        self.inner.preadinto(offset, buf)

    def pwrite(self, offset: int, data: Buffer) -> None:
        self.entered.set()
        assert self.release.wait(10)
        self.inner.pwrite(offset, data)

    def pwritev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self.inner.pwritev(offset, buffers)

    def flush(self) -> None:
        self.inner.flush()

    def trim(self, offset: int, length: int) -> None:
        self.inner.trim(offset, length)

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool) -> None:
        self.inner.write_zeroes(offset, length, may_trim=may_trim)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.inner.extents(offset, length)

    def capabilities(self) -> Capabilities:
        return self.inner.capabilities()

    def advise_willneed(self, offset: int, length: int) -> None:
        self.inner.advise_willneed(offset, length)

    def read_cached(self, offset: int, buffers: Sequence[bytearray]) -> bool:
        return self.inner.read_cached(offset, buffers)

    def close(self) -> None:
        self.inner.close()


def test_a_write_in_flight_at_the_cut_is_torn_at_a_page_boundary(tmp_path: Path) -> None:
    tears = set()
    for seed in range(8):
        where = tmp_path / str(seed)
        where.mkdir()
        with Volume.open(where / "v.img", size=SIZE) as vol:
            vol.pwrite(0, page(1, 16))
            gate = Gate(vol)
            store = FaultyStore(gate, seed=seed)
            failed: list[BaseException] = []

            def write(store: FaultyStore = store, failed: list[BaseException] = failed) -> None:
                try:
                    store.pwrite(0, page(2, 16))
                except OSError as exc:
                    failed.append(exc)

            writer = threading.Thread(target=write)
            writer.start()
            assert gate.entered.wait(10)
            cutter = threading.Thread(target=lambda s=store: s.power_cut(keep=1.0))
            cutter.start()
            while not store.dead:
                time.sleep(0.001)
            gate.release.set()  # the write finishes its call; the cut tears it
            writer.join(10)
            cutter.join(10)
            # The caller is never told a torn write was done.
            assert len(failed) == 1 and isinstance(failed[0], OSError)
            values = pages_of(vol, 0, 16)
            tear = values.count(2)
            assert values == [2] * tear + [1] * (16 - tear), values
            tears.add(tear)
    assert len(tears) > 1, "the tear point is random"


def test_an_armed_cut_strikes_every_store_on_the_power_at_once(tmp_path: Path) -> None:
    power = Power(seed=5)
    with (
        Volume.open(tmp_path / "a.img", size=SIZE) as va,
        Volume.open(tmp_path / "b.img", size=SIZE) as vb,
    ):
        a, b = FaultyStore(va, power=power), FaultyStore(vb, power=power)
        a.pwrite(0, page(1))
        a.flush()
        b.pwrite(0, page(2))
        power.arm(2)  # lets two more changes or flushes through, strikes the third
        a.pwrite(PAGE, page(3))
        b.pwrite(PAGE, page(4))
        assert power.cuts == 0
        with pytest.raises(OSError):
            a.pwrite(2 * PAGE, page(5, 4))
        assert power.cuts == 1 and a.dead and b.dead
        with pytest.raises(OSError):
            b.flush()
        assert pages_of(va, 0, 2) == [1, 0]
        assert pages_of(vb, 0, 2) == [0, 0]
        # A store opened after the cut (the restarted machine's) is alive.
        c = FaultyStore(va, power=power)
        assert not c.dead
        c.pwrite(0, page(6))
        assert pages_of(c, 0, 1) == [6]


def test_an_armed_cut_tears_the_change_it_strikes(tmp_path: Path) -> None:
    tears = set()
    for seed in range(10):
        with Volume.open(tmp_path / f"{seed}.img", size=SIZE) as vol:
            power = Power(seed=seed)
            store = FaultyStore(vol, power=power)
            store.pwrite(0, page(1, 8))
            store.flush()
            power.arm(0, keep=1.0)
            with pytest.raises(OSError):
                store.pwritev(0, [page(2, 3), page(2, 5)])
            values = pages_of(vol, 0, 8)
            tear = values.count(2)
            assert values == [2] * tear + [1] * (8 - tear)
            tears.add(tear)
    assert len(tears) > 1


def test_a_cut_during_a_flush_promises_nothing(volume: Volume) -> None:
    power = Power()
    store = FaultyStore(volume, power=power)
    store.pwrite(0, page(1))
    power.arm(0)
    with pytest.raises(OSError):
        store.flush()
    assert pages_of(volume, 0, 1) == [0]


def test_a_flush_persists_only_what_was_written_before_it_started(volume: Volume) -> None:
    """The journal's group commit writes while a sync runs in a thread: the sync covers the
    page as it was when it started, not the write racing it."""
    store = FaultyStore(volume)
    store.pwrite(0, page(1, 2))
    store.slow_flush = 0.3
    flusher = threading.Thread(target=store.flush)
    flusher.start()
    while store.calls["flush"] == 0:
        time.sleep(0.001)
    time.sleep(0.05)
    store.pwrite(0, page(2))  # during the flush
    flusher.join(10)
    assert store.unsynced_pages() == 1
    assert store.durable(0, 2 * PAGE) == page(1, 2)
    store.power_cut()
    assert pages_of(volume, 0, 2) == [1, 1]


def test_concurrent_writers_and_flushes_keep_the_books(volume: Volume) -> None:
    """Thread safety: writers on their own pages, flushes between, then one last flush."""
    store = FaultyStore(volume)
    errors: list[BaseException] = []

    def work(first: int) -> None:
        try:
            for round_ in range(20):
                for p in range(first, first + 8):
                    store.pwrite(p * PAGE, page(round_ + 1))
                store.flush()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i * 8,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert store.unsynced_pages() == 0
    store.power_cut()
    assert pages_of(volume) == [20] * 64


def test_a_read_only_store_stays_read_only(tmp_path: Path) -> None:
    Volume.open(tmp_path / "v.img", size=SIZE).close()
    with FaultyStore(Volume.open(tmp_path / "v.img", size=SIZE, read_only=True)) as store:
        assert store.read_only and store.capabilities().read_only
        assert store.power_cut() == 0


def test_a_durable_write_makes_only_its_own_pages_durable(volume: Volume) -> None:
    """As RWF_DSYNC does (the journal's checkpoint slots): the rest of the cache stays at risk."""
    store = FaultyStore(volume)
    store.pwrite(4 * PAGE, page(1))
    store.pwrite_durable(0, page(2, 2))
    assert store.durable(0, 5 * PAGE) == page(2, 2) + page(0, 3)
    store.power_cut()
    assert pages_of(volume, 0, 5) == [2, 2, 0, 0, 0]


def test_a_closed_store_keeps_its_pages_at_risk_until_the_next_open(tmp_path: Path) -> None:
    """The page cache outlives the descriptor: a graceful close is no sync."""
    power = Power()
    store = FaultyStore(Volume.open(tmp_path / "v.img", size=SIZE), power=power)
    store.pwrite(0, page(1))
    store.close()
    again = FaultyStore(reopen(tmp_path), power=power, takes_over=store)
    assert again.unsynced_pages() == 1
    assert pages_of(again, 0, 1) == [1]
    again.close()
    power.cut()  # the lingering store is cut too, and closes what it wraps
    with reopen(tmp_path) as vol:
        assert pages_of(vol, 0, 1) == [0]
