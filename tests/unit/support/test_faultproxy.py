"""The fault proxy: every fault has its effect, against a small echo server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import socket
import socketserver
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from tests.support.faultproxy import FaultProxy, ThreadedFaultProxy

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("error::ResourceWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]

MiB = 1 << 20
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(autouse=True)
def _no_logged_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Neither asyncio nor the proxy may log a warning or error (unretrieved exceptions, ...)."""
    caplog.set_level(logging.DEBUG)
    yield
    bad = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name in ("asyncio", "tests.support.faultproxy")
    ]
    assert not bad, [r.getMessage() for r in bad]


class EchoServer:
    """Echoes every byte back; records per connection how it ended and the sizes it read."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = 0
        self.read_sizes: list[int] = []
        self.outcomes: list[str] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return ("127.0.0.1", int(self._server.sockets[0].getsockname()[1]))

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._echo(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        outcome = "eof"
        try:
            while data := await reader.read(65536):
                self.read_sizes.append(len(data))
                self.received += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionResetError:
            outcome = "reset"
        except OSError as e:
            outcome = type(e).__name__
        self.outcomes.append(outcome)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        self._writers.discard(writer)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


def run(test: Callable[[FaultProxy, EchoServer], Awaitable[None]]) -> None:
    """Run ``test`` against a proxy in front of an echo server; check nothing is left behind."""

    async def main() -> None:
        echo = EchoServer()
        proxy = FaultProxy(await echo.start())
        await proxy.start()
        try:
            await test(proxy, echo)
        finally:
            await proxy.stop()
            await echo.stop()
        await asyncio.sleep(0)
        leftover = asyncio.all_tasks() - {asyncio.current_task()}
        assert not leftover, leftover

    asyncio.run(main())


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[Streams]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def roundtrip(streams: Streams, message: bytes) -> bytes:
    reader, writer = streams
    writer.write(message)
    await writer.drain()
    async with asyncio.timeout(5):
        return await reader.readexactly(len(message))


async def attempt(port: int, *, send: bool = True) -> str:
    """Open a new connection: "ok" (echoed), "eof", "reset", "timeout" or "refused"."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:  # the reset can arrive before the connect completes
        return "reset"
    try:
        async with asyncio.timeout(2):
            if send:
                writer.write(b"ping")
                await writer.drain()
            data = b""
            while len(data) < 4 and (chunk := await reader.read(4 - len(data))):
                data += chunk
        if data == b"ping":
            return "ok"
        return "eof" if not data else f"data {data!r}"
    except ConnectionError:
        return "reset"
    except TimeoutError:
        return "timeout"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


async def read_until(reader: asyncio.StreamReader, nbytes: int) -> list[bytes]:
    """The reads (as returned) that together make ``nbytes`` bytes."""
    reads: list[bytes] = []
    total = 0
    async with asyncio.timeout(10):
        while total < nbytes:
            chunk = await reader.read(65536)
            assert chunk, "unexpected EOF"
            reads.append(chunk)
            total += len(chunk)
    return reads


