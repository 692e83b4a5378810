"""Checkpoint slots: layout, round trips, torn slots, choosing between the two, fd helpers."""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from crc32c import crc32c
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.errors import BlockmirrorError
from blockmirror.journal.checkpoint import (
    BODY_MAX,
    SLOT_MAGIC,
    SLOT_SIZE,
    Checkpoint,
    CheckpointError,
    ConsumerState,
    VolumeIdentity,
    choose,
    decode_slot,
    encode_slot,
    new_journal_id,
    read_checkpoint,
    slot_offset,
    write_checkpoint,
)
from blockmirror.state import ConsumerMode

U64 = st.integers(0, 2**64 - 1)
ALIGNED_U64 = st.integers(0, 2**61 - 1).map(lambda n: n * 8)

consumer_states = st.builds(
    ConsumerState,
    acked_seq=U64,
    mode=st.sampled_from(["journal", "tracking"]),
    paused=st.booleans(),
)

checkpoints = st.builds(
    Checkpoint,
    journal_id=st.text("0123456789abcdef", min_size=1, max_size=32),
    volume_size=U64,
    capacity=st.integers(1, 2**61 - 1).map(lambda n: n * 8),
    head_lpos=ALIGNED_U64,
    head_seq=U64,
    next_seq=U64,
    applied_seq=U64,
    boot_id=st.text(max_size=40),
    clean=st.booleans(),
    enqueue_paused=st.booleans(),
    needs_full_resync=st.booleans(),
    consumers=st.dictionaries(st.text(min_size=1, max_size=20), consumer_states, max_size=5),
)


HEX = st.text("0123456789abcdef", min_size=1, max_size=32)
volume_identities = st.builds(
    VolumeIdentity,
    kind=st.sampled_from(["file", "block"]),
    dev=U64,
    ino=U64,
    fp_seq=U64,
    blocks=st.lists(st.tuples(U64, HEX), max_size=8).map(tuple),
)
# Checkpoints with the optional identity fields (journals written since they exist).
identified_checkpoints = st.builds(
    replace,
    checkpoints,
    volume_id=st.none() | HEX,
    volume=st.none() | volume_identities,
    tail_stamp=st.none() | U64,
)


def sample(**changes: Any) -> Checkpoint:
    base = Checkpoint(
        journal_id="0123abcd",
        volume_size=64 << 20,
        capacity=1 << 20,
        head_lpos=4096,
        head_seq=17,
        next_seq=40,
        applied_seq=39,
        boot_id="5f1e2d3c-aaaa-bbbb-cccc-0123456789ab",
        consumers={
            "site-b": ConsumerState(30),
            "site-c": ConsumerState(12, ConsumerMode.TRACKING, True),
        },
    )
    return replace(base, **changes)


def complete_slot(body: bytes, generation: int = 1) -> bytes:
    """A slot with a right magic, length and CRC around any body, built independently."""
    head = SLOT_MAGIC + struct.pack("<QI", generation, len(body))
    crc = crc32c(head + body)
    return (head + struct.pack("<I", crc) + body).ljust(SLOT_SIZE, b"\0")


def body_of(cp: Checkpoint) -> dict[str, Any]:
    raw = encode_slot(cp, 0)
    (length,) = struct.unpack_from("<I", raw, 16)
    doc: dict[str, Any] = json.loads(raw[24 : 24 + length])
    return doc


# --- layout and round trips --------------------------------------------------------------------


def test_slot_layout_matches_the_doc() -> None:
    cp = sample()
    raw = encode_slot(cp, 0x0102030405060708)
    assert len(raw) == SLOT_SIZE == 4096
    assert raw[0:8] == b"BMJCKPT1"
    assert raw[8:16] == (0x0102030405060708).to_bytes(8, "little")
    length = int.from_bytes(raw[16:20], "little")
    body = raw[24 : 24 + length]
    assert raw[20:24] == crc32c(raw[:20] + body).to_bytes(4, "little")
    assert raw[24 + length :] == bytes(SLOT_SIZE - 24 - length)
    assert raw == complete_slot(body, 0x0102030405060708)
    assert json.loads(body) == {
        "format": 1,
        "journal_id": "0123abcd",
        "volume_size": 64 << 20,
        "capacity": 1 << 20,
        "head_lpos": 4096,
        "head_seq": 17,
        "next_seq": 40,
        "applied_seq": 39,
        "boot_id": "5f1e2d3c-aaaa-bbbb-cccc-0123456789ab",
        "clean": False,
        "enqueue_paused": False,
        "needs_full_resync": False,
        "consumers": {
            "site-b": {"acked_seq": 30, "mode": "journal", "paused": False},
            "site-c": {"acked_seq": 12, "mode": "tracking", "paused": True},
        },
    }


