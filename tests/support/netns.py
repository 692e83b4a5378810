"""Two network namespaces joined by a veth pair, shaped like a WAN link (recipes.md §7).

:func:`t1_link` makes ``<prefix>a`` and ``<prefix>b``, addresses 10.77.0.1 and 10.77.0.2 that
exist only inside them, and a ``tbf`` qdisc on the a→b side at the given rate. Units run inside
with ``ip netns exec`` (which execs in place: the PID the test holds is the unit's), and the
test reaches their admin APIs from a thread that has entered the namespace (:func:`in_netns`:
``setns`` switches only the calling thread). On exit every process left in either namespace is
killed by PID and both namespaces are deleted, which removes the veth pair too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest

__all__ = ["T1Link", "in_netns", "t1_link"]

_T = TypeVar("_T")
_CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)

T1_RATE = "1544kbit"
T1_BYTES_PER_SECOND = 1_544_000 / 8


@dataclass(frozen=True)
class T1Link:
    a: str  # the namespace of the sending side (its egress is shaped)
    b: str
    a_addr: str = "10.77.0.1"
    b_addr: str = "10.77.0.2"
    a_dev: str = ""
    b_dev: str = ""

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def run(self, ns: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.exec_prefix(ns), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def set_link(self, up: bool) -> None:
        """Cut (down) or restore (up) the wire, on both ends."""
        state = "up" if up else "down"
        for ns, dev in ((self.a, self.a_dev), (self.b, self.b_dev)):
            _ip("-n", ns, "link", "set", dev, state)

    def qdisc_stats(self) -> str:
        return _ip("-n", self.a, "-s", "qdisc", "show", "dev", self.a_dev)


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _tc(ns: str, *args: str) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "tc", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        raise OSError(f"tc {' '.join(args)}: {done.stderr.strip()}")


def _kill_all_in(ns: str) -> None:
    """Kill, by PID, whatever this test left running in its namespace."""
    done = subprocess.run(
        ["ip", "netns", "pids", ns], check=False, capture_output=True, text=True, timeout=10
    )
    for pid in (int(p) for p in done.stdout.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = subprocess.run(
            ["ip", "netns", "pids", ns], check=False, capture_output=True, text=True, timeout=10
        )
        if not left.stdout.strip():
            return
        time.sleep(0.05)


@contextlib.contextmanager
def t1_link(rate: str = T1_RATE) -> Iterator[T1Link]:
    """The pair of namespaces, shaped at ``rate`` from a to b; skips where the kernel cannot."""
    prefix = f"bm{os.getpid() % 100000}"
    a, b = f"{prefix}a", f"{prefix}b"
    link = T1Link(a, b, a_dev=f"{prefix}va", b_dev=f"{prefix}vb")
    made: list[str] = []
    try:
        try:
            for ns in (a, b):
                _ip("netns", "add", ns)
                made.append(ns)
        except OSError as exc:
            pytest.skip(f"network namespaces are not available here: {exc}")
        _ip("link", "add", link.a_dev, "type", "veth", "peer", "name", link.b_dev)
        _ip("link", "set", link.a_dev, "netns", a)
        _ip("link", "set", link.b_dev, "netns", b)
        _ip("-n", a, "addr", "add", f"{link.a_addr}/30", "dev", link.a_dev)
        _ip("-n", b, "addr", "add", f"{link.b_addr}/30", "dev", link.b_dev)
        for ns, dev in ((a, link.a_dev), (b, link.b_dev)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        # A T1 line's rate; its queue holds 400 ms, as a router's would.
        _tc(a, "qdisc", "add", "dev", link.a_dev, "root", "tbf", "rate", rate,
            "burst", "32kbit", "latency", "400ms")  # fmt: skip
        yield link
    finally:
        for ns in made:
            _kill_all_in(ns)
        for ns in made:
            with contextlib.suppress(OSError):
                _ip("netns", "del", ns)


def in_netns(ns: str, fn: Callable[[], _T]) -> _T:
    """``fn()`` run on a thread inside namespace ``ns`` (sockets it opens live there)."""
    result: list[_T] = []
    error: list[BaseException] = []

    def enter_and_run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _LIBC.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=enter_and_run, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class BulkFlow:
    """A competing bulk TCP flow from namespace a to b (cubic, as most hosts run), counted at
    the receiver: bytes a second over any span of its run."""

    def __init__(self, link: T1Link, port: int = 15201) -> None:
        self.link = link
        self.port = port
        self.received: list[tuple[float, int]] = []  # (monotonic time, cumulative bytes)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None

    def start(self) -> None:
        listener = in_netns(
            self.link.b, lambda: socket.create_server((self.link.b_addr, self.port))
        )
        self._listener = listener
        receiver = threading.Thread(target=self._receive, name="bulk-rx", daemon=True)
        receiver.start()
        sender = threading.Thread(target=self._send_thread, name="bulk-tx", daemon=True)
        sender.start()
        self._threads = [receiver, sender]

    def _receive(self) -> None:
        assert self._listener is not None
        self._listener.settimeout(10)
        conn, _ = self._listener.accept()
        total = 0
        with conn:
            conn.settimeout(1.0)
            while not self._stop.is_set():
                try:
                    data = conn.recv(1 << 16)
                except TimeoutError:
                    continue
                if not data:
                    break
                total += len(data)
                self.received.append((time.monotonic(), total))

    def _send_thread(self) -> None:
        def connect() -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
            s.connect((self.link.b_addr, self.port))
            return s

        s = in_netns(self.link.a, connect)
        chunk = os.urandom(1 << 16)
        with s:
            s.settimeout(1.0)
            while not self._stop.is_set():
                try:
                    s.send(chunk)
                except TimeoutError:
                    continue
                except OSError:
                    return  # the receiver closed first at the end

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        if self._listener is not None:
            self._listener.close()

    def rate(self, start: float, end: float) -> float:
        """Bytes a second received between two monotonic times."""
        inside = [(t, n) for t, n in self.received if start <= t <= end]
        if len(inside) < 2:
            return 0.0
        (t0, n0), (t1, n1) = inside[0], inside[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
