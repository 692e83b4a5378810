"""Ring arithmetic of the journal's data area, sans-I/O.

Positions are *logical* (``lpos``): a byte counter that only grows, so that ``tail - head`` is
the used space and "empty" (``head == tail``) cannot be confused with "full" (``tail - head ==
capacity``). The byte of ``lpos`` lives at file offset ``data_start + lpos % capacity``.

No record straddles the end of the ring, so a record is always one contiguous ``pwrite`` and
one contiguous read. When a record does not fit before the end, the bytes left there are given
up: a padding record is written over them when there is room for its header, otherwise they are
skipped without one (the reader knows to skip too: see :meth:`Ring.header_lpos`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from blockmirror.journal.format import HEADER_SIZE, RECORD_ALIGN

__all__ = ["DATA_START", "MAX_RECORD_PAYLOAD", "MIN_CAPACITY", "Placement", "Ring"]

# Two 4 KiB checkpoint slots precede the data area (docs/journal.md).
DATA_START: Final = 8192
MIN_CAPACITY: Final = 64 * 1024
# The most payload one record carries: larger writes are split into several records.
MAX_RECORD_PAYLOAD: Final = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an append of one record goes, given the tail before it.

    ``pad_len`` bytes at ``pad_lpos`` (the old tail) are given up at the end of the ring; 0 when
    the record fits before the end. The record itself starts at ``record_lpos`` and the tail
    moves to ``new_tail``.
    """

    pad_lpos: int
    pad_len: int
    record_lpos: int
    new_tail: int

    @property
    def pad_header(self) -> bool:
        """Whether the given-up bytes get a padding record (else they are skipped bare)."""
        return self.pad_len >= HEADER_SIZE

    @property
    def pad_payload_len(self) -> int:
        """``payload_len`` of the padding record, when :attr:`pad_header` is true."""
        return self.pad_len - HEADER_SIZE


class Ring:
    """The data area of one journal: ``capacity`` bytes starting at file offset ``data_start``."""

    __slots__ = ("capacity", "data_start")

    def __init__(self, capacity: int, data_start: int = DATA_START) -> None:
        if capacity < MIN_CAPACITY:
            raise ValueError(f"journal capacity {capacity} is below the minimum {MIN_CAPACITY}")
        if capacity % RECORD_ALIGN:
            raise ValueError(f"journal capacity {capacity} is not a multiple of {RECORD_ALIGN}")
        if data_start < 0 or data_start % RECORD_ALIGN:
            raise ValueError(f"data_start {data_start} must be a non-negative multiple of 8")
        self.capacity: Final = capacity
        self.data_start: Final = data_start

    def __repr__(self) -> str:
        return f"Ring(capacity={self.capacity}, data_start={self.data_start})"

    @property
    def max_record(self) -> int:
        """The largest record that fits an empty ring wherever its tail is.

        A record of size ``s`` may need up to ``s - 8`` bytes of padding before it, so an empty
        ring takes it for sure only when ``2*s - 8 <= capacity``. A caller that must never wait
        forever splits larger writes (a 32 MiB NBD write into a 64 KiB journal, say).
        """
        return ((self.capacity + RECORD_ALIGN) // 2) & ~(RECORD_ALIGN - 1)

    @property
    def max_payload(self) -> int:
        """The largest payload one record carries (bigger writes are split into records): a
        record that fits an empty ring wherever its tail is, and at most 4 MiB."""
        return min(self.max_record - HEADER_SIZE, MAX_RECORD_PAYLOAD) & ~(RECORD_ALIGN - 1)

    def max_write(self, limit: int) -> int:
        """The largest write (at most ``limit``) an empty ring takes for sure, wherever its
        tail is.

        A write is split into records of at most :attr:`max_payload`; with one padding of at
        most such a record at the wrap, ``length + headers + record`` must fit the capacity.
        A power of two, so clients that split large requests split evenly; at least 4 KiB.
        """
        payload = self.max_payload
        room = self.capacity - (HEADER_SIZE + payload)
        pieces = -(-room // payload) + 1
        room -= pieces * HEADER_SIZE
        size = 1 << max(room, 4096).bit_length() - 1
        return max(4096, min(limit, size))

    def physical(self, lpos: int) -> int:
        """File offset of the byte at logical position ``lpos``."""
        return self.data_start + lpos % self.capacity

    def space_to_end(self, lpos: int) -> int:
        """Bytes from ``lpos`` to the end of the ring, in ``1..capacity``."""
        return self.capacity - lpos % self.capacity

    def header_lpos(self, lpos: int) -> int:
        """Where the record (or padding) that follows position ``lpos`` has its header.

        Fewer than :data:`HEADER_SIZE` bytes before the end are skipped without a header, so a
        reader walking the ring (or starting at a head that was left there) moves to the start.
        """
        rest = self.space_to_end(lpos)
        return lpos + rest if rest < HEADER_SIZE else lpos

    def place(self, tail_lpos: int, size: int) -> Placement:
        """Where a record of ``size`` bytes goes when appended at ``tail_lpos``.

        Pure arithmetic: whether it fits next to the live records is :meth:`fits`. Raises
        :class:`ValueError` for a misaligned tail or size, or a size no ring of this capacity
        could hold.
        """
        if tail_lpos < 0 or tail_lpos % RECORD_ALIGN:
            raise ValueError(f"tail {tail_lpos} is not a non-negative multiple of {RECORD_ALIGN}")
        if size < HEADER_SIZE or size % RECORD_ALIGN:
            raise ValueError(f"record size {size} is not a multiple of 8 of at least 64")
        if size > self.capacity:
            raise ValueError(f"record of {size} bytes exceeds the ring capacity {self.capacity}")
        rest = self.space_to_end(tail_lpos)
        pad = 0 if size <= rest else rest
        record = tail_lpos + pad
        return Placement(tail_lpos, pad, record, record + size)

    def used(self, head_lpos: int, tail_lpos: int) -> int:
        """Bytes between head and tail: live records plus the padding among them."""
        used = tail_lpos - head_lpos
        if not 0 <= used <= self.capacity:
            raise ValueError(
                f"inconsistent ring positions: head {head_lpos}, tail {tail_lpos}, "
                f"capacity {self.capacity}"
            )
        return used

    def free(self, head_lpos: int, tail_lpos: int) -> int:
        """Bytes an append may still take (including any padding it needs)."""
        return self.capacity - self.used(head_lpos, tail_lpos)

    def fits(self, head_lpos: int, tail_lpos: int, size: int) -> bool:
        """Whether a record of ``size`` bytes, and the padding it needs, fits the free space."""
        if size > self.capacity:
            return False
        self.used(head_lpos, tail_lpos)  # validates the positions
        return self.place(tail_lpos, size).new_tail - head_lpos <= self.capacity
