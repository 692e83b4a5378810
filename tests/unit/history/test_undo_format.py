"""The history's record codec: every record decodes to what was encoded; damage is named."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.history.undo_format import (
    HEADER_SIZE,
    MAX_NAME,
    HistoryKind,
    HistoryRecordError,
    UndoHeader,
    decode,
    encode,
)

U64 = st.integers(0, 2**64 - 1)


@st.composite
def records(draw: st.DrawFn) -> tuple[UndoHeader, bytes]:
    kind = draw(st.sampled_from(list(HistoryKind)))
    if kind == HistoryKind.UNDO_DATA:
        payload = draw(st.binary(max_size=2000))
        length = len(payload)
    elif kind == HistoryKind.BOOKMARK:
        payload = draw(st.binary(min_size=1, max_size=MAX_NAME))
        length = draw(st.integers(0, 2**64 - 1))
    else:
        payload = b""
        length = draw(U64)
    h = UndoHeader(
        kind,
        draw(U64),
        draw(U64),
        draw(U64),
        length,
        draw(st.integers(0, 2**32 - 1)),
        draw(st.sampled_from([0, 1])),
        len(payload),
    )
    return h, payload


@given(records())
def test_round_trip(record: tuple[UndoHeader, bytes]) -> None:
    h, payload = record
    raw = b"".join(bytes(p) for p in encode(h, [payload] if payload else []))
    assert len(raw) == h.size and len(raw) % 8 == 0
    assert decode(raw[:HEADER_SIZE], raw[HEADER_SIZE:]) == h
    if not payload:
        assert decode(raw[:HEADER_SIZE]) == h


@given(records(), st.data())
def test_any_flipped_byte_is_refused(record: tuple[UndoHeader, bytes], data: st.DataObject) -> None:
    h, payload = record
    raw = bytearray(b"".join(bytes(p) for p in encode(h, [payload] if payload else [])))
    end = HEADER_SIZE + len(payload)
    at = data.draw(st.integers(0, end - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(HistoryRecordError):
        decode(raw[:HEADER_SIZE], raw[HEADER_SIZE:])


@given(st.binary(max_size=HEADER_SIZE + 64))
def test_garbage_is_refused_never_crashes(raw: bytes) -> None:
    try:
        decode(raw[:HEADER_SIZE], raw[HEADER_SIZE:])
    except HistoryRecordError:
        return
    raise AssertionError("random bytes decoded as a record")


def test_encode_refuses_what_could_not_be_decoded() -> None:
    with pytest.raises(ValueError, match="before-image of 4 bytes"):
        encode(UndoHeader(HistoryKind.UNDO_DATA, 1, 1, 0, 4, payload_len=3), [b"abc"])
    with pytest.raises(ValueError, match="bookmark name"):
        encode(UndoHeader(HistoryKind.BOOKMARK, 1, 1, payload_len=0))
    with pytest.raises(ValueError, match="unknown flags"):
        encode(UndoHeader(HistoryKind.SEGMENT, 1, 1, flags=4))
    with pytest.raises(ValueError, match="payload parts hold"):
        encode(UndoHeader(HistoryKind.UNDO_DATA, 1, 1, 0, 4, payload_len=4), [b"abc"])
    with pytest.raises(ValueError, match="out of range"):
        encode(UndoHeader(HistoryKind.SEGMENT, 2**64, 1))


def test_short_and_truncated_say_so() -> None:
    raw = b"".join(
        bytes(p) for p in encode(UndoHeader(HistoryKind.UNDO_DATA, 1, 1, 0, 4, 0, 0, 4), [b"abcd"])
    )
    with pytest.raises(HistoryRecordError, match="short"):
        decode(raw[:10])
    with pytest.raises(HistoryRecordError, match="truncated"):
        decode(raw[:HEADER_SIZE], raw[HEADER_SIZE : HEADER_SIZE + 2])
