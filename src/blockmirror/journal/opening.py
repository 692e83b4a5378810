"""Opening a journal: create it, or read its checkpoint, scan its log, check it is the volume's
and replay into the volume what it may lack (docs/journal.md, "Recovery" and "Identity").

:func:`open_journal` is ``Journal.open``. For an existing journal it calls :func:`read_log`
(nothing is changed yet), then, on the journal built from what that found, :func:`recover` (cut
a torn tail, erase stale headers, check the volume's identity or adopt the volume, replay).
Then it attaches the consumers and writes a checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from blockmirror.errors import JournalError
from blockmirror.io.fileio import sync_directory
from blockmirror.journal import consumers as consumers_module
from blockmirror.journal import identity
from blockmirror.journal.checkpoint import (
    Checkpoint,
    ConsumerState,
    new_journal_id,
    read_checkpoint,
)
from blockmirror.journal.format import EXTENT_KINDS, Kind
from blockmirror.journal.record import UNKNOWN_ORIGIN, Record
from blockmirror.journal.replay import RingApplier
from blockmirror.journal.ring import DATA_START, Ring
from blockmirror.journal.scan import (
    JournalCorruptError,
    ScanResult,
    erase_stale_headers,
    scan,
)
from blockmirror.journal.storage import RingFileOpener, open_journal_file
from blockmirror.store.base import Store

if TYPE_CHECKING:
    from blockmirror.journal.journal import Journal

__all__ = [
    "JournalMismatchError",
    "RecoveryReport",
    "VolumeIdentityError",
    "check_fits",
    "collector_paused",
    "open_journal",
    "read_log",
    "recover",
    "replay",
]

log = logging.getLogger(__name__)

# Applies a journal's tail of live records to its volume, in order (blocking; OSError);
# returns the newest record applied (a lagged replica leaves its newest for later).
Replayer = Callable[["Journal", "list[Record]"], int]


class VolumeIdentityError(JournalError):
    """The volume found is not the one the journal belongs to (docs/journal.md, "Identity")."""


class JournalMismatchError(JournalError):
    """The journal was written for another journal_size (``ring``) or another volume size."""

    def __init__(self, message: str, *, ring: bool) -> None:
        super().__init__(message)
        self.ring = ring


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What opening an existing journal found and did (``Journal.recovery``; the log says it)."""

    records: int
    replayed: int
    torn_tail: str | None
    unclean_os_restart: bool
    seconds: float


def open_journal(
    cls: type[Journal],
    path: Path,
    *,
    volume: Store,
    journal_size: int,
    consumers: Sequence[str],
    dirty_dir: Path,
    volume_name: str,
    adopt: bool = False,
    origin: int = UNKNOWN_ORIGIN,
    open_ring: RingFileOpener | None = None,
    replayer: Replayer | None = None,
) -> Journal:
    """``Journal.open``: open the journal at ``path`` (creating it if missing) and recover it,
    replaying what the volume may lack; ``cls`` is the class (``Journal.open`` passes it).

    Raises :class:`~blockmirror.journal.scan.JournalCorruptError` when the log is damaged in
    the middle, and :class:`JournalError` when it does not belong to this volume or size
    (:class:`VolumeIdentityError`: the volume found is not the one it was written for;
    :class:`JournalMismatchError`: another journal_size or volume size). ``adopt``: take the
    volume as it is instead (``blockmirror volume adopt``): nothing is replayed into it, its
    identity is recorded anew and every consumer gets a full resync. ``origin``: written into
    every record a host write makes here (:func:`~blockmirror.journal.record.origin_id` of the
    unit's name).

    ``open_ring``: how the journal file is opened as a store, given its path and
    ``journal_size``; it creates the file, preallocated, when it is missing or empty. The
    default is :func:`~blockmirror.journal.storage.open_journal_file`; a test passes one that
    wraps its store in the fault-injecting store.

    ``replayer``: applies the records of the tail instead of :func:`replay`'s plain loop (the
    volume's history keeps their before-images; ``history/capture.py``).
    """
    ring = Ring(journal_size - DATA_START)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = 0
    if 0 < size < journal_size:
        raise JournalError(f"journal {path} is smaller than journal_size; was it changed?")
    file = (open_ring or open_journal_file)(path, journal_size)
    try:
        known: Mapping[str, ConsumerState] = {}
        if size == 0:
            journal = cls(path, file, ring, volume, new_journal_id())
            journal.origin = origin
            journal.volume_id = new_journal_id()
            journal.write_checkpoint_now(clean=True)
            sync_directory(path.parent)
        else:
            started = time.monotonic()
            with collector_paused():
                cp, generation, result = read_log(path, file, ring, volume.size)
                journal = cls(path, file, ring, volume, cp.journal_id)
                journal.origin = origin
                journal.restore(cp, generation, result)
                recover(journal, cp, result, adopt=adopt, started=started, replayer=replayer)
            known = cp.consumers
        journal.consumers = consumers_module.attach(
            consumers,
            state_dir=dirty_dir,
            volume_name=volume_name,
            volume_size=volume.size,
            known=known,
            next_seq=journal.next_seq,
            head_seq=journal.head_seq,
            full_resync=journal.unclean_os_restart or journal.needs_full_resync,
        )
        journal.needs_full_resync = False
        try:
            journal.write_checkpoint_now(clean=False, applied_seq=journal.applied_seq)
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
        file.close()
        raise
    return journal


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration (then on again, if it was).

    Recovery makes a record object for every record of the log, a quarter of a million for a
    full 1 GiB journal of 4 KiB writes, and none of them is garbage: the collector would walk
    them over and over as they are made, for nothing (docs/journal.md, "Recovery"). Memory
    freed by reference counting is freed as always.

    At the end what was made is moved to the collector's oldest generation, where it would be
    after surviving a few collections (``gc.freeze`` then ``gc.unfreeze``), so that the
    first young collection after this does not walk it all (0.07 s for that journal). Only
    when nothing is frozen: the pair would also unfreeze what someone else froze.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def check_fits(path: Path, cp: Checkpoint, *, capacity: int, volume_size: int) -> None:
    """Raise :class:`JournalMismatchError` unless the journal whose checkpoint is ``cp`` has a
    ring of ``capacity`` bytes and belongs to a volume of ``volume_size`` bytes."""
    if cp.capacity != capacity:
        raise JournalMismatchError(
            f"journal {path} holds {cp.capacity} bytes of ring but journal_size asks for "
            f"{capacity}",
            ring=True,
        )
    if cp.volume_size != volume_size:
        raise JournalMismatchError(
            f"journal {path} belongs to a volume of {cp.volume_size} bytes, not {volume_size}",
            ring=False,
        )


