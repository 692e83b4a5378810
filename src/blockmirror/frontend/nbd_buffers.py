"""Receive buffers for NBD connections: the kernel copies a request straight into them.

A connection that is handed a new ``bytes`` object per socket read (``data_received``) pays
for one more copy of every byte received: the event loop reads into its own buffer, then copies
that into the object. As an :class:`asyncio.BufferedProtocol` the connection instead lends the
loop a stretch of an *arena* (:meth:`ReceiveArenas.take`), and the socket read lands there. A
WRITE's payload is then a view of the arena, which goes to the journal and the volume as it is.

Such a view may live long after the read: until its record is journaled and applied, or longer
if a sender or the history holds it. An arena is lent out again only once nothing refers to it
any more, which CPython makes exact: every live view of a ``bytearray`` (slices of slices
included) shares one buffer object that holds a reference to it, so the arena's reference count
says whether any view is left. A pinned arena is simply not reused; a new one is made.
"""

from __future__ import annotations

import sys
from typing import Final

__all__ = ["ARENA_SIZE", "MIN_FREE", "ReceiveArenas"]

# Large enough that a socket read is rarely cut short by the end of an arena, small enough that
# a few idle ones cost little.
ARENA_SIZE: Final = 2 * 1024 * 1024
# A connection moves to a fresh arena when less than this is left of its current one.
MIN_FREE: Final = 64 * 1024
# Arenas kept for reuse, unit-wide; more may exist while pinned, freed with their last view.
KEEP: Final = 8


def _unpinned_count() -> int:
    """The reference count of a pooled arena that nothing else refers to, as seen from
    :meth:`ReceiveArenas._free_one` (the pool's list, the loop variable, the call's argument)."""
    probe = [bytearray(1)]
    for arena in probe:
        return sys.getrefcount(arena)
    raise AssertionError("unreachable")


def _pins_are_visible() -> bool:
    """Whether a live slice shows in the count here (it does on CPython); if not, arenas are
    never reused, which is slower but still correct."""
    probe = [bytearray(1)]
    view = memoryview(probe[0])[0:1]
    visible = False
    for arena in probe:
        visible = sys.getrefcount(arena) > _UNPINNED
    view.release()
    return visible


_UNPINNED: Final = _unpinned_count()
_REUSE: Final = _pins_are_visible()


class ReceiveArenas:
    """A pool of receive arenas shared by the connections of one unit (one event loop)."""

    __slots__ = ("_keep", "_pool", "_size", "made", "reused")

    def __init__(self, size: int = ARENA_SIZE, keep: int = KEEP) -> None:
        if size < MIN_FREE:
            raise ValueError(f"an arena of {size} bytes is smaller than {MIN_FREE}")
        self._size = size
        self._keep = keep
        self._pool: list[bytearray] = []
        self.made = 0  # arenas allocated (each zero-filled once)
        self.reused = 0  # arenas lent out again

    @property
    def size(self) -> int:
        return self._size

    def take(self) -> memoryview:
        """A writable view of a whole arena that no view refers to any more. The caller lends
        slices of it to the socket and hands slices on; it must drop this view when it moves
        on to the next arena (while it holds it, the arena counts as in use)."""
        arena = self._free_one()
        if arena is None:
            arena = bytearray(self._size)
            self.made += 1
            if len(self._pool) < self._keep:
                self._pool.append(arena)
        else:
            self.reused += 1
        return memoryview(arena)

    def _free_one(self) -> bytearray | None:
        if not _REUSE:
            return None
        for arena in self._pool:
            if sys.getrefcount(arena) <= _UNPINNED:
                return arena
        return None

    def in_use(self) -> int:
        """How many pooled arenas are still referred to (for status and tests)."""
        return sum(1 for arena in self._pool if sys.getrefcount(arena) > _UNPINNED)