def test_slot_offsets() -> None:
    assert slot_offset(0) == 0
    assert slot_offset(1) == 4096
    with pytest.raises(ValueError, match="0 or 1"):
        slot_offset(2)


@given(checkpoints, U64)
def test_round_trip(cp: Checkpoint, generation: int) -> None:
    raw = encode_slot(cp, generation)
    assert len(raw) == SLOT_SIZE
    assert decode_slot(raw) == (generation, cp)
    # Deterministic: the same checkpoint always encodes to the same bytes.
    assert encode_slot(Checkpoint.from_json(cp.to_json()), generation) == raw


def test_encoding_does_not_depend_on_consumer_order() -> None:
    a = sample(consumers={"x": ConsumerState(1), "y": ConsumerState(2)})
    b = sample(consumers={"y": ConsumerState(2), "x": ConsumerState(1)})
    assert encode_slot(a, 3) == encode_slot(b, 3)


def test_non_ascii_consumer_names_survive() -> None:
    cp = sample(consumers={"défense-☃": ConsumerState(5), "\ud800": ConsumerState(6)})
    assert decode_slot(encode_slot(cp, 2)) == (2, cp)


def test_consumers_are_a_private_read_only_copy() -> None:
    source = {"site-b": ConsumerState(1)}
    cp = sample(consumers=source)
    source["site-c"] = ConsumerState(2)
    assert list(cp.consumers) == ["site-b"]
    with pytest.raises(TypeError):
        cp.consumers["site-d"] = ConsumerState(3)  # type: ignore[index]
    with pytest.raises(AttributeError):
        cp.head_seq = 5  # type: ignore[misc]


def test_new_journal_ids_are_random_hex() -> None:
    a, b = new_journal_id(), new_journal_id()
    assert a != b
    assert len(a) == 32
    sample(journal_id=a)  # accepted


# --- size limit --------------------------------------------------------------------------------


def test_an_oversized_consumer_map_is_refused_clearly() -> None:
    many = {
        f"peer-{i:03d}.example.org:7800": ConsumerState(2**63, ConsumerMode.TRACKING)
        for i in range(60)
    }
    with pytest.raises(CheckpointError, match=r"more than the 4064 a slot holds \(60 consumers\)"):
        encode_slot(sample(consumers=many), 1)


def test_a_body_of_exactly_the_limit_fits() -> None:
    def with_name(n: int) -> Checkpoint:
        return sample(consumers={"n" * n: ConsumerState(1)})

    # The body grows by one byte per character of the name.
    base = len(with_name(1).to_json())
    exact = with_name(1 + BODY_MAX - base)
    assert len(exact.to_json()) == BODY_MAX
    assert decode_slot(encode_slot(exact, 9)) == (9, exact)
    with pytest.raises(CheckpointError, match="4065 bytes"):
        encode_slot(with_name(2 + BODY_MAX - base), 9)


def test_generation_must_be_a_u64() -> None:
    with pytest.raises(ValueError, match="generation"):
        encode_slot(sample(), -1)
    with pytest.raises(ValueError, match="generation"):
        encode_slot(sample(), 2**64)


# --- validation of the fields ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"format": 2}, "unsupported checkpoint format 2"),
        ({"format": True}, "unsupported checkpoint format True"),
        ({"journal_id": ""}, "journal_id"),
        ({"journal_id": "ABCD"}, "journal_id"),
        ({"journal_id": "xyz"}, "journal_id"),
        ({"volume_size": -1}, "volume_size must be a u64"),
        ({"next_seq": 2**64}, "next_seq must be a u64"),
        ({"applied_seq": 1.0}, "applied_seq must be a u64"),
        ({"head_seq": True}, "head_seq must be a u64"),
        ({"capacity": 0}, "capacity"),
        ({"capacity": 65540}, "multiples of 8"),
        ({"head_lpos": 12}, "multiples of 8"),
        ({"boot_id": None}, "boot_id"),
        ({"clean": 1}, "clean must be true or false"),
        ({"needs_full_resync": None}, "needs_full_resync"),
        ({"consumers": [("a", ConsumerState(1))]}, "consumers must be a mapping"),
        ({"consumers": {"": ConsumerState(1)}}, "non-empty strings"),
        ({"consumers": {3: ConsumerState(1)}}, "non-empty strings"),
        ({"consumers": {"a": 5}}, "not a ConsumerState"),
    ],
)
def test_checkpoint_fields_are_validated(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(CheckpointError, match=fragment):
        sample(**changes)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((-1,), "acked_seq"),
        ((1, "mirror"), "consumer mode"),
        ((1, "journal", 0), "paused"),
    ],
)
def test_consumer_state_is_validated(args: tuple[Any, ...], fragment: str) -> None:
    with pytest.raises(CheckpointError, match=fragment):
        ConsumerState(*args)


