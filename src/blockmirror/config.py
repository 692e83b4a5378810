"""The unit's TOML configuration: parsed into frozen dataclasses, or every problem reported at once.

Validation collects problems instead of stopping at the first, because an operator fixing a
config file one error per run is the experience ``check-config`` exists to avoid.

Why one module: this is the schema of one file, every key's parsing and the checks that span
keys (listeners that clash, volumes that overlap, files that must exist); the generic pieces
(addresses, typed table access, default paths) live in their own modules.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from blockmirror import config_paths, statedir
from blockmirror.addresses import Address, clashes, parse_address, valid_host
from blockmirror.admin.access import check_token_file
from blockmirror.config_alerts import AlertsConfig, parse_alerts
from blockmirror.config_archive import ArchiveConfig, check_archive_names, parse_archives
from blockmirror.config_iscsi import IscsiConfig, parse_iscsi
from blockmirror.config_link import LINK_KEYS, parse_link
from blockmirror.config_table import Problem, Table, type_name
from blockmirror.errors import ConfigError
from blockmirror.link.auth import AuthError, load_psk
from blockmirror.link.settings import ConnectMode, LinkSettings
from blockmirror.units import GiB, MiB, format_size

__all__ = [
    "Address",
    "AlertsConfig",
    "Config",
    "ReplicationConfig",
    "UnitConfig",
    "VolumeConfig",
    "format_problems",
    "load_config",
    "parse_address",
    "parse_config",
]

Role = Literal["primary", "secondary"]
Overflow = Literal["track", "block"]
Ack = Literal["local", "remote"]

SECTOR = 512
MIN_JOURNAL_SIZE = MiB
MIN_HISTORY_SIZE = 4 * MiB
# Byte offsets end up in off_t; a region past this could never be addressed.
MAX_END = (1 << 63) - 1
# Volume names are NBD export names and also name files under state_dir, so keep them to a
# charset that is safe in both places.
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,255}", re.ASCII)


@dataclass(frozen=True)
class UnitConfig:
    """The ``[unit]`` table: who this process is and where it keeps its state."""

    name: str
    state_dir: Path
    admin: Address | None = None
    # The admin API's credential; None: STATE_DIR/admin.token, generated at the first start.
    admin_token_file: Path | None = None
    admin_public_status: bool = False
    admin_hosts: tuple[str, ...] = ()
    admin_tls_cert: Path | None = None
    admin_tls_key: Path | None = None
    admin_tls_ca: Path | None = None
    # Unit-wide NBD bounds: READ data read and not yet sent, and connections (all exports).
    nbd_reply_budget: int = 256 * MiB
    nbd_max_connections: int = 256


@dataclass(frozen=True)
class ReplicationConfig:
    """The ``[replication]`` table: how links are accepted and authenticated."""

    listen: Address | None = None
    psk_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # Every link's default settings (config_link: bandwidth, compression, priority, transmit
    # windows, connect); a peer written as an inline table may override each.
    link: LinkSettings = field(default_factory=LinkSettings)

    @property
    def bandwidth(self) -> int | None:
        """Every link's default rate limit, in bits per second (None: none)."""
        return self.link.bandwidth


