"""Tests for the volume backing store: files, regions and (via a loop device) block devices."""

from __future__ import annotations

import array
import errno
import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmirror.errors import OutOfRangeError, ReadOnlyError, VolumeError
from blockmirror.store import volume as volume_mod
from blockmirror.store.base import MAX_EXTENTS, Extent
from blockmirror.store.volume import Volume, backing_size

KiB = 1024
MiB = 1024 * KiB


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# The two states a file's extents take: data (nothing known), or a hole that reads as zeros.
DATA = (False, False)
HOLE = (True, True)


def ext(length: int, state: tuple[bool, bool]) -> Extent:
    return Extent(length, *state)


def check_covering(extents: list[Extent], length: int, *, exact: bool = True) -> None:
    assert extents, "at least one extent"
    assert all(e.length > 0 and (e.hole, e.zero) in (DATA, HOLE) for e in extents)
    total = sum(e.length for e in extents)
    assert total == length if exact else 0 < total <= length


# -- opening ------------------------------------------------------------------------------


def test_create_sparse(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with Volume.open(path, size=64 * MiB) as vol:
        assert (vol.kind, vol.size, vol.offset, vol.read_only) == ("file", 64 * MiB, 0, False)
        assert vol.pread(0, 4096) == bytes(4096)
    assert path.stat().st_size == 64 * MiB
    assert allocated(path) < 1 * MiB
    assert path.stat().st_mode & 0o777 == 0o600


def test_create_region_sizes_file_to_region_end(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    Volume.open(path, size=1 * MiB, offset=3 * MiB).close()
    assert path.stat().st_size == 4 * MiB
    assert backing_size(path) == 4 * MiB


@pytest.mark.parametrize("extra", [0, 12345])
def test_existing_file_at_or_beyond_region_end(tmp_path: Path, extra: int) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(rand(8192 + extra))
    with Volume.open(path, size=4096, offset=4096, create=False) as vol:
        assert vol.pread(0, 4096) == rand(8192 + extra)[4096:8192]
    assert path.stat().st_size == 8192 + extra  # never resized


def test_open_errors(tmp_path: Path) -> None:
    short = tmp_path / "short.img"
    short.write_bytes(bytes(4096))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases: list[tuple[Callable[[], Volume], str]] = [
        (lambda: Volume.open(tmp_path / "missing", size=4096, create=False), "does not exist"),
        (lambda: Volume.open(tmp_path / "ro", size=4096, read_only=True), "read-only"),
        (lambda: Volume.open(tmp_path, size=4096), "directory"),
        (lambda: Volume.open(short, size=4096, offset=1), "past the end"),
        (lambda: Volume.open(short, size=8192), "past the end"),
        (lambda: Volume.open(short, size=0), "positive"),
        (lambda: Volume.open(short, size=10, offset=-1), "negative"),
        (lambda: Volume.open(fifo, size=4096), "neither"),
        (lambda: Volume.open(tmp_path / "no" / "dir.img", size=4096), "cannot create"),
        (lambda: Volume.open(short / "x", size=4096), "cannot stat"),
    ]
    for attempt, message in cases:
        with pytest.raises(VolumeError, match=message):
            attempt()
    assert short.stat().st_size == 4096
    assert not (tmp_path / "missing").exists()
    assert not (tmp_path / "ro").exists()


def test_backing_size(tmp_path: Path) -> None:
    assert backing_size(tmp_path / "missing") is None
    (tmp_path / "f").write_bytes(bytes(1000))
    assert backing_size(tmp_path / "f") == 1000
    with pytest.raises(VolumeError, match="neither"):
        backing_size(tmp_path)


def test_closed_volume_refuses_everything(tmp_path: Path) -> None:
    vol = Volume.open(tmp_path / "d", size=4096)
    with vol:
        pass
    vol.close()  # idempotent
    with pytest.raises(VolumeError, match="closed"):
        vol.pread(0, 1)
    with pytest.raises(VolumeError, match="closed"):
        vol.flush()


# -- data path ----------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "d"
    data = rand(100_000)
    with Volume.open(path, size=1 * MiB) as vol:
        vol.pwrite(777, data)
        vol.flush()
        assert vol.pread(777, len(data)) == data
        buf = bytearray(len(data))
        vol.preadinto(777, buf)
        assert buf == data
        target = bytearray(300)
        vol.preadinto(1000, memoryview(target)[100:200])
        assert target[100:200] == data[223:323] and target[:100] == bytes(100)
        vol.pwrite(0, memoryview(data)[:10])
        assert vol.pread(0, 10) == data[:10]
        vol.pwrite(vol.size - 5, b"tail!")
        assert vol.pread(vol.size - 5, 5) == b"tail!"
    raw = path.read_bytes()
    assert raw[777 : 777 + len(data)] == data[:]
    assert raw[-5:] == b"tail!"


def test_pwritev_writes_buffers_in_order(tmp_path: Path) -> None:
    path = tmp_path / "d"
    words = array.array("I", range(100))
    pieces: list[bytes | bytearray | memoryview] = [
        b"abc",
        bytearray(b"defg"),
        b"",
        memoryview(b"--hij--")[2:5],
        memoryview(words),  # non-byte format: counted in bytes
        *(bytes([i % 256]) * 3 for i in range(2500)),  # more than IOV_MAX buffers
    ]
    expected = b"".join(bytes(p) for p in pieces)
    with Volume.open(path, size=64 * KiB, offset=4096) as vol:
        vol.pwritev(10, pieces)
        assert vol.pread(10, len(expected)) == expected
    raw = path.read_bytes()
    assert raw[4096 + 10 : 4096 + 10 + len(expected)] == expected
    assert raw[: 4096 + 10] == bytes(4096 + 10)


def test_partial_writes_and_reads_are_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwrite, real_pwritev, real_preadv = os.pwrite, os.pwritev, os.preadv

    def short_pwrite(fd: int, data: memoryview, pos: int) -> int:
        return real_pwrite(fd, data[:7], pos)

    def short_pwritev(fd: int, bufs: list[memoryview], pos: int) -> int:
        return real_pwritev(fd, [bufs[0][:5]], pos)

    def short_preadv(fd: int, bufs: list[memoryview], pos: int) -> int:
        return real_preadv(fd, [bufs[0][:3]], pos)

    with Volume.open(tmp_path / "d", size=64 * KiB) as vol:
        monkeypatch.setattr(os, "pwrite", short_pwrite)
        monkeypatch.setattr(os, "pwritev", short_pwritev)
        monkeypatch.setattr(os, "preadv", short_preadv)
        vol.pwrite(1, b"0123456789abcdefghij")
        vol.pwritev(100, [b"0123456", b"789", b"abcdefghijkl"])
        buf = bytearray(20)
        vol.preadinto(1, buf)
        monkeypatch.undo()
        assert buf == b"0123456789abcdefghij"
        assert vol.pread(100, 22) == b"0123456789abcdefghijkl"


def test_reads_past_a_truncated_file_are_zeros(tmp_path: Path) -> None:
    path = tmp_path / "d"
    with Volume.open(path, size=16 * KiB) as vol:
        vol.pwrite(0, b"\xff" * 16 * KiB)
        os.truncate(path, 10 * KiB)  # someone else shrank it behind our back
        assert vol.pread(8 * KiB, 8 * KiB) == b"\xff" * 2 * KiB + bytes(6 * KiB)
        buf = bytearray(b"\x01" * 4 * KiB)
        vol.preadinto(12 * KiB, buf)
        assert buf == bytes(4 * KiB)
        assert vol.extents(10 * KiB, 6 * KiB) == [ext(6 * KiB, HOLE)]


def test_region_isolation(tmp_path: Path) -> None:
    path = tmp_path / "shared.img"
    original = rand(96 * KiB, seed=1)
    path.write_bytes(original)
    # Unaligned boundaries, so partial-block punching and zeroing are exercised too.
    a_off, a_size = 4096 + 100, 40_000
    b_off, b_size = a_off + a_size, 30_000
    with (
        Volume.open(path, size=a_size, offset=a_off) as a,
        Volume.open(path, size=b_size, offset=b_off) as b,
    ):
        a.pwrite(0, b"\xaa" * a_size)
        a.pwritev(0, [b"\xbb" * 1000, b"\xcc" * (a_size - 1000)])
        a.write_zeroes(0, a_size, may_trim=False)
        a.write_zeroes(0, a_size, may_trim=True)
        a.trim(0, a_size)
        a.pwrite(a_size - 3, b"end")
        a.flush()
        assert b.pread(0, b_size) == original[b_off : b_off + b_size]
        b.pwrite(0, b"B" * b_size)
        assert a.pread(a_size - 3, 3) == b"end"
    raw = path.read_bytes()
    assert raw[:a_off] == original[:a_off]
    assert raw[a_off : a_off + a_size] == bytes(a_size - 3) + b"end"
    assert raw[b_off : b_off + b_size] == b"B" * b_size
    assert raw[b_off + b_size :] == original[b_off + b_size :]


# -- bounds -------------------------------------------------------------------------------

REGION_OFF, REGION_SIZE = 5000, 50_000


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Volume]]:
    path = tmp_path_factory.mktemp("bounds") / "d"
    path.write_bytes(rand(REGION_OFF + REGION_SIZE + 7000, seed=2))
    with Volume.open(path, size=REGION_SIZE, offset=REGION_OFF) as vol:
        yield path, vol


