"""Stamped blocks: writes whose every 4 KiB block says who wrote it, when, and where.

Each block carries (magic, run id, sequence number, block number) repeated, then a CRC of the
rest, so a block read back is either all zeros (never written), a complete stamp naming one
submitted write, or damage (torn, foreign or misplaced data) that :func:`read_stamp` rejects.

The :class:`Ledger` logs what a writer submitted and what the server acknowledged; a test
decides which acknowledged writes were *promised* durable (acknowledged with FUA, or before an
acknowledged FLUSH) and :meth:`Ledger.check` proves an image keeps them and holds nothing else.
Used by tests/e2e/test_shutdown.py (graceful stop) and tests/fault/test_crash_journal.py (kill -9).
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass, field
from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview

BLOCK = 4096
_ZERO_BLOCK = bytes(BLOCK)
MAGIC = int.from_bytes(b"bmSTAMP1", "big")
HEADER = struct.Struct(">QQQQ")  # magic, run id, sequence number, block number
CRC = struct.Struct(">I")
# The default region: small, so blocks are rewritten many times and "a later write to the same
# block" happens.
BLOCKS = 1024


def stamp(run_id: int, seq: int, block: int) -> bytes:
    head = HEADER.pack(MAGIC, run_id, seq, block)
    body = (head * (BLOCK // HEADER.size))[: BLOCK - CRC.size]
    return body + CRC.pack(zlib.crc32(body))


def stamps(run_id: int, seq: int, first_block: int, count: int) -> bytes:
    """The data of one write of ``count`` blocks from ``first_block``, all stamped ``seq``."""
    return b"".join(stamp(run_id, seq, first_block + i) for i in range(count))


def read_stamp(data: Buffer) -> tuple[int, int, int] | None:
    """(run id, seq, block) of a stamped block; None for a never-written (all-zero) block."""
    if data == _ZERO_BLOCK:
        return None
    body, (crc,) = data[: BLOCK - CRC.size], CRC.unpack(data[BLOCK - CRC.size :])
    magic, run_id, seq, block = HEADER.unpack_from(body)
    if magic != MAGIC or zlib.crc32(body) != crc:
        raise AssertionError("block holds neither zeros nor a valid stamp (torn or garbage)")
    return run_id, seq, block


@dataclass
class Ledger:
    """What the writer submitted, what was acknowledged, and what an acknowledged FLUSH covers."""

    run_id: int
    blocks: int = BLOCKS
    seq: int = 0
    submitted: dict[int, list[int]] = field(default_factory=dict)  # block -> seqs, ascending
    acked: dict[int, int] = field(default_factory=dict)  # block -> newest acknowledged seq
    acked_seqs: set[int] = field(default_factory=set)  # every write acknowledged
    durable: dict[int, int] = field(default_factory=dict)  # acked, as of the last acked FLUSH
    inflight: set[int] = field(default_factory=set)  # blocks with a write in flight
    writes_acked: int = 0
    flushes_acked: int = 0
    inflight_at_signal: int = -1

    def next_write(self, rng: random.Random) -> tuple[int, int]:
        """A one-block write: (block, seq)."""
        block, _, seq = self.next_extent(rng, 1)
        return block, seq

    def next_extent(self, rng: random.Random, max_blocks: int) -> tuple[int, int, int]:
        """A write of 1..``max_blocks`` adjacent blocks: (first block, count, seq).

        Never two writes in flight to one block: the server may apply those in either order, so
        "the newest acknowledged write" would not be well defined.
        """
        while True:
            count = rng.randint(1, max_blocks)
            first = rng.randrange(self.blocks - count + 1)
            extent = range(first, first + count)
            if self.inflight.isdisjoint(extent):
                break
        return first, count, self.submit(first, count)

    def submit(self, first: int, count: int) -> int:
        """Log a write of ``count`` blocks from ``first`` as in flight; returns its seq."""
        extent = range(first, first + count)
        assert self.inflight.isdisjoint(extent), "two writes in flight to one block"
        self.seq += 1
        for block in extent:
            self.inflight.add(block)
            self.submitted.setdefault(block, []).append(self.seq)
        return self.seq

    def finished(self, first: int, count: int) -> None:
        """The write of ``count`` blocks from ``first`` is no longer in flight."""
        self.inflight.difference_update(range(first, first + count))

    def acknowledged(self, first: int, count: int, seq: int) -> None:
        for block in range(first, first + count):
            self.acked[block] = max(seq, self.acked.get(block, 0))
        self.acked_seqs.add(seq)
        self.writes_acked += 1

    def check(self, image: Buffer, required: dict[int, int], what: str) -> None:
        """Every block holds a write we submitted to it, at least as new as ``required``.

        ``image`` starts at block 0; only the ledger's ``blocks`` are looked at.
        """
        view = memoryview(image)
        for block in range(self.blocks):
            try:
                found = read_stamp(view[block * BLOCK : (block + 1) * BLOCK])
            except AssertionError as exc:
                raise AssertionError(f"block {block}: {exc}") from None
            need = required.get(block)
            if found is None:
                assert need is None, f"block {block}: {what} write {need} lost, reads as zeros"
                continue
            run_id, seq, stamped_block = found
            assert (run_id, stamped_block) == (self.run_id, block), f"block {block}: {found}"
            assert seq in self.submitted.get(block, []), f"block {block}: seq {seq} never submitted"
            if need is not None:
                assert seq >= need, f"block {block}: {what} write {need} lost, found older {seq}"

    def observed(self, image: Buffer) -> dict[int, int]:
        """block -> the seq each stamped block of a checked ``image`` holds."""
        view = memoryview(image)
        out: dict[int, int] = {}
        for block in range(self.blocks):
            found = read_stamp(view[block * BLOCK : (block + 1) * BLOCK])
            if found is not None:
                out[block] = found[1]
        return out
