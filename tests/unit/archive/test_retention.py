"""Retention of one chain (``retention.expired``), against a model of the chain it is given.

Random chains of one generation: records 1..TOP with origin times that never decrease (runs of
equal ones included), segments that run contiguously or with gaps, bases (``start <= end``,
built one after another), data objects the manifests take chunks from (their own, an older
base's, for a synthetic full), objects of abandoned bases and of a base still being built, and
bookmarks. A point N's time is record N's (0 for N = 0, the volume before any record).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.archive.chain import Chain
from blockmirror.archive.keys import (
    ArchiveKey,
    BookmarkKey,
    ClaimKey,
    DataKey,
    ManifestKey,
    SegmentKey,
)
from blockmirror.archive.retention import Expiry, expired, generation_expired

GEN = "ab" * 16
TOP = 60


@dataclass(frozen=True)
class Model:
    keys: tuple[ArchiveKey, ...]
    times: tuple[int, ...]  # by seq, times[0] == 0
    objects_of: Mapping[str, frozenset[str]]
    cutoff: int

    @property
    def bases(self) -> list[ManifestKey]:
        return [k for k in self.keys if isinstance(k, ManifestKey)]

    @property
    def data(self) -> list[DataKey]:
        return [k for k in self.keys if isinstance(k, DataKey)]


def covered(keys: Iterable[ArchiveKey]) -> set[int]:
    return {s for k in keys if isinstance(k, SegmentKey) for s in range(k.first, k.last + 1)}


def restores(base: ManifestKey, have: set[int], n: int) -> bool:
    return base.end <= n and all(s in have for s in range(base.start + 1, n + 1))


def restorable(keys: Iterable[ArchiveKey], n: int) -> bool:
    """The definition (docs/archive.md): some base has end <= n and the segments hold
    start+1..n without a gap."""
    keys = list(keys)
    have = covered(keys)
    return any(restores(b, have, n) for b in keys if isinstance(b, ManifestKey))


def remaining(model: Model, result: Expiry) -> list[ArchiveKey]:
    gone = set(result.delete)
    return [k for k in model.keys if k not in gone]


@st.composite
def chains(draw: st.DrawFn, *, ties: bool = True) -> Model:
    steps = draw(st.lists(st.integers(0 if ties else 1, 3), min_size=TOP, max_size=TOP))
    times = (0, *(1 + sum(steps[:i]) for i in range(TOP)))
    keys: list[ArchiveKey] = [ClaimKey(GEN)]
    seq = draw(st.integers(1, 8))
    while seq <= TOP:
        last = min(TOP, seq + draw(st.integers(0, 10)))
        keys.append(SegmentKey(GEN, seq, last, times[last]))
        seq = last + 1 + draw(st.sampled_from([0, 0, 0, 1, 3]))
    pairs = draw(st.lists(st.tuples(st.integers(0, TOP), st.integers(0, 10)), max_size=4))
    bases: list[ManifestKey] = []
    floor = 0
    for end, back in sorted(pairs):
        start = max(0, end - back, floor)  # built one after another: starts never go back
        floor = start
        bases.append(ManifestKey(GEN, end, start, times[end]))
    bases = sorted(set(bases), key=lambda b: (b.end, b.start))
    keys += bases
    objects_of: dict[str, frozenset[str]] = {}
    numbers: dict[int, int] = {}

    def new_data(start: int) -> DataKey:
        n = numbers.get(start, 0)
        numbers[start] = n + 1
        key = DataKey(GEN, start, n)
        keys.append(key)
        return key

    older: list[str] = []
    for base in bases:
        own = [new_data(base.start).key for _ in range(draw(st.integers(0, 2)))]
        reused = draw(st.lists(st.sampled_from(older), max_size=2)) if older else []
        objects_of[base.key] = frozenset(own + reused)
        older += own
    for _ in range(draw(st.integers(0, 2))):  # an abandoned base's objects
        new_data(draw(st.integers(0, TOP)))
    building: bool = draw(st.booleans())
    if bases and building:  # a base being built, after the newest manifest
        newest = max(b.start for b in bases)
        new_data(min(TOP, newest + draw(st.integers(0, 5))))
    for _ in range(draw(st.integers(0, 3))):
        mark = draw(st.integers(1, TOP))
        keys.append(BookmarkKey(GEN, mark, times[mark], draw(st.sampled_from(["a", "b c"]))))
    cutoff = draw(st.integers(0, times[TOP] + 3))
    return Model(tuple(keys), times, objects_of, cutoff)


def oracle_anchor(model: Model) -> ManifestKey | None:
    have = covered(model.keys)
    fit = [b for b in model.bases if b.end_ts < model.cutoff and restores(b, have, b.end)]
    return max(fit, key=lambda b: b.end, default=None)


# --- properties ---------------------------------------------------------------------------------


def check_kept_points(model: Model, result: Expiry, *, strictly_after: bool) -> None:
    after = remaining(model, result)
    for n in range(TOP + 1):
        young = model.times[n] > model.cutoff if strictly_after else model.times[n] >= model.cutoff
        if young and restorable(model.keys, n):
            assert restorable(after, n), f"point {n} (time {model.times[n]}) lost"
            assert Chain(after).is_restorable(n)


@settings(max_examples=200, deadline=None)
@given(chains())
def test_every_point_at_or_after_the_cutoff_stays_restorable(model: Model) -> None:
    """(a): every point whose time is the cutoff or later, with origin times that repeat."""
    result = expired(model.keys, model.cutoff, model.objects_of)
    check_kept_points(model, result, strictly_after=False)


@settings(max_examples=200, deadline=None)
@given(chains(ties=False))
def test_every_point_at_or_after_the_cutoff_stays_restorable_without_ties(model: Model) -> None:
    """(a) as documented, when no two records share an origin time."""
    result = expired(model.keys, model.cutoff, model.objects_of)
    check_kept_points(model, result, strictly_after=False)


@settings(max_examples=200, deadline=None)
@given(chains())
def test_nothing_deleted_is_needed(model: Model) -> None:
    """(b): no kept manifest takes a chunk from a deleted data object; deletions are keys of
    the chain, each once, and never the claim."""
    result = expired(model.keys, model.cutoff, model.objects_of)
    assert len(set(result.delete)) == len(result.delete)
    assert set(result.delete) <= set(model.keys)
    assert not any(isinstance(k, ClaimKey) for k in result.delete)
    gone = {k.key for k in result.delete if isinstance(k, DataKey)}
    for base in remaining(model, result):
        if isinstance(base, ManifestKey):
            assert not model.objects_of[base.key] & gone, base
    # And everything unreferenced and older than the newest manifest's start does go.
    if result.anchor is not None:
        kept = [b for b in model.bases if b not in result.delete]
        used = set().union(*(model.objects_of[b.key] for b in kept))
        newest = max(b.start for b in model.bases)
        assert gone == {d.key for d in model.data if d.key not in used and d.base_end < newest}


@settings(max_examples=200, deadline=None)
@given(chains())
def test_the_anchor_and_what_is_older(model: Model) -> None:
    """(c): the anchor is the newest restorable base at or before the cutoff and is kept; every
    older base goes, and every segment that ends at or before its start; bookmarks before it."""
    result = expired(model.keys, model.cutoff, model.objects_of)
    want = oracle_anchor(model)
    if want is None:
        assert result == Expiry(None, ())
        return
    anchor = result.anchor
    assert anchor is not None and anchor.end == want.end
    assert restores(anchor, covered(model.keys), anchor.end)
    after = remaining(model, result)
    assert anchor in after
    for key in after:
        if isinstance(key, ManifestKey):
            assert key.end >= anchor.end
        if isinstance(key, SegmentKey):
            assert key.last > anchor.start
        if isinstance(key, BookmarkKey):
            assert key.seq >= anchor.end
    deleted = set(result.delete)
    assert {b for b in model.bases if b.end < anchor.end} <= deleted
    assert {s for s in model.keys if isinstance(s, SegmentKey) and s.last <= anchor.start} <= (
        deleted
    )


@settings(max_examples=200, deadline=None)
@given(chains(), st.data())
def test_an_unread_manifest_keeps_every_data_object(model: Model, data: st.DataObject) -> None:
    """(d): a kept manifest missing from ``objects_of`` keeps every data object; one that goes
    anyway changes nothing (its chunks are no kept base's)."""
    if not model.bases:
        return
    missing = data.draw(st.sampled_from(model.bases))
    partial = {k: v for k, v in model.objects_of.items() if k != missing.key}
    full = expired(model.keys, model.cutoff, model.objects_of)
    result = expired(model.keys, model.cutoff, partial)
    if missing in full.delete:
        assert set(result.delete) == set(full.delete)
    else:
        assert not any(isinstance(k, DataKey) for k in result.delete)
        assert set(result.delete) == {k for k in full.delete if not isinstance(k, DataKey)}


@settings(max_examples=200, deadline=None)
@given(chains())
def test_a_base_being_built_keeps_its_objects(model: Model) -> None:
    """(e): data objects of a base that began after the newest manifest's start stay."""
    result = expired(model.keys, model.cutoff, model.objects_of)
    if not model.bases:
        assert result.delete == ()
        return
    newest = max(b.start for b in model.bases)
    for key in result.delete:
        if isinstance(key, DataKey):
            assert key.base_end < newest


@settings(max_examples=200, deadline=None)
@given(chains())
def test_no_base_before_the_cutoff_deletes_nothing(model: Model) -> None:
    """(f)."""
    if any(b.end_ts < model.cutoff for b in model.bases):
        return
    assert expired(model.keys, model.cutoff, model.objects_of) == Expiry(None, ())


# --- worked examples ----------------------------------------------------------------------------


def seg(first: int, last: int) -> SegmentKey:
    return SegmentKey(GEN, first, last, last * 10)


def base(end: int, start: int) -> ManifestKey:
    return ManifestKey(GEN, end, start, end * 10)


def data(start: int, n: int = 0) -> DataKey:
    return DataKey(GEN, start, n)


def test_two_bases_the_older_goes_with_its_segments_and_objects() -> None:
    b1, b2 = base(10, 5), base(50, 40)
    segs = [seg(1, 20), seg(21, 39), seg(40, 60), seg(61, 80)]
    mark_old, mark_new = BookmarkKey(GEN, 30, 300, "old"), BookmarkKey(GEN, 55, 550, "new")
    # b2 is a synthetic full: it takes chunks from b1's second object.
    keys: list[ArchiveKey] = [
        ClaimKey(GEN),
        b1,
        b2,
        *segs,
        data(5, 0),
        data(5, 1),
        data(40),
        mark_old,
        mark_new,
    ]
    objects_of = {b1.key: frozenset({data(5, 0).key, data(5, 1).key})}
    objects_of[b2.key] = frozenset({data(5, 1).key, data(40).key})
    result = expired(keys, 600, objects_of)  # the window starts at record 60
    assert result.anchor == b2
    assert set(result.delete) == {b1, seg(1, 20), seg(21, 39), data(5, 0), mark_old}
    after = Chain(k for k in keys if k not in result.delete)
    assert after.restorable == [(50, 80)]


def test_a_cutoff_before_the_second_base_keeps_everything() -> None:
    keys: list[ArchiveKey] = [base(10, 5), base(50, 40), seg(6, 80), data(5), data(40)]
    objects_of = {base(10, 5).key: frozenset({data(5).key}), base(50, 40).key: frozenset()}
    assert expired(keys, 499, objects_of) == Expiry(base(10, 5), ())
    assert expired(keys, 99, objects_of) == Expiry(None, ())


def test_a_base_across_a_gap_is_no_anchor() -> None:
    # b2's records 41..50 are not all archived: the anchor is b1, which reaches point 30 only;
    # nothing in its chain may go.
    b1, b2 = base(10, 5), base(50, 40)
    keys: list[ArchiveKey] = [b1, b2, seg(6, 30), seg(45, 80), data(5), data(40)]
    objects_of = {b1.key: frozenset({data(5).key}), b2.key: frozenset({data(40).key})}
    assert expired(keys, 700, objects_of) == Expiry(b1, ())


def test_objects_of_a_base_being_built_stay() -> None:
    b1 = base(10, 5)
    keys: list[ArchiveKey] = [b1, seg(6, 80), data(3), data(5), data(5, 1), data(70)]
    result = expired(keys, 800, {b1.key: frozenset({data(5).key})})
    # data(3): an abandoned base's; data(5, 1): unreferenced, but of the newest manifest's
    # start, so perhaps a base under way there; data(70): a base under way.
    assert result == Expiry(b1, (data(3),))


def test_a_point_at_the_cutoff_shares_its_time_with_the_anchor() -> None:
    # Records 20..30 have one origin time (a clock that stepped back is clamped, or a coarse
    # one), 300, which is the cutoff: point 20 is in the window, and only b1 restores it.
    b1 = ManifestKey(GEN, 10, 5, 100)
    b2 = ManifestKey(GEN, 30, 25, 300)
    keys: list[ArchiveKey] = [b1, b2, SegmentKey(GEN, 6, 40, 400)]
    assert Chain(keys).is_restorable(20)
    result = expired(keys, 300, {b1.key: frozenset(), b2.key: frozenset()})
    assert Chain(k for k in keys if k not in result.delete).is_restorable(20)


def test_a_base_that_restores_nothing_is_no_anchor() -> None:
    # (Also found by this file's model once bases may nest: 5..7 over 6..6.)
    # b1 (start 5) cannot restore: records 6..7 are missing. b2 (7..8) lies within it and
    # restores 8..40. plan(10) succeeds through b2, so b1 is taken as the anchor and b2 goes.
    b1, b2 = base(10, 5), base(8, 7)
    keys: list[ArchiveKey] = [b1, b2, seg(8, 40)]
    before = Chain(keys)
    assert before.restorable == [(8, 40)]
    result = expired(keys, 400, {b1.key: frozenset(), b2.key: frozenset()})
    assert result.anchor == b2
    assert Chain(k for k in keys if k not in result.delete).restorable == [(8, 40)]


def test_an_older_generation_goes_whole_only_when_outside_the_window() -> None:
    old = "cd" * 16
    keys: list[ArchiveKey] = [
        ClaimKey(old),
        ManifestKey(old, 10, 5, 100),
        SegmentKey(old, 6, 40, 400),
        BookmarkKey(old, 20, 200, "before"),
    ]
    anchor = ManifestKey(GEN, 50, 45, 500)
    assert generation_expired(keys, 1000, anchor)
    # Without an anchor of its own the current chain may need the old one for the window.
    assert not generation_expired(keys, 1000, None)
    # Anything of the old chain as young as the cutoff keeps it.
    assert not generation_expired(keys, 400, anchor)
    assert not generation_expired([*keys, BookmarkKey(old, 41, 999, "late")], 999, anchor)
