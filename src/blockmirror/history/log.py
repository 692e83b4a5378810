"""One volume's history: before-images captured as changes reach it, and the points they give.

:class:`HistoryLog` is what the rest of the unit talks to. The volume's applier calls
:meth:`capture` just before a change is written to the volume (the before-image is read from
the volume itself, so it holds every change applied earlier), and :meth:`applied` for a record
with nothing to undo. Bookmarks, resync boundaries and renumbering are records too, so a restart
finds them again (:meth:`open` rebuilds the index from the segments).

Durability (docs/history.md, "Crash safety"): an undo record must be durable before the change
it undoes can be. With ``barrier`` set (a secondary, whose host acknowledgements do not wait for
the apply) the applier syncs the history before it writes what it captured. Without it (a
primary, where every host write would otherwise wait for one more sync) the history is synced
before each volume sync, so every record the checkpoint calls durable has its undo record; a
process crash keeps both in the page cache, and after a power loss the history is given up
(:meth:`drop_all`), since pages of the volume may have reached the disk before their undo.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blockmirror.alerts import AlertLog
from blockmirror.history.index import HistoryIndex, Point, PointError
from blockmirror.history.segments import Segments, scan_segment
from blockmirror.history.undo_format import (
    HEADER_SIZE,
    MAX_NAME,
    NOT_WHOLE,
    UNJOURNALED,
    HistoryKind,
    UndoHeader,
)
from blockmirror.store.base import Store

__all__ = ["CAPTURE_CHUNK", "HistoryLog", "HistorySettings", "PointError", "iso_time"]

log = logging.getLogger(__name__)

# The largest before-image one record holds when a zeroing or trim covers data.
CAPTURE_CHUNK = 4 << 20
DEFAULT_SEGMENT = 64 << 20


def iso_time(ns: int) -> str | None:
    """``ns`` since the epoch as ISO 8601 UTC with microseconds (None for 0: unknown)."""
    if not ns:
        return None
    secs, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{rest // 1000:06d}Z"


@dataclass(frozen=True, slots=True)
class HistorySettings:
    """``history`` (seconds kept; 0: none) and ``history_size`` (bytes; the cap)."""

    retention: float
    size_cap: int

    @property
    def segment_size(self) -> int:
        # Expiry by size drops whole segments: small enough that the cap is met closely.
        return max(1 << 20, min(DEFAULT_SEGMENT, self.size_cap // 16))


class HistoryLog:
    """The history of one volume (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        settings: HistorySettings,
        alerts: AlertLog,
        *,
        barrier: Callable[[], bool],
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.directory = directory
        self.settings = settings
        self.alerts = alerts
        self._barrier = barrier
        self.clock = clock
        self.index = HistoryIndex()
        self.segments = Segments(directory, segment_size=settings.segment_size)
        self._pins: dict[int, int] = {}
        self._next_pin = 0
        self.shortened = False
        self.damage: str | None = None
        self.broken: str | None = None  # why capturing stopped, until a restart
        self.captured_seq = 0  # the newest journal record with an undo record here
        # Told of every entry as it is indexed, before its change reaches the volume (drills):
        # (position, segment, offset, volume offset, length).
        self.listeners: list[Callable[[int, int, int, int, int], None]] = []

    # --- opening --------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: Path,
        settings: HistorySettings,
        alerts: AlertLog,
        *,
        barrier: Callable[[], bool],
        clock: Callable[[], int] = time.time_ns,
    ) -> HistoryLog:
        """Open (or create) the history in ``directory`` and rebuild its index.

        A torn tail of the newest segment is cut; damage anywhere else gives up every point
        before it (they would need the damaged before-images), with an alert. Raises OSError
        when the directory or a segment cannot be read.
        """
        self = cls(directory, settings, alerts, barrier=barrier, clock=clock)
        numbers = self.segments.numbers()
        index = self.index
        for i, number in enumerate(numbers):
            found = scan_segment(self.segments.path(number))
            last = i == len(numbers) - 1
            if found.damage is not None and not last:
                self.damage = f"segment {number} damaged {found.damage}"
                log.error("%s: history %s; older points given up", directory, self.damage)
                alerts.alert(
                    "history_damaged",
                    f"history {self.damage}: points before it are no longer restorable",
                )
                for older in numbers[: i + 1]:
                    self.segments.delete(older)
                index = self.index = HistoryIndex()
                continue
            self._load(number, found.records, first=index.end == 0 and not index.keys)
            if found.damage is not None:
                log.warning("%s: torn tail of segment %d cut (%s)", directory, number, found.damage)
                if found.records:
                    self.segments.truncate(number, found.end)
                else:
                    self.segments.delete(number)
        if self.segments.numbers():
            self.segments.resume(self.segments.numbers()[-1])
        return self

    def _load(self, number: int, records: list[tuple[int, UndoHeader]], *, first: bool) -> None:
        index = self.index
        for off, h in records:
            kind = h.kind
            if kind in (HistoryKind.UNDO_DATA, HistoryKind.UNDO_ZERO):
                journaled = not h.flags & UNJOURNALED
                mark = 1 if kind == HistoryKind.UNDO_ZERO else 0
                index.add(h.seq, h.timestamp_ns, journaled, number, off | mark, h.offset, h.length)
                if journaled:
                    self.captured_seq = h.seq
            elif kind == HistoryKind.SEGMENT:
                if first and not index.keys:
                    index.floor_seq, index.floor_time = h.seq, h.timestamp_ns
                    index.last_seq, index.last_time = h.seq, h.timestamp_ns
                    first = False
            elif kind == HistoryKind.BOOKMARK:
                name = self.segments.read(number, off + HEADER_SIZE, h.payload_len)
                index.bookmark(name.decode("utf-8", "replace"), h.seq, h.timestamp_ns)
            elif kind == HistoryKind.RESYNC_BEGIN:
                index.begin_resync(whole=not h.flags & NOT_WHOLE, seq=h.seq, time_ns=h.timestamp_ns)
            elif kind == HistoryKind.RESYNC_END:
                index.end_resync(h.seq)
            elif kind == HistoryKind.REBASE:
                index.rebase(h.seq + 1)

    def start(self, applied_seq: int, applied_time: int) -> None:
        """The journal is open: the volume holds every record up to ``applied_seq``."""
        index = self.index
        if applied_seq != index.last_seq or not index.last_time:
            # The state history starts from has no change of its own to date it: it is the
            # volume as of now.
            index.applied(applied_seq, applied_time or self.clock())
        self.expire()

    # --- what is kept ---------------------------------------------------------------------------

    @property
    def barrier(self) -> bool:
        """Whether a before-image is synced before its change is applied (a secondary)."""
        return self._barrier()

    def set_barrier(self, barrier: Callable[[], bool]) -> None:
        self._barrier = barrier

    @property
    def enabled(self) -> bool:
        return self.settings.retention > 0

    @property
    def capturing(self) -> bool:
        """Whether changes are captured now: history is kept, or a resync needs its start."""
        index = self.index
        if self.broken is not None or index.unwhole_resync:
            # Nothing before a first copy's end will be offered: nothing to keep.
            return False
        return self.enabled or index.keeps_resync_start

    def _append(self, h: UndoHeader, payload: tuple[bytes, ...] = ()) -> tuple[int, int]:
        if self.segments.full:
            point = self.index.newest()
            self.segments.start(point.seq, point.time_ns)
        return self.segments.append(h, payload)

    def capture(
        self,
        store: Store,
        kind_is_write: bool,
        offset: int,
        length: int,
        *,
        seq: int,
        time_ns: int,
        origin: int,
        journaled: bool,
    ) -> None:
        """Keep what ``length`` bytes at ``offset`` hold now, before a change overwrites them.

        ``kind_is_write``: a write (its before-image is read whole); otherwise a zeroing or a
        trim, whose range may be large: its holes and zero extents cost a header each, and data
        is kept in pieces of :data:`CAPTURE_CHUNK`. Blocking (a write's read is of the page
        cache; the applier runs the others in a thread). Raises OSError.
        """
        if not length:
            return
        flags = 0 if journaled else UNJOURNALED
        if not journaled:
            # A change that is not a record happens after the newest record applied: its
            # time (never this unit's clock, which is not the origin's).
            time_ns = self.index.last_time
        pieces: list[tuple[int, int, bool]] = []
        if kind_is_write:
            pieces.append((offset, length, True))
        else:
            at = offset
            for extent in store.extents(offset, length):
                pieces.append((at, extent.length, not (extent.hole or extent.zero)))
                at += extent.length
        index = self.index
        for start, span, data in pieces:
            at, size = start, span
            while size:
                n = min(size, CAPTURE_CHUNK) if data else size
                if data:
                    before = store.pread(at, n)
                    h = UndoHeader(
                        HistoryKind.UNDO_DATA, seq, time_ns, at, n, origin, flags, len(before)
                    )
                    seg, off = self._append(h, (before,))
                else:
                    h = UndoHeader(HistoryKind.UNDO_ZERO, seq, time_ns, at, n, origin, flags)
                    seg, off = self._append(h)
                    off |= 1
                pos = index.add(seq, time_ns, journaled, seg, off, at, n)
                for listener in self.listeners:
                    listener(pos, seg, off, at, n)
                at += n
                size -= n
        if journaled:
            self.captured_seq = seq

    def applied(self, seq: int, time_ns: int) -> None:
        """Record ``seq`` reached the volume and changed nothing (a flush)."""
        self.index.applied(seq, time_ns)

    def bookmark(self, name: str, seq: int, time_ns: int, origin: int) -> None:
        """The state after record ``seq`` is called ``name``. Raises OSError."""
        raw = name.encode()[:MAX_NAME]
        if self.enabled:
            h = UndoHeader(HistoryKind.BOOKMARK, seq, time_ns, 0, 0, origin, 0, len(raw))
            self._append(h, (raw,))
        self.index.bookmark(name, seq, time_ns)

    def begin_resync(self, *, whole: bool) -> None:
        """A resync starts overwriting regions: keep the point before it until it ends
        (``whole``: the volume is consistent now; otherwise no point before the resync's end
        is offered). Raises OSError."""
        if self.index.resyncing:
            return
        point = self.index.newest()
        flags = 0 if whole else NOT_WHOLE
        self._append(UndoHeader(HistoryKind.RESYNC_BEGIN, point.seq, point.time_ns, flags=flags))
        self.index.begin_resync(whole=whole)

    def end_resync(self, seq: int | None = None) -> None:
        """The resync is done: the volume is whole again, holding every record up to ``seq``."""
        if not self.index.resyncing:
            return
        self.index.end_resync(seq)
        point = self.index.newest()
        self._append(UndoHeader(HistoryKind.RESYNC_END, point.seq, point.time_ns))

    def rebase(self, next_seq: int) -> None:
        """The volume's records are numbered from ``next_seq`` on from now."""
        if next_seq - 1 >= self.index.last_seq:
            return  # skipping ahead: the keys stay in order
        point = self.index.newest()
        self._append(UndoHeader(HistoryKind.REBASE, next_seq - 1, point.time_ns))
        self.index.rebase(next_seq)

    def truncate(self, point: Point) -> None:
        """Blocking: the volume was brought back to ``point`` (a rolled-back resync): every
        entry after it is dropped, from the index and from the segments, durably. Raises
        OSError."""
        index = self.index
        if point.pos < index.end:
            seg = index.segs[point.pos - index.base]
            off = index.offs[point.pos - index.base] & ~1
            self.segments.cut(seg, off)
        index.truncate(point.pos)
        self.captured_seq = point.seq
        self._append(UndoHeader(HistoryKind.RESYNC_END, point.seq, point.time_ns))
        self.sync()

    def sync(self) -> None:
        """Blocking: make every record appended so far durable. Raises OSError."""
        self.segments.sync()

    def close(self) -> None:
        self.segments.close()

    # --- points ---------------------------------------------------------------------------------

    def find(
        self, *, seq: int | None = None, at_ns: int | None = None, bookmark: str | None = None
    ) -> Point:
        """The point asked for, by exactly one of the three. Raises :class:`PointError`."""
        if sum(x is not None for x in (seq, at_ns, bookmark)) != 1:
            raise PointError("give exactly one of a time, a sequence number or a bookmark")
        if not self.enabled and not self.index.keeps_resync_start:
            raise PointError('this volume keeps no history (history = "0")')
        if seq is not None:
            return self.index.by_seq(seq)
        if at_ns is not None:
            return self.index.by_time(at_ns)
        assert bookmark is not None
        return self.index.by_bookmark(bookmark)

    def pin(self, pos: int) -> int:
        """Keep every entry from ``pos`` on until :meth:`unpin`; returns the pin's id."""
        self._next_pin += 1
        self._pins[self._next_pin] = pos
        return self._next_pin

    def unpin(self, pin: int) -> None:
        self._pins.pop(pin, None)

    # --- expiry ---------------------------------------------------------------------------------

    def expire(self) -> None:
        """Drop what ``history`` and ``history_size`` no longer keep. Raises OSError (unlink)."""
        index = self.index
        settings = self.settings
        if self.enabled:
            age_floor = index.floor_for_age(self.clock() - int(settings.retention * 1e9))
        else:
            age_floor = index.end
        floor = age_floor
        numbers = self.segments.numbers()
        total = self.segments.total
        size_floor = index.floor
        for number in numbers[:-1]:
            if total <= settings.size_cap:
                break
            total -= self.segments.sizes[number]
            size_floor = max(size_floor, index.first_in_segment(number + 1))
        if size_floor > age_floor:
            floor = size_floor
            if not self.shortened and size_floor > index.floor:
                self.shortened = True
                self.alerts.alert(
                    "history_shortened",
                    f"history_size ({settings.size_cap} bytes) reached: points before "
                    f"{iso_time(index.time_at(size_floor))} dropped, sooner than history "
                    f"({settings.retention:g} s) would",
                )
        else:
            self.shortened = False
        # Points inside a first copy were never whole: their entries are not kept.
        floor = max(floor, index.unwhole_end())
        if index.keeps_resync_start:
            floor = min(floor, index.resyncs[-1][0])
        keep = min([floor, *self._pins.values()])
        index.raise_floor(floor, keep)
        for number in numbers[:-1]:
            if index.first_in_segment(number + 1) <= keep and number != self.segments.active:
                self.segments.delete(number)
            else:
                break
        if keep >= index.end and numbers and not self._pins and not index.bookmarks:
            # Nothing is kept (history = "0" after a resync): free the active segment too.
            self.segments.retire_active()

    def give_up(self, exc: OSError) -> None:
        """Capturing failed (the state directory is full or failing): no point before now can
        be trusted, so none is offered, and nothing more is captured. Never raises."""
        if self.broken is not None:
            return
        self.broken = f"{exc.strerror or exc}"
        log.error("%s: history given up: %s", self.directory, self.broken)
        try:
            self.drop_all(f"capturing before-images failed: {self.broken}")
        except OSError as again:
            log.error("%s: old segments not removed: %s", self.directory, again)
            self._forget()

    def drop_all(self, reason: str) -> None:
        """Give up every point but the current volume (after a power loss). Raises OSError."""
        self.alerts.alert("history_shortened", f"history given up: {reason}")
        self._forget()
        self.segments.delete_all()

    def _forget(self) -> None:
        index = self.index
        self.index = HistoryIndex(
            base=index.end,
            floor=index.end,
            floor_seq=index.last_seq,
            floor_time=index.last_time,
            last_seq=index.last_seq,
            last_time=index.last_time,
        )

    # --- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        index = self.index
        oldest, newest = index.oldest(), index.newest()
        return {
            "enabled": self.enabled,
            "failed": self.broken,
            "retention_seconds": self.settings.retention,
            "size_cap": self.settings.size_cap,
            "oldest_seq": oldest.seq if oldest is not None else None,
            "oldest_time": iso_time(oldest.time_ns) if oldest is not None else None,
            "newest_seq": newest.seq,
            "newest_time": iso_time(newest.time_ns),
            "bytes": self.segments.total,
            "shortened": self.shortened,
            "bookmarks": len(index.bookmarks),
        }
