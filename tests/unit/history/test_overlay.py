"""The overlay of before-images: each byte from the oldest entry that covers it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from blockmirror.history.overlay import Overlay

SPAN = 120
ranges = st.lists(st.tuples(st.integers(0, SPAN - 1), st.integers(1, 40)), max_size=30)


def model(entries: list[tuple[int, int, int]]) -> list[int | None]:
    owner: list[int | None] = [None] * (SPAN + 40)
    for entry, start, length in sorted(entries):
        for b in range(start, start + length):
            if owner[b] is None:
                owner[b] = entry
    return owner


def resolve(overlay: Overlay) -> list[int | None]:
    owner: list[int | None] = [None] * (SPAN + 40)
    for piece in overlay.lookup(0, SPAN + 40):
        for b in range(piece.start, piece.end):
            assert owner[b] is None, "runs overlap"
            owner[b] = piece.entry
    return owner


@given(ranges, ranges)
def test_build_then_fill_matches_the_byte_model(
    first: list[tuple[int, int]], later: list[tuple[int, int]]
) -> None:
    built = [(i, s, n) for i, (s, n) in enumerate(first)]
    overlay = Overlay.build(built)
    assert resolve(overlay) == model(built)
    added = [(len(first) + i, s, n) for i, (s, n) in enumerate(later)]
    for entry, start, length in added:
        overlay.fill(entry, start, length)
    assert resolve(overlay) == model(built + added)
    assert overlay.starts == sorted(overlay.starts)


@given(ranges, st.integers(0, SPAN), st.integers(1, 60))
def test_lookup_is_clipped_and_keeps_entry_offsets(
    first: list[tuple[int, int]], offset: int, length: int
) -> None:
    built = [(i, s, n) for i, (s, n) in enumerate(first)]
    overlay = Overlay.build(built)
    starts = {i: s for i, s, _ in built}
    for piece in overlay.lookup(offset, length):
        assert offset <= piece.start < piece.end <= offset + length
        assert piece.entry_start == starts[piece.entry]
