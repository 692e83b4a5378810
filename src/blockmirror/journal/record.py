"""The one record type: a change to a volume, from the host's write to every replica.

A :class:`Record` is made where a host's write is accepted, is placed in the journal (which
fills in ``seq``, ``lpos`` and ``size``), is streamed by the link as journal bytes and is made
again from those bytes on the secondary, with the same ``seq``, ``timestamp_ns`` and ``origin``.
The scan of a journal at start-up and the offline repair find records in the same form.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from blockmirror.journal.format import PAYLOAD_KINDS, Buffer, Kind, RecordHeader

__all__ = ["UNKNOWN_ORIGIN", "Record", "origin_id"]

# The origin of records in journals written before origins were kept.
UNKNOWN_ORIGIN = 0


def origin_id(unit_name: str) -> int:
    """The 32-bit id a unit's name is written as in every record it originates (never 0).

    A hash, so every unit computes every other's id without a registry; two unit names that
    collide would only make history show the wrong origin, never change data.
    """
    value = int.from_bytes(hashlib.blake2b(unit_name.encode(), digest_size=4).digest(), "little")
    return value or 1


@dataclass(slots=True, kw_only=True)
class Record:
    """One change. ``data`` holds a write's payload parts (empty for the other kinds, and in
    the journal's index of live records, which keeps positions, not data).

    ``seq`` is 0 until the journal numbers it; ``lpos``/``size`` say where it lies in the
    ring (-1/0 before). ``timestamp_ns`` and ``origin`` are those of the host's write at its
    primary and never change on the way to any replica.
    """

    kind: Kind
    offset: int
    length: int
    data: Sequence[Buffer] = ()
    seq: int = 0
    timestamp_ns: int = 0
    origin: int = UNKNOWN_ORIGIN
    lpos: int = -1
    size: int = 0
    # Ring bytes of every live record up to this one, counted since the journal opened (0
    # until it is in the journal's list): backlogs are differences of two, not sums.
    cum: int = 0

    @classmethod
    def from_header(
        cls, h: RecordHeader, payload: Buffer | None = None, *, lpos: int = -1
    ) -> Record:
        """The record a decoded header (and, for a write, its payload) describes."""
        data: Sequence[Buffer] = (
            (payload,) if payload is not None and h.kind in PAYLOAD_KINDS else ()
        )
        return cls(
            kind=h.kind,
            offset=h.offset,
            length=h.length,
            data=data,
            seq=h.seq,
            timestamp_ns=h.timestamp_ns,
            origin=h.origin,
            lpos=lpos,
            size=h.size,
        )

    def placed(self) -> Record:
        """A copy without the data, for an index of where records are."""
        return Record(
            kind=self.kind,
            offset=self.offset,
            length=self.length,
            seq=self.seq,
            timestamp_ns=self.timestamp_ns,
            origin=self.origin,
            lpos=self.lpos,
            size=self.size,
        )
