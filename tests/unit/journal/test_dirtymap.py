"""Tests for the per-peer dirty map: bit semantics, file format, crashes and torn writes.

The reference model is a set of region indices held as a Python int (bit ``r`` = region ``r``):
set algebra is ``|``, ``&`` and ``~``, and ``int.to_bytes(n, "little")`` is, independently of the
code under test, exactly the on-disk bitmap (bit ``r`` is bit ``r % 8`` of byte ``r // 8``). An
int rather than a ``set`` keeps multi-page bitmaps (100k regions, ``mark_all``) fast to model.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from crc32c import crc32c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from blockmirror.errors import BlockmirrorError, OutOfRangeError
from blockmirror.io.fileio import pread_all
from blockmirror.journal import dirtymap as dirtymap_mod
from blockmirror.journal.dirtymap import (
    HEADER_SIZE,
    MAGIC,
    PAGE_SIZE,
    VERSION,
    DirtyMap,
    DirtyMapError,
    bitmap_pages,
)

KiB = 1024
MiB = 1024 * KiB
TiB = 1024**4
BITS_PER_PAGE = PAGE_SIZE * 8


# -- reference model ----------------------------------------------------------------------


def regions_of(volume_size: int, region_size: int) -> int:
    return -(-volume_size // region_size)


def span(first: int, end: int) -> int:
    """The set of regions [first, end)."""
    return ((1 << (end - first)) - 1) << first if end > first else 0


def touched(offset: int, length: int, rs: int) -> int:
    """Regions a mark of [offset, offset + length) must set."""
    if length == 0:
        return 0
    return span(offset // rs, -(-(offset + length) // rs))


def covered(offset: int, length: int, rs: int, vs: int) -> int:
    """Regions a clear of [offset, offset + length) may clear: wholly inside, end of volume
    counting as the end of the last region."""
    end = regions_of(vs, rs) if offset + length >= vs else (offset + length) // rs
    return span(-(-offset // rs), end)


def runs_of(model: int, rs: int, vs: int, first_region: int = 0) -> list[tuple[int, int]]:
    """Expected dirty_regions output: maximal runs of set bits, via a regex over the bit string
    (a deliberately different algorithm from the byte scan under test)."""
    bits = format(model, "b")[::-1] if model else ""
    out = []
    for m in re.finditer("1+", bits):
        lo, hi = m.span()
        if hi <= first_region:
            continue
        lo = max(lo, first_region)
        out.append((lo * rs, min(hi * rs, vs) - lo * rs))
    return out


def model_dirty_bytes(model: int, rs: int, vs: int) -> int:
    return sum(length for _, length in runs_of(model, rs, vs))


def on_disk(path: Path) -> int:
    """The bitmap in the file, read directly, as a model int."""
    return int.from_bytes(path.read_bytes()[PAGE_SIZE:], "little")


def page_bytes(model: int, page: int) -> bytes:
    """Bitmap page ``page`` of ``model`` as the file would hold it."""
    bits = model >> (page * BITS_PER_PAGE) & span(0, BITS_PER_PAGE)
    return bits.to_bytes(PAGE_SIZE, "little")


def tear(path: Path, page: int, new: bytes, part: slice) -> None:
    """Simulate a torn write of a bitmap page: only ``part`` of its new content reaches disk."""
    fd = os.open(path, os.O_WRONLY)
    try:
        start = part.start or 0
        os.pwrite(fd, new[part], PAGE_SIZE + page * PAGE_SIZE + start)
    finally:
        os.close(fd)


def regions_in(dm: DirtyMap) -> int:
    """The map's in-memory state as a model int, through its public queries only."""
    model = 0
    for offset, length in dm.dirty_regions():
        first = offset // dm.region_size
        model |= span(first, regions_of(offset + length, dm.region_size))
    return model


def check_matches(dm: DirtyMap, model: int) -> None:
    rs, vs = dm.region_size, dm.volume_size
    assert list(dm.dirty_regions()) == runs_of(model, rs, vs)
    assert dm.dirty_regions_count() == model.bit_count()
    assert dm.dirty_bytes() == model_dirty_bytes(model, rs, vs)
    assert dm.is_clean() == (model == 0)


# -- CRC and format -----------------------------------------------------------------------


def reference_crc32c(data: bytes) -> int:
    """CRC-32C bit by bit (reflected polynomial 0x82F63B78), as the dirty map once computed it.

    Until the restructure the dirty map carried its own table-driven CRC; it now uses the
    ``crc32c`` package like the journal. This slow reference pins the two to the same function.
    """
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


