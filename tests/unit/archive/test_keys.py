"""Archive object keys: round trips, numeric order as lexical order, strays told apart from
malformed keys, and parsing that is canonical (a key that parses is its own spelling)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.archive.keys import (
    U64_MAX,
    ArchiveFormatError,
    ArchiveKey,
    BookmarkKey,
    ClaimKey,
    DataKey,
    ManifestKey,
    SegmentKey,
    parse_key,
    quote_name,
    unquote_name,
)
from blockmirror.errors import ArchiveError, BlockmirrorError

GEN = "0123456789abcdef" * 2
U64 = st.integers(0, U64_MAX)
gens = st.text("0123456789abcdef", min_size=32, max_size=32)
names = st.text(min_size=1, max_size=60).filter(lambda s: 0 < len(s.encode()) <= 200)


@st.composite
def segment_keys(draw: st.DrawFn) -> SegmentKey:
    first = draw(st.integers(1, U64_MAX))
    return SegmentKey(draw(gens), first, draw(st.integers(first, U64_MAX)), draw(U64))


@st.composite
def manifest_keys(draw: st.DrawFn) -> ManifestKey:
    end = draw(U64)
    return ManifestKey(draw(gens), end, draw(st.integers(0, end)), draw(U64) if end else 0)


keys: st.SearchStrategy[ArchiveKey] = st.one_of(
    st.builds(ClaimKey, gens),
    segment_keys(),
    manifest_keys(),
    st.builds(DataKey, gens, U64, st.integers(0, 999_999)),
    st.builds(BookmarkKey, gens, U64, U64, names),
)


@given(keys)
def test_round_trip(k: ArchiveKey) -> None:
    assert parse_key(k.key) == k
    assert k.key.startswith(f"g{k.gen}/")


@given(st.lists(segment_keys(), min_size=2, max_size=10))
def test_lexical_order_is_numeric_order(ks: list[SegmentKey]) -> None:
    same = [SegmentKey(GEN, k.first, k.last, k.last_ts) for k in ks]
    by_key = sorted(same, key=lambda k: k.key)
    assert by_key == sorted(same, key=lambda k: (k.first, k.last, k.last_ts))


def test_layout() -> None:
    assert ClaimKey(GEN).key == f"g{GEN}/claim"
    assert SegmentKey(GEN, 1, 20, 7).key == (
        f"g{GEN}/seg/00000000000000000001-00000000000000000020-00000000000000000007.seg"
    )
    assert ManifestKey(GEN, 9, 3, 5).key == (
        f"g{GEN}/base/00000000000000000009-00000000000000000003-00000000000000000005.manifest"
    )
    assert DataKey(GEN, 9, 2).key == f"g{GEN}/data/00000000000000000009-000002.chunks"
    assert BookmarkKey(GEN, 4, 8, "before upgrade/été").key == (
        f"g{GEN}/bookmark/00000000000000000004-00000000000000000008-before%20upgrade%2F%C3%A9t%C3%A9"
    )


@pytest.mark.parametrize(
    "rel",
    [
        "",
        "README",
        "claim",
        f"x{GEN}/claim",
        f"g{GEN}/",
        f"g{GEN}/claim.tmp",
        f"g{GEN}/seg/upload.tmp",
        f"g{GEN}/base/a.json",
        f"g{GEN}/data/a.chunks.part",
        f"g{GEN}/other/1.seg",
    ],
)
def test_not_ours(rel: str) -> None:
    assert parse_key(rel) is None


Z = "0" * 20
ONE = "0" * 19 + "1"
TWO = "0" * 19 + "2"


@pytest.mark.parametrize(
    "rel",
    [
        f"g{GEN.upper()}/claim",
        f"g{GEN[:-1]}/claim",
        f"g{GEN}0/seg/{ONE}-{TWO}-{Z}.seg",
        f"g{GEN}/seg/{TWO}-{ONE}-{Z}.seg",  # first > last
        f"g{GEN}/seg/{Z}-{ONE}-{Z}.seg",  # there is no record 0
        f"g{GEN}/seg/{ONE}-{TWO}.seg",
        f"g{GEN}/seg/1-2-3.seg",  # not padded
        f"g{GEN}/seg/{ONE}-{TWO}-0{Z}.seg",  # too wide
        f"g{GEN}/seg/{ONE}-{TWO}-{'0' * 19}\u0661.seg",  # an Arabic-Indic digit
        f"g{GEN}/seg/{ONE}-{TWO}-{'9' * 20}.seg",  # past u64
        f"g{GEN}/seg/x/{ONE}-{TWO}-{Z}.seg",
        f"g{GEN}/base/{ONE}-{TWO}-{Z}.manifest",  # start > end
        f"g{GEN}/base/{Z}-{Z}-{ONE}.manifest",  # a timestamp for seq 0
        f"g{GEN}/data/{ONE}-1.chunks",
        f"g{GEN}/data/{ONE}-0000001.chunks",
        f"g{GEN}/bookmark/{ONE}-{TWO}",
        f"g{GEN}/bookmark/{ONE}-{TWO}-",
        f"g{GEN}/bookmark/{ONE}-{TWO}-a b",  # unescaped
        f"g{GEN}/bookmark/{ONE}-{TWO}-%41",  # an escaped safe byte
        f"g{GEN}/bookmark/{ONE}-{TWO}-%c3%a9",  # lower-case hex
        f"g{GEN}/bookmark/{ONE}-{TWO}-%C3",  # not UTF-8
        f"g{GEN}/bookmark/{ONE}-{TWO}-%2",
        f"g{GEN}/bookmark/{ONE}-{TWO}-" + "a" * 201,
    ],
)
def test_malformed(rel: str) -> None:
    with pytest.raises(ArchiveFormatError):
        parse_key(rel)


@given(
    st.sampled_from(["seg/", "base/", "data/", "bookmark/", ""]),
    st.text(max_size=80),
    st.sampled_from([".seg", ".manifest", ".chunks", ""]),
)
def test_any_name_parses_canonically_or_is_refused(directory: str, name: str, suffix: str) -> None:
    rel = f"g{GEN}/{directory}{name}{suffix}"
    try:
        k = parse_key(rel)
    except ArchiveFormatError:
        return
    assert k is None or k.key == rel


@given(st.text(max_size=300))
def test_anything_at_all(rel: str) -> None:
    try:
        k = parse_key(rel)
    except ArchiveFormatError as exc:
        assert isinstance(exc, ArchiveError) and isinstance(exc, BlockmirrorError)
        return
    assert k is None or k.key == rel


@given(names)
def test_quoting(name: str) -> None:
    quoted = quote_name(name)
    assert unquote_name(quoted) == name
    assert set(quoted) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-%")


def test_constructors_check() -> None:
    with pytest.raises(ArchiveFormatError):
        SegmentKey(GEN, 5, 4, 0)
    with pytest.raises(ArchiveFormatError):
        ManifestKey(GEN, 4, 5, 0)
    with pytest.raises(ArchiveFormatError):
        DataKey(GEN, 1, 1_000_000)
    with pytest.raises(ArchiveFormatError):
        BookmarkKey(GEN, 1, 1, "")
    with pytest.raises(ArchiveFormatError):
        BookmarkKey(GEN, 1, 1, "\ud800")
    with pytest.raises(ArchiveFormatError):
        ClaimKey("g" * 32)