edges = st.sampled_from([-1, 0, 1, REGION_SIZE - 1, REGION_SIZE, REGION_SIZE + 1])
positions = st.one_of(edges, st.integers(-(2**40), 2**40))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(offset=positions, length=st.one_of(edges, st.integers(-(2**40), 2**40)))
def test_out_of_range_raises_and_changes_nothing(
    bounded: tuple[Path, Volume], offset: int, length: int
) -> None:
    path, vol = bounded
    if offset >= 0 and length >= 0 and offset + length <= REGION_SIZE:
        assert len(vol.pread(offset, length)) == length
        return
    before = digest(path)
    calls: list[Callable[[], object]] = [
        lambda: vol.pread(offset, length),
        lambda: vol.trim(offset, length),
        lambda: vol.write_zeroes(offset, length, may_trim=True),
        lambda: vol.write_zeroes(offset, length, may_trim=False),
        lambda: vol.extents(offset, length),
    ]
    if 0 <= length <= 2 * REGION_SIZE:  # the data must exist to be refused
        data = b"\x5a" * length
        calls += [
            lambda: vol.pwrite(offset, data),
            lambda: vol.pwritev(offset, [data[:1], data[1:]]),
            lambda: vol.preadinto(offset, bytearray(length)),
        ]
    for call in calls:
        with pytest.raises(OutOfRangeError):
            call()
    assert digest(path) == before