@dataclass(frozen=True, kw_only=True)
class VolumeConfig:
    """One ``[[volume]]``: a region of a file or device, exported (primary) or replicated."""

    name: str
    role: Role
    path: Path
    offset: int = 0
    size: int
    export: Address | None = None
    read_only: bool = False
    journal: bool = True
    journal_size: int = GiB
    journal_high_water: float = 0.8
    overflow: Overflow = "track"
    ack: Ack = "local"
    ack_timeout: float = 30.0
    peers: tuple[Address, ...] = ()
    description: str = ""
    # This volume's own pre-shared key (overrides [replication] psk_file for its links): on a
    # unit holding many tenants' replicas, each source can write only the replica of its key.
    psk_file: Path | None = None
    # Certificate names (CN or DNS subjectAltName) a source's TLS certificate must carry to
    # write this replica; empty: any certificate the CA signed.
    tls_peers: tuple[str, ...] = ()
    # The peers written as inline tables with link settings of their own: (address, the
    # (key, value) pairs it sets), overriding the [replication] defaults key by key.
    peer_links: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    # A host write whose data the volume already holds is neither journaled nor sent.
    skip_unchanged: bool = False
    # Point-in-time history (docs/history.md): how far back points are kept (seconds; 0:
    # none), and the most space its segments may take in state_dir (None: the volume's size).
    history: float = 0.0
    history_size: int | None = None
    # On a secondary: how long received records wait before they reach the replica.
    replay_delay: float = 0.0
    # Served as the iSCSI target BASE_IQN:NAME, LUN 0 (read-only while not primary).
    iscsi: bool = False
    # On a secondary: the [[archive]] a new replica is first restored from (docs/archive.md).
    seed_from: str | None = None

    def link_of(self, peer: str, defaults: LinkSettings) -> LinkSettings:
        """The settings of the link to ``peer``: ``defaults`` with the peer's own on top."""
        for address, overrides in self.peer_links:
            if address == peer:
                return dataclasses.replace(defaults, **dict(overrides))  # type: ignore[arg-type]
        return defaults

    @property
    def history_cap(self) -> int:
        return self.size if self.history_size is None else self.history_size


@dataclass(frozen=True)
class Config:
    """A whole validated unit configuration; ``source`` is the file it came from, if any."""

    unit: UnitConfig
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    volumes: tuple[VolumeConfig, ...] = ()
    source: Path | None = None
    # ``(key, message)`` about things that are valid but look bad (check-config prints them).
    warnings: tuple[Problem, ...] = ()
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    # The iSCSI portal (docs/iscsi.md); None without an [iscsi] table.
    iscsi: IscsiConfig | None = None
    # The [[archive]] tables (docs/archive.md).
    archives: tuple[ArchiveConfig, ...] = ()

    def volume(self, name: str) -> VolumeConfig:
        """The volume called ``name``; raises KeyError if there is none."""
        for vol in self.volumes:
            if vol.name == name:
                return vol
        raise KeyError(name)


def format_problems(problems: Iterable[Problem]) -> str:
    """One ``key: message`` line per problem, as ``check-config`` prints them."""
    return "\n".join(f"{key}: {message}" for key, message in problems)


_TOP_KEYS = ("unit", "replication", "volume", "alerts", "iscsi", "archive")
_UNIT_KEYS = (
    "name", "state_dir", "admin", "admin_token_file", "admin_public_status", "admin_hosts",
    "admin_tls_cert", "admin_tls_key", "admin_tls_ca", "nbd_reply_budget", "nbd_max_connections",
)  # fmt: skip
_REPLICATION_KEYS = ("listen", "psk_file", "tls_cert", "tls_key", "tls_ca", *LINK_KEYS)
_PEER_KEYS = ("address", *LINK_KEYS)
_VOLUME_KEYS = (
    "name", "role", "path", "offset", "size", "export", "read_only", "journal", "journal_size",
    "journal_high_water", "overflow", "ack", "ack_timeout", "peers", "description",
    "psk_file", "tls_peers", "history", "history_size", "replay_delay", "iscsi",
    "skip_unchanged", "seed_from",
)  # fmt: skip
_ROLES: dict[str, Role] = {"primary": "primary", "secondary": "secondary"}
_OVERFLOWS: dict[str, Overflow] = {"track": "track", "block": "block"}
_ACKS: dict[str, Ack] = {"local": "local", "remote": "remote"}


def _subtable(data: Mapping[str, object], name: str, problems: list[Problem]) -> dict[str, object]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        problems.append((name, f"expected a [{name}] table, got {type_name(value)}"))
        return {}
    return value


def _valid_name(value: object) -> bool:
    return isinstance(value, str) and bool(_NAME_RE.fullmatch(value)) and value not in {".", ".."}


