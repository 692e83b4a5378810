"""``blockmirror journal recover CONFIG VOLUME``: the way out of a journal refused as corrupt.

The daemon does not serve a volume whose journal is damaged in the middle (a record that had
been made durable no longer checks out, see docs/journal.md, "Recovery"): replaying around the
hole silently could hand consumers a history that never happened. This command, run while no
unit holds the state directory, does what an operator would otherwise do by hand:

1. Replay into the volume every valid record newer than the checkpoint's ``applied_seq``, in
   sequence order: the records before the corruption *and* the ones after it that are still
   intact. Stopping at the hole would be worse than skipping it: the volume may already hold
   later writes (a process crash leaves them in the page cache), and replaying only the older
   records over them would roll back blocks the host had been told were written. What the
   damaged records did cannot be known; the report names them.
2. Sync the volume.
3. Mark every consumer's dirty map fully dirty (a full resync: whatever the damaged records
   did, or did not do, to a peer is covered).
4. Write a fresh checkpoint: an empty journal (head at the start of the ring), ``next_seq``
   above every sequence number found anywhere in the old file (so no number is ever given
   twice, to a peer or to a later recovery), ``needs_full_resync`` set, every consumer in
   tracking mode.
5. Zero every record header left in the ring, so no old record can ever be taken for a new one.

Each step is safe to interrupt: until the new checkpoint is durable, running the command again
starts over (replay is idempotent); after it, the old records all carry numbers below the new
``next_seq`` and recovery never accepts them, zeroed or not.

A journal with no usable checkpoint at all (both slots damaged) is recovered the same way
except that nothing is replayed: without the checkpoint's head and ``applied_seq`` there is no
telling which records are older than what the volume holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from blockmirror import statedir
from blockmirror.config import Config, VolumeConfig
from blockmirror.errors import BlockmirrorError
from blockmirror.io.closing import Closing
from blockmirror.journal.checkpoint import (
    SLOT_SIZE,
    Checkpoint,
    CheckpointError,
    ConsumerState,
    new_journal_id,
    read_checkpoint,
    slot_offset,
    write_checkpoint,
)
from blockmirror.journal.consumers import DIRTY_REGION
from blockmirror.journal.dirtymap import DirtyMap
from blockmirror.journal.format import HEADER_SIZE, RECORD_ALIGN, Kind, RecordError, RecordHeader
from blockmirror.journal.journal import boot_id
from blockmirror.journal.opening import JournalMismatchError, check_fits
from blockmirror.journal.record import Record
from blockmirror.journal.ring import DATA_START, Ring
from blockmirror.journal.ringlog import apply_record
from blockmirror.journal.scan import (
    BadRecord,
    JournalCorruptError,
    ScanResult,
    header_candidates,
    magic_positions,
    read_header,
    read_record,
    scan,
)
from blockmirror.journal.storage import JournalFile
from blockmirror.offline.lock import OfflineError, StateDirLock, journal_volume
from blockmirror.state import ConsumerMode
from blockmirror.store.volume import Volume
from blockmirror.units import human_size

__all__ = [
    "JournalRecovery",
    "LostRecords",
    "NotCorruptError",
    "RecoverError",
    "RecoveryPlan",
]


class RecoverError(OfflineError):
    """The journal cannot (or must not) be recovered as asked; nothing was changed."""


class NotCorruptError(RecoverError):
    """The journal is not corrupt: ``blockmirror run`` recovers it by itself."""


@dataclass(frozen=True, slots=True)
class LostRecords:
    """Records ``first_seq..last_seq`` are damaged or missing; they cannot be replayed."""

    first_seq: int
    last_seq: int
    lpos: int
    reason: str
    # The first damaged record's header, when it is still readable (a damaged payload).
    header: RecordHeader | None
    # Every one of them was durably in the volume before the checkpoint: nothing is lost.
    applied: bool

    def describe(self) -> str:
        seqs = (
            f"seq {self.first_seq}"
            if self.first_seq == self.last_seq
            else f"seq {self.first_seq}..{self.last_seq}"
        )
        what = ""
        h = self.header
        if h is not None and self.first_seq == self.last_seq and h.kind != Kind.PADDING:
            kind = {Kind.WRITE: "write", Kind.ZERO: "write-zeroes", Kind.TRIM: "trim"}
            if h.kind in kind:
                size = human_size(h.length)
                what = f": a {kind[h.kind]} of {size} at volume offset {h.offset}"
        fate = (
            "already in the volume before the checkpoint"
            if self.applied
            else "not replayed; the volume keeps what it holds there"
        )
        return f"{seqs}{what} ({self.reason}; ring position {self.lpos}): {fate}"


@dataclass(slots=True)
class RecoveryPlan:
    """What :meth:`JournalRecovery.run` will do; computed without changing anything."""

    volume: VolumeConfig
    journal_path: Path
    problem: str
    checkpoint: Checkpoint | None
    generation: int
    replay: list[Record]
    already_applied: int
    lost: list[LostRecords]
    highest_seq: int
    consumers: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def next_seq(self) -> int:
        return self.highest_seq + 1

    def describe(self) -> list[str]:
        lines = [f"volume {self.volume.name}: {self.problem}"]
        lines += self.notes
        if self.replay:
            lines.append(
                f"will replay {len(self.replay)} records (seq {self.replay[0].seq}.."
                f"{self.replay[-1].seq}) into {self.volume.path} and sync it"
            )
        else:
            lines.append(f"will replay nothing into {self.volume.path}")
        if self.already_applied:
            lines.append(f"{self.already_applied} intact records were already in the volume")
        lines += [f"lost: {lost.describe()}" for lost in self.lost]
        lines.append(
            f"will rewrite the journal empty, numbering from seq {self.next_seq} "
            f"(the highest found in the old file is {self.highest_seq})"
        )
        if self.consumers:
            lines.append(
                f"will mark the whole volume dirty for {', '.join(self.consumers)} (full resync)"
            )
        else:
            lines.append("the volume has no consumers (no peers): no resync is needed")
        return lines


class JournalRecovery(Closing):
    """Holds the unit's state-directory lock from analysis to the end of :meth:`run`.

    Construction takes the lock (refusing while a unit runs), reads the journal and builds the
    :attr:`plan`, changing nothing; :meth:`run` carries it out. Use as a context manager.
    """

    def __init__(self, config: Config, volume_name: str) -> None:
        self.config = config
        self.volume = _primary_volume(config, volume_name)
        self.state_dir = config.unit.state_dir
        self.journal_path = statedir.journal_path(self.state_dir, volume_name)
        self._state_lock: StateDirLock | None = None
        self._file: JournalFile | None = None
        self._done = False
        try:
            self._lock()
            try:
                self._file = JournalFile.open_existing(self.journal_path)
            except FileNotFoundError:
                raise RecoverError(
                    f"volume {volume_name} has no journal at {self.journal_path}: nothing to "
                    "recover"
                ) from None
            except OSError as exc:
                raise RecoverError(f"cannot open {self.journal_path}: {exc.strerror}") from exc
            self.ring = Ring(self.volume.journal_size - DATA_START)
            self.plan = self._analyse()
        except BaseException:
            self.close()
            raise

    # --- life cycle -----------------------------------------------------------------------

    def _lock(self) -> None:
        try:
            self._state_lock = StateDirLock(self.state_dir, "recover")
        except OfflineError as exc:
            raise RecoverError(str(exc)) from None

    @property
    def file(self) -> JournalFile:
        if self._file is None:
            raise RecoverError("this recovery is closed")
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._state_lock is not None:
            self._state_lock.close()
            self._state_lock = None

    # --- analysis (reads only) ------------------------------------------------------------

    def _analyse(self) -> RecoveryPlan:
        vc, ring, file = self.volume, self.ring, self.file
        if file.size < DATA_START + ring.capacity:
            raise RecoverError(
                f"journal {self.journal_path} is smaller than journal_size "
                f"({vc.journal_size} bytes): restore the journal_size it was created with"
            )
        consumers = [str(peer) for peer in vc.peers]
        try:
            found = read_checkpoint(file)
            unusable = None if found is not None else "no valid checkpoint in either slot"
        except CheckpointError as exc:
            found, unusable = None, f"a checkpoint slot holds something unreadable: {exc}"
        if found is None:
            assert unusable is not None
            highest = self._highest_seq()
            return RecoveryPlan(
                vc,
                self.journal_path,
                f"journal {self.journal_path} cannot be opened: {unusable}",
                None,
                0,
                [],
                0,
                [],
                highest,
                consumers,
                [
                    "without a checkpoint there is no telling which records the volume already "
                    "holds: nothing is replayed, the volume is kept as it is"
                ],
            )
        _, generation, cp = found
        try:
            check_fits(self.journal_path, cp, capacity=ring.capacity, volume_size=vc.size)
        except JournalMismatchError as exc:
            what = "the old journal_size" if exc.ring else "the volume's size"
            raise RecoverError(f"{exc}: restore {what} first") from None
        first = scan(file, ring, cp.head_lpos, cp.head_seq, cp.next_seq)
        if not first.corrupt:
            raise NotCorruptError(
                f"journal {self.journal_path} is not corrupt ({len(first.records)} live "
                "records): `blockmirror run` recovers it by itself; nothing was changed"
            )
        assert first.stop is not None and first.corruption_witness is not None
        problem = str(
            JournalCorruptError(str(self.journal_path), first.stop, first.corruption_witness)
        )
        records, lost = self._follow(first, cp)
        replay = [r for r in records if r.seq > cp.applied_seq]
        highest = max(
            self._highest_seq(),
            cp.next_seq - 1,
            cp.applied_seq,
            *(c.acked_seq for c in cp.consumers.values()),
            *(lost_range.last_seq for lost_range in lost),
            first.stop.expected_seq,
        )
        return RecoveryPlan(
            vc,
            self.journal_path,
            problem,
            cp,
            generation,
            replay,
            len(records) - len(replay),
            lost,
            highest,
            consumers,
        )

    def _follow(self, first: ScanResult, cp: Checkpoint) -> tuple[list[Record], list[LostRecords]]:
        """Every intact record of the live window, past each damaged stretch; and the holes."""
        window_end = cp.head_lpos + self.ring.capacity
        records = list(first.records)
        lost: list[LostRecords] = []
        result = first
        while result.stop is not None:
            bad = result.stop
            nxt = self._next_segment(bad, window_end)
            if nxt is None:
                break  # the end of the log (clean, or a torn last batch)
            header = read_header(self.file, self.ring, bad.lpos)
            if header is not None and header.seq != bad.expected_seq:
                header = None
            last = nxt.records[0].seq - 1
            lost.append(
                LostRecords(
                    bad.expected_seq,
                    last,
                    bad.lpos,
                    bad.reason,
                    header,
                    last <= cp.applied_seq,
                )
            )
            inside = [r for r in nxt.records if r.lpos < window_end]
            records += inside
            if len(inside) < len(nxt.records):
                break
            result = nxt
        return records, lost

    def _next_segment(self, bad: BadRecord, window_end: int) -> ScanResult | None:
        """The intact run of records that follows a damaged one, if the window holds one.

        Candidates are aligned record headers past the damaged record with a higher sequence
        number, no more of them than could fit in between (64 bytes each at least), and a
        correct CRC; the first is the start of the next run. When the damaged record's header
        is intact its payload is skipped: a payload may hold bytes that look like records.
        """
        ring, file = self.ring, self.file
        start = bad.lpos + RECORD_ALIGN
        h = read_header(file, ring, bad.lpos)
        if (
            h is not None
            and h.seq == bad.expected_seq
            and h.kind != Kind.PADDING
            and h.size <= ring.space_to_end(bad.lpos)
        ):
            start = bad.lpos + h.size
        for cand, h in header_candidates(file, ring, start, window_end):
            if not bad.expected_seq < h.seq <= bad.expected_seq + (cand - bad.lpos) // HEADER_SIZE:
                continue
            if h.durable_seq >= h.seq or not self._intact(cand, h):
                continue
            seg = scan(file, ring, cand, h.seq, 0)
            if seg.records:
                return seg
        return None

    def _intact(self, lpos: int, h: RecordHeader) -> bool:
        """Whether the record whose header is ``h`` at ``lpos`` is whole (its CRC checks out)."""
        try:
            read_record(self.file, self.ring, lpos, h.seq)
        except RecordError:
            return False
        return True

    def _highest_seq(self) -> int:
        """The highest sequence number of any intact record anywhere in the ring (0 if none)."""
        highest = 0
        for lpos, h in header_candidates(self.file, self.ring, 0, self.ring.capacity):
            if h.seq > highest and self._intact(lpos, h):
                highest = h.seq
        return highest

    # --- recovery (writes) ----------------------------------------------------------------

    def run(self) -> list[str]:
        """Carry out :attr:`plan`; returns what was done, one line each."""
        if self._done or self._file is None:
            raise RecoverError("this recovery has already run")
        plan, vc = self.plan, self.volume
        done: list[str] = []
        if plan.replay:
            self._replay(plan.replay)
            done.append(
                f"replayed {len(plan.replay)} records (seq {plan.replay[0].seq}.."
                f"{plan.replay[-1].seq}) into {vc.path} and synced it"
            )
        done += [f"lost: {lost.describe()}" for lost in plan.lost]
        for name in plan.consumers:
            path = statedir.dirty_map_path(self.state_dir, vc.name, name)
            # Created whole under a temporary name and renamed: a damaged old map is replaced.
            DirtyMap.create(
                path, volume_size=vc.size, region_size=DIRTY_REGION, all_dirty=True
            ).close()
            done.append(f"consumer {name}: every region marked dirty ({path.name}; full resync)")
        self._write_checkpoint()
        zeroed = self._zero_headers()
        done.append(
            f"journal {self.journal_path} rewritten empty: next sequence number "
            f"{plan.next_seq}, {zeroed} old record headers zeroed"
        )
        done.append(f"`blockmirror run` serves volume {vc.name} again")
        self._done = True
        return done

    def _replay(self, records: list[Record]) -> None:
        vc, ring, file = self.volume, self.ring, self.file
        try:
            volume = Volume.open(vc.path, size=vc.size, offset=vc.offset, create=False)
        except BlockmirrorError as exc:
            raise RecoverError(f"cannot open volume {vc.name}: {exc}") from exc
        try:
            for rec in records:
                apply_record(rec, file, ring, volume)
            volume.flush()
        finally:
            volume.close()

    def _write_checkpoint(self) -> None:
        plan, vc = self.plan, self.volume
        old = plan.checkpoint
        old_consumers = old.consumers if old is not None else {}
        next_seq = plan.next_seq
        consumers = {
            name: ConsumerState(
                next_seq - 1,
                ConsumerMode.TRACKING,
                old_consumers[name].paused if name in old_consumers else False,
                old_consumers[name].peer if name in old_consumers else None,
            )
            for name in plan.consumers
        }
        cp = Checkpoint(
            journal_id=old.journal_id if old is not None else new_journal_id(),
            volume_size=vc.size,
            capacity=self.ring.capacity,
            head_lpos=0,
            head_seq=next_seq,
            next_seq=next_seq,
            applied_seq=next_seq - 1,
            boot_id=boot_id(),
            clean=True,
            enqueue_paused=old.enqueue_paused if old is not None else False,
            needs_full_resync=True,
            consumers=consumers,
            # The volume stays the same volume (peers keep accepting it) and the same file;
            # the replay changed its blocks, so the old fingerprint proves nothing now.
            volume_id=old.volume_id if old is not None else None,
            volume=(
                dataclasses.replace(old.volume, blocks=())
                if old is not None and old.volume is not None
                else None
            ),
        )
        generation = plan.generation + 1
        write_checkpoint(self.file, cp, generation)  # synced
        if old is None:
            # The other slot may hold the unreadable checkpoint that stopped the journal from
            # opening; it must not win (or fail) the next choice between the two.
            self.file.pwrite(slot_offset((generation + 1) % 2), bytes(SLOT_SIZE))
            self.file.flush()

    def _zero_headers(self) -> int:
        """Overwrite every aligned record magic in the ring (and its header) with zeros."""
        ring, file = self.ring, self.file
        count = 0
        # Every magic, decodable or not: none may be taken for a record header later.
        for lpos in magic_positions(file, ring, 0, ring.capacity):
            file.pwrite(ring.physical(lpos), bytes(HEADER_SIZE))
            count += 1
        file.flush()
        return count


def _primary_volume(config: Config, name: str) -> VolumeConfig:
    found = next((vc for vc in config.volumes if vc.name == name), None)
    if found is not None and found.role != "primary":
        raise RecoverError(
            f"volume {name} is a {found.role}: this command recovers the journal of a primary "
            "volume"
        )
    try:
        return journal_volume(config, name, to="recover")
    except OfflineError as exc:
        raise RecoverError(str(exc)) from None
