"""The store conformance suite: every implementation of the Store interface passes every case.

Modelled on litestream's ``RunWithReplicaClient``: a *case* is a function that takes a
:data:`StoreFactory` (open a fresh store of a size, optionally read-only over given content) and
checks one part of the contract of ``store/base.py``. :func:`run_conformance` runs every case
against one factory; :data:`IMPLEMENTATIONS` lists the factories of the product (a volume on a
file, a volume on a region of a file, and the fault-injecting store over each, which with no
fault armed must behave exactly like the store it wraps), and pytest runs each case on each so
that a failure names both. A new implementation adds its factory to the list.
"""

from __future__ import annotations

import errno
import os
import random
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmirror.errors import OutOfRangeError, ReadOnlyError
from blockmirror.store.base import MAX_EXTENTS, Buffer, Extent, Store
from blockmirror.store.faulty import FaultyStore
from blockmirror.store.volume import Volume

KiB = 1024
MiB = 1024 * KiB
PAGE = 4096
SIZE = MiB


class StoreFactory(Protocol):
    """Open a fresh store of ``size`` bytes in ``directory`` (closed, and checked, on exit).

    ``content``: what it holds at first (zeros when None). ``read_only``: opened read-only.
    """

    def __call__(
        self,
        directory: Path,
        *,
        size: int = SIZE,
        read_only: bool = False,
        content: bytes | None = None,
    ) -> AbstractContextManager[Store]: ...


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# -- the implementations --------------------------------------------------------------------


@contextmanager
def file_volume(
    directory: Path, *, size: int = SIZE, read_only: bool = False, content: bytes | None = None
) -> Iterator[Store]:
    path = directory / "store.img"
    if content is not None or read_only:
        with Volume.open(path, size=size) as vol:
            if content is not None:
                vol.pwrite(0, content)
    vol = Volume.open(path, size=size, read_only=read_only, create=not read_only)
    try:
        yield vol
    finally:
        vol.close()


# Unaligned on purpose: the region's arithmetic must not lean on page alignment.
REGION_OFFSET = 3 * PAGE + 512
GUARD = 2 * PAGE


@contextmanager
def region_volume(
    directory: Path, *, size: int = SIZE, read_only: bool = False, content: bytes | None = None
) -> Iterator[Store]:
    """A region of a file between guard bytes that no operation may touch."""
    path = directory / "disk.img"
    before, after = rand(REGION_OFFSET, seed=11), rand(GUARD, seed=12)
    end = REGION_OFFSET + size
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, end + GUARD)  # sparse in between
        os.pwrite(fd, before, 0)
        os.pwrite(fd, after, end)
        if content is not None:
            os.pwrite(fd, content, REGION_OFFSET)
    finally:
        os.close(fd)
    vol = Volume.open(path, size=size, offset=REGION_OFFSET, read_only=read_only, create=False)
    try:
        yield vol
    finally:
        vol.close()
    with path.open("rb") as f:
        assert f.read(REGION_OFFSET) == before, "a byte before the region changed"
        f.seek(end)
        assert f.read() == after, "a byte after the region changed"


def faulty(inner: StoreFactory) -> StoreFactory:
    """The fault-injecting store over ``inner``'s store, no fault armed."""

    @contextmanager
    def factory(
        directory: Path,
        *,
        size: int = SIZE,
        read_only: bool = False,
        content: bytes | None = None,
    ) -> Iterator[Store]:
        with inner(directory, size=size, read_only=read_only, content=content) as store:
            wrapped = FaultyStore(store, seed=7)
            try:
                yield wrapped
            finally:
                wrapped.close()
            assert not wrapped.dead

    return factory


IMPLEMENTATIONS: dict[str, StoreFactory] = {
    "volume-file": file_volume,
    "volume-region": region_volume,
    "faulty-file": faulty(file_volume),
    "faulty-region": faulty(region_volume),
}


# -- the cases ------------------------------------------------------------------------------

Case = Callable[[StoreFactory, Path], None]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


def run_conformance(open_store: StoreFactory, directory: Path) -> None:
    """Every case against one implementation, each in a directory of its own."""
    for name, fn in CASES.items():
        where = directory / name
        where.mkdir()
        fn(open_store, where)


def whole(store: Store) -> bytes:
    return store.pread(0, store.size)


@case
def case_a_new_store_reads_zeros_and_has_its_size(open_store: StoreFactory, tmp: Path) -> None:
    with open_store(tmp, size=SIZE) as store:
        assert store.size == SIZE
        assert not store.read_only
        assert store.sync_error is None
        assert whole(store) == bytes(SIZE)
        assert store.pread(SIZE, 0) == b""
        assert store.pread(0, 0) == b""


