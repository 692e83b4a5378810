"""``skip_unchanged``: a host write whose data the volume already holds is neither journaled
nor sent (docs/journal.md, "Unchanged rewrites").

The check compares the write with the volume's bytes *in the page cache*, read with
``RWF_NOWAIT`` so it never waits for the disk (a range not cached is simply written). It is
safe only when the volume's bytes are the newest the host could read: so it is made only while
nothing accepted earlier is still on its way to the volume (the applier's queue is empty and
no request waits for journal room), and never under ``ack = "remote"`` (an earlier identical
write may not be on the peers yet, and the skipped one would be acknowledged before it).
A skipped write is then a no-op on the volume, for every reader and every replica: their
copies hold the same bytes once the records before it arrive. A skipped write with FUA still
waits for everything accepted before it to be durable, as a FLUSH does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from blockmirror.blockdev.writepath import Buffer
from blockmirror.errors import BlockmirrorError
from blockmirror.store.base import Store

if TYPE_CHECKING:
    from blockmirror.blockdev.applier import Applier
    from blockmirror.blockdev.checkpointer import Checkpointer

__all__ = ["UnchangedFilter"]

# Larger writes are not compared: the read and the compare would hold the event loop.
MAX_COMPARE: Final = 4 * 1024 * 1024
PROBE: Final = 4096


class UnchangedFilter:
    __slots__ = (
        "_applier",
        "_checkpointer",
        "_volume",
        "enabled",
        "skipped_bytes",
        "skipped_writes",
    )

    def __init__(self, volume: Store, applier: Applier, checkpointer: Checkpointer) -> None:
        self._volume = volume
        self._applier = applier
        self._checkpointer = checkpointer
        self.enabled = False
        self.skipped_writes = 0
        self.skipped_bytes = 0

    def unchanged(self, offset: int, length: int, data: Sequence[Buffer]) -> bool:
        """Whether the write may be skipped; counted when it is. Never raises."""
        applier = self._applier
        if (
            not self.enabled
            or not 0 < length <= MAX_COMPARE
            or applier.remote_ack is not None
            or not applier.idle
            or self._checkpointer.waiting
        ):
            return False
        parts = [memoryview(b).cast("B") for b in data]
        try:
            # New data usually differs in its first page: one small read says so, and the
            # rest is neither read nor compared.
            first = parts[0][:PROBE]
            head = bytearray(first.nbytes)
            if not self._volume.read_cached(offset, [head]) or head != first:
                return False
            held = [bytearray(p.nbytes) for p in parts]
            if not self._volume.read_cached(offset, held):
                return False
        except (OSError, BlockmirrorError):
            return False  # out of range, closed: the write path says so itself
        # bytearray == memoryview is one memcmp (memoryview == memoryview walks items).
        if not all(h == p for h, p in zip(held, parts, strict=True)):
            return False
        self.skipped_writes += 1
        self.skipped_bytes += length
        return True

    def status(self) -> dict[str, object]:
        return {
            "enabled": self.enabled,
            "skipped_writes": self.skipped_writes,
            "skipped_bytes": self.skipped_bytes,
        }
