"""The journal's two checkpoint slots (docs/journal.md), as a pure codec plus two I/O helpers.

Checkpoints are written alternately to slot A (offset 0) and slot B (offset 4096), generation
``g`` going to slot ``g % 2``, so a torn write can only damage the slot being written and the
other one still holds the previous checkpoint. Recovery takes the valid slot with the highest
generation.

"Valid" means: magic, length and CRC are right. A slot that fails those checks is torn, empty
or garbage, and :func:`decode_slot` answers None, never raises. A slot that passes them but whose
body is not a format-1 checkpoint, or that sits in the wrong slot for its generation, was
written completely, by a newer version or a buggy writer: :class:`CheckpointError` is raised
instead, because falling back to the older slot could roll the journal back to a head whose
space has been reused since (the writer may overwrite freed space once the newer checkpoint is
durable).
"""

from __future__ import annotations

import json
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias

from crc32c import crc32c

from blockmirror.errors import JournalError
from blockmirror.journal.storage import as_store, write_durable
from blockmirror.state import ConsumerMode
from blockmirror.store.base import Store

__all__ = [
    "BODY_MAX",
    "FORMAT",
    "SLOT_MAGIC",
    "SLOT_SIZE",
    "Checkpoint",
    "CheckpointError",
    "ConsumerState",
    "VolumeIdentity",
    "choose",
    "decode_slot",
    "encode_slot",
    "new_journal_id",
    "read_checkpoint",
    "slot_offset",
    "write_checkpoint",
]

SLOT_SIZE: Final = 4096
SLOT_MAGIC: Final = b"BMJCKPT1"
FORMAT: Final = 1
# The doc's limit; 8 bytes of the slot stay unused, room for a future trailer.
BODY_MAX: Final = 4064

# magic, generation, body length, CRC of bytes 0..20 and the body.
_HEAD = struct.Struct("<8sQII")
_CRC_SPAN: Final = 20
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
assert _HEAD.size == 24 and _HEAD.size + BODY_MAX <= SLOT_SIZE


class CheckpointError(JournalError, ValueError):
    """A checkpoint cannot be encoded, or a complete slot holds something we must not ignore."""


def _check_u64(name: str, value: object) -> None:
    # bool is an int in Python but never a valid count or position here.
    if type(value) is not int or not 0 <= value <= _U64_MAX:
        raise CheckpointError(f"checkpoint field {name} must be a u64 integer: {value!r}")


def _check_bool(name: str, value: object) -> None:
    if type(value) is not bool:
        raise CheckpointError(f"checkpoint field {name} must be true or false: {value!r}")


@dataclass(frozen=True, slots=True)
class ConsumerState:
    """One consumer's cursor: the highest sequence number it acknowledged, and its mode.

    ``peer``: the unit name the peer gave in its WELCOME, once it has connected. The cursor
    belongs to that unit, not to the address it was reached at (a changed address finds it).
    """

    acked_seq: int
    mode: ConsumerMode = ConsumerMode.JOURNAL
    paused: bool = False
    peer: str | None = None

    def __post_init__(self) -> None:
        _check_u64("acked_seq", self.acked_seq)
        # Stored as its string value; whoever built this (a decoder, a test) gets the enum.
        try:
            mode = ConsumerMode(self.mode)
        except (ValueError, TypeError):
            raise CheckpointError(
                f"consumer mode must be 'journal' or 'tracking': {self.mode!r}"
            ) from None
        object.__setattr__(self, "mode", mode)
        _check_bool("paused", self.paused)
        if self.peer is not None and (not isinstance(self.peer, str) or not self.peer):
            raise CheckpointError(f"consumer peer must be a non-empty string: {self.peer!r}")


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """On a secondary: where the replica's data comes from and whether it is consistent.

    ``volume_id`` is the identity of the origin volume (a primary's journal id), carried along a
    chain unchanged. ``sync_lsn`` is the last resync frame applied durably; while a resync runs,
    ``consistent`` is false and ``sync_as_of`` is the source sequence number the replica must
    reach once the resync is done.
    """

    volume_id: str
    source_unit: str = ""
    consistent: bool = False
    sync_lsn: int = 0
    sync_as_of: int = 0
    sync_done: bool = False

    def to_doc(self) -> dict[str, Any]:
        return {
            "volume_id": self.volume_id,
            "source_unit": self.source_unit,
            "consistent": self.consistent,
            "sync_lsn": self.sync_lsn,
            "sync_as_of": self.sync_as_of,
            "sync_done": self.sync_done,
        }

    @classmethod
    def from_doc(cls, doc: object) -> ReplicaState:
        if not isinstance(doc, dict):
            raise CheckpointError("checkpoint replica is not a JSON object")
        _exact_keys("replica", doc, _REPLICA_KEYS)
        try:
            state = cls(**doc)
        except TypeError as exc:
            raise CheckpointError(f"checkpoint replica: {exc}") from None
        for name in ("sync_lsn", "sync_as_of"):
            _check_u64(name, getattr(state, name))
        for name in ("consistent", "sync_done"):
            _check_bool(name, getattr(state, name))
        if not isinstance(state.volume_id, str) or not isinstance(state.source_unit, str):
            raise CheckpointError("checkpoint replica: volume_id and source_unit are strings")
        return state


