"""The claim of a generation's chain (``g{gen}/claim``): which unit writes it, sans-I/O.

One generation has one primary, so one writer: the first uploader puts the claim (only if
absent), and every later one reads it back and stops unless it is its own. The document is
small UTF-8 JSON with sorted keys, so the same claim is the same bytes, and an operator can
read it with any tool.

Decoding is bounded and strict, since the object comes from a store anyone with the bucket's
credentials can write: at most :data:`MAX_CLAIM` bytes, exactly the known keys, each of its
type, no duplicate keys, no NaN, and nesting errors reported as the format error they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from blockmirror.archive.keys import U64_MAX, ArchiveFormatError, check_generation

__all__ = [
    "CLAIM_FORMAT",
    "MAX_CLAIM",
    "PROBE_KEY",
    "VOLUME_CLAIM_KEY",
    "Claim",
    "VolumeClaim",
    "decode_claim",
    "decode_volume_claim",
    "encode_claim",
    "encode_volume_claim",
]

CLAIM_FORMAT: Final = 1
MAX_CLAIM: Final = 64 * 1024
_STRINGS: Final = ("volume", "generation", "unit", "writer")
_KEYS: Final = frozenset({"format", "created_ns", *_STRINGS})


@dataclass(frozen=True, slots=True)
class Claim:
    """``writer`` tells two processes of one unit apart (a restarted unit is the same unit,
    a copied state directory is not); ``created_ns`` is when the claim was made."""

    volume: str
    generation: str
    unit: str
    writer: str
    created_ns: int

    def __post_init__(self) -> None:
        for name in _STRINGS:
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ArchiveFormatError(f"claim {name} must be a non-empty string")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                # JSON's \ud800 escapes decode to strings no UTF-8 document can hold.
                raise ArchiveFormatError(f"claim {name} is not valid Unicode") from None
        check_generation(self.generation)
        if not isinstance(self.created_ns, int) or isinstance(self.created_ns, bool):
            raise ArchiveFormatError("claim created_ns must be an integer")
        if not 0 <= self.created_ns <= U64_MAX:
            raise ArchiveFormatError(f"claim created_ns {self.created_ns} is outside u64")


def encode_claim(c: Claim) -> bytes:
    doc = {
        "format": CLAIM_FORMAT,
        "volume": c.volume,
        "generation": c.generation,
        "unit": c.unit,
        "writer": c.writer,
        "created_ns": c.created_ns,
    }
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ArchiveFormatError(f"claim key {key!r} appears twice")
        doc[key] = value
    return doc


def _no_constant(name: str) -> Any:
    raise ArchiveFormatError(f"claim holds {name}, which is not JSON")


def decode_claim(b: bytes | memoryview) -> Claim:
    if len(b) > MAX_CLAIM:
        raise ArchiveFormatError(f"claim of {len(b)} bytes, at most {MAX_CLAIM}")
    try:
        text = bytes(b).decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ArchiveFormatError("claim is not UTF-8") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ArchiveFormatError(f"claim is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ArchiveFormatError("claim is not a JSON object")
    if doc.keys() != _KEYS:
        missing = sorted(_KEYS - doc.keys())
        extra = sorted(doc.keys() - _KEYS)
        raise ArchiveFormatError(f"claim keys: missing {missing}, unknown {extra}")
    if type(doc["format"]) is not int or doc["format"] != CLAIM_FORMAT:
        raise ArchiveFormatError(f"claim format {doc['format']!r}, expected {CLAIM_FORMAT}")
    return Claim(
        volume=doc["volume"],
        generation=doc["generation"],
        unit=doc["unit"],
        writer=doc["writer"],
        created_ns=doc["created_ns"],
    )


# --- the volume's claim -------------------------------------------------------------------------

# At the volume root: which volume (by its identity, the same on every replica) this name holds,
# so two different volumes that share a name never share a root.
VOLUME_CLAIM_KEY: Final = "volume"
# At the volume root, overwritten at will: a put that shows the store takes writes.
PROBE_KEY: Final = "probe"
_VOLUME_KEYS: Final = frozenset({"format", "volume", "volume_id", "unit", "created_ns"})


@dataclass(frozen=True, slots=True)
class VolumeClaim:
    """The volume a root belongs to; ``unit`` made the claim (for the operator's eyes only)."""

    volume: str
    volume_id: str
    unit: str
    created_ns: int

    def __post_init__(self) -> None:
        for name in ("volume", "volume_id", "unit"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ArchiveFormatError(f"volume claim {name} must be a non-empty string")
        if type(self.created_ns) is not int or not 0 <= self.created_ns <= U64_MAX:
            raise ArchiveFormatError("volume claim created_ns must be a u64")


def encode_volume_claim(c: VolumeClaim) -> bytes:
    doc = {
        "format": CLAIM_FORMAT,
        "volume": c.volume,
        "volume_id": c.volume_id,
        "unit": c.unit,
        "created_ns": c.created_ns,
    }
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def decode_volume_claim(b: bytes | memoryview) -> VolumeClaim:
    if len(b) > MAX_CLAIM:
        raise ArchiveFormatError(f"volume claim of {len(b)} bytes, at most {MAX_CLAIM}")
    try:
        doc = json.loads(
            bytes(b).decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except UnicodeDecodeError:
        raise ArchiveFormatError("volume claim is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise ArchiveFormatError(f"volume claim is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.keys() != _VOLUME_KEYS:
        raise ArchiveFormatError(f"volume claim keys must be {sorted(_VOLUME_KEYS)}")
    if type(doc["format"]) is not int or doc["format"] != CLAIM_FORMAT:
        raise ArchiveFormatError(f"volume claim format {doc['format']!r}, expected {CLAIM_FORMAT}")
    return VolumeClaim(doc["volume"], doc["volume_id"], doc["unit"], doc["created_ns"])