def _check_name(table: Table, name: str | None, what: str) -> None:
    if name is not None and not _valid_name(name):
        table.fail(
            "name",
            f"{name!r} is not a valid {what} name: use 1 to 255 of A-Z a-z 0-9 . _ -"
            " (not '.' or '..')",
        )


@dataclass
class _Volume:
    """A volume as parsed so far, with the keys that failed, for the cross-volume checks."""

    label: str
    config: VolumeConfig
    bad: set[str]


def _parse_volume(
    data: Mapping[str, object], index: int, problems: list[Problem], base_dir: Path
) -> _Volume:
    raw_name = data.get("name")
    # Name the volume by its name when it has a usable one: "volume[db].size" beats an index.
    label = f"volume[{raw_name}]" if _valid_name(raw_name) else f"volume[{index}]"
    t = Table(data, label, _VOLUME_KEYS, problems, base_dir)
    name = t.text("name", required=True)
    _check_name(t, name, "volume")
    role = t.choice("role", tuple(_ROLES), required=True)
    path = t.path("path", required=True)
    offset = t.size("offset")
    size = t.size("size", required=True)
    export = t.address("export", allow_zero=True)
    read_only = t.flag("read_only")
    journal = t.flag("journal")
    journal_size = t.size("journal_size")
    high_water = t.number("journal_high_water")
    overflow = t.choice("overflow", tuple(_OVERFLOWS))
    ack = t.choice("ack", tuple(_ACKS))
    ack_timeout = t.number("ack_timeout")
    description = t.text("description")
    peers, peer_links = _parse_peers(t, base_dir)
    psk_file = t.path("psk_file")
    tls_peers = _parse_names(t, "tls_peers")
    history = t.duration("history")
    history_size = t.size("history_size")
    replay_delay = t.duration("replay_delay")
    iscsi = t.flag("iscsi")
    skip_unchanged = t.flag("skip_unchanged")
    seed_from = t.text("seed_from")
    if seed_from is not None and role == "primary":
        t.fail("seed_from", "only a secondary's replica is seeded from an archive")

    if offset is not None and offset % SECTOR:
        t.fail("offset", f"{offset} is not a multiple of {SECTOR} bytes")
    if size is not None:
        if size == 0:
            t.fail("size", "must be greater than 0")
        elif size % SECTOR:
            t.fail("size", f"{size} is not a multiple of {SECTOR} bytes")
        elif (offset or 0) + size > MAX_END:
            t.fail("size", "offset + size is beyond the largest possible file offset")
    if journal_size is not None and journal_size < MIN_JOURNAL_SIZE:
        t.fail("journal_size", f"{format_size(journal_size)} is below the minimum of 1 MiB")
    if high_water is not None and not 0 < high_water < 1:
        t.fail("journal_high_water", f"{high_water} must be between 0 and 1, exclusive")
    if ack_timeout is not None and not (math.isfinite(ack_timeout) and ack_timeout > 0):
        t.fail("ack_timeout", f"{ack_timeout} must be a positive number of seconds")
    if history_size is not None and history_size < MIN_HISTORY_SIZE:
        t.fail("history_size", f"{format_size(history_size)} is below the minimum of 4 MiB")
    if replay_delay and journal is False:
        t.fail("replay_delay", "needs the journal (journal = false): delayed records wait there")
    if history and journal is False:
        t.fail("history", "needs the journal (journal = false): history is kept as it applies")
    if role == "primary" and export is None and "export" not in t.bad:
        t.fail("export", "missing; a primary needs the NBD address it serves the host on")
    if journal is False and peers and "peers" not in t.bad:
        t.fail("journal", "false, but peers are listed; replication streams from the journal")
    if ack == "remote" and not peers and "peers" not in t.bad:
        t.fail("ack", "'remote' waits for peers, but peers is empty")

    defaults = VolumeConfig(name="", role="primary", path=Path(), size=0)
    config = VolumeConfig(
        name=name or "",
        role=_ROLES.get(role or "", defaults.role),
        path=path or defaults.path,
        offset=defaults.offset if offset is None else offset,
        size=size or 0,
        export=export,
        read_only=defaults.read_only if read_only is None else read_only,
        journal=defaults.journal if journal is None else journal,
        journal_size=journal_size or defaults.journal_size,
        journal_high_water=defaults.journal_high_water if high_water is None else high_water,
        overflow=_OVERFLOWS.get(overflow or "", defaults.overflow),
        ack=_ACKS.get(ack or "", defaults.ack),
        ack_timeout=defaults.ack_timeout if ack_timeout is None else ack_timeout,
        peers=peers,
        description=description or "",
        psk_file=psk_file,
        tls_peers=tls_peers,
        peer_links=peer_links,
        skip_unchanged=bool(skip_unchanged),
        history=history or 0.0,
        history_size=history_size,
        replay_delay=replay_delay or 0.0,
        iscsi=bool(iscsi),
        seed_from=seed_from,
    )
    return _Volume(label, config, t.bad)


