"""The block commands over an in-memory disk: reads and writes, durability and the commit gate,
write protection, errnos as sense, WRITE SAME, UNMAP, GET LBA STATUS, VERIFY, START STOP UNIT;
and the same over a real BlockDevice."""

from __future__ import annotations

import asyncio
import errno
import struct
from pathlib import Path

import pytest

from blockmirror.blockdev.service import BlockDevice, RequestError
from blockmirror.blockdev.writepath import DirectWritePath
from blockmirror.frontend import scsi_sense as s
from blockmirror.frontend.scsi_pages import Identity
from blockmirror.frontend.scsi_target import ScsiLogicalUnit, ScsiResult, Transfer
from blockmirror.store.volume import Volume
from tests.unit.frontend.scsi_memory_disk import (
    BS,
    SIZE,
    SYNC10,
    TUR,
    A,
    MemoryDisk,
    good,
    lba_status,
    read10,
    read16,
    run,
    sense_of,
    unit,
    unmap,
    unmap_list,
    verify10,
    write10,
    write_same16,
)

# --- reads and writes -----------------------------------------------------------------------


def test_write_then_read_round_trip() -> None:
    lu, disk = unit()
    payload = bytes(range(256)) * 8  # 4 blocks
    # None from the disk is "accepted": done or staged, the gate's commit decides (a no-op
    # commit for the direct write path).
    assert good(run(lu, write10(10, 4), payload)).gated
    assert disk.calls[-1] == ("write", 10 * BS, 4 * BS, False)
    got = good(run(lu, read16(10, 4)))
    assert got.data_in == payload
    assert ("read_done", 4 * BS) in disk.calls


def test_write_takes_segments_without_joining_and_ignores_extra_bytes() -> None:
    lu, disk = unit()
    good(run(lu, write10(0, 2), [b"a" * 300, memoryview(b"b" * 500), b"c" * 300]))
    assert disk.data[: 2 * BS] == b"a" * 300 + b"b" * 500 + b"c" * 224


def test_short_data_out_changes_nothing() -> None:
    lu, disk = unit()
    result = run(lu, write10(0, 2), b"x" * (2 * BS - 1))
    assert sense_of(result) == (0x5, 0x0E, 0x03)
    assert not disk.calls and disk.errors == 1


def test_out_of_range_is_refused_before_anything() -> None:
    lu, disk = unit()
    blocks = SIZE // BS
    for cdb in (read10(blocks, 1), read16(2**64 - 1, 1), write10(blocks - 1, 2)):
        assert sense_of(run(lu, cdb, b"z" * 2 * BS)) == (0x5, 0x21, 0x00)
    good(run(lu, read10(blocks, 0)))  # zero blocks at the capacity: nothing to do
    assert sense_of(run(lu, read10(blocks + 1, 0))) == (0x5, 0x21, 0x00)
    assert not [c for c in disk.calls if c[0] != "read_done"]


def test_transfer_longer_than_the_maximum_is_an_invalid_field() -> None:
    lu, _ = unit()  # max_write is 64 blocks
    result = run(lu, read10(0, 65))
    assert sense_of(result) == (0x5, 0x24, 0x00)
    assert result.sense[15] & 0xC0 == 0xC0 and result.sense[17] == 7  # TRANSFER LENGTH field


