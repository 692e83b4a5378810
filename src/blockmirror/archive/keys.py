"""The names of a volume's archive objects, relative to its volume root (sans-I/O).

Everything of one volume lives under a root the caller chooses; below it, one directory per
generation (32 lowercase hex digits)::

    g{gen}/claim                                            the writer's claim (JSON)
    g{gen}/seg/{first}-{last}-{last_ts}.seg                 records first..last
    g{gen}/base/{end}-{start}-{end_ts}.manifest             a base: exact at end after start+1..end
    g{gen}/data/{base_end}-{n}.chunks                       data object n of a base
    g{gen}/bookmark/{seq}-{ts}-{quoted name}                a bookmark

Numbers are zero-padded to 20 decimal digits (``n`` to 6), so that an object store's lexical
listing is numeric order and a listing alone says what a chain holds: the keys carry every
number a restore plan needs, and no object has to be read to plan one.

:func:`parse_key` tells three things apart: a key of ours (parsed), a key that is not ours
(``None``: a stray file, an upload tool's temporary), and a key that claims to be ours by its
directory and suffix but is malformed (:class:`ArchiveFormatError`). Parsing is canonical:
a key that parses is exactly the ``.key`` of what it parses to, so no two names mean one object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, TypeAlias

from blockmirror.errors import ArchiveError
from blockmirror.journal.format import MAX_BOOKMARK

__all__ = [
    "U64_MAX",
    "ArchiveFormatError",
    "ArchiveKey",
    "BookmarkKey",
    "ClaimKey",
    "DataKey",
    "ManifestKey",
    "SegmentKey",
    "check_generation",
    "parse_key",
    "quote_name",
    "unquote_name",
]

U64_MAX: Final = 2**64 - 1
_N_MAX: Final = 999_999  # data object numbers have 6 digits

_GENERATION: Final = re.compile(r"[0-9a-f]{32}")
# [0-9], not \d: \d also matches other scripts' digits, which int() would accept.
_SEG: Final = re.compile(r"([0-9]{20})-([0-9]{20})-([0-9]{20})\.seg")
_MANIFEST: Final = re.compile(r"([0-9]{20})-([0-9]{20})-([0-9]{20})\.manifest")
_DATA: Final = re.compile(r"([0-9]{20})-([0-9]{6})\.chunks")
_BOOKMARK: Final = re.compile(r"([0-9]{20})-([0-9]{20})-(.+)", re.DOTALL)
_HEX2: Final = re.compile(r"[0-9A-F]{2}")

# Bytes of a bookmark name kept as they are in its key; every other byte is %XX. Object stores
# and shells treat this set alike, and the name still reads in a listing.
_SAFE: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


class ArchiveFormatError(ArchiveError):
    """An archive key or object that is not valid: the message says what is wrong with it."""


def check_generation(gen: str) -> None:
    """Raise :class:`ArchiveFormatError` unless ``gen`` is 32 lowercase hex digits."""
    if not _GENERATION.fullmatch(gen):
        raise ArchiveFormatError(f"generation {gen!r} is not 32 lowercase hex digits")


def _check_u64(what: str, value: int) -> None:
    if not 0 <= value <= U64_MAX:
        raise ArchiveFormatError(f"{what} {value} is outside 0..2**64-1")


def quote_name(name: str) -> str:
    """A bookmark name as its key spells it: UTF-8, bytes outside ``[A-Za-z0-9._-]`` as %XX."""
    raw = _name_bytes(name)
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)


def unquote_name(quoted: str) -> str:
    """The name :func:`quote_name` spelled as ``quoted``; only that one spelling is accepted
    (upper-case hex, no escaped safe byte), so a name has one key."""
    out = bytearray()
    i = 0
    while i < len(quoted):
        c = quoted[i]
        if c == "%":
            digits = quoted[i + 1 : i + 3]
            if not _HEX2.fullmatch(digits):
                raise ArchiveFormatError(f"bad escape {quoted[i : i + 3]!r} in a bookmark name")
            b = int(digits, 16)
            if b in _SAFE:
                raise ArchiveFormatError(f"escaped safe byte %{digits} in a bookmark name")
            out.append(b)
            i += 3
        elif ord(c) < 128 and ord(c) in _SAFE:
            out.append(ord(c))
            i += 1
        else:
            raise ArchiveFormatError(f"unescaped {c!r} in a bookmark name")
    try:
        name = out.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveFormatError("a bookmark name that is not UTF-8") from None
    _name_bytes(name)
    return name


def _name_bytes(name: str) -> bytes:
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ArchiveFormatError(f"bookmark name {name!r} cannot be UTF-8") from None
    if not 0 < len(raw) <= MAX_BOOKMARK:
        raise ArchiveFormatError(f"bookmark name of {len(raw)} bytes (1 to {MAX_BOOKMARK})")
    return raw


@dataclass(frozen=True, slots=True)
class ClaimKey:
    """``g{gen}/claim``: which unit writes this generation's chain."""

    gen: str

    def __post_init__(self) -> None:
        check_generation(self.gen)

    @property
    def key(self) -> str:
        return f"g{self.gen}/claim"


