"""Drills: a past point of a volume served as its own NBD export while replication goes on.

A drill (Zerto's "failover test", an AWS DRS drill) lets an operator boot or mount a point of
the history without stopping anything: the point is served from a
:class:`~blockmirror.history.drill_store.DrillStore` (the live volume with the before-images
laid over it, nothing copied), read-only, or ``writable`` with a sparse copy-on-write file in
``STATE_DIR/drills/`` that is deleted when the drill stops. The point's history entries are
pinned for as long as the drill runs, so expiry cannot take them. Drills do not survive a
restart of the unit (their files are removed at the next start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockmirror.blockdev.service import BlockDevice
from blockmirror.blockdev.writepath import DirectWritePath
from blockmirror.errors import AdminError
from blockmirror.frontend.nbd_limits import NbdLimits
from blockmirror.frontend.nbd_server import NbdServer
from blockmirror.history.drill_store import DrillStore
from blockmirror.history.index import Point
from blockmirror.history.log import HistoryLog, iso_time
from blockmirror.store.base import Store

__all__ = ["DRILL_DIR", "Drill", "DrillError", "VolumeDrills", "clear_leftovers"]

log = logging.getLogger(__name__)

DRILL_DIR = "drills"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)


class DrillError(AdminError):
    """A drill that cannot be started or stopped as asked; nothing changed."""


def clear_leftovers(state_dir: Path) -> None:
    """Remove copy-on-write files of drills a stopped unit left (they never outlive it)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(state_dir / DRILL_DIR)


@dataclass
class Drill:
    name: str
    point: Point
    writable: bool
    store: DrillStore
    server: NbdServer
    pin: int
    url: str
    started: float
    start_seconds: float

    def status(self) -> dict[str, Any]:
        cow = self.store.cow
        return {
            "name": self.name,
            "url": self.url,
            "seq": self.point.seq,
            "time": iso_time(self.point.time_ns),
            "writable": self.writable,
            "connections": len(self.server.connections),
            "cow_bytes": (cow.stat().st_blocks * 512 if cow is not None and cow.exists() else 0),
            "start_seconds": round(self.start_seconds, 3),
            "running_seconds": round(time.monotonic() - self.started, 1),
        }


class VolumeDrills:
    """The drills of one volume."""

    def __init__(
        self,
        volume: str,
        history: HistoryLog,
        store: Store,
        *,
        state_dir: Path,
        host: str,
        limits: NbdLimits,
    ) -> None:
        self.volume = volume
        self.history = history
        self.store = store
        self.directory = state_dir / DRILL_DIR
        self.host = host
        self.limits = limits
        self.drills: dict[str, Drill] = {}

    async def start(self, point: Point, *, writable: bool, name: str | None = None) -> Drill:
        """Serve ``point`` (found in this volume's history just now) as a new NBD export.
        Raises :class:`DrillError` for a name in use or malformed, OSError when the
        copy-on-write file or the listener cannot be made."""
        started = time.monotonic()
        name = name or f"{self.volume}-{point.seq}"
        if not _NAME_RE.fullmatch(name):
            raise DrillError(f"a drill name is 1 to 64 letters, digits and ._- , not {name!r}")
        if name in self.drills:
            raise DrillError(f"volume {self.volume} already has a drill called {name!r}")
        cow = None
        if writable:
            await asyncio.to_thread(self.directory.mkdir, mode=0o700, exist_ok=True)
            cow = self.directory / f"{self.volume}.{name}.cow"
        pin = self.history.pin(point.pos)
        store: DrillStore | None = None
        server: NbdServer | None = None
        try:
            store = DrillStore(self.history, self.store, point.pos, cow)
            await asyncio.to_thread(store.build)
            loop = asyncio.get_running_loop()
            device = BlockDevice(
                name,
                store,
                DirectWritePath(store, loop),
                read_only=not writable,
                description=f"blockmirror drill of {self.volume} at seq {point.seq}",
            )
            server = NbdServer({name: device}, self.limits)
            host, port = await server.start(self.host, 0)
        except BaseException:
            if server is not None:
                await server.shutdown(0.5)
            if store is not None:
                store.close()
            self.history.unpin(pin)
            raise
        shown = f"[{host}]" if ":" in host else host
        drill = Drill(
            name,
            point,
            writable,
            store,
            server,
            pin,
            f"nbd://{shown}:{port}/{name}",
            time.monotonic(),
            time.monotonic() - started,
        )
        self.drills[name] = drill
        log.warning(
            "volume %s: drill %s of seq %d started%s on %s",
            self.volume,
            name,
            point.seq,
            " (writable)" if writable else "",
            drill.url,
        )
        return drill

    async def stop(self, name: str | None = None) -> list[str]:
        """Stop one drill (or every drill of the volume); their files are deleted."""
        if name is not None and name not in self.drills:
            known = ", ".join(self.drills) or "none"
            raise DrillError(f"volume {self.volume} has no drill {name!r} (drills: {known})")
        names = [name] if name is not None else list(self.drills)
        for each in names:
            drill = self.drills.pop(each)
            drill.server.stop_reading()
            await drill.server.shutdown(2.0)
            await asyncio.to_thread(drill.store.close)
            self.history.unpin(drill.pin)
            log.warning("volume %s: drill %s stopped", self.volume, each)
        return names

    def status(self) -> list[dict[str, Any]]:
        return [drill.status() for drill in self.drills.values()]
