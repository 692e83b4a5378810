"""Issue 8, item 7: a failed write path reaches the host as an NBD error, never a dropped link.

Once the journaled write path has failed (``JournalWritePath.failed`` holds whatever ended it: a
``VolumeError``, a ``JournalError``, ...), every later change is refused with that exception.
Before, only ``OSError`` and the two range errors were caught: the next WRITE raised out of
``NbdConnection.data_received``, asyncio logged "protocol.data_received() call failed", and the
host saw its connection dropped instead of EIO. Now every change on that volume is answered EIO,
reads go on being served on the same connection, and new connections are served too.

The export here is in-process (a real NBD server on 127.0.0.1, a real journal and volume files
in a tmp dir) so that the volume store can be made to fail with an exception that is not an
``OSError``: a store that has gone away under the write path. The client is the raw one of
these tests, which says exactly what goes on the wire.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.blockdev.service import BlockDevice
from blockmirror.errors import BlockmirrorError, JournalError, VolumeError, WritePathError
from blockmirror.frontend.nbd_server import NbdServer
from blockmirror.journal.journal import Journal
from blockmirror.store.volume import Volume
from tests.fault.rawnbd import (
    CHUNK_ERROR,
    CHUNK_FLAG_DONE,
    CHUNK_OFFSET_DATA,
    CMD_FLAG_FUA,
    CMD_FLUSH,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EIO,
    MiB,
    RawNbd,
    parse_error_chunk,
)

pytestmark = pytest.mark.fault

SIZE = 8 * MiB
GOOD = b"\x5a" * 4096
# What asyncio logs when an exception escapes a protocol callback; the bug's signature.
# What asyncio logs when a protocol callback raises (the connection is a BufferedProtocol now,
# whose data arrives through buffer_updated; data_received is what it calls).
ESCAPED = ("data_received() call failed", "buffer_updated() call failed")

Buffer = bytes | bytearray | memoryview


class FailingStore(Volume):
    """A real volume file whose changes fail with ``error`` once ``broken`` is set.

    Reads keep working: the point is that a write path that failed still serves them. Zeroing
    is reported as slow, so the journaled write path applies it in a worker thread (the way a
    block device without a zeroing ioctl is served).
    """

    broken = False
    error: Callable[[str], BaseException] = VolumeError
    writes_fail = True

    def _check(self) -> None:
        if self.broken:
            raise self.error(f"{self.path}: the store went away")

    def can_fast_zero(self) -> bool:
        return False

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool) -> None:
        self._check()
        super().write_zeroes(offset, length, may_trim=may_trim)

    def trim(self, offset: int, length: int) -> None:
        self._check()
        super().trim(offset, length)

    def pwrite(self, offset: int, data: Buffer) -> None:
        if self.writes_fail:
            self._check()
        super().pwrite(offset, data)

    def pwritev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        if self.writes_fail:
            self._check()
        super().pwritev(offset, buffers)


def serve(
    tmp_path: Path,
    scenario: Callable[[tuple[str, int], FailingStore, JournalWritePath], None],
    *,
    error: Callable[[str], BaseException] = VolumeError,
    writes_fail: bool = True,
) -> None:
    """Run ``scenario(address, store, write_path)`` in a thread against an in-process export."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        store = FailingStore.open(tmp_path / "vol.img", size=SIZE)
        assert isinstance(store, FailingStore)
        store.error = error
        store.writes_fail = writes_fail
        journal = Journal.open(
            tmp_path / "vol.journal",
            volume=store,
            journal_size=2 * MiB,
            consumers=[],
            dirty_dir=tmp_path,
            volume_name="vol",
        )
        write_path = JournalWritePath(journal, store, loop)
        write_path.start()
        server = NbdServer({"vol": BlockDevice("vol", store, write_path)})
        try:
            address = await server.start("127.0.0.1", 0)
            await asyncio.to_thread(scenario, address, store, write_path)
        finally:
            await server.shutdown()
            await write_path.close()
            store.close()

    asyncio.run(main())


def break_write_path(conn: RawNbd, store: FailingStore, write_path: JournalWritePath) -> None:
    """A good write, then a WRITE_ZEROES the store refuses: the write path fails for good."""
    assert conn.call(CMD_WRITE, 0, 4096, cookie=1, data=GOOD) == 0
    store.broken = True
    assert conn.call(CMD_WRITE_ZEROES, 8192, 4096, cookie=2) == EIO
    assert isinstance(write_path.failed, BlockmirrorError)
    assert not isinstance(write_path.failed, OSError)


