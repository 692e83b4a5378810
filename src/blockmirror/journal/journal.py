"""The journal of one volume: the ring file, its live records, consumers and checkpoints.

Appends are staged on the event loop and written by :meth:`Journal.write_batch` as one vectored
write (two around the ring's end). Syncs, checkpoints and dirty-map writes run in worker threads.
The rules that make this crash-safe are in docs/journal.md; the comments here point at them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from blockmirror import statedir
from blockmirror.blockdev.writepath import MAX_WRITE
from blockmirror.errors import JournalError
from blockmirror.io.fileio import pwritev_all
from blockmirror.journal import identity
from blockmirror.journal.checkpoint import (
    BODY_MAX,
    Checkpoint,
    ConsumerState,
    ReplicaState,
    VolumeIdentity,
    new_journal_id,
    read_checkpoint,
    write_checkpoint,
)
from blockmirror.journal.dirtymap import DirtyMap, DirtyMapError
from blockmirror.journal.format import HEADER_SIZE, Kind, RecordHeader, record_iov, record_size
from blockmirror.journal.record import UNKNOWN_ORIGIN
from blockmirror.journal.ring import DATA_START, Ring
from blockmirror.journal.scan import (
    JournalCorruptError,
    ScanResult,
    erase_stale_headers,
    scan,
)
from blockmirror.store.volume import Volume

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
Mode = Literal["journal", "tracking"]
DIRTY_REGION = 64 * 1024


class RecordsGone(JournalError):
    """Records a reader asked for were freed (a consumer's cursor behind the journal's head)."""


class VolumeIdentityError(JournalError):
    """The volume found is not the one the journal belongs to (docs/journal.md, "Identity")."""


def boot_id() -> str:
    """The running kernel's boot id: it changes on every boot, never on a process restart."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(slots=True)
class LiveRecord:
    seq: int
    lpos: int
    size: int
    kind: Kind
    offset: int
    length: int
    timestamp_ns: int


@dataclass(slots=True)
class Consumer:
    """A named cursor over the journal (a replication peer, for instance)."""

    name: str
    acked_seq: int
    mode: Mode
    paused: bool
    dirty: DirtyMap
    # Grows whenever bits may be set behind a copy in flight (a switch to tracking, writes
    # recorded only in the map): a region copied before a change must not be cleared after it.
    generation: int = 0

    def state(self) -> ConsumerState:
        return ConsumerState(self.acked_seq, self.mode, self.paused)


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    records: int
    replayed: int
    torn_tail: str | None
    unclean_os_restart: bool
    seconds: float


