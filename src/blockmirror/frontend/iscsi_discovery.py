"""Text Requests of full feature phase, target side, sans-I/O: SendTargets and declarations.

An initiator discovers targets with ``SendTargets=All`` in a discovery session (RFC 7143
appendix C): the answer is ``TargetName=`` then one ``TargetAddress=host:port,tpgt`` per portal,
for each target it may see. In a normal session the answer names the session's own target
(for All or an empty value, as libiscsi asks it), or the target named.

A text exchange may span PDUs both ways. The initiator splits a long request with C=1; each
part is acknowledged with an empty response (F=0, a Target Transfer Tag to continue with).
Our answer may exceed the initiator's MaxRecvDataSegmentLength: it is cut into responses with
C=1 and F=0, and the initiator fetches each next part with an empty request carrying our tag.
The last response has F=1 (when the request had F=1) and the reserved tag. At most one text
exchange runs per connection; a request with the reserved tag starts a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from blockmirror.errors import IscsiPduError
from blockmirror.frontend.iscsi_chap import CHAP_KEYS
from blockmirror.frontend.iscsi_keys import (
    MRDSL,
    SESSION_KEYS,
    TARGET_ONLY_KEYS,
)
from blockmirror.frontend.iscsi_pdu import (
    MAX_SEGMENT,
    RESERVED_TAG,
    RejectReason,
    TextRequest,
    TextResponse,
    payload,
)
from blockmirror.frontend.iscsi_text import (
    NOT_UNDERSTOOD,
    REJECT,
    RESERVED_ANSWERS,
    Pairs,
    TextError,
    decode_text,
    encode_text,
    parse_number,
)

MAX_REQUEST_TEXT = 64 * 1024  # what a run of C=1 Text Requests may gather
# Keys that only a login negotiates: answered Reject in full feature phase.
_LOGIN_ONLY = frozenset(
    {
        *SESSION_KEYS,
        *CHAP_KEYS,
        *TARGET_ONLY_KEYS,
        "AuthMethod",
        "HeaderDigest",
        "DataDigest",
        "InitiatorName",
        "TargetName",
        "SessionType",
        "IFMarker",
        "OFMarker",
        "IFMarkInt",
        "OFMarkInt",
        "iSCSIProtocolLevel",
    }
)


@dataclass(frozen=True, slots=True)
class Portal:
    """A network portal of the target: where initiators connect, and its portal group."""

    host: str  # an IP address or a DNS name
    port: int = 3260
    group_tag: int = 1

    def address(self) -> str:
        """As TargetAddress writes it: ``host:port,tpgt``, IPv6 literals in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port},{self.group_tag}"


def send_targets(
    value: str, *, session_target: str | None, targets: Sequence[str], portals: Sequence[Portal]
) -> Pairs:
    """The answer to ``SendTargets=value``. ``session_target`` is the target of a normal
    session (None in a discovery session); ``targets`` the names this initiator may see."""
    if value == "All":
        names = list(targets) if session_target is None else [session_target]
    elif value == "":
        names = [] if session_target is None else [session_target]
    else:
        names = [n for n in targets if n == value.lower()]
    out: Pairs = []
    for name in names:
        out.append(("TargetName", name))
        out.extend(("TargetAddress", portal.address()) for portal in portals)
    return out


class TextExchange:
    """The Text Requests of one connection in full feature phase.

    ``max_send_data_segment_length`` is the initiator's MaxRecvDataSegmentLength: what each
    response may carry. The initiator may declare a new one in a Text Request; the attribute
    then changes, and the connection must bound its Data-In PDUs by it too.
    """

    def __init__(
        self,
        *,
        session_target: str | None,
        targets: Callable[[], Sequence[str]],
        portals: Sequence[Portal],
        max_send_data_segment_length: int,
    ) -> None:
        self._session_target = session_target
        self._targets = targets
        self._portals = portals
        self.max_send_data_segment_length = max_send_data_segment_length
        self._itt = RESERVED_TAG
        self._ttt = RESERVED_TAG
        self._next_ttt = 0
        self._gathered = b""
        self._out: bytes | None = None  # answer text not yet sent

    def handle(self, req: TextRequest) -> TextResponse:
        """The response to one Text Request (its StatSN, ExpCmdSN and MaxCmdSN are left for
        the connection to stamp). Raises :class:`IscsiPduError` with a Reject reason."""
        data = payload(req.data)
        if req.ttt == RESERVED_TAG:
            self._itt, self._ttt, self._gathered, self._out = req.itt, RESERVED_TAG, b"", None
        elif req.ttt != self._ttt or req.itt != self._itt:
            raise IscsiPduError(
                f"Text Request continues tag {req.ttt:#x}, not ours",
                reject_reason=RejectReason.INVALID_PDU_FIELD,
            )
        if self._out is not None:
            if data:
                raise IscsiPduError(
                    "text sent while our answer is still being fetched",
                    reject_reason=RejectReason.PROTOCOL_ERROR,
                )
            return self._next_part(req)
        self._gathered += data
        if len(self._gathered) > MAX_REQUEST_TEXT:
            raise IscsiPduError("text request too long", reject_reason=RejectReason.PROTOCOL_ERROR)
        if req.cont:
            return self._reply(req, b"", final=False, cont=False)
        pairs, self._gathered = decode_text(self._gathered), b""
        self._out = encode_text(self._answer(pairs))
        return self._next_part(req)

    def _next_part(self, req: TextRequest) -> TextResponse:
        assert self._out is not None
        limit = max(1, min(self.max_send_data_segment_length, MAX_SEGMENT))
        part, rest = self._out[:limit], self._out[limit:]
        if rest:
            self._out = rest
            return self._reply(req, part, final=False, cont=True)
        self._out = None
        return self._reply(req, part, final=req.final, cont=False)

    def _reply(self, req: TextRequest, data: bytes, *, final: bool, cont: bool) -> TextResponse:
        if final:
            self._ttt = RESERVED_TAG
        elif self._ttt == RESERVED_TAG:
            self._ttt = self._new_ttt()
        return TextResponse(
            itt=req.itt,
            ttt=self._ttt,
            lun=req.lun,
            final=final,
            cont=cont,
            data=(data,) if data else (),
        )

    def _new_ttt(self) -> int:
        self._next_ttt = (self._next_ttt + 1) % RESERVED_TAG or 1
        return self._next_ttt

    def _answer(self, pairs: Pairs) -> Pairs:
        out: Pairs = []
        for key, value in pairs:
            if value in RESERVED_ANSWERS:
                raise TextError(f"{key}={value}: a reserved answer offered as a value")
            if key == "SendTargets":
                out += send_targets(
                    value,
                    session_target=self._session_target,
                    targets=self._targets(),
                    portals=self._portals,
                )
            elif key == MRDSL:
                number = parse_number(value)
                if number is None or not 512 <= number <= MAX_SEGMENT:
                    out.append((key, REJECT))
                else:
                    self.max_send_data_segment_length = number  # declarative: no answer
            elif key == "InitiatorAlias":
                pass  # declarative, usable in any phase: nothing to answer
            elif key in _LOGIN_ONLY:
                out.append((key, REJECT))
            else:
                out.append((key, NOT_UNDERSTOOD))
        return out