# Published CRC-32C check values: the "123456789" check of the CRC catalogue, and the iSCSI test
# vectors of RFC 3720, appendix B.4. CRC-32 (zlib) would give 0xCBF43926 for the first.
CRC32C_CHECK_VALUES = [
    (b"123456789", 0xE3069283),
    (b"", 0x00000000),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize(("data", "expected"), CRC32C_CHECK_VALUES)
def test_crc32c_check_values(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected
    assert reference_crc32c(data) == expected


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_crc32c_package_equals_the_reference(data: bytes) -> None:
    assert crc32c(data) == reference_crc32c(data)


# Dirty map files written by the code before it used the crc32c package (commit 359b420, with
# its own CRC table), kept byte for byte: a map on disk today must still open, and a new map
# must come out identical.
#   DirtyMap.create(p, volume_size=10 * MiB + 1, region_size=64 * KiB), then
#   mark(0, 1), mark(5 * 64 * KiB, 3 * 64 * KiB), mark(10 * MiB, 1), close()
OLD_SMALL_HEADER = bytes.fromhex(
    "424d444952545931010000000010000000000100000000000100a00000000000"
    "a1000000000000000000000000000000000000000000000000000000a64c4d09"
)
OLD_SMALL_BITMAP = {0: 0b11100001, 20: 0b00000001}  # regions 0, 5, 6, 7 and 160 (the last)
#   DirtyMap.create(p, volume_size=3 * TiB + 512, region_size=MiB, all_dirty=True), close()
OLD_LARGE_HEADER = bytes.fromhex(
    "424d444952545931010000000010000000001000000000000002000000030000"
    "01003000000000000000000000000000000000000000000000000000575b541d"
)


def old_small_file() -> bytes:
    bitmap = bytearray(PAGE_SIZE)
    for index, value in OLD_SMALL_BITMAP.items():
        bitmap[index] = value
    return OLD_SMALL_HEADER + bytes(PAGE_SIZE - HEADER_SIZE) + bytes(bitmap)


def test_a_map_written_by_the_old_crc_code_opens(tmp_path: Path) -> None:
    path = tmp_path / "old.dirty"
    path.write_bytes(old_small_file())
    vs, rs = 10 * MiB + 1, 64 * KiB
    with DirtyMap.open(path, volume_size=vs, region_size=rs) as dm:
        assert list(dm.dirty_regions()) == [(0, rs), (5 * rs, 3 * rs), (160 * rs, 1)]
        assert dm.dirty_regions_count() == 5


def test_a_new_map_is_byte_identical_to_the_old_code(tmp_path: Path) -> None:
    path = tmp_path / "new.dirty"
    vs, rs = 10 * MiB + 1, 64 * KiB
    with DirtyMap.create(path, volume_size=vs, region_size=rs) as dm:
        dm.mark(0, 1)
        dm.mark(5 * rs, 3 * rs)
        dm.mark(10 * MiB, 1)
    assert path.read_bytes() == old_small_file()

    large = tmp_path / "large.dirty"
    regions = 3 * MiB + 1
    DirtyMap.create(large, volume_size=3 * TiB + 512, region_size=MiB, all_dirty=True).close()
    data = large.read_bytes()
    assert data[:HEADER_SIZE] == OLD_LARGE_HEADER
    assert crc32c(OLD_LARGE_HEADER[:60]) == int.from_bytes(OLD_LARGE_HEADER[60:], "little")
    full = regions // 8
    assert data[PAGE_SIZE:] == b"\xff" * full + b"\x01" + bytes(len(data) - PAGE_SIZE - full - 1)
    with DirtyMap.open(large, volume_size=3 * TiB + 512, region_size=MiB) as dm:
        assert dm.dirty_regions_count() == regions
        assert dm.dirty_bytes() == 3 * TiB + 512


def test_a_bitmap_shortened_while_opening_is_a_dirty_map_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file size is checked before the bitmap is read; a truncation between the two must
    # still refuse the map, never hand back a bitmap with missing (clean-looking) pages.
    path = tmp_path / "m.dirty"
    DirtyMap.create(path, volume_size=MiB, region_size=4 * KiB).close()

    def short(fd: int, size: int, pos: int) -> bytes:
        data = pread_all(fd, size, pos)
        return data[:-1] if pos == PAGE_SIZE else data

    monkeypatch.setattr(dirtymap_mod, "pread_all", short)
    with pytest.raises(DirtyMapError, match=r"cannot read.*ended early"):
        DirtyMap.open(path, volume_size=MiB, region_size=4 * KiB)


def test_create_writes_header_page_and_clean_bitmap(tmp_path: Path) -> None:
    path = tmp_path / "vol.peer.dirty"
    vs, rs = 10 * MiB + 1, 64 * KiB
    with DirtyMap.create(path, volume_size=vs, region_size=rs) as dm:
        assert (dm.path, dm.volume_size, dm.region_size) == (path, vs, rs)
        assert dm.is_clean() and not dm.pending()
    data = path.read_bytes()
    assert len(data) == PAGE_SIZE * (1 + bitmap_pages(vs, rs)) == 2 * PAGE_SIZE
    magic, version, bitmap_offset, f_rs, f_vs, f_count, crc = struct.unpack_from(
        "<8sIIQQQ20xI", data
    )
    assert (magic, version, bitmap_offset, f_rs, f_vs, f_count) == (
        MAGIC,
        VERSION,
        PAGE_SIZE,
        rs,
        vs,
        161,
    )
    assert crc == crc32c(data[:60])
    assert data[HEADER_SIZE:] == bytes(len(data) - HEADER_SIZE)
    assert not (tmp_path / "vol.peer.dirty.new").exists()


def test_bitmap_is_page_rounded(tmp_path: Path) -> None:
    assert bitmap_pages(1, 1) == 1
    assert bitmap_pages(BITS_PER_PAGE, 1) == 1
    assert bitmap_pages(BITS_PER_PAGE + 1, 1) == 2
    assert bitmap_pages(10 * TiB, 64 * KiB) == 5120  # 160 Mi bits = 20 MiB


def test_create_replaces_an_existing_map(tmp_path: Path) -> None:
    path = tmp_path / "m.dirty"
    with DirtyMap.create(path, volume_size=MiB, region_size=4 * KiB) as dm:
        dm.mark(0, MiB)
    with DirtyMap.create(path, volume_size=2 * MiB, region_size=4 * KiB) as dm:
        assert dm.is_clean()
    with DirtyMap.open(path, volume_size=2 * MiB, region_size=4 * KiB) as dm:
        assert dm.is_clean()


def test_create_all_dirty(tmp_path: Path) -> None:
    path = tmp_path / "m.dirty"
    vs = 3 * BITS_PER_PAGE + 5
    dm = DirtyMap.create(path, volume_size=vs, region_size=1, all_dirty=True)
    assert not dm.pending()  # written by create, nothing left to sync
    assert list(dm.dirty_regions()) == [(0, vs)]
    dm.close(sync=False)
    assert on_disk(path) == span(0, vs)  # durable from the start, padding bits clear


def test_create_refuses_bad_geometry(tmp_path: Path) -> None:
    path = tmp_path / "m.dirty"
    for vs, rs in [(0, 4096), (-1, 4096), (MiB, 0), (MiB, 3000), (MiB, -4096), (100 * TiB, 512)]:
        with pytest.raises(DirtyMapError):
            DirtyMap.create(path, volume_size=vs, region_size=rs)
    assert not path.exists()


def test_create_in_missing_directory_is_a_dirty_map_error(tmp_path: Path) -> None:
    with pytest.raises(DirtyMapError, match="cannot create"):
        DirtyMap.create(tmp_path / "nope" / "m.dirty", volume_size=MiB)


def test_default_region_size_is_64k(tmp_path: Path) -> None:
    with DirtyMap.create(tmp_path / "m.dirty", volume_size=MiB) as dm:
        assert dm.region_size == 64 * KiB
    with DirtyMap.open(tmp_path / "m.dirty", volume_size=MiB) as dm:
        assert dm.region_size == 64 * KiB


# -- open: validation -----------------------------------------------------------------------


def rewrite_header(path: Path, **fields: int | bytes) -> None:
    """Rewrite header fields with a correct CRC, to test checks other than the CRC."""
    data = bytearray(path.read_bytes())
    names = ("magic", "version", "bitmap_offset", "region_size", "volume_size", "count")
    values = dict(zip(names, struct.unpack_from("<8sIIQQQ", data), strict=True))
    values.update(fields)
    struct.pack_into("<8sIIQQQ", data, 0, *(values[n] for n in names))
    struct.pack_into("<I", data, 60, crc32c(bytes(data[:60])))
    path.write_bytes(data)


def flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(data)


CORRUPTIONS: dict[str, tuple[Callable[[Path], object], str]] = {
    "magic": (lambda p: flip(p, 0), "not a dirty map"),
    "reserved byte": (lambda p: flip(p, 45), "checksum"),
    "crc": (lambda p: flip(p, 61), "checksum"),
    "volume size field": (lambda p: flip(p, 24), "checksum"),
    "version": (lambda p: rewrite_header(p, version=2), "version 2"),
    "bitmap offset": (lambda p: rewrite_header(p, bitmap_offset=64), "inconsistent"),
    "region count": (lambda p: rewrite_header(p, count=7), "inconsistent"),
    "zero region size": (lambda p: rewrite_header(p, region_size=0), "inconsistent"),
    "empty file": (lambda p: p.write_bytes(b""), "too short"),
    "short header": (lambda p: p.write_bytes(p.read_bytes()[:40]), "too short"),
    "truncated bitmap": (lambda p: os.truncate(p, PAGE_SIZE + 100), "truncated"),
    "extended file": (lambda p: os.truncate(p, 4 * PAGE_SIZE), "truncated"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_open_rejects_a_bad_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "m.dirty"
    DirtyMap.create(path, volume_size=MiB, region_size=4 * KiB).close()
    corrupt, message = CORRUPTIONS[kind]
    corrupt(path)
    with pytest.raises(DirtyMapError, match=message) as info:
        DirtyMap.open(path, volume_size=MiB, region_size=4 * KiB)
    assert isinstance(info.value, BlockmirrorError)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("vs", "rs"), [(MiB + 1, 4 * KiB), (2 * MiB, 4 * KiB), (MiB, 8 * KiB), (MiB, 2 * KiB)]
)
def test_open_rejects_other_geometry(tmp_path: Path, vs: int, rs: int) -> None:
    path = tmp_path / "m.dirty"
    DirtyMap.create(path, volume_size=MiB, region_size=4 * KiB).close()
    with pytest.raises(DirtyMapError, match="made for a 1048576-byte volume with 4096-byte"):
        DirtyMap.open(path, volume_size=vs, region_size=rs)


def test_open_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DirtyMapError, match="cannot open"):
        DirtyMap.open(tmp_path / "absent.dirty", volume_size=MiB)


def test_open_ignores_padding_bits_past_the_last_region(tmp_path: Path) -> None:
    path = tmp_path / "m.dirty"
    vs = 13  # regions 0..12 in bytes 0 and 1; everything after is padding
    DirtyMap.create(path, volume_size=vs, region_size=1).close()
    data = bytearray(path.read_bytes())
    data[PAGE_SIZE + 1] = 0xFF
    data[PAGE_SIZE + 100] = 0x80
    path.write_bytes(data)
    with DirtyMap.open(path, volume_size=vs, region_size=1) as dm:
        assert list(dm.dirty_regions()) == [(8, 5)]
        assert dm.dirty_regions_count() == 5
        assert dm.dirty_bytes() == 5


# -- bit semantics ------------------------------------------------------------------------


@pytest.fixture
def dm(tmp_path: Path) -> DirtyMap:
    # 100 regions of 64 KiB, the last one only half inside the volume.
    return DirtyMap.create(tmp_path / "m.dirty", volume_size=99 * 64 * KiB + 32 * KiB)


def test_mark_sets_every_region_touched(dm: DirtyMap) -> None:
    rs = dm.region_size
    assert dm.mark(1, 1)
    assert dm.mark(3 * rs - 1, 2)  # straddles regions 2 and 3
    assert dm.mark(10 * rs, rs)  # exactly region 10
    assert dm.mark(20 * rs + 5, 0) is False  # empty range touches nothing
    check_matches(dm, span(0, 1) | span(2, 4) | span(10, 11))
    assert list(dm.dirty_regions()) == [(0, rs), (2 * rs, 2 * rs), (10 * rs, rs)]


def test_mark_reports_only_bits_not_yet_durable(dm: DirtyMap) -> None:
    assert dm.mark(0, 1)
    # Already set, but not durable: the second writer must wait for a sync too.
    assert dm.mark(0, 1)
    dm.sync()
    assert not dm.pending()
    assert dm.mark(0, 1) is False
    assert dm.mark(100, 1000) is False
    dm.mark(5 * dm.region_size, 1)
    dm.sync()
    # A pending clear does not make the set bits elsewhere in its page any less durable.
    dm.clear(0, dm.region_size)
    assert dm.pending()
    assert dm.mark(5 * dm.region_size, 1) is False


def test_clear_only_clears_regions_wholly_inside(dm: DirtyMap) -> None:
    rs = dm.region_size
    dm.mark_all()
    dm.clear(rs + 1, 3 * rs)  # regions 1 and 4 partly, 2 and 3 wholly
    dm.clear(10 * rs, rs - 1)  # region 10 not quite
    dm.clear(20 * rs, 0)
    assert list(dm.dirty_regions(limit=2)) == [(0, 2 * rs), (4 * rs, dm.volume_size - 4 * rs)]


def test_clear_reaching_the_end_clears_the_partial_last_region(dm: DirtyMap) -> None:
    rs, vs = dm.region_size, dm.volume_size
    dm.mark_all()
    assert dm.dirty_bytes() == vs
    assert dm.dirty_regions_count() == 100
    dm.clear(99 * rs, vs - 99 * rs)  # all of region 99 that exists
    assert dm.dirty_regions_count() == 99
    assert list(dm.dirty_regions()) == [(0, 99 * rs)]


def test_dirty_bytes_clips_the_last_region(dm: DirtyMap) -> None:
    rs, vs = dm.region_size, dm.volume_size
    dm.mark(vs - 1, 1)
    assert dm.dirty_regions_count() == 1
    assert dm.dirty_bytes() == vs - 99 * rs == 32 * KiB
    assert list(dm.dirty_regions()) == [(99 * rs, 32 * KiB)]


def test_dirty_regions_start_and_limit(dm: DirtyMap) -> None:
    rs = dm.region_size
    for first, end in [(0, 3), (5, 6), (7, 20), (50, 51)]:
        dm.mark(first * rs, (end - first) * rs)
    assert list(dm.dirty_regions(start=rs + 7)) == [
        (rs, 2 * rs),  # starts at the region holding `start`
        (5 * rs, rs),
        (7 * rs, 13 * rs),
        (50 * rs, rs),
    ]
    assert list(dm.dirty_regions(start=4 * rs, limit=2)) == [(5 * rs, rs), (7 * rs, 13 * rs)]
    assert list(dm.dirty_regions(limit=0)) == []
    assert list(dm.dirty_regions(start=dm.volume_size)) == []
    with pytest.raises(ValueError):
        dm.dirty_regions(limit=-1)


def test_mark_all_and_clear_all(dm: DirtyMap) -> None:
    assert dm.mark_all()
    assert list(dm.dirty_regions()) == [(0, dm.volume_size)]
    assert dm.mark_all()  # still not durable
    dm.sync()
    assert dm.mark_all() is False
    dm.clear_all()
    assert dm.is_clean()
    assert dm.dirty_bytes() == 0


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-1, 1), (0, -1), (0, 99 * 64 * KiB + 32 * KiB + 1), (99 * 64 * KiB + 32 * KiB, 1), (-5, 0)],
)
def test_out_of_range_changes_nothing(dm: DirtyMap, offset: int, length: int) -> None:
    with pytest.raises(OutOfRangeError):
        dm.mark(offset, length)
    with pytest.raises(OutOfRangeError):
        dm.clear(offset, length)
    assert dm.is_clean() and not dm.pending()


