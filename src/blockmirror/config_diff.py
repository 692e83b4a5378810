"""What a reload changes: the difference between the running configuration and a new one.

:func:`diff` compares two validated :class:`~blockmirror.config.Config` objects key by key and
sorts every difference by :data:`TABLE`, the one table that says which keys a running unit can
change and which only a restart can (with the reason shown to the operator). A reload with any
restart-only difference is refused whole: a file applied half-way would leave the unit running
a configuration no file describes. Volumes and peers are matched by name and address, so adding
or removing one is a change of its own (:class:`ChangeKind`), not a change of every key after it.

Sans-I/O: :mod:`blockmirror.reconfigure` applies what this computes.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from blockmirror.config import Config, ReplicationConfig, UnitConfig, VolumeConfig
from blockmirror.config_table import Problem
from blockmirror.link.settings import LinkSettings

__all__ = ["TABLE", "Change", "ChangeKind", "ConfigDiff", "Live", "diff"]


class Live(enum.Enum):
    """Whether a running unit takes a key's new value."""

    LIVE = "live"
    RESTART = "restart"


class ChangeKind(enum.StrEnum):
    VOLUME_ADDED = "volume-added"
    VOLUME_REMOVED = "volume-removed"
    PEER_ADDED = "peer-added"
    PEER_REMOVED = "peer-removed"
    SETTING = "setting"


# Every key of every table: LIVE, or RESTART with the reason the operator reads. A key missing
# here fails tests/unit/test_config_diff.py, so a new key is placed on purpose.
TABLE: dict[str, dict[str, tuple[Live, str]]] = {
    "unit": {
        "name": (Live.RESTART, "the unit's name is how its peers know it"),
        "state_dir": (Live.RESTART, "the unit's state lives there"),
        "admin": (Live.RESTART, "the admin API listens there (restart to move it)"),
        "admin_token_file": (Live.LIVE, ""),
        "admin_public_status": (Live.LIVE, ""),
        "admin_hosts": (Live.LIVE, ""),
        "admin_tls_cert": (Live.RESTART, "the admin API's TLS is set up at start"),
        "admin_tls_key": (Live.RESTART, "the admin API's TLS is set up at start"),
        "admin_tls_ca": (Live.RESTART, "the admin API's TLS is set up at start"),
        "nbd_reply_budget": (Live.LIVE, ""),
        "nbd_max_connections": (Live.LIVE, ""),
    },
    "replication": {
        "listen": (Live.RESTART, "the link listener is bound at start"),
        "psk_file": (Live.LIVE, ""),
        "tls_cert": (Live.RESTART, "the links' TLS is set up at start"),
        "tls_key": (Live.RESTART, "the links' TLS is set up at start"),
        "tls_ca": (Live.RESTART, "the links' TLS is set up at start"),
        "link": (Live.LIVE, ""),  # bandwidth, compression, ... (config_link), each live
    },
    "volume": {
        "name": (Live.LIVE, ""),  # a volume's name is its identity: another name, another one
        # The file's role only seeds the role file at the first start; after that the role
        # changes by promote and demote. A file brought in step after a failover is welcome.
        "role": (Live.LIVE, ""),
        "path": (Live.RESTART, "the volume's file or device is opened at start"),
        "offset": (Live.RESTART, "the volume's region is fixed while it is open"),
        "size": (Live.RESTART, "the volume's size is fixed while hosts use it"),
        "export": (Live.LIVE, ""),
        "read_only": (Live.RESTART, "hosts were told at connect whether they may write"),
        "journal": (Live.RESTART, "a journal is opened (or not) at start"),
        "journal_size": (
            Live.RESTART,
            "use `blockmirror journal resize` with the unit stopped",
        ),
        "journal_high_water": (Live.LIVE, ""),
        "overflow": (Live.LIVE, ""),
        "ack": (Live.RESTART, "the acknowledgement mode is set up at start"),
        "ack_timeout": (Live.LIVE, ""),
        "peers": (Live.LIVE, ""),
        "description": (Live.LIVE, ""),
        "psk_file": (Live.LIVE, ""),
        "tls_peers": (Live.LIVE, ""),
        "peer_links": (Live.LIVE, ""),
        "skip_unchanged": (Live.LIVE, ""),
        "history": (Live.LIVE, ""),  # but not on or off: see _volume_settings
        "history_size": (Live.LIVE, ""),
        "replay_delay": (Live.LIVE, ""),
        "iscsi": (Live.RESTART, "the iSCSI targets are set up at start"),
        # Seeding happens once, when the replica is new; later values change nothing.
        "seed_from": (Live.LIVE, ""),
    },
    "alerts": {"*": (Live.LIVE, "")},
    "iscsi": {"*": (Live.RESTART, "the iSCSI portal is set up at start")},
    "archives": {"*": (Live.RESTART, "the archive consumers are set up at start")},
}

# Config fields that are not keys of the file.
_NOT_KEYS = frozenset({"source", "warnings"})