def _parse_names(t: Table, key: str) -> tuple[str, ...]:
    value = t.typed(key, (list,), "an array of certificate names", False)
    if not isinstance(value, list):
        return ()
    names: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item or len(item) > 255:
            t.fail(
                f"{key}[{i}]", f"expected a certificate name (1 to 255 characters), got {item!r}"
            )
            t.bad.add(key)
            continue
        names.append(item)
    return tuple(names)


PeerLinks = tuple[tuple[str, tuple[tuple[str, object], ...]], ...]


def _parse_peers(t: Table, base_dir: Path) -> tuple[tuple[Address, ...], PeerLinks]:
    """``peers``: each an address string, or an inline table ``{ address = ..., bandwidth =
    ... }`` whose keys override the [replication] defaults for that link."""
    value = t.typed("peers", (list,), "an array of HOST:PORT strings or inline tables", False)
    if not isinstance(value, list):
        return (), ()
    peers: list[Address] = []
    links: list[tuple[str, tuple[tuple[str, object], ...]]] = []
    for i, raw in enumerate(value):
        name = f"peers[{i}]"
        overrides: tuple[tuple[str, object], ...] = ()
        item: object = raw
        if isinstance(raw, dict):
            entry = Table(raw, t.key(name), _PEER_KEYS, t.problems, base_dir)
            item = entry.text("address", required=True)
            own = parse_link(entry, LinkSettings(), whole=False)
            overrides = tuple(
                (key, getattr(own, key)) for key in LINK_KEYS if key in raw and key not in entry.bad
            )
            if item is None:
                t.bad.add("peers")
                continue
        if not isinstance(item, str):
            t.fail(
                name,
                f"expected a HOST:PORT string or an inline table, got {type_name(item)} ({item!r})",
            )
            t.bad.add("peers")
            continue
        peer = t.address_value(name, item, allow_zero=False)
        if peer is None:
            t.bad.add("peers")
        elif peer in peers:
            t.fail(name, f"{peer} is listed twice")
        else:
            peers.append(peer)
            if overrides:
                links.append((str(peer), overrides))
    return tuple(peers), tuple(links)


def _check_listeners(listeners: Sequence[tuple[str, Address]], problems: list[Problem]) -> None:
    for i, (key, addr) in enumerate(listeners):
        for other_key, other in listeners[:i]:
            if clashes(addr, other):
                problems.append((key, f"{addr} is already used by {other_key} ({other})"))
                break


