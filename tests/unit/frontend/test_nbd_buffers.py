"""Receive arenas: an arena is lent out again only when no view of it is left."""

from __future__ import annotations

import pytest

from blockmirror.frontend.nbd_buffers import MIN_FREE, ReceiveArenas


def test_an_arena_with_a_live_view_is_never_lent_again() -> None:
    arenas = ReceiveArenas(size=MIN_FREE, keep=4)
    first = arenas.take()
    payload = first[100:200][10:20]  # a payload view, sliced again, as the codec hands it on
    payload_copy = bytes(payload)
    del first  # the connection moved on to the next arena
    second = arenas.take()
    assert arenas.made == 2 and arenas.reused == 0  # the first is pinned by the payload
    second[:] = b"\xff" * len(second)
    assert bytes(payload) == payload_copy  # untouched by writes into the other arena
    assert arenas.in_use() == 2
    del second
    assert arenas.in_use() == 1
    del payload
    assert arenas.in_use() == 0
    again = arenas.take()
    assert arenas.reused == 1 and arenas.made == 2
    assert len(again) == MIN_FREE


def test_casts_and_nested_views_pin_too() -> None:
    arenas = ReceiveArenas(size=MIN_FREE, keep=1)
    view = arenas.take()
    held = memoryview(view[0:8]).cast("B")[2:4]
    del view
    assert arenas.in_use() == 1
    arenas.take()  # a new arena, not kept (keep=1), not the pinned one
    assert arenas.made == 2 and arenas.reused == 0
    del held
    assert arenas.in_use() == 0


def test_only_keep_arenas_are_kept() -> None:
    arenas = ReceiveArenas(size=MIN_FREE, keep=2)
    held = [arenas.take() for _ in range(5)]
    assert arenas.made == 5 and arenas.in_use() == 2
    del held
    views = [arenas.take() for _ in range(3)]
    # The two kept ones come back; the third is new (the three not kept were freed).
    assert arenas.reused == 2 and arenas.made == 6
    assert len(views) == 3


def test_an_arena_too_small_to_read_into_is_refused() -> None:
    with pytest.raises(ValueError, match="smaller"):
        ReceiveArenas(size=MIN_FREE - 1)
