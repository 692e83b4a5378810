"""NBD wire format, server side, as a sans-I/O codec.

Bytes go in with :meth:`NbdServerCodec.feed`; events come out of :meth:`NbdServerCodec.next_event`.
Replies are built by the ``encode_*`` functions. Nothing here touches a socket or an event loop, so
the whole protocol can be tested byte by byte.

Write payloads are never copied: a :class:`Request` for ``WRITE`` carries the memoryviews of the
chunks exactly as they arrived, ready for one vectored write.

Why one module: it is one specification (doc/proto.md of the NBD project) in code, the magic
numbers beside the framing and the encoders and decoders that use them, so that it can be read
against the document section by section; the option haggling built on it is nbd_negotiation.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass, field

from blockmirror.errors import ProtocolError

# --- magic numbers and constants (doc/proto.md of NetworkBlockDevice/nbd) -------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0
CLIENT_FLAG_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ERROR_BIT = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR_BIT + 1
    ERR_POLICY = REP_ERROR_BIT + 2
    ERR_INVALID = REP_ERROR_BIT + 3
    ERR_PLATFORM = REP_ERROR_BIT + 4
    ERR_TLS_REQD = REP_ERROR_BIT + 5
    ERR_UNKNOWN = REP_ERROR_BIT + 6
    ERR_SHUTDOWN = REP_ERROR_BIT + 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT + 8
    ERR_TOO_BIG = REP_ERROR_BIT + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TxFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


# Which command flags each command may carry; anything else is answered EINVAL. FUA is on every
# command: the spec says a server advertising SEND_FUA MUST accept it on all of them (even by
# ignoring it), because existing clients set it on reads and flushes. The masks are plain ints on
# purpose: ``~`` of an IntFlag only spans the enum's defined bits, so ``flags & ~mask`` would let
# every undefined bit (5 to 15) through.
ALLOWED_CMD_FLAGS: dict[int, int] = {
    Cmd.READ: int(CmdFlag.FUA | CmdFlag.DF),
    Cmd.WRITE: int(CmdFlag.FUA),
    Cmd.DISC: int(CmdFlag.FUA),
    Cmd.FLUSH: int(CmdFlag.FUA),
    Cmd.TRIM: int(CmdFlag.FUA),
    Cmd.CACHE: int(CmdFlag.FUA),
    Cmd.WRITE_ZEROES: int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
    Cmd.BLOCK_STATUS: int(CmdFlag.FUA | CmdFlag.REQ_ONE),
}


class Chunk(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


CHUNK_FLAG_DONE = 1

# NBD error numbers are fixed by the protocol, not the host's errno values.
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

STATE_HOLE = 1
STATE_ZERO = 2

# --- bounds ---------------------------------------------------------------------------------------

MAX_NAME = 4096
# Options are small (the largest real one is a meta-context query list); anything bigger is refused
# with ERR_TOO_BIG and its data skipped without buffering. Past HARD_MAX_OPTION we stop listening.
MAX_OPTION_DATA = 64 * 1024
HARD_MAX_OPTION = 32 * 1024 * 1024
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 * 1024 * 1024
# A WRITE larger than MAX_PAYLOAD is answered EINVAL and its data discarded as it streams in; one
# past this is not worth reading and the connection is dropped.
HARD_MAX_PAYLOAD = 64 * 1024 * 1024

_GREETING = struct.Struct(">QQH")
_OPTION_HDR = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK_HDR = struct.Struct(">IHHQI")
_EXPORT_NAME_REPLY = struct.Struct(">QH")

REQUEST_SIZE = _REQUEST.size
SIMPLE_REPLY_SIZE = _SIMPLE_REPLY.size
CHUNK_HEADER_SIZE = _CHUNK_HDR.size
# A structured READ reply is the chunk header, the offset, then the data.
READ_CHUNK_PREFIX = CHUNK_HEADER_SIZE + 8


# --- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientFlags:
    flags: int


@dataclass(frozen=True, slots=True)
class OptionRequest:
    option: int
    data: bytes


@dataclass(frozen=True, slots=True)
class OversizedOption:
    """An option whose data exceeds MAX_OPTION_DATA; its data is being skipped."""

    option: int
    length: int


@dataclass(frozen=True, slots=True)
class Request:
    """One transmission request. ``data`` holds a WRITE's payload as received, uncopied."""

    flags: int
    command: int
    cookie: int
    offset: int
    length: int
    data: tuple[memoryview, ...] = ()


