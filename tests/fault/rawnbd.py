"""A tiny blocking NBD client on a raw socket, for tests that say exactly what goes on the wire.

It does only what a test tells it to: no retries, no validation beyond framing, so a test can send
any byte in any order and then read what the server answers (or see that it hung up).

The numbers are written out here from doc/proto.md rather than imported from blockmirror, so a
wrong constant in the server shows up as a failing test instead of agreeing with itself.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from types import TracebackType

# --- the protocol's numbers (doc/proto.md of NetworkBlockDevice/nbd) ------------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
C_FIXED_NEWSTYLE = 1
C_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR + 1
REP_ERR_POLICY = REP_ERR + 2
REP_ERR_INVALID = REP_ERR + 3
REP_ERR_PLATFORM = REP_ERR + 4
REP_ERR_TLS_REQD = REP_ERR + 5
REP_ERR_UNKNOWN = REP_ERR + 6
REP_ERR_SHUTDOWN = REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8
REP_ERR_TOO_BIG = REP_ERR + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TX_HAS_FLAGS = 1 << 0
TX_READ_ONLY = 1 << 1
TX_SEND_FLUSH = 1 << 2
TX_SEND_FUA = 1 << 3
TX_SEND_TRIM = 1 << 5
TX_SEND_WRITE_ZEROES = 1 << 6
TX_SEND_DF = 1 << 7

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

CHUNK_FLAG_DONE = 1
CHUNK_NONE = 0
CHUNK_OFFSET_DATA = 1
CHUNK_OFFSET_HOLE = 2
CHUNK_BLOCK_STATUS = 5
CHUNK_ERROR = (1 << 15) + 1
CHUNK_ERROR_OFFSET = (1 << 15) + 2

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95

KiB = 1024
MiB = 1024 * KiB

GREETING_SIZE = 18
OPTION_REPLY_HEADER = 20
REQUEST_SIZE = 28
SIMPLE_REPLY_SIZE = 16
CHUNK_HEADER_SIZE = 20

# --- encoders, usable without a socket (the fuzz tests build whole sessions as bytes) -------------


def option(opt: int, data: bytes = b"", *, length: int | None = None) -> bytes:
    """An option request; ``length`` lets a test announce a size other than the data's."""
    return struct.pack(">QII", IHAVEOPT, opt, len(data) if length is None else length) + data