# At most this many fingerprint blocks fit a slot next to a few consumers (each entry is about 40
# bytes of JSON); the journal records fewer (identity.FINGERPRINT_BLOCKS).
FINGERPRINT_MAX: Final = 32
VolumeKind: TypeAlias = Literal["file", "block"]


@dataclass(frozen=True, slots=True)
class VolumeIdentity:
    """What the journal knows of the volume it belongs to (docs/journal.md, "Identity").

    ``kind``, ``dev`` and ``ino`` say which file it was (for a block device, ``dev`` is the
    device number and ``ino`` 0). ``blocks`` is the fingerprint: ``(offset, hash)`` of blocks the
    volume held when every record up to ``fp_seq`` was durably in it (BLAKE2b, 8 bytes, hex).
    """

    kind: VolumeKind
    dev: int
    ino: int
    fp_seq: int = 0
    blocks: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("file", "block"):
            raise CheckpointError(f"volume kind must be 'file' or 'block': {self.kind!r}")
        for name in ("dev", "ino", "fp_seq"):
            _check_u64(f"volume.{name}", getattr(self, name))
        if not isinstance(self.blocks, tuple) or len(self.blocks) > FINGERPRINT_MAX:
            raise CheckpointError(
                f"volume.blocks must be a tuple of at most {FINGERPRINT_MAX} entries"
            )
        for entry in self.blocks:
            if not isinstance(entry, tuple) or len(entry) != 2:
                raise CheckpointError(f"volume.blocks entry must be (offset, hash): {entry!r}")
            _check_u64("volume.blocks offset", entry[0])
            if not isinstance(entry[1], str) or not _is_hex(entry[1]) or len(entry[1]) > 128:
                raise CheckpointError(f"volume.blocks hash must be hex: {entry[1]!r}")

    def to_doc(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dev": self.dev,
            "ino": self.ino,
            "fp_seq": self.fp_seq,
            "blocks": [[offset, digest] for offset, digest in self.blocks],
        }

    @classmethod
    def from_doc(cls, doc: object) -> VolumeIdentity:
        if not isinstance(doc, dict):
            raise CheckpointError("checkpoint volume is not a JSON object")
        _exact_keys("volume", doc, _VOLUME_KEYS)
        raw = doc["blocks"]
        if not isinstance(raw, list) or not all(isinstance(e, list) and len(e) == 2 for e in raw):
            raise CheckpointError("checkpoint volume.blocks is not a list of [offset, hash]")
        return cls(
            kind=doc["kind"],
            dev=doc["dev"],
            ino=doc["ino"],
            fp_seq=doc["fp_seq"],
            blocks=tuple((e[0], e[1]) for e in raw),
        )


