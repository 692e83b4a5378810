"""The history's files: numbered segments of records in ``STATE_DIR/VOLUME.history/``.

Records are appended to the newest segment (the *active* one) at its end; a segment is closed
once it passes ``segment_size`` and a new one begins with a SEGMENT record. Expiry deletes whole
segments, oldest first. Appends come from one writer at a time (the volume's applier, on the
event loop or in the thread it hands a slow step to); :meth:`Segments.sync` runs in a worker
thread meanwhile, so the list of files waiting for a sync is behind a lock.

Reading back (:func:`scan_segment`) keeps the valid prefix of a segment: the first record that
is short, malformed or fails its CRC ends it. For the active segment that is the torn tail of a
crash, and the file is cut there; anywhere else it is damage (docs/history.md, "Recovery").
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from blockmirror.history.undo_format import (
    HEADER_SIZE,
    Buffer,
    HistoryKind,
    HistoryRecordError,
    UndoHeader,
    decode,
    encode,
)
from blockmirror.io.fileio import pread_all, pwritev_all, sync_directory

__all__ = ["SUFFIX", "SegmentScan", "Segments", "scan_segment", "segment_name"]

SUFFIX = ".seg"
# How much of a segment one read of the scan takes.
_SCAN_CHUNK = 4 << 20


def segment_name(number: int) -> str:
    return f"{number:016d}{SUFFIX}"


@dataclass(slots=True)
class SegmentScan:
    """What reading one segment found: its records (offset, header) and where they end."""

    records: list[tuple[int, UndoHeader]]
    end: int
    size: int
    damage: str | None


def scan_segment(path: Path) -> SegmentScan:
    """The valid records of one segment file. Raises OSError when it cannot be read."""
    records: list[tuple[int, UndoHeader]] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        chunk = b""
        chunk_at = 0
        damage: str | None = None
        while pos < size:
            if pos + HEADER_SIZE > size:
                damage = f"{size - pos} bytes at {pos} are not a whole record header"
                break
            if pos + HEADER_SIZE > chunk_at + len(chunk):
                chunk = pread_all(fd, min(_SCAN_CHUNK, size - pos), pos)
                chunk_at = pos
            view = memoryview(chunk)[pos - chunk_at :]
            try:
                h = decode(view[:HEADER_SIZE])
                if h.payload_len:
                    if pos + h.size > size:
                        raise HistoryRecordError(f"record at {pos} runs past the end")
                    if pos + HEADER_SIZE + h.payload_len <= chunk_at + len(chunk):
                        payload: Buffer = view[HEADER_SIZE : HEADER_SIZE + h.payload_len]
                    else:
                        payload = pread_all(fd, h.payload_len, pos + HEADER_SIZE)
                    decode(view[:HEADER_SIZE], payload)
            except HistoryRecordError as exc:
                damage = f"at byte {pos}: {exc}"
                break
            if not records and h.kind != HistoryKind.SEGMENT:
                damage = "does not begin with a segment record"
                break
            records.append((pos, h))
            pos += h.size
        return SegmentScan(records, pos, size, damage)
    finally:
        os.close(fd)


class Segments:
    """The segment files of one history directory (created if missing)."""

    def __init__(self, directory: Path, *, segment_size: int) -> None:
        self.directory = directory
        self.segment_size = segment_size
        directory.mkdir(mode=0o700, exist_ok=True)
        self.sizes: dict[int, int] = {}  # segment number → bytes
        for entry in directory.iterdir():
            if entry.name.endswith(SUFFIX) and entry.name[: -len(SUFFIX)].isdigit():
                self.sizes[int(entry.name[: -len(SUFFIX)])] = entry.stat().st_size
        self.active = -1
        self._fd = -1
        self._unsynced: list[int] = []  # fds of closed segments not yet synced
        self._dir_dirty = False
        self._lock = threading.Lock()
        self._readers: dict[int, int] = {}
        self._reader_lock = threading.Lock()
        self.appended = 0  # bytes appended since open (the benchmark's "history bytes")

    # --- the files ------------------------------------------------------------------------------

    def path(self, number: int) -> Path:
        return self.directory / segment_name(number)

    def numbers(self) -> list[int]:
        return sorted(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def truncate(self, number: int, size: int) -> None:
        """Cut segment ``number`` to ``size`` bytes (a torn tail). Raises OSError."""
        os.truncate(self.path(number), size)
        self.sizes[number] = size

    def resume(self, number: int) -> None:
        """Append to the existing segment ``number`` from its end. Raises OSError."""
        self._fd = os.open(self.path(number), os.O_WRONLY | os.O_CLOEXEC)
        self.active = number

    def start(self, seq: int, time_ns: int) -> int:
        """Begin a new segment whose first record says the point before it is after ``seq``
        (stamped ``time_ns``); returns its number. Raises OSError."""
        number = max(self.sizes, default=-1) + 1
        fd = os.open(self.path(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with self._lock:
            if self._fd >= 0:
                self._unsynced.append(self._fd)
            self._fd = fd
            self._dir_dirty = True
        self.active = number
        self.sizes[number] = 0
        self.append(UndoHeader(HistoryKind.SEGMENT, seq, time_ns))
        return number

    def append(self, h: UndoHeader, payload: Sequence[Buffer] = ()) -> tuple[int, int]:
        """Write one record at the end of the active segment; returns (segment, offset).
        Raises OSError (the file's errno) and ValueError for a record that cannot be encoded."""
        iov = encode(h, payload)
        number = self.active
        at = self.sizes[number]
        pwritev_all(self._fd, iov, at)
        self.sizes[number] = at + h.size
        self.appended += h.size
        return number, at

    @property
    def full(self) -> bool:
        return self.active < 0 or self.sizes[self.active] >= self.segment_size

    def sync(self) -> None:
        """Make every record appended so far durable (blocking). Raises OSError."""
        with self._lock:
            closed, self._unsynced = self._unsynced, []
            fd = self._fd
            dir_dirty, self._dir_dirty = self._dir_dirty, False
        try:
            for old in closed:
                os.fdatasync(old)
            if fd >= 0:
                os.fdatasync(fd)
            if dir_dirty:
                sync_directory(self.directory)
        except OSError:
            with self._lock:
                self._unsynced[:0] = closed
                self._dir_dirty = self._dir_dirty or dir_dirty
            raise
        for old in closed:
            os.close(old)

    def cut(self, number: int, size: int) -> None:
        """Drop everything from byte ``size`` of segment ``number`` on, and every later
        segment; appends continue at the cut. Raises OSError."""
        for later in [n for n in self.sizes if n > number]:
            if later == self.active:
                with self._lock:
                    if self._fd >= 0:
                        self._unsynced.append(self._fd)
                    self._fd = -1
                self.active = -1
            self.delete(later)
        if number != self.active:
            with self._lock:
                if self._fd >= 0:
                    self._unsynced.append(self._fd)
                self._fd = -1
            self.resume(number)
        self.truncate(number, size)
        with self._lock:
            self._dir_dirty = True

    def retire_active(self) -> None:
        """Remove the active segment too (nothing in it is needed any more); the next record
        starts a new one. Its descriptor is closed by the next sync. Raises OSError."""
        number = self.active
        if number < 0:
            return
        with self._lock:
            if self._fd >= 0:
                self._unsynced.append(self._fd)
            self._fd = -1
        self.active = -1
        self.delete(number)

    def delete(self, number: int) -> None:
        """Remove a closed segment (expired). Raises OSError."""
        with self._reader_lock:
            fd = self._readers.pop(number, None)
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            self.path(number).unlink()
        self.sizes.pop(number, None)
        with self._lock:
            self._dir_dirty = True

    def delete_all(self) -> None:
        """Remove every segment (the history is given up). Raises OSError."""
        self.close()
        for number in list(self.sizes):
            self.delete(number)
        self.active = -1

    # --- reading --------------------------------------------------------------------------------

    def read(self, number: int, offset: int, length: int) -> bytes:
        """``length`` bytes of segment ``number`` from ``offset`` (thread-safe). Raises OSError."""
        with self._reader_lock:
            fd = self._readers.get(number)
            if fd is None:
                fd = os.open(self.path(number), os.O_RDONLY | os.O_CLOEXEC)
                self._readers[number] = fd
        return pread_all(fd, length, offset)

    def close(self) -> None:
        """Close every descriptor (without syncing). Never raises."""
        with self._lock:
            fds = [*self._unsynced, self._fd]
            self._unsynced, self._fd = [], -1
        with self._reader_lock:
            fds.extend(self._readers.values())
            self._readers.clear()
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
