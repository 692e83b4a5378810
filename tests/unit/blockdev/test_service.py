"""The block-device service on its own: validation, dispatch, reads, extents, the commit gate.

The store is a real volume file in a tmp dir; the write path is a recorder that stages each change
and applies it to the store only in ``commit()``, as the journaled write path does, so the tests
see exactly what reached it and when. No front end is involved: every expectation is an errno.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from blockmirror.blockdev.service import (
    BlockDevice,
    Pending,
    ReplyGate,
    RequestError,
    error_code,
)
from blockmirror.blockdev.writepath import Buffer
from blockmirror.counters import VolumeCounters
from blockmirror.errors import (
    JournalError,
    OutOfRangeError,
    ReadOnlyError,
    VolumeError,
    WritePathError,
)
from blockmirror.store.base import Extent
from blockmirror.store.volume import Volume

KiB = 1024
MiB = 1024 * KiB
SIZE = 4 * MiB
MAX_WRITE = 1 * MiB


class Recorder:
    """A write path that records every call and applies the changes at commit time."""

    def __init__(self, store: Volume, *, fast_zero: bool = True) -> None:
        self.store = store
        self.fast_zero = fast_zero
        self.calls: list[tuple[Any, ...]] = []
        self.staged: list[Callable[[], None]] = []
        self.raises: BaseException | None = None  # what every change raises, when set
        self.commit_raises: BaseException | None = None
        self.gate: asyncio.Future[None] | None = None  # what commit() returns
        self.result: asyncio.Future[None] | None = None  # what each change returns

    def _take(self, call: tuple[Any, ...], apply: Callable[[], None]) -> Pending:
        self.calls.append(call)
        if self.raises is not None:
            raise self.raises
        self.staged.append(apply)
        return self.result

    def write(self, offset: int, data: Sequence[Buffer], *, fua: bool) -> Pending:
        joined = b"".join(bytes(b) for b in data)
        return self._take(("write", offset, joined, fua), lambda: self.store.pwrite(offset, joined))

    def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool) -> Pending:
        return self._take(
            ("zero", offset, length, fua, may_trim),
            lambda: self.store.write_zeroes(offset, length, may_trim=may_trim),
        )

    def trim(self, offset: int, length: int, *, fua: bool) -> Pending:
        return self._take(("trim", offset, length, fua), lambda: None)

    def flush(self) -> Pending:
        self.calls.append(("flush",))
        if self.raises is not None:
            raise self.raises
        return self.result

    def can_fast_zero(self) -> bool:
        return self.fast_zero

    def max_write(self) -> int:
        return MAX_WRITE

    def commit(self) -> Pending:
        self.calls.append(("commit",))
        if self.commit_raises is not None:
            raise self.commit_raises
        staged, self.staged = self.staged, []
        for apply in staged:
            apply()
        return self.gate


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Volume]:
    volume = Volume.open(tmp_path / "vol.img", size=SIZE)
    volume.pwrite(0, b"\x11" * 8192)  # data at the start, a hole after it
    yield volume
    volume.close()


def device_on(store: Volume, **kwargs: Any) -> tuple[BlockDevice, Recorder]:
    fast_zero = kwargs.pop("fast_zero", True)
    recorder = Recorder(store, fast_zero=fast_zero)
    return BlockDevice("vol", store, recorder, **kwargs), recorder


def digest(store: Volume) -> str:
    return hashlib.sha256(store.pread(0, SIZE)).hexdigest()


def refused(call: Callable[..., object], *args: Any, **kwargs: Any) -> int:
    """The errno ``call(*args, **kwargs)`` is refused with."""
    with pytest.raises(RequestError) as info:
        call(*args, **kwargs)
    assert str(info.value), "a refusal says why"
    return info.value.code


# --- validation: every rule refuses with its errno and changes nothing ---------------------------

PAST_END = [(SIZE, 1), (SIZE - 512, 1024), (SIZE + 4096, 4096), (2**64 - 512, 1024), (-4096, 4096)]


@pytest.mark.parametrize(("offset", "length"), PAST_END)
def test_changes_past_the_end_are_enospc(store: Volume, offset: int, length: int) -> None:
    device, recorder = device_on(store)
    before = digest(store)
    data = [b"\xee" * length] if length > 0 else []
    assert refused(device.write, offset, length, data, fua=False) == errno.ENOSPC
    assert refused(device.write_zeroes, offset, length, fua=True, may_trim=True) == errno.ENOSPC
    assert refused(device.trim, offset, length, fua=False) == errno.ENOSPC
    assert recorder.calls == [] and digest(store) == before
    assert device.counters == VolumeCounters()


@pytest.mark.parametrize(("offset", "length"), PAST_END)
def test_reads_past_the_end_are_einval(store: Volume, offset: int, length: int) -> None:
    device, recorder = device_on(store)
    assert refused(device.check_read, offset, length) == errno.EINVAL
    assert refused(device.read, offset, length) == errno.EINVAL
    assert refused(device.cache, offset, length) == errno.EINVAL
    assert refused(device.extents, offset, length) == errno.EINVAL
    assert recorder.calls == []
    assert device.counters.reads == device.counters.bytes_read == 0


@pytest.mark.parametrize("length", [0, -1])
def test_empty_requests_are_einval(store: Volume, length: int) -> None:
    device, recorder = device_on(store, read_only=True)  # empty wins over read-only
    assert refused(device.write, 0, length, [], fua=False) == errno.EINVAL
    assert refused(device.write_zeroes, 0, length, fua=False, may_trim=False) == errno.EINVAL
    assert refused(device.trim, 0, length, fua=False) == errno.EINVAL
    assert refused(device.read, 0, length) == errno.EINVAL
    assert refused(device.check_read, 0, length) == errno.EINVAL
    assert recorder.calls == []


def test_read_only_refuses_every_change_with_eperm_but_reads(store: Volume) -> None:
    device, recorder = device_on(store, read_only=True)
    before = digest(store)
    assert refused(device.write, 0, 4096, [b"\xee" * 4096], fua=True) == errno.EPERM
    assert refused(device.write_zeroes, 0, 4096, fua=False, may_trim=True) == errno.EPERM
    # Read-only comes before "not fast": the host learns the real reason.
    assert refused(device.write_zeroes, 0, 4096, fua=False, may_trim=True, fast=True) == errno.EPERM
    assert refused(device.trim, 0, 4096, fua=False) == errno.EPERM
    # Past the end is "no space" even on a read-only device (range before read-only).
    assert refused(device.trim, SIZE, 4096, fua=False) == errno.ENOSPC
    assert recorder.calls == [] and digest(store) == before
    assert device.read(0, 4) == b"\x11" * 4
    assert device.flush() is None and recorder.calls == [("flush",)]


def test_a_write_over_the_write_paths_maximum_is_einval(store: Volume) -> None:
    device, recorder = device_on(store)
    assert device.max_write == MAX_WRITE
    data = [b"\xee" * (MAX_WRITE + 1)]
    assert refused(device.write, 0, MAX_WRITE + 1, data, fua=False) == errno.EINVAL
    assert recorder.calls == []
    # The maximum itself is taken; zeroing and trimming are not bounded by it (no payload).
    assert device.write(0, MAX_WRITE, [b"\x01" * MAX_WRITE], fua=False) is None
    assert device.write_zeroes(0, 2 * MAX_WRITE, fua=False, may_trim=True) is None
    assert device.trim(0, 2 * MAX_WRITE, fua=False) is None
    assert [c[0] for c in recorder.calls] == ["write", "zero", "trim"]


def test_alignment_to_the_minimum_block(store: Volume) -> None:
    device, recorder = device_on(store, min_block=512)
    before = digest(store)
    for offset, length in [(1, 512), (512, 100), (100, 412)]:
        data = [b"\xee" * length]
        assert refused(device.write, offset, length, data, fua=False) == errno.EINVAL
        assert refused(device.trim, offset, length, fua=False) == errno.EINVAL
        assert (
            refused(device.write_zeroes, offset, length, fua=False, may_trim=False) == errno.EINVAL
        )
        assert refused(device.check_read, offset, length) == errno.EINVAL
    assert recorder.calls == [] and digest(store) == before
    # Range before alignment: past the end is still ENOSPC.
    assert refused(device.write, SIZE, 1, [b"x"], fua=False) == errno.ENOSPC
    # A piece of an aligned read, read as its reply leaves, need not be aligned itself.
    device.check_read(0, 1024)
    assert device.read(100, 10) == b"\x11" * 10
    assert device.write(512, 512, [b"\x02" * 512], fua=False) is None
    for bad in (0, 3, 768):
        with pytest.raises(ValueError):
            BlockDevice("vol", store, recorder, min_block=bad)


def test_fast_zero_is_enotsup_when_the_write_path_cannot(store: Volume) -> None:
    device, recorder = device_on(store, fast_zero=False)
    assert not device.can_fast_zero()
    assert (
        refused(device.write_zeroes, 0, 4096, fua=False, may_trim=True, fast=True) == errno.ENOTSUP
    )
    assert recorder.calls == [] and device.counters.zeroes == 0
    # Without the flag the same zeroing is done, slowly.
    assert device.write_zeroes(0, 4096, fua=False, may_trim=True) is None
    assert recorder.calls == [("zero", 0, 4096, False, True)]


# --- dispatch -------------------------------------------------------------------------------------


def test_changes_reach_the_write_path_with_their_flags_and_are_counted(store: Volume) -> None:
    device, recorder = device_on(store)
    parts: list[Buffer] = [b"ab", memoryview(b"cd"), bytearray(b"ef")]
    assert device.write(4096, 6, parts, fua=True) is None
    assert device.write_zeroes(0, 4096, fua=False, may_trim=False, fast=True) is None
    assert device.trim(8192, 4096, fua=True) is None
    assert device.flush() is None
    assert recorder.calls == [
        ("write", 4096, b"abcdef", True),
        ("zero", 0, 4096, False, False),
        ("trim", 8192, 4096, True),
        ("flush",),
    ]
    counters = device.counters
    assert (counters.writes, counters.bytes_written) == (1, 6)
    assert (counters.zeroes, counters.trims, counters.flushes) == (1, 1, 1)
    # Staged, not applied: the store changes at the commit.
    assert store.pread(4096, 6) == b"\x11" * 6
    gate = ReplyGate(device)
    assert gate.commit().pending is None
    assert store.pread(4096, 6) == b"abcdef"
    assert store.pread(0, 4096) == bytes(4096)


def test_a_change_returns_the_write_paths_future(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        store = Volume.open(tmp / "vol.img", size=SIZE)
        try:
            device, recorder = device_on(store)
            recorder.result = asyncio.get_running_loop().create_future()
            assert device.write(0, 1, [b"x"], fua=True) is recorder.result
            assert device.flush() is recorder.result
            recorder.result.set_result(None)
        finally:
            store.close()

    asyncio.run(main(tmp_path))


# --- failures: whatever the write path or the store raises becomes a RequestError ----------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (VolumeError("the store went away"), errno.EIO),
        (JournalError("the ring is corrupt"), errno.EIO),
        (WritePathError("refused"), errno.EIO),
        (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
        (OSError(errno.EIO, "Input/output error"), errno.EIO),
        (OSError("no errno"), errno.EIO),
        (asyncio.CancelledError(), errno.EIO),
        (OutOfRangeError("out"), errno.EINVAL),
        (ReadOnlyError("ro"), errno.EPERM),
    ],
)
def test_a_failed_write_path_is_answered_with_an_errno(
    store: Volume, exc: BaseException, code: int
) -> None:
    """The issue 8 bug: JournalWritePath.failed may hold a VolumeError (or anything that ended
    it), raised again for every later change. It must come back as an error, never escape."""
    device, recorder = device_on(store)
    recorder.raises = exc
    assert refused(device.write, 0, 4, [b"abcd"], fua=False) == code
    assert refused(device.write_zeroes, 0, 4, fua=True, may_trim=True) == code
    assert refused(device.trim, 0, 4, fua=False) == code
    assert refused(device.flush) == code
    recorder.commit_raises = exc
    commit = ReplyGate(device).commit()
    assert commit.pending is None and commit.error is not None and commit.error.code == code
    # Reads do not depend on the write path.
    assert device.read(0, 4) == b"\x11" * 4
    assert error_code(exc) == code


def test_an_unexpected_exception_is_eio_and_logged_once(
    store: Volume, caplog: pytest.LogCaptureFixture
) -> None:
    device, recorder = device_on(store)
    recorder.raises = RuntimeError("a bug below")
    for _ in range(3):
        assert refused(device.write, 0, 4, [b"abcd"], fua=False) == errno.EIO
    tracebacks = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert len(tracebacks) == 1, caplog.text


def test_store_failures_of_reads_and_extents_are_errors_and_cache_is_advisory(
    tmp_path: Path,
) -> None:
    store = Volume.open(tmp_path / "vol.img", size=SIZE)
    device, _ = device_on(store)
    store.close()  # every call on it now raises VolumeError
    assert refused(device.read, 0, 4096) == errno.EIO
    assert refused(device.extents, 0, 4096) == errno.EIO
    device.cache(0, 4096)  # a hint that cannot be taken is no error


# --- reads and extents go through the service ----------------------------------------------------


def test_reads_come_from_the_store_and_are_counted_when_done(store: Volume) -> None:
    device, recorder = device_on(store)
    device.check_read(0, 16384)
    assert device.read(0, 8192) + device.read(8192, 8192) == b"\x11" * 8192 + bytes(8192)
    assert device.counters.reads == 0  # pieces of one reply: counted once it is whole
    device.read_done(16384)
    assert (device.counters.reads, device.counters.bytes_read) == (1, 16384)
    device.cache(0, SIZE)
    assert recorder.calls == []


def test_extents_are_neutral_and_cover_the_range(store: Volume) -> None:
    device, _ = device_on(store)
    extents = device.extents(0, SIZE)
    assert all(isinstance(e, Extent) for e in extents)
    assert sum(e.length for e in extents) == SIZE
    assert not extents[0].hole and extents[0].length >= 8192  # the data written at the start
    assert extents[-1].hole and extents[-1].zero
    assert device.extents(SIZE - 4096, 4096) == [Extent(4096, hole=True, zero=True)]


# --- the commit gate ------------------------------------------------------------------------------


def test_the_gate_holds_acks_until_the_commit_future_completes(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        store = Volume.open(tmp / "vol.img", size=SIZE)
        try:
            device, recorder = device_on(store)
            gate = ReplyGate(device)
            loop = asyncio.get_running_loop()
            assert not gate.waiting
            first, second = object(), object()
            assert device.write(0, 4, [b"abcd"], fua=False) is None
            gate.ack(first, 7)
            assert device.write(4, 4, [b"efgh"], fua=False) is None
            gate.ack(second, 8)
            assert gate.waiting
            recorder.gate = loop.create_future()
            commit = gate.commit()
            assert commit.acks == {id(first): 7, id(second): 8}
            assert commit.pending is recorder.gate and commit.error is None
            assert not gate.waiting  # the next batch starts empty
            assert store.pread(0, 8) == b"abcdefgh"
            # Held until the write path says so; then released as they are.
            recorder.gate.set_result(None)
            assert gate.outcome(commit) is None

            # A commit whose future fails: its acks must become that error.
            gate.ack(first, 9)
            recorder.gate = loop.create_future()
            failing = gate.commit()
            recorder.gate.set_exception(VolumeError("the store went away"))
            error = gate.outcome(failing)
            assert error is not None and error.code == errno.EIO
            assert failing.acks == {id(first): 9}

            # A commit that fails at once carries its error and no future.
            gate.ack(second, 10)
            recorder.commit_raises = OSError(errno.ENOSPC, "full")
            refused_now = gate.commit()
            assert refused_now.pending is None and refused_now.acks == {id(second): 10}
            assert refused_now.error is not None and refused_now.error.code == errno.ENOSPC
            assert gate.outcome(refused_now) is refused_now.error

            # Nothing deferred: nothing to hold.
            recorder.commit_raises = None
            recorder.gate = None
            assert gate.commit() == ({}, None, None)
        finally:
            store.close()

    asyncio.run(main(tmp_path))


def test_a_cancelled_commit_future_is_eio(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        store = Volume.open(tmp / "vol.img", size=SIZE)
        try:
            device, recorder = device_on(store)
            gate = ReplyGate(device)
            recorder.gate = asyncio.get_running_loop().create_future()
            gate.ack(object(), 1)
            commit = gate.commit()
            recorder.gate.cancel()
            error = gate.outcome(commit)
            assert error is not None and error.code == errno.EIO
        finally:
            store.close()

    asyncio.run(main(tmp_path))


def test_connections_and_errors_are_counted(store: Volume) -> None:
    device, _ = device_on(store)
    device.attach()
    device.attach()
    device.detach()
    device.answered_error()
    counters = device.counters
    assert (counters.connections, counters.connections_total, counters.errors) == (1, 2, 1)