def parse_config(
    data: Mapping[str, object],
    *,
    base_dir: Path,
    check_paths: bool = True,
    source: Path | None = None,
) -> Config:
    """Validate parsed TOML ``data``; relative paths resolve against ``base_dir``.

    Raises ConfigError listing every problem. With ``check_paths`` the files, devices and
    directories named are inspected too (never modified).
    """
    problems: list[Problem] = []
    for name in data:
        if name not in _TOP_KEYS:
            problems.append((name, f"unknown table or key; allowed: {', '.join(_TOP_KEYS)}"))

    ut = Table(_subtable(data, "unit", problems), "unit", _UNIT_KEYS, problems, base_dir)
    unit_name = ut.text("name", required=True)
    _check_name(ut, unit_name, "unit")
    state_dir = ut.path("state_dir", required=True)
    admin = ut.address("admin", allow_zero=True)
    admin_access = _parse_admin_access(ut)
    nbd_reply_budget, nbd_max_connections = _parse_nbd_limits(ut)

    rdata = _subtable(data, "replication", problems)
    rt = Table(rdata, "replication", _REPLICATION_KEYS, problems, base_dir)
    replication = ReplicationConfig(
        listen=rt.address("listen", allow_zero=True),
        psk_file=rt.path("psk_file"),
        tls_cert=rt.path("tls_cert"),
        tls_key=rt.path("tls_key"),
        tls_ca=rt.path("tls_ca"),
        link=parse_link(rt, LinkSettings()),
    )
    # TLS is all or nothing: a certificate without a CA would accept any client (or trust the
    # system's public CAs), a CA without a certificate would leave a listener in plain TCP.
    tls_keys = ("tls_cert", "tls_key", "tls_ca")
    present = [k for k in tls_keys if k in rdata]
    if present:
        for lacks in tls_keys:
            if lacks not in rdata:
                rt.fail(
                    lacks,
                    f"missing; {', '.join(present)} set, and tls_cert, tls_key and tls_ca "
                    "go together",
                )

    volumes = _parse_volume_list(data.get("volume"), problems, base_dir)
    alerts = parse_alerts(data.get("alerts"), problems, base_dir, check_paths=check_paths)
    iscsi = parse_iscsi(data.get("iscsi"), problems, base_dir, check_paths=check_paths)
    archives = parse_archives(data.get("archive"), problems, base_dir)
    check_archive_names(
        archives,
        [v.config.name for v in volumes],
        [
            (v.label, v.config.name, v.config.seed_from)
            for v in volumes
            if v.config.seed_from is not None
        ],
        problems,
    )
    _check_volume_set(volumes, replication, rt, problems)
    for v in volumes:
        for peer in v.config.peers:
            link = v.config.link_of(str(peer), replication.link)
            if link.connect is ConnectMode.WINDOWS and link.schedule.always:
                problems.append(
                    (
                        f"{v.label}.peers",
                        f"{peer}: connect = 'windows' needs transmit_windows that leave some "
                        "time closed",
                    )
                )
    if iscsi is None:
        for v in volumes:
            if v.config.iscsi:
                problems.append(
                    (f"{v.label}.iscsi", "true, but there is no [iscsi] table (base_iqn, listen)")
                )

    listeners: list[tuple[str, Address]] = []
    if admin is not None:
        listeners.append(("unit.admin", admin))
    if replication.listen is not None:
        listeners.append(("replication.listen", replication.listen))
    listeners += [(f"{v.label}.export", v.config.export) for v in volumes if v.config.export]
    if iscsi is not None and any(v.config.iscsi for v in volumes):
        listeners.append(("iscsi.listen", iscsi.listen))
    _check_listeners(listeners, problems)

    if check_paths:
        _check_unit_files(state_dir, replication, problems)
        for v in volumes:
            if v.config.psk_file is not None and "psk_file" not in v.bad:
                why = _psk_problem(v.config.psk_file)
                if why is not None:
                    problems.append((f"{v.label}.psk_file", why))
        _check_admin_files(admin_access, problems)
    regions = [
        config_paths.Region(
            v.label,
            v.config.path,
            None if "offset" in v.bad else v.config.offset,
            None if v.bad & {"offset", "size"} else v.config.size,
            v.config.read_only,
        )
        for v in volumes
        if "path" not in v.bad
    ]
    problems += config_paths.check_regions(regions, touch_disk=check_paths)

    if problems or unit_name is None or state_dir is None:
        raise ConfigError(problems)
    warnings = _space_warnings(state_dir, volumes) if check_paths else []
    return Config(
        unit=dataclasses.replace(
            admin_access,
            name=unit_name,
            state_dir=state_dir,
            admin=admin,
            nbd_reply_budget=nbd_reply_budget,
            nbd_max_connections=nbd_max_connections,
        ),
        replication=replication,
        alerts=alerts,
        iscsi=iscsi,
        archives=tuple(archives),
        volumes=tuple(v.config for v in volumes),
        source=source,
        warnings=tuple(warnings),
    )