def _no_consumers() -> Mapping[str, ConsumerState]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """The body of a checkpoint slot; field meanings are in docs/journal.md.

    Instances validate their fields (types, ranges, 8-byte alignment of positions) and hold a
    read-only copy of ``consumers``, so a checkpoint cannot change after it was built.
    """

    format: int = FORMAT
    journal_id: str
    volume_size: int
    capacity: int
    head_lpos: int
    head_seq: int
    next_seq: int
    applied_seq: int
    boot_id: str
    clean: bool = False
    enqueue_paused: bool = False
    needs_full_resync: bool = False
    consumers: Mapping[str, ConsumerState] = field(default_factory=_no_consumers)
    replica: ReplicaState | None = None
    # The volume's identity, which peers bind their replicas to; it outlives a journal (a
    # resize keeps it). None in journals written before it existed: the journal_id stands in.
    volume_id: str | None = None
    # Which file the volume was and a fingerprint of its content (None: nothing recorded yet).
    volume: VolumeIdentity | None = None
    # The origin time (ns) of record next_seq - 1, which a link compares with a peer's record
    # of that number once the ring no longer holds it (None: not known).
    tail_stamp: int | None = None

    def __post_init__(self) -> None:
        if self.format != FORMAT or type(self.format) is not int:
            raise CheckpointError(f"unsupported checkpoint format {self.format!r}")
        if not isinstance(self.journal_id, str) or not _is_hex(self.journal_id):
            raise CheckpointError(f"journal_id must be a non-empty hex string: {self.journal_id!r}")
        for name in ("volume_size", "capacity", "head_lpos", "head_seq", "next_seq", "applied_seq"):
            _check_u64(name, getattr(self, name))
        if self.capacity == 0 or self.capacity % 8 or self.head_lpos % 8:
            raise CheckpointError(
                f"capacity ({self.capacity}) and head_lpos ({self.head_lpos}) must be multiples "
                "of 8, capacity not zero"
            )
        if self.volume_id is not None and (
            not isinstance(self.volume_id, str) or not _is_hex(self.volume_id)
        ):
            raise CheckpointError(f"volume_id must be a non-empty hex string: {self.volume_id!r}")
        if self.tail_stamp is not None:
            _check_u64("tail_stamp", self.tail_stamp)
        if self.volume is not None and not isinstance(self.volume, VolumeIdentity):
            raise CheckpointError(f"volume must be a VolumeIdentity: {self.volume!r}")
        if not isinstance(self.boot_id, str):
            raise CheckpointError(f"boot_id must be a string: {self.boot_id!r}")
        for name in ("clean", "enqueue_paused", "needs_full_resync"):
            _check_bool(name, getattr(self, name))
        if not isinstance(self.consumers, Mapping):
            raise CheckpointError(f"consumers must be a mapping: {self.consumers!r}")
        consumers = dict(self.consumers)
        for name, state in consumers.items():
            if not isinstance(name, str) or not name:
                raise CheckpointError(f"consumer names must be non-empty strings: {name!r}")
            if not isinstance(state, ConsumerState):
                raise CheckpointError(f"consumer {name!r}: not a ConsumerState: {state!r}")
        # A private copy behind a read-only view: the caller's dict may change, this may not.
        object.__setattr__(self, "consumers", MappingProxyType(consumers))

    def to_json(self) -> bytes:
        """The slot body: compact JSON with sorted keys, so equal checkpoints encode equally."""
        doc = {
            "format": self.format,
            "journal_id": self.journal_id,
            "volume_size": self.volume_size,
            "capacity": self.capacity,
            "head_lpos": self.head_lpos,
            "head_seq": self.head_seq,
            "next_seq": self.next_seq,
            "applied_seq": self.applied_seq,
            "boot_id": self.boot_id,
            "clean": self.clean,
            "enqueue_paused": self.enqueue_paused,
            "needs_full_resync": self.needs_full_resync,
            "consumers": {name: _consumer_doc(c) for name, c in self.consumers.items()},
        }
        if self.replica is not None:
            doc["replica"] = self.replica.to_doc()
        # Optional, and left out when unset: a checkpoint without them encodes as before.
        if self.volume_id is not None:
            doc["volume_id"] = self.volume_id
        if self.volume is not None:
            doc["volume"] = self.volume.to_doc()
        if self.tail_stamp is not None:
            doc["tail_stamp"] = self.tail_stamp
        # ASCII escapes keep any name encodable (lone surrogates included); ASCII is UTF-8.
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, body: bytes) -> Checkpoint:
        """Parse a slot body. Raises :class:`CheckpointError` for anything but a format-1 body."""
        try:
            doc = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"checkpoint body is not UTF-8 JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise CheckpointError("checkpoint body is not a JSON object")
        fmt = doc.get("format")
        if fmt != FORMAT or type(fmt) is not int:
            raise CheckpointError(
                f"unsupported checkpoint format {fmt!r} (this version reads {FORMAT})"
            )
        # "replica" is optional: only secondaries have one, and journals written before it existed
        # have none.
        replica = ReplicaState.from_doc(doc.pop("replica")) if "replica" in doc else None
        # Optional too (journals written before the volume's identity was recorded).
        volume_id = doc.pop("volume_id") if "volume_id" in doc else None
        volume = VolumeIdentity.from_doc(doc.pop("volume")) if "volume" in doc else None
        tail_stamp = doc.pop("tail_stamp") if "tail_stamp" in doc else None
        _exact_keys("checkpoint", doc, _BODY_KEYS)
        raw_consumers = doc["consumers"]
        if not isinstance(raw_consumers, dict):
            raise CheckpointError("checkpoint consumers is not a JSON object")
        consumers: dict[str, ConsumerState] = {}
        for name, raw in raw_consumers.items():
            if not isinstance(raw, dict):
                raise CheckpointError(f"consumer {name!r} is not a JSON object")
            # "peer" is optional: journals written before it was kept have none.
            _exact_keys(f"consumer {name!r}", raw, _CONSUMER_KEYS | ({"peer"} & raw.keys()))
            consumers[name] = ConsumerState(
                raw["acked_seq"], raw["mode"], raw["paused"], raw.get("peer")
            )
        scalars: dict[str, Any] = {k: doc[k] for k in _BODY_KEYS if k != "consumers"}
        return cls(
            **scalars,
            consumers=consumers,
            replica=replica,
            volume_id=volume_id,
            volume=volume,
            tail_stamp=tail_stamp,
        )