def test_checkpoint_error_is_ours_and_a_value_error() -> None:
    assert issubclass(CheckpointError, BlockmirrorError)
    assert issubclass(CheckpointError, ValueError)


# --- invalid slots: None, never an exception ---------------------------------------------------


def test_empty_and_short_slots_are_none() -> None:
    assert decode_slot(bytes(SLOT_SIZE)) is None
    assert decode_slot(b"") is None
    raw = encode_slot(sample(), 1)
    assert decode_slot(raw[:-1]) is None
    assert decode_slot(raw + b"\0") is None


@given(st.binary(max_size=64), st.integers(0, 2**32))
def test_random_slots_are_none(prefix: bytes, seed: int) -> None:
    # A drawn prefix (shrinkable), the rest seeded: hypothesis dislikes drawing 4 KiB directly.
    raw = prefix + random.Random(seed).randbytes(SLOT_SIZE - len(prefix))
    assert decode_slot(raw) is None


@given(st.binary(max_size=SLOT_SIZE - 8), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_garbage_behind_a_valid_magic_is_none(rest: bytes, generation: int, length: int) -> None:
    raw = (SLOT_MAGIC + struct.pack("<QI", generation, length) + rest)[:SLOT_SIZE]
    assert decode_slot(raw.ljust(SLOT_SIZE, b"\0")) is None


@given(checkpoints, U64, st.data())
def test_a_torn_slot_is_none(cp: Checkpoint, generation: int, data: st.DataObject) -> None:
    new = encode_slot(cp, generation)
    covered = 24 + len(cp.to_json())
    # What the slot held before: nothing, garbage, or an older checkpoint.
    old = data.draw(
        st.one_of(
            st.just(bytes(SLOT_SIZE)),
            st.binary(min_size=SLOT_SIZE, max_size=SLOT_SIZE),
            st.builds(encode_slot, checkpoints, U64),
        ),
        label="old",
    )
    # The write stopped after any byte, or after any 512-byte sector.
    cut = data.draw(st.one_of(st.integers(0, SLOT_SIZE), st.integers(0, 8).map(lambda s: s * 512)))
    torn = new[:cut] + old[cut:]
    result = decode_slot(torn)
    if torn[:covered] == new[:covered]:
        assert result == (generation, cp)  # everything the CRC covers made it
    elif torn[:covered] == old[:covered] and decode_slot(old) is not None:
        assert result == decode_slot(old)  # nothing that matters was written yet
    else:
        assert result is None


@given(checkpoints, U64, st.data())
def test_every_bit_flip_the_crc_covers_is_detected(
    cp: Checkpoint, generation: int, data: st.DataObject
) -> None:
    raw = bytearray(encode_slot(cp, generation))
    covered = 24 + len(cp.to_json())
    bit = data.draw(st.integers(0, covered * 8 - 1), label="bit")
    raw[bit // 8] ^= 1 << (bit % 8)
    assert decode_slot(bytes(raw)) is None


@given(checkpoints, U64, st.data())
def test_bytes_after_the_body_do_not_matter(
    cp: Checkpoint, generation: int, data: st.DataObject
) -> None:
    raw = bytearray(encode_slot(cp, generation))
    covered = 24 + len(cp.to_json())
    pos = data.draw(st.integers(covered, SLOT_SIZE - 1), label="pos")
    raw[pos] ^= 0xFF
    assert decode_slot(bytes(raw)) == (generation, cp)


# --- complete slots whose body we cannot use: an error, not a fallback -------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"{", "not UTF-8 JSON"),
        (b"[" * 3000 + b"]" * 1000, "not UTF-8 JSON"),
        (b"[]", "not a JSON object"),
        (b'{"format": 2}', "unsupported checkpoint format 2"),
        (b'{"format": 1.0}', "unsupported checkpoint format 1.0"),
        (b'{"format": true}', "unsupported checkpoint format True"),
        (b'{"format": 1}', "missing fields"),
    ],
)
def test_complete_slot_with_an_unusable_body_raises(body: bytes, fragment: str) -> None:
    with pytest.raises(CheckpointError, match=fragment):
        decode_slot(complete_slot(body))


