"""Pre-authentication exhaustion of a secondary (issue 7, point 14).

An attacker who knows nothing opens connections to the replication listener and holds them:
some trickle a HELLO one byte at a time, some announce a 64 MiB RECORDS frame and push data
behind it. None of that may cost the secondary more than a bounded amount of memory and
descriptors; every such connection ends by the handshake deadline; and meanwhile a real primary
connects, replicates byte for byte, and the admin API answers.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blockmirror.link.listener import MAX_UNAUTHENTICATED_PER_ADDRESS
from blockmirror.link.protocol import MAGIC, FrameType
from blockmirror.link.session import HANDSHAKE_TIMEOUT
from tests.fault.test_link_faults import frame, hello, qemu_write
from tests.support.pair import (
    MiB,
    Site,
    peer_address,
    qemu_img_compare,
    topology,
    wait_caught_up,
)
from tests.support.unit_process import require_commands

pytestmark = pytest.mark.fault

TRICKLERS = 60  # held open (and reopened as soon as the secondary closes one)
HUGE = 6  # connections announcing a 64 MiB RECORDS frame, each pushing up to 32 MiB


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Flood:
    """Attack connections driven by one thread until ``stop`` is set."""

    port: int
    stop: threading.Event = field(default_factory=threading.Event)
    opened: int = 0
    closed_by_peer: int = 0
    longest: float = 0.0  # the longest a trickling connection was kept open by the secondary
    huge_accepted: list[int] = field(default_factory=list)  # bytes each huge sender got in
    error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.setblocking(False)
        self.opened += 1
        return sock

    def _run(self) -> None:
        payload = frame(hello("vol", "0" * 32))
        live: dict[socket.socket, tuple[float, int]] = {}  # sock -> (opened at, bytes sent)
        huge: dict[socket.socket, int] = {}
        header = struct.pack("<IBBHII", MAGIC, FrameType.RECORDS, 0, 0, 64 * MiB, 0)
        junk = bytes(256 * 1024)
        next_byte = time.monotonic()
        try:
            while not self.stop.is_set():
                while len(live) < TRICKLERS:
                    live[self._connect()] = (time.monotonic(), 0)
                while len(huge) < HUGE and len(self.huge_accepted) < 200:
                    sock = self._connect()
                    with contextlib.suppress(OSError):
                        sock.send(header)
                    huge[sock] = 0
                # Push data behind the huge headers as fast as the secondary takes it.
                for sock, sent in list(huge.items()):
                    try:
                        if sent < 32 * MiB:
                            huge[sock] = sent + sock.send(junk)
                    except BlockingIOError:
                        pass
                    except OSError:
                        self.huge_accepted.append(sent)
                        del huge[sock]
                        sock.close()
                # One byte of the HELLO every 2 s on every trickler.
                now = time.monotonic()
                if now >= next_byte:
                    next_byte = now + 2.0
                    for sock, (since, sent) in list(live.items()):
                        try:
                            sock.send(payload[sent % len(payload) : sent % len(payload) + 1])
                            live[sock] = (since, sent + 1)
                        except OSError:
                            pass
                readable, _, _ = select.select([*live, *huge], [], [], 0.05)
                for sock in readable:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        continue  # a REFUSE on its way; the close follows
                    if sock in live:
                        since, _ = live.pop(sock)
                        self.longest = max(self.longest, time.monotonic() - since)
                        self.closed_by_peer += 1
                    else:
                        self.huge_accepted.append(huge.pop(sock))
                    sock.close()
        finally:
            for sock in [*live, *huge]:
                sock.close()


def test_unauthenticated_flood_is_bounded_and_a_real_primary_still_replicates(
    tmp_path: Path,
) -> None:
    require_commands("qemu-io", "qemu-img")
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        a = topo.add_primary("site-a", peers=[peer_address(b)])
        secondary = b.start()
        assert b.listen_port is not None
        time.sleep(0.5)
        rss0, fds0 = vm_rss(secondary.pid), open_fds(secondary.pid)

        flood = Flood(b.listen_port)
        thread = threading.Thread(target=flood.run, daemon=True)
        thread.start()
        samples: list[tuple[int, int]] = []

        def sample(site: Site) -> None:
            assert site.unit is not None and site.unit.proc.poll() is None, "secondary died"
            samples.append((vm_rss(secondary.pid), open_fds(secondary.pid)))
            assert site.status()["unit"] == "site-b"  # the admin API answers throughout

        try:
            began = time.monotonic()
            while time.monotonic() - began < 3:
                sample(b)
                time.sleep(0.2)
            # A real primary connects and replicates while the flood goes on.
            primary = a.start()
            wait_caught_up(a, b, timeout=60)
            for i in range(3):
                qemu_write(primary.export_url("vol"), i * 4 * MiB, 2 * MiB, 0x31 + i)
                sample(b)
            wait_caught_up(a, b, timeout=60)
            qemu_img_compare(a.images["vol"], b.images["vol"])
            # Long enough for the handshake deadline to cut every trickler at least once.
            while time.monotonic() - began < HANDSHAKE_TIMEOUT + 6:
                sample(b)
                time.sleep(0.2)
        finally:
            flood.stop.set()
            thread.join(timeout=10)
        assert flood.error is None, flood.error

        peak_rss = max(r for r, _ in samples)
        peak_fds = max(f for _, f in samples)
        # Each trickler was cut by the deadline for the whole handshake (not one per read),
        # or closed earlier to make room for a newer connection.
        assert 0 < flood.longest <= HANDSHAKE_TIMEOUT + 3, flood.longest
        assert flood.closed_by_peer >= TRICKLERS, (flood.opened, flood.closed_by_peer)
        # A 64 MiB RECORDS header before HELLO is refused from the header: almost nothing of
        # what follows is taken in (the kernel's socket buffers hold some).
        assert len(flood.huge_accepted) >= HUGE, flood.huge_accepted
        assert max(flood.huge_accepted) < 16 * MiB, flood.huge_accepted
        # Descriptors: at most the per-address cap of unauthenticated connections, plus the
        # primary's link and the admin API's.
        assert peak_fds <= fds0 + MAX_UNAUTHENTICATED_PER_ADDRESS + 8, (fds0, peak_fds)
        assert peak_rss <= rss0 + 96 * MiB, (rss0, peak_rss)
        rep = b.volume_status()["replica"]
        assert rep["consistent"] is True and rep["connected"] is True, rep