_OPTIONAL_KEYS: Final = frozenset({"replica", "volume_id", "volume", "tail_stamp"})
_BODY_KEYS: Final = frozenset(f.name for f in fields(Checkpoint)) - _OPTIONAL_KEYS
_VOLUME_KEYS: Final = frozenset(f.name for f in fields(VolumeIdentity))
_REPLICA_KEYS: Final = frozenset(f.name for f in fields(ReplicaState))
_CONSUMER_KEYS: Final = frozenset({"acked_seq", "mode", "paused"})
_HEX: Final = frozenset("0123456789abcdef")


def _is_hex(text: str) -> bool:
    return bool(text) and set(text) <= _HEX


def _consumer_doc(c: ConsumerState) -> dict[str, Any]:
    doc: dict[str, Any] = {"acked_seq": c.acked_seq, "mode": c.mode.value, "paused": c.paused}
    if c.peer is not None:
        # Left out when unset: a consumer that never connected encodes as before.
        doc["peer"] = c.peer
    return doc


def _exact_keys(what: str, doc: dict[str, Any], keys: frozenset[str]) -> None:
    # Unknown keys mean a newer writer: refusing is safer than dropping what it meant.
    missing = keys - doc.keys()
    extra = doc.keys() - keys
    if missing or extra:
        raise CheckpointError(
            f"{what}: missing fields {sorted(missing)}, unknown fields {sorted(extra)}"
        )


def new_journal_id() -> str:
    """A fresh random journal identity (128 bits, lowercase hex)."""
    return secrets.token_hex(16)


def slot_offset(index: int) -> int:
    """File offset of checkpoint slot ``index`` (0 is slot A, 1 is slot B)."""
    if index not in (0, 1):
        raise ValueError(f"checkpoint slot index must be 0 or 1, not {index!r}")
    return index * SLOT_SIZE