def test_out_of_range_start(dm: DirtyMap) -> None:
    for start in (-1, dm.volume_size + 1):
        with pytest.raises(OutOfRangeError):
            dm.dirty_regions(start=start)


def test_closed_map_refuses_changes(tmp_path: Path) -> None:
    dm = DirtyMap.create(tmp_path / "m.dirty", volume_size=MiB)
    dm.close()
    dm.close()  # idempotent
    for call in (lambda: dm.mark(0, 1), lambda: dm.clear(0, 1), dm.sync):
        with pytest.raises(DirtyMapError, match="closed"):
            call()
    assert "closed" in repr(dm)


def test_close_syncs_unless_told_not_to(tmp_path: Path) -> None:
    path = tmp_path / "m.dirty"
    dm = DirtyMap.create(path, volume_size=MiB, region_size=4 * KiB)
    dm.mark(0, 1)
    dm.close()
    dm = DirtyMap.open(path, volume_size=MiB, region_size=4 * KiB)
    assert list(dm.dirty_regions()) == [(0, 4 * KiB)]
    dm.mark(8 * KiB, 1)
    dm.close(sync=False)
    dm = DirtyMap.open(path, volume_size=MiB, region_size=4 * KiB)
    assert list(dm.dirty_regions()) == [(0, 4 * KiB)]
    dm.close()


