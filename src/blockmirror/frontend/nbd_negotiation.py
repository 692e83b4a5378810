"""NBD option haggling, server side, sans-I/O.

Takes the option events of :mod:`nbd_protocol` and decides the replies: which export the client
gets, whether structured replies are on, which metadata context is selected. The asyncio adapter
only moves the bytes this class returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from blockmirror.errors import ProtocolError
from blockmirror.frontend.nbd_protocol import (
    CLIENT_FLAG_NO_ZEROES,
    MAX_NAME,
    MAX_OPTION_DATA,
    MAX_PAYLOAD,
    MIN_BLOCK,
    PREFERRED_BLOCK,
    Info,
    Opt,
    OptionRequest,
    OversizedOption,
    Rep,
    TxFlag,
    decode_export_name,
    decode_info_request,
    decode_meta_context_request,
    encode_export_name_reply,
    encode_info_block_size,
    encode_info_description,
    encode_info_export,
    encode_info_name,
    encode_meta_context,
    encode_option_reply,
    encode_server_entry,
)

BASE_ALLOCATION = "base:allocation"
# Context ids are ours to choose; a fixed non-zero id makes a wrong id in a client easy to spot.
BASE_ALLOCATION_ID = 1


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What negotiation needs to know about one export."""

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    can_fast_zero: bool = True
    # The largest request the export takes (a journal smaller than 32 MiB takes less).
    max_block: int = MAX_PAYLOAD
    # The alignment every request must have (1: any byte range).
    min_block: int = MIN_BLOCK


