"""iSCSI framing, sans-I/O: whole PDUs out of a byte stream, and PDUs into vectored writes.

A PDU on the wire (RFC 7143 section 11.1) is the 48-byte BHS, the AHS (TotalAHSLength words),
the header digest when HeaderDigest=CRC32C, the data segment padded to a multiple of 4 bytes,
and the data digest (over data and padding) when DataDigest=CRC32C and there is data. Digests
are off during login and take effect with the first PDU after the Login Final-Response, so the
connection switches them on the reader (:attr:`PduReader.digests`) between two PDUs: the reader
decodes lazily, one PDU per :meth:`PduReader.next_pdu` call, and never runs ahead.

The CRC32C of iSCSI goes on the wire least significant byte first: the examples of RFC 3720
appendix B.4 (32 zero bytes give the bytes aa 36 91 8a) are that order, the reverse of the
network order every other field uses.

Errors are :class:`IscsiPduError`. A header digest error closes the connection (the lengths in
that header cannot be trusted, and at ErrorRecoveryLevel 0 there is no resynchronisation). A
data digest error, a data segment over the bound, an unknown opcode or a bad field are refused
with a Reject reason, and the reader has consumed (or skips, without buffering) the whole PDU,
so the next call continues with the next PDU.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import crc32c

from blockmirror.errors import IscsiPduError
from blockmirror.frontend.iscsi_bhs import header_lengths, pack_header, unpack_header
from blockmirror.frontend.iscsi_pdu import (
    BHS_SIZE,
    DIGEST_SIZE,
    INITIATOR_OPCODES,
    LOGIN_SEGMENT,
    MAX_SEGMENT,
    TARGET_OPCODES,
    Buffer,
    Opcode,
    Pdu,
    RejectReason,
    segment_length,
)


@dataclass(frozen=True, slots=True)
class Digests:
    """Which digests a connection uses (HeaderDigest, DataDigest = CRC32C)."""

    header: bool = False
    data: bool = False


NO_DIGESTS = Digests()
_OPCODES = frozenset(Opcode)


def digest(buffers: Iterable[Buffer]) -> bytes:
    """The iSCSI CRC32C of the buffers, in wire order (least significant byte first)."""
    crc = 0
    for b in buffers:
        crc = crc32c.crc32c(b, crc)
    return struct.pack("<I", crc)


def encode(pdu: Pdu, digests: Digests = NO_DIGESTS) -> list[Buffer]:
    """``pdu`` as buffers for one vectored write: the header (with AHS and header digest),
    then the data buffers as given (not copied), then padding and data digest.

    Raises ValueError when a field does not fit its place in the header.
    """
    header, data = pack_header(pdu)
    out: list[Buffer] = [header + digest((header,)) if digests.header else header]
    length = segment_length(data)
    if length:
        out.extend(b for b in data if memoryview(b).nbytes)
        tail = bytes(-length % 4)
        if digests.data:
            tail += digest((*data, tail))
        if tail:
            out.append(tail)
    return out


def header_of(pdu: Pdu) -> bytes:
    """The 48-byte BHS of a PDU, rebuilt from its fields: what a Reject carries back when the
    refusal comes after decoding (a Text Request, a SCSI command), where the received bytes
    are gone. Reserved fields come back as zeros, which is all they may hold."""
    return pack_header(pdu)[0][:BHS_SIZE]


def encode_bytes(pdu: Pdu, digests: Digests = NO_DIGESTS) -> bytes:
    """:func:`encode` joined: one bytes object (tests and small PDUs)."""
    return b"".join(encode(pdu, digests))


class _Input:
    """Received bytes as a queue of views; data segments are handed out without a copy."""

    def __init__(self) -> None:
        self.chunks: deque[memoryview] = deque()
        self.size = 0

    def append(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        if view.nbytes:
            self.chunks.append(view)
            self.size += view.nbytes

    def peek(self, n: int) -> bytes:
        out = bytearray()
        for chunk in self.chunks:
            out += chunk[: n - len(out)]
            if len(out) == n:
                break
        return bytes(out)

    def take_bytes(self, n: int) -> bytes:
        return b"".join(self.take_views(n))

    def take_views(self, n: int) -> tuple[memoryview, ...]:
        views = []
        while n:
            first = self.chunks[0]
            take = min(n, len(first))
            views.append(first[:take])
            if take == len(first):
                self.chunks.popleft()
            else:
                self.chunks[0] = first[take:]
            self.size -= take
            n -= take
        return tuple(views)

    def skip(self, n: int) -> int:
        n = min(n, self.size)
        self.take_views(n)
        return n


class PduReader:
    """Frames one connection's incoming byte stream into PDUs.

    ``from_initiator`` picks the direction (a target reads initiator PDUs; a test initiator
    reads target PDUs). ``max_data_segment`` bounds each data segment: LOGIN_SEGMENT (8192)
    during login, then the MaxRecvDataSegmentLength this side declared. Both it and
    :attr:`digests` may be changed between PDUs.

    Data segments of the PDUs returned are views of the buffers given to :meth:`feed`: feed
    buffers that are not reused afterwards (asyncio's ``data_received`` bytes are fine).
    """

    def __init__(
        self,
        *,
        from_initiator: bool = True,
        digests: Digests = NO_DIGESTS,
        max_data_segment: int = LOGIN_SEGMENT,
    ) -> None:
        self.digests = digests
        self.max_data_segment = max_data_segment
        self._accept = INITIATOR_OPCODES if from_initiator else TARGET_OPCODES
        self._in = _Input()
        self._header: tuple[bytes, bytes, int, bool] | None = None
        self._skip = 0
        self._broken: IscsiPduError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as PDUs."""
        return self._in.size

    @property
    def mid_pdu(self) -> bool:
        """Whether the stream stops inside a PDU (an end of stream here is a cut, not a close)."""
        return bool(self._in.size or self._header is not None or self._skip)

    def feed(self, data: Buffer) -> None:
        if self._broken is None:
            self._in.append(data)

    def next_pdu(self) -> Pdu | None:
        """The next whole PDU, or None until more bytes arrive. Raises :class:`IscsiPduError`;
        after one whose ``close`` is true every later call raises it again."""
        if self._broken is not None:
            raise self._broken
        if self._skip:
            self._skip -= self._in.skip(self._skip)
            if self._skip:
                return None
        if self._header is None and not self._read_header():
            return None
        assert self._header is not None
        bhs, ahs, length, data_digest = self._header
        padded = length + (-length % 4)
        need = padded + (DIGEST_SIZE if data_digest else 0)
        if self._in.size < need:
            return None
        self._header = None
        views = self._in.take_views(length)
        tail = self._in.take_bytes(need - length)
        if data_digest and digest((*views, tail[: padded - length])) != tail[padded - length :]:
            raise IscsiPduError(
                "data digest error", reject_reason=RejectReason.DATA_DIGEST_ERROR, header=bhs
            )
        return unpack_header(bhs, ahs, views)

    def _read_header(self) -> bool:
        if self._in.size < BHS_SIZE:
            return False
        ahs_length, length = header_lengths(self._in.peek(8))
        header_size = BHS_SIZE + ahs_length
        need = header_size + (DIGEST_SIZE if self.digests.header else 0)
        if self._in.size < need:
            return False
        raw = self._in.take_bytes(need)
        bhs = raw[:BHS_SIZE]
        if self.digests.header and digest((raw[:header_size],)) != raw[header_size:]:
            self._broken = IscsiPduError("header digest error", reject_reason=None, header=bhs)
            self._in = _Input()
            raise self._broken
        data_digest = self.digests.data and length > 0
        rest = length + (-length % 4) + (DIGEST_SIZE if data_digest else 0)
        code = bhs[0] & 0x3F
        refusal: tuple[RejectReason, str] | None = None
        if code not in self._accept:
            known = code in _OPCODES
            refusal = (
                (RejectReason.PROTOCOL_ERROR, f"opcode {code:#04x} travels the other way")
                if known
                else (RejectReason.COMMAND_NOT_SUPPORTED, f"unknown opcode {code:#04x}")
            )
        elif length > min(self.max_data_segment, MAX_SEGMENT):
            refusal = (
                RejectReason.PROTOCOL_ERROR,
                f"data segment of {length} bytes, over the {self.max_data_segment} declared",
            )
        if refusal is not None:
            # The lengths are believed (the header digest, if on, vouched for them): the PDU's
            # rest is skipped as it streams in, never buffered whole.
            self._skip = rest - self._in.skip(rest)
            raise IscsiPduError(refusal[1], reject_reason=refusal[0], header=bhs)
        self._header = (bhs, raw[BHS_SIZE:header_size], length, data_digest)
        return True