def test_read_only_unit_refuses_changes_with_write_protected() -> None:
    lu, disk = unit()
    disk.read_only = True
    for cdb, data in (
        (write10(0, 1), bytes(BS)),
        (write_same16(0, 1, unmap=True), b""),  # refused before the missing data-out counts
        (unmap(24), unmap_list((0, 1))),
    ):
        assert sense_of(run(lu, cdb, data)) == (0x7, 0x27, 0x00)
    good(run(lu, read10(0, 1)))
    good(run(lu, SYNC10))
    mode = good(run(lu, bytes((0x1A, 0, 0x3F, 0, 255, 0)))).data_in
    assert mode[2] & 0x80  # WP in the mode parameter header


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EIO, (0x3, 0x0C, 0x00)),
        (errno.ENOSPC, (0x7, 0x27, 0x07)),
        (errno.EPERM, (0x7, 0x27, 0x00)),
        (errno.EROFS, (0x7, 0x27, 0x00)),
        (errno.EINVAL, (0x5, 0x24, 0x00)),
    ],
)
def test_errnos_of_a_change_become_sense(code: int, expected: tuple[int, int, int]) -> None:
    lu, disk = unit()
    disk.fail["write"] = code
    assert sense_of(run(lu, write10(0, 1), bytes(BS))) == expected
    assert lu.commit_failed(RequestError(code, "commit")).sense[2] & 0x0F == expected[0]


def test_a_failed_read_is_an_unrecovered_read_error() -> None:
    lu, disk = unit()
    disk.fail["read"] = errno.EIO
    assert sense_of(run(lu, read10(0, 1))) == (0x3, 0x11, 0x00)
    disk.fail["extents"] = errno.EIO
    assert sense_of(run(lu, lba_status(0))) == (0x3, 0x11, 0x00)


# --- durability and the commit gate ---------------------------------------------------------


def test_staged_write_is_gated_and_fua_waits() -> None:
    async def main() -> None:
        lu, disk = unit(MemoryDisk(mode="staged"))
        staged = lu.submit(A, write10(0, 1), bytes(BS))
        assert isinstance(staged, ScsiResult) and staged.gated  # the ReplyGate must commit it
        fua = lu.submit(A, write10(1, 1, fua=True), bytes(BS))
        assert isinstance(fua, asyncio.Future) and not fua.done()
        assert disk.calls[-1] == ("write", BS, BS, True)
        sync = lu.submit(A, SYNC10)
        assert isinstance(sync, asyncio.Future)
        await asyncio.sleep(0)
        assert not fua.done() and not sync.done()  # nothing answers before durability
        disk.settle()
        assert (await fua).status == s.Status.GOOD and not (await fua).gated
        assert (await sync).status == s.Status.GOOD

    asyncio.run(main())


def test_a_failed_flush_is_a_write_error() -> None:
    async def main() -> None:
        lu, disk = unit(MemoryDisk(mode="staged"))
        sync = lu.submit(A, SYNC10)
        assert isinstance(sync, asyncio.Future)
        disk.settle(OSError(errno.EIO, "fdatasync"))
        assert sense_of(await sync) == (0x3, 0x0C, 0x00)
        assert disk.errors == 1

    asyncio.run(main())


def test_dropping_a_result_does_not_cancel_the_write_path() -> None:
    async def main() -> None:
        lu, disk = unit(MemoryDisk(mode="future"))
        task = asyncio.ensure_future(lu.execute(A, write10(0, 1, fua=True), bytes(BS)))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0)
        assert disk.futures and not disk.futures[0].cancelled()
        disk.settle()

    asyncio.run(main())


def test_execute_is_submit_as_a_coroutine() -> None:
    async def main() -> None:
        lu, disk = unit(MemoryDisk(mode="future"))
        pending = asyncio.ensure_future(lu.execute(A, write10(0, 1), bytes(BS)))
        await asyncio.sleep(0)
        disk.settle()
        assert (await pending).status == s.Status.GOOD
        assert (await lu.execute(A, TUR)).status == s.Status.GOOD

    asyncio.run(main())


# --- WRITE SAME, UNMAP, GET LBA STATUS, VERIFY ----------------------------------------------


