"""What promote does to a replica first: a cut-short resync rolled back, delayed records settled.

A resync overwrites regions out of order, so until it is done the replica is a mix of old and
new regions. Its history keeps the before-image of everything the resync (and the records in
between) overwrote since its last consistent point (docs/history.md, "Consistent resync").
:func:`roll_back_resync` writes them back, newest first, so the volume is exactly that point
again: what ``promote`` does before it serves a replica whose source was lost mid-resync.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.errors import RoleError
from blockmirror.history.index import Point
from blockmirror.history.restore import apply_undo_to, plan

__all__ = ["can_roll_back", "roll_back_resync", "settle_delayed"]

log = logging.getLogger(__name__)


def can_roll_back(wp: JournalWritePath) -> bool:
    """Whether the replica is in a resync and its history kept the point before it."""
    state = wp.journal.replica
    history = wp.history
    return (
        state is not None
        and not state.consistent
        and history is not None
        and history.broken is None
        and history.index.keeps_resync_start
    )


async def roll_back_resync(wp: JournalWritePath) -> Point | None:
    """Bring an inconsistent replica back to its consistent point (None: nothing to do, or
    it cannot). Its source must be disconnected. Afterwards the journal is empty and numbered
    from the point on, the replica is consistent, and every consumer (a relayed peer) copies
    what changed. Raises OSError when the volume, the history or a dirty map cannot be
    written (the replica then stays inconsistent, and the history keeps every entry)."""
    if not can_roll_back(wp):
        return None
    history = wp.history
    journal = wp.journal
    state = journal.replica
    assert history is not None and state is not None
    gate = wp.commit()
    if gate is not None:
        await gate
    point = history.index.consistent_point()
    assert point is not None
    undo = plan(history, point.pos)
    # A relayed peer may hold what is undone: it must copy those regions again.
    for voff, vlen in zip(undo.voffs, undo.vlens, strict=True):
        journal.mark_dirty_everywhere(voff, vlen)
    await asyncio.to_thread(journal.sync_dirty_maps)
    await asyncio.to_thread(apply_undo_to, history.segments, undo, wp.volume)
    await asyncio.to_thread(wp.volume.flush)
    await asyncio.to_thread(history.truncate, point)
    journal.replica = dataclasses.replace(state, consistent=True, sync_done=True)
    await wp.replica.rebase(point.seq + 1, renumbered=False)
    log.warning(
        "%s: resync rolled back: the replica is its consistent point again (seq %d; %d "
        "before-images written back)",
        journal.path.name,
        point.seq,
        len(undo),
    )
    return point


async def settle_delayed(wp: JournalWritePath, choice: str) -> dict[str, int] | None:
    """Before a lagged replica (replay_delay) is promoted: apply its held records (``choice``
    ``"apply"``) or give them up (``"discard"``: they are cut from the journal, and the replica
    is served as it is). None when nothing is held. Raises RoleError when records are held and
    no choice was made, OSError when the journal cannot be written."""
    delay = wp.replica.delay
    if not delay.held:
        return None
    held = delay.status()
    if choice not in ("apply", "discard"):
        raise RoleError(
            f"{len(delay.held)} records (seq {held['delayed_from_seq']} to "
            f"{held['delayed_to_seq']}) are held back by replay_delay: promote "
            "--apply-delayed to apply them first, or --discard-delayed to serve the replica "
            "as it is and give them up"
        )
    count = len(delay.held)
    if choice == "apply":
        delay.release_all()
        gate = wp.commit()
        if gate is not None:
            await gate
        return {"delayed_applied": count}
    delay.discard()
    journal = wp.journal
    journal.discard_after(wp.applied_seq)
    await asyncio.to_thread(journal.erase_renumbered)
    await wp.checkpoint()
    log.warning("%s: %d delayed records given up at promote", journal.path.name, count)
    return {"delayed_discarded": count}
