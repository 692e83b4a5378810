"""Checkpoints and making room: what a checkpoint frees, giving up on the slowest consumer, the
high-water alert, and requests that wait for room being staged in order."""

from __future__ import annotations

import asyncio
from pathlib import Path

from blockmirror.state import ConsumerMode
from tests.unit.blockdev.rig import BLOCK, MiB, caught_up, open_rig, run, settle, write_path


def test_a_checkpoint_frees_what_nobody_needs_once_the_volume_is_durable(tmp_path: Path) -> None:
    rig = open_rig(tmp_path, consumers=("peer",))

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        caught_up(rig.journal, "peer")
        wp = write_path(rig, loop, checkpoint_interval=3600)
        for i in range(5):
            await settle(wp, wp.write(i * BLOCK, [b"\x01" * BLOCK], fua=False))
        count = wp.checkpoints
        await wp.checkpoint()
        assert wp.checkpoints == count + 1
        assert len(rig.journal.records) == 5  # the peer has not acknowledged them
        wp.acknowledge("peer", rig.journal.next_seq - 3)
        await wp.checkpoint()
        assert len(rig.journal.records) == 2
        assert rig.journal.volume_durable_seq >= rig.journal.next_seq - 3  # synced first
        await wp.close()

    try:
        run(body)
    finally:
        rig.close()


def test_release_slowest_gives_up_on_the_slowest_holder_with_an_alert(tmp_path: Path) -> None:
    rig = open_rig(tmp_path, consumers=("fast", "slow"))

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        caught_up(rig.journal, "fast")
        caught_up(rig.journal, "slow")
        wp = write_path(rig, loop, checkpoint_interval=3600)
        assert not wp.checkpointer.release_slowest()  # nobody holds a record
        for i in range(3):
            await settle(wp, wp.write(i * BLOCK, [b"\x02" * BLOCK], fua=False))
        wp.acknowledge("fast", rig.journal.next_seq - 2)
        assert wp.checkpointer.release_slowest()
        consumers = rig.journal.consumers
        assert consumers["slow"].mode == ConsumerMode.TRACKING
        assert consumers["fast"].mode == ConsumerMode.JOURNAL
        assert wp.alerts.events[-1]["kind"] == "consumer_tracking"
        assert "slow" in wp.alerts.events[-1]["message"]
        await wp.close()

    try:
        run(body)
    finally:
        rig.close()


def test_a_full_journal_makes_room_and_stages_waiting_writes_in_order(tmp_path: Path) -> None:
    rig = open_rig(tmp_path, consumers=("peer",), journal_size=MiB)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        caught_up(rig.journal, "peer")
        wp = write_path(rig, loop, high_water=0.5)
        waiting: list[asyncio.Future[None]] = []
        for i in range(400):  # ~1.6 MiB through a 1 MiB journal, the peer never acknowledging
            fut = wp.write((i % 16) * BLOCK, [bytes([i % 251]) * BLOCK], fua=False)
            wp.commit()
            if fut is not None:
                waiting.append(fut)
        assert waiting and wp.checkpointer.waiting
        await asyncio.wait_for(asyncio.gather(*waiting), 10)
        await settle(wp)
        assert not wp.checkpointer.waiting
        # The last write to each block wins: the waiting ones were staged in order.
        for block in range(16):
            last = max(i for i in range(400) if i % 16 == block)
            assert rig.volume.pread(block * BLOCK, BLOCK) == bytes([last % 251]) * BLOCK
        assert rig.journal.consumers["peer"].mode == ConsumerMode.TRACKING
        kinds = [e["kind"] for e in wp.alerts.events]
        # Freed once the peer was given up on, the ring filled again: two episodes, no more.
        assert kinds == ["journal_high_water", "consumer_tracking", "journal_high_water"]
        await wp.close()

    try:
        run(body)
    finally:
        rig.close()