def assert_no_escape(caplog: pytest.LogCaptureFixture) -> None:
    assert not any(text in caplog.text for text in ESCAPED), caplog.text
    assert "Traceback" not in caplog.text, caplog.text


@pytest.mark.parametrize("error", [VolumeError, JournalError, WritePathError])
def test_every_change_after_the_write_path_failed_is_eio_and_reads_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Callable[[str], BaseException]
) -> None:
    caplog.set_level(logging.WARNING)

    def scenario(
        address: tuple[str, int], store: FailingStore, write_path: JournalWritePath
    ) -> None:
        with RawNbd(address) as conn:
            conn.session("vol")
            break_write_path(conn, store, write_path)
            # The bug: this WRITE raised out of data_received and the connection dropped.
            assert conn.call(CMD_WRITE, 4096, 4096, cookie=3, data=GOOD) == EIO
            assert conn.call(CMD_WRITE, 4096, 4096, flags=CMD_FLAG_FUA, cookie=4, data=GOOD) == EIO
            assert conn.call(CMD_WRITE_ZEROES, 0, 4096, cookie=5) == EIO
            assert conn.call(CMD_TRIM, 0, 4096, cookie=6) == EIO
            assert conn.call(CMD_FLUSH, cookie=7) == EIO
            # Same connection: reads are served, and show what was written before the failure.
            assert conn.read(0, 4096, cookie=8) == GOOD
            assert conn.read(4096, 4096, cookie=9) == bytes(4096)
        # Structured replies: the refusal is an ERROR chunk carrying EIO and a message.
        with RawNbd(address) as conn:
            conn.session("vol", structured=True)
            [chunk] = conn.call_structured(CMD_WRITE, 0, 512, cookie=10, data=GOOD[:512])
            assert chunk.type == CHUNK_ERROR and chunk.flags & CHUNK_FLAG_DONE
            code, message = parse_error_chunk(chunk)
            assert code == EIO and message
            [chunk] = conn.call_structured(0, 0, 512, cookie=11)
            assert chunk.type == CHUNK_OFFSET_DATA
            assert chunk.payload == struct.pack(">Q", 0) + GOOD[:512]

    serve(tmp_path, scenario, error=error, writes_fail=False)
    assert_no_escape(caplog)


def test_pipelined_writes_after_the_failure_each_get_eio(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Many changes in one segment: each is answered, in step, and the READ behind them too."""
    caplog.set_level(logging.WARNING)

    def scenario(
        address: tuple[str, int], store: FailingStore, write_path: JournalWritePath
    ) -> None:
        with RawNbd(address) as conn:
            conn.session("vol")
            break_write_path(conn, store, write_path)
            for cookie in range(100, 132):
                conn.send_request(CMD_WRITE, 0, 4096, cookie=cookie, data=GOOD)
            conn.send_request(0, 0, 4096, cookie=200)
            errors = {conn.read_simple_reply() for _ in range(32)}
            assert {(r.error, r.cookie) for r in errors} == {(EIO, c) for c in range(100, 132)}
            reply = conn.read_simple_reply()
            assert (reply.error, reply.cookie) == (0, 200)
            assert conn.recv_exact(4096) == GOOD

    serve(tmp_path, scenario, writes_fail=False)
    assert_no_escape(caplog)


def test_a_volume_write_that_fails_the_write_path_is_answered_eio(tmp_path: Path) -> None:
    """The store refuses the plain write itself (applied on the event loop, in commit)."""

    def scenario(
        address: tuple[str, int], store: FailingStore, write_path: JournalWritePath
    ) -> None:
        with RawNbd(address, timeout=3) as conn:
            conn.session("vol")
            assert conn.call(CMD_WRITE, 0, 4096, cookie=1, data=GOOD) == 0
            store.broken = True
            assert conn.call(CMD_WRITE, 4096, 4096, cookie=2, data=GOOD) == EIO
            assert conn.call(CMD_WRITE, 4096, 4096, cookie=3, data=GOOD) == EIO
            assert conn.read(0, 4096, cookie=4) == GOOD

    serve(tmp_path, scenario)