def string(text: str | bytes) -> bytes:
    """A protocol string: u32 length, then the bytes."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(">I", len(raw)) + raw


def info_request(name: str | bytes, *infos: int) -> bytes:
    """The data of INFO and GO: the export name, then u16 count and u16 info types."""
    return string(name) + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_context_request(name: str | bytes, *queries: str) -> bytes:
    """The data of LIST/SET_META_CONTEXT: the export name, u32 count, then the queries."""
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def request(
    cmd: int,
    offset: int = 0,
    length: int = 0,
    *,
    flags: int = 0,
    cookie: int = 0,
    data: bytes = b"",
) -> bytes:
    """A transmission request header followed by ``data`` (sent as given, whatever ``length``)."""
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data


# --- what comes back ------------------------------------------------------------------------------


class Closed(Exception):
    """The server closed the connection (orderly EOF or reset)."""


@dataclass(frozen=True, slots=True)
class OptionReply:
    option: int
    reply: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.reply & REP_ERR)


@dataclass(frozen=True, slots=True)
class SimpleReply:
    error: int
    cookie: int


@dataclass(frozen=True, slots=True)
class ChunkReply:
    flags: int
    type: int
    cookie: int
    payload: bytes

    @property
    def error(self) -> int:
        """The error number of an ERROR chunk (0 for any other type)."""
        if self.type not in (CHUNK_ERROR, CHUNK_ERROR_OFFSET):
            return 0
        return int(struct.unpack_from(">I", self.payload)[0])


@dataclass(frozen=True, slots=True)
class Export:
    size: int
    flags: int


class RawNbd:
    """One blocking connection. Every read has a timeout, so a hung server fails the test."""

    def __init__(
        self, address: tuple[str, int], *, timeout: float = 5.0, rcvbuf: int | None = None
    ) -> None:
        if rcvbuf is None:
            self.sock = socket.create_connection(address, timeout=timeout)
        else:
            # The receive buffer bounds the TCP window only when set before the handshake;
            # set later, the window scale already agreed lets the kernel buffer megabytes.
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.export: Export | None = None  # set by a successful go()

    def __enter__(self) -> RawNbd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- bytes ----------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise Closed(str(exc)) from exc

    def recv_exact(self, n: int) -> bytes:
        parts: list[bytes] = []
        need = n
        while need:
            try:
                chunk = self.sock.recv(min(need, 1 << 20))
            except ConnectionResetError as exc:
                raise Closed(f"reset after {n - need} of {n} bytes") from exc
            if not chunk:
                raise Closed(f"EOF after {n - need} of {n} bytes")
            parts.append(chunk)
            need -= len(chunk)
        return b"".join(parts)

    def expect_closed(self, timeout: float = 5.0) -> bytes:
        """Wait for the server to hang up; returns whatever it sent first (usually nothing).

        A reset counts as closed: a server that closes with unread client bytes in its socket
        makes the kernel send RST instead of FIN, which is still a clean refusal.
        """
        self.sock.settimeout(timeout)
        received = bytearray()
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                return bytes(received)
            except TimeoutError:
                raise AssertionError(
                    f"server kept the connection open for {timeout}s "
                    f"(after sending {len(received)} bytes)"
                ) from None
            if not chunk:
                return bytes(received)
            received += chunk

    def half_close(self) -> None:
        """Send FIN: the client will send nothing more but still reads."""
        self.sock.shutdown(socket.SHUT_WR)

    def abort(self) -> None:
        """Vanish: SO_LINGER 0 makes close() send RST and drop anything unsent."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    # --- handshake ------------------------------------------------------------------------------

    def read_greeting(self) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(GREETING_SIZE))
        assert magic == NBDMAGIC, hex(magic)
        assert opt_magic == IHAVEOPT, hex(opt_magic)
        return int(flags)

    def handshake(self, client_flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES) -> int:
        """Greeting in, client flags out; returns the server's handshake flags."""
        flags = self.read_greeting()
        self.send(struct.pack(">I", client_flags))
        return flags

    def send_option(self, opt: int, data: bytes = b"") -> None:
        self.send(option(opt, data))

    def read_option_reply(self) -> OptionReply:
        magic, opt, reply, length = struct.unpack(">QIII", self.recv_exact(OPTION_REPLY_HEADER))
        assert magic == OPTION_REPLY_MAGIC, hex(magic)
        data = self.recv_exact(length) if length else b""
        return OptionReply(int(opt), int(reply), data)

    def option_replies(self, opt: int) -> list[OptionReply]:
        """Every reply to one option, up to its final ACK or error; each must echo ``opt``."""
        replies = []
        while True:
            rep = self.read_option_reply()
            assert rep.option == opt, (rep.option, opt)
            replies.append(rep)
            if rep.reply == REP_ACK or rep.is_error:
                return replies

    def ask(self, opt: int, data: bytes = b"") -> list[OptionReply]:
        self.send_option(opt, data)
        return self.option_replies(opt)

    def go(self, name: str = "vol", *infos: int) -> Export:
        """NBD_OPT_GO; asserts success and returns the export's size and flags."""
        replies = self.ask(OPT_GO, info_request(name, *infos))
        assert replies[-1].reply == REP_ACK, replies
        exports = [r for r in replies if r.reply == REP_INFO and r.data[:2] == b"\0\0"]
        assert len(exports) == 1, replies
        _, size, flags = struct.unpack(">HQH", exports[0].data)
        assert flags & TX_HAS_FLAGS
        self.export = Export(int(size), int(flags))
        return self.export

    def structured(self) -> None:
        assert [r.reply for r in self.ask(OPT_STRUCTURED_REPLY)] == [REP_ACK]

    def session(self, name: str = "vol", *, structured: bool = False) -> Export:
        """Greeting, flags, optionally structured replies, then GO: ready for requests."""
        self.handshake()
        if structured:
            self.structured()
        return self.go(name)

    # --- transmission ---------------------------------------------------------------------------

    def send_request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        cookie: int = 0,
        data: bytes = b"",
    ) -> None:
        self.send(request(cmd, offset, length, flags=flags, cookie=cookie, data=data))

    def read_simple_reply(self) -> SimpleReply:
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(SIMPLE_REPLY_SIZE))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        return SimpleReply(int(error), int(cookie))

    def read_chunk(self) -> ChunkReply:
        magic, flags, kind, cookie, length = struct.unpack(
            ">IHHQI", self.recv_exact(CHUNK_HEADER_SIZE)
        )
        assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
        return ChunkReply(int(flags), int(kind), int(cookie), self.recv_exact(length))

    def call(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        cookie: int = 1,
        data: bytes = b"",
    ) -> int:
        """One request with simple replies; returns the error (READ data is read and dropped)."""
        self.send_request(cmd, offset, length, flags=flags, cookie=cookie, data=data)
        reply = self.read_simple_reply()
        assert reply.cookie == cookie, (reply.cookie, cookie)
        if reply.error == 0 and cmd == CMD_READ:
            self.recv_exact(length)
        return reply.error

    def read(self, offset: int, length: int, *, cookie: int = 1) -> bytes:
        """A READ that must succeed (simple replies)."""
        self.send_request(CMD_READ, offset, length, cookie=cookie)
        reply = self.read_simple_reply()
        assert reply == SimpleReply(0, cookie), reply
        return self.recv_exact(length)

    def call_structured(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        cookie: int = 1,
        data: bytes = b"",
    ) -> list[ChunkReply]:
        """One request with structured replies negotiated; returns its chunks up to DONE.

        A simple reply (allowed for commands other than READ) comes back as a NONE chunk
        carrying the error number, so callers can treat both alike.
        """
        self.send_request(cmd, offset, length, flags=flags, cookie=cookie, data=data)
        chunks = []
        while True:
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            if magic == SIMPLE_REPLY_MAGIC:
                assert cmd != CMD_READ, "a READ must get structured replies once negotiated"
                error, got = struct.unpack(">IQ", self.recv_exact(SIMPLE_REPLY_SIZE - 4))
                assert got == cookie, (got, cookie)
                payload = struct.pack(">IH", error, 0) if error else b""
                kind = CHUNK_ERROR if error else CHUNK_NONE
                return [ChunkReply(CHUNK_FLAG_DONE, kind, cookie, payload)]
            assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
            flags_, kind, got, length_ = struct.unpack(
                ">HHQI", self.recv_exact(CHUNK_HEADER_SIZE - 4)
            )
            assert got == cookie, (got, cookie)
            chunk = ChunkReply(flags_, kind, got, self.recv_exact(length_))
            chunks.append(chunk)
            if chunk.flags & CHUNK_FLAG_DONE:
                return chunks


def parse_error_chunk(chunk: ChunkReply) -> tuple[int, str]:
    """(error, message) of an ERROR chunk, checking that its lengths agree."""
    assert chunk.type == CHUNK_ERROR, chunk
    error, msglen = struct.unpack_from(">IH", chunk.payload)
    assert len(chunk.payload) == 6 + msglen, chunk
    return int(error), chunk.payload[6:].decode()
