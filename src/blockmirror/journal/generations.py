"""A volume's live role and its history of generations, kept in ``STATE_DIR/VOLUME.role``.

A generation is a stretch of a volume's history with one primary: it has an id, the sequence
number of its first record, the unit that began it and when. A new volume's primary begins the
first; a promote begins the next (issue 9). Links compare these histories to tell "resume" from
"follow a descendant" from a split brain, so the file is written atomically and durably (a new
file, fsynced, renamed over the old, the directory fsynced) and checked by a CRC when read.

The codec (:func:`encode`, :func:`decode`) is sans-I/O; :func:`load` and :func:`store` are the two
blocking I/O helpers (run them in a thread on the event loop).

The file, UTF-8 JSON: ``{"format": 1, "volume": NAME, "role": "primary" | "secondary" |
"demoted", "generations": [{"id", "start_seq", "unit", "time_ns", "reason"}, ...],
"crc32c": N}`` where ``crc32c`` covers the same document without that key, encoded with sorted
keys and no spaces.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from crc32c import crc32c

from blockmirror.errors import JournalError
from blockmirror.io.fileio import pwritev_all, sync_directory
from blockmirror.state import Role

__all__ = [
    "FORMAT",
    "MAX_GENERATIONS",
    "Generation",
    "GenerationsError",
    "VolumeHistory",
    "decode",
    "encode",
    "load",
    "load_or_create",
    "new_generation",
    "store",
]

FORMAT: Final = 1
# Every promote adds one; a history longer than this is not a real volume's (and would let a
# damaged or hostile file make us hold anything).
MAX_GENERATIONS: Final = 4096
MAX_FILE: Final = 1024 * 1024
log = logging.getLogger(__name__)
# "received": learned from a source (its time is not carried on the link, so it reads 0).
_REASONS: Final = frozenset({"created", "promote", "forced-promote", "unproven-start", "received"})


class GenerationsError(JournalError):
    """The role file is damaged or not one of ours; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Generation:
    """One stretch of history with one primary."""

    id: str  # 32 lowercase hex characters
    start_seq: int  # the sequence number of its first record
    unit: str  # the unit that began it
    time_ns: int  # when, nanoseconds since the Unix epoch
    reason: str  # created, promote, forced-promote, unproven-start, received

    def to_doc(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "start_seq": self.start_seq,
            "unit": self.unit,
            "time_ns": self.time_ns,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class VolumeHistory:
    """What the role file holds: the volume's live role and its generations, oldest first."""

    volume: str
    role: Role
    generations: tuple[Generation, ...] = ()

    @property
    def current(self) -> Generation | None:
        return self.generations[-1] if self.generations else None

    def begin(self, generation: Generation) -> VolumeHistory:
        """This history with ``generation`` begun (it must start at or after the current one)."""
        current = self.current
        if current is not None and generation.start_seq < current.start_seq:
            raise GenerationsError(
                f"generation {generation.id} would start at seq {generation.start_seq}, before "
                f"the current one ({current.id} at {current.start_seq})"
            )
        if len(self.generations) >= MAX_GENERATIONS:
            raise GenerationsError(f"volume {self.volume} has {MAX_GENERATIONS} generations")
        return VolumeHistory(self.volume, self.role, (*self.generations, generation))

    def status(self) -> dict[str, Any]:
        current = self.current
        return {
            "generation": current.id if current is not None else None,
            "generations": [g.to_doc() for g in self.generations],
        }


def new_generation(*, start_seq: int, unit: str, reason: str) -> Generation:
    """A new generation beginning now at ``start_seq``."""
    return Generation(secrets.token_hex(16), start_seq, unit, time.time_ns(), reason)


def _body(history: VolumeHistory) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "volume": history.volume,
        "role": history.role.value,
        "generations": [g.to_doc() for g in history.generations],
    }


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def encode(history: VolumeHistory) -> bytes:
    """The file's bytes for ``history``."""
    body = _body(history)
    return _canonical({**body, "crc32c": crc32c(_canonical(body))}) + b"\n"


