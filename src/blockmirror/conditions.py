"""Which event conditions hold now, read from the unit's status (sans-I/O).

:class:`Watch` is given the unit's status document (what ``GET /api/status`` answers) about once
a second and says, for every (event, subject) it knows of, whether the condition holds (with the
message to raise) or not (None: clear it). The :class:`~blockmirror.events.EventLog` turns that
into one raise and one clear per episode. Reading status, not the components, keeps every rule
in one place and keeps the rules honest: an event says what status shows.

The rules (docs/operations.md, "Monitoring and alerts"):

- ``volume-failed``: the volume's state is ``failed``.
- ``journal-high-water``: the journal's fill reached its ``journal_high_water`` mark; cleared once
  it is below 90 % of the mark (one episode for a fill that hovers at the mark).
- ``journal-full``: host writes wait for room (``overflow = "block"``), or the journal had to
  switch a consumer to dirty tracking to make room (``overflow = "track"``); cleared once the
  fill is back under the high-water mark and nothing waits.
- ``link-down``: a peer's link has not been up for ``link_down_seconds``.
- ``peer-tracking``: a peer is out of sync: its consumer tracks dirty regions (or resyncs them)
  instead of following the journal.
- ``rpo-exceeded``: a peer's ``lag_seconds`` is over ``rpo_seconds``; a tracking peer, whose lag
  in seconds is unknown, counts once it has been tracking for longer than ``rpo_seconds``.
- ``split-brain``: the volume reports a split brain with a peer unit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from blockmirror.events import EventName, Subject

__all__ = ["Condition", "Watch"]

HYSTERESIS = 0.9
# Peer states in which the link is up (or deliberately idle): anything else counts as down.
_DOWN_STATES = frozenset({"connecting"})
_OUT_OF_SYNC_MODES = frozenset({"tracking"})


@dataclass(frozen=True, slots=True)
class Condition:
    """One (event, subject) and whether it holds: ``message`` None means it does not."""

    name: EventName
    subject: Subject
    message: str | None


@dataclass
class _PeerMemory:
    down_since: float | None = None
    tracking_since: float | None = None


@dataclass
class Watch:
    """The memory the rules need between two looks: since when a link is down or a peer
    tracks, how many overflows a journal had. ``is_open`` tells it which episodes are open
    (for the hysteresis of the journal's fill)."""

    rpo_seconds: float | None = None
    link_down_seconds: float = 30.0
    _peers: dict[tuple[str, str], _PeerMemory] = field(default_factory=dict)
    _overflows: dict[str, int] = field(default_factory=dict)
    _full: set[str] = field(default_factory=set)

    def evaluate(
        self, status: dict[str, Any], now: float, *, open_high_water: set[str] | None = None
    ) -> list[Condition]:
        """Every condition of every configured volume and peer, holding or not.

        ``open_high_water``: the volumes whose journal-high-water episode is open now."""
        open_high_water = open_high_water or set()
        out: list[Condition] = []
        seen: set[tuple[str, str]] = set()
        for vol in status.get("volumes") or []:
            name = str(vol.get("name"))
            out.extend(self._volume(vol, name, name in open_high_water))
            for peer in vol.get("peers") or []:
                key = (name, str(peer.get("address")))
                seen.add(key)
                out.extend(self._peer(peer, key, now))
        for key in set(self._peers) - seen:
            del self._peers[key]
        return out

    # --- a volume --------------------------------------------------------------------------

    def _volume(self, vol: dict[str, Any], name: str, high_open: bool) -> Iterator[Condition]:
        subject = Subject(name)
        failed = vol.get("state") == "failed"
        yield Condition(
            EventName.VOLUME_FAILED,
            subject,
            f"volume {name} failed: {vol.get('problem') or 'no reason recorded'}"
            if failed
            else None,
        )
        journal = vol.get("journal")
        if isinstance(journal, dict):
            yield from self._journal(journal, name, subject, high_open)
        for split in vol.get("split_brain") or []:
            peer = str(split.get("peer"))
            yield Condition(
                EventName.SPLIT_BRAIN,
                Subject(name, peer),
                f"split brain with {peer} after seq {split.get('common_seq')}: "
                f"{split.get('reason')}",
            )

    def _journal(
        self, journal: dict[str, Any], name: str, subject: Subject, high_open: bool
    ) -> Iterator[Condition]:
        capacity = int(journal.get("capacity") or 0)
        used = int(journal.get("used") or 0)
        mark = float(journal.get("high_water") or 1.0)
        fill = used / capacity if capacity else 0.0
        high = fill >= mark * (HYSTERESIS if high_open else 1.0)
        yield Condition(
            EventName.JOURNAL_HIGH_WATER,
            subject,
            f"journal of {name} is {fill:.0%} full (high-water mark {mark:.0%})" if high else None,
        )
        waiting = int(journal.get("waiting_for_room") or 0)
        overflows = int(journal.get("overflows") or 0)
        before = self._overflows.get(name, overflows)
        self._overflows[name] = overflows
        if waiting or overflows > before:
            self._full.add(name)
            reason = (
                f"{waiting} host writes wait for room (overflow = block)"
                if waiting
                else "a peer was switched to dirty tracking to make room (overflow = track)"
            )
            message: str | None = f"journal of {name} is full: {reason}"
        elif name in self._full and fill < mark:
            self._full.discard(name)
            message = None
        else:
            message = f"journal of {name} is full" if name in self._full else None
        yield Condition(EventName.JOURNAL_FULL, subject, message)

    # --- a peer ----------------------------------------------------------------------------

    def _peer(self, peer: dict[str, Any], key: tuple[str, str], now: float) -> Iterator[Condition]:
        memory = self._peers.setdefault(key, _PeerMemory())
        subject = Subject(*key)
        state = str(peer.get("state"))
        if state in _DOWN_STATES:
            memory.down_since = memory.down_since if memory.down_since is not None else now
        else:
            memory.down_since = None
        down_for = now - memory.down_since if memory.down_since is not None else 0.0
        down = memory.down_since is not None and down_for >= self.link_down_seconds
        error = peer.get("last_error")
        yield Condition(
            EventName.LINK_DOWN,
            subject,
            f"peer {key[1]} of {key[0]} unreachable for {down_for:.0f} s"
            + (f": {error}" if error else "")
            if down
            else None,
        )
        tracking = str(peer.get("mode")) in _OUT_OF_SYNC_MODES
        if tracking:
            memory.tracking_since = (
                memory.tracking_since if memory.tracking_since is not None else now
            )
        else:
            memory.tracking_since = None
        yield Condition(
            EventName.PEER_TRACKING,
            subject,
            f"peer {key[1]} of {key[0]} is out of sync: {peer.get('dirty_bytes', 0)} bytes "
            "to resync"
            if tracking
            else None,
        )
        yield Condition(EventName.RPO_EXCEEDED, subject, self._rpo(peer, key, memory, now))

    def _rpo(
        self, peer: dict[str, Any], key: tuple[str, str], memory: _PeerMemory, now: float
    ) -> str | None:
        rpo = self.rpo_seconds
        if rpo is None:
            return None
        lag = peer.get("lag_seconds")
        if isinstance(lag, (int, float)):
            if lag > rpo:
                return f"peer {key[1]} of {key[0]} is {lag:.0f} s behind (rpo_seconds {rpo:g})"
            return None
        if memory.tracking_since is not None and now - memory.tracking_since > rpo:
            return (
                f"peer {key[1]} of {key[0]} has been out of sync for "
                f"{now - memory.tracking_since:.0f} s (rpo_seconds {rpo:g})"
            )
        return None
