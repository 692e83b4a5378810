"""Sealed link sessions (docs/link-protocol.md, "Sealed sessions"): what one end seals the other
opens, in order, however the bytes are cut; any bit flipped, any truncation that is then
continued, any record replayed, reordered, dropped or sent back the other way is refused, and
the opener stays failed. Keys are bound to the key, both nonces, the direction and the HELLO."""

from __future__ import annotations

import dataclasses
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.errors import ProtocolError
from blockmirror.journal.lineage import Lineage
from blockmirror.link.protocol import (
    MAGIC,
    Ack,
    Hello,
    LinkCodec,
    encode,
)
from blockmirror.link.session_crypto import (
    CHACHA20_POLY1305,
    MAX_SEALED,
    SEALED_HEADER_SIZE,
    SEALED_TYPE,
    TAG_BYTES,
    IntegrityError,
    Opener,
    Sealer,
    derive_keys,
    hello_digest,
)
from blockmirror.state import Role

PSK = b"correct horse battery staple 42"
NONCE_A = "0a" * 32
NONCE_B = "b0" * 32
LINEAGE = Lineage("site-a", Role.PRIMARY, (("0123456789abcdef" * 2, 1, "site-a"),), 7)
HELLO = Hello(
    2, "site-a", "vol", "j-1", 1 << 30, NONCE_A, "psk", 1 << 20, CHACHA20_POLY1305, LINEAGE
)

MESSAGES = st.lists(st.binary(min_size=1, max_size=600), min_size=1, max_size=8)


def pair() -> tuple[Sealer, Opener]:
    keys = derive_keys(PSK, NONCE_A, NONCE_B, HELLO)
    return Sealer(keys.source), Opener(keys.source)


def seal_all(sealer: Sealer, messages: list[bytes]) -> list[bytes]:
    return [b"".join(bytes(b) for b in sealer.seal([m])) for m in messages]


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=200, deadline=None)
@given(MESSAGES, st.lists(st.integers(min_value=0), max_size=10))
def test_round_trip_in_order_however_the_bytes_are_cut(
    messages: list[bytes], points: list[int]
) -> None:
    sealer, opener = pair()
    wire = b"".join(seal_all(sealer, messages))
    out: list[bytes] = []
    for piece in cut(wire, points):
        out.extend(opener.feed(piece))
    assert out == messages
    assert opener.buffered == 0 and opener.counter == len(messages)
    # Nothing in clear on the wire: the plaintext of a long enough message is not in it.
    for m in messages:
        if len(m) >= 16:
            assert m not in wire


def test_one_record_holds_several_buffers_joined() -> None:
    sealer, opener = pair()
    frame = encode(Ack(1, 2, 3))
    record = b"".join(bytes(b) for b in sealer.seal([b"ab", memoryview(b"cd"), bytearray(b"e")]))
    assert opener.feed(record) == [b"abcde"]
    header = sealer.seal(frame)[0]
    assert len(header) == SEALED_HEADER_SIZE
    assert struct.unpack("<IB3xI", header) == (MAGIC, SEALED_TYPE, 16 + 24 + TAG_BYTES)


@settings(max_examples=300, deadline=None)
@given(MESSAGES, st.data())
def test_any_bit_flip_is_refused(messages: list[bytes], data: st.DataObject) -> None:
    sealer, opener = pair()
    wire = bytearray(b"".join(seal_all(sealer, messages)))
    bit = data.draw(st.integers(min_value=0, max_value=len(wire) * 8 - 1))
    wire[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(IntegrityError):
        # A flipped length may leave the opener waiting: what follows it cannot help.
        opener.feed(bytes(wire))
        opener.feed(bytes(MAX_SEALED + SEALED_HEADER_SIZE))
    # Failed for good: not even the untouched stream opens now.
    with pytest.raises(IntegrityError):
        opener.feed(b"".join(seal_all(pair()[0], messages)))


@settings(max_examples=200, deadline=None)
@given(MESSAGES, st.data())
def test_truncation_yields_only_whole_records_and_never_resumes(
    messages: list[bytes], data: st.DataObject
) -> None:
    sealer, opener = pair()
    records = seal_all(sealer, messages)
    wire = b"".join(records)
    keep = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
    out = opener.feed(wire[:keep])
    # Only records wholly received come out; a partial one is never handed over.
    whole = 0
    total = 0
    for r in records:
        if total + len(r) > keep:
            break
        whole += 1
        total += len(r)
    assert out == messages[:whole]
    # Bytes cut out of the middle (the stream goes on after a gap): refused.
    rest = wire[keep + 1 :]
    if rest:
        with pytest.raises(IntegrityError):
            opener.feed(rest)
            opener.feed(bytes(MAX_SEALED + SEALED_HEADER_SIZE))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=64), min_size=2, max_size=6), st.data())
def test_replay_reorder_and_drop_are_refused(messages: list[bytes], data: st.DataObject) -> None:
    sealer, _ = pair()
    records = seal_all(sealer, messages)
    n = len(records)
    how = data.draw(st.sampled_from(["replay", "reorder", "drop"]))
    i = data.draw(st.integers(min_value=0, max_value=n - 2))
    if how == "replay":
        j = data.draw(st.integers(min_value=0, max_value=i))
        sent = [*records[: i + 1], records[j], *records[i + 1 :]]
    elif how == "reorder":
        sent = [*records[:i], records[i + 1], records[i], *records[i + 2 :]]
    else:
        sent = [*records[:i], *records[i + 1 :]]
    _, opener = pair()
    out: list[bytes] = []
    with pytest.raises(IntegrityError):
        for record in sent:
            out.extend(opener.feed(record))
    # What came out before the refusal is an untouched prefix of what was sealed.
    assert out == messages[: len(out)] and len(out) <= i + 1