def test_sync_writes_only_changed_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.dirty"
    dm = DirtyMap.create(path, volume_size=8 * BITS_PER_PAGE, region_size=1)
    writes: list[tuple[int, int]] = []
    real = os.pwritev

    def spy(fd: int, buffers: list[memoryview], pos: int) -> int:
        writes.append((pos, sum(memoryview(b).nbytes for b in buffers)))
        return real(fd, buffers, pos)

    monkeypatch.setattr(os, "pwritev", spy)
    dm.mark(1, 1)  # page 0
    dm.mark(3 * BITS_PER_PAGE - 1, 2)  # pages 2 and 3: one pwritev
    dm.mark(6 * BITS_PER_PAGE + 9, 1)  # page 6
    dm.sync()
    assert writes == [
        (PAGE_SIZE, PAGE_SIZE),
        (3 * PAGE_SIZE, 2 * PAGE_SIZE),
        (7 * PAGE_SIZE, PAGE_SIZE),
    ]
    writes.clear()
    dm.mark(1, 1)  # nothing new
    dm.sync()
    assert writes == []
    dm.close()


# -- durability and concurrency -----------------------------------------------------------


def test_marks_during_a_sync_stay_pending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.dirty"
    dm = DirtyMap.create(path, volume_size=3 * BITS_PER_PAGE, region_size=1)
    far = BITS_PER_PAGE + 7  # a region on page 1
    assert dm.mark(0, 1)
    entered, release = threading.Event(), threading.Event()
    real = os.pwritev

    def slow_pwritev(fd: int, buffers: list[memoryview], pos: int) -> int:
        entered.set()
        assert release.wait(10)
        return real(fd, buffers, pos)

    monkeypatch.setattr(os, "pwritev", slow_pwritev)
    worker = threading.Thread(target=dm.sync)
    worker.start()
    assert entered.wait(10)  # the sync has taken its snapshot and is about to write it
    assert dm.pending()
    assert dm.mark(0, 1)  # set, but its sync has not returned: still must wait
    assert dm.mark(5, 1)  # same page as the snapshot, after it
    assert dm.mark(far, 1)  # another page
    release.set()
    worker.join(10)
    assert not worker.is_alive()
    monkeypatch.undo()

    assert on_disk(path) == 1  # exactly the snapshot: region 0
    assert dm.pending()
    assert dm.mark(far, 1)  # page 1 still pending
    dm.sync()
    assert on_disk(path) == 1 | 1 << 5 | 1 << far
    assert not dm.pending()
    assert dm.mark(0, 1) is False
    dm.close()


