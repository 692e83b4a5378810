"""The last hour of every peer's lag, for the web console's graph (``GET /api/lag-history``).

Sans-I/O: the admin side calls :meth:`LagHistory.sample` with the unit's status document about
once a second and serves :meth:`LagHistory.to_json`. Nothing here reads a clock or a socket, so
the rules (one point per interval, the span, forgetting) are tested with made-up times.

What is kept, per volume and peer: the peer is keyed by its ``address`` in
``volumes[].peers[]`` (the address as configured, which is also the name of its journal
consumer, so it is unique within a volume and stable while the peer is configured, unlike its
unit name, which is ``null`` until its first connection). Each point is
``[time, lag_seconds, lag_bytes]`` from the same entry: ``lag_seconds`` is the age of the
oldest record the peer lacks and is ``null`` while the peer is in dirty-map tracking (its lag
is then only bytes); ``lag_bytes`` is journal backlog plus dirty bytes.

A point stands for up to ``interval`` seconds of samples and holds their *worst* lag: the
samples between two points are not drawn, and a spike of a few seconds must not vanish from the
graph because it fell between them. ``time`` is the first sample's, in whatever clock the caller
passes as ``now`` (the unit's wall clock, ``time.time()``); ``now`` in :meth:`to_json` is the
newest sample's, so a reader can draw the last ``span`` seconds without trusting its own clock.

Memory is bounded: at most ``span / interval + 1`` points per series, and only for the volumes
and peers of the latest status (the others are forgotten at once).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["LagHistory"]

_N = TypeVar("_N", int, float)


@dataclass(slots=True)
class _Point:
    time: float
    seconds: float | None
    bytes: int | None

    def merge(self, seconds: float | None, nbytes: int | None) -> None:
        self.seconds = _worst(self.seconds, seconds)
        self.bytes = _worst(self.bytes, nbytes)

    def to_json(self) -> list[Any]:
        seconds = None if self.seconds is None else round(self.seconds, 3)
        return [round(self.time, 3), seconds, self.bytes]


def _worst(a: _N | None, b: _N | None) -> _N | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _seconds(value: Any) -> float | None:
    # bool is an int: True must not become a lag of one second.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def _bytes(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


class LagHistory:
    """Per (volume, peer): the lag over the last ``span`` seconds, a point per ``interval``."""

    def __init__(self, *, interval: float = 10.0, span: float = 3600.0) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        if not (math.isfinite(span) and span >= interval):
            raise ValueError(f"span must be at least the interval ({interval}), not {span!r}")
        self.interval = interval
        self.span = span
        # The most points a series can hold within the span (its points are at least an
        # interval apart); the deque's bound holds even if a caller's clock misbehaves.
        self._limit = math.floor(span / interval) + 1
        self._series: dict[str, dict[str, deque[_Point]]] = {}
        self._now: float | None = None

    def sample(self, status: dict[str, Any], now: float) -> None:
        """Take the lag of every peer in ``status`` (the ``GET /api/status`` document) at ``now``.

        A sample less than ``interval`` after a series' newest point is folded into that point
        (its worst lag kept); otherwise it starts a new one. Points older than ``span`` are
        dropped, and so are the series of volumes and peers ``status`` no longer has. A clock
        that steps back drops the points it would put in the future, so a series stays in
        time order.
        """
        if not math.isfinite(now):
            return
        kept: dict[str, dict[str, deque[_Point]]] = {}
        volumes = status.get("volumes")
        for vol in volumes if isinstance(volumes, list) else []:
            if not isinstance(vol, dict) or not isinstance(vol.get("name"), str):
                continue
            old = self._series.get(vol["name"], {})
            series_of = kept.setdefault(vol["name"], {})
            peers = vol.get("peers")
            for peer in peers if isinstance(peers, list) else []:
                if not isinstance(peer, dict) or not isinstance(peer.get("address"), str):
                    continue
                address = peer["address"]
                series = series_of.get(address) or old.get(address) or deque(maxlen=self._limit)
                series_of[address] = series
                self._add(
                    series, now, _seconds(peer.get("lag_seconds")), _bytes(peer.get("lag_bytes"))
                )
        self._series = kept
        self._now = now

    def _add(
        self, series: deque[_Point], now: float, seconds: float | None, nbytes: int | None
    ) -> None:
        while series and series[-1].time > now:
            series.pop()
        if series and now - series[-1].time < self.interval:
            series[-1].merge(seconds, nbytes)
        else:
            series.append(_Point(now, seconds, nbytes))
        horizon = now - self.span
        while series and series[0].time < horizon:
            series.popleft()

    def to_json(self) -> dict[str, Any]:
        """``{"interval_seconds", "span_seconds", "now", "fields", "volumes": {VOLUME: {PEER
        ADDRESS: [[time, lag_seconds, lag_bytes], ...]}}}``, each series oldest first; ``now``
        is the newest sample's time (``null`` before the first)."""
        return {
            "interval_seconds": self.interval,
            "span_seconds": self.span,
            "now": None if self._now is None else round(self._now, 3),
            "fields": ["time", "lag_seconds", "lag_bytes"],
            "volumes": {
                volume: {peer: [p.to_json() for p in series] for peer, series in peers.items()}
                for volume, peers in self._series.items()
            },
        }