def test_write_same_variants() -> None:
    lu, disk = unit()
    pattern = bytes(range(256)) * 2
    good(run(lu, write_same16(4, 3), pattern))
    assert disk.data[4 * BS : 7 * BS] == pattern * 3
    assert disk.calls[-1][0] == "write"
    good(run(lu, write_same16(4, 3), bytes(BS)))
    assert disk.calls[-1] == ("write_zeroes", 4 * BS, 3 * BS, False)
    good(run(lu, write_same16(4, 3, unmap=True), bytes(BS)))
    assert disk.calls[-1] == ("write_zeroes", 4 * BS, 3 * BS, True)
    good(run(lu, write_same16(4, 3, unmap=True, ndob=True)))
    assert disk.calls[-1] == ("write_zeroes", 4 * BS, 3 * BS, True)
    zeroing, disk2 = unit(lbprz=True)
    good(run(zeroing, write_same16(4, 3, unmap=True), bytes(BS)))
    assert disk2.calls[-1] == ("trim", 4 * BS, 3 * BS)
    # A pattern with UNMAP cannot be unmapped: it is written.
    good(run(lu, write_same16(0, 2, unmap=True), pattern))
    assert disk.data[: 2 * BS] == pattern * 2


def test_write_same_refusals() -> None:
    lu, disk = unit()
    assert sense_of(run(lu, write_same16(0, 0), bytes(BS))) == (0x5, 0x24, 0x00)  # WSNZ
    assert sense_of(run(lu, write_same16(0, 65), bytes(BS))) == (0x5, 0x24, 0x00)
    assert sense_of(run(lu, write_same16(1023, 2), bytes(BS))) == (0x5, 0x21, 0x00)
    assert sense_of(run(lu, write_same16(0, 1), b"")) == (0x5, 0x0E, 0x03)
    assert not disk.calls


def test_long_pattern_write_same_is_one_bounded_write() -> None:
    lu, disk = unit(MemoryDisk(size=8192 * BS, max_write=4096 * BS))
    block = b"\x5a" * BS
    good(run(lu, write_same16(0, 4095), block))
    assert [c for c in disk.calls if c[0] == "write"] == [("write", 0, 4095 * BS, False)]
    assert disk.data[: 4095 * BS] == block * 4095


def test_unmap_then_lba_status() -> None:
    lu, disk = unit()
    good(run(lu, unmap(40), unmap_list((8, 4), (20, 2))))
    assert [c for c in disk.calls if c[0] == "trim"] == [
        ("trim", 8 * BS, 4 * BS),
        ("trim", 20 * BS, 2 * BS),
    ]
    data = good(run(lu, lba_status(8))).data_in
    descriptors = [struct.unpack_from(">QIB", data, at) for at in range(8, len(data), 16)]
    assert descriptors[:4] == [(8, 4, 1), (12, 8, 0), (20, 2, 1), (22, 1024 - 22, 0)]
    # Allocation length 24 fits one descriptor: the one for the starting LBA.
    one = good(run(lu, lba_status(9, 24))).data_in
    assert len(one) == 24 and struct.unpack_from(">QIB", one, 8) == (9, 3, 1)
    assert sense_of(run(lu, lba_status(1024))) == (0x5, 0x21, 0x00)


def test_unmap_is_validated_whole_before_any_trim() -> None:
    lu, disk = unit()
    # The second descriptor is out of range: the first must not be trimmed.
    assert sense_of(run(lu, unmap(40), unmap_list((0, 4), (1023, 2)))) == (0x5, 0x21, 0x00)
    too_many = unmap_list(*[(i, 1) for i in range(257)])
    result = run(lu, unmap(len(too_many)), too_many)
    assert sense_of(result) == (0x5, 0x26, 0x00)
    assert result.sense[15] & 0x40 == 0 and result.sense[17] == 2  # parameter list byte 2
    assert sense_of(run(lu, unmap(6), b"\0" * 6)) == (0x5, 0x1A, 0x00)
    assert not [c for c in disk.calls if c[0] == "trim"]
    good(run(lu, unmap(0)))  # no list: nothing to do
    good(run(lu, unmap(24), unmap_list((1024, 0))))  # zero blocks at the end


