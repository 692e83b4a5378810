"""A running unit under attack, and the checks every fault test ends with.

Every fault test finishes the same way: the process is alive, it has let go of every connection,
the volume holds exactly what it held before (when nothing valid was written), the log has no
traceback, and a well-behaved client is still served. :meth:`Target.assert_healthy` does all of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockmirror.frontend.nbd_client import NbdClient
from tests.fault.rawnbd import RawNbd
from tests.support.unit_process import UnitProcess, fetch_status

# Lines that only appear in a unit's log when something escaped its error handling: asyncio's
# default exception handler, an unretrieved future, a task garbage-collected while pending.
LOG_ALARMS = (
    "Traceback",
    "Fatal error",
    "Exception in callback",
    "exception was never retrieved",
    "Task was destroyed",
    "Unhandled error",
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass
class Target:
    """One unit exporting ``vol`` from ``image``; ``baseline`` is the image's sha256 at start."""

    unit: UnitProcess
    image: Path
    size: int
    read_only: bool
    baseline: str

    @property
    def address(self) -> tuple[str, int]:
        return self.unit.export_address("vol")

    def connect(self, *, timeout: float = 5.0) -> RawNbd:
        return RawNbd(self.address, timeout=timeout)

    def session(self, *, structured: bool = False) -> RawNbd:
        """A raw connection that has completed GO on ``vol``."""
        conn = self.connect()
        try:
            conn.session(structured=structured)
        except BaseException:
            conn.close()
            raise
        return conn

    # --- observation ----------------------------------------------------------------------------

    def digest(self) -> str:
        return sha256_file(self.image)

    def rebase(self) -> None:
        """Accept the image's current content (after a test's own valid writes) as the baseline."""
        self.baseline = self.digest()

    def status(self) -> dict[str, Any]:
        return fetch_status(self.unit)

    def counters(self) -> dict[str, int]:
        (vol,) = [v for v in self.status()["volumes"] if v["name"] == "vol"]
        counters: dict[str, int] = vol["counters"]
        return counters

    def alive(self) -> bool:
        return self.unit.proc.poll() is None

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until the export counts no open connection.

        The counter drops in ``connection_lost``, after the last ``data_received`` of that
        connection, so once it is 0 nothing a closed client sent can still reach the volume:
        a hash taken afterwards is final.
        """
        deadline = time.monotonic() + timeout
        while True:
            assert self.alive(), f"unit died:\n{self.unit.log()}"
            connections = self.counters()["connections"]
            if connections == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{connections} connections still open after {timeout}s")
            time.sleep(0.02)

    def assert_log_clean(self) -> None:
        log = self.unit.log()
        for alarm in LOG_ALARMS:
            assert alarm not in log, f"unit log has {alarm!r}:\n{log[-4000:]}"

    # --- the common ending ----------------------------------------------------------------------

    def assert_healthy(self, *, unchanged: bool = True) -> None:
        """Alive, idle, image unchanged (when asked), clean log, and a fresh client is served."""
        self.wait_idle()
        if unchanged:
            assert self.digest() == self.baseline, "the volume changed"
        self.assert_log_clean()
        offset = self.size - 8192
        with open(self.image, "rb") as f:
            f.seek(offset)
            on_disk = f.read(4096)
        asyncio.run(self._served(offset, on_disk))
        assert self.alive()
        self.assert_log_clean()

    async def _served(self, offset: int, on_disk: bytes) -> None:
        """A well-behaved client writes (unless read-only) and reads back through the export;
        on a read-only volume it must read what the image holds at ``offset``."""
        host, port = self.address
        client = await asyncio.wait_for(NbdClient.connect(host, port, "vol"), 5)
        async with client:
            assert client.export is not None and client.export.size == self.size
            if self.read_only:
                assert await asyncio.wait_for(client.read(offset, 4096), 5) == on_disk
            else:
                data = random.randbytes(4096)
                await asyncio.wait_for(client.write(offset, data), 5)
                assert await asyncio.wait_for(client.read(offset, 4096), 5) == data
