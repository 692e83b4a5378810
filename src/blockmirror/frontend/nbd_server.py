"""NBD export: the asyncio adapter between the NBD codec and the block-device service.

One :class:`NbdServer` listens on one address and serves one or more exports, each a
:class:`~blockmirror.blockdev.service.BlockDevice`. Each connection is an
:class:`asyncio.BufferedProtocol` (cheaper than streams per request) that reads into the unit's
receive arenas (:mod:`nbd_buffers`), so a WRITE's payload is where the kernel put it, never
copied by us: bytes are fed to the codec (:mod:`nbd_protocol`), options to
the negotiation (:mod:`nbd_negotiation`), and each request becomes one call of the service,
which validates and dispatches it; its errors (errno values) become NBD error numbers here. What
stays here is NBD's and the socket's: command flags, structured replies, READ replies sent piece
by piece, the reply queue and its flow control. Many requests may be in flight; replies go out
as they complete, corked so that the replies produced in one loop iteration leave in one send,
and replies to changes leave only once the service's commit gate allows.

Memory is bounded unit-wide by :class:`~blockmirror.frontend.nbd_limits.NbdLimits`, shared by
every server of a unit: a cap on connections, and a budget for reply bytes in flight. A READ's
data is not read when the request arrives but when its reply is sent, one piece (at most
:attr:`NbdLimits.piece`) at a time, and only while the client takes what was sent before; each
piece is taken from the budget and given back as the socket drains it. A client that pipelines
huge READs and never reads the replies thus holds one piece, not the whole replies. A connection
that cannot get budget stops sending and stops reading requests until some comes back:
back-pressure, never an error.

Why one module: a connection's reading, its reply queue (corking, READ pieces within the
budget), its commit gate and its drain on DISC or shutdown share one flow-control state (writing
paused, waiting for budget, requests in flight, draining); split, each part would reach into the
others' flags. The server around the connections is a few lines and goes with them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from blockmirror.blockdev.service import BlockDevice, Pending, ReplyGate, RequestError
from blockmirror.errors import ProtocolError
from blockmirror.frontend import nbd_protocol as p
from blockmirror.frontend.nbd_buffers import MIN_FREE
from blockmirror.frontend.nbd_limits import NbdLimits
from blockmirror.frontend.nbd_negotiation import ExportInfo, Negotiation, Outcome

log = logging.getLogger(__name__)

# Stop reading from a client that has this much outstanding, so a fast writer in front of a slow
# sync cannot make us buffer without bound. Reading resumes as requests complete.
MAX_INFLIGHT_REQUESTS = 512
MAX_INFLIGHT_BYTES = 128 * 1024 * 1024
# Replies bigger than this are written on their own rather than joined (joining copies).
JOIN_LIMIT = 256 * 1024
# Seconds a client has from connecting to choosing an export.
HANDSHAKE_TIMEOUT = 30
# Block status: never answer with more extents than this in one reply.
MAX_EXTENTS = 1024
# Seconds a connection refused for the connection limit may stay to read why.
REFUSED_TIMEOUT = 5

# Plain ints for the per-request dispatch: comparing with them costs no enum attribute lookup,
# and ``flags & int`` builds no IntFlag.
_READ, _WRITE, _DISC, _FLUSH = int(p.Cmd.READ), int(p.Cmd.WRITE), int(p.Cmd.DISC), int(p.Cmd.FLUSH)
_TRIM, _CACHE, _ZEROES = int(p.Cmd.TRIM), int(p.Cmd.CACHE), int(p.Cmd.WRITE_ZEROES)
_BLOCK_STATUS = int(p.Cmd.BLOCK_STATUS)
_FUA, _DF, _NO_HOLE = int(p.CmdFlag.FUA), int(p.CmdFlag.DF), int(p.CmdFlag.NO_HOLE)
_FAST_ZERO, _REQ_ONE = int(p.CmdFlag.FAST_ZERO), int(p.CmdFlag.REQ_ONE)

# The service's errno values as NBD error numbers (the protocol's own, not the host's); any
# other errno is EIO, the protocol's "something went wrong with the I/O".
_NBD_ERRORS = {
    errno.ENOSPC: p.ENOSPC,
    errno.EDQUOT: p.ENOSPC,
    errno.EPERM: p.EPERM,
    errno.EACCES: p.EPERM,
    errno.EROFS: p.EPERM,
    errno.EINVAL: p.EINVAL,
    errno.EOPNOTSUPP: p.ENOTSUP,
    errno.ENOMEM: p.ENOMEM,
}


def nbd_error(code: int) -> int:
    """The NBD error number for an errno value of the service."""
    return _NBD_ERRORS.get(code, p.EIO)


def export_info(device: BlockDevice) -> ExportInfo:
    """What negotiation tells a client about ``device``."""
    return ExportInfo(
        name=device.name,
        size=device.size,
        description=device.description,
        read_only=device.read_only,
        can_fast_zero=device.can_fast_zero(),
        max_block=min(p.MAX_PAYLOAD, device.max_write),
        min_block=device.min_block,
    )


@dataclass(slots=True, eq=False)
class _ReadReply:
    """A READ's reply still to be sent: its data is read piece by piece as it leaves."""

    device: BlockDevice
    cookie: int
    offset: int
    length: int
    structured: bool
    sent: int = 0  # bytes of data sent so far; the header goes with the first piece

    @property
    def remaining(self) -> int:
        return self.length - self.sent