def read_log(
    path: Path, file: Store, ring: Ring, volume_size: int
) -> tuple[Checkpoint, int, ScanResult]:
    """The newest checkpoint, its generation and the scan of the log it starts; reads only.

    Raises :class:`JournalError` when there is no valid checkpoint or the journal does not fit
    ``ring`` and the volume, and :class:`JournalCorruptError` when the log is damaged in the
    middle.
    """
    found = read_checkpoint(file)
    if found is None:
        raise JournalError(
            f"journal {path} has no valid checkpoint: it is not a blockmirror journal or "
            "both checkpoint slots are damaged; run `blockmirror journal recover`"
        )
    _, generation, cp = found
    try:
        check_fits(path, cp, capacity=ring.capacity, volume_size=volume_size)
    except JournalMismatchError as exc:
        if not exc.ring:
            raise
        raise JournalMismatchError(
            f"{exc}; restore the old journal_size, or stop the unit and run "
            "`blockmirror journal resize CONFIG VOLUME SIZE`",
            ring=True,
        ) from None
    result = scan(file, ring, cp.head_lpos, cp.head_seq, cp.next_seq)
    if result.corrupt:
        assert result.stop is not None and result.corruption_witness is not None
        raise JournalCorruptError(str(path), result.stop, result.corruption_witness)
    return cp, generation, result


def recover(
    journal: Journal,
    cp: Checkpoint,
    result: ScanResult,
    *,
    adopt: bool,
    started: float,
    replayer: Replayer | None = None,
) -> None:
    """Make ``journal`` (built from ``cp`` and ``result``) safe to append to and the volume
    current: erase what a crash left past the end of the log, check the volume is the
    journal's (or ``adopt`` it), replay; then set :attr:`Journal.recovery`."""
    path, file, ring = journal.path, journal.file, journal.ring
    if result.next_seq < cp.next_seq:
        # The checkpoint saw records that are gone: only possible if the tail past the
        # checkpoint's own records was never written. Sequence numbers are not reused.
        log.warning("journal %s: log ends before the checkpoint's next_seq", path)
    # A header carrying the expected sequence number whose record does not check out is the
    # torn last batch; anything else at the end is old data from an earlier lap.
    torn = result.stop.reason if result.stop is not None and result.stop.torn else None
    if torn is not None:
        log.warning("journal %s: cut a torn tail at seq %d: %s", path, result.next_seq, torn)
    erased = 0
    if not cp.clean:
        erased = erase_stale_headers(
            file, ring, result.tail_lpos, cp.head_lpos, journal.next_seq, scanned=result
        )
        if erased or torn is not None:
            file.flush()
        if erased:
            # Valid records past the cut were written after a torn one: their batch may have
            # been applied and sent before a power loss tore the earlier one, so a consumer
            # may hold writes the log no longer has. Only a full resync undoes that. A torn
            # last batch alone needs none: a batch is applied, and so sent, only after all of
            # it was written.
            journal.needs_full_resync = True
            log.warning("journal %s: %d stale record headers past the end erased", path, erased)
    if adopt:
        adopt_volume(journal)
    else:
        # Before anything is replayed: the journal's records must not go into another file.
        check_identity(journal, cp, result, lenient=journal.unclean_os_restart or erased > 0)
    replayed = replay(journal, replayer)
    journal.volume_durable_seq = journal.applied_seq
    journal.recovery = RecoveryReport(
        len(result.records),
        replayed,
        torn,
        journal.unclean_os_restart,
        time.monotonic() - started,
    )