def encode_slot(cp: Checkpoint, generation: int) -> bytes:
    """The 4096 bytes of a slot holding ``cp`` as generation ``generation``, zero padded.

    Raises :class:`CheckpointError` when the body exceeds :data:`BODY_MAX` bytes (too many
    consumers, or names too long) and :class:`ValueError` for a generation outside u64.
    """
    if type(generation) is not int or not 0 <= generation <= _U64_MAX:
        raise ValueError(f"checkpoint generation must be in 0..2**64-1: {generation!r}")
    body = cp.to_json()
    if len(body) > BODY_MAX:
        raise CheckpointError(
            f"checkpoint body is {len(body)} bytes, more than the {BODY_MAX} a slot holds "
            f"({len(cp.consumers)} consumers): use fewer consumers or shorter names"
        )
    head = _HEAD.pack(SLOT_MAGIC, generation, len(body), 0)
    crc = crc32c(body, crc32c(head[:_CRC_SPAN]))
    slot = bytearray(SLOT_SIZE)
    _HEAD.pack_into(slot, 0, SLOT_MAGIC, generation, len(body), crc)
    slot[_HEAD.size : _HEAD.size + len(body)] = body
    return bytes(slot)


def decode_slot(raw: bytes) -> tuple[int, Checkpoint] | None:
    """``(generation, checkpoint)`` of a complete slot; None for a torn, empty or garbage one.

    Raises :class:`CheckpointError` only when magic, length and CRC are right but the body is
    not a format-1 checkpoint (see the module docstring for why that is not "invalid").
    """
    if len(raw) != SLOT_SIZE:
        return None
    magic, generation, length, stored = _HEAD.unpack_from(raw)
    if magic != SLOT_MAGIC or length > BODY_MAX:
        return None
    body = bytes(raw[_HEAD.size : _HEAD.size + length])
    if crc32c(body, crc32c(raw[:_CRC_SPAN])) != stored:
        return None
    return generation, Checkpoint.from_json(body)


def choose(slot_a: bytes, slot_b: bytes) -> tuple[int, int, Checkpoint] | None:
    """``(slot index, generation, checkpoint)`` of the newest valid slot, or None if neither is.

    Raises :class:`CheckpointError` when a complete slot holds a generation of the other slot's
    parity, or both hold the same generation: only a buggy writer produces either.
    """
    found: list[tuple[int, int, Checkpoint]] = []
    for index, raw in enumerate((slot_a, slot_b)):
        decoded = decode_slot(raw)
        if decoded is None:
            continue
        generation, cp = decoded
        if generation % 2 != index:
            raise CheckpointError(
                f"checkpoint slot {'AB'[index]} holds generation {generation}, "
                f"which belongs in slot {'AB'[generation % 2]}"
            )
        found.append((index, generation, cp))
    if not found:
        return None
    return max(found, key=lambda f: f[1])


def read_checkpoint(file: Store | int) -> tuple[int, int, Checkpoint] | None:
    """Read both slots of the journal ``file`` and :func:`choose` between them.

    ``file``: the journal file as a store, or a descriptor of it. Blocking I/O: an asyncio
    caller runs it in a thread (``asyncio.to_thread``).
    """
    raw = as_store(file).pread(0, 2 * SLOT_SIZE)
    return choose(raw[:SLOT_SIZE], raw[SLOT_SIZE:])


def write_checkpoint(file: Store | int, cp: Checkpoint, generation: int) -> None:
    """Write ``cp`` as ``generation`` to slot ``generation % 2`` and make that slot durable.

    Returns once the checkpoint is durable; only then may the caller rely on it (reuse the
    space it frees, say). Blocking I/O: an asyncio caller runs it in a thread, and never two at
    once for the same journal (generations must reach the disk in order).
    """
    # A durable write of just this slot where the store can (storage.write_durable).
    write_durable(as_store(file), slot_offset(generation % 2), encode_slot(cp, generation))
