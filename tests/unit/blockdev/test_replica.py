"""A secondary's apply: received records keep their numbers, times and origins and reach the
replica in order; resync data goes outside the journal, into every consumer's dirty map;
an emptied journal is renumbered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blockmirror.errors import JournalError
from blockmirror.journal.format import Kind
from blockmirror.journal.record import Record, origin_id
from blockmirror.state import ConsumerMode
from tests.unit.blockdev.rig import BLOCK, caught_up, open_rig, run, write_path

ORIGIN = origin_id("site-a")


def received(seq: int, value: int, *, kind: Kind = Kind.WRITE) -> Record:
    data = (bytes([value]) * BLOCK,) if kind == Kind.WRITE else ()
    return Record(
        kind=kind,
        offset=(seq % 8) * BLOCK,
        length=BLOCK,
        data=data,
        seq=seq,
        timestamp_ns=1_700_000_000_000_000_000 + seq,
        origin=ORIGIN,
    )


def test_records_keep_their_numbers_times_and_origins(tmp_path: Path) -> None:
    rig = open_rig(tmp_path)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = write_path(rig, loop)
        first = rig.journal.next_seq
        records = [received(first + i, i + 1) for i in range(3)]
        records.append(received(first + 3, 0, kind=Kind.ZERO))
        durable = await wp.append_replicated(records)
        await asyncio.wait_for(durable, 5)
        assert rig.journal.durable_seq >= first + 3
        kept = list(rig.journal.records)[-4:]
        assert [(r.seq, r.timestamp_ns, r.origin) for r in kept] == [
            (r.seq, r.timestamp_ns, r.origin) for r in records
        ]
        assert wp.applied_seq == first + 3
        for r in records[:3]:
            assert rig.volume.pread(r.offset, BLOCK) == r.data[0]
        assert rig.volume.pread(records[3].offset, BLOCK) == bytes(BLOCK)
        await wp.close()

    try:
        run(body)
    finally:
        rig.close()


def test_a_record_out_of_order_is_refused(tmp_path: Path) -> None:
    rig = open_rig(tmp_path)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = write_path(rig, loop)
        with pytest.raises(JournalError, match="was expected"):
            await wp.append_replicated([received(rig.journal.next_seq + 1, 1)])
        await wp.close()

    try:
        run(body)
    finally:
        rig.close()


def test_resync_data_goes_to_every_dirty_map_and_the_replica(tmp_path: Path) -> None:
    rig = open_rig(tmp_path, consumers=("relay",))

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        caught_up(rig.journal, "relay")
        wp = write_path(rig, loop)
        relay = rig.journal.consumers["relay"]
        seq = rig.journal.next_seq
        done = wp.apply_resync(3 * BLOCK, BLOCK, b"\x42" * BLOCK)
        zeros = wp.apply_resync(4 * BLOCK, BLOCK, None)
        await asyncio.wait_for(asyncio.gather(done, zeros), 5)
        assert rig.volume.pread(3 * BLOCK, BLOCK) == b"\x42" * BLOCK
        assert rig.volume.pread(4 * BLOCK, BLOCK) == bytes(BLOCK)
        assert rig.journal.next_seq == seq  # not journaled
        assert relay.mode == ConsumerMode.TRACKING  # the relayed peer copies regions again
        assert relay.dirty.dirty_bytes() > 0
        await wp.close()

    try:
        run(body)
    finally:
        rig.close()


def test_rebase_renumbers_an_emptied_journal(tmp_path: Path) -> None:
    rig = open_rig(tmp_path, consumers=("relay",))

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        caught_up(rig.journal, "relay")
        wp = write_path(rig, loop)
        first = rig.journal.next_seq
        await wp.append_replicated([received(first, 1), received(first + 1, 2)])
        await wp.rebase(1000)
        assert rig.journal.next_seq == 1000 and wp.applied_seq == 999
        assert not rig.journal.records
        assert rig.journal.consumers["relay"].mode == ConsumerMode.TRACKING
        durable = await wp.append_replicated([received(1000, 3)])
        await asyncio.wait_for(durable, 5)
        assert wp.applied_seq == 1000
        await wp.close()

    try:
        run(body)
    finally:
        rig.close()
