"""What a volume holds past a branch point, and the stamps that tell two histories apart.

A real journal on a temporary file: records are staged, written and freed as the write path
does it, and the journal is reopened from its checkpoint where the test says so.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from blockmirror.journal.consumers import DIRTY_REGION
from blockmirror.journal.divergence import (
    Divergence,
    add_diverged_file,
    diverged,
    merge_extents,
    read_diverged_file,
    remove_diverged_file,
)
from blockmirror.journal.format import Kind
from blockmirror.journal.journal import Journal
from blockmirror.state import ConsumerMode
from tests.unit.journal.test_identity import open_journal

KiB = 1024


def write(journal: Journal, offset: int, length: int, stamp: int) -> None:
    journal.stage(Kind.WRITE, offset, length, [bytes(length)], timestamp_ns=stamp)
    journal.write_batch()
    journal.durable_seq = journal.sync()


def follows(journal: Journal) -> None:
    """Consumer "peer" is unit site-b, which holds everything so far (journal mode)."""
    journal.bind_peer("peer", "site-b")
    journal.peer_holds("site-b", journal.next_seq - 1)
    assert journal.consumers["peer"].mode == ConsumerMode.JOURNAL


def close(journal: Journal) -> None:
    journal.close()
    journal.volume.close()


def test_the_stamp_of_the_newest_record_outlives_its_record(tmp_path: Path) -> None:
    journal = open_journal(tmp_path)
    try:
        for i, stamp in enumerate((111, 222, 333)):
            write(journal, i * 4 * KiB, 4 * KiB, stamp)
        assert [journal.stamp_of(s) for s in (1, 2, 3, 4)] == [111, 222, 333, 0]
        journal.acknowledge("peer", 3)
        journal.write_checkpoint_now(clean=False)  # frees every record
        assert not journal.records
        # The newest is still known (what a WELCOME names); older ones are not.
        assert [journal.stamp_of(s) for s in (2, 3)] == [0, 333]
    finally:
        close(journal)
    journal = open_journal(tmp_path)  # from the checkpoint's tail_stamp
    try:
        assert journal.next_seq == 4 and journal.stamp_of(3) == 333
        journal.rebase(2)  # another numbering: record 1 of it is not the one stamped
        assert journal.stamp_of(1) == 0 and journal.stamp_of(3) == 0
    finally:
        close(journal)


def test_divergence_is_the_records_past_the_branch_and_the_peers_dirty_bits(
    tmp_path: Path,
) -> None:
    journal = open_journal(tmp_path)
    try:
        follows(journal)
        write(journal, 0, 4 * KiB, 1)  # seq 1: shared
        write(journal, 1024 * KiB, 8 * KiB, 2)  # seq 2: past the branch
        write(journal, 1028 * KiB, 8 * KiB, 3)  # seq 3: overlaps seq 2
        div = diverged(journal, "site-b", 2)
        assert div.extents == ((1024 * KiB, 12 * KiB),) and div.nbytes == 12 * KiB
        assert div.regions() == ((1024 * KiB, DIRTY_REGION),)
        assert diverged(journal, "site-b", 4).extents == ()  # nothing past the end
        # Tracking: the dirty bits are writes the peer never acknowledged, so past the branch.
        consumer = journal.consumers["peer"]
        journal.switch_to_tracking(consumer)
        consumer.dirty.mark(4096 * KiB, 4 * KiB)
        div = diverged(journal, "site-b", 2)
        assert div.extents is not None
        assert (4096 * KiB, DIRTY_REGION) in div.extents
    finally:
        close(journal)


def test_divergence_that_nothing_proves_is_the_whole_volume(tmp_path: Path) -> None:
    journal = open_journal(tmp_path)
    try:
        follows(journal)
        for i in range(3):
            write(journal, i * 4 * KiB, 4 * KiB, i + 1)
        journal.acknowledge("peer", 3)
        journal.write_checkpoint_now(clean=False)  # records 1..3 freed
        assert journal.consumers["peer"].mode == ConsumerMode.JOURNAL
        div = diverged(journal, "site-b", 2)
        assert div.extents is None and div.nbytes == journal.volume.size
        assert div.regions() == ((0, journal.volume.size),)
    finally:
        close(journal)


def test_the_diverged_file_keeps_regions_durably_and_a_bad_one_means_everything(
    tmp_path: Path,
) -> None:
    path = tmp_path / "vol.diverged"
    size = 4 * 1024 * KiB
    assert read_diverged_file(path, size) == ()
    add_diverged_file(path, size, ((0, DIRTY_REGION), (2 * DIRTY_REGION, DIRTY_REGION)))
    add_diverged_file(path, size, ((DIRTY_REGION, DIRTY_REGION),))
    assert read_diverged_file(path, size) == ((0, 3 * DIRTY_REGION),)
    path.write_bytes(b"not a dirty map")
    assert read_diverged_file(path, size) == ((0, size),)
    remove_diverged_file(path)
    remove_diverged_file(path)  # already gone: fine
    assert not path.exists()


EXTENTS = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=30)


@given(EXTENTS)
def test_merged_extents_cover_exactly_the_union_sorted_and_apart(
    extents: list[tuple[int, int]],
) -> None:
    merged = merge_extents(extents)
    covered = {b for offset, length in extents for b in range(offset, offset + length)}
    assert {b for offset, length in merged for b in range(offset, offset + length)} == covered
    assert all(length > 0 for _, length in merged)
    for (o1, l1), (o2, _) in itertools.pairwise(merged):
        assert o1 + l1 < o2  # neither overlapping nor touching


@given(EXTENTS.map(lambda e: tuple((o * 4096, n * 4096) for o, n in e)))
def test_regions_round_out_to_whole_dirty_regions_within_the_volume(
    extents: tuple[tuple[int, int], ...],
) -> None:
    size = 256 * 4096
    clipped = tuple((o, min(n, size - o)) for o, n in extents if o < size)
    div = Divergence(1, merge_extents(clipped), size)
    for offset, length in div.regions():
        assert offset % DIRTY_REGION == 0 and offset + length <= size
        assert length % DIRTY_REGION == 0 or offset + length == size
    covered = {b for o, n in div.regions() for b in range(o, o + n, 4096)}
    assert {b for o, n in clipped for b in range(o, o + n, 4096)} <= covered


def test_a_cursor_bound_to_our_source_only_later_starts_where_the_source_stands(
    tmp_path: Path,
) -> None:
    """A secondary's own sender never reached its source before the source was lost (the
    consumer had no unit yet): once bound to it, after a failover, the cursor starts at what
    the source sent us, not at a full copy. A cursor bound to another unit does not."""
    journal = open_journal(tmp_path, consumers=("site-a:7800", "site-c:7800"))
    try:
        write(journal, 0, 4 * KiB, 1)
        write(journal, 8 * KiB, 4 * KiB, 2)
        assert journal.consumers["site-a:7800"].mode == ConsumerMode.TRACKING
        journal.peer_holds("site-a", journal.durable_seq)  # what the receiver says
        write(journal, 16 * KiB, 4 * KiB, 3)  # ours, after a promotion
        assert journal.consumers["site-a:7800"].mode == ConsumerMode.TRACKING  # unbound
        done, _ = journal.bind_peer("site-a:7800", "site-a")
        assert done
        a = journal.consumers["site-a:7800"]
        assert a.mode == ConsumerMode.JOURNAL and a.acked_seq == 2
        assert a.dirty.is_clean()
        journal.bind_peer("site-c:7800", "site-c")
        c = journal.consumers["site-c:7800"]
        assert c.mode == ConsumerMode.TRACKING and not c.dirty.is_clean()
    finally:
        close(journal)