class Journal:
    def __init__(self, path: Path, fd: int, ring: Ring, volume: Volume, journal_id: str) -> None:
        self.path = path
        self.fd = fd
        self.ring = ring
        self.volume = volume
        self.journal_id = journal_id
        # Written into every record this unit's host makes (record.origin_id of the unit name).
        self.origin = UNKNOWN_ORIGIN
        # The volume's identity (what peers bind to; a resize keeps it), which file it is and a
        # fingerprint of its content, refreshed at every checkpoint (see identity.py).
        self.volume_id = journal_id
        self.volume_identity: VolumeIdentity | None = None
        self.recent_writes: deque[int] = deque(maxlen=identity.FINGERPRINT_BLOCKS)
        self.identity_warning: str | None = None
        self.records: deque[LiveRecord] = deque()
        self.tail_lpos = 0
        self.next_seq = 1
        # Highest sequence number known durable in the journal (covered by a finished fdatasync).
        self.durable_seq = 0
        # Highest sequence number written to the ring file (page cache) by write_batch.
        self.written_seq = 0
        # Every record up to this one is in the volume (from the last checkpoint).
        self.applied_seq = 0
        # The volume was last synced when it held every record up to this one.
        self.volume_durable_seq = 0
        # Ring space before this position may be reused: it is the head of a durable checkpoint.
        self.checkpoint_head_lpos = 0
        self.checkpoint_head_seq = 1
        self.generation = 0
        self.consumers: dict[str, Consumer] = {}
        self.enqueue_paused = False
        self.needs_full_resync = False
        self.high_water_alert = False
        self.recovery: RecoveryReport | None = None
        # On a secondary: where the replica's data comes from (None on a primary).
        self.replica: ReplicaState | None = None
        self._recovered_consumers: dict[str, ConsumerState] = {}
        self._unclean_os_restart = False
        # Set by the first failed write or sync of the ring: after an I/O error on a file no
        # later sync of it proves anything (the kernel may have dropped the dirty pages and
        # reports the error once), so every later sync fails with it too.
        self.io_error: OSError | None = None
        self._batch: list[tuple[int, list[Buffer]]] = []
        self._batch_end = -1
        self._batch_seq = 0

    # --- opening and recovery ---------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        volume: Volume,
        journal_size: int,
        consumers: Sequence[str],
        dirty_dir: Path,
        volume_name: str,
        adopt: bool = False,
    ) -> Journal:
        """Open (creating if missing) and recover; replays what the volume may lack.

        Raises :class:`JournalCorruptError` when the log is damaged in the middle, and
        :class:`JournalError` when it does not belong to this volume or size
        (:class:`VolumeIdentityError`: the volume found is not the one it was written for).
        ``adopt``: take the volume as it is instead (``blockmirror volume adopt``): nothing is
        replayed into it, its identity is recorded anew and every consumer gets a full resync.
        """
        capacity = journal_size - DATA_START
        ring = Ring(capacity)
        exists = path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if not exists or os.fstat(fd).st_size == 0:
                journal = cls._create(path, fd, ring, volume)
            else:
                journal = cls._recover(path, fd, ring, volume, adopt=adopt)
            try:
                journal._attach_consumers(consumers, dirty_dir, volume_name)
                journal._write_checkpoint_now(clean=False)
                if volume.sync_error is not None:
                    # Not served on a disk that already fails its syncs; the checkpoint just
                    # written keeps every record for the next start to replay.
                    raise JournalError(
                        f"volume {volume.path} failed a sync at start "
                        f"({volume.sync_error.strerror or volume.sync_error}); the journal "
                        "keeps every record; fix the storage and start again"
                    )
            except BaseException:
                for consumer in journal.consumers.values():
                    consumer.dirty.close(sync=False)
                raise
        except BaseException:
            os.close(fd)
            raise
        return journal

    @classmethod
    def _create(cls, path: Path, fd: int, ring: Ring, volume: Volume) -> Journal:
        try:
            os.posix_fallocate(fd, 0, DATA_START + ring.capacity)
        except OSError as exc:
            # Leave no empty file behind: the next start creates the journal afresh.
            with contextlib.suppress(OSError):
                path.unlink()
            raise JournalError(
                f"cannot preallocate journal {path} ({DATA_START + ring.capacity} bytes): "
                f"{exc.strerror or exc}; free space in {path.parent} or lower journal_size"
            ) from exc
        journal = cls(path, fd, ring, volume, new_journal_id())
        journal.volume_id = new_journal_id()
        journal._write_checkpoint_now(clean=True)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return journal

    @classmethod
    def _recover(
        cls, path: Path, fd: int, ring: Ring, volume: Volume, *, adopt: bool = False
    ) -> Journal:
        started = time.monotonic()
        if os.fstat(fd).st_size < DATA_START + ring.capacity:
            raise JournalError(f"journal {path} is smaller than journal_size; was it changed?")
        found = read_checkpoint(fd)
        if found is None:
            raise JournalError(
                f"journal {path} has no valid checkpoint: it is not a blockmirror journal or "
                "both checkpoint slots are damaged; run `blockmirror journal recover`"
            )
        _, generation, cp = found
        if cp.capacity != ring.capacity:
            raise JournalError(
                f"journal {path} holds {cp.capacity} bytes of ring but journal_size asks for "
                f"{ring.capacity}; restore the old journal_size, or stop the unit and run "
                "`blockmirror journal resize CONFIG VOLUME SIZE`"
            )
        if cp.volume_size != volume.size:
            raise JournalError(
                f"journal {path} belongs to a volume of {cp.volume_size} bytes, not {volume.size}"
            )
        result: ScanResult = scan(fd, ring, cp.head_lpos, cp.head_seq, cp.next_seq)
        if result.corrupt:
            assert result.stop is not None and result.corruption_witness is not None
            raise JournalCorruptError(str(path), result.stop, result.corruption_witness)
        journal = cls(path, fd, ring, volume, cp.journal_id)
        journal.volume_id = cp.volume_id if cp.volume_id is not None else cp.journal_id
        journal.volume_identity = cp.volume
        journal.generation = generation
        journal.checkpoint_head_lpos = cp.head_lpos
        journal.checkpoint_head_seq = cp.head_seq
        journal.tail_lpos = result.tail_lpos
        journal.next_seq = max(result.next_seq, cp.next_seq)
        journal.written_seq = journal.durable_seq = journal.next_seq - 1
        journal.applied_seq = cp.applied_seq
        journal.enqueue_paused = cp.enqueue_paused
        journal.needs_full_resync = cp.needs_full_resync
        journal.replica = cp.replica
        journal._recovered_consumers = dict(cp.consumers)
        journal._unclean_os_restart = not cp.clean and cp.boot_id != boot_id()
        for rec in result.records:
            journal.records.append(
                LiveRecord(
                    rec.seq, rec.lpos, rec.size, rec.kind, rec.offset, rec.length, rec.timestamp_ns
                )
            )
        if result.next_seq < cp.next_seq:
            # The checkpoint saw records that are gone: only possible if the tail past the
            # checkpoint's own records was never written. Sequence numbers are not reused.
            log.warning("journal %s: log ends before the checkpoint's next_seq", path)
        # A header carrying the expected sequence number whose record does not check out is
        # the torn last batch; anything else at the end is old data from an earlier lap.
        torn = result.stop.reason if result.stop is not None and result.stop.torn else None
        if torn is not None:
            log.warning("journal %s: cut a torn tail at seq %d: %s", path, result.next_seq, torn)
        erased = 0
        if not cp.clean:
            erased = erase_stale_headers(fd, ring, result.tail_lpos, cp.head_lpos, journal.next_seq)
            if erased or torn is not None:
                os.fdatasync(fd)
            if erased:
                # Valid records past the cut were written after a torn one: their batch may
                # have been applied and sent before a power loss tore the earlier one, so a
                # consumer may hold writes the log no longer has. Only a full resync undoes
                # that. A torn last batch alone needs none: a batch is applied, and so sent,
                # only after all of it was written.
                journal.needs_full_resync = True
                log.warning("journal %s: %d stale record headers past the end erased", path, erased)
        if adopt:
            journal._adopt_volume()
        else:
            # Before anything is replayed: the journal's records must not go into another file.
            journal._check_identity(cp, result, lenient=journal._unclean_os_restart or erased > 0)
        replayed = journal._replay()
        journal.volume_durable_seq = journal.applied_seq
        journal.recovery = RecoveryReport(
            len(result.records),
            replayed,
            torn,
            journal._unclean_os_restart,
            time.monotonic() - started,
        )
        return journal

    def _check_identity(self, cp: Checkpoint, result: ScanResult, *, lenient: bool) -> None:
        """Refuse a volume that is not the one this journal was written for (identity.py)."""
        ring_records = [(r.seq, r.kind, r.offset, r.length) for r in result.records]
        try:
            check = identity.verify(self.volume, cp, ring_records, lenient=lenient)
        except OSError as exc:
            raise JournalError(
                f"cannot read volume {self.volume.path} to check it is the journal's: "
                f"{exc.strerror or exc}"
            ) from exc
        if check.problem is not None:
            raise VolumeIdentityError(f"journal {self.path}: {check.problem}")
        if check.warning is not None:
            log.warning("journal %s: %s", self.path, check.warning)
            self.identity_warning = check.warning
            if lenient:
                self.needs_full_resync = True

    def _adopt_volume(self) -> None:
        """Take the volume as it is: drop every record (none is replayed into it), send every
        consumer a full resync and forget which source a replica came from (the source then
        copies all of it again). The identity is recorded anew by the next checkpoint."""
        log.warning(
            "journal %s: adopting volume %s as it is: %d records dropped, full resync for every "
            "consumer",
            self.path,
            self.volume.path,
            len(self.records),
        )
        self.records.clear()
        self.applied_seq = self.next_seq - 1
        self.needs_full_resync = True
        self.replica = None

    def stamp_identity(self, cp: Checkpoint) -> Checkpoint:
        """``cp`` with the volume's identity and a fresh fingerprint (blocking: reads the volume).

        The fingerprint is of the volume once it durably holds every record up to
        ``cp.applied_seq``. None is taken while the volume is written outside the journal
        (enqueueing paused, or a replica in the middle of a resync): nothing would tell, at the
        next start, which of its blocks changed legitimately.
        """
        outside = cp.enqueue_paused or (cp.replica is not None and not cp.replica.consistent)
        ident = identity.sample(
            self.volume,
            fp_seq=cp.applied_seq,
            recent=self.recent_writes.copy(),
            previous=self.volume_identity,
            fingerprint=not outside,
        )
        stamped = dataclasses.replace(cp, volume_id=self.volume_id, volume=ident)
        while ident is not None and ident.blocks and len(stamped.to_json()) > BODY_MAX:
            # Many consumers with long names: fewer blocks rather than no checkpoint at all.
            ident = dataclasses.replace(ident, blocks=ident.blocks[: len(ident.blocks) // 2])
            stamped = dataclasses.replace(cp, volume_id=self.volume_id, volume=ident)
        self.volume_identity = ident
        return stamped

    def _replay(self) -> int:
        """Bring the volume up to date with every record after ``applied_seq``; then sync it."""
        count = 0
        at = self.applied_seq
        try:
            for rec in self.records:
                if rec.seq <= self.applied_seq:
                    continue
                at = rec.seq
                self.apply_from_ring(rec)
                count += 1
            if count:
                self.volume.flush()
        except OSError as exc:
            # The records stay in the ring: the next start replays them again.
            raise JournalError(
                f"replaying journal {self.path} into volume {self.volume.path} failed at record "
                f"{at}: {exc.strerror or exc}; the journal keeps every "
                "record, fix the volume's storage (free space, a failing disk) and start again"
            ) from exc
        self.applied_seq = self.next_seq - 1
        return count

    def apply_from_ring(self, rec: LiveRecord) -> None:
        if rec.kind == Kind.WRITE:
            data = os.pread(self.fd, rec.length, self.ring.physical(rec.lpos) + HEADER_SIZE)
            self.volume.pwrite(rec.offset, data)
        elif rec.kind == Kind.ZERO:
            self.volume.write_zeroes(rec.offset, rec.length, may_trim=False)
        elif rec.kind == Kind.TRIM:
            self.volume.trim(rec.offset, rec.length)

    def _attach_consumers(self, names: Sequence[str], dirty_dir: Path, volume_name: str) -> None:
        known = self._recovered_consumers
        for name in names:
            dpath = statedir.dirty_map_path(dirty_dir, volume_name, name)
            state = known.get(name)
            if dpath.exists():
                try:
                    dirty = DirtyMap.open(
                        dpath, volume_size=self.volume.size, region_size=DIRTY_REGION
                    )
                except DirtyMapError as exc:
                    # A damaged map cannot say what differs, so everything does: the consumer
                    # gets a full resync rather than the volume going out of service.
                    log.error("%s; recreating it with every region dirty", exc)
                    dirty = DirtyMap.create(
                        dpath,
                        volume_size=self.volume.size,
                        region_size=DIRTY_REGION,
                        all_dirty=True,
                    )
                    state = ConsumerState(self.next_seq - 1, "tracking", False)
            else:
                # A map the checkpoint knows of but the disk lacks (removed, or state_dir
                # restored partly) cannot say what differs: everything does, as when damaged.
                if state is not None:
                    log.error("%s is missing; recreating it with every region dirty", dpath)
                    state = ConsumerState(self.next_seq - 1, "tracking", False)
                dirty = DirtyMap.create(
                    dpath,
                    volume_size=self.volume.size,
                    region_size=DIRTY_REGION,
                    all_dirty=state is not None,
                )
            if state is None:
                # A consumer new to this journal has never seen the volume: all of it differs.
                dirty.mark_all()
                state = ConsumerState(self.next_seq - 1, "tracking", False)
            consumer = Consumer(name, state.acked_seq, state.mode, state.paused, dirty)
            if self._unclean_os_restart or self.needs_full_resync:
                # Volume pages may have reached the disk without their journal records.
                consumer.dirty.mark_all()
                consumer.mode = "tracking"
            if consumer.mode == "journal" and consumer.acked_seq + 1 < self.head_seq:
                # The records it needs are gone (should not happen; be safe).
                consumer.dirty.mark_all()
                consumer.mode = "tracking"
            consumer.dirty.sync()
            self.consumers[name] = consumer
        self.needs_full_resync = False

    # --- positions ------------------------------------------------------------------------------

    @property
    def head_seq(self) -> int:
        return self.records[0].seq if self.records else self.next_seq

    @property
    def head_lpos(self) -> int:
        return self.records[0].lpos if self.records else self.tail_lpos

    @property
    def used(self) -> int:
        return self.tail_lpos - self.checkpoint_head_lpos

    @property
    def capacity(self) -> int:
        return self.ring.capacity

    def max_payload(self) -> int:
        """The largest payload one record may carry (bigger writes are split)."""
        return min(self.ring.max_record - HEADER_SIZE, 4 * 1024 * 1024) & ~7

    def max_write(self) -> int:
        """The largest write an empty ring takes for sure, wherever its tail is.

        A write is split into records of at most :meth:`max_payload`; with one padding of at
        most such a record at the wrap, ``length + headers + record`` must fit the capacity.
        A power of two, so clients that split large requests split evenly.
        """
        room = self.ring.capacity - record_size(self.max_payload())
        pieces = -(-room // self.max_payload()) + 1
        room -= pieces * HEADER_SIZE
        size = 1 << max(room, 4096).bit_length() - 1
        return max(4096, min(MAX_WRITE, size))

    def fits(self, payload_len: int) -> bool:
        size = record_size(payload_len)
        return self.ring.place(self.tail_lpos, size).new_tail - self.checkpoint_head_lpos <= (
            self.ring.capacity
        )

    # --- appending ------------------------------------------------------------------------------

    def stage(
        self,
        kind: Kind,
        offset: int,
        length: int,
        payload: Sequence[Buffer] = (),
        *,
        seq: int | None = None,
        timestamp_ns: int | None = None,
        origin: int | None = None,
    ) -> LiveRecord:
        """Encode one record into the current batch. The caller checked :meth:`fits`.

        ``seq``: a secondary keeps its source's numbering, so it passes the number the record
        arrived with; it must be the next one (the link guarantees it). ``timestamp_ns`` and
        ``origin``: a secondary keeps those of the write at its primary too; a host write
        gets the time now and this journal's :attr:`origin`.
        """
        if seq is not None and seq != self.next_seq:
            raise JournalError(f"record seq {seq} arrived, {self.next_seq} was expected")
        payload_len = length if kind == Kind.WRITE else 0
        size = record_size(payload_len)
        placement = self.ring.place(self.tail_lpos, size)
        seq = self.next_seq
        if placement.pad_len and placement.pad_header:
            pad = RecordHeader(
                Kind.PADDING, seq, 0, 0, 0, self.durable_seq, placement.pad_payload_len
            )
            self._add_iov(placement.pad_lpos, record_iov(pad), HEADER_SIZE)
        now = time.time_ns() if timestamp_ns is None else timestamp_ns
        header = RecordHeader(
            kind,
            seq,
            now,
            offset,
            length,
            self.durable_seq,
            payload_len,
            self.origin if origin is None else origin,
        )
        self._add_iov(placement.record_lpos, record_iov(header, payload), size)
        rec = LiveRecord(seq, placement.record_lpos, size, kind, offset, length, now)
        self.records.append(rec)
        if kind == Kind.WRITE:
            self.recent_writes.appendleft(offset)  # for the volume's fingerprint
        self.next_seq = seq + 1
        self.tail_lpos = placement.new_tail
        self._batch_seq = seq
        return rec

    def _add_iov(self, lpos: int, iov: list[Buffer], nbytes: int) -> None:
        """Queue ``nbytes`` of buffers for ``lpos``, extending the current run when contiguous."""
        pos = self.ring.physical(lpos)
        if self._batch and self._batch_end == pos:
            self._batch[-1][1].extend(iov)
        else:
            self._batch.append((pos, iov))
        self._batch_end = pos + nbytes

    @property
    def batch_pending(self) -> bool:
        return bool(self._batch)

    def write_batch(self) -> None:
        """Write every staged record to the ring: one pwritev per contiguous run."""
        if self.io_error is not None:
            raise self.io_error
        batch, self._batch = self._batch, []
        try:
            for pos, bufs in batch:
                pwritev_all(self.fd, bufs, pos)
        except OSError as exc:
            self.io_error = exc
            raise
        if batch:
            self.written_seq = self._batch_seq

    def sync(self) -> int:
        """fdatasync the ring (blocking: call in a thread); returns the seq now durable."""
        if self.io_error is not None:
            raise self.io_error
        target = self.written_seq
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            self.io_error = exc
            raise
        return target

    # --- reading ----------------------------------------------------------------------------

    def read_run(self, seq: int, last_seq: int, max_bytes: int) -> tuple[list[LiveRecord], bytes]:
        """Records from ``seq`` to at most ``last_seq``, as the bytes the ring holds.

        The run is consecutive records lying contiguously in the ring (it stops at the wrap)
        and, past its first record, at most ``max_bytes`` long; the bytes are whole records in
        journal format, headers included, ready to stream. Empty when ``seq`` is past
        ``last_seq`` or not yet written. Raises :class:`RecordsGone` when ``seq`` was freed.
        Blocking only as far as the page cache is (a read of recently written bytes).
        """
        records = self.records
        if not records or seq > last_seq or seq >= self.next_seq:
            return [], b""
        if seq < records[0].seq:
            raise RecordsGone(f"journal {self.path}: records from {seq} were freed")
        index = seq - records[0].seq
        run: list[LiveRecord] = []
        total = 0
        while index < len(records):
            rec = records[index]
            if rec.seq > last_seq:
                break
            if run and (rec.lpos != run[-1].lpos + run[-1].size or total + rec.size > max_bytes):
                break
            run.append(rec)
            total += rec.size
            index += 1
        if not run:
            return [], b""
        length = run[-1].lpos + run[-1].size - run[0].lpos
        return run, os.pread(self.fd, length, self.ring.physical(run[0].lpos))

    # --- consumers ------------------------------------------------------------------------------

    def acknowledge(self, name: str, seq: int) -> None:
        consumer = self.consumers[name]
        if consumer.mode == "journal" and seq > consumer.acked_seq:
            consumer.acked_seq = min(seq, self.next_seq - 1)

    def backlog(self, consumer: Consumer) -> tuple[int, int]:
        """(bytes, records) the consumer has yet to acknowledge."""
        if consumer.mode != "journal":
            return 0, 0
        nbytes = count = 0
        for rec in reversed(self.records):
            if rec.seq <= consumer.acked_seq:
                break
            nbytes += rec.size
            count += 1
        return nbytes, count

    def switch_to_tracking(self, consumer: Consumer, *, upto: int | None = None) -> None:
        """Turn the consumer's unacknowledged records (up to ``upto``) into dirty bits.

        The caller makes the dirty map durable and writes a checkpoint before the ring space
        those records occupy is reused (docs/journal.md, "Consumers, overflow and the dirty map").
        """
        last = self.next_seq - 1 if upto is None else upto
        consumer.generation += 1
        for rec in self.records:
            if consumer.acked_seq < rec.seq <= last and rec.kind != Kind.FLUSH:
                consumer.dirty.mark(rec.offset, rec.length)
        if upto is None or upto >= self.next_seq - 1:
            consumer.mode = "tracking"
        else:
            consumer.acked_seq = last
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
            consumer.generation += 1
            consumer.dirty.mark_all()
            consumer.mode = "tracking"

    def tracking_consumers(self) -> list[Consumer]:
        return [c for c in self.consumers.values() if c.mode == "tracking"]

    def dirty_pending(self) -> bool:
        return any(c.dirty.pending() for c in self.consumers.values())

    def sync_dirty_maps(self) -> None:
        """Blocking; run in a thread."""
        for consumer in list(self.consumers.values()):
            if consumer.dirty.pending():
                consumer.dirty.sync()

    # --- checkpoints ----------------------------------------------------------------------------

    def keep_from(self, applied_seq: int) -> int:
        """The oldest sequence number the volume or a journal-mode consumer may still need."""
        keep = applied_seq + 1
        for consumer in self.consumers.values():
            if consumer.mode == "journal":
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
        )

    def write_checkpoint(self, cp: Checkpoint) -> None:
        """Blocking (run in a thread): write the next slot and sync it."""
        cp = self.stamp_identity(cp)
        write_checkpoint(self.fd, cp, self.generation + 1)
        self.generation += 1

    def checkpoint_written(self, cp: Checkpoint) -> None:
        self.checkpoint_head_lpos = cp.head_lpos
        self.checkpoint_head_seq = cp.head_seq

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
        for consumer in self.consumers.values():
            # Every cursor belongs to the old numbering. The records it pointed at are gone, so
            # each consumer goes (back) to tracking: its sender restarts a resync from the map.
            consumer.generation += 1
            consumer.mode = "tracking"
            consumer.acked_seq = next_seq - 1

    def _write_checkpoint_now(self, *, clean: bool, applied_seq: int | None = None) -> None:
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

    def close(self, *, clean: bool = True, applied_seq: int | None = None) -> None:
        """Write a final checkpoint and close. ``applied_seq``: what the volume holds."""
        if self.fd < 0:
            return
        try:
            try:
                self._write_checkpoint_now(clean=clean, applied_seq=applied_seq)
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
            os.close(self.fd)
            self.fd = -1

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
                    "mode": c.mode,
                    "paused": c.paused,
                    "acked_seq": c.acked_seq,
                    "backlog_bytes": self.backlog(c)[0],
                    "backlog_records": self.backlog(c)[1],
                    "dirty_bytes": c.dirty.dirty_bytes(),
                }
                for name, c in self.consumers.items()
            },
        }
