"""A fault-injecting TCP proxy for tests (the idea of toxiproxy's "toxics", in-process).

``FaultProxy`` listens on ``127.0.0.1:0`` and forwards every accepted connection to an upstream
``(host, port)``. Faults ("toxics") can be switched on and off at any time and apply to current and
future connections. Directions: ``"up"`` is client -> upstream, ``"down"`` is upstream -> client,
``"both"`` is both.

Controls (all synchronous, call them on the proxy's event loop; ``ThreadedFaultProxy`` has the same
methods callable from any thread):

- ``cut()``: reset every current connection (RST via ``SO_LINGER`` 0, both sides) and reset every
  new one right after accepting it, until ``heal()``.
- ``stall(True/False, direction)``: stop forwarding without closing; what is buffered meanwhile
  (including a FIN) is delivered, in order, after ``stall(False)``.
- ``set_delay(seconds, jitter, direction)``: latency per chunk read, order preserved; the FIN is
  delayed like data. A change also applies to chunks already waiting.
- ``set_bandwidth(bytes_per_second | None, direction)``: a token bucket per connection and direction
  (small burst of 20 ms worth of bytes).
- ``reset_after(nbytes | None, direction)``: each connection is reset once ``nbytes`` more bytes
  have been forwarded in that direction (counted separately per direction, from the call on for
  existing connections, from the start for new ones). Exactly ``nbytes`` are forwarded; the reset
  waits (up to 0.5 s) until the kernel has sent them. Stays in force for new connections until
  cleared.
- ``dribble(chunk_size | None, interval, direction)``: forward in slices of at most ``chunk_size``
  bytes with ``interval`` seconds between slices (``TCP_NODELAY`` is set on both sockets).
- ``drop_new_connections(True/False)``: accept new connections and close them at once (FIN),
  without connecting upstream. Current connections are unaffected.
- ``clear()``: undo all of the above.

Counters: ``bytes_up``, ``bytes_down`` (bytes forwarded), ``connections_accepted`` (every accepted
TCP connection, including refused ones), ``connections_refused`` (reset or dropped at accept because
of ``cut``/``drop_new_connections``, or because upstream refused), ``active_connections`` (being
proxied now); ``await wait_for_connections(n, timeout)`` waits until ``connections_accepted >= n``
and ``await wait_idle(timeout)`` until ``active_connections == 0`` (both raise ``TimeoutError``).

An error or reset on one side of a proxied connection resets the other side as well. ``stop()``
closes the listener, resets every connection, waits for all of its tasks and sockets, and re-raises
an internal error of the proxy if one happened (so a bug in the proxy fails the test).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import random
import socket
import struct
import termios
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

__all__ = ["Direction", "FaultProxy", "FaultStats", "ThreadedFaultProxy"]

log = logging.getLogger(__name__)

Direction = Literal["up", "down", "both"]
_Way = Literal["up", "down"]

_T = TypeVar("_T")

_CHUNK: Final = 65536  # bytes read from a socket at once
_QUEUE_CHUNKS: Final = 16  # chunks buffered per direction before reading stops (backpressure)
_BURST_SECONDS: Final = 0.02  # token bucket depth, in seconds' worth of bytes
_BANDWIDTH_SLICE_SECONDS: Final = 0.01  # write at most this many seconds' worth at once
_FLUSH_TIMEOUT: Final = 0.5  # reset_after: how long to wait for the kernel to send the last bytes
_CLOSE_TIMEOUT: Final = 1.0  # graceful close: how long before falling back to a reset
_STOP_TIMEOUT: Final = 2.0  # stop(): how long handlers get before they are cancelled


def _ways(direction: Direction) -> tuple[_Way, ...]:
    if direction == "both":
        return ("up", "down")
    if direction == "up":
        return ("up",)
    if direction == "down":
        return ("down",)
    raise ValueError(f"direction must be 'up', 'down' or 'both', not {direction!r}")


def _flowing_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send RST instead of FIN. Idempotent."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _unsent_bytes(writer: asyncio.StreamWriter) -> int:
    """Bytes still in the kernel's send queue (Linux SIOCOUTQ); 0 when unknown."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    value: int = struct.unpack("i", raw)[0]
    return value