@case
def case_pread_returns_what_pwrite_wrote(open_store: StoreFactory, tmp: Path) -> None:
    model = bytearray(SIZE)
    rng = random.Random(1)
    with open_store(tmp) as store:
        # Unaligned, page-spanning, single bytes, the first and the last byte, all of it.
        spans = [(0, 1), (SIZE - 1, 1), (PAGE - 3, 7), (5 * PAGE + 100, 3 * PAGE + 17)]
        spans += [(rng.randrange(SIZE - 9000), rng.randrange(1, 9000)) for _ in range(20)]
        for i, (offset, length) in enumerate(spans):
            data = rand(length, seed=100 + i)
            buf: Buffer = (bytes, bytearray, memoryview)[i % 3](data)
            store.pwrite(offset, buf)
            model[offset : offset + length] = data
            assert store.pread(offset, length) == data
        assert whole(store) == model
        store.pwrite(0, rand(SIZE, seed=2))
        assert whole(store) == rand(SIZE, seed=2)
        store.pwrite(17, b"")  # a zero-length write is a no-op
        assert whole(store) == rand(SIZE, seed=2)


@case
def case_preadinto_fills_the_buffer(open_store: StoreFactory, tmp: Path) -> None:
    content = rand(SIZE, seed=3)
    with open_store(tmp, content=content) as store:
        for offset, length in [(0, SIZE), (1, PAGE), (SIZE - 10, 10), (12345, 0), (PAGE, 77)]:
            array = bytearray(length)
            store.preadinto(offset, array)
            assert array == content[offset : offset + length]
            # Into a slice of a larger buffer: only the slice is filled.
            big = bytearray(b"\xee" * (length + 20))
            store.preadinto(offset, memoryview(big)[10 : 10 + length])
            assert big[10 : 10 + length] == content[offset : offset + length]
            assert big[:10] == big[-10:] == b"\xee" * 10


@case
def case_pwritev_writes_the_buffers_in_order(open_store: StoreFactory, tmp: Path) -> None:
    rng = random.Random(4)
    with open_store(tmp) as store:
        # More buffers than one system call takes (IOV_MAX), of every size including none.
        buffers: list[Buffer] = []
        for i in range(2500):
            data = rng.randbytes(rng.choice([0, 1, 3, 64, 200]))
            buffers.append((bytes, bytearray, memoryview)[i % 3](data))
        joined = b"".join(bytes(b) for b in buffers)
        store.pwritev(PAGE + 5, buffers)
        assert store.pread(PAGE + 5, len(joined)) == joined
        assert store.pread(0, PAGE + 5) == bytes(PAGE + 5)
        end = PAGE + 5 + len(joined)
        assert store.pread(end, SIZE - end) == bytes(SIZE - end)
        # A few large buffers, and none at all.
        large = [rand(300 * KiB, seed=5), rand(1, seed=6), rand(200 * KiB, seed=7)]
        store.pwritev(0, large)
        assert store.pread(0, sum(len(b) for b in large)) == b"".join(large)
        before = whole(store)
        store.pwritev(9, [])
        store.pwritev(9, [b"", memoryview(b"")])
        assert whole(store) == before


@case
def case_flush_keeps_the_content(open_store: StoreFactory, tmp: Path) -> None:
    with open_store(tmp) as store:
        store.flush()  # nothing written yet
        store.pwrite(PAGE, rand(3 * PAGE, seed=8))
        store.flush()
        store.flush()  # again, nothing new
        assert store.pread(PAGE, 3 * PAGE) == rand(3 * PAGE, seed=8)
        assert store.sync_error is None


@case
def case_trim_changes_only_its_range(open_store: StoreFactory, tmp: Path) -> None:
    content = rand(SIZE, seed=9)
    with open_store(tmp, content=content) as store:
        spans = [(8 * PAGE, 4 * PAGE), (100 * PAGE + 123, 5 * PAGE + 1), (SIZE - 700, 700)]
        for offset, length in [*spans, (0, 0), (SIZE, 0)]:
            store.trim(offset, length)
        data = whole(store)
        # Inside a trimmed range anything may read; outside it, exactly what was there.
        pos = 0
        for offset, length in sorted(spans):
            assert data[pos:offset] == content[pos:offset], (pos, offset)
            pos = offset + length
        assert data[pos:] == content[pos:]
        # A trimmed range is still part of the store: it can be written and read again.
        store.pwrite(8 * PAGE, rand(4 * PAGE, seed=10))
        assert store.pread(8 * PAGE, 4 * PAGE) == rand(4 * PAGE, seed=10)