def _space_warnings(state_dir: Path, volumes: Sequence[_Volume]) -> list[Problem]:
    """Journals (in ``state_dir``) and sparse volume files that will not fit their filesystem."""
    needs = []
    for v in volumes:
        vc = v.config
        if vc.read_only:
            continue
        if vc.journal:
            needs.append(
                config_paths.SpaceNeed(
                    f"{v.label}.journal_size",
                    statedir.journal_path(state_dir, vc.name),
                    vc.journal_size,
                    "journal",
                )
            )
        if vc.journal and vc.history:
            needs.append(
                config_paths.SpaceNeed(
                    f"{v.label}.history_size",
                    statedir.history_path(state_dir, vc.name),
                    vc.history_cap,
                    "history",
                )
            )
        needs.append(
            config_paths.SpaceNeed(f"{v.label}.path", vc.path, vc.offset + vc.size, "volume")
        )
    return config_paths.check_free_space(needs)


def _parse_volume_list(value: object, problems: list[Problem], base_dir: Path) -> list[_Volume]:
    if value is None:
        problems.append(("volume", "no [[volume]] tables; a unit needs at least one"))
        return []
    if not isinstance(value, list):
        problems.append(("volume", f"expected [[volume]] tables, got {type_name(value)}"))
        return []
    volumes: list[_Volume] = []
    for index, item in enumerate(value):
        if isinstance(item, dict):
            volumes.append(_parse_volume(item, index, problems, base_dir))
        else:
            problems.append((f"volume[{index}]", f"expected a table, got {type_name(item)}"))
    if not value:
        problems.append(("volume", "no [[volume]] tables; a unit needs at least one"))
    return volumes


def _check_volume_set(
    volumes: Sequence[_Volume], replication: ReplicationConfig, rt: Table, problems: list[Problem]
) -> None:
    first_label: dict[str, str] = {}
    for i, vol in enumerate(volumes):
        name = vol.config.name
        if not name or "name" in vol.bad:
            continue
        if name in first_label:
            message = f"duplicate volume name {name!r} (volume[{i}] repeats {first_label[name]})"
            problems.append((f"{vol.label}.name", message))
        else:
            first_label[name] = f"volume[{i}]"
    secondaries = [v for v in volumes if v.config.role == "secondary" and "role" not in v.bad]
    if secondaries and replication.listen is None and "listen" not in rt.bad:
        rt.fail(
            "listen",
            f"missing; {secondaries[0].label} is a secondary and receives writes on this address",
        )


MAX_NBD_CONNECTIONS = 65536


def _parse_nbd_limits(ut: Table) -> tuple[int, int]:
    """``(nbd_reply_budget, nbd_max_connections)`` of ``[unit]``, defaults where not given."""
    defaults = UnitConfig("", Path())
    budget = ut.size("nbd_reply_budget")
    if budget is not None and budget < MiB:
        ut.fail("nbd_reply_budget", f"{format_size(budget)} is below the minimum of 1 MiB")
    conns = ut.typed("nbd_max_connections", (int,), "an integer", False)
    if isinstance(conns, int) and not 1 <= conns <= MAX_NBD_CONNECTIONS:
        ut.fail("nbd_max_connections", f"{conns} is not between 1 and {MAX_NBD_CONNECTIONS}")
    return (
        budget if budget is not None and budget >= MiB else defaults.nbd_reply_budget,
        conns
        if isinstance(conns, int) and 1 <= conns <= MAX_NBD_CONNECTIONS
        else defaults.nbd_max_connections,
    )


