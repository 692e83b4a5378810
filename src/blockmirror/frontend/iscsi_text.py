"""iSCSI text: the key=value pairs of Login and Text PDUs, and the value encodings (RFC 7143 6.1).

The data segment of a Login or Text PDU is a run of ``key=value`` strings, each ended by a NUL
byte, in UTF-8. Key names are one capital letter then up to 62 of letters, digits and
``. - + @ _`` (and ``#`` for the ``X#`` extension keys); a value is at most 255 bytes unless its
key is a large binary one (the CHAP challenge and response). A key may appear once per text:
a repeated key is a protocol error. Values are decoded by kind here too: numbers (decimal or
``0x`` hex), booleans (``Yes``/``No``), binary (``0x`` hex or ``0b`` base64), lists (commas).

Which keys exist and how each is negotiated is :mod:`iscsi_keys`; the SendTargets exchange of
full feature phase is :mod:`iscsi_discovery`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable

from blockmirror.errors import IscsiPduError
from blockmirror.frontend.iscsi_pdu import RejectReason

Pairs = list[tuple[str, str]]

MAX_KEY = 63
MAX_VALUE = 255
# Large binary values: CHAP_C and CHAP_R of up to 1024 bytes, as 0x hex (2 + 2048 characters).
MAX_LARGE_VALUE = 2 + 2 * 1024
LARGE_VALUE_KEYS = frozenset({"CHAP_C", "CHAP_R"})
_KEY = re.compile(r"[A-Z][A-Za-z0-9.+@_#-]{0,62}")
_DECIMAL = re.compile(r"[0-9]+")
_HEX = re.compile(r"0[xX][0-9a-fA-F]+")

# The reserved answers (section 6.2): an originator never offers them.
NOT_UNDERSTOOD = "NotUnderstood"
IRRELEVANT = "Irrelevant"
REJECT = "Reject"
RESERVED_ANSWERS = frozenset({NOT_UNDERSTOOD, IRRELEVANT, REJECT})
YES = "Yes"
NO = "No"


class TextError(IscsiPduError):
    """Malformed text. In a Login it fails the login (initiator error); in a Text Request it is
    answered with a Reject (protocol error)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reject_reason=RejectReason.PROTOCOL_ERROR)


def max_value_length(key: str) -> int:
    return MAX_LARGE_VALUE if key in LARGE_VALUE_KEYS else MAX_VALUE


def decode_text(data: bytes, *, unique: bool = True) -> Pairs:
    """The pairs of a whole text (the data of one PDU, or of a run joined by the C bit).

    Empty strings between NULs are skipped (some initiators pad with NULs); a text that does
    not end with a NUL, a pair without ``=``, a bad key name, an overlong value, a value that
    is not UTF-8 or (with ``unique``) a key given twice raise :class:`TextError`. Only a
    SendTargets answer repeats keys: read one with ``unique=False``.
    """
    if not data:
        return []
    if not data.endswith(b"\0"):
        raise TextError("text does not end with a NUL")
    pairs: Pairs = []
    seen: set[str] = set()
    for raw in data[:-1].split(b"\0"):
        if not raw:
            continue
        key_raw, sep, value_raw = raw.partition(b"=")
        if not sep:
            raise TextError(f"no '=' in {raw[:64]!r}")
        try:
            key, value = key_raw.decode("utf-8"), value_raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TextError(f"text is not UTF-8: {raw[:64]!r}") from exc
        if not _KEY.fullmatch(key):
            raise TextError(f"bad key name {key[:64]!r}")
        if len(value_raw) > max_value_length(key):
            raise TextError(f"{key}: value of {len(value_raw)} bytes is too long")
        if unique and key in seen:
            raise TextError(f"{key} given twice")
        seen.add(key)
        pairs.append((key, value))
    return pairs


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """``key=value`` NUL-terminated, in order. Raises ValueError for what decode refuses (but
    a repeated key: a SendTargets answer repeats TargetName and TargetAddress)."""
    out = bytearray()
    for key, value in pairs:
        raw = value.encode("utf-8")
        if not _KEY.fullmatch(key) or "\0" in value or len(raw) > max_value_length(key):
            raise ValueError(f"cannot encode {key[:64]!r}={value[:64]!r}")
        out += key.encode() + b"=" + raw + b"\0"
    return bytes(out)


# --- values -------------------------------------------------------------------------------


def parse_number(value: str) -> int | None:
    """A numerical value (decimal, or hex with 0x), or None when it is not one."""
    if _DECIMAL.fullmatch(value):
        return int(value)
    if _HEX.fullmatch(value):
        return int(value[2:], 16)
    return None


def parse_boolean(value: str) -> bool | None:
    return {YES: True, NO: False}.get(value)


def format_boolean(value: bool) -> str:
    return YES if value else NO


def parse_list(value: str) -> list[str]:
    """The values of a list offer, in the originator's order of preference."""
    return value.split(",")


def parse_binary(value: str) -> bytes | None:
    """A binary value: ``0x`` hex (an odd digit count has a leading zero nibble implied) or
    ``0b`` base64; None when it is neither or has no digits."""
    prefix, digits = value[:2], value[2:]
    if not digits:
        return None
    if prefix in ("0x", "0X"):
        if len(digits) % 2:
            digits = "0" + digits
        try:
            return bytes.fromhex(digits)
        except ValueError:
            return None
    if prefix in ("0b", "0B"):
        try:
            return base64.b64decode(digits, validate=True)
        except (binascii.Error, ValueError):
            return None
    return None


def format_binary(data: bytes) -> str:
    """Binary as ``0x`` lower-case hex, the encoding every initiator reads."""
    return "0x" + data.hex()
