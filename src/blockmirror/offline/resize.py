"""``blockmirror journal resize CONFIG VOLUME SIZE``: a new journal size, replication unbroken.

Run while the unit is stopped. The journal is opened and recovered as a start would (replaying
what the volume lacks, checking that the volume is the journal's), then rewritten at the new
size:

- the volume's identity (``volume_id``, which peers bind their replicas to), the fingerprint,
  a replica's source and state, and every consumer's cursor, mode and dirty map are kept;
- the records some consumer still needs are copied into the new ring, with their sequence
  numbers, as many as fit (the newest ones). A consumer that still needs one of the older
  records, which do not fit, is switched to tracking: the regions of every record it has not
  acknowledged become dirty bits (made durable first), and that peer resyncs those regions
  once it reconnects. Its cursor stays where the peer acknowledged: moving it past records the
  peer never received would look, at the next handshake, like a replica that lost acknowledged
  records (a restore from a backup), and that costs a full resync;
- the new journal is written under ``NAME.journal.resize``, synced, then renamed over the old
  one (and the directory synced). Interrupted before the rename, the old journal is untouched
  (a dirty bit set early only makes a region be copied once more); after it, the new one is
  complete.

Then ``journal_size`` must be set to SIZE in the configuration before the unit starts.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from blockmirror import statedir
from blockmirror.config import MIN_JOURNAL_SIZE, Config
from blockmirror.errors import BlockmirrorError, JournalError
from blockmirror.io.fileio import sync_directory
from blockmirror.journal.checkpoint import CheckpointError, new_journal_id
from blockmirror.journal.format import PAYLOAD_KINDS
from blockmirror.journal.journal import Journal
from blockmirror.journal.record import Record
from blockmirror.journal.ring import DATA_START, Ring
from blockmirror.journal.scan import JournalCorruptError
from blockmirror.journal.storage import JournalFile
from blockmirror.offline.lock import (
    OfflineError,
    StateDirLock,
    journal_capacity,
    journal_volume,
)
from blockmirror.state import ConsumerMode
from blockmirror.store.volume import Volume
from blockmirror.units import format_size

__all__ = ["ResizeReport", "resize_journal"]

# Staged records are written out whenever this much is pending.
_BATCH_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ResizeReport:
    old_size: int
    new_size: int
    copied: int
    dropped: int
    tracked: dict[str, int]  # consumer -> records of it turned into dirty bits
    lines: list[str]


def resize_journal(config: Config, volume_name: str, new_size: int) -> ResizeReport:
    """Rewrite the journal of ``volume_name`` at ``new_size`` bytes (see the module docstring).

    Raises :class:`OfflineError` (nothing changed) when the unit runs, the size is not usable,
    or the journal or the volume cannot be opened as a start would open them.
    """
    vc = journal_volume(config, volume_name)
    if new_size < MIN_JOURNAL_SIZE:
        raise OfflineError(f"{format_size(new_size)} is below the minimum journal size of 1 MiB")
    try:
        new_ring = Ring(new_size - DATA_START)
    except ValueError as exc:
        raise OfflineError(f"journal size {new_size}: {exc}") from None
    state_dir = config.unit.state_dir
    path = statedir.journal_path(state_dir, vc.name)
    with StateDirLock(state_dir, "resize"):
        if not path.exists():
            raise OfflineError(
                f"volume {vc.name} has no journal at {path} yet: set journal_size and start"
            )
        old_capacity = journal_capacity(path)
        old_size = DATA_START + old_capacity
        if old_capacity == new_ring.capacity:
            raise OfflineError(f"journal {path} is already {format_size(new_size)}")
        try:
            volume = Volume.open(vc.path, size=vc.size, offset=vc.offset, create=False)
        except BlockmirrorError as exc:
            raise OfflineError(f"cannot open volume {vc.name}: {exc}") from exc
        try:
            try:
                old = Journal.open(
                    path,
                    volume=volume,
                    journal_size=old_size,
                    consumers=[str(peer) for peer in vc.peers],
                    dirty_dir=state_dir,
                    volume_name=vc.name,
                )
            except JournalCorruptError as exc:
                raise OfflineError(f"{exc}; run `blockmirror journal recover` first") from exc
            except (JournalError, CheckpointError) as exc:
                raise OfflineError(f"{exc}; nothing was changed") from exc
            try:
                report = _rewrite(old, new_ring, old_size, new_size)
            finally:
                # The old file was replaced (or is kept as it is): no checkpoint goes to it.
                for consumer in old.consumers.values():
                    with contextlib.suppress(Exception):
                        consumer.dirty.close()
                old.abandon()
        finally:
            volume.close()
    lines = list(report.lines)
    if vc.journal_size != new_size:
        lines.append(
            f"set journal_size = {new_size} (or {format_size(new_size)!r}) for volume "
            f"{vc.name} in {config.source or 'the configuration'} before starting the unit"
        )
    lines.append(f"`blockmirror run` serves volume {vc.name} with the new journal")
    return ResizeReport(
        report.old_size, report.new_size, report.copied, report.dropped, report.tracked, lines
    )


def _to_copy(records: list[Record], ring: Ring, max_payload: int) -> int:
    """Index of the first record to copy: the newest ones that fit an empty ``ring``.

    Laid out from position 0, records fit exactly when their sizes add up to at most the
    capacity (no padding is needed before the end of the first lap).
    """
    first = len(records)
    total = 0
    for i in range(len(records) - 1, -1, -1):
        rec = records[i]
        payload = rec.length if rec.kind in PAYLOAD_KINDS else 0
        if payload > max_payload or total + rec.size > ring.capacity:
            break
        total += rec.size
        first = i
    return first


def _rewrite(old: Journal, ring: Ring, old_size: int, new_size: int) -> ResizeReport:
    records = list(old.records)
    tmp = old.path.with_name(old.path.name + ".resize")
    tmp.unlink(missing_ok=True)  # left by an interrupted resize: never reused
    file = JournalFile.create(tmp, DATA_START + ring.capacity)
    new = Journal(tmp, file, ring, old.volume, new_journal_id())
    renamed = False
    try:
        first = _to_copy(records, ring, new.max_payload())
        first_seq = records[first].seq if first < len(records) else old.next_seq
        # What does not fit becomes dirty bits, durably, before the new journal exists.
        tracked: dict[str, int] = {}
        for consumer in old.consumers.values():
            if consumer.mode == ConsumerMode.JOURNAL and consumer.acked_seq < first_seq - 1:
                tracked[consumer.name] = old.next_seq - 1 - consumer.acked_seq
                old.switch_to_tracking(consumer)
        old.sync_dirty_maps()
        new.volume_id = old.volume_id
        new.volume_identity = old.volume_identity
        new.replica = old.replica
        new.enqueue_paused = old.enqueue_paused
        new.consumers = old.consumers
        new.next_seq = first_seq
        new.written_seq = new.durable_seq = first_seq - 1
        pending = 0
        for rec in records[first:]:
            payload: list[bytes] = []
            if rec.kind in PAYLOAD_KINDS:
                payload = [old.read_payload(rec)]
            # The same record: its number, and the origin time and unit of the host's write.
            new.stage(
                rec.kind,
                rec.offset,
                rec.length,
                payload,
                seq=rec.seq,
                timestamp_ns=rec.timestamp_ns,
                origin=rec.origin,
            )
            pending += rec.size
            if pending >= _BATCH_BYTES:
                new.write_batch()
                pending = 0
        assert new.next_seq == old.next_seq
        # The volume holds what the old journal says it holds (a lagged replica's delayed
        # records are still to be applied).
        new.applied_seq = new.volume_durable_seq = old.applied_seq
        # Syncs the ring, the volume and the dirty maps, then writes a clean checkpoint.
        new.write_checkpoint_now(clean=True, applied_seq=old.applied_seq)
        file.flush()
        os.replace(tmp, old.path)
        renamed = True
        new.path = old.path
        sync_directory(old.path.parent)
    finally:
        file.close()
        if not renamed:
            tmp.unlink(missing_ok=True)
    copied = len(records) - first
    lines = [
        f"journal {old.path} resized from {format_size(old_size)} to {format_size(new_size)} "
        f"(volume id {new.volume_id} kept)",
        f"{copied} records still needed by a consumer copied (seq {first_seq}..{old.next_seq - 1})"
        if copied
        else "no record is still needed by a consumer: the new journal starts empty",
    ]
    for name, count in tracked.items():
        lines.append(
            f"consumer {name}: its {count} unacknowledged records do not all fit; turned into "
            "dirty bits (the peer resyncs those regions, then streams)"
        )
    return ResizeReport(old_size, new_size, copied, first, tracked, lines)
