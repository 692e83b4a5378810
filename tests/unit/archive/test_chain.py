"""What a listing restores, checked against a brute-force oracle: random segments (with gaps and
overlaps) and bases; restorable points, plans, gaps, overlaps, points in time and retention."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.archive.base_image import Manifest, zero_ref
from blockmirror.archive.chain import Chain, NotRestorable, unreferenced_data
from blockmirror.archive.keys import (
    ArchiveKey,
    BookmarkKey,
    ClaimKey,
    DataKey,
    ManifestKey,
    SegmentKey,
)

GEN = "12" * 16
TOP = 70  # points checked: 0..TOP


# Origin timestamps by seq: non-decreasing (as the history index clamps them), with runs of
# equal ones. seq 0 is the volume before its first record, at time 0.
Times = tuple[int, ...]


def ts_of(seq: int, times: Times) -> int:
    return times[seq]


@st.composite
def listings(draw: st.DrawFn) -> tuple[list[ArchiveKey], Times]:
    steps = draw(st.lists(st.integers(0, 3), min_size=TOP + 20, max_size=TOP + 20))
    times = (0, *(1 + sum(steps[:i]) for i in range(1, len(steps))))
    keys: list[ArchiveKey] = [ClaimKey(GEN)]
    for _ in range(draw(st.integers(0, 8))):
        first = draw(st.integers(1, 60))
        last = first + draw(st.integers(0, 12))
        keys.append(SegmentKey(GEN, first, last, ts_of(last, times)))
    for _ in range(draw(st.integers(0, 4))):
        start = draw(st.integers(0, 60))
        end = start + draw(st.integers(0, 8))
        keys.append(ManifestKey(GEN, end, start, ts_of(end, times)))
    for _ in range(draw(st.integers(0, 3))):
        seq = draw(st.integers(1, 70))
        keys.append(BookmarkKey(GEN, seq, ts_of(seq, times), draw(st.sampled_from("ab"))))
    return keys, times


def segs(keys: Iterable[ArchiveKey]) -> list[SegmentKey]:
    return [k for k in keys if isinstance(k, SegmentKey)]


def bases(keys: Iterable[ArchiveKey]) -> list[ManifestKey]:
    return [k for k in keys if isinstance(k, ManifestKey)]


def covered(keys: Iterable[ArchiveKey]) -> set[int]:
    return {s for k in segs(keys) for s in range(k.first, k.last + 1)}


def oracle(keys: list[ArchiveKey], n: int) -> bool:
    have = covered(keys)
    return any(
        b.end <= n and all(s in have for s in range(b.start + 1, n + 1)) for b in bases(keys)
    )


@given(listings())
def test_restorable_matches_the_oracle(listing: tuple[list[ArchiveKey], Times]) -> None:
    keys, _ = listing
    chain = Chain(keys)
    ranges = chain.restorable
    for (_, hi), (lo, _) in itertools.pairwise(ranges):
        assert hi + 1 < lo, "ranges are merged"
    for n in range(TOP + 1):
        want = oracle(keys, n)
        assert chain.is_restorable(n) == want, n
        if not want:
            with pytest.raises(NotRestorable, match=f"seq {n}"):
                chain.plan(n)
            continue
        plan = chain.plan(n)
        assert plan.base in keys and plan.base.end <= n
        # The fewest records to replay: no restoring base starts later.
        assert plan.base.start == max(
            b.start for b in bases(keys) if b.end <= n and oracle([b, *segs(keys)], n)
        )
        assert all(s in keys for s in plan.segments)
        applied = [seq for lo, hi in plan.ranges for seq in range(lo, hi + 1)]
        assert applied == list(range(plan.base.start + 1, n + 1))
        for seg, (lo, hi) in zip(plan.segments, plan.ranges, strict=True):
            assert seg.first <= lo <= hi <= seg.last


@given(listings())
def test_gaps_and_overlaps(listing: tuple[list[ArchiveKey], Times]) -> None:
    keys, _ = listing
    chain = Chain(keys)
    have = covered(keys)
    # One object per key: a key listed twice is one segment.
    assert [s.first for s in chain.segments] == sorted(s.first for s in set(segs(keys)))
    assert [b.end for b in chain.bases] == sorted(b.end for b in set(bases(keys)))
    assert {s for lo, hi in chain.runs for s in range(lo, hi + 1)} == have
    span = range(min(have), max(have) + 1) if have else range(0)
    missing = {s for s in span if s not in have}
    assert {s for a, b in chain.gaps for s in range(a + 1, b)} == missing
    for a, b in chain.gaps:
        assert a in have and b in have and a + 1 < b
    unique = set(segs(keys))
    twice = {s for s in have if sum(k.first <= s <= k.last for k in unique) > 1}
    assert {s for lo, hi in chain.overlaps for s in range(lo, hi + 1)} == twice


@given(listings(), st.integers(0, 3 * TOP + 70))
def test_seq_at_matches_the_oracle(listing: tuple[list[ArchiveKey], Times], t: int) -> None:
    keys, times = listing
    chain = Chain(keys)
    archived = covered(keys) | {b.end for b in bases(keys)}
    archived |= {k.seq for k in keys if isinstance(k, BookmarkKey)}
    old_enough = [s for s in archived if ts_of(s, times) <= t]
    calls: list[SegmentKey] = []

    def timestamps(seg: SegmentKey) -> list[tuple[int, int]]:
        calls.append(seg)
        return [(s, ts_of(s, times)) for s in range(seg.first, seg.last + 1)]

    if not old_enough:
        with pytest.raises(NotRestorable):
            chain.seq_at(t, timestamps)
    else:
        assert chain.seq_at(t, timestamps) == max(old_enough)
    assert calls in ([], [chain.segment_at(t)])


@given(listings(), st.integers(0, TOP))
def test_retention_keeps_every_later_point(listing: tuple[list[ArchiveKey], Times], k: int) -> None:
    keys, _ = listing
    chain = Chain(keys)
    keep, delete = chain.retention(k)
    assert set(keep) | set(delete) == set(segs(keys)) | set(bases(keys))
    assert not set(keep) & set(delete)
    after: list[ArchiveKey] = list(keep)
    for n in range(k, TOP + 1):
        assert oracle(after, n) == oracle(keys, n), n
    if not oracle(keys, k):
        assert delete == ()
        return
    anchor = max(
        (b for b in bases(keys) if b.end <= k and oracle([b, *segs(keys)], k)),
        key=lambda b: b.end,
    )
    assert {d for d in delete if isinstance(d, ManifestKey)} == {
        b for b in bases(keys) if b.end < anchor.end
    }
    assert {d for d in delete if isinstance(d, SegmentKey)} == {
        s for s in segs(keys) if s.last <= anchor.start
    }


def example() -> Chain:
    return Chain(
        [
            ManifestKey(GEN, 40, 35, 400),
            SegmentKey(GEN, 36, 99, 990),
            SegmentKey(GEN, 130, 200, 2000),
        ]
    )


@pytest.mark.parametrize(
    "seq, message",
    [
        (120, "seq 120 is in a gap between 99 and 130"),
        (150, "seq 150 needs records 100..129 after the base ending at 40"),
        (10, r"seq 10 is older than the oldest base \(end 40\)"),
        (300, "seq 300 is newer than the newest archived record 200"),
    ],
)
def test_why_not(seq: int, message: str) -> None:
    with pytest.raises(NotRestorable, match=message):
        example().plan(seq)


def test_plans_and_points() -> None:
    chain = example()
    assert chain.restorable == [(40, 99)]
    assert chain.gaps == [(99, 130)]
    plan = chain.plan(40)
    assert plan.segments == (SegmentKey(GEN, 36, 99, 990),) and plan.ranges == ((36, 40),)
    with pytest.raises(NotRestorable, match="holds no base"):
        Chain([SegmentKey(GEN, 1, 5, 1)]).plan(3)
    empty = Chain([ManifestKey(GEN, 0, 0, 0)])
    assert empty.restorable == [(0, 0)] and empty.plan(0).segments == ()
    assert empty.seq_at(5, lambda _k: []) == 0
    with pytest.raises(ValueError):
        Chain([ClaimKey(GEN), ClaimKey("34" * 16)])


def test_bookmarks() -> None:
    chain = Chain(
        [
            BookmarkKey(GEN, 5, 50, "nightly"),
            BookmarkKey(GEN, 9, 90, "nightly"),
            BookmarkKey(GEN, 7, 70, "other"),
        ]
    )
    assert [m.seq for m in chain.bookmarks] == [5, 7, 9]
    assert chain.bookmark("nightly").seq == 9
    with pytest.raises(NotRestorable, match="no bookmark 'weekly'"):
        chain.bookmark("weekly")


def test_unreferenced_data() -> None:
    used = DataKey(GEN, 40, 0)
    older_gen = DataKey("56" * 16, 10, 3)
    unused = [DataKey(GEN, 40, 1), DataKey(GEN, 20, 0)]
    m = Manifest(
        volume_size=1 << 16,
        chunk_size=1 << 16,
        generation=GEN,
        start_seq=35,
        end_seq=40,
        end_ts=400,
        created_ns=1,
        objects=(used.key, older_gen.key),
        chunks=(zero_ref(1 << 16),),
    )
    found = unreferenced_data([used, older_gen, *unused], [m])
    assert found == sorted(unused, key=lambda k: k.key)
    assert unreferenced_data([used], []) == [used]