def check_identity(journal: Journal, cp: Checkpoint, result: ScanResult, *, lenient: bool) -> None:
    """Refuse a volume that is not the one this journal was written for (identity.py)."""
    volume = journal.volume
    try:
        check = identity.verify(volume, cp, _overwrites(cp, result.records), lenient=lenient)
    except OSError as exc:
        raise JournalError(
            f"cannot read volume {volume.path} to check it is the journal's: {exc.strerror or exc}"
        ) from exc
    if check.problem is not None:
        raise VolumeIdentityError(f"journal {journal.path}: {check.problem}")
    if check.warning is not None:
        log.warning("journal %s: %s", journal.path, check.warning)
        journal.identity_warning = check.warning
        if lenient:
            journal.needs_full_resync = True


def _overwrites(cp: Checkpoint, records: list[Record]) -> list[tuple[int, Kind, int, int]]:
    """What :func:`identity.verify` needs of the ring's records: ``(seq, kind, offset,
    length)`` of those that may have changed a fingerprint block, with the extents of
    consecutive ones merged (a log of sequential writes is then a few tuples, not one per
    record, for each of the fingerprint's blocks to be compared with).

    The same answer as every record's tuple: verify skips a block that some record numbered
    above ``fp_seq`` that writes, zeroes or trims overlaps, and two adjacent extents (neither
    empty) overlap a block exactly when their union does. Nothing when there is no block.
    """
    fingerprint = cp.volume
    if fingerprint is None or not fingerprint.blocks:
        return []
    fp_seq = fingerprint.fp_seq
    found: list[tuple[int, Kind, int, int]] = []
    seq = start = end = -1
    for rec in records:
        if rec.seq <= fp_seq or rec.kind not in EXTENT_KINDS:
            continue
        if rec.length and rec.offset == end and end > start:
            seq, end = rec.seq, end + rec.length
            continue
        if seq >= 0:
            found.append((seq, Kind.WRITE, start, end - start))
        seq, start, end = rec.seq, rec.offset, rec.offset + rec.length
    if seq >= 0:
        found.append((seq, Kind.WRITE, start, end - start))
    return found


def adopt_volume(journal: Journal) -> None:
    """Take the volume as it is: drop every record (none is replayed into it), send every
    consumer a full resync and forget which source a replica came from (the source then copies
    all of it again). The identity is recorded anew by the next checkpoint."""
    log.warning(
        "journal %s: adopting volume %s as it is: %d records dropped, full resync for every "
        "consumer",
        journal.path,
        journal.volume.path,
        len(journal.records),
    )
    journal.records.clear()
    journal.applied_seq = journal.next_seq - 1
    journal.needs_full_resync = True
    journal.replica = None


def replay(journal: Journal, replayer: Replayer | None = None) -> int:
    """Bring the volume up to date with every record after ``applied_seq``; then sync it.

    Returns how many records were applied. Raises :class:`JournalError` when the volume fails:
    the records stay in the ring, and the next start replays them again. Without a
    ``replayer`` the records are applied by :class:`RingApplier`: large reads of the ring, and
    one ``pwritev`` for every run of writes to consecutive volume offsets.
    """
    count = 0
    applier = RingApplier(journal.file, journal.ring, journal.volume)
    try:
        todo = _records_after(journal.records, journal.applied_seq)
        newest = journal.next_seq - 1
        if replayer is not None and todo:
            applier.at = todo[0].seq
            newest = replayer(journal, todo)
            count = sum(1 for rec in todo if rec.seq <= newest)
        elif todo:
            applier.apply(todo)
            count = len(todo)
        if count:
            journal.volume.flush()
    except OSError as exc:
        at = applier.at if applier.at else journal.applied_seq
        raise JournalError(
            f"replaying journal {journal.path} into volume {journal.volume.path} failed at "
            f"record {at}: {exc.strerror or exc}; the journal keeps every record, fix the "
            "volume's storage (free space, a failing disk) and start again"
        ) from exc
    journal.applied_seq = newest
    return count


def _records_after(records: deque[Record], seq: int) -> list[Record]:
    """The records of ``records`` (consecutive numbers, oldest first) numbered above ``seq``."""
    if not records or records[-1].seq <= seq:
        return []
    skip = max(0, seq + 1 - records[0].seq)
    return list(itertools.islice(records, skip, None))