def test_read_only_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "d"
    path.write_bytes(rand(64 * KiB))
    before = digest(path)
    with Volume.open(path, size=32 * KiB, offset=KiB, read_only=True) as vol:
        calls: list[Callable[[], None]] = [
            lambda: vol.pwrite(0, b"x"),
            lambda: vol.pwritev(0, [b"x"]),
            lambda: vol.trim(0, 4096),
            lambda: vol.write_zeroes(0, 4096, may_trim=True),
            lambda: vol.write_zeroes(0, 4096, may_trim=False),
        ]
        for call in calls:
            with pytest.raises(ReadOnlyError):
                call()
        assert vol.pread(0, 10) == rand(64 * KiB)[KiB : KiB + 10]
        assert not vol.can_fast_zero()
        vol.flush()
    assert issubclass(ReadOnlyError, VolumeError)
    assert digest(path) == before


# -- trim, zeroes -------------------------------------------------------------------------


def test_trim_punches_holes(tmp_path: Path) -> None:
    path = tmp_path / "d"
    with Volume.open(path, size=4 * MiB, offset=64 * KiB) as vol:
        vol.pwrite(0, rand(2 * MiB))
        vol.flush()
        full = allocated(path)
        assert full >= 2 * MiB
        vol.trim(256 * KiB, MiB)
        assert allocated(path) <= full - MiB
        assert vol.pread(256 * KiB, MiB) == bytes(MiB)
        assert vol.pread(0, 256 * KiB) == rand(2 * MiB)[: 256 * KiB]
        vol.trim(0, 0)


@pytest.mark.parametrize("may_trim", [True, False])
def test_write_zeroes(tmp_path: Path, may_trim: bool) -> None:
    path = tmp_path / "d"
    data = rand(3 * MiB)
    with Volume.open(path, size=4 * MiB) as vol:
        vol.pwrite(0, data)
        vol.flush()
        full = allocated(path)
        vol.write_zeroes(1000, 2 * MiB, may_trim=may_trim)
        assert vol.pread(0, 3 * MiB) == data[:1000] + bytes(2 * MiB) + data[1000 + 2 * MiB :]
        if may_trim:
            assert allocated(path) < full
        assert vol.can_fast_zero()  # ext4/xfs/btrfs/tmpfs all support one of the modes


def test_write_zeroes_falls_back_to_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, mode: int, pos: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(volume_mod, "_fallocate", unsupported)
    path = tmp_path / "d"
    size = 20 * MiB + 123
    path.write_bytes(b"\xee" * (size + 2))
    with Volume.open(path, size=size, offset=1) as vol:
        assert not vol.can_fast_zero()  # the probe found nothing
        vol.trim(0, 100)  # silently advisory
        assert vol.pread(0, 100) == b"\xee" * 100
        vol.write_zeroes(0, size, may_trim=True)
        assert not vol.can_fast_zero()
    raw = path.read_bytes()
    assert raw[:1] == raw[-1:] == b"\xee"
    assert raw[1:-1] == bytes(size)