@case
def case_write_zeroes_reads_zeros(open_store: StoreFactory, tmp: Path) -> None:
    content = rand(SIZE, seed=11)
    model = bytearray(content)
    with open_store(tmp, content=content) as store:
        spans = [(0, 1), (3 * PAGE, 8 * PAGE), (50 * PAGE + 1, 2 * PAGE - 2), (SIZE - 3, 3)]
        for i, (offset, length) in enumerate([*spans, (77, 0)]):
            store.write_zeroes(offset, length, may_trim=i % 2 == 0)
            model[offset : offset + length] = bytes(length)
            assert store.pread(offset, length) == bytes(length)
        assert whole(store) == model
        for may_trim in (False, True):
            store.pwrite(0, content)
            store.write_zeroes(0, SIZE, may_trim=may_trim)
            assert whole(store) == bytes(SIZE)


def check_extents(store: Store, offset: int, length: int, data: bytes) -> list[Extent]:
    """The extents of a range tile it exactly and never lie about zeros. ``data``: the store."""
    extents = store.extents(offset, length)
    if length == 0:
        assert extents == []
        return extents
    assert extents, "never empty for a range that is not"
    assert all(e.length > 0 for e in extents), extents
    covered = sum(e.length for e in extents)
    if len(extents) < MAX_EXTENTS:
        assert covered == length, (covered, length)
    else:
        assert 0 < covered <= length
    tells_holes = store.capabilities().extents
    pos = offset
    for e in extents:
        if e.zero:
            assert data[pos : pos + e.length] == bytes(e.length), ("not zero", pos, e)
        if not tells_holes:
            assert not e.hole, "a store that cannot tell holes reported one"
        pos += e.length
    return extents


@case
def case_extents_of_simple_layouts(open_store: StoreFactory, tmp: Path) -> None:
    with open_store(tmp) as store:
        data = whole(store)
        for offset, length in [(0, SIZE), (0, 1), (SIZE - 1, 1), (SIZE, 0), (5, 0), (PAGE, 10)]:
            check_extents(store, offset, length, data)
        if store.capabilities().extents:
            # A store that tells holes from data shows a fresh sparse store as holes ...
            assert any(e.hole for e in store.extents(0, SIZE))
        store.pwrite(64 * KiB, b"\x01" * 64 * KiB)
        store.pwrite(512 * KiB, b"\x02" * 64 * KiB)
        data = whole(store)
        extents = check_extents(store, 0, SIZE, data)
        # ... and never written data as a hole.
        pos = 0
        for e in extents:
            if e.hole or e.zero:
                assert not set(range(pos, pos + e.length)) & set(range(64 * KiB, 128 * KiB))
            pos += e.length


@case
def case_extents_are_sound_over_random_layouts(open_store: StoreFactory, tmp: Path) -> None:
    unit = PAGE
    blocks = SIZE // unit
    span = st.tuples(st.integers(0, blocks - 1), st.integers(1, 24), st.integers(0, unit - 1))
    kinds = st.sampled_from(["write", "zero", "punch", "trim"])
    ops = st.lists(st.tuples(kinds, span), max_size=12)

    with open_store(tmp) as store:

        @settings(
            max_examples=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            database=None,
        )
        @given(ops=ops, offset=st.integers(0, SIZE), length=st.integers(0, SIZE))
        def check(ops: list[tuple[str, tuple[int, int, int]]], offset: int, length: int) -> None:
            store.write_zeroes(0, SIZE, may_trim=True)  # a fresh layout for each example
            for i, (op, (block, count, skew)) in enumerate(ops):
                start = block * unit + (skew if i % 2 else 0)
                n = min(count * unit, SIZE - start)
                if op == "write":
                    store.pwrite(start, b"\x5a" * n)
                elif op == "zero":
                    store.write_zeroes(start, n, may_trim=False)
                elif op == "punch":
                    store.write_zeroes(start, n, may_trim=True)
                else:
                    store.trim(start, n)
            length = min(length, SIZE - offset)
            data = whole(store)
            check_extents(store, 0, SIZE, data)
            check_extents(store, offset, length, data)

        check()