async def _close_writer(writer: asyncio.StreamWriter, *, graceful: bool) -> None:
    """Close (FIN) or reset (RST) and wait until the socket is really closed."""
    if graceful:
        writer.close()
    else:
        _reset(writer)
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await writer.wait_closed()
    except TimeoutError:
        _reset(writer)
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    except Exception:  # the connection was lost with an error: it is closed all the same
        pass


@dataclass
class _WaySettings:
    delay: float = 0.0
    jitter: float = 0.0
    rate: int | None = None
    limit: int | None = None
    dribble_size: int | None = None
    dribble_interval: float = 0.0
    flowing: asyncio.Event = field(default_factory=_flowing_event)  # clear while stalled


@dataclass(frozen=True)
class _Item:
    """A chunk read from one side (``b""`` is EOF), stamped for the latency toxic."""

    read_at: float
    jitter_factor: float  # uniform in [-1, 1], scaled by the jitter in force when written
    data: bytes


class _Bucket:
    """Token bucket as a virtual clock: ``until`` is when everything reserved so far is sent."""

    def __init__(self) -> None:
        self.until = 0.0

    def reserve(self, nbytes: int, rate: int, now: float) -> float:
        """Account for ``nbytes`` and return how long to wait before sending them."""
        self.until = max(self.until, now) + nbytes / rate
        return self.until - now - _BURST_SECONDS


class _Connection:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.aborted = False
        self.forwarded: dict[_Way, int] = {"up": 0, "down": 0}
        self.limit_base: dict[_Way, int] = {"up": 0, "down": 0}
        self.buckets: dict[_Way, _Bucket] = {"up": _Bucket(), "down": _Bucket()}

    def writers(self) -> list[asyncio.StreamWriter]:
        return [self.client] if self.upstream is None else [self.client, self.upstream]

    def abort(self) -> None:
        """Reset both sides and stop the pumps (other than the caller)."""
        if self.aborted:
            return
        self.aborted = True
        for writer in self.writers():
            _reset(writer)
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


@dataclass(frozen=True)
class FaultStats:
    """A snapshot of a proxy's counters."""

    bytes_up: int
    bytes_down: int
    connections_accepted: int
    connections_refused: int
    active_connections: int


