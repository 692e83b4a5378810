"""The split brains of one volume: with which peers, since when, and what each side wrote.

A split brain is found by either end of a link (:mod:`blockmirror.failover`): the listener
comparing lineages, a sender told so in a REFUSE, or a source whose WELCOME check finds the
secondary's newest record is not its own. Each is recorded here once per episode, with an
alert, and stays until the peer is linked again or an operator resolves it; what a later
refusal adds (the peer's divergence, its lineage) fills in what was not known yet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from blockmirror.alerts import AlertLog
from blockmirror.journal.lineage import Lineage

__all__ = ["SplitBrain", "SplitBrains"]


@dataclass(frozen=True, slots=True)
class SplitBrain:
    """A split brain with one peer, as status shows it."""

    peer: str
    common_seq: int | None
    local_diverged_bytes: int
    peer_diverged_bytes: int | None
    reason: str
    peer_lineage: Lineage | None
    since: float

    def status(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "common_seq": self.common_seq,
            "local_diverged_bytes": self.local_diverged_bytes,
            "peer_diverged_bytes": self.peer_diverged_bytes,
            "reason": self.reason,
            "since": self.since,
        }


class SplitBrains:
    """The volume's split brains, by peer unit."""

    def __init__(self, volume: str, events: AlertLog) -> None:
        self.volume = volume
        self.events = events
        self._by_peer: dict[str, SplitBrain] = {}

    def get(self, peer: str) -> SplitBrain | None:
        return self._by_peer.get(peer)

    def peers(self) -> list[str]:
        return sorted(self._by_peer)

    def only(self) -> SplitBrain:
        (split,) = self._by_peer.values()
        return split

    def status(self) -> list[dict[str, Any]]:
        return [split.status() for split in self._by_peer.values()]

    def record(
        self,
        peer: str,
        common_seq: int | None,
        local_bytes: int,
        peer_bytes: int | None,
        reason: str,
        lineage: Lineage | None = None,
    ) -> None:
        """A split brain with ``peer``: a new episode is an alert; a known one keeps its start
        and what was known of the peer unless this says more."""
        old = self._by_peer.get(peer)
        self._by_peer[peer] = SplitBrain(
            peer,
            common_seq,
            local_bytes,
            peer_bytes if peer_bytes is not None else (old.peer_diverged_bytes if old else None),
            reason,
            lineage or (old.peer_lineage if old else None),
            old.since if old else time.time(),
        )
        if old is None:
            self.events.alert(
                "split_brain",
                f"split brain with {peer}: {reason}; common point seq {common_seq}, "
                f"{local_bytes} bytes here differ since. Nothing is copied until an operator "
                f"runs `blockmirror resolve {self.volume} --discard-local` on the unit that gives "
                "up its writes",
            )

    def clear(self, peer: str) -> None:
        """The episode with ``peer`` is over (it linked again): said once."""
        if self._by_peer.pop(peer, None) is not None:
            self.events.alert("split_brain_cleared", f"split brain with {peer} is over")

    def forget(self, peer: str) -> None:
        """Resolved here by the operator (the resolve's own event says so)."""
        self._by_peer.pop(peer, None)
