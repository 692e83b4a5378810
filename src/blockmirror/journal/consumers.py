"""The journal's consumers: named cursors over its records, each with a dirty map.

A consumer (a replication peer) is in journal mode while the records after its cursor are all in
the ring, and in tracking mode once some it lacks were given up: their regions are then bits in
its dirty map, and a resync copies them (docs/journal.md, "Consumers, overflow and the dirty
map"). Every change of mode goes through the transition table (:mod:`blockmirror.state`).

Nothing here reads or writes the ring; dirty maps are synced only by :func:`sync_dirty_maps`
and :func:`attach` (blocking: run them in a thread).
"""

from __future__ import annotations

import itertools
import logging
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from blockmirror import statedir
from blockmirror.journal.checkpoint import ConsumerState
from blockmirror.journal.dirtymap import DirtyMap
from blockmirror.journal.format import EXTENT_KINDS
from blockmirror.journal.record import Record
from blockmirror.state import ConsumerMode, transition

__all__ = ["DIRTY_REGION", "Consumer", "attach", "bind", "sync_dirty_maps"]

log = logging.getLogger(__name__)

# The bytes one dirty bit stands for.
DIRTY_REGION = 64 * 1024


@dataclass(slots=True)
class Consumer:
    """A named cursor over the journal (a replication peer, for instance)."""

    name: str
    acked_seq: int
    mode: ConsumerMode
    paused: bool
    dirty: DirtyMap
    # Grows whenever bits may be set behind a copy in flight (a switch to tracking, writes
    # recorded only in the map): a region copied before a change must not be cleared after it.
    generation: int = 0
    # The peer unit this cursor belongs to, once it has connected (see ConsumerState.peer).
    peer: str | None = None
    # Kept from the checkpoint although no configured peer has its name (its address changed):
    # it holds its records until a peer proves to be its unit (bind) or room is needed.
    detached: bool = False
    # New to this journal at this start (no checkpoint knew it): every region dirty because
    # nothing is known yet, not because changes were given up.
    fresh: bool = False

    def state(self) -> ConsumerState:
        return ConsumerState(self.acked_seq, self.mode, self.paused, self.peer)

    def set_mode(self, mode: ConsumerMode) -> None:
        """Change the mode through the transition table (``state.TRANSITIONS``)."""
        # ConsumerMode(...) also takes a plain "journal"/"tracking" someone assigned to mode.
        self.mode = transition(ConsumerMode(self.mode), mode, what=f"consumer {self.name}")

    def acknowledge(self, seq: int, newest: int) -> None:
        """The consumer has every record up to ``seq`` (at most ``newest``, the last one)."""
        if self.mode == ConsumerMode.JOURNAL and seq > self.acked_seq:
            self.acked_seq = min(seq, newest)

    def backlog(self, records: Sequence[Record]) -> tuple[int, int]:
        """(bytes, records) of ``records`` (the live ones, oldest first) not yet acknowledged."""
        if self.mode != ConsumerMode.JOURNAL:
            return 0, 0
        start = first_after(records, self.acked_seq)
        if start is None:
            return 0, 0
        # Status asks this about once a second per peer, for backlogs of 100 000s of records:
        # a difference of the running totals; records not numbered into a journal's list
        # (cum 0) are summed, in C.
        count = len(records) - start
        first, last = records[start], records[-1]
        if first.cum and last.cum:
            return last.cum - first.cum + first.size, count
        return sum(map(_SIZE, itertools.islice(records, start, None))), count

    def track(self, records: Iterable[Record], last: int, *, newest: int) -> None:
        """Turn the records after the cursor, up to ``last``, into dirty bits.

        When ``last`` is the ``newest`` record the consumer goes to tracking mode; otherwise
        it stays in journal mode with its cursor moved to ``last``.
        """
        self.generation += 1
        for rec in records:
            if self.acked_seq < rec.seq <= last and rec.kind in EXTENT_KINDS:
                self.dirty.mark(rec.offset, rec.length)
        if last >= newest:
            self.set_mode(ConsumerMode.TRACKING)
        else:
            self.acked_seq = last

    def mark_all_dirty(self) -> None:
        """Every region dirty (in memory), in tracking mode: a full resync."""
        self.generation += 1
        self.dirty.mark_all()
        self.set_mode(ConsumerMode.TRACKING)


