"""The NBD adapter over the block-device service, on a fake transport (no sockets).

What the adapter itself owes: replies to changes wait behind the service's commit gate; the
service's errno values become NBD error numbers; and no failure of the write path escapes a
protocol callback (the issue 8 bug: a write path failed with a VolumeError made the next WRITE
raise out of ``data_received``, and asyncio dropped the connection).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from blockmirror.blockdev.service import BlockDevice, Pending
from blockmirror.blockdev.writepath import Buffer
from blockmirror.errors import VolumeError
from blockmirror.frontend import nbd_protocol as p
from blockmirror.frontend.nbd_server import NbdConnection, NbdServer
from blockmirror.store.volume import Volume
from tests.fault.rawnbd import (
    C_FIXED_NEWSTYLE,
    C_NO_ZEROES,
    CMD_FLAG_FAST_ZERO,
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    OPT_GO,
    info_request,
    option,
    request,
)

SIZE = 1024 * 1024


class FakeTransport(asyncio.Transport):
    """Collects what the connection writes; the kernel takes everything at once."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.sent += data

    def writelines(self, list_of_data: Iterable[Any]) -> None:
        for data in list_of_data:
            self.sent += data

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 10809) if name == "peername" else default

    def take(self) -> bytes:
        out, self.sent = bytes(self.sent), bytearray()
        return out


class GatedWritePath:
    """Writes to the store at once, but makes commit() return ``gate`` (the journal's group
    commit in miniature), or raise ``failed`` for every change once set."""

    def __init__(self, store: Volume) -> None:
        self.store = store
        self.gate: asyncio.Future[None] | None = None
        self.failed: BaseException | None = None

    def write(self, offset: int, data: Sequence[Buffer], *, fua: bool) -> Pending:
        if self.failed is not None:
            raise self.failed
        self.store.pwritev(offset, data)
        return None

    def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool) -> Pending:
        if self.failed is not None:
            raise self.failed
        self.store.write_zeroes(offset, length, may_trim=may_trim)
        return None

    def trim(self, offset: int, length: int, *, fua: bool) -> Pending:
        if self.failed is not None:
            raise self.failed
        return None

    def flush(self) -> Pending:
        if self.failed is not None:
            raise self.failed
        return None

    def can_fast_zero(self) -> bool:
        return False

    def max_write(self) -> int:
        return 64 * 1024

    def commit(self) -> Pending:
        if self.failed is not None:
            raise self.failed
        gate, self.gate = self.gate, None
        return gate


def replies(raw: bytes, read_lengths: dict[int, int] | None = None) -> list[tuple[int, int]]:
    """Simple replies as (cookie, error), skipping the data of successful READs."""
    out = []
    pos = 0
    while pos < len(raw):
        magic, error, cookie = struct.unpack_from(">IIQ", raw, pos)
        assert magic == p.SIMPLE_REPLY_MAGIC
        pos += 16
        if error == 0 and read_lengths and cookie in read_lengths:
            pos += read_lengths[cookie]
        out.append((cookie, error))
    assert pos == len(raw)
    return out