@case
def case_capabilities_match_behaviour(open_store: StoreFactory, tmp: Path) -> None:
    content = rand(SIZE, seed=14)
    (tmp / "rw").mkdir()
    with open_store(tmp / "rw", content=content) as store:
        caps = store.capabilities()
        assert caps.read_only is store.read_only is False
        store.trim(0, PAGE)
        if not caps.trim:
            assert store.pread(0, PAGE) == content[:PAGE], "trim without the capability: no-op"
        store.write_zeroes(PAGE, 2 * PAGE, may_trim=False)
        assert store.pread(PAGE, 2 * PAGE) == bytes(2 * PAGE)
        assert store.capabilities().read_only is False
    (tmp / "ro").mkdir()
    with open_store(tmp / "ro", read_only=True, content=content) as store:
        caps = store.capabilities()
        assert caps.read_only is store.read_only is True
        # A read-only store can neither deallocate nor zero, so it must not say it can.
        assert not caps.trim
        assert not caps.fast_zero


def bad_ranges(size: int) -> list[tuple[int, int]]:
    return [
        (-1, 1),
        (-PAGE, PAGE),
        (0, -1),
        (5, -5),
        (size, 1),
        (size - 1, 2),
        (0, size + 1),
        (size + 1, 0),
        (size * 4, PAGE),
        (2**62, 2**62),
        (-(2**62), 2**62 + 1),
    ]


def every_op(store: Store, offset: int, length: int) -> list[Callable[[], object]]:
    """Each operation on the range; those taking a buffer only where one can be that long."""
    ops: list[Callable[[], object]] = [
        lambda: store.pread(offset, length),
        lambda: store.trim(offset, length),
        lambda: store.write_zeroes(offset, length, may_trim=False),
        lambda: store.write_zeroes(offset, length, may_trim=True),
        lambda: store.extents(offset, length),
        lambda: store.advise_willneed(offset, length),
    ]
    if 0 <= length <= 8 * PAGE:
        half = length // 2
        ops += [
            lambda: store.preadinto(offset, bytearray(length)),
            lambda: store.pwrite(offset, b"\x01" * length),
            lambda: store.pwritev(offset, [b"\x02" * half, b"", b"\x03" * (length - half)]),
        ]
    return ops


def refuses_every_op(store: Store, offset: int, length: int) -> None:
    before = whole(store)
    for op in every_op(store, offset, length):
        with pytest.raises(OutOfRangeError):
            op()
        assert whole(store) == before, (offset, length)


@case
def case_out_of_range_raises_and_changes_nothing(open_store: StoreFactory, tmp: Path) -> None:
    with open_store(tmp, content=rand(SIZE, seed=12)) as store:
        for offset, length in bad_ranges(SIZE):
            refuses_every_op(store, offset, length)

        @settings(max_examples=60, deadline=None, database=None)
        @given(
            offset=st.integers(-(2**40), 2**40),
            length=st.integers(-(2**20), 8 * PAGE),
        )
        def check(offset: int, length: int) -> None:
            if offset >= 0 and length >= 0 and offset + length <= SIZE:
                return
            refuses_every_op(store, offset, length)

        check()
        # The edges themselves are in range.
        assert store.pread(SIZE - 1, 1) == rand(SIZE, seed=12)[-1:]
        assert store.extents(SIZE, 0) == []


@case
def case_a_read_only_store_refuses_changes(open_store: StoreFactory, tmp: Path) -> None:
    content = rand(SIZE, seed=13)
    with open_store(tmp, read_only=True, content=content) as store:
        assert store.read_only
        changes: list[Callable[[], object]] = [
            lambda: store.pwrite(0, b"x"),
            lambda: store.pwrite(PAGE, b""),
            lambda: store.pwritev(0, [b"a", b"b"]),
            lambda: store.trim(0, PAGE),
            lambda: store.write_zeroes(0, PAGE, may_trim=False),
            lambda: store.write_zeroes(0, PAGE, may_trim=True),
        ]
        for change in changes:
            with pytest.raises(ReadOnlyError):
                change()
            assert whole(store) == content
        # Reads go on.
        out = bytearray(10)
        store.preadinto(5, out)
        assert out == content[5:15]
        check_extents(store, 0, SIZE, content)


@case
def case_close_twice_is_harmless(open_store: StoreFactory, tmp: Path) -> None:
    with open_store(tmp) as store:
        store.pwrite(0, b"abc")
    store.close()


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_conformance(impl: str, case_name: str, tmp_path: Path) -> None:
    CASES[case_name](IMPLEMENTATIONS[impl], tmp_path)


def test_run_conformance_is_the_whole_suite_for_one_implementation(tmp_path: Path) -> None:
    """The entry point a new implementation's own tests may call instead of the table."""
    run_conformance(faulty(region_volume), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CASES)


