"""The role file: a volume's live role and generations, its codec and its atomic writes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from crc32c import crc32c
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.journal.generations import (
    MAX_GENERATIONS,
    Generation,
    GenerationsError,
    VolumeHistory,
    decode,
    encode,
    load,
    load_or_create,
    new_generation,
    store,
)
from blockmirror.state import Role

generation = st.builds(
    Generation,
    id=st.text("0123456789abcdef", min_size=32, max_size=32),
    start_seq=st.integers(1, 2**64 - 1),
    unit=st.text(min_size=1, max_size=40),
    time_ns=st.integers(0, 2**64 - 1),
    reason=st.sampled_from(["created", "promote", "forced-promote", "unproven-start"]),
)


@st.composite
def histories(draw: st.DrawFn) -> VolumeHistory:
    gens = draw(st.lists(generation, max_size=8, unique_by=lambda g: g.id))
    gens.sort(key=lambda g: g.start_seq)
    return VolumeHistory(
        draw(st.text(min_size=1, max_size=20)), draw(st.sampled_from(Role)), tuple(gens)
    )


@given(histories())
def test_round_trip(history: VolumeHistory) -> None:
    assert decode(encode(history)) == history


@given(st.binary(max_size=2000))
def test_garbage_raises_only_generations_error(data: bytes) -> None:
    with pytest.raises(GenerationsError):
        decode(data)


@given(histories(), st.data())
def test_any_changed_byte_is_refused(history: VolumeHistory, data: st.DataObject) -> None:
    raw = bytearray(encode(history))
    i = data.draw(st.integers(0, len(raw) - 2))  # the final newline is not content
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        changed = decode(bytes(raw))
    except GenerationsError:
        return
    # A flip that still decodes can only be one JSON cannot see (never, with the CRC).
    raise AssertionError(f"byte {i} changed and still decoded: {changed}")


def sealed(doc: dict[str, Any]) -> bytes:
    """``doc`` with a correct crc32c, computed here independently of the codec."""
    body = {k: v for k, v in doc.items() if k != "crc32c"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    sealed_doc = {**body, "crc32c": crc32c(canonical)}
    return json.dumps(sealed_doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def test_another_spelling_of_the_same_content_is_refused() -> None:
    """The checksum covers the canonical encoding: a file that spells the same document
    otherwise (an escape's hex digit in upper case) was changed, and is refused."""
    raw = encode(
        VolumeHistory(
            "v", Role.PRIMARY, (new_generation(start_seq=1, unit="\x1f", reason="created"),)
        )
    )
    assert b"\\u001f" in raw
    with pytest.raises(GenerationsError, match="canonical"):
        decode(raw.replace(b"\\u001f", b"\\u001F"))
    with pytest.raises(GenerationsError, match="canonical"):
        decode(raw.replace(b'":', b'": '))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: d.update(format=2), "format 2"),
        (lambda d: d.update(role="boss"), "unknown role"),
        (lambda d: d.update(extra=1), "keys"),
        (lambda d: d["generations"][0].update(id="XYZ"), "32 lowercase hex"),
        (lambda d: d["generations"][0].update(reason="because"), "reason"),
        (lambda d: d["generations"][0].update(start_seq=0), "out of range"),
        (lambda d: d["generations"].append(dict(d["generations"][0])), "twice"),
    ],
)
def test_what_is_refused_and_why(change: Callable[[dict[str, Any]], None], fragment: str) -> None:
    first = new_generation(start_seq=5, unit="a", reason="created")
    doc = json.loads(encode(VolumeHistory("db", Role.PRIMARY, (first,))))
    change(doc)
    # Re-sealed with a correct CRC, so the field check itself is what refuses.
    with pytest.raises(GenerationsError, match=fragment):
        decode(sealed(doc))


def test_generations_only_move_forward() -> None:
    history = VolumeHistory("db", Role.SECONDARY)
    first = new_generation(start_seq=10, unit="a", reason="created")
    history = history.begin(first)
    with pytest.raises(GenerationsError, match="before the current one"):
        history.begin(new_generation(start_seq=9, unit="b", reason="promote"))
    later = history.begin(new_generation(start_seq=10, unit="b", reason="promote"))
    assert later.current is not None and later.current.unit == "b"
    assert later.status()["generation"] == later.current.id
    assert [g["unit"] for g in later.status()["generations"]] == ["a", "b"]
    assert MAX_GENERATIONS >= 1024


def test_store_replaces_atomically_and_load_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "db.role"
    assert load(path) is None
    one = VolumeHistory(
        "db", Role.PRIMARY, (new_generation(start_seq=1, unit="a", reason="created"),)
    )
    store(path, one)
    assert load(path) == one
    two = one.begin(new_generation(start_seq=7, unit="a", reason="promote"))
    store(path, two)
    assert load(path) == two
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db.role"]  # no temporary left
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(GenerationsError, match=str(path)):
        load(path)


def test_load_or_create_seeds_a_new_volume_and_then_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "db.role"
    made = load_or_create(path, volume="db", configured=Role.PRIMARY, unit="a", next_seq=42)
    assert made.role is Role.PRIMARY and made.current is not None
    assert (made.current.start_seq, made.current.unit, made.current.reason) == (42, "a", "created")
    # The configuration says otherwise later: the file wins, unchanged.
    again = load_or_create(path, volume="db", configured=Role.SECONDARY, unit="a", next_seq=99)
    assert again == made
    with pytest.raises(GenerationsError, match="belongs to volume 'db'"):
        load_or_create(path, volume="other", configured=Role.PRIMARY, unit="a", next_seq=1)
    replica = load_or_create(
        tmp_path / "r.role", volume="r", configured=Role.SECONDARY, unit="b", next_seq=1
    )
    assert replica.generations == () and load(tmp_path / "r.role") == replica