def test_write_zeroes_without_zero_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Like tmpfs: punching works, ZERO_RANGE does not; a no-hole zeroing stays allocated."""
    real = volume_mod._fallocate

    def no_zero_range(fd: int, mode: int, pos: int, length: int) -> None:
        if mode == volume_mod._FALLOC_ZERO:
            raise OSError(errno.EOPNOTSUPP, "not here")
        real(fd, mode, pos, length)

    monkeypatch.setattr(volume_mod, "_fallocate", no_zero_range)
    path = tmp_path / "d"
    with Volume.open(path, size=2 * MiB) as vol:
        vol.pwrite(0, b"\x09" * 2 * MiB)
        vol.flush()
        full = allocated(path)
        vol.write_zeroes(4096, MiB, may_trim=False)
        assert vol.pread(0, 2 * MiB) == b"\x09" * 4096 + bytes(MiB) + b"\x09" * (MiB - 4096)
        assert allocated(path) == full
        assert vol.can_fast_zero()


# -- block status -------------------------------------------------------------------------


def layout(tmp_path: Path) -> Path:
    """A 1 MiB sparse file: data at [64K,128K) and [512K,576K), holes elsewhere."""
    path = tmp_path / "d"
    with Volume.open(path, size=MiB) as vol:
        vol.pwrite(64 * KiB, b"\x01" * 64 * KiB)
        vol.pwrite(512 * KiB, b"\x02" * 64 * KiB)
        vol.flush()
    return path


def test_block_status_file(tmp_path: Path) -> None:
    path = layout(tmp_path)
    with Volume.open(path, size=MiB, create=False) as vol:
        hole, data = HOLE, DATA
        assert vol.extents(0, MiB) == [
            ext(64 * KiB, hole),
            ext(64 * KiB, data),
            ext(384 * KiB, hole),
            ext(64 * KiB, data),
            ext(448 * KiB, hole),
        ]
        assert vol.extents(100 * KiB, 10 * KiB) == [ext(10 * KiB, data)]
        assert vol.extents(600 * KiB, 1) == [ext(1, hole)]
        assert vol.extents(5, 0) == []


def test_block_status_region(tmp_path: Path) -> None:
    path = layout(tmp_path)
    with Volume.open(path, size=512 * KiB, offset=96 * KiB, create=False) as vol:
        assert vol.extents(0, 512 * KiB) == [
            ext(32 * KiB, DATA),
            ext(384 * KiB, HOLE),
            ext(64 * KiB, DATA),
            ext(32 * KiB, HOLE),
        ]


def test_block_status_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "d"
    blocks = 2 * MAX_EXTENTS + 100
    with Volume.open(path, size=blocks * 8 * KiB) as vol:
        for i in range(blocks):
            vol.pwrite(i * 8 * KiB, b"\x07" * 4 * KiB)
        extents = vol.extents(0, vol.size)
        assert len(extents) == MAX_EXTENTS
        check_covering(extents, vol.size, exact=False)
        assert extents[:2] == [ext(4 * KiB, DATA), ext(4 * KiB, HOLE)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    writes=st.lists(st.tuples(st.integers(0, 255), st.integers(1, 20)), max_size=8),
    offset=st.integers(0, 255),
    length=st.integers(1, 256),
)
def test_block_status_is_sound(
    tmp_path_factory: pytest.TempPathFactory,
    writes: list[tuple[int, int]],
    offset: int,
    length: int,
) -> None:
    """Whatever the layout: the extents tile the range and every hole reads as zeros."""
    unit = 4 * KiB
    length = min(length, 256 - offset) * unit
    path = tmp_path_factory.mktemp("bs") / "d"
    with Volume.open(path, size=256 * unit, offset=3 * unit) as vol:
        for block, count in writes:
            vol.pwrite(block * unit, b"\x01" * min(count, 256 - block) * unit)
        extents = vol.extents(offset * unit, length)
        check_covering(extents, length)
        pos = offset * unit
        for e in extents:
            if e.zero:
                assert vol.pread(pos, e.length) == bytes(e.length)
            pos += e.length


# -- block devices ------------------------------------------------------------------------

LOOP_SIZE = 8 * MiB


@pytest.fixture
def loop_device(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(device, backing file) of a loop device over a file of random bytes."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    backing = tmp_path / "loop.img"
    backing.write_bytes(rand(LOOP_SIZE, seed=3))
    proc = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        pytest.skip(f"no loop device: {proc.stderr.strip()}")
    dev = Path(proc.stdout.strip())
    request.addfinalizer(lambda: subprocess.run(["losetup", "-d", str(dev)], check=False))
    return dev, backing


def test_block_device_size_and_data(loop_device: tuple[Path, Path]) -> None:
    dev, backing = loop_device
    assert backing_size(dev) == LOOP_SIZE
    with pytest.raises(VolumeError, match="past the end of the device"):
        Volume.open(dev, size=LOOP_SIZE + 1)
    with pytest.raises(VolumeError, match="past the end of the device"):
        Volume.open(dev, size=LOOP_SIZE, offset=512)
    with Volume.open(dev, size=LOOP_SIZE) as vol:
        assert vol.kind == "block"
        assert vol.pread(0, 4096) == rand(LOOP_SIZE, seed=3)[:4096]
        vol.pwrite(1001, b"hello device")
        vol.pwritev(5 * MiB, [b"vec", b"tored"])
        vol.flush()
        assert vol.pread(1001, 12) == b"hello device"
        assert vol.extents(0, LOOP_SIZE) == [ext(LOOP_SIZE, DATA)]
        assert isinstance(vol.can_fast_zero(), bool)
    raw = backing.read_bytes()
    assert raw[1001:1013] == b"hello device"
    assert raw[5 * MiB : 5 * MiB + 8] == b"vectored"


def test_block_device_region_zeroes_and_trim(loop_device: tuple[Path, Path]) -> None:
    dev, backing = loop_device
    original = rand(LOOP_SIZE, seed=3)
    off, size = MiB + 300, 2 * MiB  # unaligned: sector-aligned middle plus written edges
    with Volume.open(dev, size=size, offset=off) as vol:
        vol.pwrite(0, b"R" * 100)
        vol.write_zeroes(100, 700_000, may_trim=False)
        vol.write_zeroes(800_000, 300_001, may_trim=True)
        vol.write_zeroes(size - 10, 10, may_trim=False)
        vol.trim(1_200_000, 100_000)  # advisory: content unspecified, bounds still hold
        vol.flush()
        assert vol.pread(0, 100) == b"R" * 100
        assert vol.pread(100, 700_000) == bytes(700_000)
        assert vol.pread(800_000, 300_001) == bytes(300_001)
        assert vol.pread(size - 10, 10) == bytes(10)
        assert vol.pread(700_100, 99_900) == original[off + 700_100 : off + 800_000]
    with Volume.open(dev, size=off) as below:  # the rest of the disk, read back through it
        assert below.pread(0, off) == original[:off]
    raw = backing.read_bytes()
    assert raw[:off] == original[:off]
    assert raw[off + size :] == original[off + size :]
    assert raw[off : off + 100] == b"R" * 100


def test_block_device_is_claimed_exclusively(loop_device: tuple[Path, Path]) -> None:
    """Issue 7 point 9: while a volume holds a device nobody else may claim (mount) it."""
    dev, _ = loop_device

    def foreign_claim() -> int:
        return os.open(dev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)

    with Volume.open(dev, size=MiB) as low:
        with pytest.raises(OSError) as busy:
            os.close(foreign_claim())
        assert busy.value.errno == errno.EBUSY
        # Regions of one device in one process share the claim, read-only ones too.
        with (
            Volume.open(dev, size=MiB, offset=MiB) as high,
            Volume.open(dev, size=MiB, offset=2 * MiB, read_only=True) as ro,
        ):
            high.pwrite(0, b"high")
            assert low.pread(0, 4) == rand(LOOP_SIZE, seed=3)[:4]
            assert ro.pread(0, 4) == rand(LOOP_SIZE, seed=3)[2 * MiB : 2 * MiB + 4]
        with pytest.raises(OSError):
            os.close(foreign_claim())  # still held by ``low``
    os.close(foreign_claim())  # released with the last volume

    held = foreign_claim()
    try:
        with pytest.raises(VolumeError, match="in use"):
            Volume.open(dev, size=MiB)
        with pytest.raises(VolumeError, match="in use"):
            Volume.open(dev, size=MiB, read_only=True)
    finally:
        os.close(held)
    with Volume.open(dev, size=MiB):  # a failed open left no claim behind
        pass
    os.close(foreign_claim())