def _parse_admin_access(ut: Table) -> UnitConfig:
    """The admin API's access keys of ``[unit]`` (in a UnitConfig with placeholder name)."""
    hosts: list[str] = []
    value = ut.typed("admin_hosts", (list,), "an array of host names", False)
    for i, item in enumerate(value if isinstance(value, list) else []):
        if not isinstance(item, str) or not valid_host(item.strip().rstrip(".")):
            ut.fail(f"admin_hosts[{i}]", f"{item!r} is not a valid host name")
        else:
            hosts.append(item.strip().rstrip(".").lower())
    cert, key = ut.path("admin_tls_cert"), ut.path("admin_tls_key")
    ca = ut.path("admin_tls_ca")
    if (cert is None) != (key is None) and not ut.bad & {"admin_tls_cert", "admin_tls_key"}:
        lacks = "admin_tls_key" if key is None else "admin_tls_cert"
        ut.fail(lacks, "missing; admin_tls_cert and admin_tls_key go together")
    if ca is not None and cert is None and "admin_tls_cert" not in ut.bad:
        ut.fail("admin_tls_ca", "set, but the admin API has no TLS (admin_tls_cert, admin_tls_key)")
    public = ut.flag("admin_public_status")
    return UnitConfig(
        "",
        Path(),
        admin_token_file=ut.path("admin_token_file"),
        admin_public_status=bool(public),
        admin_hosts=tuple(hosts),
        admin_tls_cert=cert,
        admin_tls_key=key,
        admin_tls_ca=ca,
    )


def _check_admin_files(unit: UnitConfig, problems: list[Problem]) -> None:
    if unit.admin_token_file is not None:
        why = check_token_file(unit.admin_token_file)
        if why is not None:
            problems.append(("unit.admin_token_file", why))
    for name in ("admin_tls_cert", "admin_tls_key", "admin_tls_ca"):
        path = getattr(unit, name)
        if isinstance(path, Path):
            why = config_paths.check_input_file(path)
            if why is not None:
                problems.append((f"unit.{name}", why))


def _check_unit_files(
    state_dir: Path | None, replication: ReplicationConfig, problems: list[Problem]
) -> None:
    if state_dir is not None:
        problems += [("unit.state_dir", msg) for msg in config_paths.check_state_dir(state_dir)]
    for name in ("psk_file", "tls_cert", "tls_key", "tls_ca"):
        path = getattr(replication, name)
        if isinstance(path, Path):
            if name == "psk_file":
                why = _psk_problem(path)
            else:
                why = config_paths.check_input_file(path, must_be_nonempty=False)
            if why is not None:
                problems.append((f"replication.{name}", why))


def _psk_problem(path: Path) -> str | None:
    why = config_paths.check_input_file(path, must_be_nonempty=True)
    if why is None:
        # The same rule `run` applies when it loads the key: check-config must agree.
        try:
            load_psk(path)
        except AuthError as exc:
            why = str(exc)
    return why


def load_config(path: Path, *, check_paths: bool = True) -> Config:
    """Read and validate the TOML file at ``path``; raises ConfigError with every problem."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([("file", f"cannot read {path}: {exc.strerror}")]) from exc
    return config_from_bytes(raw, path, check_paths=check_paths)


def config_from_bytes(raw: bytes, path: Path, *, check_paths: bool = True) -> Config:
    """Validate the TOML text ``raw`` read from ``path``; raises ConfigError like load_config."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([("file", f"{path} is not UTF-8 text: {exc.reason}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("file", f"{path}: invalid TOML: {exc}")]) from exc
    return parse_config(
        data, base_dir=Path(path).absolute().parent, check_paths=check_paths, source=Path(path)
    )
