"""A unit's side of the configuration exchange: what it hands its peers, what it keeps of
theirs, and ``GET /api/peer-configs`` that gives a kept copy back (``blockmirror config fetch``).

The copies are written in a thread, newest only, and only when they changed
(:func:`blockmirror.config_store.keep_peer_copy`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs

from blockmirror import config_store
from blockmirror.admin.http import Request, Response, json_response
from blockmirror.config_store import ConfigRecord
from blockmirror.link.peer_configs import ConfigShare
from blockmirror.link.protocol import PeerConfig

__all__ = ["UnitConfigShare"]

log = logging.getLogger(__name__)


class UnitConfigShare:
    def __init__(
        self,
        unit: str,
        state_dir: Path,
        current: Callable[[], tuple[ConfigRecord | None, bytes | None]],
    ) -> None:
        self.unit = unit
        self.state_dir = state_dir
        self._current = current
        self._latest: dict[str, tuple[PeerConfig, str, str]] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}
        self.share = ConfigShare(own=self.own, keep=self.keep)

    def own(self) -> PeerConfig | None:
        record, text = self._current()
        if record is None or text is None:
            return None
        return PeerConfig(self.unit, record.version, text.decode("utf-8", errors="replace"))

    def keep(self, message: PeerConfig, where: str, credential: str) -> None:
        """Keep the newest copy a peer gave. One writer per unit at a time, and only the
        latest waiting copy is written: frames that come faster than the disk are folded."""
        self._latest[message.unit] = (message, where, credential)
        if message.unit not in self._writers:
            task = asyncio.get_running_loop().create_task(self._write(message.unit))
            self._writers[message.unit] = task

    async def _write(self, unit: str) -> None:
        try:
            while (latest := self._latest.pop(unit, None)) is not None:
                message, where, credential = latest
                try:
                    changed = await asyncio.to_thread(
                        config_store.keep_peer_copy,
                        self.state_dir,
                        message.unit,
                        message.config_version,
                        message.text.encode("utf-8"),
                        where,
                        credential,
                    )
                except (OSError, ValueError) as exc:
                    log.error("cannot keep the configuration of unit %s: %s", unit, exc)
                    continue
                if changed:
                    log.info(
                        "kept configuration version %d of unit %s (from %s)",
                        message.config_version,
                        unit,
                        where,
                    )
        finally:
            del self._writers[unit]

    async def wait(self) -> None:
        """Until the copies being written are on disk (at stop)."""
        if self._writers:
            await asyncio.gather(*self._writers.values(), return_exceptions=True)

    def route(self, request: Request) -> Response:
        """``GET /api/peer-configs``: the copies kept; ``?unit=NAME``: that one, with its text."""
        units = parse_qs(request.query).get("unit")
        if not units:
            return json_response(
                HTTPStatus.OK, {"peer_configs": config_store.peer_copies(self.state_dir)}
            )
        try:
            found = config_store.peer_copy(self.state_dir, units[-1])
        except ValueError as exc:
            return json_response(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        if found is None:
            return json_response(
                HTTPStatus.NOT_FOUND,
                {"error": f"this unit keeps no configuration of unit {units[-1][:100]!r}"},
            )
        meta, text = found
        return json_response(HTTPStatus.OK, {**meta, "text": text.decode("utf-8", "replace")})