def test_failed_sync_keeps_pages_pending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.dirty"
    dm = DirtyMap.create(path, volume_size=MiB, region_size=4 * KiB)
    dm.mark(0, 1)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(OSError, match="injected"):
        dm.sync()
    assert dm.pending()
    assert dm.mark(0, 1)  # still not durable
    monkeypatch.undo()
    dm.sync()
    assert not dm.pending()
    assert dm.mark(0, 1) is False
    dm.close(sync=False)
    assert on_disk(path) == 1


def test_concurrent_marks_and_syncs(tmp_path: Path) -> None:
    path = tmp_path / "m.dirty"
    vs, rs = 4 * BITS_PER_PAGE * 512, 512
    dm = DirtyMap.create(path, volume_size=vs, region_size=rs)
    stop = threading.Event()
    errors: list[BaseException] = []

    def syncer() -> None:
        try:
            while not stop.is_set():
                dm.sync()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=syncer)
    worker.start()
    rng = random.Random(7)
    model = 0
    try:
        for _ in range(3000):
            offset = rng.randrange(vs)
            length = rng.randrange(min(vs - offset, 64 * rs) + 1)
            if rng.random() < 0.8:
                dm.mark(offset, length)
                model |= touched(offset, length, rs)
            else:
                dm.clear(offset, length)
                model &= ~covered(offset, length, rs, vs)
    finally:
        stop.set()
        worker.join(30)
    assert not errors
    dm.sync()
    check_matches(dm, model)
    assert on_disk(path) == model
    dm.close()