async def connected(device: BlockDevice) -> tuple[NbdConnection, FakeTransport]:
    """A connection that has negotiated ``vol`` (simple replies) and sent nothing since."""
    server = NbdServer({"vol": device})
    server.accepting = True
    conn = NbdConnection(server)
    transport = FakeTransport()
    conn.connection_made(transport)
    conn.data_received(struct.pack(">I", C_FIXED_NEWSTYLE | C_NO_ZEROES))
    conn.data_received(option(OPT_GO, info_request("vol")))
    await settle()
    assert conn.device is device
    transport.take()
    return conn, transport


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_replies_behind_a_pending_commit_are_held_then_released(tmp_path: Path) -> None:
    async def main() -> None:
        store = Volume.open(tmp_path / "vol.img", size=SIZE)
        write_path = GatedWritePath(store)
        device = BlockDevice("vol", store, write_path)
        conn, transport = await connected(device)
        try:
            gate = write_path.gate = asyncio.get_running_loop().create_future()
            conn.data_received(
                request(CMD_WRITE, 0, 4, cookie=1, data=b"abcd") + request(CMD_READ, 0, 4, cookie=2)
            )
            await settle()
            assert transport.take() == b"", "a reply left before the commit it depends on"
            gate.set_result(None)
            await settle()
            assert replies(transport.take(), {2: 4}) == [(1, 0), (2, 0)]

            # A commit that fails: the change's success reply becomes the error; the read not.
            gate = write_path.gate = asyncio.get_running_loop().create_future()
            conn.data_received(
                request(CMD_WRITE, 0, 4, cookie=3, data=b"efgh") + request(CMD_READ, 0, 4, cookie=4)
            )
            await settle()
            assert transport.take() == b""
            gate.set_exception(OSError(28, "No space left on device"))
            await settle()
            assert replies(transport.take(), {4: 4}) == [(3, p.ENOSPC), (4, 0)]
            assert device.counters.errors == 1
            assert not transport.closed
        finally:
            conn.connection_lost(None)
            store.close()

    asyncio.run(main())


def test_a_failed_write_path_is_answered_eio_and_the_connection_stays(tmp_path: Path) -> None:
    async def main() -> None:
        store = Volume.open(tmp_path / "vol.img", size=SIZE)
        store.pwrite(0, b"kept")
        write_path = GatedWritePath(store)
        device = BlockDevice("vol", store, write_path)
        conn, transport = await connected(device)
        try:
            write_path.failed = VolumeError("the store went away")
            # Before the fix this raised VolumeError out of data_received.
            conn.data_received(
                request(CMD_WRITE, 0, 4, cookie=1, data=b"lost")
                + request(CMD_WRITE_ZEROES, 0, 4, cookie=2)
                + request(CMD_FLUSH, cookie=3)
                + request(CMD_READ, 0, 4, cookie=4)
            )
            await settle()
            raw = transport.take()
            assert replies(raw, {4: 4}) == [(1, p.EIO), (2, p.EIO), (3, p.EIO), (4, 0)]
            assert raw.endswith(b"kept")
            assert not transport.closed and not conn.closed
        finally:
            conn.connection_lost(None)
            store.close()

    asyncio.run(main())


def test_service_refusals_become_nbd_error_numbers(tmp_path: Path) -> None:
    async def main() -> None:
        store = Volume.open(tmp_path / "vol.img", size=SIZE)
        device = BlockDevice("vol", store, GatedWritePath(store))
        conn, transport = await connected(device)
        try:
            big = 64 * 1024 + 1
            conn.data_received(
                request(CMD_WRITE, SIZE - 2, 4, cookie=1, data=b"abcd")  # past the end
                + request(CMD_WRITE, 0, big, cookie=2, data=bytes(big))  # over max_write
                + request(CMD_WRITE_ZEROES, 0, 4096, flags=CMD_FLAG_FAST_ZERO, cookie=3)
                + request(CMD_READ, SIZE, 1, cookie=4)  # past the end
                + request(CMD_READ, 0, 0, cookie=5)  # empty
            )
            await settle()
            assert replies(transport.take()) == [
                (1, p.ENOSPC),
                (2, p.EINVAL),
                (3, p.ENOTSUP),
                (4, p.EINVAL),
                (5, p.EINVAL),
            ]
            assert store.pread(SIZE - 2, 2) == bytes(2)
        finally:
            conn.connection_lost(None)
            store.close()

    asyncio.run(main())


def test_a_read_only_device_refuses_changes_with_eperm(tmp_path: Path) -> None:
    async def main() -> None:
        store = Volume.open(tmp_path / "vol.img", size=SIZE)
        device = BlockDevice("vol", store, GatedWritePath(store), read_only=True)
        conn, transport = await connected(device)
        try:
            conn.data_received(request(CMD_WRITE, 0, 4, cookie=1, data=b"abcd"))
            await settle()
            assert replies(transport.take()) == [(1, p.EPERM)]
            assert store.pread(0, 4) == bytes(4)
        finally:
            conn.connection_lost(None)
            store.close()

    asyncio.run(main())
