"""The project's own NBD client (asyncio), used by the demo and the tests.

Fixed newstyle, NBD_OPT_GO, simple replies; many requests may be in flight at once. It is a
well-behaved client, the counterpart that bad-input tests check is still served.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from dataclasses import dataclass

from blockmirror.errors import BlockmirrorError, ProtocolError
from blockmirror.frontend import nbd_protocol as p


class NbdRequestError(BlockmirrorError):
    """The server answered a request with an NBD error number."""

    def __init__(self, command: str, error: int) -> None:
        self.error = error
        super().__init__(f"NBD {command} failed with error {error}")


class NbdOptionError(BlockmirrorError):
    """The server refused an option during negotiation."""

    def __init__(self, option: int, reply: int, message: str) -> None:
        self.reply = reply
        super().__init__(f"option {option} refused ({reply:#x}): {message}")


@dataclass(frozen=True, slots=True)
class ExportDetails:
    name: str
    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = p.MAX_PAYLOAD


class NbdClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._cookies = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[bytes], int, str]] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self.export: ExportDetails | None = None

    # --- connection -----------------------------------------------------------------------------

    @classmethod
    async def connect(cls, host: str, port: int, name: str) -> NbdClient:
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        try:
            await client._handshake()
            client.export = await client._go(name)
        except BaseException:
            writer.close()
            raise
        client._reader_task = asyncio.create_task(client._read_replies())
        return client

    @classmethod
    async def list_exports(cls, host: str, port: int) -> list[str]:
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        try:
            await client._handshake()
            client._send_option(p.Opt.LIST, b"")
            names = []
            while True:
                reply, data = await client._option_reply(p.Opt.LIST)
                if reply == p.Rep.ACK:
                    break
                (n,) = struct.unpack_from(">I", data)
                names.append(data[4 : 4 + n].decode())
            client._send_option(p.Opt.ABORT, b"")
            return names
        finally:
            writer.close()

    async def _handshake(self) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", await self._reader.readexactly(18))
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise ProtocolError("not an NBD newstyle server")
        if not flags & p.FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("server does not speak fixed newstyle")
        client_flags = p.CLIENT_FLAG_FIXED_NEWSTYLE
        if flags & p.FLAG_NO_ZEROES:
            client_flags |= p.CLIENT_FLAG_NO_ZEROES
        self._writer.write(struct.pack(">I", client_flags))

    def _send_option(self, option: int, data: bytes) -> None:
        self._writer.write(struct.pack(">QII", p.IHAVEOPT, option, len(data)) + data)

    async def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, reply, length = struct.unpack(">QIII", await self._reader.readexactly(20))
        if magic != p.OPTION_REPLY_MAGIC or opt != option:
            raise ProtocolError("malformed option reply")
        data = await self._reader.readexactly(length) if length else b""
        if reply & p.REP_ERROR_BIT:
            raise NbdOptionError(option, reply, data.decode(errors="replace"))
        return reply, data

    async def _go(self, name: str) -> ExportDetails:
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, p.Info.BLOCK_SIZE)
        self._send_option(p.Opt.GO, data)
        size = flags = 0
        blocks = (1, 4096, p.MAX_PAYLOAD)
        while True:
            reply, payload = await self._option_reply(p.Opt.GO)
            if reply == p.Rep.ACK:
                break
            if reply != p.Rep.INFO or len(payload) < 2:
                continue
            (kind,) = struct.unpack_from(">H", payload)
            if kind == p.Info.EXPORT:
                _, size, flags = struct.unpack(">HQH", payload)
            elif kind == p.Info.BLOCK_SIZE:
                _, *sizes = struct.unpack(">HIII", payload)
                blocks = (sizes[0], sizes[1], sizes[2])
        return ExportDetails(name, size, flags, *blocks)

    # --- transmission ---------------------------------------------------------------------------

    def _submit(
        self, command: int, offset: int, length: int, flags: int = 0, data: bytes = b""
    ) -> asyncio.Future[bytes]:
        if self._reader_task is None or self._reader_task.done():
            raise ProtocolError("connection is closed")
        cookie = next(self._cookies)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        read_len = length if command == p.Cmd.READ else 0
        self._pending[cookie] = (fut, read_len, p.Cmd(command).name)
        header = struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, command, cookie, offset, length)
        if data:
            self._writer.writelines([header, data])
        else:
            self._writer.write(header)
        return fut

    async def _read_replies(self) -> None:
        try:
            while True:
                magic, error, cookie = struct.unpack(">IIQ", await self._reader.readexactly(16))
                if magic != p.SIMPLE_REPLY_MAGIC:
                    raise ProtocolError(f"unexpected reply magic {magic:#x}")
                entry = self._pending.pop(cookie, None)
                if entry is None:
                    raise ProtocolError(f"reply for unknown cookie {cookie}")
                fut, read_len, command = entry
                if error:
                    fut.set_exception(NbdRequestError(command, error))
                    continue
                payload = await self._reader.readexactly(read_len) if read_len else b""
                if not fut.done():
                    fut.set_result(payload)
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError) as exc:
            for fut, _, _ in self._pending.values():
                if not fut.done():
                    fut.set_exception(ProtocolError(f"connection lost: {exc}"))
            self._pending.clear()

    async def read(self, offset: int, length: int) -> bytes:
        return await self._submit(p.Cmd.READ, offset, length)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        flags = p.CmdFlag.FUA if fua else 0
        await self._submit(p.Cmd.WRITE, offset, len(data), flags, data)

    async def flush(self) -> None:
        await self._submit(p.Cmd.FLUSH, 0, 0)

    async def trim(self, offset: int, length: int) -> None:
        await self._submit(p.Cmd.TRIM, offset, length)

    async def write_zeroes(self, offset: int, length: int, *, no_hole: bool = False) -> None:
        await self._submit(p.Cmd.WRITE_ZEROES, offset, length, p.CmdFlag.NO_HOLE if no_hole else 0)

    async def drain(self) -> None:
        await self._writer.drain()

    async def close(self) -> None:
        """Send DISC after every outstanding request is answered, then close."""
        pending = [fut for fut, _, _ in self._pending.values()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        try:
            self._writer.write(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.DISC, 0, 0, 0))
            await self._writer.drain()
        except ConnectionError:
            pass
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