def test_torn_page_write_leaves_a_superset(tmp_path: Path) -> None:
    path = tmp_path / "m.dirty"
    vs = 2 * BITS_PER_PAGE
    dm = DirtyMap.create(path, volume_size=vs, region_size=1)
    before = 0
    for first, end in [(3, 9), (20000, 20100), (BITS_PER_PAGE + 1, BITS_PER_PAGE + 2)]:
        dm.mark(first, end - first)
        before |= span(first, end)
    dm.sync()
    # New marks on both halves of page 0 and a clear, then a crash mid-write of page 0.
    after = before
    for first, end in [(100, 200), (30000, 30001)]:
        dm.mark(first, end - first)
        after |= span(first, end)
    dm.clear(20000, 50)
    after &= ~span(20000, 20050)
    for part in (slice(0, PAGE_SIZE // 2), slice(PAGE_SIZE // 2, PAGE_SIZE)):
        tear(path, 0, page_bytes(after, 0), part)
        with DirtyMap.open(path, volume_size=vs, region_size=1) as reopened:
            got = regions_in(reopened)
        assert got & before & after == before & after  # nothing still needed was lost
        assert got & ~(before | after) == 0  # and nothing appeared from nowhere
        tear(path, 0, page_bytes(before, 0), slice(0, PAGE_SIZE))  # undo for the next case
    # The untorn pieces of a mark-only tear: the pre-mark state survives whole.
    tear(path, 0, page_bytes(before | span(100, 200), 0), slice(0, PAGE_SIZE // 2))
    with DirtyMap.open(path, volume_size=vs, region_size=1) as reopened:
        assert regions_in(reopened) & before == before
    dm.close(sync=False)


def test_large_volume(tmp_path: Path) -> None:
    path = tmp_path / "big.dirty"
    vs, rs = 10 * TiB, 64 * KiB
    dm = DirtyMap.create(path, volume_size=vs, region_size=rs)
    assert path.stat().st_size == PAGE_SIZE + 20 * MiB
    page_edge = 3 * BITS_PER_PAGE * rs  # volume offset where bitmap page 3 starts
    dm.mark(0, 1)
    dm.mark(page_edge - 1, 2)  # one region each side of a bitmap page boundary
    dm.mark(5 * TiB, 3 * MiB + 1)
    dm.mark(vs - 1, 1)
    expected = [
        (0, rs),
        (page_edge - rs, 2 * rs),
        (5 * TiB, 3 * MiB + rs),
        (vs - rs, rs),
    ]
    assert list(dm.dirty_regions()) == expected
    assert dm.dirty_regions_count() == 1 + 2 + 49 + 1
    assert dm.dirty_bytes() == 53 * rs
    assert list(dm.dirty_regions(start=page_edge, limit=1)) == [(page_edge, rs)]
    dm.sync()
    dm.close()
    dm = DirtyMap.open(path, volume_size=vs, region_size=rs)
    assert list(dm.dirty_regions()) == expected
    dm.mark_all()
    assert list(dm.dirty_regions()) == [(0, vs)]
    assert dm.dirty_bytes() == vs
    dm.clear(rs, vs - 2 * rs)
    assert list(dm.dirty_regions()) == [(0, rs), (vs - rs, rs)]
    dm.clear_all()
    assert dm.is_clean()
    dm.close()


# -- stateful model -------------------------------------------------------------------------

# Region counts around bitmap byte and page boundaries, up to three pages and a bit.
REGION_COUNTS = [1, 7, 8, 9, 100, BITS_PER_PAGE, BITS_PER_PAGE + 1, 3 * BITS_PER_PAGE + 13]


class DirtyMapMachine(RuleBasedStateMachine):
    """mark / clear / sync / reopen / crash / torn write against the model.

    ``mem`` is what the map must hold in memory; ``synced`` is what it held at the last sync,
    which is exactly what the file holds, since only sync writes it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="dirtymap-"))
        self.path = self.dir / "vol.peer.dirty"
        self.dm: DirtyMap | None = None
        self.vs = self.rs = 1
        self.mem = self.synced = 0

    def teardown(self) -> None:
        if self.dm is not None:
            self.dm.close(sync=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def map(self) -> DirtyMap:
        assert self.dm is not None
        return self.dm

    @initialize(
        regions=st.sampled_from(REGION_COUNTS),
        rs=st.sampled_from([1, 4, 64 * KiB]),
        short=st.integers(0, 3),
    )
    def create(self, regions: int, rs: int, short: int) -> None:
        self.rs = rs
        self.vs = regions * rs - min(short, rs - 1)  # maybe a partial last region
        self.dm = DirtyMap.create(self.path, volume_size=self.vs, region_size=rs)

    def draw_range(self, data: st.DataObject) -> tuple[int, int]:
        offset = data.draw(st.integers(0, self.vs), label="offset")
        rest = self.vs - offset
        length = data.draw(
            st.one_of(st.integers(0, min(rest, 40 * self.rs)), st.integers(0, rest)),
            label="length",
        )
        return offset, length

    def do_mark(self, offset: int, length: int) -> None:
        bits = touched(offset, length, self.rs)
        needs_sync = self.map.mark(offset, length)
        if bits & ~self.mem:
            assert needs_sync, "a newly set bit must be synced before the write"
        if not needs_sync:
            assert bits & ~self.synced == 0, "False promised every covering bit was durable"
        self.mem |= bits

    @rule(data=st.data())
    def mark(self, data: st.DataObject) -> None:
        self.do_mark(*self.draw_range(data))

    @rule()
    def mark_all(self) -> None:
        self.do_mark(0, self.vs)

    @rule(data=st.data())
    def clear(self, data: st.DataObject) -> None:
        offset, length = self.draw_range(data)
        self.map.clear(offset, length)
        self.mem &= ~covered(offset, length, self.rs, self.vs)

    @rule()
    def clear_all(self) -> None:
        self.map.clear_all()
        self.mem = 0

    @rule()
    def sync(self) -> None:
        self.map.sync()
        self.synced = self.mem
        assert not self.map.pending()
        assert on_disk(self.path) == self.mem

    @rule()
    def reopen(self) -> None:
        self.map.close()
        self.dm = DirtyMap.open(self.path, volume_size=self.vs, region_size=self.rs)
        self.synced = self.mem
        assert not self.map.pending()

    @rule()
    def crash(self) -> None:
        # Nothing reaches the file outside sync, so a crash leaves exactly the synced state:
        # unsynced marks are lost (their writes were never allowed to proceed), unsynced
        # clears come back (an extra copy).
        self.map.close(sync=False)
        self.dm = DirtyMap.open(self.path, volume_size=self.vs, region_size=self.rs)
        assert regions_in(self.map) == self.synced
        self.mem = self.synced

    @rule(data=st.data())
    def torn_write(self, data: st.DataObject) -> None:
        pages = bitmap_pages(self.vs, self.rs)
        diff = self.mem ^ self.synced
        changed = [p for p in range(pages) if diff >> (p * BITS_PER_PAGE) & span(0, BITS_PER_PAGE)]
        page = data.draw(st.sampled_from(changed or list(range(pages))), label="page")
        sectors = data.draw(st.integers(0, 8), label="sectors")  # 512-byte sectors written
        half = data.draw(st.sampled_from(["first", "last"]), label="which end")
        cut = sectors * 512
        part = slice(0, cut) if half == "first" else slice(PAGE_SIZE - cut, PAGE_SIZE)
        self.map.close(sync=False)
        tear(self.path, page, page_bytes(self.mem, page), part)
        self.dm = DirtyMap.open(self.path, volume_size=self.vs, region_size=self.rs)
        got = regions_in(self.map)
        # Each bit is its old (synced) value or its new one. Everything both agree is dirty
        # survived; nothing neither had appeared; only the torn page moved.
        assert got & self.synced & self.mem == self.synced & self.mem
        assert got & ~(self.synced | self.mem) == 0
        page_bits = span(page * BITS_PER_PAGE, (page + 1) * BITS_PER_PAGE)
        assert got & ~page_bits == self.synced & ~page_bits
        self.mem = self.synced = got

    @rule(data=st.data())
    def query(self, data: st.DataObject) -> None:
        start = data.draw(st.integers(0, self.vs), label="start")
        limit = data.draw(st.none() | st.integers(0, 5), label="limit")
        expected = runs_of(self.mem, self.rs, self.vs, start // self.rs)
        if limit is not None:
            expected = expected[:limit]
        assert list(self.map.dirty_regions(start, limit)) == expected

    @invariant()
    def matches_model(self) -> None:
        if self.dm is None:
            return
        check_matches(self.dm, self.mem)
        if self.mem != self.synced:
            assert self.dm.pending()


TestDirtyMapMachine = DirtyMapMachine.TestCase
TestDirtyMapMachine.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
