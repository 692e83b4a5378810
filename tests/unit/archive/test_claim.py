"""The claim document: round trips, one spelling, and every malformed document refused with
ArchiveFormatError (and nothing else)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.archive.claim import MAX_CLAIM, Claim, decode_claim, encode_claim
from blockmirror.archive.keys import ArchiveFormatError

GEN = "ab" * 16
texts = st.text(min_size=1, max_size=40)
claims = st.builds(
    Claim,
    volume=texts,
    generation=st.text("0123456789abcdef", min_size=32, max_size=32),
    unit=texts,
    writer=texts,
    created_ns=st.integers(0, 2**64 - 1),
)


def doc(**changes: Any) -> bytes:
    d: dict[str, Any] = {
        "format": 1,
        "volume": "vol",
        "generation": GEN,
        "unit": "a",
        "writer": "w1",
        "created_ns": 5,
    }
    d.update(changes)
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()


@given(claims)
def test_round_trip(c: Claim) -> None:
    b = encode_claim(c)
    assert decode_claim(b) == c
    assert decode_claim(memoryview(b)) == c
    parsed = json.loads(b)
    assert parsed["format"] == 1
    assert list(parsed) == sorted(parsed)


def test_decodes_what_others_write() -> None:
    assert decode_claim(doc()) == Claim("vol", GEN, "a", "w1", 5)


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"\xff",
        b"[]",
        b'"x"',
        b"{",
        b"[" * 100_000 + b"]" * 100_000,  # too long, and too deep
        b"[" * 30_000 + b"]" * 30_000,  # deep within the bound
        doc(format=2),
        doc(format=True),
        doc(format="1"),
        doc(format=...),
        doc(volume=...),
        doc(volume=""),
        doc(volume=3),
        doc(unit=None),
        doc(generation=GEN.upper()),
        doc(generation=5),
        doc(created_ns=True),
        doc(created_ns=1.5),
        doc(created_ns=-1),
        doc(created_ns=2**64),
        doc(extra=1),
        doc().replace(b'"created_ns": 5', b'"created_ns": NaN'),
        doc().replace(b'"created_ns": 5', b'"created_ns": 1e999'),
        doc().replace(b'"created_ns": 5', b'"created_ns": ' + b"9" * 5000),
        doc().replace(b'"unit": "a"', b'"unit": "\\ud800"'),
        doc()[:-1] + b', "unit": "b"}',  # a duplicate key
        b" " * (MAX_CLAIM + 1),
    ],
)
def test_refused(bad: bytes) -> None:
    with pytest.raises(ArchiveFormatError):
        decode_claim(bad)


@given(claims, st.data())
def test_truncated_or_flipped(c: Claim, data: st.DataObject) -> None:
    b = encode_claim(c)
    cut = data.draw(st.integers(0, len(b) - 1))
    with pytest.raises(ArchiveFormatError):
        decode_claim(b[:cut])
    i = data.draw(st.integers(0, len(b) - 1))
    flipped = bytearray(b)
    flipped[i] ^= data.draw(st.integers(1, 255))
    # A flip inside a string or a number can leave a valid claim (JSON has no CRC; the store
    # checks what it returns): what matters is that nothing but ArchiveFormatError escapes.
    with contextlib.suppress(ArchiveFormatError):
        decode_claim(bytes(flipped))


@given(st.binary(max_size=300))
def test_garbage(b: bytes) -> None:
    with contextlib.suppress(ArchiveFormatError):
        decode_claim(b)
