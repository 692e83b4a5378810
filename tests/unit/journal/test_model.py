"""A stateful model of the journal: append, acknowledge, overflow and recover.

Hypothesis drives a real journal (tiny ring, so it wraps and overflows often) and a consumer
against a plain model, and after every step checks the invariants of docs/journal.md:

- the volume equals every write applied in order (journal first, then volume);
- nothing differs untracked: every write the consumer has not acknowledged is either a live
  journal record after its cursor or covered by its dirty map;
- the ring never holds more than its capacity;
- a crash (the process dropped without closing) and recovery change none of the above.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.journal.dirtymap import DirtyMap
from blockmirror.journal.journal import Journal
from blockmirror.state import ConsumerMode
from blockmirror.store.volume import Volume

BLOCK = 4096
VOLUME = 64 * BLOCK * 16  # 4 MiB: 64 dirty regions of 64 KiB
JOURNAL = 128 * 1024  # a ring of 120 KiB: a few dozen 4 KiB records
REGION = 64 * 1024


def dirty_region_indexes(dirty_map: DirtyMap) -> set[int]:
    """The indexes of the REGION-sized regions a dirty map has marked."""
    return {
        start // REGION
        for off, n in dirty_map.dirty_regions()
        for start in range(off - off % REGION, off + n, REGION)
    }


def region_indexes(offset: int, length: int) -> set[int]:
    return set(range(offset // REGION, (offset + length - 1) // REGION + 1))


class JournalModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="bm-model-"))
        self.loop = asyncio.new_event_loop()
        self.model = bytearray(VOLUME)
        # (seq, offset, length) of every write; the consumer lacks those after its cursor.
        self.writes: list[tuple[int, int, int]] = []
        self.wp = self._open()
        peer = self.wp.journal.consumers["peer"]
        peer.dirty.clear_all()
        peer.dirty.sync()
        peer.set_mode(ConsumerMode.JOURNAL)
        peer.acked_seq = self.wp.journal.next_seq - 1
        # The mode change is only real once a checkpoint records it.
        self.loop.run_until_complete(self.wp.checkpoint())
        self.counter = 0

    def _open(self) -> JournalWritePath:
        volume = Volume.open(self.dir / "vol.img", size=VOLUME)
        journal = Journal.open(
            self.dir / "vol.journal",
            volume=volume,
            journal_size=JOURNAL,
            consumers=["peer"],
            dirty_dir=self.dir,
            volume_name="vol",
        )
        return JournalWritePath(journal, volume, self.loop)

    def _settle(self, fut: asyncio.Future[None] | None) -> None:
        async def wait() -> None:
            gate = self.wp.commit()
            if gate is not None:
                await gate
            if fut is not None:
                await fut

        self.loop.run_until_complete(wait())

    @rule(block=st.integers(0, VOLUME // BLOCK - 4), blocks=st.integers(1, 4), fua=st.booleans())
    def write(self, block: int, blocks: int, fua: bool) -> None:
        self.counter += 1
        data = bytes([self.counter % 251 + 1]) * (blocks * BLOCK)
        offset = block * BLOCK
        seq = self.wp.journal.next_seq
        self._settle(self.wp.write(offset, [data], fua=fua))
        self.model[offset : offset + len(data)] = data
        self.writes.append((seq, offset, len(data)))

    @rule(block=st.integers(0, VOLUME // BLOCK - 8), blocks=st.integers(1, 8))
    def zero(self, block: int, blocks: int) -> None:
        offset = block * BLOCK
        seq = self.wp.journal.next_seq
        self._settle(self.wp.write_zeroes(offset, blocks * BLOCK, fua=False, may_trim=True))
        self.model[offset : offset + blocks * BLOCK] = bytes(blocks * BLOCK)
        self.writes.append((seq, offset, blocks * BLOCK))

    @rule()
    def flush(self) -> None:
        self._settle(self.wp.flush())

    @rule(records=st.integers(1, 20))
    def acknowledge(self, records: int) -> None:
        peer = self.wp.journal.consumers["peer"]
        if peer.mode != "journal":
            return
        upto = min(peer.acked_seq + records, self.wp.journal.next_seq - 1)
        self.wp.acknowledge("peer", upto)

    @rule()
    def checkpoint(self) -> None:
        self.loop.run_until_complete(self.wp.checkpoint())

    @precondition(lambda self: self.counter > 0)
    @rule()
    def crash_and_recover(self) -> None:
        wp = self.wp
        wp.commit()
        for consumer in wp.journal.consumers.values():
            consumer.dirty.close(sync=False)
        wp.journal.abandon()
        wp.volume.close()
        self.wp = self._open()

    @invariant()
    def volume_equals_the_model(self) -> None:
        assert self.wp.volume.pread(0, VOLUME) == bytes(self.model)

    @invariant()
    def ring_within_capacity(self) -> None:
        j = self.wp.journal
        assert 0 <= j.tail_lpos - j.checkpoint_head_lpos <= j.capacity

    @invariant()
    def nothing_differs_untracked(self) -> None:
        journal = self.wp.journal
        peer = journal.consumers["peer"]
        dirty = dirty_region_indexes(peer.dirty)
        live = {r.seq for r in journal.records}
        for seq, offset, length in self.writes:
            # Acknowledged writes need no tracking; in tracking mode the cursor stays where the
            # last acknowledgement left it.
            if seq <= peer.acked_seq:
                continue
            in_journal = peer.mode == "journal" and seq in live
            assert in_journal or region_indexes(offset, length) <= dirty, (seq, offset, length)

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self.wp.close())
        finally:
            self.loop.close()
            for path in self.dir.iterdir():
                path.unlink()
            self.dir.rmdir()


JournalModel.TestCase.settings = settings(max_examples=25, stateful_step_count=40, deadline=None)
TestJournalModel = JournalModel.TestCase