def transmission_flags(info: ExportInfo, *, structured: bool) -> int:
    flags = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_CACHE | TxFlag.CAN_MULTI_CONN
    if info.read_only:
        flags |= TxFlag.READ_ONLY
    else:
        flags |= (
            TxFlag.SEND_FUA | TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO
        )
    if structured:
        # We never fragment a READ reply, so "don't fragment" is free to honour.
        flags |= TxFlag.SEND_DF
    return int(flags)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to do after one option: send ``reply``; then maybe close, or enter transmission."""

    reply: bytes = b""
    close: bool = False
    export: ExportInfo | None = None


@dataclass(slots=True)
class Negotiation:
    """Option-phase state of one connection."""

    lookup: Callable[[str], ExportInfo | None]
    list_exports: Callable[[], Sequence[ExportInfo]]
    client_flags: int = 0
    structured: bool = False
    meta_export: str | None = None
    meta_context_id: int | None = None
    # Set when the connection is refused (the unit's connection limit): every option is
    # answered with this reason, and choosing an export ends the connection.
    refusal: str | None = None

    @property
    def no_zeroes(self) -> bool:
        return bool(self.client_flags & CLIENT_FLAG_NO_ZEROES)

    def resolve(self, name: str) -> ExportInfo | None:
        """The export for ``name``; the empty name means the only export, when there is one."""
        if name == "":
            exports = list(self.list_exports())
            return exports[0] if len(exports) == 1 else None
        return self.lookup(name)

    def handle(self, event: OptionRequest | OversizedOption) -> Outcome:
        if self.refusal is not None:
            return self._refuse(event.option, self.refusal)
        if isinstance(event, OversizedOption):
            if event.option == Opt.EXPORT_NAME:
                # EXPORT_NAME has no error reply (an option reply would be read as size and
                # flags): refusing it means closing, as for any other name we cannot serve.
                return Outcome(close=True)
            return Outcome(
                self._error(
                    event.option,
                    Rep.ERR_TOO_BIG,
                    f"option data of {event.length} bytes exceeds {MAX_OPTION_DATA}",
                )
            )
        option, data = event.option, event.data
        try:
            if option == Opt.EXPORT_NAME:
                return self._export_name(data)
            if option == Opt.ABORT:
                return Outcome(encode_option_reply(option, Rep.ACK), close=True)
            if option == Opt.LIST:
                return self._list(data)
            if option in (Opt.INFO, Opt.GO):
                return self._info_or_go(option, data)
            if option == Opt.STRUCTURED_REPLY:
                if data:
                    return Outcome(self._error(option, Rep.ERR_INVALID, "unexpected option data"))
                self.structured = True
                return Outcome(encode_option_reply(option, Rep.ACK))
            if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
                return self._meta_context(option, data)
            if option == Opt.STARTTLS:
                return Outcome(self._error(option, Rep.ERR_POLICY, "TLS is not enabled here"))
        except ProtocolError as exc:
            # The option was framed correctly, so the stream is intact: answer and carry on.
            return Outcome(self._error(option, Rep.ERR_INVALID, str(exc)))
        return Outcome(self._error(option, Rep.ERR_UNSUP, f"option {option} is not supported"))

    def _refuse(self, option: int, reason: str) -> Outcome:
        if option == Opt.EXPORT_NAME:
            return Outcome(close=True)  # no error reply exists for it
        if option == Opt.ABORT:
            return Outcome(encode_option_reply(option, Rep.ACK), close=True)
        return Outcome(
            self._error(option, Rep.ERR_POLICY, reason), close=option in (Opt.GO, Opt.INFO)
        )

    # --- individual options ---------------------------------------------------------------------

    def _export_name(self, data: bytes) -> Outcome:
        # EXPORT_NAME has no way to report an error: the protocol says close the connection.
        try:
            name = decode_export_name(data)
        except ProtocolError:
            return Outcome(close=True)
        info = self.resolve(name)
        if info is None:
            return Outcome(close=True)
        if self.meta_export is not None and self.meta_export != info.name:
            self.meta_context_id = None
        flags = transmission_flags(info, structured=self.structured)
        return Outcome(encode_export_name_reply(info.size, flags, self.no_zeroes), export=info)

    def _list(self, data: bytes) -> Outcome:
        if data:
            return Outcome(self._error(Opt.LIST, Rep.ERR_INVALID, "LIST takes no data"))
        parts = [
            encode_option_reply(Opt.LIST, Rep.SERVER, encode_server_entry(e.name, e.description))
            for e in self.list_exports()
        ]
        parts.append(encode_option_reply(Opt.LIST, Rep.ACK))
        return Outcome(b"".join(parts))

    def _info_or_go(self, option: int, data: bytes) -> Outcome:
        request = decode_info_request(data)
        info = self.resolve(request.name)
        if info is None:
            return Outcome(
                self._error(option, Rep.ERR_UNKNOWN, f"no export named {request.name!r}")
            )
        flags = transmission_flags(info, structured=self.structured)
        parts = [encode_option_reply(option, Rep.INFO, encode_info_export(info.size, flags))]
        for wanted in dict.fromkeys(request.requests):  # answer each kind once, in order
            if wanted == Info.NAME:
                parts.append(encode_option_reply(option, Rep.INFO, encode_info_name(info.name)))
            elif wanted == Info.DESCRIPTION and info.description:
                parts.append(
                    encode_option_reply(option, Rep.INFO, encode_info_description(info.description))
                )
            elif wanted == Info.BLOCK_SIZE:
                parts.append(self._block_size_info(option, info))
        unusual = info.max_block < MAX_PAYLOAD or info.min_block > MIN_BLOCK
        if unusual and Info.BLOCK_SIZE not in request.requests:
            # Limits other than the protocol's usual ones (1 byte to 32 MiB) are sent unasked:
            # a client that ignores them is answered EINVAL, never left waiting.
            parts.append(self._block_size_info(option, info))
        parts.append(encode_option_reply(option, Rep.ACK))
        if option == Opt.INFO:
            return Outcome(b"".join(parts))
        if self.meta_export is not None and self.meta_export != info.name:
            # Contexts were chosen for another export; they do not carry over.
            self.meta_context_id = None
        return Outcome(b"".join(parts), export=info)

    @staticmethod
    def _block_size_info(option: int, info: ExportInfo) -> bytes:
        preferred = max(info.min_block, min(PREFERRED_BLOCK, info.max_block))
        block = encode_info_block_size(info.min_block, preferred, info.max_block)
        return encode_option_reply(option, Rep.INFO, block)

    def _meta_context(self, option: int, data: bytes) -> Outcome:
        if not self.structured:
            return Outcome(
                self._error(option, Rep.ERR_INVALID, "negotiate structured replies first")
            )
        request = decode_meta_context_request(data)
        info = self.resolve(request.name)
        if info is None:
            return Outcome(
                self._error(option, Rep.ERR_UNKNOWN, f"no export named {request.name!r}")
            )
        matches = _match_contexts(request.queries, listing=option == Opt.LIST_META_CONTEXT)
        parts: list[bytes] = []
        if option == Opt.SET_META_CONTEXT:
            self.meta_export = info.name
            self.meta_context_id = BASE_ALLOCATION_ID if matches else None
            context_id = BASE_ALLOCATION_ID
        else:
            context_id = 0
        for name in matches:
            parts.append(
                encode_option_reply(option, Rep.META_CONTEXT, encode_meta_context(context_id, name))
            )
        parts.append(encode_option_reply(option, Rep.ACK))
        return Outcome(b"".join(parts))

    def _error(self, option: int, reply: int, message: str) -> bytes:
        # An error message is a protocol string: at most MAX_NAME bytes of UTF-8. Messages quote
        # the client's names, which may themselves be MAX_NAME bytes long, so cut on a character
        # boundary rather than send an over-long or broken string.
        raw = message.encode()[:MAX_NAME].decode(errors="ignore").encode()
        return encode_option_reply(option, reply, raw)


def _match_contexts(queries: Sequence[str], *, listing: bool) -> list[str]:
    """Which of our contexts (only base:allocation) the queries select."""
    if not queries:
        return [BASE_ALLOCATION] if listing else []
    for query in queries:
        if query == BASE_ALLOCATION or (listing and query == "base:"):
            return [BASE_ALLOCATION]
    return []
