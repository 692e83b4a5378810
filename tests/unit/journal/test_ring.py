"""Ring arithmetic: placement at the end of the ring, space accounting, and a stateful model."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from blockmirror.journal.format import HEADER_SIZE
from blockmirror.journal.ring import DATA_START, MIN_CAPACITY, Placement, Ring

KiB = 1024
CAP = 64 * KiB


def aligned(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Multiples of 8 in ``[lo, hi]``."""
    return st.integers(-(-lo // 8), hi // 8).map(lambda n: n * 8)


# --- construction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "data_start", "fragment"),
    [
        (MIN_CAPACITY - 8, DATA_START, "below the minimum"),
        (0, DATA_START, "below the minimum"),
        (MIN_CAPACITY + 4, DATA_START, "not a multiple of 8"),
        (MIN_CAPACITY, 4, "data_start 4"),
        (MIN_CAPACITY, -8, "data_start -8"),
    ],
)
def test_ring_rejects_bad_geometry(capacity: int, data_start: int, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Ring(capacity, data_start)


def test_ring_defaults_to_the_data_area_after_two_slots() -> None:
    ring = Ring(CAP)
    assert ring.data_start == DATA_START == 8192
    assert ring.physical(0) == 8192
    assert ring.physical(CAP - 8) == 8192 + CAP - 8
    assert ring.physical(CAP) == 8192
    assert ring.physical(5 * CAP + 24) == 8192 + 24
    assert repr(ring) == f"Ring(capacity={CAP}, data_start=8192)"


def test_space_to_end() -> None:
    ring = Ring(CAP, 0)
    assert ring.space_to_end(0) == CAP
    assert ring.space_to_end(CAP) == CAP
    assert ring.space_to_end(CAP - 8) == 8
    assert ring.space_to_end(3 * CAP + 100 * 8) == CAP - 800


# --- placement ---------------------------------------------------------------------------------


def test_place_before_the_end_needs_no_padding() -> None:
    ring = Ring(CAP)
    assert ring.place(CAP + 64, 128) == Placement(CAP + 64, 0, CAP + 64, CAP + 192)


def test_place_exactly_to_the_end_needs_no_padding() -> None:
    ring = Ring(CAP)
    p = ring.place(CAP - 128, 128)
    assert p == Placement(CAP - 128, 0, CAP - 128, CAP)
    assert not p.pad_header


def test_place_with_a_padding_record() -> None:
    ring = Ring(CAP)
    p = ring.place(2 * CAP - 200, 256)
    assert p == Placement(2 * CAP - 200, 200, 2 * CAP, 2 * CAP + 256)
    assert p.pad_header
    assert p.pad_payload_len == 200 - HEADER_SIZE
    assert ring.physical(p.record_lpos) == DATA_START


def test_place_with_exactly_a_header_of_padding() -> None:
    p = Ring(CAP).place(CAP - 64, 72)
    assert p.pad_len == 64
    assert p.pad_header
    assert p.pad_payload_len == 0


def test_place_skips_fewer_than_64_bytes_without_a_header() -> None:
    ring = Ring(CAP)
    p = ring.place(CAP - 56, 64)
    assert p == Placement(CAP - 56, 56, CAP, CAP + 64)
    assert not p.pad_header
    assert ring.header_lpos(CAP - 56) == CAP
    assert ring.header_lpos(CAP - 64) == CAP - 64
    assert ring.header_lpos(CAP) == CAP


@pytest.mark.parametrize(
    ("tail", "size", "fragment"),
    [
        (4, 64, "tail 4"),
        (-8, 64, "tail -8"),
        (0, 56, "record size 56"),
        (0, 68, "record size 68"),
        (0, CAP + 8, "exceeds the ring capacity"),
    ],
)
def test_place_rejects_bad_arguments(tail: int, size: int, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Ring(CAP).place(tail, size)


@given(aligned(0, 10 * CAP), aligned(64, CAP))
def test_a_placed_record_never_straddles_the_end(tail: int, size: int) -> None:
    ring = Ring(CAP)
    p = ring.place(tail, size)
    assert p.pad_lpos == tail
    assert p.record_lpos == tail + p.pad_len
    assert p.new_tail == p.record_lpos + size
    assert ring.physical(p.record_lpos) + size <= ring.data_start + ring.capacity
    if p.pad_len:
        # Padding happens only when needed, and always runs exactly to the end.
        assert ring.space_to_end(tail) < size
        assert p.pad_len == ring.space_to_end(tail)
        assert p.record_lpos % CAP == 0
    else:
        assert ring.space_to_end(tail) >= size


# --- space accounting --------------------------------------------------------------------------


def test_used_free_and_inconsistent_positions() -> None:
    ring = Ring(CAP)
    assert ring.used(100 * 8, 100 * 8) == 0
    assert ring.free(0, CAP) == 0
    assert ring.used(CAP, 2 * CAP) == CAP
    with pytest.raises(ValueError, match="inconsistent ring positions"):
        ring.used(80, 72)
    with pytest.raises(ValueError, match="inconsistent ring positions"):
        ring.free(0, CAP + 8)
    with pytest.raises(ValueError, match="inconsistent ring positions"):
        ring.fits(0, CAP + 8, 64)


def test_fits_counts_the_padding() -> None:
    ring = Ring(CAP)
    # 1024 bytes are free: 256 before the end of the ring, 768 after its start.
    tail = 2 * CAP - 256
    head = tail - (CAP - 1024)
    assert ring.free(head, tail) == 1024
    assert ring.fits(head, tail, 256)  # before the end, no padding
    assert ring.fits(head, tail, 512)  # 256 of padding + 512
    assert ring.fits(head, tail, 768)  # 256 of padding + 768: exactly full
    assert not ring.fits(head, tail, 776)  # 1032 > 1024 although 776 < free
    assert not ring.fits(head, tail, 1024)


def test_a_record_larger_than_the_ring_never_fits() -> None:
    ring = Ring(CAP)
    assert ring.fits(0, 0, CAP)
    assert not ring.fits(0, 0, CAP + 8)
    assert not ring.fits(5 * CAP, 5 * CAP, 10 * CAP)
    assert not ring.fits(8, 8, CAP)  # would need padding first


@given(aligned(0, 4 * CAP), st.sampled_from([MIN_CAPACITY, MIN_CAPACITY + 8, 3 * CAP + 56]))
def test_max_record_fits_an_empty_ring_anywhere(lpos: int, capacity: int) -> None:
    ring = Ring(capacity)
    assert ring.max_record % 8 == 0
    assert ring.fits(lpos, lpos, ring.max_record)


@pytest.mark.parametrize("capacity", [MIN_CAPACITY, MIN_CAPACITY + 8, 3 * CAP + 56])
def test_max_record_is_the_largest_that_always_fits(capacity: int) -> None:
    ring = Ring(capacity)
    size = ring.max_record + 8
    # The worst tail leaves 8 bytes less than the record before the end.
    worst = capacity - (size - 8)
    assert not ring.fits(worst, worst, size)


def test_the_ring_wraps_many_times_without_losing_space() -> None:
    ring = Ring(CAP)
    head = tail = 0
    live: list[tuple[int, int]] = []
    sizes = [72, 4160, 200, 24_000, 64, 33_000, 136]
    for i in range(2000):
        size = sizes[i % len(sizes)]
        while not ring.fits(head, tail, size):
            live.pop(0)
            head = live[0][0] if live else tail
        p = ring.place(tail, size)
        live.append((p.record_lpos, size))
        tail = p.new_tail
        assert ring.used(head, tail) <= CAP
    assert tail // CAP > 20


# --- a stateful model --------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A range of the ring in the reference model: a record, a padding record, or a bare skip."""

    lpos: int
    size: int
    what: str


class RingModel(RuleBasedStateMachine):
    """Appends and frees against a list of live ranges, checked with independent arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.ring: Ring | None = None
        self.head = 0
        self.tail = 0
        self.live: list[Entry] = []
        self.appended = 0
        self.start = 0

    @initialize(
        capacity=st.sampled_from([MIN_CAPACITY, MIN_CAPACITY + 8, MIN_CAPACITY + 4096]),
        data_start=st.sampled_from([0, DATA_START, 123 * 8]),
        start=aligned(0, 3 * MIN_CAPACITY),
        back=st.one_of(st.just(0), aligned(0, HEADER_SIZE)),
    )
    def create(self, capacity: int, data_start: int, start: int, back: int) -> None:
        # Starting mid-ring, even a few bytes before the end, is what a recovered journal does.
        self.ring = Ring(capacity, data_start)
        if back:
            start = (start // capacity + 1) * capacity - back
        self.head = self.tail = self.start = start

    @rule(
        size=st.one_of(
            aligned(64, 512),
            aligned(512, 8 * KiB),
            aligned(8 * KiB, MIN_CAPACITY // 2),
            aligned(MIN_CAPACITY - 256, MIN_CAPACITY + 4096 + 64),
        )
    )
    def append(self, size: int) -> None:
        ring = self.ring
        assert ring is not None
        cap = ring.capacity
        # The reference: what is left before the end is given up when the record does not fit it.
        rest = cap - self.tail % cap
        pad = 0 if size <= rest else rest
        expected_fit = size <= cap and self.tail - self.head + pad + size <= cap
        assert ring.fits(self.head, self.tail, size) == expected_fit
        if not expected_fit:
            event("append refused")
            return
        p = ring.place(self.tail, size)
        assert p == Placement(self.tail, pad, self.tail + pad, self.tail + pad + size)
        if pad:
            kind = "padding" if pad >= HEADER_SIZE else "skip"
            assert p.pad_header == (kind == "padding")
            event(f"wrapped with {kind}")
            self.live.append(Entry(self.tail, pad, kind))
        self.live.append(Entry(p.record_lpos, size, "record"))
        self.tail = p.new_tail
        self.appended += 1

    @rule(data=st.data())
    def free_from_head(self, data: st.DataObject) -> None:
        records = [i for i, e in enumerate(self.live) if e.what == "record"]
        if not records:
            return  # a rule rather than a precondition: filtered rules make hypothesis give up
        n = data.draw(st.integers(1, len(records)), label="records freed")
        # Free through the n-th record, padding included: the head moves to what follows it.
        cut = records[n - 1] + 1
        del self.live[:cut]
        self.head = self.live[0].lpos if self.live else self.tail

    @invariant()
    def accounting(self) -> None:
        ring = self.ring
        if ring is None:
            return
        used = ring.used(self.head, self.tail)
        assert used + ring.free(self.head, self.tail) == ring.capacity
        assert used == sum(e.size for e in self.live)
        # Live entries are contiguous from head to tail.
        pos = self.head
        for e in self.live:
            assert e.lpos == pos
            pos += e.size
        assert pos == self.tail

    @invariant()
    def no_overlap_and_no_straddle(self) -> None:
        ring = self.ring
        if ring is None:
            return
        end = ring.data_start + ring.capacity
        spans = []
        for e in self.live:
            start = ring.physical(e.lpos)
            assert ring.data_start <= start and start + e.size <= end, e
            spans.append((start, start + e.size))
        spans.sort()
        for (_, a_end), (b_start, _) in itertools.pairwise(spans):
            assert a_end <= b_start

    @invariant()
    def headers_are_where_readers_look(self) -> None:
        ring = self.ring
        if ring is None:
            return
        for e in self.live:
            if e.what == "skip":
                assert e.size < HEADER_SIZE
                assert ring.header_lpos(e.lpos) == e.lpos + e.size
            else:
                assert ring.header_lpos(e.lpos) == e.lpos

    def teardown(self) -> None:
        if self.ring is not None:
            laps = self.tail // self.ring.capacity - self.start // self.ring.capacity
            note(f"appended {self.appended}, tail {self.tail}")
            event(f"crossed the end {min(laps, 3)}+ times")


TestRingModel = RingModel.TestCase
TestRingModel.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
