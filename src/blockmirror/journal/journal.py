"""The journal of one volume: its log, the volume, checkpoints and consumers.

Appends are staged on the event loop and written by :meth:`Journal.write_batch` as one vectored
write (two around the ring's end). Syncs, checkpoints and dirty-map writes run in worker threads.
The rules that make this crash-safe are in docs/journal.md; the comments here point at them.

Where the parts are: the journal file as a :class:`~blockmirror.store.base.Store`
(:mod:`.storage`); the live records, appending and reading (:mod:`.ringlog`, the base class);
opening, with its checks and the replay (:mod:`.opening`); the consumers and their dirty maps
(:mod:`.consumers`); the scan of the log at start (:mod:`.scan`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from blockmirror.errors import JournalError
from blockmirror.journal import consumers as consumers_module
from blockmirror.journal import identity, opening
from blockmirror.journal.checkpoint import (
    Checkpoint,
    ReplicaState,
    VolumeIdentity,
    write_checkpoint,
)
from blockmirror.journal.consumers import DIRTY_REGION, Consumer
from blockmirror.journal.dirtymap import DirtyMapError
from blockmirror.journal.opening import RecoveryReport, VolumeIdentityError
from blockmirror.journal.record import Record
from blockmirror.journal.ring import Ring
from blockmirror.journal.ringlog import RecordsGone, RingLog, apply_record
from blockmirror.journal.scan import ScanResult, erase_stale_headers
from blockmirror.state import ConsumerMode
from blockmirror.store.base import Store

__all__ = [
    "DIRTY_REGION",
    "Consumer",
    "Journal",
    "RecordsGone",
    "RecoveryReport",
    "VolumeIdentityError",
    "boot_id",
]

log = logging.getLogger(__name__)


def boot_id() -> str:
    """The running kernel's boot id: it changes on every boot, never on a process restart."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Journal(RingLog):
    """The journal of one volume: its log (:class:`RingLog`), the volume it protects, the
    checkpoints that free the log's space, and the consumers reading it."""

    def __init__(self, path: Path, file: Store, ring: Ring, volume: Store, journal_id: str) -> None:
        super().__init__(path, file, ring)
        self.volume = volume
        self.journal_id = journal_id
        # The volume's identity (what peers bind to; a resize keeps it), which file it is and a
        # fingerprint of its content, refreshed at every checkpoint (see identity.py).
        self.volume_id = journal_id
        self.volume_identity: VolumeIdentity | None = None
        self.identity_warning: str | None = None
        # Every record up to this one is in the volume (from the last checkpoint).
        self.applied_seq = 0
        # The volume was last synced when it held every record up to this one.
        self.volume_durable_seq = 0
        self.generation = 0
        self.consumers: dict[str, Consumer] = {}
        self.enqueue_paused = False
        self.needs_full_resync = False
        self.recovery: RecoveryReport | None = None
        # On a secondary: where the replica's data comes from (None on a primary).
        self.replica: ReplicaState | None = None
        # The last checkpoint was written unclean in an earlier boot (a power cut, a crash of
        # the OS): volume pages may have reached the disk without their journal records.
        self.unclean_os_restart = False
        # (unit, seq): the unit we received from holds every record up to seq. Kept for a
        # cursor not yet bound to that unit (its sender never reached it): see bind_peer.
        self.source_holds: tuple[str, int] | None = None

    # --- opening --------------------------------------------------------------------------------

    # Journal.open(path, *, volume, journal_size, consumers, dirty_dir, volume_name,
    # adopt=False, origin=UNKNOWN_ORIGIN, open_ring=None): create, or recover and replay.
    # Documented where it is written, in opening.py.
    open = classmethod(opening.open_journal)

    def restore(self, cp: Checkpoint, generation: int, result: ScanResult) -> None:
        """Take the positions and state of the checkpoint ``cp`` and the scan after it (when
        opening; :mod:`.opening`)."""
        self.volume_id = cp.volume_id if cp.volume_id is not None else cp.journal_id
        self.volume_identity = cp.volume
        self.generation = generation
        self.checkpoint_head_lpos = cp.head_lpos
        self.tail_lpos = result.tail_lpos
        self.next_seq = max(result.next_seq, cp.next_seq)
        self.written_seq = self.durable_seq = self.next_seq - 1
        self.applied_seq = cp.applied_seq
        self.enqueue_paused = cp.enqueue_paused
        self.needs_full_resync = cp.needs_full_resync
        self.replica = cp.replica
        self.unclean_os_restart = not cp.clean and cp.boot_id != boot_id()
        cum = 0
        for rec in result.records:
            cum += rec.size
            rec.cum = cum
        self.records.extend(result.records)
        if self.records:
            newest = self.records[-1]
            self.last_stamp = (newest.seq, newest.timestamp_ns)
        elif cp.tail_stamp:
            self.last_stamp = (cp.next_seq - 1, cp.tail_stamp)

    def apply_from_ring(self, rec: Record) -> None:
        """Do to the volume what the live record ``rec`` does (blocking)."""
        apply_record(rec, self.file, self.ring, self.volume)

    # --- consumers (consumers.py) ---------------------------------------------------------------

    def acknowledge(self, name: str, seq: int) -> None:
        self.consumers[name].acknowledge(seq, self.next_seq - 1)

    def bind_peer(self, name: str, peer: str) -> tuple[str, list[Consumer]]:
        """Consumer ``name`` is unit ``peer`` (from its WELCOME or refusal); see
        :func:`consumers.bind`. A unit we received from is known to hold what it sent us: a
        cursor bound to it only now (say, our sender never reached it before it was lost)
        starts there, not at a full copy. Its WELCOME still has the last word
        (``resume_point``)."""
        done, dropped = consumers_module.bind(self.consumers, name, peer)
        held = self.source_holds
        if done and held is not None and held[0] == peer:
            self.peer_holds(peer, held[1])
        return done, dropped

    def peer_holds(self, peer: str, seq: int) -> None:
        """Unit ``peer`` holds every record up to ``seq`` (it is the source they came from):
        its consumer here, if any, follows it, and its dirty bits say nothing. Without this
        the cursor of the unit we receive from would hold every record (we never send to it),
        fill the journal and, after a failover, make us resync what it already has."""
        held = self.source_holds
        if held is None or held[0] != peer or held[1] < seq:
            self.source_holds = (peer, seq)
        for consumer in self.consumers.values():
            if consumer.peer != peer:
                continue
            if consumer.mode != ConsumerMode.JOURNAL:
                consumer.generation += 1
                consumer.dirty.clear_all()
                consumer.set_mode(ConsumerMode.JOURNAL)
            consumer.acked_seq = max(consumer.acked_seq, min(seq, self.next_seq - 1))

    def backlog(self, consumer: Consumer) -> tuple[int, int]:
        """(bytes, records) the consumer has yet to acknowledge."""
        return consumer.backlog(self.records)

    def switch_to_tracking(self, consumer: Consumer, *, upto: int | None = None) -> None:
        """Turn the consumer's unacknowledged records (up to ``upto``) into dirty bits.

        The caller makes the dirty map durable and writes a checkpoint before the ring space
        those records occupy is reused (docs/journal.md, "Consumers, overflow and the dirty map").
        """
        newest = self.next_seq - 1
        consumer.track(self.records, newest if upto is None else upto, newest=newest)
        log.warning(
            "journal %s: consumer %s switched to dirty-map tracking (%d bytes dirty)",
            self.path.name,
            consumer.name,
            consumer.dirty.dirty_bytes(),
        )

    def mark_dirty_everywhere(self, offset: int, length: int) -> bool:
        """Record a write in every consumer's dirty map; True if any bit is new."""
        new = False
        for consumer in self.consumers.values():
            consumer.generation += 1
            new = consumer.dirty.mark(offset, length) or new
        return new

    def mark_all_dirty(self) -> None:
        """Every region dirty for every consumer (in memory; :meth:`sync_dirty_maps` next)."""
        for consumer in self.consumers.values():
            consumer.mark_all_dirty()

    def tracking_consumers(self) -> list[Consumer]:
        return [c for c in self.consumers.values() if c.mode == ConsumerMode.TRACKING]

    def dirty_pending(self) -> bool:
        return any(c.dirty.pending() for c in self.consumers.values())

    def sync_dirty_maps(self) -> None:
        """Blocking; run in a thread."""
        consumers_module.sync_dirty_maps(self.consumers.values())

    # --- checkpoints ----------------------------------------------------------------------------

    def keep_from(self, applied_seq: int) -> int:
        """The oldest sequence number the volume or a journal-mode consumer may still need."""
        keep = applied_seq + 1
        for consumer in self.consumers.values():
            if consumer.mode == ConsumerMode.JOURNAL:
                keep = min(keep, consumer.acked_seq + 1)
        return keep

    def checkpoint_state(self, *, applied_seq: int, clean: bool) -> Checkpoint:
        """The checkpoint that frees every record up to ``applied_seq`` nobody else needs.

        ``applied_seq``: the volume (page cache) holds every record up to it. The new head is
        the oldest record some journal-mode consumer still needs, or the next not yet applied;
        everything before it is freed in memory now, and its ring space becomes reusable once
        this checkpoint is durable. The checkpoint's own ``applied_seq`` is the volume's
        *durable* point, so recovery replays every record after it that the ring still holds.
        """
        # A record is freed only once the volume's copy of it is durable: until then it is the
        # only durable copy a FLUSH may have promised (docs/journal.md, "Freeing space").
        keep_from = min(self.keep_from(applied_seq), self.volume_durable_seq + 1)
        tail_stamp = self.stamp_of(self.durable_seq)  # before its record may be freed
        while self.records and self.records[0].seq < keep_from:
            self.records.popleft()
        return Checkpoint(
            journal_id=self.journal_id,
            volume_size=self.volume.size,
            capacity=self.ring.capacity,
            head_lpos=self.head_lpos,
            head_seq=self.head_seq,
            # Only records up to durable_seq are known durable; recovery treats a bad record below
            # next_seq as corruption, so it must not count records a crash may legitimately tear.
            next_seq=self.durable_seq + 1,
            applied_seq=min(self.volume_durable_seq, applied_seq),
            boot_id=boot_id(),
            clean=clean,
            enqueue_paused=self.enqueue_paused,
            needs_full_resync=self.needs_full_resync,
            consumers={name: c.state() for name, c in self.consumers.items()},
            replica=self.replica,
            tail_stamp=tail_stamp or None,
        )

    def write_checkpoint(self, cp: Checkpoint) -> None:
        """Blocking (run in a thread): stamp the volume's identity, write the next slot, sync."""
        cp = identity.stamp(
            cp,
            self.volume,
            volume_id=self.volume_id,
            recent=self.recent_writes.copy(),
            previous=self.volume_identity,
        )
        self.volume_identity = cp.volume
        write_checkpoint(self.file, cp, self.generation + 1)
        self.generation += 1

    def checkpoint_written(self, cp: Checkpoint) -> None:
        self.checkpoint_head_lpos = cp.head_lpos

    def rebase(self, next_seq: int) -> None:
        """Continue the numbering at ``next_seq`` (a secondary after a resync).

        Only on an empty journal whose records are all in the volume: the caller applied and
        checkpointed everything and switched journal-mode consumers to tracking first.
        """
        if self.records or self._batch:
            raise JournalError("cannot renumber a journal that still holds records")
        self.next_seq = next_seq
        self.written_seq = self.durable_seq = next_seq - 1
        self.volume_durable_seq = next_seq - 1
        self.last_stamp = (0, 0)  # the record now numbered next_seq - 1 is not known here
        for consumer in self.consumers.values():
            # Every cursor belongs to the old numbering. The records it pointed at are gone, so
            # each consumer goes (back) to tracking: its sender restarts a resync from the map.
            consumer.generation += 1
            consumer.set_mode(ConsumerMode.TRACKING)
            consumer.acked_seq = next_seq - 1

    def discard_after(self, seq: int) -> int:
        """Drop the records after ``seq`` that never reached the volume (a replica's delayed
        records given up at promote): the log ends after ``seq`` from now on. Returns how many
        were dropped. The caller erases their headers (:meth:`erase_renumbered`, in a thread)
        and writes a checkpoint before anything new is appended. Raises JournalError while a
        batch is staged or when ``seq`` is before the volume's newest record."""
        if self._batch:
            raise JournalError("cannot cut the log while a batch is staged")
        if seq < self.applied_seq:
            raise JournalError(f"records up to {self.applied_seq} are in the volume already")
        dropped = 0
        while self.records and self.records[-1].seq > seq:
            self.tail_lpos = self.records.pop().lpos
            dropped += 1
        self.next_seq = seq + 1
        self.written_seq = min(self.written_seq, seq)
        self.durable_seq = min(self.durable_seq, seq)
        if self.records:
            newest = self.records[-1]
            self.last_stamp = (newest.seq, newest.timestamp_ns)
        for consumer in self.consumers.values():
            consumer.acked_seq = min(consumer.acked_seq, seq)
        return dropped

    def erase_renumbered(self) -> None:
        """After a :meth:`rebase` to a lower number: zero the headers past the log's end that
        carry numbers it will reuse, and sync (blocking; run it in a thread).

        Records of the old numbering may lie past the end with valid CRCs; a later scan would
        take one that lines up with an expected number for the next record, or as a witness
        that the log's end is corruption.
        """
        erase_stale_headers(self.file, self.ring, self.tail_lpos, self.head_lpos, self.next_seq)
        self.file.flush()

    def write_checkpoint_now(self, *, clean: bool, applied_seq: int | None = None) -> None:
        """Synchronous checkpoint, for opening and closing (nothing else is running).

        ``applied_seq``: the volume holds every record up to it (default: every record
        written). If the volume cannot be synced (an earlier I/O error), the checkpoint is still
        written, unclean and without moving the volume's durable point, so recovery replays
        every record the volume may lack.
        """
        self.write_batch()
        self.durable_seq = self.sync()
        applied = self.written_seq if applied_seq is None else applied_seq
        if not self.volume.read_only:
            try:
                self.volume.flush()
            except OSError as exc:
                log.error(
                    "journal %s: volume sync failed, records kept for replay: %s", self.path, exc
                )
                clean = False
            else:
                self.volume_durable_seq = max(self.volume_durable_seq, applied)
        else:
            self.volume_durable_seq = max(self.volume_durable_seq, applied)
        self.sync_dirty_maps()
        cp = self.checkpoint_state(applied_seq=applied, clean=clean)
        self.write_checkpoint(cp)
        self.checkpoint_written(cp)

    # --- closing --------------------------------------------------------------------------------

    def close(self, *, clean: bool = True, applied_seq: int | None = None) -> None:
        """Write a final checkpoint and close. ``applied_seq``: what the volume holds."""
        if self._closed:
            return
        try:
            try:
                self.write_checkpoint_now(clean=clean, applied_seq=applied_seq)
            except OSError:
                if self.io_error is not None:
                    # No checkpoint can say what the ring lost: the dirty maps say it instead.
                    self.mark_all_dirty()
                    with contextlib.suppress(OSError, DirtyMapError):
                        self.sync_dirty_maps()
                raise
        finally:
            for consumer in self.consumers.values():
                with contextlib.suppress(Exception):
                    consumer.dirty.close()
            self._closed = True
            self.file.close()

    # --- status ---------------------------------------------------------------------------------

    def status(self, high_water: float) -> dict[str, object]:
        oldest = self.records[0] if self.records else None
        used = self.tail_lpos - self.head_lpos
        return {
            "path": str(self.path),
            "volume_id": self.volume_id,
            "identity_warning": self.identity_warning,
            "capacity": self.ring.capacity,
            "used": used,
            "used_reserved": self.used,
            "records": len(self.records),
            "oldest_seq": oldest.seq if oldest else None,
            "newest_seq": self.next_seq - 1,
            "oldest_age_seconds": (
                round((time.time_ns() - oldest.timestamp_ns) / 1e9, 3) if oldest else 0.0
            ),
            "durable_seq": self.durable_seq,
            "applied_seq": self.applied_seq,
            "high_water": high_water,
            "above_high_water": used >= high_water * self.ring.capacity,
            "enqueue_paused": self.enqueue_paused,
            "consumers": {
                name: {
                    "mode": str(c.mode),
                    "paused": c.paused,
                    "acked_seq": c.acked_seq,
                    "backlog_bytes": backlog[0],
                    "backlog_records": backlog[1],
                    "dirty_bytes": c.dirty.dirty_bytes(),
                    "peer": c.peer,
                    "detached": c.detached,
                }
                for name, c in self.consumers.items()
                for backlog in (self.backlog(c),)
            },
        }
