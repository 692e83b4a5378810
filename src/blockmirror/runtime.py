"""What a running unit holds for one volume, and the status it shows for it.

:class:`VolumeRuntime` gathers a volume's parts as the daemon (:mod:`blockmirror.daemon`) built
them: the volume, its block-device service and export, its journaled write path, its replica
side (the listener's view of it), its senders and its roles (:mod:`blockmirror.failover`).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blockmirror.archive.uploader import ArchiveUploader
from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.blockdev.service import BlockDevice
from blockmirror.config import VolumeConfig
from blockmirror.counters import VolumeCounters
from blockmirror.drills import VolumeDrills
from blockmirror.failover import VolumeRoles
from blockmirror.frontend.nbd_server import NbdServer
from blockmirror.history.log import HistoryLog, iso_time
from blockmirror.journal.generations import VolumeHistory
from blockmirror.link.replica_runtime import ReplicaRuntime
from blockmirror.link.sender import PeerSender
from blockmirror.state import Role, VolumeState, transition
from blockmirror.store.volume import Volume

__all__ = ["VolumeRuntime", "volume_status"]


@dataclass(slots=True)
class VolumeRuntime:
    config: VolumeConfig
    volume: Volume
    export: BlockDevice
    server: NbdServer | None = None
    state: VolumeState = VolumeState.OPENING
    journal: JournalWritePath | None = None
    problem: str | None = None
    replica: ReplicaRuntime | None = None
    senders: list[PeerSender] = field(default_factory=list)
    # One archive consumer per [[archive]] that uploads this volume (docs/archive.md).
    archives: list[ArchiveUploader] = field(default_factory=list)
    # The live role and the generations (STATE_DIR/VOLUME.role) as read at start; None if it
    # could not be read. Once the volume runs, its roles own them.
    history: VolumeHistory | None = None
    roles: VolumeRoles | None = None
    # Past points served as NBD exports (drills.py); None without a history.
    drills: VolumeDrills | None = None
    # The volume's iSCSI target's status (iscsi_attach.py); None when not served by iSCSI.
    iscsi_status: Callable[[], dict[str, Any]] | None = None

    @property
    def history_log(self) -> HistoryLog | None:
        """The volume's point-in-time history (docs/history.md); None without a journal."""
        return self.journal.history if self.journal is not None else None

    @property
    def volume_store(self) -> Volume:
        return self.volume

    async def bookmark(self, name: str) -> int:
        """Journal a bookmark on this primary; returns its sequence number once it is durable.
        Raises OSError (errno) and BlockmirrorError when the journal cannot take it."""
        if self.journal is None:
            raise OSError(errno.EROFS, "the volume has no journal")
        done = self.journal.bookmark(name)
        seq = self.journal.journal.next_seq - 1
        await done
        return seq

    @property
    def counters(self) -> VolumeCounters:
        return self.export.counters

    @property
    def role(self) -> Role:
        """The live role, kept in the state directory; the configuration's ``role`` is only
        the role a new volume starts with."""
        if self.roles is not None:
            return self.roles.role
        return self.history.role if self.history is not None else Role(self.config.role)

    @property
    def serving_state(self) -> VolumeState:
        """What this volume does when nothing is wrong: serve a host, or be a replica."""
        return VolumeState.SERVING if self.role is Role.PRIMARY else VolumeState.REPLICA

    def enter(self, new: VolumeState) -> None:
        """Change state through the transition table (staying put is not a change)."""
        if new is not self.state:
            self.state = transition(self.state, new, what=f"volume {self.config.name}")

    @property
    def export_address(self) -> str | None:
        if self.server is None:
            return None
        host, port = self.server.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def volume_status(rt: VolumeRuntime) -> dict[str, Any]:
    """The volume's entry in ``GET /api/status``."""
    problem = rt.problem
    if rt.journal is not None and rt.state in (
        VolumeState.SERVING,
        VolumeState.REPLICA,
        VolumeState.STALLED,
    ):
        # The write path's condition decides between serving and stalled (and failed, for
        # good): status never says "serving" while writes fail.
        condition = rt.journal.condition()
        if condition is None:
            rt.enter(rt.serving_state)
        else:
            rt.enter(condition[0])
            if condition[0] is VolumeState.FAILED:
                rt.problem = condition[1]
            problem = condition[1]
    if rt.roles is not None:
        roles: dict[str, Any] = rt.roles.status()
    elif rt.history is not None:
        roles = rt.history.status()
    else:
        roles = {}
    history_log = rt.journal.history if rt.journal is not None else None
    return {
        "name": rt.config.name,
        "role": str(rt.role),
        "configured_role": rt.config.role,
        **roles,
        "state": str(rt.state),
        "size": rt.volume.size,
        "path": str(rt.config.path),
        "offset": rt.config.offset,
        "read_only": rt.export.read_only,
        "export": rt.export_address,
        "iscsi": rt.iscsi_status() if rt.iscsi_status is not None else None,
        "counters": rt.counters.as_dict(),
        "problem": problem,
        "journal": rt.journal.status() if rt.journal is not None else None,
        "history": history_log.status() if history_log is not None else None,
        "consistent_point": _consistent_point(rt, history_log),
        "drills": rt.drills.status() if rt.drills is not None else [],
        "peers": [sender.status() for sender in rt.senders],
        "archives": [archive.status() for archive in rt.archives],
        # A primary has no source: what its receiving side would show says nothing.
        "replica": (
            rt.replica.status() if rt.replica is not None and rt.role is not Role.PRIMARY else None
        ),
    }


def _consistent_point(rt: VolumeRuntime, history_log: HistoryLog | None) -> dict[str, Any] | None:
    """On a replica: the newest point it can be brought to at once (None: there is none).

    A consistent replica is its own point; one in the middle of a resync has the point before
    the resync, if its history kept it (docs/history.md, "Consistent resync")."""
    if rt.role is Role.PRIMARY or rt.journal is None:
        return None
    replica = rt.journal.journal.replica
    if replica is not None and replica.consistent:
        stamp = rt.journal.journal.last_stamp
        seq = rt.journal.applied_seq
        time_ns = stamp[1] if stamp is not None and stamp[0] == seq else 0
        if history_log is not None and history_log.index.last_seq == seq:
            time_ns = history_log.index.last_time or time_ns
        return {"seq": seq, "time": iso_time(time_ns)}
    if history_log is not None and history_log.index.resyncing and history_log.broken is None:
        point = history_log.index.consistent_point()
        if point is not None:
            return {"seq": point.seq, "time": iso_time(point.time_ns)}
    return None
