"""``ack = "remote"``: answer the host only once every peer holds the write durably.

A write's reply waits until each required peer has acknowledged its sequence number. A peer that
stays silent for ``ack_timeout`` while a write waits on it is *degraded*: the volume stops waiting
for it (the host is answered after the local journal, as with ``ack = "local"``) and an alert is
raised. A degraded peer becomes required again once it has caught up with everything written.

Nothing here does I/O or raises on its own: the methods raise only what the ``on_alert``
callback raises.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence

from blockmirror.alerts import OnAlert

log = logging.getLogger(__name__)


class RemoteAck:
    """Which peers a write must wait for, and the writes waiting on them."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        peers: Sequence[str],
        timeout: float,
        on_alert: OnAlert | None = None,
    ) -> None:
        self._loop = loop
        self.timeout = timeout
        self.acked: dict[str, int] = dict.fromkeys(peers, 0)
        self.degraded: set[str] = set()
        self._waiters: deque[tuple[int, asyncio.Future[None], float]] = deque()
        self._highest_waited = 0
        self._timer: asyncio.TimerHandle | None = None
        self._on_alert = on_alert
        self.degradations = 0

    def set_acked(self, peer: str, seq: int) -> None:
        """Where a peer stands at start (from its journal cursor)."""
        self.acked[peer] = max(self.acked.get(peer, 0), seq)

    def add_peer(self, peer: str) -> None:
        """A peer added by a reload: writes from now on wait for it too (until it is degraded
        by ``ack_timeout``, like a peer that was down at start)."""
        self.acked.setdefault(peer, 0)

    def remove_peer(self, peer: str) -> None:
        """A peer removed by a reload: nothing waits for it any more."""
        self.acked.pop(peer, None)
        self.degraded.discard(peer)
        self._release()

    @property
    def mode(self) -> str:
        return "remote-degraded" if self.degraded else "remote"

    def required(self) -> list[str]:
        return [p for p in self.acked if p not in self.degraded]

    def satisfied(self, seq: int) -> bool:
        return all(self.acked[p] >= seq for p in self.required())

    def wait(self, seq: int, fut: asyncio.Future[None]) -> None:
        """Complete ``fut`` once every required peer has ``seq`` durably."""
        self._highest_waited = max(self._highest_waited, seq)
        if self.satisfied(seq):
            if not fut.done():
                fut.set_result(None)
            return
        self._waiters.append((seq, fut, time.monotonic()))
        self._arm()

    def acknowledge(self, peer: str, seq: int) -> None:
        """``peer`` holds every write up to ``seq`` durably: release what waited on it.

        Any consumer's acknowledgement comes here; one that is not a peer of this mode (an
        archive, a peer removed by a reload) is ignored: it must never become one that writes
        wait for."""
        if peer not in self.acked or seq <= self.acked[peer]:
            return
        self.acked[peer] = seq
        if peer in self.degraded and seq >= self._highest_waited:
            self.degraded.discard(peer)
            log.warning("peer %s caught up: writes wait for its acknowledgement again", peer)
            if self._on_alert is not None:
                self._on_alert("ack_remote_restored", f"peer {peer} acknowledges writes again")
        self._release()

    def _release(self) -> None:
        while self._waiters:
            seq, fut, _ = self._waiters[0]
            if not self.satisfied(seq):
                # Waiters are in sequence order: a later one cannot be satisfied earlier.
                break
            self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def _arm(self) -> None:
        if self._timer is None and self._waiters:
            self._timer = self._loop.call_later(min(self.timeout, 0.5), self._check)

    def _check(self) -> None:
        self._timer = None
        if not self._waiters:
            return
        seq, _, since = self._waiters[0]
        if time.monotonic() - since >= self.timeout:
            for peer in self.required():
                if self.acked[peer] < seq:
                    self.degraded.add(peer)
                    self.degradations += 1
                    message = (
                        f"peer {peer} has not acknowledged for {self.timeout:g} s; "
                        "acknowledging writes locally until it catches up"
                    )
                    log.warning(message)
                    if self._on_alert is not None:
                        self._on_alert("ack_timeout", message)
            self._release()
        self._arm()

    def status(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "timeout": self.timeout,
            "degraded_peers": sorted(self.degraded),
            "waiting_writes": len(self._waiters),
            "degradations": self.degradations,
        }