class FaultProxy:
    """An asyncio TCP proxy on 127.0.0.1 with switchable faults; see the module docstring."""

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.host = host
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._settings: dict[_Way, _WaySettings] = {"up": _WaySettings(), "down": _WaySettings()}
        self._cut = False
        self._drop_new = False
        self._conns: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._errors: list[BaseException] = []
        self._bytes: dict[_Way, int] = {"up": 0, "down": 0}
        self._accepted = 0
        self._refused = 0
        self._settings_changed = asyncio.Event()
        self._conns_changed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> int:
        """Start listening; returns the port."""
        if self._server is not None:
            raise RuntimeError("FaultProxy already started")
        self._server = await asyncio.start_server(self._on_accept, self.host, 0)
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def stop(self) -> None:
        """Close the listener, reset every connection and wait for all tasks and sockets."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self._conns):
            conn.abort()
        while self._handlers:
            handlers = set(self._handlers)
            _done, pending = await asyncio.wait(handlers, timeout=_STOP_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            self._handlers -= handlers
        if server is not None:
            await server.wait_closed()
        if self._errors:
            error, self._errors = self._errors[0], []
            raise RuntimeError("FaultProxy internal error") from error

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FaultProxy not started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # -- controls --------------------------------------------------------------------------------

    def cut(self) -> None:
        """Reset all current connections; reset new ones at accept until ``heal()``."""
        self._cut = True
        for conn in list(self._conns):
            conn.abort()

    def heal(self) -> None:
        """Accept and proxy new connections again after ``cut()``."""
        self._cut = False

    def stall(self, stalled: bool = True, direction: Direction = "both") -> None:
        """Hold (``True``) or release (``False``) the bytes flowing in ``direction``."""
        for way in _ways(direction):
            flowing = self._settings[way].flowing
            if stalled:
                flowing.clear()
            else:
                flowing.set()

    def set_delay(self, seconds: float, jitter: float = 0.0, direction: Direction = "both") -> None:
        """Delay each chunk by ``seconds`` ± up to ``jitter`` (never below 0; order preserved)."""
        if seconds < 0 or jitter < 0:
            raise ValueError("delay and jitter must be >= 0")
        for way in _ways(direction):
            self._settings[way].delay = seconds
            self._settings[way].jitter = jitter
        self._poke()

    def set_bandwidth(self, bytes_per_second: int | None, direction: Direction = "both") -> None:
        """Limit each connection to ``bytes_per_second`` per direction; ``None`` for no limit."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be > 0 or None")
        for way in _ways(direction):
            self._settings[way].rate = bytes_per_second
        self._poke()

    def reset_after(self, nbytes: int | None, direction: Direction = "both") -> None:
        """Reset each connection after ``nbytes`` more bytes in ``direction``; ``None`` for off."""
        if nbytes is not None and nbytes < 0:
            raise ValueError("nbytes must be >= 0 or None")
        for way in _ways(direction):
            self._settings[way].limit = nbytes
            for conn in self._conns:
                conn.limit_base[way] = conn.forwarded[way]
        self._poke()

    def dribble(
        self, chunk_size: int | None, interval: float = 0.0, direction: Direction = "both"
    ) -> None:
        """Forward at most ``chunk_size`` bytes at once, ``interval`` s apart; ``None`` off."""
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError("chunk_size must be > 0 or None")
        if interval < 0:
            raise ValueError("interval must be >= 0")
        for way in _ways(direction):
            self._settings[way].dribble_size = chunk_size
            self._settings[way].dribble_interval = interval
        self._poke()

    def drop_new_connections(self, drop: bool = True) -> None:
        """Accept new connections and close them at once (FIN) while ``drop`` is true."""
        self._drop_new = drop

    def clear(self) -> None:
        """Remove every fault: heal, un-stall, no delay, bandwidth, reset, dribble or dropping."""
        self.heal()
        self.drop_new_connections(False)
        self.stall(False)
        self.set_delay(0.0)
        self.set_bandwidth(None)
        self.reset_after(None)
        self.dribble(None)

    # -- counters --------------------------------------------------------------------------------

    @property
    def bytes_up(self) -> int:
        return self._bytes["up"]

    @property
    def bytes_down(self) -> int:
        return self._bytes["down"]

    @property
    def connections_accepted(self) -> int:
        return self._accepted

    @property
    def connections_refused(self) -> int:
        return self._refused

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    def stats(self) -> FaultStats:
        return FaultStats(
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            connections_accepted=self.connections_accepted,
            connections_refused=self.connections_refused,
            active_connections=self.active_connections,
        )

    async def wait_for_connections(self, n: int, timeout: float = 5.0) -> None:
        """Wait until at least ``n`` connections have been accepted in total."""
        await self._wait_until(lambda: self._accepted >= n, timeout, f"{n} connections accepted")

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no connection is being proxied."""
        await self._wait_until(lambda: not self._conns, timeout, "idle state")

    async def _wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not ready():
                    await self._conns_changed.wait()
        except TimeoutError:
            raise TimeoutError(f"FaultProxy: no {what} within {timeout} s") from None

    # -- internals -------------------------------------------------------------------------------

    def _poke(self) -> None:
        """Wake every pump sleeping on a setting, so it re-evaluates."""
        self._settings_changed.set()
        self._settings_changed = asyncio.Event()

    def _conns_poke(self) -> None:
        self._conns_changed.set()
        self._conns_changed = asyncio.Event()

    async def _nap(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if a setting changes."""
        changed = self._settings_changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await changed.wait()

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:  # accepted while stopping
            _reset(writer)
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("FaultProxy handler failed", exc_info=error)
            self._errors.append(error)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        self._conns_poke()
        if self._cut or self._drop_new:
            self._refused += 1
            await _close_writer(writer, graceful=not self._cut)
            return
        conn = _Connection(writer)
        self._conns.add(conn)
        self._conns_poke()
        try:
            await self._proxy(conn, reader)
        finally:
            self._conns.discard(conn)
            for w in conn.writers():
                await _close_writer(w, graceful=not conn.aborted)
            self._conns_poke()

    async def _proxy(self, conn: _Connection, client_reader: asyncio.StreamReader) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._refused += 1
            conn.abort()
            return
        conn.upstream = upstream_writer
        if conn.aborted:  # cut while connecting
            _reset(upstream_writer)
            return
        _set_nodelay(conn.client)
        _set_nodelay(upstream_writer)
        up: asyncio.Queue[_Item] = asyncio.Queue(_QUEUE_CHUNKS)
        down: asyncio.Queue[_Item] = asyncio.Queue(_QUEUE_CHUNKS)
        loop = asyncio.get_running_loop()
        conn.tasks = [
            loop.create_task(self._read_way(conn, client_reader, up)),
            loop.create_task(self._write_way(conn, "up", up, upstream_writer)),
            loop.create_task(self._read_way(conn, upstream_reader, down)),
            loop.create_task(self._write_way(conn, "down", down, conn.client)),
        ]
        results = await asyncio.gather(*conn.tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                conn.abort()
                raise result

    async def _read_way(
        self, conn: _Connection, src: asyncio.StreamReader, queue: asyncio.Queue[_Item]
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await src.read(_CHUNK)
                await queue.put(_Item(loop.time(), random.uniform(-1.0, 1.0), data))
                if not data:
                    return
        except OSError:  # reset or error from this side: reset the other one too
            conn.abort()

    async def _write_way(
        self, conn: _Connection, way: _Way, queue: asyncio.Queue[_Item], dst: asyncio.StreamWriter
    ) -> None:
        settings = self._settings[way]
        try:
            while True:
                item = await queue.get()
                await self._wait_latency(settings, item)
                if not item.data:
                    await settings.flowing.wait()
                    dst.write_eof()
                    return
                if not await self._deliver(conn, way, settings, item.data, dst):
                    return
        except OSError:
            conn.abort()

    async def _wait_latency(self, settings: _WaySettings, item: _Item) -> None:
        loop = asyncio.get_running_loop()
        while True:
            delay = max(0.0, settings.delay + item.jitter_factor * settings.jitter)
            remaining = item.read_at + delay - loop.time()
            if remaining <= 0:
                return
            await self._nap(remaining)

    async def _deliver(
        self,
        conn: _Connection,
        way: _Way,
        settings: _WaySettings,
        data: bytes,
        dst: asyncio.StreamWriter,
    ) -> bool:
        """Write ``data`` applying stall, dribble, reset_after and bandwidth; False once reset."""
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            await settings.flowing.wait()
            size = len(view)
            if settings.dribble_size is not None:
                size = min(size, settings.dribble_size)
            if settings.limit is not None:
                left = settings.limit - (conn.forwarded[way] - conn.limit_base[way])
                if left <= 0:
                    await self._reset_when_sent(conn, dst)
                    return False
                size = min(size, left)
            if settings.rate is not None:
                size = min(size, max(1, int(settings.rate * _BANDWIDTH_SLICE_SECONDS)))
                wait = conn.buckets[way].reserve(size, settings.rate, loop.time())
                if wait > 0:
                    await asyncio.sleep(wait)
            dst.write(bytes(view[:size]))
            await dst.drain()
            conn.forwarded[way] += size
            self._bytes[way] += size
            view = view[size:]
            if (
                settings.limit is not None
                and conn.forwarded[way] - conn.limit_base[way] >= settings.limit
            ):
                await self._reset_when_sent(conn, dst)
                return False
            if settings.dribble_size is not None and settings.dribble_interval > 0:
                await self._nap(settings.dribble_interval)
        return True

    async def _reset_when_sent(self, conn: _Connection, dst: asyncio.StreamWriter) -> None:
        """Reset the connection once the bytes written to ``dst`` have left the kernel."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _FLUSH_TIMEOUT
        while dst.transport.get_write_buffer_size() > 0 or _unsent_bytes(dst) > 0:
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.005)  # polling the kernel: there is nothing to wait on
        conn.abort()


class ThreadedFaultProxy:
    """A ``FaultProxy`` on its own event loop in a daemon thread, for synchronous tests.

    Every control and wait method of ``FaultProxy`` is available and may be called from any thread;
    it returns once the change has been applied on the proxy's loop.
    """

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.proxy = FaultProxy(upstream, host=host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> int:
        if self._thread is not None:
            raise RuntimeError("ThreadedFaultProxy already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._run, args=(loop,), name="ThreadedFaultProxy", daemon=True
        )
        self._loop, self._thread = loop, thread
        thread.start()
        try:
            return self._submit(self.proxy.start(), timeout)
        except BaseException:
            self._shutdown_loop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        try:
            self._submit(self.proxy.stop(), timeout)
        finally:
            self._shutdown_loop()

    def __enter__(self) -> ThreadedFaultProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()

    def _submit(self, coro: Coroutine[Any, Any, _T], timeout: float | None) -> _T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("ThreadedFaultProxy not started")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("ThreadedFaultProxy: call the FaultProxy directly on its own loop")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the proxy's loop and let the callbacks it scheduled (resets) run."""

        async def apply() -> _T:
            result = fn()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return result

        if self._thread is not None and threading.current_thread() is self._thread:
            return fn()
        return self._submit(apply(), 10.0)

    # -- same API as FaultProxy ------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def address(self) -> tuple[str, int]:
        return self.proxy.address

    def cut(self) -> None:
        self._call(self.proxy.cut)

    def heal(self) -> None:
        self._call(self.proxy.heal)

    def stall(self, stalled: bool = True, direction: Direction = "both") -> None:
        self._call(lambda: self.proxy.stall(stalled, direction))

    def set_delay(self, seconds: float, jitter: float = 0.0, direction: Direction = "both") -> None:
        self._call(lambda: self.proxy.set_delay(seconds, jitter, direction))

    def set_bandwidth(self, bytes_per_second: int | None, direction: Direction = "both") -> None:
        self._call(lambda: self.proxy.set_bandwidth(bytes_per_second, direction))

    def reset_after(self, nbytes: int | None, direction: Direction = "both") -> None:
        self._call(lambda: self.proxy.reset_after(nbytes, direction))

    def dribble(
        self, chunk_size: int | None, interval: float = 0.0, direction: Direction = "both"
    ) -> None:
        self._call(lambda: self.proxy.dribble(chunk_size, interval, direction))

    def drop_new_connections(self, drop: bool = True) -> None:
        self._call(lambda: self.proxy.drop_new_connections(drop))

    def clear(self) -> None:
        self._call(self.proxy.clear)

    @property
    def bytes_up(self) -> int:
        return self.proxy.bytes_up

    @property
    def bytes_down(self) -> int:
        return self.proxy.bytes_down

    @property
    def connections_accepted(self) -> int:
        return self.proxy.connections_accepted

    @property
    def connections_refused(self) -> int:
        return self.proxy.connections_refused

    @property
    def active_connections(self) -> int:
        return self.proxy.active_connections

    def stats(self) -> FaultStats:
        return self._call(self.proxy.stats)

    def wait_for_connections(self, n: int, timeout: float = 5.0) -> None:
        self._submit(self.proxy.wait_for_connections(n, timeout), timeout + 5.0)

    def wait_idle(self, timeout: float = 5.0) -> None:
        self._submit(self.proxy.wait_idle(timeout), timeout + 5.0)