_Item = bytes | bytearray | memoryview | _ReadReply


def _item_size(item: _Item) -> int:
    return item.remaining if isinstance(item, _ReadReply) else len(item)


class NbdServer:
    """Listens on one address and serves the given exports by name."""

    def __init__(self, exports: Mapping[str, BlockDevice], limits: NbdLimits | None = None) -> None:
        self.exports = dict(exports)
        self.limits = limits if limits is not None else NbdLimits()
        self.connections: set[NbdConnection] = set()
        self._server: asyncio.Server | None = None
        self.accepting = False

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server is not listening")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: NbdConnection(self), host, port, reuse_address=True, backlog=256
        )
        self.accepting = True
        return self.address

    def lookup(self, name: str) -> ExportInfo | None:
        device = self.exports.get(name)
        return export_info(device) if device is not None else None

    def list_exports(self) -> Sequence[ExportInfo]:
        return [export_info(device) for device in self.exports.values()]

    def stop_reading(self) -> None:
        """Stop accepting connections and reading requests, at once; replies still go out."""
        self.accepting = False
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.begin_drain()

    async def shutdown(self, grace: float = 4.0) -> None:
        """Stop accepting, let requests already received finish, then close every connection."""
        self.stop_reading()
        waits = [conn.drained for conn in list(self.connections)]
        if waits:
            _, _pending = await asyncio.wait(waits, timeout=grace)
            for conn in list(self.connections):
                conn.abort()
        if self._server is not None:
            await self._server.wait_closed()


