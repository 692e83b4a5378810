"""The shared failure (listeners in order, never cleared) and the syncs requests wait on."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from blockmirror.alerts import AlertLog
from blockmirror.blockdev.durability import Durability, Failure
from blockmirror.state import ConsumerMode
from tests.unit.blockdev.rig import caught_up, open_rig, run


def test_failure_tells_each_listener_in_order_and_whether_it_is_the_first() -> None:
    failure = Failure()
    heard: list[tuple[str, str, bool]] = []
    failure.listen(lambda exc, first: heard.append(("a", str(exc), first)))
    failure.listen(lambda exc, first: heard.append(("b", str(exc), first)))
    failure.check()  # nothing yet
    failure.fail(OSError(errno.EIO, "one"))
    failure.fail(OSError(errno.ENOSPC, "two"))
    assert heard == [
        ("a", "[Errno 5] one", True),
        ("b", "[Errno 5] one", True),
        ("a", "[Errno 28] two", False),
        ("b", "[Errno 28] two", False),
    ]
    with pytest.raises(OSError, match="two"):  # the latest error is the one raised
        failure.check()


def test_a_flush_completes_once_the_journal_is_synced(tmp_path: Path) -> None:
    rig = open_rig(tmp_path)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        failure = Failure()
        durability = Durability(rig.journal, rig.volume, loop, failure, AlertLog("t"))
        before = rig.journal.volume_durable_seq
        flush = durability.flush()
        assert not flush.done()
        durability.release_flushes(volume_upto=None)
        await asyncio.wait_for(flush, 5)
        assert rig.journal.volume_durable_seq == before  # the volume was not synced
        # With writes outside the journal, the volume is synced too.
        upto = rig.journal.next_seq + 5
        flush = durability.flush()
        durability.release_flushes(volume_upto=upto)
        await asyncio.wait_for(flush, 5)
        assert rig.journal.volume_durable_seq == upto

    try:
        run(body)
    finally:
        rig.close()


def test_a_failed_volume_sync_fails_the_write_path_and_every_flush(tmp_path: Path) -> None:
    rig = open_rig(tmp_path)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        failure = Failure()
        alerts = AlertLog("t")
        durability = Durability(rig.journal, rig.volume, loop, failure, alerts)
        waiting = durability.flush()
        rig.volume.fail("flush", errno.EIO)
        with pytest.raises(OSError):
            await durability.sync_volume(1)
        assert isinstance(failure.error, OSError)
        assert [e["kind"] for e in alerts.events] == ["volume_failed"]
        with pytest.raises(OSError):
            await waiting  # answered by the failure, not left waiting for a commit
        late = durability.flush()
        assert late.done()  # after a failure a flush is answered at once
        with pytest.raises(OSError):
            late.result()

    try:
        run(body)
    finally:
        rig.close()


def test_a_failed_ring_sync_marks_every_consumer_dirty(tmp_path: Path) -> None:
    rig = open_rig(tmp_path, consumers=("peer",))

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        caught_up(rig.journal, "peer")
        failure = Failure()
        durability = Durability(rig.journal, rig.volume, loop, failure, AlertLog("t"))
        rig.journal.io_error = OSError(errno.EIO, "injected: the ring failed")
        flush = durability.flush()
        durability.release_flushes(volume_upto=None)
        with pytest.raises(OSError):
            await flush
        assert failure.error is not None
        peer = rig.journal.consumers["peer"]
        assert peer.mode == ConsumerMode.TRACKING
        assert peer.dirty.dirty_bytes() == rig.volume.size

    try:
        run(body)
    finally:
        rig.close()
