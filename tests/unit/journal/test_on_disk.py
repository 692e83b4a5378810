"""The whole journal file against docs/journal.md, byte for byte, in both directions.

The codec tests pin one header and one slot. These pin the file: a journal built here by hand
(``struct``, ``crc32c`` and ``json``, none of the project's encoders), laid out as the doc says
and as a journal of an earlier version would be (no ``volume_id``, no origins), must open, with
its records found where they were put and replayed into the volume. And a journal the current
code writes must be exactly the bytes the doc's layout gives, so that the format cannot change
without this failing.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from crc32c import crc32c

from blockmirror.journal.checkpoint import read_checkpoint
from blockmirror.journal.format import Kind
from blockmirror.journal.journal import Journal
from blockmirror.journal.ring import Ring
from blockmirror.journal.scan import scan
from blockmirror.journal.storage import JournalFile
from blockmirror.state import ConsumerMode
from blockmirror.store.volume import Volume

SLOT = 4096
DATA = 8192  # two slots, then the ring
CAPACITY = 64 * 1024
JOURNAL_SIZE = DATA + CAPACITY
VOLUME = 1024 * 1024
HEADER = struct.Struct("<IHHQQQQQIII")  # bytes 0..60 of a record header; the CRC follows
MAGIC = 0x524A4D42


def record(
    kind: int,
    seq: int,
    *,
    ts: int = 0,
    offset: int = 0,
    length: int = 0,
    durable: int = 0,
    payload: bytes = b"",
    payload_len: int | None = None,
    origin: int = 0,
) -> bytes:
    """A record as docs/journal.md lays it out: header, payload, zeros to a multiple of 8."""
    n = len(payload) if payload_len is None else payload_len
    body = HEADER.pack(MAGIC, 1, kind, seq, ts, offset, length, durable, n, origin, 0)
    crc = crc32c(payload, crc32c(body)) if kind != 5 else crc32c(body)
    raw = body + struct.pack("<I", crc) + payload
    return raw + bytes(-len(raw) % 8)


def slot(generation: int, doc: dict[str, object]) -> bytes:
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii")
    head = b"BMJCKPT1" + struct.pack("<QI", generation, len(body))
    crc = crc32c(body, crc32c(head))
    return (head + struct.pack("<I", crc) + body).ljust(SLOT, b"\0")


def checkpoint_doc(**fields: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "format": 1,
        "journal_id": "0123456789abcdef0123456789abcdef",
        "volume_size": VOLUME,
        "capacity": CAPACITY,
        "head_lpos": 0,
        "head_seq": 1,
        "next_seq": 1,
        "applied_seq": 0,
        "boot_id": "some-earlier-boot",
        "clean": True,
        "enqueue_paused": False,
        "needs_full_resync": False,
        "consumers": {},
    }
    doc.update(fields)
    return doc


def open_journal(tmp_path: Path, volume: Volume, consumers: list[str]) -> Journal:
    return Journal.open(
        tmp_path / "vol.journal",
        volume=volume,
        journal_size=JOURNAL_SIZE,
        consumers=consumers,
        dirty_dir=tmp_path,
        volume_name="vol",
    )


def test_a_journal_laid_out_by_hand_opens_and_replays(tmp_path: Path) -> None:
    # A journal of an earlier version: no volume_id, no volume identity, records without
    # origins; the live log starts 200 bytes before the ring's end, so it wraps with a padding.
    head = CAPACITY - 200
    flush = record(Kind.FLUSH, 1, ts=111, durable=0)
    # A padding record is its header alone: its payload (the rest of the ring) is not written.
    padding = record(Kind.PADDING, 2, payload_len=200 - len(flush) - 64)
    write = record(Kind.WRITE, 2, ts=222, offset=8192, length=4096, payload=b"\xab" * 4096)
    zero = record(Kind.ZERO, 3, ts=333, offset=4096, length=4096, durable=2)
    trim = record(Kind.TRIM, 4, ts=444, offset=0, length=4096, durable=2)
    image = bytearray(JOURNAL_SIZE)
    doc = checkpoint_doc(
        head_lpos=head,
        head_seq=1,
        next_seq=3,
        applied_seq=0,
        consumers={"peer": {"acked_seq": 0, "mode": "journal", "paused": True}},
    )
    image[SLOT : 2 * SLOT] = slot(7, doc)
    image[DATA + head : DATA + head + len(flush) + len(padding)] = flush + padding
    ring = write + zero + trim
    image[DATA : DATA + len(ring)] = ring
    (tmp_path / "vol.journal").write_bytes(bytes(image))
    with JournalFile.open_existing(tmp_path / "vol.journal", read_only=True) as file:
        found = read_checkpoint(file)
        assert found is not None and found[:2] == (1, 7)  # generation 7 lives in slot B
        cp = found[2]
        assert cp.volume_id is None and cp.volume is None
        assert cp.consumers["peer"].mode == ConsumerMode.JOURNAL
        result = scan(file, Ring(CAPACITY), cp.head_lpos, cp.head_seq, cp.next_seq)
    assert result.stop is None or not result.stop.torn
    assert not result.corrupt and (result.next_seq, result.tail_lpos) == (5, CAPACITY + len(ring))
    assert [(r.seq, r.kind, r.lpos, r.size, r.timestamp_ns) for r in result.records] == [
        (1, Kind.FLUSH, head, 64, 111),
        (2, Kind.WRITE, CAPACITY, 64 + 4096, 222),
        (3, Kind.ZERO, CAPACITY + 64 + 4096, 64, 333),
        (4, Kind.TRIM, CAPACITY + 2 * 64 + 4096, 64, 444),
    ]
    assert all(r.origin == 0 and not r.data for r in result.records)

    with Volume.open(tmp_path / "vol.img", size=VOLUME) as volume:
        volume.pwrite(0, b"\x11" * 3 * 4096)
        journal = open_journal(tmp_path, volume, ["peer"])
        try:
            assert journal.next_seq == 5 and journal.generation == 8
            # Without a volume_id the journal's own id is the volume's identity.
            assert journal.volume_id == "0123456789abcdef0123456789abcdef"
            assert journal.recovery is not None
            assert (journal.recovery.records, journal.recovery.replayed) == (4, 4)
            assert volume.pread(8192, 4096) == b"\xab" * 4096
            assert volume.pread(4096, 4096) == bytes(4096)
            assert volume.pread(0, 4096) in (bytes(4096), b"\x11" * 4096)  # trimmed
            # The consumer's map file is missing: it resyncs everything.
            peer = journal.consumers["peer"]
            assert peer.mode == ConsumerMode.TRACKING and peer.dirty.dirty_bytes() == VOLUME
        finally:
            journal.close()


def test_a_journal_written_now_is_the_documented_layout(tmp_path: Path) -> None:
    with Volume.open(tmp_path / "vol.img", size=VOLUME) as volume:
        journal = open_journal(tmp_path, volume, [])
        journal.origin = 0x01020304
        journal.stage(Kind.WRITE, 12288, 4096, [b"\x5a" * 1000, b"\x5b" * 3096], timestamp_ns=9)
        journal.stage(Kind.ZERO, 0, 8192, timestamp_ns=10, origin=77)
        journal.stage(Kind.FLUSH, 0, 0, timestamp_ns=11)
        journal.write_batch()
        journal.durable_seq = journal.sync()
        generation_before = journal.generation
        journal_id, volume_id = journal.journal_id, journal.volume_id
        journal.close(clean=True)
    image = (tmp_path / "vol.journal").read_bytes()
    assert len(image) == JOURNAL_SIZE
    payload = b"\x5a" * 1000 + b"\x5b" * 3096
    expected_ring = (
        record(Kind.WRITE, 1, ts=9, offset=12288, length=4096, payload=payload, origin=0x01020304)
        + record(Kind.ZERO, 2, ts=10, offset=0, length=8192, origin=77)
        + record(Kind.FLUSH, 3, ts=11, origin=0x01020304)
    )
    assert image[DATA : DATA + len(expected_ring)] == expected_ring
    assert image[DATA + len(expected_ring) :] == bytes(CAPACITY - len(expected_ring))
    # The final checkpoint: the generation after the last one, in its slot, every field the doc
    # lists, the records freed (the volume holds them), numbering going on at 4.
    generation = generation_before + 1
    raw = image[(generation % 2) * SLOT :][:SLOT]
    magic, gen, length, crc = struct.unpack_from("<8sQII", raw)
    assert (magic, gen) == (b"BMJCKPT1", generation)
    body = raw[24 : 24 + length]
    assert crc == crc32c(body, crc32c(raw[:20]))
    assert raw[24 + length :] == bytes(SLOT - 24 - length)
    doc = json.loads(body)
    assert body == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii")
    assert sorted(doc) == sorted([*checkpoint_doc(), "volume_id", "volume", "tail_stamp"])
    assert type(doc["tail_stamp"]) is int and doc["tail_stamp"] > 0  # record next_seq - 1's time
    assert doc["journal_id"] == journal_id and doc["volume_id"] == volume_id
    assert (doc["capacity"], doc["volume_size"], doc["clean"]) == (CAPACITY, VOLUME, True)
    assert (doc["head_lpos"], doc["head_seq"], doc["next_seq"], doc["applied_seq"]) == (
        len(expected_ring),
        4,
        4,
        3,
    )
    assert sorted(doc["volume"]) == ["blocks", "dev", "fp_seq", "ino", "kind"]
    assert doc["volume"]["kind"] == "file" and doc["volume"]["fp_seq"] == 3