_SIZE = operator.attrgetter("size")


def first_after(records: Sequence[Record], seq: int) -> int | None:
    """The index of the first of ``records`` (oldest first) numbered after ``seq``; None if
    there is none. Live records are numbered without gaps, so this is arithmetic; a gap (which
    should not happen) falls back to a search."""
    if not records or records[-1].seq <= seq:
        return None
    first = records[0].seq
    if first > seq:
        return 0
    if records[-1].seq - first == len(records) - 1:
        return seq + 1 - first
    return next(i for i, rec in enumerate(records) if rec.seq > seq)  # pragma: no cover


def attach(
    names: Sequence[str],
    *,
    state_dir: Path,
    volume_name: str,
    volume_size: int,
    known: Mapping[str, ConsumerState],
    next_seq: int,
    head_seq: int,
    full_resync: bool,
) -> dict[str, Consumer]:
    """The consumers ``names``, each with its dirty map opened (or created) and synced.

    ``known``: the cursors the checkpoint recorded. A consumer new to the journal, or whose map
    is damaged or missing, has every region dirty and starts in tracking mode; so does every
    one when ``full_resync`` (volume pages may have reached the disk without their records),
    and one whose cursor is behind ``head_seq`` (the records it needs are gone).
    """
    consumers: dict[str, Consumer] = {}
    try:
        for name in [*names, *_detached(names, known)]:
            consumer = _attach_one(name, state_dir, volume_name, volume_size, known, next_seq)
            consumer.detached = name not in names
            consumers[name] = consumer
            if full_resync:
                consumer.dirty.mark_all()
                consumer.set_mode(ConsumerMode.TRACKING)
            if consumer.mode == ConsumerMode.JOURNAL and consumer.acked_seq + 1 < head_seq:
                # The records it needs are gone (should not happen; be safe).
                consumer.dirty.mark_all()
                consumer.set_mode(ConsumerMode.TRACKING)
            consumer.dirty.sync()
    except BaseException:
        for consumer in consumers.values():
            consumer.dirty.close(sync=False)
        raise
    return consumers


def create(
    name: str, *, state_dir: Path, volume_name: str, volume_size: int, next_seq: int
) -> Consumer:
    """A consumer new to a running journal (a peer added by a reload): every region dirty,
    so the peer gets a full resync, and its map durable. Blocking; run in a thread. The caller
    adds it to the journal's consumers on the event loop."""
    consumer = _attach_one(name, state_dir, volume_name, volume_size, {}, next_seq)
    try:
        consumer.dirty.sync()
    except BaseException:
        consumer.dirty.close(sync=False)
        raise
    return consumer


def _attach_one(
    name: str,
    state_dir: Path,
    volume_name: str,
    volume_size: int,
    known: Mapping[str, ConsumerState],
    next_seq: int,
) -> Consumer:
    path = statedir.dirty_map_path(state_dir, volume_name, name)
    state = known.get(name)
    # Everything dirty; who the peer is stays known (a full resync, not a forgotten peer).
    everything = ConsumerState(
        next_seq - 1, ConsumerMode.TRACKING, False, state.peer if state is not None else None
    )
    if path.exists():
        # A damaged map: the consumer gets a full resync rather than the volume going out of
        # service.
        dirty, damaged = DirtyMap.open_or_all_dirty(
            path, volume_size=volume_size, region_size=DIRTY_REGION
        )
        if damaged:
            state = everything
    else:
        # A map the checkpoint knows of but the disk lacks (removed, or state_dir restored
        # partly) cannot say what differs: everything does, as when damaged.
        if state is not None:
            log.error("%s is missing; recreating it with every region dirty", path)
            state = everything
        dirty = DirtyMap.create(
            path, volume_size=volume_size, region_size=DIRTY_REGION, all_dirty=state is not None
        )
    fresh = state is None
    if state is None:
        # A consumer new to this journal has never seen the volume: all of it differs.
        dirty.mark_all()
        state = everything
    return Consumer(
        name, state.acked_seq, state.mode, state.paused, dirty, peer=state.peer, fresh=fresh
    )