# -- sync errors: made to happen with the fault-injecting store -------------------------------

FAULTY = {name: f for name, f in IMPLEMENTATIONS.items() if name.startswith("faulty")}


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("impl", list(FAULTY))
def test_a_failed_flush_fails_every_later_flush(impl: str, err: int, tmp_path: Path) -> None:
    """The interface's sync_error rule (for Volume itself, test_volume covers it)."""
    with FAULTY[impl](tmp_path) as store:
        assert isinstance(store, FaultyStore)
        store.pwrite(0, b"\x01" * PAGE)
        fault = store.fail("flush", err)
        with pytest.raises(OSError) as first:
            store.flush()
        assert first.value.errno == err
        assert store.sync_error is not None and store.sync_error.errno == err
        # The fault fired once; every later flush fails all the same, with the same errno.
        for _ in range(3):
            with pytest.raises(OSError) as later:
                store.flush()
            assert later.value.errno == err
        assert fault.fired == 1
        store.heal()
        with pytest.raises(OSError):
            store.flush()
        # Reads and writes go on (the export keeps serving reads).
        assert store.pread(0, PAGE) == b"\x01" * PAGE
        store.pwrite(PAGE, b"\x02" * PAGE)
        assert store.pread(PAGE, PAGE) == b"\x02" * PAGE


# -- the fault-injecting store is the inner store when no fault is armed ---------------------

OPS = st.one_of(
    st.tuples(st.just("pwrite"), st.integers(-PAGE, 2 * SIZE), st.integers(0, 3 * PAGE)),
    st.tuples(st.just("pwritev"), st.integers(-PAGE, 2 * SIZE), st.integers(0, 3 * PAGE)),
    st.tuples(st.just("pread"), st.integers(-PAGE, 2 * SIZE), st.integers(-10, 3 * PAGE)),
    st.tuples(st.just("trim"), st.integers(-PAGE, 2 * SIZE), st.integers(-10, 3 * PAGE)),
    st.tuples(st.just("zero"), st.integers(-PAGE, 2 * SIZE), st.integers(-10, 3 * PAGE)),
    st.tuples(st.just("punch"), st.integers(-PAGE, 2 * SIZE), st.integers(-10, 3 * PAGE)),
    st.tuples(st.just("extents"), st.integers(-PAGE, 2 * SIZE), st.integers(-10, SIZE)),
    st.tuples(st.just("flush"), st.just(0), st.just(0)),
)


def apply(store: Store, op: tuple[str, int, int], seed: int) -> object:
    name, offset, length = op
    data = rand(max(length, 0), seed=seed)
    calls: dict[str, Callable[[], object]] = {
        "pwrite": lambda: store.pwrite(offset, data),
        "pwritev": lambda: store.pwritev(offset, [data[:7], b"", data[7:]]),
        "pread": lambda: store.pread(offset, length),
        "trim": lambda: store.trim(offset, length),
        "zero": lambda: store.write_zeroes(offset, length, may_trim=False),
        "punch": lambda: store.write_zeroes(offset, length, may_trim=True),
        "extents": lambda: store.extents(offset, length),
        "flush": store.flush,
    }
    try:
        return calls[name]()
    except (OutOfRangeError, OSError) as exc:
        return type(exc)


@pytest.mark.parametrize("inner", ["volume-file", "volume-region"])
def test_the_faulty_store_without_faults_behaves_exactly_like_its_inner_store(
    inner: str, tmp_path: Path
) -> None:
    factory = IMPLEMENTATIONS[inner]

    @settings(max_examples=30, deadline=None, database=None)
    @given(ops=st.lists(OPS, max_size=25))
    def check(ops: Sequence[tuple[str, int, int]]) -> None:
        with (
            tempfile.TemporaryDirectory(dir=tmp_path) as a,
            tempfile.TemporaryDirectory(dir=tmp_path) as b,
            factory(Path(a)) as plain,
            faulty(factory)(Path(b)) as wrapped,
        ):
            for i, op in enumerate(ops):
                expected, got = apply(plain, op, i), apply(wrapped, op, i)
                if op[0] == "extents" and isinstance(expected, list):
                    # Two files need not be laid out alike (the filesystem's writeback
                    # decides when a zeroed block shows as a hole): both must be sound.
                    assert isinstance(got, list)
                    check_extents(plain, op[1], op[2], whole(plain))
                    check_extents(wrapped, op[1], op[2], whole(wrapped))
                else:
                    assert expected == got, op
                assert wrapped.capabilities() == plain.capabilities()
            assert whole(plain) == whole(wrapped)

    check()