class Collector(asyncio.Protocol):
    """Keeps every byte received even when the connection is then reset."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)


def test_data_passes_unchanged_both_ways() -> None:
    payload = random.Random(1).randbytes(8 * MiB)

    async def test(proxy: FaultProxy, echo: EchoServer) -> None:
        async with connect(proxy.port) as (reader, writer):

            async def send() -> None:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()

            async def receive() -> tuple[str, int]:
                digest, total = hashlib.sha256(), 0
                while chunk := await reader.read(MiB):
                    digest.update(chunk)
                    total += len(chunk)
                return digest.hexdigest(), total

            async with asyncio.timeout(10):
                _, (digest, total) = await asyncio.gather(send(), receive())
        assert total == len(payload)
        assert digest == hashlib.sha256(payload).hexdigest()
        assert echo.received == len(payload)
        assert proxy.bytes_up == proxy.bytes_down == len(payload)
        assert proxy.connections_accepted == 1
        await proxy.wait_idle()
        assert proxy.active_connections == 0
        assert echo.outcomes == ["eof"]  # the half-close went through, then a normal close

    run(test)


def test_cut_resets_both_sides_and_refuses_new_connections_until_heal() -> None:
    async def test(proxy: FaultProxy, echo: EchoServer) -> None:
        async with connect(proxy.port) as streams:
            assert await roundtrip(streams, b"hello") == b"hello"
            assert proxy.active_connections == 1
            proxy.cut()
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(2):
                    await streams[0].read(1)
        await eventually(lambda: echo.outcomes == ["reset"])
        await proxy.wait_idle()

        assert await attempt(proxy.port) == "reset"
        assert await attempt(proxy.port) == "reset"
        assert echo.connections == 1  # refused connections never reached upstream
        assert proxy.connections_refused == 2

        proxy.heal()
        assert await attempt(proxy.port) == "ok"
        assert echo.connections == 2
        assert proxy.connections_accepted == 4

    run(test)


def test_stall_holds_bytes_and_releases_them_in_order() -> None:
    messages = b"".join(f"message {i:03d};".encode() for i in range(100))

    async def test(proxy: FaultProxy, echo: EchoServer) -> None:
        async with connect(proxy.port) as streams:
            reader, writer = streams
            assert await roundtrip(streams, b"hello") == b"hello"
            proxy.stall(True)
            for i in range(0, len(messages), 100):
                writer.write(messages[i : i + 100])
                await writer.drain()
                await asyncio.sleep(0.001)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await reader.read(1)
            assert echo.received == 5  # held in the "up" direction
            proxy.stall(False)
            reads = await read_until(reader, len(messages))
            assert b"".join(reads) == messages

            # Stall only "down": upstream gets (and echoes) the bytes, the client sees none.
            proxy.stall(True, direction="down")
            writer.write(b"second")
            await writer.drain()
            await eventually(lambda: echo.received == 5 + len(messages) + 6)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await reader.read(1)
            proxy.stall(False, direction="down")
            async with asyncio.timeout(5):
                assert await reader.readexactly(6) == b"second"

    run(test)


def test_delay_adds_latency_and_keeps_order() -> None:
    async def test(proxy: FaultProxy, echo: EchoServer) -> None:
        loop = asyncio.get_running_loop()
        async with connect(proxy.port) as streams:
            reader, writer = streams
            assert await roundtrip(streams, b"warm") == b"warm"
            proxy.set_delay(0.15)  # each way
            started = loop.time()
            assert await roundtrip(streams, b"hello") == b"hello"
            assert loop.time() - started >= 0.25

            # Jitter larger than the gaps between chunks must not reorder them.
            proxy.set_delay(0.01, jitter=0.01)
            messages = [f"<{i}>".encode() for i in range(60)]
            for message in messages:
                writer.write(message)
                await writer.drain()
                await asyncio.sleep(0.002)
            reads = await read_until(reader, sum(map(len, messages)))
            assert b"".join(reads) == b"".join(messages)

            proxy.set_delay(0.0, direction="up")
            proxy.set_delay(0.1, direction="down")
            started = loop.time()
            assert await roundtrip(streams, b"one way") == b"one way"
            assert loop.time() - started >= 0.08

    run(test)


def test_bandwidth_limits_throughput() -> None:
    payload = random.Random(2).randbytes(MiB)

    async def test(proxy: FaultProxy, echo: EchoServer) -> None:
        loop = asyncio.get_running_loop()
        proxy.set_bandwidth(4 * MiB, direction="up")
        async with connect(proxy.port) as (reader, writer):
            started = loop.time()
            writer.write(payload)
            await writer.drain()
            reads = await read_until(reader, len(payload))
            elapsed = loop.time() - started
        assert b"".join(reads) == payload
        assert elapsed >= 0.2  # 1 MiB at 4 MiB/s is 0.25 s

    run(test)


def test_reset_after_n_bytes() -> None:
    limit = 100_000
    payload = random.Random(3).randbytes(MiB)

    async def test(proxy: FaultProxy, echo: EchoServer) -> None:
        loop = asyncio.get_running_loop()
        proxy.reset_after(limit, direction="down")
        transport, client = await loop.create_connection(Collector, "127.0.0.1", proxy.port)
        transport.write(payload)
        async with asyncio.timeout(5):
            exc = await client.lost
        assert isinstance(exc, ConnectionResetError)
        assert limit // 2 <= len(client.data) <= limit + 65536
        assert client.data == payload[: len(client.data)]
        assert proxy.bytes_down <= limit + 65536
        await eventually(lambda: echo.outcomes == ["reset"])

        # A new connection has its own budget: small exchanges work.
        assert await attempt(proxy.port) == "ok"

        # "up": upstream gets at most the limit, then both sides are reset.
        proxy.reset_after(None)
        proxy.reset_after(1000, direction="up")
        before = echo.received
        async with connect(proxy.port) as (reader, writer):
            writer.write(payload[:50_000])
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(5):
                    while await reader.read(65536):
                        pass
        await eventually(lambda: len(echo.outcomes) == 3)
        assert echo.outcomes[-1] == "reset"
        assert echo.received - before <= 1000

    run(test)


def test_dribble_delivers_the_same_bytes_in_many_small_reads() -> None:
    payload = bytes(range(256)) * 8

    async def test(proxy: FaultProxy, echo: EchoServer) -> None:
        async with connect(proxy.port) as (reader, writer):
            writer.write(b"x")
            await writer.drain()
            assert await read_until(reader, 1) == [b"x"]  # one read without dribbling

            proxy.dribble(7, 0.001)
            echo.read_sizes.clear()
            writer.write(payload)
            await writer.drain()
            reads = await read_until(reader, len(payload))
        assert b"".join(reads) == payload
        assert len(reads) >= 60  # 293 slices of 7 bytes; some may be read together
        assert len(echo.read_sizes) >= 60
        assert sum(echo.read_sizes) == len(payload)

    run(test)


def test_drop_new_connections_closes_them_silently() -> None:
    async def test(proxy: FaultProxy, echo: EchoServer) -> None:
        async with connect(proxy.port) as existing:
            assert await roundtrip(existing, b"before") == b"before"
            proxy.drop_new_connections(True)
            assert await attempt(proxy.port, send=False) == "eof"
            assert echo.connections == 1
            assert await roundtrip(existing, b"still") == b"still"  # current ones are kept
            proxy.drop_new_connections(False)
            assert await attempt(proxy.port) == "ok"
        await proxy.wait_for_connections(3, timeout=1)
        assert proxy.connections_refused == 1
        with pytest.raises(TimeoutError):
            await proxy.wait_for_connections(4, timeout=0.1)

    run(test)


def test_clear_removes_every_fault() -> None:
    async def test(proxy: FaultProxy, echo: EchoServer) -> None:
        proxy.set_delay(5.0)
        proxy.stall(True)
        proxy.set_bandwidth(1)
        proxy.reset_after(0)
        proxy.dribble(1, 1.0)
        proxy.drop_new_connections(True)
        proxy.cut()
        proxy.clear()
        async with connect(proxy.port) as streams:
            assert await roundtrip(streams, b"x" * 10000) == b"x" * 10000

    run(test)


def test_unreachable_upstream_resets_the_client() -> None:
    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        async with FaultProxy(("127.0.0.1", closed_port)) as proxy:
            assert await attempt(proxy.port) == "reset"
            assert proxy.connections_refused == 1
            await proxy.wait_idle()

    asyncio.run(main())


def test_stop_resets_every_connection_and_closes_the_listener() -> None:
    async def test(proxy: FaultProxy, echo: EchoServer) -> None:
        async with connect(proxy.port) as a, connect(proxy.port) as b:
            assert await roundtrip(a, b"a") == b"a"
            proxy.stall(True)
            b[1].write(b"held")  # pending in the proxy at stop()
            await b[1].drain()
            await proxy.wait_for_connections(2)
            await proxy.stop()
            for reader, _ in (a, b):
                with pytest.raises(ConnectionResetError):
                    async with asyncio.timeout(2):
                        await reader.read(1)
        assert proxy.active_connections == 0
        assert await attempt(proxy.port) == "refused"
        await eventually(lambda: sorted(echo.outcomes) == ["reset", "reset"])

    run(test)


def test_invalid_settings_are_rejected() -> None:
    proxy = FaultProxy(("127.0.0.1", 1))
    with pytest.raises(ValueError):
        proxy.set_delay(-1)
    with pytest.raises(ValueError):
        proxy.set_bandwidth(0)
    with pytest.raises(ValueError):
        proxy.dribble(0)
    with pytest.raises(ValueError):
        proxy.stall(True, direction="sideways")  # type: ignore[arg-type]


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


def _recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    data = b""
    while len(data) < nbytes:
        chunk = sock.recv(nbytes - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _sync_attempt(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"ping")
            data = _recv_exactly(sock, 4)
    except ConnectionRefusedError:
        return "refused"
    except ConnectionError:  # the reset can arrive before the connect completes
        return "reset"
    return "ok" if data == b"ping" else f"data {data!r}"


def test_threaded_proxy_from_sync_code() -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with ThreadedFaultProxy(server.server_address) as proxy:  # type: ignore[arg-type]
            with socket.create_connection(proxy.address, timeout=5) as sock:
                sock.sendall(b"hello")
                assert _recv_exactly(sock, 5) == b"hello"

                proxy.stall(True)
                sock.sendall(b"world")
                sock.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    sock.recv(10)
                proxy.stall(False)
                sock.settimeout(5)
                assert _recv_exactly(sock, 5) == b"world"

                proxy.cut()
                with pytest.raises(ConnectionResetError):
                    sock.recv(10)
            assert _sync_attempt(proxy.port) == "reset"
            proxy.heal()
            assert _sync_attempt(proxy.port) == "ok"
            proxy.wait_for_connections(3, timeout=2)
            proxy.wait_idle(timeout=2)
            stats = proxy.stats()
            assert stats.connections_accepted == 3
            assert stats.connections_refused == 1
            assert stats.active_connections == 0
            assert stats.bytes_up == stats.bytes_down == 14
            port = proxy.port
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