def _field(doc: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise GenerationsError(f"{what}: {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _generation(raw: object, index: int) -> Generation:
    what = f"generation {index}"
    if not isinstance(raw, dict) or set(raw) != {"id", "start_seq", "unit", "time_ns", "reason"}:
        raise GenerationsError(f"{what} is not an object with id, start_seq, unit, time_ns, reason")
    gid = _field(raw, "id", str, what)
    if len(gid) != 32 or any(c not in "0123456789abcdef" for c in gid):
        raise GenerationsError(f"{what}: id {gid!r} is not 32 lowercase hex characters")
    start = _field(raw, "start_seq", int, what)
    stamp = _field(raw, "time_ns", int, what)
    if not 1 <= start < 2**64 or not 0 <= stamp < 2**64:
        raise GenerationsError(f"{what}: start_seq or time_ns out of range")
    unit = _field(raw, "unit", str, what)
    reason = _field(raw, "reason", str, what)
    if not unit or reason not in _REASONS:
        raise GenerationsError(f"{what}: unit {unit!r} or reason {reason!r} is not valid")
    return Generation(gid, start, unit, stamp, reason)


def decode(data: bytes) -> VolumeHistory:
    """The history in ``data``; :class:`GenerationsError` saying why it is not one."""
    if len(data) > MAX_FILE:
        raise GenerationsError(f"role file of {len(data)} bytes, at most {MAX_FILE}")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise GenerationsError(f"role file is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise GenerationsError("role file is not a JSON object")
    keys = {"format", "volume", "role", "generations", "crc32c"}
    if set(doc) != keys:
        raise GenerationsError(f"role file has keys {sorted(doc)}, expected {sorted(keys)}")
    stored = doc.pop("crc32c")
    if not isinstance(stored, int) or stored != crc32c(_canonical(doc)):
        raise GenerationsError("role file's crc32c does not match its content (damaged)")
    if _canonical({**doc, "crc32c": stored}) + b"\n" != data:
        # The checksum covers the canonical encoding; JSON has other spellings of the same
        # content (an escape's hex digits in either case, say). Only ours is accepted, so
        # that no changed byte goes unseen.
        raise GenerationsError("role file is not in its canonical encoding (damaged)")
    if doc["format"] != FORMAT:
        raise GenerationsError(f"role file format {doc['format']!r}, this version reads {FORMAT}")
    volume = _field(doc, "volume", str, "role file")
    try:
        role = Role(doc["role"])
    except ValueError:
        raise GenerationsError(f"role file: unknown role {doc['role']!r}") from None
    raw = _field(doc, "generations", list, "role file")
    if len(raw) > MAX_GENERATIONS:
        raise GenerationsError(f"role file lists {len(raw)} generations, at most {MAX_GENERATIONS}")
    generations = tuple(_generation(g, i) for i, g in enumerate(raw))
    for before, after in itertools.pairwise(generations):
        if after.start_seq < before.start_seq:
            raise GenerationsError(f"generation {after.id} starts before {before.id}")
    if len({g.id for g in generations}) != len(generations):
        raise GenerationsError("role file lists a generation twice")
    return VolumeHistory(volume, role, generations)


def load(path: Path) -> VolumeHistory | None:
    """The history in ``path``, or None when there is no such file (blocking)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise GenerationsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return decode(data)
    except GenerationsError as exc:
        raise GenerationsError(f"{path}: {exc}") from None


def store(path: Path, history: VolumeHistory) -> None:
    """Replace ``path`` with ``history`` atomically and durably (blocking)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        pwritev_all(fd, [encode(history)], 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    sync_directory(path.parent)


def load_or_create(
    path: Path, *, volume: str, configured: Role, unit: str, next_seq: int
) -> VolumeHistory:
    """The volume's live role and generations; for a new volume (no file yet) its
    ``configured`` role and, on a primary, the first generation, beginning at ``next_seq``,
    written before it is returned (blocking)."""
    history = load(path)
    if history is not None:
        if history.volume != volume:
            raise GenerationsError(f"{path} belongs to volume {history.volume!r}, not {volume!r}")
        if history.role is not configured:
            log.info(
                "volume %s: live role %s (the configuration's %s is only where a new volume "
                "starts)",
                volume,
                history.role,
                configured,
            )
        return history
    history = VolumeHistory(volume, configured)
    if configured is Role.PRIMARY:
        history = history.begin(new_generation(start_seq=next_seq, unit=unit, reason="created"))
    store(path, history)
    return history
