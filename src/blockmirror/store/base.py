"""The backing-store interface every volume, replica and test store implements.

A store is a fixed-size array of bytes with positional I/O. The write path, the journal's
replay, the link's resync and the front ends use only what is here, so a second implementation
(the fault-injecting store of the tests, an object-store cache later) plugs in under all of
them. The conformance suite in ``tests/unit/store/test_conformance.py`` runs over every one.

What each method raises is part of the interface:

- :class:`~blockmirror.errors.OutOfRangeError`: the range leaves ``[0, size)``; nothing done.
- :class:`~blockmirror.errors.ReadOnlyError`: a change asked of a read-only store; nothing done.
- :class:`OSError`, with the kernel's errno (ENOSPC, EIO, ...): the I/O failed. After a failed
  :meth:`Store.flush` every later flush fails too (``sync_error``): the kernel may have dropped
  the pages it could not write, so no later sync proves anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

Buffer = bytes | bytearray | memoryview

# Bounds the work of one extents() call; a shorter prefix is returned past it.
MAX_EXTENTS = 1024
# The largest single write any write path takes (NBD's usual maximum payload); a journal whose
# ring is too small for it takes less.
MAX_WRITE = 32 * 1024 * 1024


class Extent(NamedTuple):
    """A run of the store with one allocation state, in front-end-neutral terms.

    ``hole``: no storage is allocated for it. ``zero``: it is known to read as zeros. A front
    end translates these into its own flags (NBD's base:allocation, SCSI's GET LBA STATUS).
    """

    length: int
    hole: bool = False
    zero: bool = False


DATA = Extent(0)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a store can do cheaply, so front ends advertise only what is true."""

    trim: bool = True  # trim() may deallocate (otherwise it is a no-op that still succeeds)
    fast_zero: bool = False  # write_zeroes() without writing data
    extents: bool = False  # extents() can tell holes from data
    read_only: bool = False


class Store(Protocol):
    """A volume's bytes. All offsets are relative to the store; lengths are bytes."""

    path: Path
    size: int
    read_only: bool
    sync_error: OSError | None

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (a hole reads as zeros)."""

    def preadinto(self, offset: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` from ``offset``."""

    def pwrite(self, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset`` (to the page cache: durable only after :meth:`flush`)."""

    def pwritev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        """Write the concatenation of ``buffers`` at ``offset``."""

    def flush(self) -> None:
        """Make every completed write durable (blocking: call it in a thread)."""

    def trim(self, offset: int, length: int) -> None:
        """The range is no longer needed; its contents become unspecified."""

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool) -> None:
        """Make the range read as zeros; ``may_trim`` allows deallocating it."""

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Extents from ``offset`` on, in order and without gaps.

        They cover ``[offset, offset + length)`` exactly, unless more than
        :data:`MAX_EXTENTS` would be needed: then a shorter prefix (at least one extent) is
        returned and the caller asks again for the rest. Empty only when ``length`` is 0.
        """

    def capabilities(self) -> Capabilities:
        """What this store does cheaply."""

    def advise_willneed(self, offset: int, length: int) -> None:
        """A hint that the range will be read soon (may do nothing)."""

    def read_cached(self, offset: int, buffers: Sequence[bytearray]) -> bool:
        """Fill ``buffers`` (back to back from ``offset``) only if every byte is in memory
        now, without ever waiting for the disk; False when it is not (or cannot be told)."""

    def close(self) -> None:
        """Release the store; no call may be in flight."""
