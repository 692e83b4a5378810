"""Groups of changes whose before-images can be taken before any of them is applied."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from blockmirror.history.capture import DisjointRanges


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 30)), max_size=40))
def test_overlaps_matches_a_byte_model(ranges: list[tuple[int, int]]) -> None:
    kept = DisjointRanges()
    covered: set[int] = set()
    for start, length in ranges:
        want = any(b in covered for b in range(start, start + length))
        assert kept.overlaps(start, length) == want, (start, length, sorted(covered))
        if not want:
            kept.add(start, length)
            covered.update(range(start, start + length))
    assert len(kept) <= len(ranges)
    kept.clear()
    assert not kept.overlaps(0, 1000)