class NbdConnection(asyncio.BufferedProtocol):
    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.limits = server.limits
        # The arena the socket reads into, and where its unread part begins.
        self._arena: memoryview | None = None
        self._arena_pos = 0
        self.codec = p.NbdServerCodec()
        self.negotiation = Negotiation(server.lookup, server.list_exports)
        # The export chosen in negotiation, and the commit gate of this connection's changes.
        self.device: BlockDevice | None = None
        self.gate: ReplyGate | None = None
        self.transport: asyncio.Transport | None = None
        self.inflight = 0
        self.inflight_bytes = 0
        self.draining = False
        self.closed = False
        self.drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()
        # Replies in the order they leave; a READ's data is read only when its turn comes.
        self._out: deque[_Item] = deque()
        self._out_size = 0
        self.reserved = 0  # reply bytes this connection holds of the unit's budget
        self._waiting_budget = False
        self._counted = False
        self._flush_scheduled = False
        self._in_batch = False
        self._reading = True
        self._write_paused = False
        self._vectored = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._eof = False

    # --- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self._vectored = not isinstance(transport, asyncio.Transport)
        if not self.server.accepting:
            self.transport.abort()
            return
        self.server.connections.add(self)
        timeout = HANDSHAKE_TIMEOUT
        if self.limits.admit():
            self._counted = True
        else:
            # One too many: the greeting, then every option is refused with the reason.
            limit = self.limits.max_connections
            self.negotiation.refusal = f"too many NBD connections (limit {limit}); try again later"
            log.warning(
                "refusing NBD connection from %s: %d connections is the limit",
                self._peer(),
                limit,
            )
            timeout = REFUSED_TIMEOUT
        # A client that never finishes negotiating must not hold a connection forever.
        self._handshake_timer = self._loop.call_later(timeout, self._handshake_expired)
        self.transport.write(p.encode_greeting())

    def get_buffer(self, sizehint: int) -> memoryview:
        arena = self._arena
        if arena is None or len(arena) - self._arena_pos < MIN_FREE:
            # Dropped here: the old arena is pinned only by the views handed on from it.
            arena = self._arena = self.limits.arenas.take()
            self._arena_pos = 0
        return arena[self._arena_pos :]

    def buffer_updated(self, nbytes: int) -> None:
        arena = self._arena
        assert arena is not None
        start = self._arena_pos
        self._arena_pos = start + nbytes
        self.data_received(arena[start : start + nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.closed or self.draining:
            return
        self.codec.feed(data)
        self._process()

    def _process(self) -> None:
        """Handle the buffered events, but stop while the client is not reading our replies.

        One receive can hold thousands of requests; answered all at once, a pipeline of 32 MiB
        READs would pile up gigabytes of replies. Replies are handed to the transport as they
        accumulate, so its ``pause_writing`` stops this loop; ``resume_writing`` restarts it.
        """
        self._in_batch = True
        try:
            while not self.closed and not self.draining:
                if self._out_size >= JOIN_LIMIT:
                    self._release()
                if self._write_paused or self._waiting_budget:
                    break
                event = self.codec.next_event()
                if event is None:
                    if self._eof:
                        self._begin_close_after_inflight()
                    break
                self._handle(event)
        except ProtocolError as exc:
            log.info("closing NBD connection from %s: %s", self._peer(), exc)
            self._flush_out()
            self._close()
        finally:
            self._in_batch = False
        self._release()
        self._update_reading()

    def _release(self) -> None:
        """Commit the write path's batch, then send the replies the commit gate allows.

        Replies to changes accepted since the last commit may claim work the write path only
        does in its commit (journal append, then volume write): they leave after it, or after
        the future it returns. When the commit or its future fails (a full or failing volume),
        the change replies among them become error replies: nothing unapplied is acknowledged,
        and the connection goes on.
        """
        gate = self.gate
        if gate is None:
            self._flush_out()
            return
        commit = gate.commit()
        pending = commit.pending
        if pending is None:
            if commit.error is not None and commit.acks:
                log.warning("write path refused a batch from %s: %s", self._peer(), commit.error)
                self._out_size += self._fail_changes(self._out, commit.acks, commit.error)
            self._flush_out()
            return
        held, self._out = self._out, deque()
        self._out_size = 0
        if held and isinstance(held[0], _ReadReply) and held[0].sent:
            # Half on the wire already: nothing may go out before its rest.
            self._send(held.popleft())
        self.inflight += 1

        def released(_: asyncio.Future[None]) -> None:
            self.inflight -= 1
            error = gate.outcome(commit)
            if error is not None:
                self._fail_changes(held, commit.acks, error)
            for chunk in held:
                self._send(chunk)
            self._maybe_finish_drain()
            self._update_reading()

        pending.add_done_callback(released)

    def eof_received(self) -> bool | None:
        # The client finished sending. Requests already received still get their replies,
        # including any still buffered because the client was slow to read (see _process).
        self._eof = True
        if not self._write_paused:
            self._begin_close_after_inflight()
        return True

    def _handshake_expired(self) -> None:
        if self.device is None and not self.closed:
            log.info(
                "closing NBD connection from %s: no export chosen in time",
                self._peer(),
            )
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.closed = True
        self.codec.close()
        self._arena = None
        self._out.clear()
        self._out_size = 0
        self.limits.forget(self)
        self.limits.give_back(self, self.reserved)
        if self._counted:
            self._counted = False
            self.limits.leave()
        if self in self.server.connections:
            self.server.connections.discard(self)
            if self.device is not None:
                self.device.detach()
        if not self.drained.done():
            self.drained.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._settle()
        self._continue()

    def settle_budget(self) -> None:
        self._settle()

    def budget_available(self) -> None:
        """Called by the limits when reply bytes came back; try again on the next turn."""
        if self._waiting_budget:
            self._waiting_budget = False
            self._loop.call_soon(self._continue)

    def _continue(self) -> None:
        if self.closed:
            return
        if self.draining:
            self._flush_out()
            self._maybe_finish_drain()
        else:
            self._process()  # replies and requests left while paused; it updates reading too

    # --- shutdown -------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop taking requests; close once the ones in flight have been answered."""
        self.draining = True
        self._begin_close_after_inflight()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def _begin_close_after_inflight(self) -> None:
        self.draining = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()
            self._reading = False
        self._maybe_finish_drain()

    def _maybe_finish_drain(self) -> None:
        if self.draining and self.inflight == 0 and not self.closed:
            if self.gate is not None and self.gate.waiting:
                # Change replies still waiting for their commit (a DISC right behind writes):
                # commit first, so a refused batch is answered with its errors.
                self._release()
                if self.inflight:
                    return  # the gate's callback comes back here
            self._flush_out()
            if not self._out:  # else READ data is still to go: resume_writing comes back here
                self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.codec.close()
            self.transport.close()

    # --- events ---------------------------------------------------------------------------------

    def _handle(self, event: p.Event) -> None:
        if isinstance(event, p.Request):
            self._request(event)
        elif isinstance(event, p.OversizedWrite):
            # Over the protocol's payload bound: the codec discards the data as it streams in.
            self._reply_error(event.cookie, p.EINVAL, f"write of {event.length} bytes is too big")
        elif isinstance(event, p.ClientFlags):
            self.negotiation.client_flags = event.flags
        else:
            self._option(self.negotiation.handle(event))

    def _option(self, outcome: Outcome) -> None:
        if outcome.reply:
            self._send(outcome.reply)
        if outcome.close:
            self._flush_out()
            self._close()
            return
        if outcome.export is not None:
            device = self.server.exports.get(outcome.export.name)
            if device is None:  # vanished between negotiation and now: treat as unknown
                self._close()
                return
            self.device = device
            self.gate = ReplyGate(device)
            device.attach()
            self.codec.start_transmission()
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()

    def _request(self, req: p.Request) -> None:
        """One request: NBD's own rules here (commands, flags), the rest in the service."""
        device = self.device
        assert device is not None
        command, cookie, flags = req.command, req.cookie, req.flags
        if command == _DISC:
            self._begin_close_after_inflight()
            return
        allowed = p.ALLOWED_CMD_FLAGS.get(command)
        if allowed is None:
            self._reply_error(cookie, p.EINVAL, f"unknown command {command}")
            return
        if flags & ~allowed or (flags & _DF and not self.negotiation.structured):
            self._reply_error(cookie, p.EINVAL, f"flags {flags:#x} not valid for {command}")
            return
        try:
            if command == _READ:
                self._read(device, req)
            elif command == _WRITE:
                pending = device.write(req.offset, req.length, req.data, fua=bool(flags & _FUA))
                self._changed(pending, req)
            elif command == _FLUSH:
                pending = device.flush()
                if pending is None:
                    self._send(p.encode_simple_reply(cookie))
                else:
                    self._track(pending, cookie, 0)
            elif command == _ZEROES:
                pending = device.write_zeroes(
                    req.offset,
                    req.length,
                    fua=bool(flags & _FUA),
                    may_trim=not flags & _NO_HOLE,
                    fast=bool(flags & _FAST_ZERO),
                )
                self._changed(pending, req)
            elif command == _TRIM:
                self._changed(device.trim(req.offset, req.length, fua=bool(flags & _FUA)), req)
            elif command == _CACHE:
                device.cache(req.offset, req.length)
                self._send(p.encode_simple_reply(cookie))
            elif command == _BLOCK_STATUS:
                self._block_status(device, req)
        except RequestError as exc:
            self._reply_error(cookie, nbd_error(exc.code), str(exc))

    # --- commands -------------------------------------------------------------------------------

    def _read(self, device: BlockDevice, req: p.Request) -> None:
        device.check_read(req.offset, req.length)
        structured = self.negotiation.structured
        if req.length > p.MAX_PAYLOAD:
            # NBD's bound on one reply, not the device's: a reply is read piece by piece.
            self._reply_error(
                req.cookie, p.EOVERFLOW if structured else p.EINVAL, "read is too big"
            )
            return
        # Read when the reply's turn to leave comes, piece by piece (see _pump).
        self._send(_ReadReply(device, req.cookie, req.offset, req.length, structured))

    def _block_status(self, device: BlockDevice, req: p.Request) -> None:
        device.check_read(req.offset, req.length)
        context_id = self.negotiation.meta_context_id
        if not self.negotiation.structured or context_id is None:
            self._reply_error(req.cookie, p.EINVAL, "no metadata context was negotiated")
            return
        extents = device.extents(req.offset, req.length)
        if req.flags & _REQ_ONE:
            extents = extents[:1]
        states = [
            (e.length, (p.STATE_HOLE if e.hole else 0) | (p.STATE_ZERO if e.zero else 0))
            for e in extents[:MAX_EXTENTS]
        ]
        self._send(p.encode_block_status_chunk(req.cookie, context_id, states))

    def _changed(self, pending: Pending, req: p.Request) -> None:
        """The service took a change: answer it now (behind the commit gate) or when done."""
        if pending is None:
            self._reply_ok_change(req.cookie)
        else:
            self._track(pending, req.cookie, req.length if req.command == _WRITE else 0)

    # --- completion and replies -----------------------------------------------------------------

    def _track(self, pending: asyncio.Future[None], cookie: int, nbytes: int) -> None:
        """Answer a request when the future the service returned for it completes."""
        device = self.device
        assert device is not None
        self.inflight += 1
        self.inflight_bytes += nbytes

        def done(f: asyncio.Future[None]) -> None:
            self.inflight -= 1
            self.inflight_bytes -= nbytes
            exc = f.exception() if not f.cancelled() else asyncio.CancelledError()
            if exc is None:
                self._send(p.encode_simple_reply(cookie))
            else:
                error = device.failure(exc, "request")
                self._reply_error(cookie, nbd_error(error.code), str(error))
            self._maybe_finish_drain()
            self._update_reading()

        pending.add_done_callback(done)

    def _reply_error(self, cookie: int, error: int, message: str) -> None:
        self._send(self._error_reply(cookie, error, message))

    def _error_reply(self, cookie: int, error: int, message: str) -> bytes:
        if self.device is not None:
            self.device.answered_error()
        log.debug("NBD error %d to %s: %s", error, self._peer(), message)
        if self.negotiation.structured:
            return p.encode_error_chunk(cookie, error, message)
        return p.encode_simple_reply(cookie, error)

    def _reply_ok_change(self, cookie: int) -> None:
        """A change's success reply, valid only once the write path commits it (_release)."""
        assert self.gate is not None
        chunk = p.encode_simple_reply(cookie)
        self.gate.ack(chunk, cookie)
        self._send(chunk)

    def _fail_changes(self, items: deque[_Item], acks: dict[int, int], error: RequestError) -> int:
        """Turn the success replies of changes the write path could not commit into errors.

        The volume said no (ENOSPC on a thin volume, EIO): the host hears exactly that for
        each change of the batch, and reads and later requests go on being served. Returns
        how many bytes longer the queue became.
        """
        grown = 0
        code = nbd_error(error.code)
        for i, item in enumerate(items):
            cookie = acks.get(id(item))
            if cookie is not None and not isinstance(item, _ReadReply):
                refusal = self._error_reply(cookie, code, str(error))
                grown += len(refusal) - len(item)
                items[i] = refusal
        return grown

    def _send(self, data: _Item) -> None:
        if self.closed:
            return
        self._out.append(data)
        self._out_size += _item_size(data)
        if self._in_batch:
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        """Send the queued replies in order, as far as the socket and the budget allow.

        Replies go out joined, in one writev per JOIN_LIMIT or so: small READs are read into
        the batch whole; a READ bigger than a piece is streamed on its own (see _pump).
        """
        self._flush_scheduled = False
        if self.closed or self.transport is None:
            self._out.clear()
            self._out_size = 0
            return
        batch: list[bytes | bytearray | memoryview] = []
        size = 0
        while self._out:
            item = self._out[0]
            if not isinstance(item, _ReadReply):
                self._out.popleft()
                self._out_size -= len(item)
                batch.append(item)
                size += len(item)
                continue
            if size >= JOIN_LIMIT or (batch and item.remaining > self.limits.piece):
                self._transmit(batch, size)
                batch, size = [], 0
                self._settle()
            if self._write_paused:
                break
            if item.sent == 0 and item.length <= self.limits.piece:
                if not self.limits.take(self, item.length):
                    self._waiting_budget = True
                    break
                self._out.popleft()
                self._out_size -= item.length
                try:
                    data = item.device.read(item.offset, item.length)
                except RequestError as exc:
                    self.limits.give_back(self, item.length)
                    self._reply_error(item.cookie, nbd_error(exc.code), str(exc))
                    continue
                header = self._read_header(item)
                batch += (header, data)
                size += len(header) + item.length
                item.device.read_done(item.length)
                continue
            before = item.remaining
            done = self._pump(item)
            self._out_size -= before - item.remaining
            if self.closed or self.transport.is_closing():
                return
            if not done:
                break
            self._out.popleft()
            self._out_size -= item.remaining  # left unsent when the read failed
        if batch:
            self._transmit(batch, size)
            self._settle()

    def _read_header(self, item: _ReadReply) -> bytes:
        if item.structured:
            return p.encode_read_chunk_header(item.cookie, item.offset, item.length)
        return p.encode_simple_reply(item.cookie)

    def _pump(self, item: _ReadReply) -> bool:
        """Read and send pieces of one READ reply; False when it must wait (socket or budget)."""
        assert self.transport is not None
        device = item.device
        while item.remaining:
            if self._write_paused:
                return False
            n = min(self.limits.piece, item.remaining)
            if not self.limits.take(self, n):
                self._waiting_budget = True
                return False
            try:
                # os.pread hands back a fresh bytes object without zero-filling it first, and
                # it goes out with the header in one writev: the data is never copied here.
                data = device.read(item.offset + item.sent, n)
            except RequestError as exc:
                self.limits.give_back(self, n)
                if item.sent == 0:
                    self._reply_error(item.cookie, nbd_error(exc.code), str(exc))
                    return True
                # Part of the data is on the wire: the reply can only be cut short by closing.
                device.answered_error()
                log.error("read failed mid-reply; closing %s: %s", self._peer(), exc)
                self.abort()
                return False
            if item.sent == 0:
                header = self._read_header(item)
                self._transmit([header, data], len(header) + n)
            else:
                self._transmit([data], n)
            item.sent += n
            self._settle()
        device.read_done(item.length)
        return True

    def _transmit(self, out: list[bytes | bytearray | memoryview], size: int) -> None:
        assert self.transport is not None
        if len(out) == 1:
            self.transport.write(out[0])
        elif self._vectored or size <= JOIN_LIMIT:
            # uvloop sends a list with one writev; stdlib asyncio joins it (a copy), which is
            # only worth it for small replies.
            self.transport.writelines(out)
        else:
            for chunk in out:
                self.transport.write(chunk)

    def _settle(self) -> None:
        """Give back the reply bytes the kernel has taken from the transport's buffer."""
        if self.reserved == 0 or self.transport is None:
            return
        buffered = 0 if self.closed else self.transport.get_write_buffer_size()
        if buffered < self.reserved:
            self.limits.give_back(self, self.reserved - buffered)

    def _update_reading(self) -> None:
        if self.transport is None or self.closed or self.draining:
            return
        busy = (
            self._write_paused
            or self._waiting_budget
            or self.inflight >= MAX_INFLIGHT_REQUESTS
            or self.inflight_bytes + self.codec.buffered >= MAX_INFLIGHT_BYTES
            or self._out_size >= MAX_INFLIGHT_BYTES
        )
        if busy and self._reading:
            self.transport.pause_reading()
            self._reading = False
        elif not busy and not self._reading:
            self.transport.resume_reading()
            self._reading = True

    def _peer(self) -> str:
        if self.transport is None:
            return "?"
        peer = self.transport.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if peer else "?"