@dataclass(frozen=True, slots=True)
class Change:
    """One difference. ``key`` is as problems name keys (``volume[db].peers``)."""

    kind: ChangeKind
    key: str
    volume: str | None = None
    peer: str | None = None
    old: Any = None
    new: Any = None

    def describe(self) -> str:
        match self.kind:
            case ChangeKind.VOLUME_ADDED:
                return f"volume {self.volume} added"
            case ChangeKind.VOLUME_REMOVED:
                return f"volume {self.volume} removed"
            case ChangeKind.PEER_ADDED:
                return f"volume {self.volume}: peer {self.peer} added"
            case ChangeKind.PEER_REMOVED:
                return f"volume {self.volume}: peer {self.peer} removed"
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"

    def to_json(self) -> dict[str, Any]:
        return {"change": str(self.kind), "key": self.key, "description": self.describe()}


@dataclass
class ConfigDiff:
    changes: list[Change] = field(default_factory=list)
    # (key, reason): differences only a restart can apply. Any one refuses the reload.
    refused: list[Problem] = field(default_factory=list)
    # Things the operator should know that do not stop the reload.
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.changes and not self.refused

    def settings(self, volume: str | None = None, prefix: str = "") -> list[Change]:
        """The SETTING changes of one volume (or, with ``volume`` None, of ``prefix``)."""
        return [
            c
            for c in self.changes
            if c.kind is ChangeKind.SETTING
            and c.volume == volume
            and (volume is not None or c.key.startswith(prefix))
        ]

    def of(self, kind: ChangeKind) -> list[Change]:
        return [c for c in self.changes if c.kind is kind]


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def diff(old: Config, new: Config) -> ConfigDiff:
    """Every difference between the running ``old`` and the reloaded ``new``."""
    out = ConfigDiff()
    _table(out, "unit", old.unit, new.unit)
    _table(out, "replication", old.replication, new.replication)
    old_volumes = {v.name: v for v in old.volumes}
    new_volumes = {v.name: v for v in new.volumes}
    for name in old_volumes.keys() - new_volumes.keys():
        out.changes.append(Change(ChangeKind.VOLUME_REMOVED, f"volume[{name}]", volume=name))
    for name in sorted(new_volumes.keys() - old_volumes.keys()):
        out.changes.append(Change(ChangeKind.VOLUME_ADDED, f"volume[{name}]", volume=name))
    for name in sorted(old_volumes.keys() & new_volumes.keys()):
        _volume(out, old_volumes[name], new_volumes[name])
    for f in dataclasses.fields(Config):
        if f.name in _NOT_KEYS or f.name in ("unit", "replication", "volumes"):
            continue
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        live, reason = TABLE[f.name]["*"]
        if live is Live.RESTART:
            out.refused.append((f.name, f"changes only at a restart: {reason}"))
        else:
            out.changes.append(Change(ChangeKind.SETTING, f.name, old=before, new=after))
    return out


def _table(
    out: ConfigDiff,
    table: str,
    old: UnitConfig | ReplicationConfig,
    new: UnitConfig | ReplicationConfig,
) -> None:
    for f in dataclasses.fields(old):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        live, reason = TABLE[table][f.name]
        if isinstance(before, LinkSettings) and isinstance(after, LinkSettings):
            # The links' defaults, shown key by key as the file writes them.
            for sub in dataclasses.fields(LinkSettings):
                was, now = getattr(before, sub.name), getattr(after, sub.name)
                if was != now:
                    key = f"{table}.{sub.name}"
                    out.changes.append(Change(ChangeKind.SETTING, key, old=was, new=now))
            continue
        key = f"{table}.{f.name}"
        if live is Live.RESTART:
            out.refused.append((key, f"changes only at a restart: {reason}"))
        else:
            out.changes.append(Change(ChangeKind.SETTING, key, old=before, new=after))


def _volume(out: ConfigDiff, old: VolumeConfig, new: VolumeConfig) -> None:
    label = f"volume[{new.name}]"
    for f in dataclasses.fields(VolumeConfig):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        key = f"{label}.{f.name}"
        live, reason = TABLE["volume"][f.name]
        if live is Live.RESTART:
            out.refused.append((key, f"changes only at a restart: {reason}"))
        elif f.name == "peers":
            old_peers = {str(p) for p in old.peers}
            new_peers = {str(p) for p in new.peers}
            for peer in sorted(old_peers - new_peers):
                out.changes.append(Change(ChangeKind.PEER_REMOVED, key, volume=new.name, peer=peer))
            for peer in sorted(new_peers - old_peers):
                out.changes.append(Change(ChangeKind.PEER_ADDED, key, volume=new.name, peer=peer))
        elif f.name == "history" and (before == 0) != (after == 0):
            # Capture is set up before the journal opens (history_attach): switching it on or
            # off needs that order again.
            out.refused.append((key, "turning history on or off changes only at a restart"))
        elif f.name == "role":
            out.notes.append(
                f"{key}: the file now says {after}; the live role changes only by "
                "`blockmirror promote` or `demote`"
            )
        else:
            out.changes.append(
                Change(ChangeKind.SETTING, key, volume=new.name, old=before, new=after)
            )
