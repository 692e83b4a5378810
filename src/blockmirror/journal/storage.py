"""The journal's own file as a :class:`~blockmirror.store.base.Store`.

Everything the journal reads or writes in its file (ring appends and syncs, reads for the link
and the replay, the start-up scan, checkpoint slots, the erasure of stale headers, the offline
commands) goes through the Store interface, so a test can open the file as any store (the
fault-injecting one, to cut power under the journal as under the volume and the replica):
``Journal.open(..., open_ring=...)`` takes a :data:`RingFileOpener`.

The default opener, :func:`open_journal_file`, gives a :class:`JournalFile`: the volume store
of :mod:`blockmirror.store.volume` over the journal file, created preallocated (so a full disk
cannot make an append fail half-way), plus a durable write of one range without a sync of the
whole file, which checkpoints use, and a vectored write in one pass for the append path.

The helpers also take a plain descriptor (``int``) for tools and tests that hold one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from blockmirror.errors import JournalError
from blockmirror.io.fileio import IOV_MAX, pwritev_all
from blockmirror.journal.ring import DATA_START
from blockmirror.store.base import Buffer, Store
from blockmirror.store.volume import Volume

__all__ = [
    "DurableRangeWriter",
    "JournalFile",
    "RingFileOpener",
    "as_store",
    "open_journal_file",
    "write_durable",
]

# (path, size in bytes) -> the journal file as a store of that size, created when missing.
RingFileOpener = Callable[[Path, int], Store]

_RWF_DSYNC = getattr(os, "RWF_DSYNC", 0)


class JournalFile(Volume):
    """A journal file: a volume store that can also make one range durable by itself."""

    @classmethod
    def create(cls, path: Path, size: int) -> JournalFile:
        """Create ``path`` with ``size`` bytes preallocated (an empty file is taken over).

        Raises :class:`JournalError` when the space cannot be allocated; no file is left then,
        so the next start creates the journal afresh.
        """
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            raise JournalError(
                f"cannot preallocate journal {path} ({size} bytes): "
                f"{exc.strerror or exc}; free space in {path.parent} or lower journal_size"
            ) from exc
        finally:
            os.close(fd)
        journal_file = cls.open(path, size=size, create=False)
        assert isinstance(journal_file, JournalFile)
        return journal_file

    @classmethod
    def open_existing(cls, path: Path, *, read_only: bool = False) -> JournalFile:
        """The journal file at ``path`` as it is, for the offline commands, whatever its size.

        It spans the file, and at least the checkpoint slots: a shorter file reads as zeros
        past its end. Raises :class:`OSError` (``FileNotFoundError``...) when it cannot be
        opened.
        """
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            return cls._over(path, fd, read_only=read_only)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def borrow(cls, fd: int) -> JournalFile:
        """A store over a descriptor the caller keeps (and closes): never close this one.

        Sized as :meth:`open_existing` sizes it.
        """
        return cls._over(Path(f"/proc/self/fd/{fd}"), fd, read_only=False)

    @classmethod
    def _over(cls, path: Path, fd: int, *, read_only: bool) -> JournalFile:
        size = max(os.fstat(fd).st_size, DATA_START)
        return cls(path, fd, kind="file", size=size, offset=0, read_only=read_only)

    def fileno(self) -> int:
        """The descriptor (-1 once closed), for tools that read the file directly."""
        return self._fd

    def pwritev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        """As the volume's pwritev, in one pass over the buffers: the ring's append path writes
        a batch of headers and host payloads this way, once per group commit."""
        total = 0
        for buf in buffers:
            total += buf.nbytes if isinstance(buf, memoryview) else len(buf)
        fd, pos = self._locate_for_write(offset, total)
        written = 0
        if total and len(buffers) <= IOV_MAX:
            written = os.pwritev(fd, buffers, pos)
        if written < total:
            # A short write (a signal, a disk filling up) or more buffers than one call takes.
            pwritev_all(fd, _after(buffers, written), pos + written)

    def pwrite_durable(self, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset`` and return once that range is durable.

        With RWF_DSYNC only the written range is synced: an fdatasync of the whole file would
        also force every dirty page of the ring to disk, a stall proportional to the journal's
        size. Where the kernel or filesystem refuses the flag, the write and a full sync do it.
        """
        view = memoryview(data).cast("B")
        fd, pos = self._locate_for_write(offset, view.nbytes)
        if _RWF_DSYNC:
            try:
                if os.pwritev(fd, [view], pos, _RWF_DSYNC) == view.nbytes:
                    return
            except OSError:
                pass  # refused (or failed): the plain write and full sync below decide
        self.pwrite(offset, view)
        self.flush()


def _after(buffers: Sequence[Buffer], skip: int) -> list[memoryview]:
    """The bytes of ``buffers`` past the first ``skip``, as non-empty views."""
    views = []
    for buf in buffers:
        view = memoryview(buf).cast("B")
        if skip >= view.nbytes:
            skip -= view.nbytes
            continue
        views.append(view[skip:])
        skip = 0
    return views


def open_journal_file(path: Path, size: int) -> Store:
    """The default :data:`RingFileOpener`: the journal file at ``path``, created when missing or
    empty. The caller checked that an existing file is not shorter than ``size``."""
    try:
        exists = path.stat().st_size > 0
    except FileNotFoundError:
        exists = False
    if not exists:
        return JournalFile.create(path, size)
    return JournalFile.open(path, size=size, create=False)


def as_store(file: Store | int) -> Store:
    """``file`` itself, or a store over a descriptor the caller keeps (see :meth:`borrow`)."""
    return JournalFile.borrow(file) if isinstance(file, int) else file


@runtime_checkable
class DurableRangeWriter(Protocol):
    """A store that can make one written range durable without flushing the rest
    (:class:`JournalFile`; the fault-injecting store models the same)."""

    def pwrite_durable(self, offset: int, data: Buffer) -> None: ...


def write_durable(file: Store, offset: int, data: Buffer) -> None:
    """Write ``data`` at ``offset`` durably: with ``pwrite_durable`` where the store has it
    (:class:`DurableRangeWriter`), else with a write and a flush of the whole store."""
    if isinstance(file, DurableRangeWriter):
        file.pwrite_durable(offset, data)
        return
    file.pwrite(offset, data)
    file.flush()
