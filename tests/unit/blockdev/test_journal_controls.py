"""The operator's journal controls on a real journal: each change is checkpointed, a discard
turns exactly the chosen records into dirty bits, and a bad range changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blockmirror.blockdev.journal_controls import DiscardRangeError
from blockmirror.errors import WritePathError
from blockmirror.journal.checkpoint import read_checkpoint
from blockmirror.state import ConsumerMode
from tests.unit.blockdev.rig import BLOCK, REGION, caught_up, open_rig, run, settle, write_path


def test_pausing_enqueueing_is_checkpointed_and_bypasses_the_journal(tmp_path: Path) -> None:
    rig = open_rig(tmp_path, consumers=("peer",))

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        caught_up(rig.journal, "peer")
        wp = write_path(rig, loop)
        controls = wp.controls
        await controls.pause_enqueue(True)
        assert controls.enqueue_paused
        found = read_checkpoint(rig.journal.file)
        assert found is not None and found[2].enqueue_paused
        newest = controls.newest_seq
        await settle(wp, wp.write(0, [b"\x01" * BLOCK], fua=True))
        assert controls.newest_seq == newest  # no record
        assert rig.journal.consumers["peer"].dirty.dirty_bytes() == REGION
        assert wp.unjournaled_count == 1
        await controls.pause_enqueue(False)
        assert not controls.enqueue_paused
        await wp.close()

    try:
        run(body)
    finally:
        rig.close()


def test_pausing_a_consumer_is_checkpointed_and_shown(tmp_path: Path) -> None:
    rig = open_rig(tmp_path, consumers=("peer",))

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = write_path(rig, loop)
        controls = wp.controls
        assert controls.consumer_names() == ["peer"]
        await controls.pause_consumer("peer", True)
        assert controls.consumer_status("peer")["paused"] is True
        found = read_checkpoint(rig.journal.file)
        assert found is not None and found[2].consumers["peer"].paused
        with pytest.raises(KeyError):
            await controls.pause_consumer("nobody", True)
        await wp.close()

    try:
        run(body)
    finally:
        rig.close()


def test_discard_turns_the_chosen_records_into_dirty_bits(tmp_path: Path) -> None:
    rig = open_rig(tmp_path, consumers=("peer",))

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        caught_up(rig.journal, "peer")
        wp = write_path(rig, loop)
        controls = wp.controls
        first = rig.journal.next_seq
        for i in range(4):  # one record per dirty region
            await settle(wp, wp.write(i * REGION, [b"\x07" * BLOCK], fua=False))
        peer = rig.journal.consumers["peer"]
        with pytest.raises(DiscardRangeError) as refused:
            await controls.discard("peer", first + 1, first + 2)  # would skip `first`
        assert isinstance(refused.value, WritePathError) and isinstance(refused.value, ValueError)
        assert peer.dirty.is_clean() and peer.acked_seq == first - 1  # nothing changed
        assert await controls.discard("peer", first, first + 1) == 2
        assert peer.acked_seq == first + 1 and peer.mode == ConsumerMode.JOURNAL
        assert peer.dirty.dirty_bytes() == 2 * REGION
        assert controls.consumer_status("peer")["backlog_records"] == 2
        await wp.close()

    try:
        run(body)
    finally:
        rig.close()
