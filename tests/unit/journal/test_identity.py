"""A journal belongs to one volume (issue 7, point 10; invariants 4 and 9).

An older copy of the volume restored in place (same inode, so metadata cannot tell), or a new
empty file where the volume was, must not be served under the journal: at start the volume's
recorded identity and the fingerprint of its recently written blocks are checked. Adopting the
volume takes it as it is and sends every consumer a full resync. Restarts of the right volume,
crashes included, must never be refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.journal.checkpoint import read_checkpoint, write_checkpoint
from blockmirror.journal.journal import Journal, VolumeIdentityError
from blockmirror.state import ConsumerMode
from blockmirror.store.volume import Volume
from tests.support.crash import crash
from tests.unit.blockdev.test_journaled import VOLUME, MiB, settle

BLOCK = 4096
T = TypeVar("T")


def open_journal(
    tmp: Path, *, adopt: bool = False, consumers: tuple[str, ...] = ("peer",)
) -> Journal:
    volume = Volume.open(tmp / "vol.img", size=VOLUME)
    try:
        return Journal.open(
            tmp / "vol.journal",
            volume=volume,
            journal_size=2 * MiB,
            consumers=list(consumers),
            dirty_dir=tmp,
            volume_name="vol",
            adopt=adopt,
        )
    except BaseException:
        volume.close()
        raise


def open_wp(
    tmp: Path, loop: asyncio.AbstractEventLoop, *, consumers: tuple[str, ...] = ("peer",)
) -> JournalWritePath:
    journal = open_journal(tmp, consumers=consumers)
    wp = JournalWritePath(journal, journal.volume, loop)
    wp.start()
    return wp


async def close(wp: JournalWritePath) -> None:
    await wp.close()
    wp.volume.close()


def caught_up(journal: Journal) -> None:
    """The consumer has everything: journal mode, nothing dirty."""
    for peer in journal.consumers.values():
        peer.dirty.clear_all()
        peer.dirty.sync()
        if peer.mode != ConsumerMode.JOURNAL:
            peer.set_mode(ConsumerMode.JOURNAL)
        peer.acked_seq = journal.next_seq - 1


async def write_blocks(wp: JournalWritePath, blocks: dict[int, bytes]) -> None:
    for offset, data in blocks.items():
        await settle(wp.write(offset, [data], fua=False), wp)
    await settle(wp.flush(), wp)


def blocks_of(rng: random.Random, count: int, *, span: int = VOLUME // BLOCK) -> dict[int, bytes]:
    return {rng.randrange(span) * BLOCK: rng.randbytes(BLOCK) for _ in range(count)}


def copy_in_place(source: bytes, target: Path) -> None:
    """Write ``source`` over ``target``'s content: a backup restored with ``dd``, same inode."""
    with target.open("r+b") as f:
        f.write(source)
        f.flush()
        os.fsync(f.fileno())


def test_an_older_copy_restored_in_place_is_refused(tmp_path: Path) -> None:
    rng = random.Random(10)
    image = tmp_path / "vol.img"

    async def body(loop: asyncio.AbstractEventLoop) -> bytes:
        wp = open_wp(tmp_path, loop)
        caught_up(wp.journal)
        await write_blocks(wp, blocks_of(rng, 50))
        await close(wp)
        backup = image.read_bytes()
        wp = open_wp(tmp_path, loop)
        await write_blocks(wp, blocks_of(rng, 30))
        await close(wp)
        return backup

    backup = asyncio.run(_main(body))
    inode = image.stat().st_ino
    copy_in_place(backup, image)
    assert image.stat().st_ino == inode  # metadata alone cannot tell
    with pytest.raises(VolumeIdentityError, match="volume adopt") as refused:
        open_journal(tmp_path)
    assert "differ" in str(refused.value)
    assert image.read_bytes() == backup  # nothing was replayed into it


def test_an_older_copy_is_refused_with_records_still_in_the_ring(tmp_path: Path) -> None:
    """The unit crashed (records in the ring, after the last checkpoint), then a backup was
    put back: the blocks those records rewrite are not compared, the others still are."""
    rng = random.Random(11)
    image = tmp_path / "vol.img"

    async def body(loop: asyncio.AbstractEventLoop) -> bytes:
        wp = open_wp(tmp_path, loop)
        await write_blocks(wp, blocks_of(rng, 40))
        await wp.checkpoint()
        backup = image.read_bytes()
        await write_blocks(wp, blocks_of(rng, 40))
        await wp.checkpoint()
        await write_blocks(wp, blocks_of(rng, 5))
        crash(wp)
        return backup

    backup = asyncio.run(_main(body))
    copy_in_place(backup, image)
    with pytest.raises(VolumeIdentityError):
        open_journal(tmp_path)


def test_a_new_empty_file_under_an_existing_journal_is_refused(tmp_path: Path) -> None:
    rng = random.Random(12)
    image = tmp_path / "vol.img"

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_wp(tmp_path, loop)
        await write_blocks(wp, blocks_of(rng, 20))
        await close(wp)

    asyncio.run(_main(body))
    # A typo in `path` (or a lost file): Volume.open creates a new sparse file there.
    image.unlink()
    with pytest.raises(VolumeIdentityError, match="not the one"):
        open_journal(tmp_path)


