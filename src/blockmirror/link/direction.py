"""Which way a link carries a volume: what both ends of a link ask of the volume's roles.

Peers are symmetric: every unit that holds a volume runs a sender to each of its peers and a
listener for all of them. Whether a connection carries data, and which way, is decided when it
opens, from the lineage of each end (:mod:`blockmirror.journal.lineage`): the listener
:meth:`LinkRoles.admit`\\ s the connecting end as its source or refuses it with the reason, and a
refused sender hands the refusal to :meth:`LinkRoles.refused`. Carrying out a decision (a
superseded primary demoting itself, a secondary giving up records a promoted unit never had,
recording a split brain) is the roles' business, at the top of the unit
(:mod:`blockmirror.failover`); the link layer only asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from blockmirror.journal.lineage import Lineage
from blockmirror.link.protocol import Refuse

__all__ = ["Admission", "LinkRoles"]


@dataclass(frozen=True, slots=True)
class Admission:
    """The listener's answer to a connecting end. Accepted: ``regions`` are the extents this
    end gave up (its divergence), sent after the WELCOME for the source's resync. Refused:
    ``code`` and ``message`` go in the REFUSE, with this end's ``lineage`` and, for a split
    brain, the common point and what this end wrote past it."""

    accept: bool
    # This end's lineage (None: a refusal before the roles were asked, such as "busy").
    lineage: Lineage | None
    code: str | None = None
    message: str = ""
    common_seq: int | None = None
    diverged_bytes: int | None = None
    regions: tuple[tuple[int, int], ...] = ()

    def refusal(self) -> Refuse:
        assert self.code is not None
        return Refuse(
            self.code,
            self.message,
            lineage=self.lineage,
            common_seq=self.common_seq,
            diverged_bytes=self.diverged_bytes,
        )


class LinkRoles(Protocol):
    """The roles of one volume, as its links see them."""

    def lineage(self) -> Lineage:
        """What this unit holds of the volume now."""
        ...

    def source(self) -> str | None:
        """The unit this volume receives from (the last one, while it is not primary)."""
        ...

    async def admit(self, peer: Lineage, peer_source: str | None) -> Admission:
        """A peer connects to send this volume: accept it as the source, or refuse it."""
        ...

    async def refused(self, consumer: str | None, refusal: Refuse) -> None:
        """Our sender for ``consumer`` was refused for a reason of direction (upstream,
        superseded, split-brain, unrelated), or (``consumer`` None) our source found a split
        brain after our WELCOME: act on it."""
        ...

    def linked(self, consumer: str, peer: Lineage | None) -> None:
        """Our sender for ``consumer`` was accepted by unit ``peer``: any split brain with it
        is over."""
        ...

    async def taken(self) -> None:
        """Our source began the resync that covers the regions we gave up."""
        ...

    def source_changed(self) -> None:
        """A source began sending to this volume: whoever waits on a change is woken (our
        senders learn at once who the peer that just connected is)."""
        ...

    async def wait_changed(self, timeout: float) -> None:
        """Return when the role or the source changes, or after ``timeout`` seconds."""
        ...