@dataclass(frozen=True, slots=True)
class OversizedWrite:
    """A WRITE longer than MAX_PAYLOAD; its payload is discarded as it arrives."""

    flags: int
    cookie: int
    offset: int
    length: int


Event = ClientFlags | OptionRequest | OversizedOption | Request | OversizedWrite


class Phase(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


# --- the input side -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Input:
    """Received bytes as a queue of chunks; takes whole buffers without copying payloads."""

    chunks: deque[memoryview] = field(default_factory=deque)
    size: int = 0

    def append(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self.chunks.append(memoryview(data).cast("B"))
            self.size += len(data)

    def take_bytes(self, n: int) -> bytes:
        """Copy out ``n`` bytes; used for small headers only."""
        first = self.chunks[0]
        if len(first) >= n:
            out = bytes(first[:n])
            self._drop_front(first, n)
            return out
        parts = []
        need = n
        while need:
            first = self.chunks[0]
            take = min(need, len(first))
            parts.append(first[:take])
            self._drop_front(first, take)
            need -= take
        return b"".join(parts)

    def take_views(self, n: int) -> tuple[memoryview, ...]:
        """Hand out ``n`` bytes as views of the received buffers (no copy)."""
        views = []
        need = n
        while need:
            first = self.chunks[0]
            take = min(need, len(first))
            views.append(first[:take])
            self._drop_front(first, take)
            need -= take
        return tuple(views)

    def skip(self, n: int) -> int:
        """Drop up to ``n`` bytes; returns how many were dropped."""
        dropped = 0
        while dropped < n and self.chunks:
            first = self.chunks[0]
            take = min(n - dropped, len(first))
            self._drop_front(first, take)
            dropped += take
        return dropped

    def _drop_front(self, first: memoryview, n: int) -> None:
        self.size -= n
        if n == len(first):
            self.chunks.popleft()
        else:
            self.chunks[0] = first[n:]


class NbdServerCodec:
    """Frames the client's byte stream into events for one connection.

    The codec starts in the CLIENT_FLAGS phase (the caller sends :func:`encode_greeting` first).
    The caller moves it to TRANSMISSION with :meth:`start_transmission` once an export is chosen.
    Malformed framing raises :class:`ProtocolError`; the connection must then be closed, because
    the stream cannot be re-synchronised.
    """

    def __init__(self) -> None:
        self.phase = Phase.CLIENT_FLAGS
        self._in = _Input()
        self._skip_remaining = 0
        self._pending_header: tuple[int, int, int, int, int] | None = None

    @property
    def buffered(self) -> int:
        return self._in.size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.phase is Phase.CLOSED:
            return
        self._in.append(data)

    def start_transmission(self) -> None:
        if self.phase is not Phase.OPTIONS:
            raise ProtocolError(f"cannot enter transmission from phase {self.phase.value}")
        self.phase = Phase.TRANSMISSION

    def close(self) -> None:
        self.phase = Phase.CLOSED
        self._in = _Input()

    def next_event(self) -> Event | None:
        """The next complete event, or None when more bytes are needed."""
        if self._skip_remaining:
            self._skip_remaining -= self._in.skip(self._skip_remaining)
            if self._skip_remaining:
                return None
        if self.phase is Phase.TRANSMISSION:
            return self._next_request()
        if self.phase is Phase.OPTIONS:
            return self._next_option()
        if self.phase is Phase.CLIENT_FLAGS:
            if self._in.size < 4:
                return None
            (flags,) = struct.unpack(">I", self._in.take_bytes(4))
            if flags & ~KNOWN_CLIENT_FLAGS:
                raise ProtocolError(f"client sent unknown handshake flags {flags:#x}")
            self.phase = Phase.OPTIONS
            return ClientFlags(flags)
        return None

    def _next_option(self) -> Event | None:
        if self._pending_header is None:
            if self._in.size < _OPTION_HDR.size:
                return None
            magic, option, length = _OPTION_HDR.unpack(self._in.take_bytes(_OPTION_HDR.size))
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > HARD_MAX_OPTION:
                raise ProtocolError(f"option {option} announces {length} bytes of data")
            if length > MAX_OPTION_DATA:
                self._skip_remaining = length - self._in.skip(length)
                return OversizedOption(option, length)
            self._pending_header = (option, length, 0, 0, 0)
        option, length = self._pending_header[0], self._pending_header[1]
        if self._in.size < length:
            return None
        self._pending_header = None
        return OptionRequest(option, self._in.take_bytes(length) if length else b"")

    def _next_request(self) -> Event | None:
        if self._pending_header is None:
            if self._in.size < REQUEST_SIZE:
                return None
            magic, flags, command, cookie, offset, length = _REQUEST.unpack(
                self._in.take_bytes(REQUEST_SIZE)
            )
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            if command != Cmd.WRITE:
                return Request(flags, command, cookie, offset, length)
            if length > HARD_MAX_PAYLOAD:
                raise ProtocolError(f"WRITE of {length} bytes is past any sane bound")
            if length > MAX_PAYLOAD:
                self._skip_remaining = length - self._in.skip(length)
                return OversizedWrite(flags, cookie, offset, length)
            self._pending_header = (flags, command, cookie, offset, length)
        flags, command, cookie, offset, length = self._pending_header
        if self._in.size < length:
            return None
        self._pending_header = None
        return Request(flags, command, cookie, offset, length, self._in.take_views(length))

    def pending_write_bytes(self) -> int:
        """Bytes of a WRITE payload still awaited (for flow control and tests)."""
        if self._pending_header is None or self.phase is not Phase.TRANSMISSION:
            return 0
        return max(0, self._pending_header[4] - self._in.size)


# --- encoders -------------------------------------------------------------------------------------


def encode_greeting() -> bytes:
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, HANDSHAKE_FLAGS)


def encode_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def encode_info_export(size: int, tx_flags: int) -> bytes:
    return struct.pack(">HQH", Info.EXPORT, size, tx_flags)


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", Info.BLOCK_SIZE, minimum, preferred, maximum)


def encode_info_name(name: str) -> bytes:
    return struct.pack(">H", Info.NAME) + name.encode()


def encode_info_description(description: str) -> bytes:
    return struct.pack(">H", Info.DESCRIPTION) + description.encode()


def encode_server_entry(name: str, description: str = "") -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + description.encode()


def encode_meta_context(context_id: int, name: str) -> bytes:
    return struct.pack(">I", context_id) + name.encode()


def encode_export_name_reply(size: int, tx_flags: int, no_zeroes: bool) -> bytes:
    return _EXPORT_NAME_REPLY.pack(size, tx_flags) + (b"" if no_zeroes else bytes(124))


def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def encode_read_chunk_header(cookie: int, offset: int, length: int) -> bytes:
    """The header of a final OFFSET_DATA chunk; ``length`` bytes of data follow it."""
    return _CHUNK_HDR.pack(
        STRUCTURED_REPLY_MAGIC, CHUNK_FLAG_DONE, Chunk.OFFSET_DATA, cookie, length + 8
    ) + struct.pack(">Q", offset)


def pack_simple_reply_into(buf: bytearray, cookie: int, error: int = 0) -> None:
    """Write a simple reply header at the start of ``buf`` (READ data follows in place)."""
    _SIMPLE_REPLY.pack_into(buf, 0, SIMPLE_REPLY_MAGIC, error, cookie)


def pack_read_chunk_into(buf: bytearray, cookie: int, offset: int, length: int) -> None:
    """Write a final OFFSET_DATA chunk header at the start of ``buf`` (data follows in place)."""
    _CHUNK_HDR.pack_into(
        buf, 0, STRUCTURED_REPLY_MAGIC, CHUNK_FLAG_DONE, Chunk.OFFSET_DATA, cookie, length + 8
    )
    struct.pack_into(">Q", buf, CHUNK_HEADER_SIZE, offset)


def encode_chunk(cookie: int, chunk_type: int, payload: bytes, *, done: bool = True) -> bytes:
    flags = CHUNK_FLAG_DONE if done else 0
    return (
        _CHUNK_HDR.pack(STRUCTURED_REPLY_MAGIC, flags, chunk_type, cookie, len(payload)) + payload
    )


def encode_error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    # The message is a protocol string: at most MAX_NAME bytes, and still UTF-8 once cut.
    raw = message.encode()[:MAX_NAME].decode(errors="ignore").encode()
    return encode_chunk(cookie, Chunk.ERROR, struct.pack(">IH", error, len(raw)) + raw)


def encode_block_status_chunk(
    cookie: int, context_id: int, extents: list[tuple[int, int]]
) -> bytes:
    body = struct.pack(">I", context_id) + b"".join(
        struct.pack(">II", length, flags) for length, flags in extents
    )
    return encode_chunk(cookie, Chunk.BLOCK_STATUS, body)


# --- option payload decoders (all raise ProtocolError on malformed data) -------------------------


def _read_string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    if pos + 4 > len(data):
        raise ProtocolError(f"{what}: length field truncated")
    (n,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if n > MAX_NAME:
        raise ProtocolError(f"{what}: {n} bytes is longer than {MAX_NAME}")
    if pos + n > len(data):
        raise ProtocolError(f"{what}: string truncated")
    try:
        text = data[pos : pos + n].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what}: not UTF-8") from exc
    if "\0" in text:
        raise ProtocolError(f"{what}: contains NUL")
    return text, pos + n


@dataclass(frozen=True, slots=True)
class InfoRequest:
    name: str
    requests: tuple[int, ...]


def decode_info_request(data: bytes) -> InfoRequest:
    """Data of NBD_OPT_INFO / NBD_OPT_GO: export name then a list of info types."""
    name, pos = _read_string(data, 0, "export name")
    if pos + 2 > len(data):
        raise ProtocolError("info request count truncated")
    (count,) = struct.unpack_from(">H", data, pos)
    pos += 2
    if pos + 2 * count != len(data):
        raise ProtocolError("info request list length does not match its count")
    return InfoRequest(name, struct.unpack_from(f">{count}H", data, pos))


@dataclass(frozen=True, slots=True)
class MetaContextRequest:
    name: str
    queries: tuple[str, ...]


def decode_meta_context_request(data: bytes) -> MetaContextRequest:
    """Data of NBD_OPT_LIST/SET_META_CONTEXT: export name, u32 count, then the queries."""
    name, pos = _read_string(data, 0, "export name")
    if pos + 4 > len(data):
        raise ProtocolError("meta context query count truncated")
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if count > len(data):  # each query takes at least 4 bytes; refuses absurd counts cheaply
        raise ProtocolError("meta context query count larger than the option")
    queries = []
    for _ in range(count):
        query, pos = _read_string(data, pos, "meta context query")
        queries.append(query)
    if pos != len(data):
        raise ProtocolError("trailing bytes after meta context queries")
    return MetaContextRequest(name, tuple(queries))


def decode_export_name(data: bytes) -> str:
    if len(data) > MAX_NAME:
        raise ProtocolError(f"export name longer than {MAX_NAME} bytes")
    try:
        name = data.decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError("export name is not UTF-8") from exc
    if "\0" in name:
        raise ProtocolError("export name contains NUL")
    return name