def edited(edit: Callable[[dict[str, Any]], None]) -> bytes:
    doc = body_of(sample())
    edit(doc)
    return complete_slot(json.dumps(doc).encode())


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d.update(extra=1), r"unknown fields \['extra'\]"),
        (lambda d: d.pop("boot_id"), r"missing fields \['boot_id'\]"),
        (lambda d: d.update(head_seq=-5), "head_seq must be a u64"),
        (lambda d: d.update(head_seq="5"), "head_seq must be a u64"),
        (lambda d: d.update(capacity=1e3), "capacity must be a u64"),
        (lambda d: d.update(clean=0), "clean must be true or false"),
        (lambda d: d.update(consumers=[]), "consumers is not a JSON object"),
        (lambda d: d["consumers"].update(x=3), "consumer 'x' is not a JSON object"),
        (lambda d: d["consumers"]["site-b"].pop("mode"), r"missing fields \['mode'\]"),
        (lambda d: d["consumers"]["site-b"].update(mode="x"), "consumer mode"),
        (lambda d: d["consumers"]["site-b"].update(acked_seq=None), "acked_seq"),
    ],
)
def test_complete_slot_with_bad_fields_raises(
    edit: Callable[[dict[str, Any]], None], fragment: str
) -> None:
    with pytest.raises(CheckpointError, match=fragment):
        decode_slot(edited(edit))


# --- the volume's identity (optional fields, issue 7 points 10 and 11) ----------------------------


@given(identified_checkpoints, U64)
def test_round_trip_with_identity(cp: Checkpoint, generation: int) -> None:
    raw = encode_slot(cp, generation)
    assert decode_slot(raw) == (generation, cp)
    assert encode_slot(Checkpoint.from_json(cp.to_json()), generation) == raw


@given(checkpoints)
def test_a_checkpoint_without_identity_encodes_as_before(cp: Checkpoint) -> None:
    """Backward compatible: unset identity fields are left out of the body altogether, so a
    journal written before they existed reads back with them unset."""
    doc = json.loads(cp.to_json())
    assert "volume_id" not in doc and "volume" not in doc
    assert Checkpoint.from_json(cp.to_json()).volume is None


def test_identity_layout() -> None:
    ident = VolumeIdentity("file", 2049, 131, 40, ((8192, "00ff"), (0, "abcd")))
    doc = body_of(sample(volume_id="beef", volume=ident))
    assert doc["volume_id"] == "beef"
    assert doc["volume"] == {
        "kind": "file",
        "dev": 2049,
        "ino": 131,
        "fp_seq": 40,
        "blocks": [[8192, "00ff"], [0, "abcd"]],
    }


def identity_edited(edit: Callable[[dict[str, Any]], None]) -> bytes:
    ident = VolumeIdentity("file", 1, 2, 3, ((0, "ab"),))
    doc = body_of(sample(volume_id="cafe", volume=ident))
    edit(doc)
    return complete_slot(json.dumps(doc).encode())


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d.update(volume_id=""), "volume_id"),
        (lambda d: d.update(volume_id="XYZ"), "volume_id"),
        (lambda d: d.update(volume=[]), "volume is not a JSON object"),
        (lambda d: d["volume"].update(extra=1), r"unknown fields \['extra'\]"),
        (lambda d: d["volume"].pop("fp_seq"), r"missing fields \['fp_seq'\]"),
        (lambda d: d["volume"].update(kind="tape"), "volume kind"),
        (lambda d: d["volume"].update(ino=-1), "volume.ino must be a u64"),
        (lambda d: d["volume"].update(blocks=[[0]]), "volume.blocks"),
        (lambda d: d["volume"].update(blocks=[["0", "ab"]]), "offset must be a u64"),
        (lambda d: d["volume"].update(blocks=[[0, "zz"]]), "hash must be hex"),
        (lambda d: d["volume"].update(blocks=[[0, "ab"]] * 33), "at most 32"),
    ],
)
def test_bad_identity_fields_raise(edit: Callable[[dict[str, Any]], None], fragment: str) -> None:
    with pytest.raises(CheckpointError, match=fragment):
        decode_slot(identity_edited(edit))


# --- choosing between the two slots ------------------------------------------------------------


def test_choose_between_nothing_is_none() -> None:
    assert choose(bytes(SLOT_SIZE), bytes(SLOT_SIZE)) is None
    assert choose(b"", b"garbage") is None