def _detached(names: Sequence[str], known: Mapping[str, ConsumerState]) -> list[str]:
    """Cursors of the checkpoint to keep although no configured peer has their name.

    A peer is known by its unit name (``ConsumerState.peer``), learned at its first WELCOME,
    not by the address it is configured at. While some configured peer has not said who it is
    (an address new to this journal), a cursor of an identified peer that is no longer
    configured may be that same peer at a new address: it is kept, so :func:`bind` can hand it
    over instead of the new address starting a full resync. Once every configured peer is
    identified, the others were removed from the configuration and are dropped.
    """
    unidentified = any(known.get(n) is None or known[n].peer is None for n in names)
    if not unidentified:
        return []
    return [n for n, s in known.items() if n not in names and s.peer is not None]


def bind(consumers: dict[str, Consumer], name: str, peer: str) -> tuple[str, list[Consumer]]:
    """The peer reached as consumer ``name`` says it is unit ``peer``: give ``name`` that
    unit's cursor. Returns what was done (for the log; empty when nothing changed) and the
    detached consumers given up, whose dirty maps the caller closes and removes once a
    checkpoint without them is durable.

    - The cursor already belongs to ``peer``: nothing to do.
    - A detached cursor belongs to ``peer`` (the peer's address changed): ``name`` takes its
      position, mode and dirty regions, so nothing already sent is sent again.
    - ``name`` had no peer yet: it is ``peer``'s from now on.
    - ``name`` belonged to another unit: that unit's position says nothing about this one, so
      every region is dirty (a full resync).

    In memory only (the next checkpoint makes it durable): until then the durable state is the
    one before, which is always safe to come back to.
    """
    consumer = consumers[name]
    if consumer.peer == peer:
        return "", []
    found = [c for c in consumers.values() if c.detached and c.peer == peer]
    dropped: list[Consumer] = []
    if found:
        old = found[0]
        consumer.generation += 1
        # The new map holds exactly the old one's regions (the new address's map was all
        # dirty, durably, so a crash before the next sync comes back to a superset).
        consumer.dirty.clear_all()
        for offset, length in old.dirty.dirty_regions():
            consumer.dirty.mark(offset, length)
        consumer.acked_seq = old.acked_seq
        if old.mode != consumer.mode:
            consumer.set_mode(old.mode)
        consumer.paused = old.paused
        del consumers[old.name]
        dropped.append(old)
        done = f"unit {peer} was known as {old.name}: its position ({old.acked_seq}) is kept"
    elif consumer.peer is None:
        done = f"the peer is unit {peer}"
    else:
        done = f"unit {peer} answers where unit {consumer.peer} did: full resync"
        consumer.mark_all_dirty()
    consumer.peer = peer
    # Every other detached cursor can only belong to a unit still unidentified.
    if all(c.peer is not None for c in consumers.values() if not c.detached):
        for other in [c for c in consumers.values() if c.detached]:
            del consumers[other.name]
            dropped.append(other)
    return done, dropped


def sync_dirty_maps(consumers: Iterable[Consumer]) -> None:
    """Make every changed dirty map durable. Blocking; run in a thread."""
    for consumer in list(consumers):
        if consumer.dirty.pending():
            consumer.dirty.sync()