def test_a_never_written_volume_whose_file_was_replaced_is_refused(tmp_path: Path) -> None:
    """No block to compare: a replaced file cannot be proven to be the volume."""
    open_journal(tmp_path).close()
    (tmp_path / "vol.img").unlink()
    with pytest.raises(VolumeIdentityError, match="replaced"):
        open_journal(tmp_path)


def test_a_copy_moved_into_place_is_accepted_with_a_warning(tmp_path: Path) -> None:
    """Same content, new inode (copied to another filesystem and renamed back, say)."""
    rng = random.Random(13)
    image = tmp_path / "vol.img"

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_wp(tmp_path, loop)
        await write_blocks(wp, blocks_of(rng, 20))
        await close(wp)

    asyncio.run(_main(body))
    shutil.copyfile(image, tmp_path / "copy.img")
    os.replace(tmp_path / "copy.img", image)
    journal = open_journal(tmp_path)
    assert journal.identity_warning is not None and "replaced" in journal.identity_warning
    journal.close()
    journal.volume.close()
    # The new inode is recorded: the next start has nothing to warn about.
    journal = open_journal(tmp_path)
    assert journal.identity_warning is None
    journal.close()
    journal.volume.close()


def test_adopt_takes_the_volume_as_it_is_and_resyncs_every_consumer(tmp_path: Path) -> None:
    rng = random.Random(14)
    image = tmp_path / "vol.img"

    async def body(loop: asyncio.AbstractEventLoop) -> bytes:
        wp = open_wp(tmp_path, loop, consumers=("peer", "other"))
        caught_up(wp.journal)
        await write_blocks(wp, blocks_of(rng, 30))
        await wp.checkpoint()
        backup = image.read_bytes()
        await write_blocks(wp, blocks_of(rng, 30))
        caught_up(wp.journal)
        await wp.checkpoint()
        await write_blocks(wp, blocks_of(rng, 3))  # in the ring, unacknowledged
        crash(wp)
        return backup

    backup = asyncio.run(_main(body))
    copy_in_place(backup, image)
    with pytest.raises(VolumeIdentityError):
        open_journal(tmp_path, consumers=("peer", "other"))
    journal = open_journal(tmp_path, adopt=True, consumers=("peer", "other"))
    volume_id = journal.volume_id
    for peer in journal.consumers.values():
        assert peer.mode == "tracking"
        assert peer.dirty.dirty_bytes() == VOLUME  # a full resync
    assert not journal.records
    journal.close()
    journal.volume.close()
    assert image.read_bytes() == backup  # taken as it is: nothing replayed over it
    # Adopted: served from now on, the full resync still owed, the volume id kept.
    journal = open_journal(tmp_path, consumers=("peer", "other"))
    assert journal.volume_id == volume_id
    assert journal.volume_identity is not None and journal.volume_identity.blocks
    for peer in journal.consumers.values():
        assert peer.mode == "tracking" and peer.dirty.dirty_bytes() == VOLUME
    journal.close()
    journal.volume.close()


def test_restarts_and_crashes_of_the_right_volume_are_never_refused(tmp_path: Path) -> None:
    """Hot blocks rewritten over and over, checkpoints at random points, crashes and clean
    stops: the fingerprint must never mistake the volume's own recent writes for a mismatch."""
    rng = random.Random(15)
    model = bytearray(VOLUME)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        for round_ in range(40):
            wp = open_wp(tmp_path, loop)
            if round_ % 3 == 0:
                caught_up(wp.journal)
            assert wp.volume.pread(0, VOLUME) == bytes(model)
            for _ in range(rng.randrange(1, 30)):
                span = 8 if rng.random() < 0.7 else VOLUME // BLOCK  # mostly hot blocks
                off = rng.randrange(span) * BLOCK
                data = rng.randbytes(BLOCK)
                model[off : off + BLOCK] = data
                await settle(wp.write(off, [data], fua=rng.random() < 0.2), wp)
                if rng.random() < 0.1:
                    await wp.checkpoint()
            await settle(wp.flush(), wp)
            if rng.random() < 0.5:
                crash(wp)
            else:
                await close(wp)

    asyncio.run(_main(body))


def test_a_journal_from_before_identities_opens_and_records_one(tmp_path: Path) -> None:
    journal = open_journal(tmp_path)
    journal.close()
    journal.volume.close()
    fd = os.open(tmp_path / "vol.journal", os.O_RDWR)
    try:
        found = read_checkpoint(fd)
        assert found is not None
        _, generation, cp = found
        old = dataclasses.replace(cp, volume_id=None, volume=None)
        assert b'"volume"' not in old.to_json() and b"volume_id" not in old.to_json()
        write_checkpoint(fd, old, generation + 1)
    finally:
        os.close(fd)
    journal = open_journal(tmp_path)
    assert journal.volume_id == cp.journal_id  # the journal id stands in for the volume's
    journal.close()
    journal.volume.close()
    fd = os.open(tmp_path / "vol.journal", os.O_RDONLY)
    try:
        found = read_checkpoint(fd)
    finally:
        os.close(fd)
    assert found is not None
    assert found[2].volume_id == cp.journal_id and found[2].volume is not None


async def _main(body: Callable[[asyncio.AbstractEventLoop], Awaitable[T]]) -> T:
    return await body(asyncio.get_running_loop())