def test_keys_differ_per_direction_and_bind_psk_nonces_and_hello() -> None:
    keys = derive_keys(PSK, NONCE_A, NONCE_B, HELLO)
    assert keys.source != keys.secondary and len(keys.source) == len(keys.secondary) == 32
    others = [
        derive_keys(PSK + b"!", NONCE_A, NONCE_B, HELLO),
        derive_keys(PSK, NONCE_B, NONCE_A, HELLO),
        derive_keys(PSK, NONCE_A, "0b" * 32, HELLO),
        derive_keys(PSK, NONCE_A, NONCE_B, dataclasses.replace(HELLO, volume_id="j-2")),
        derive_keys(PSK, NONCE_A, NONCE_B, dataclasses.replace(HELLO, size=1 << 31)),
        derive_keys(PSK, NONCE_A, NONCE_B, dataclasses.replace(HELLO, crypto=None)),
    ]
    for other in others:
        assert {other.source, other.secondary}.isdisjoint({keys.source, keys.secondary})
    # A record sealed in one direction does not open in the other (reflection).
    record = b"".join(bytes(b) for b in Sealer(keys.secondary).seal([b"WELCOME"]))
    with pytest.raises(IntegrityError):
        Opener(keys.source).feed(record)
    assert Opener(keys.secondary).feed(record) == [b"WELCOME"]


def test_hello_digest_reads_fields_not_spelling() -> None:
    wire = b"".join(bytes(b) for b in encode(HELLO))
    codec = LinkCodec()
    codec.feed(wire)
    decoded = codec.next_event()
    assert decoded == HELLO and hello_digest(decoded) == hello_digest(HELLO)
    assert hello_digest(dataclasses.replace(HELLO, max_record=None)) != hello_digest(HELLO)
    moved = dataclasses.replace(LINEAGE, end_seq=8)
    assert hello_digest(dataclasses.replace(HELLO, lineage=moved)) != hello_digest(HELLO)


def test_unsealed_frame_and_oversized_record_are_refused_on_the_header() -> None:
    _, opener = pair()
    with pytest.raises(IntegrityError, match="where a sealed record belongs"):
        opener.feed(b"".join(bytes(b) for b in encode(Ack(10, 10, 0))))
    _, opener = pair()
    with pytest.raises(IntegrityError, match="announces"):
        opener.feed(struct.pack("<IB3xI", MAGIC, SEALED_TYPE, MAX_SEALED + 1))
    _, opener = pair()
    with pytest.raises(IntegrityError, match="announces"):
        opener.feed(struct.pack("<IB3xI", MAGIC, SEALED_TYPE, TAG_BYTES))
    # An IntegrityError is a ProtocolError: callers that end a session on one end it here too.
    assert issubclass(IntegrityError, ProtocolError)


def test_seal_refuses_empty_and_oversized_plaintext() -> None:
    sealer, _ = pair()
    with pytest.raises(ValueError):
        sealer.seal([b""])
    with pytest.raises(ValueError):
        sealer.seal([bytes(MAX_SEALED - TAG_BYTES + 1)])
    assert sealer.counter == 0


def test_a_sealed_records_frame_reaches_the_codec_whole() -> None:
    # A big frame sealed as one record, opened from 64 KiB reads, decodes as sent.
    sealer, opener = pair()
    frame = encode(Ack(5, 4, 3))
    wire = b"".join(bytes(b) for b in sealer.seal(frame))
    codec = LinkCodec()
    for i in range(0, len(wire), 7):
        for chunk in opener.feed(wire[i : i + 7]):
            codec.feed(chunk)
    assert codec.next_event() == Ack(5, 4, 3)


def test_keys_nonces_and_layout_are_as_documented() -> None:
    """docs/link-protocol.md, "Sealed sessions", computed without the module: HKDF-SHA256 by
    hand, the HELLO digest from its JSON, the nonce from the counter, the header as AAD."""
    import hashlib
    import hmac
    import json

    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    def hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
        prk = hmac.new(salt, ikm, hashlib.sha256).digest()
        return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()  # 32 bytes: one block

    fields = {
        "protocol": 2,
        "unit": "site-a",
        "volume": "vol",
        "volume_id": "j-1",
        "size": 1 << 30,
        "nonce": NONCE_A,
        "auth": "psk",
        "max_record": 1 << 20,
        "crypto": "chacha20-poly1305",
        "lineage": {
            "unit": "site-a",
            "role": "primary",
            "generations": [["0123456789abcdef" * 2, 1, "site-a"]],
            "end_seq": 7,
            "lost_tail": False,
            "end_stamp": 0,
        },
        "source": None,
    }
    digest = hashlib.sha256(
        json.dumps(fields, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode()
    ).digest()
    assert hello_digest(HELLO) == digest
    salt = bytes.fromhex(NONCE_A) + bytes.fromhex(NONCE_B)
    source = hkdf(PSK, salt, b"blockmirror-link-v1 source-to-secondary" + digest)
    secondary = hkdf(PSK, salt, b"blockmirror-link-v1 secondary-to-source" + digest)
    keys = derive_keys(PSK, NONCE_A, NONCE_B, HELLO)
    assert (keys.source, keys.secondary) == (source, secondary)

    sealer = Sealer(keys.source)
    sealer.seal([b"first"])
    header, body = (bytes(b) for b in sealer.seal([b"second"]))
    assert header == struct.pack("<IB3xI", MAGIC, 13, len(b"second") + 16)
    nonce = bytes(4) + (1).to_bytes(8, "little")  # the second record of this direction
    assert ChaCha20Poly1305(source).decrypt(nonce, body, header) == b"second"
