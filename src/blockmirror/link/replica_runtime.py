"""One secondary volume as its links see it: who its source is, and who may become it.

A unit holds a :class:`ReplicaRuntime` for every journaled volume. The listener's sessions
(:mod:`blockmirror.link.receiver`) bind to it after the handshake's checks, and it decides
whether a connecting end may become the volume's source (:meth:`ReplicaRuntime.admit_source`):
the checks of identity and of a second source here, the direction (who follows whom) by the
volume's roles (:mod:`blockmirror.link.direction`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.journal.checkpoint import ReplicaState
from blockmirror.link.direction import Admission, LinkRoles
from blockmirror.link.protocol import Hello, RefuseCode
from blockmirror.state import Role

if TYPE_CHECKING:
    from blockmirror.link.receiver import ReceiverSession

__all__ = ["ReplicaRuntime"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ReplicaRuntime:
    """What the receiver needs of one secondary volume, and what status shows about it."""

    name: str
    size: int
    write_path: JournalWritePath
    source: str | None = None
    source_unit: str | None = None
    bytes_received: int = 0
    records_received: int = 0
    connected_since: float | None = None
    last_refusal: str | None = None
    sync_done: tuple[int, int] | None = None  # (lsn, as_of_seq) of a SYNC_DONE not yet reached
    sync_lsn: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # This replica's own key (None: the listener's) and the certificate names allowed to
    # write it (empty: any): what binds a replica to the source that may write it.
    psk: bytes | None = None
    tls_peers: tuple[str, ...] = ()
    # The volume's roles: who may send to it, decided from both ends' lineages (None: any
    # source of the volume's identity, as a plain secondary).
    roles: LinkRoles | None = None
    # The session of the connected source and the role it said it had.
    session: ReceiverSession | None = None
    source_role: Role | None = None
    # Set when the volume leaves the unit (a reload removed it): a session that found it
    # before is refused before it binds.
    closed: bool = False

    @property
    def replica(self) -> ReplicaState | None:
        return self.write_path.journal.replica

    async def disconnect(self, *, timeout: float = 5.0) -> None:
        """End the connected source's session (a promote, a primary taking over from a
        relay) and wait until it has let go of this replica."""
        session = self.session
        if session is not None:
            session.link.abort()
        deadline = time.monotonic() + timeout
        # Polled: the session lets go in its own finally, which has no event to set.
        while True:
            if self.source is None or time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.01)

    def source_holds_everything(self) -> None:
        """Our source holds every record we have (:meth:`Journal.peer_holds`)."""
        if self.source_unit:
            journal = self.write_path.journal
            journal.peer_holds(self.source_unit, journal.durable_seq)

    async def admit_source(self, hello: Hello) -> Admission:
        """Whether the connecting end of ``hello`` may become this replica's source: the same
        volume, no other source (a primary preempts a relay), not a demoted unit, and what
        the roles decide from both lineages."""
        state = self.replica
        held = state.volume_id if state is not None else None
        if state is None and self.roles is not None and self.roles.lineage().role is Role.PRIMARY:
            held = self.write_path.journal.volume_id  # a primary: its own identity
        if held and held != hello.volume_id:
            return _refused(
                "identity-mismatch",
                f"volume {hello.volume} here is volume {held}, not {hello.volume_id}",
            )
        lineage = hello.lineage
        if self.source is not None:
            if (
                lineage is not None
                and lineage.role is Role.PRIMARY
                and self.source_role is not Role.PRIMARY
            ):
                # A primary comes back while a relay feeds us: the primary's line wins.
                log.info(
                    "replica %s: %s takes over from %s", self.name, hello.unit, self.source_unit
                )
                await self.disconnect()
            if self.source is not None:
                return self._busy()
        if lineage is not None and lineage.role is Role.DEMOTED:
            return _refused(
                RefuseCode.UPSTREAM,
                f"{hello.unit} is demoted: it sends nothing until it follows a new primary",
            )
        if self.roles is None or lineage is None:
            return Admission(True, None)
        admission = await self.roles.admit(lineage, hello.source)
        if admission.accept and self.source is not None:  # taken while the roles decided
            return self._busy()
        return admission

    def _busy(self) -> Admission:
        return _refused("busy", f"replica {self.name} already has a source ({self.source})")

    def status(self) -> dict[str, object]:
        replica = self.replica
        return {
            "source": self.source,
            "source_unit": self.source_unit or (replica.source_unit if replica else None),
            "volume_id": replica.volume_id if replica else None,
            "received_seq": self.write_path.journal.durable_seq,
            "applied_seq": self.write_path.applied_seq,
            "consistent": bool(replica and replica.consistent),
            "syncing": self.sync_done is not None or bool(replica and not replica.consistent),
            "bytes_received": self.bytes_received,
            "records_received": self.records_received,
            "connected": self.source is not None,
            "last_refusal": self.last_refusal,
            **self.write_path.replica.delay.status(),
        }


def _refused(code: str, message: str) -> Admission:
    return Admission(False, None, code, message)