@dataclass(frozen=True, slots=True)
class SegmentKey:
    """A segment of records ``first..last`` (inclusive); ``last_ts`` is record last's origin
    timestamp (ns since the epoch)."""

    gen: str
    first: int
    last: int
    last_ts: int

    def __post_init__(self) -> None:
        check_generation(self.gen)
        for what, value in (("first", self.first), ("last", self.last), ("ts", self.last_ts)):
            _check_u64(what, value)
        if not 1 <= self.first <= self.last:
            raise ArchiveFormatError(f"segment {self.first}..{self.last}: need 1 <= first <= last")

    @property
    def key(self) -> str:
        return f"g{self.gen}/seg/{self.first:020d}-{self.last:020d}-{self.last_ts:020d}.seg"


@dataclass(frozen=True, slots=True)
class ManifestKey:
    """A base's manifest. The base was copied while records ``start+1..end`` were applied, so
    it is the volume at ``end`` once those are replayed over it; ``end_ts`` is record end's
    origin timestamp (0 when end is 0, the volume before its first record)."""

    gen: str
    end: int
    start: int
    end_ts: int

    def __post_init__(self) -> None:
        check_generation(self.gen)
        for what, value in (("end", self.end), ("start", self.start), ("ts", self.end_ts)):
            _check_u64(what, value)
        if self.start > self.end:
            raise ArchiveFormatError(f"base {self.start}..{self.end}: start after end")
        if self.end == 0 and self.end_ts != 0:
            raise ArchiveFormatError(f"base ending at seq 0 with timestamp {self.end_ts}")

    @property
    def key(self) -> str:
        return f"g{self.gen}/base/{self.end:020d}-{self.start:020d}-{self.end_ts:020d}.manifest"


@dataclass(frozen=True, slots=True)
class DataKey:
    """Data object ``n`` (from 0) of the base whose end is ``base_end``."""

    gen: str
    base_end: int
    n: int

    def __post_init__(self) -> None:
        check_generation(self.gen)
        _check_u64("base end", self.base_end)
        if not 0 <= self.n <= _N_MAX:
            raise ArchiveFormatError(f"data object number {self.n} is outside 0..{_N_MAX}")

    @property
    def key(self) -> str:
        return f"g{self.gen}/data/{self.base_end:020d}-{self.n:06d}.chunks"


@dataclass(frozen=True, slots=True)
class BookmarkKey:
    """The bookmark ``name`` (1..200 bytes of UTF-8) at record ``seq``, origin time ``ts``."""

    gen: str
    seq: int
    ts: int
    name: str

    def __post_init__(self) -> None:
        check_generation(self.gen)
        _check_u64("seq", self.seq)
        _check_u64("ts", self.ts)
        _name_bytes(self.name)

    @property
    def key(self) -> str:
        return f"g{self.gen}/bookmark/{self.seq:020d}-{self.ts:020d}-{quote_name(self.name)}"


ArchiveKey: TypeAlias = ClaimKey | SegmentKey | ManifestKey | DataKey | BookmarkKey

# Our directories and the suffix of their files: a name there without the suffix is not ours.
_SUFFIXES: Final = {"seg": ".seg", "base": ".manifest", "data": ".chunks", "bookmark": ""}


def parse_key(rel: str) -> ArchiveKey | None:
    """The key ``rel`` (relative to the volume root) names; ``None`` when it is not one of
    ours. Raises :class:`ArchiveFormatError` for one in our directories with our suffix that
    is malformed: bad digits or widths, ``first > last``, a bad generation or name."""
    top, _, rest = rel.partition("/")
    if not top.startswith("g") or not rest:
        return None
    if rest == "claim":
        return ClaimKey(_generation_of(top))
    directory, _, name = rest.partition("/")
    suffix = _SUFFIXES.get(directory)
    if suffix is None or not name.endswith(suffix):
        return None
    gen = _generation_of(top)
    if "/" in name:
        raise ArchiveFormatError(f"{rel!r}: nested below {directory}/")
    if directory == "seg":
        first, last, ts = _numbers(_SEG, name, rel)
        return SegmentKey(gen, first, last, ts)
    if directory == "base":
        end, start, ts = _numbers(_MANIFEST, name, rel)
        return ManifestKey(gen, end, start, ts)
    if directory == "data":
        base_end, n = _numbers(_DATA, name, rel)
        return DataKey(gen, base_end, n)
    m = _BOOKMARK.fullmatch(name)
    if m is None:
        raise ArchiveFormatError(f"{rel!r} is not {{seq:020}}-{{ts:020}}-{{name}}")
    return BookmarkKey(gen, int(m[1]), int(m[2]), unquote_name(m[3]))


def _generation_of(top: str) -> str:
    gen = top[1:]
    check_generation(gen)
    return gen


def _numbers(pattern: re.Pattern[str], name: str, rel: str) -> tuple[int, ...]:
    m = pattern.fullmatch(name)
    if m is None:
        raise ArchiveFormatError(f"{rel!r}: numbers are not zero-padded decimal of the widths")
    return tuple(int(g) for g in m.groups())