@given(checkpoints, checkpoints, st.integers(0, 2**63 - 2), st.data())
def test_choose_takes_the_newest_valid_slot(
    older: Checkpoint, newer: Checkpoint, g: int, data: st.DataObject
) -> None:
    # Slot g % 2 holds generation g, the other one g + 1: the last two writes.
    slots: dict[int, bytes] = {g % 2: encode_slot(older, g), (g + 1) % 2: encode_slot(newer, g + 1)}
    torn_newest = data.draw(st.booleans(), label="newest torn")
    if torn_newest:
        raw = bytearray(slots[(g + 1) % 2])
        # Any damage to what the CRC covers: a torn prefix, or a flipped bit.
        covered = 24 + len(newer.to_json())
        if data.draw(st.booleans(), label="cut"):
            cut = data.draw(st.integers(0, covered - 1), label="cut at")
            raw[cut:] = bytes(SLOT_SIZE - cut)
        else:
            bit = data.draw(st.integers(0, covered * 8 - 1), label="bit")
            raw[bit // 8] ^= 1 << (bit % 8)
        slots[(g + 1) % 2] = bytes(raw)
    chosen = choose(slots[0], slots[1])
    if torn_newest and decode_slot(slots[(g + 1) % 2]) is None:
        assert chosen == (g % 2, g, older)
    else:
        assert chosen == ((g + 1) % 2, g + 1, newer)


@given(checkpoints, st.integers(0, 2**63 - 1), st.sampled_from([0, 1]))
def test_choose_falls_back_when_one_slot_is_empty(cp: Checkpoint, g: int, empty: int) -> None:
    g = g * 2 + (1 - empty)  # the parity of the slot that is not empty
    slots = [b"", b""]
    slots[1 - empty] = encode_slot(cp, g)
    slots[empty] = bytes(SLOT_SIZE)
    assert choose(slots[0], slots[1]) == (1 - empty, g, cp)


def test_choose_refuses_a_generation_in_the_wrong_slot() -> None:
    with pytest.raises(CheckpointError, match="slot A holds generation 3, which belongs in slot B"):
        choose(encode_slot(sample(), 3), bytes(SLOT_SIZE))
    with pytest.raises(CheckpointError, match="slot B holds generation 2"):
        choose(encode_slot(sample(), 4), encode_slot(sample(), 2))


# --- fd helpers --------------------------------------------------------------------------------


@pytest.fixture
def journal_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "vol.journal", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 3 * SLOT_SIZE)
        yield fd
    finally:
        os.close(fd)


def test_write_and_read_checkpoints(journal_fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each checkpoint must be made durable: by a write with RWF_DSYNC, or by fdatasync.
    synced: list[int] = []
    real_fdatasync = os.fdatasync
    real_pwritev = os.pwritev

    def spy(fd: int) -> None:
        synced.append(fd)
        real_fdatasync(fd)

    def spy_pwritev(fd: int, buffers: list[bytes], offset: int, flags: int = 0) -> int:
        written = real_pwritev(fd, buffers, offset, flags)
        if flags & getattr(os, "RWF_DSYNC", 0):
            synced.append(fd)
        return written

    monkeypatch.setattr(os, "fdatasync", spy)
    monkeypatch.setattr(os, "pwritev", spy_pwritev)
    assert read_checkpoint(journal_fd) is None  # a fresh journal: both slots zero
    for generation in range(1, 6):
        cp = sample(head_seq=generation)
        write_checkpoint(journal_fd, cp, generation)
        assert synced == [journal_fd] * generation
        assert read_checkpoint(journal_fd) == (generation % 2, generation, cp)
        assert os.pread(journal_fd, SLOT_SIZE, slot_offset(generation % 2)) == encode_slot(
            cp, generation
        )
    # The data area after the slots was not touched.
    assert os.pread(journal_fd, SLOT_SIZE, 2 * SLOT_SIZE) == bytes(SLOT_SIZE)


def test_read_falls_back_when_the_newest_slot_is_torn(journal_fd: int) -> None:
    write_checkpoint(journal_fd, sample(head_seq=1), 6)
    write_checkpoint(journal_fd, sample(head_seq=2), 7)
    os.pwrite(journal_fd, b"\xff" * 10, slot_offset(1) + 30)  # damage generation 7's body
    assert read_checkpoint(journal_fd) == (0, 6, sample(head_seq=1))


def test_read_a_short_file(tmp_path: Path) -> None:
    path = tmp_path / "short.journal"
    path.write_bytes(encode_slot(sample(), 2) + b"\0" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        # Slot B is cut short: it is simply not valid.
        assert read_checkpoint(fd) == (0, 2, sample())
    finally:
        os.close(fd)
