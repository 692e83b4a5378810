"""Where a link resumes: what the secondary says it holds decides the consumer's cursor.

After the WELCOME, the sender compares what the secondary holds (its volume id and the newest
record it has) with what this journal still holds for it. It resumes the stream from there,
lowers the cursor when the secondary lost records it had acknowledged (a replica restored from a
backup), or switches the consumer to tracking for a resync: of every region when nothing can
say less, or of the diverged regions only after a failover (both sides' regions, joined).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from blockmirror.errors import BlockmirrorError
from blockmirror.journal.divergence import diverged, merge_extents
from blockmirror.journal.journal import Consumer
from blockmirror.link.protocol import Refuse, RefuseCode, Welcome
from blockmirror.state import ConsumerMode

if TYPE_CHECKING:
    from blockmirror.link.sender import PeerSender

__all__ = [
    "SplitBrainFound",
    "add_diverged",
    "check_same_line",
    "remove_maps",
    "resume_point",
]

log = logging.getLogger(__name__)


class SplitBrainFound(BlockmirrorError):
    """The secondary's newest record is not ours although it bears one of our numbers: two
    histories. ``ours`` goes to the secondary in a REFUSE (with our lineage); ``theirs`` is
    what the roles here record (with the secondary's)."""

    def __init__(self, ours: Refuse, theirs: Refuse) -> None:
        super().__init__(ours.message)
        self.ours = ours
        self.theirs = theirs


def check_same_line(sender: PeerSender, welcome: Welcome) -> bool:
    """Whether the secondary's newest record is ours, as far as the stamps can tell; raises
    :class:`SplitBrainFound` when it is not. False: it is not, but this volume may have lost
    its own tail in a power cut, so the secondary is copied again in full instead."""
    peer, roles = welcome.lineage, sender.roles
    if roles is None or peer is None or not peer.end_stamp or not peer.end_seq:
        return True
    journal = sender.wp.journal
    ours = journal.stamp_of(peer.end_seq)
    if not ours:
        # A record we no longer hold. Past what the peer acknowledged here, nothing says it
        # is ours: copy it all rather than resume on a guess (a split brain found earlier by
        # a stamp, once our record is freed, must not become a splice).
        return peer.end_seq <= sender.consumer.acked_seq
    if ours == peer.end_stamp:
        return True
    lineage = roles.lineage()
    if lineage.lost_tail:
        log.warning(
            "%s -> %s:%d: %s's record %d is not this unit's, whose tail a power cut may have "
            "lost: full resync",
            sender.volume_name,
            sender.host,
            sender.port,
            peer.unit,
            peer.end_seq,
        )
        return False
    common = min(sender.consumer.acked_seq, peer.end_seq - 1)
    mine = diverged(journal, peer.unit, common + 1).nbytes
    message = (
        f"{peer.unit} holds a record {peer.end_seq} that {lineage.unit} never wrote (restored "
        f"from an older copy?): the histories part after seq {common}"
    )
    raise SplitBrainFound(
        Refuse(RefuseCode.SPLIT_BRAIN, message, lineage, common, mine),
        Refuse(RefuseCode.SPLIT_BRAIN, message, peer, common, None),
    )


async def resume_point(sender: PeerSender, welcome: Welcome, *, same_line: bool = True) -> bool:
    """Set ``sender``'s consumer up to follow what the secondary says it holds; whether it
    needs a full copy."""
    journal = sender.wp.journal
    bound, dropped = journal.bind_peer(sender.consumer_name, welcome.unit)
    if bound:
        log.info("%s -> %s:%d: %s", sender.volume_name, sender.host, sender.port, bound)
        await sender.wp.checkpoint()  # the cursor's owner, durably, before maps go
        await asyncio.to_thread(remove_maps, dropped)
    consumer = sender.consumer
    received = welcome.received_seq
    full = False
    # The secondary's WELCOME is the truth about what it holds, not what it acknowledged
    # before: a replica restored from a backup (or a secondary that lost its journal's
    # tail) holds less than its old ACKs said.
    lost = received < consumer.acked_seq
    if not same_line:
        full = True
    elif welcome.volume_id != sender.volume_id:
        full = True  # a new replica, or one of another volume we were allowed to overwrite
    elif received > journal.next_seq - 1:
        full = True  # it claims records we never wrote
    elif consumer.mode == ConsumerMode.JOURNAL:
        if received + 1 < journal.head_seq:
            full = True  # a gap we no longer hold
        elif lost:
            log.warning(
                "%s -> %s:%d: the secondary holds records up to %d only, although it "
                "acknowledged %d (restored from a backup?); resending from %d",
                sender.volume_name,
                sender.host,
                sender.port,
                received,
                consumer.acked_seq,
                received + 1,
            )
            # Lowered, not only skipped back: the journal must keep these records now.
            consumer.acked_seq = received
            sender.stats.acked_seq = received
        elif received > consumer.acked_seq:
            sender.wp.acknowledge(sender.consumer_name, received)
    elif lost:
        # Tracking: the dirty map covers what came after the cursor; what the secondary
        # lost before it must be copied too, from the records, or all of it.
        if received + 1 < journal.head_seq:
            full = True
        else:
            consumer.generation += 1
            for rec in journal.records:
                if received < rec.seq <= consumer.acked_seq and rec.length:
                    consumer.dirty.mark(rec.offset, rec.length)
            log.warning(
                "%s -> %s:%d: the secondary lost records %d..%d; their regions are resynced",
                sender.volume_name,
                sender.host,
                sender.port,
                received + 1,
                consumer.acked_seq,
            )
    if full:
        log.info(
            "%s -> %s:%d: full resync: the secondary holds %s up to %d (it acknowledged "
            "%d); this journal holds %d..%d",
            sender.volume_name,
            sender.host,
            sender.port,
            "this volume" if welcome.volume_id == sender.volume_id else "another volume",
            received,
            consumer.acked_seq,
            journal.head_seq,
            journal.next_seq - 1,
        )
        consumer.dirty.mark_all()
        consumer.set_mode(ConsumerMode.TRACKING)
    sender.stats.consistent = welcome.consistent and not full and not lost
    sender.stats.peer_applied_seq = welcome.applied_seq
    if full or lost:
        await sender.wp.checkpoint()  # the lowered cursor or the dirty bits, durably
    return full


async def add_diverged(sender: PeerSender, regions: list[tuple[int, int]]) -> None:
    """Take the regions the secondary gave up into this peer's resync, durably, before
    anything is sent: the resync copies the union of theirs and ours, nothing more."""
    journal = sender.wp.journal
    consumer = sender.consumer
    ours = journal.backlog(consumer)[0] if consumer.mode == ConsumerMode.JOURNAL else 0
    if consumer.mode == ConsumerMode.JOURNAL:
        # Records already sent cannot be interleaved with region copies: everything the
        # peer lacks becomes regions, copied as they are now.
        journal.switch_to_tracking(consumer)
    mine = consumer.dirty.dirty_bytes()
    consumer.generation += 1
    for offset, length in regions:
        consumer.dirty.mark(offset, length)
    theirs = sum(length for _, length in merge_extents(regions))
    union = consumer.dirty.dirty_bytes()
    log.info(
        "%s -> %s:%d: diverged-only resync of %d bytes: the union of this side's %d "
        "(%d bytes of records) and the peer's %d",
        sender.volume_name,
        sender.host,
        sender.port,
        union,
        mine,
        ours,
        theirs,
    )
    sender.stats.diverged_union_bytes = union
    await sender.wp.checkpoint()


def remove_maps(consumers: list[Consumer]) -> None:
    """Close and delete the dirty maps of cursors a checkpoint no longer holds (blocking)."""
    for consumer in consumers:
        path = consumer.dirty.path
        consumer.dirty.close(sync=False)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