def test_unmap_answers_once_every_trim_is_done() -> None:
    async def main() -> None:
        lu, disk = unit(MemoryDisk(mode="future"))
        result = lu.submit(A, unmap(40), unmap_list((0, 1), (5, 1)))
        assert isinstance(result, asyncio.Future)
        disk.futures[0].set_result(None)
        await asyncio.sleep(0)
        assert not result.done()
        disk.futures[1].set_exception(OSError(errno.ENOSPC, "thin volume full"))
        assert sense_of(await result) == (0x7, 0x27, 0x07)

    asyncio.run(main())


def test_verify() -> None:
    lu, disk = unit()
    disk.data[0 : 4 * BS] = b"v" * (4 * BS)
    good(run(lu, verify10(0, 4, 1), b"v" * (4 * BS)))
    good(run(lu, verify10(0, 4, 3), b"v" * BS))
    good(run(lu, verify10(0, 4, 0)))
    bad = bytearray(b"v" * (4 * BS))
    bad[1500] = 0
    result = run(lu, verify10(0, 4, 1), bytes(bad))
    assert sense_of(result) == (0xE, 0x1D, 0x00)
    assert result.sense[0] & 0x80 and int.from_bytes(result.sense[3:7], "big") == 1500
    assert sense_of(run(lu, verify10(1024, 1, 0))) == (0x5, 0x21, 0x00)


def test_start_stop_unit() -> None:
    lu, disk = unit()
    good(run(lu, bytes((0x1B, 0, 0, 0, 0x01, 0))))  # start
    good(run(lu, bytes((0x1B, 0, 0, 0, 0x00, 0))))  # stop: the cache is written out
    assert disk.calls[-1] == ("flush",)
    good(run(lu, bytes((0x1B, 0, 0, 0, 0x04, 0))))  # stop, NO_FLUSH
    assert disk.calls[-1] == ("flush",) and len(disk.calls) == 1
    assert sense_of(run(lu, bytes((0x1B, 0, 0, 0, 0x03, 0)))) == (0x5, 0x24, 0x00)  # LOEJ
    assert sense_of(run(lu, bytes((0x1B, 0, 0, 0, 0x11, 0)))) == (0x5, 0x24, 0x00)
    good(run(lu, TUR))  # still ready


def test_4096_byte_blocks() -> None:
    lu, disk = unit(MemoryDisk(size=256 * 4096, max_write=64 * 4096), block_size=4096)
    rc = good(run(lu, bytes((0x25,)) + bytes(9))).data_in
    assert struct.unpack(">II", rc) == (255, 4096)
    good(run(lu, write10(1, 1), b"q" * 4096))
    assert disk.calls[-1] == ("write", 4096, 4096, False)
    assert lu.transfer(write10(0, 2)) == Transfer(8192, 0)


# --- the real BlockDevice fits the Disk protocol ----------------------------------------------


def test_over_a_real_block_device(tmp_path: Path) -> None:
    async def main() -> None:
        volume = Volume.open(tmp_path / "vol.img", size=SIZE)
        try:
            loop = asyncio.get_running_loop()
            device = BlockDevice("vol", volume, DirectWritePath(volume, loop))
            lu = ScsiLogicalUnit(device, Identity("vol-1"), lbprz=True)
            good(await lu.execute(A, write10(3, 2, fua=True), b"r" * (2 * BS)))
            assert good(await lu.execute(A, read10(3, 2))).data_in == b"r" * (2 * BS)
            good(await lu.execute(A, SYNC10))
            good(await lu.execute(A, unmap(24), unmap_list((3, 1))))
            assert good(await lu.execute(A, read10(3, 1))).data_in == bytes(BS)
            device.read_only = True  # a demoted volume
            result = await lu.execute(A, write10(0, 1), bytes(BS))
            assert sense_of(result) == (0x7, 0x27, 0x00)
            assert device.counters.errors >= 1
        finally:
            volume.close()

    asyncio.run(main())
