"""Live reconfiguration: apply a reloaded configuration to a running unit.

:func:`reload` takes a validated configuration and its text. :func:`blockmirror.config_diff.diff`
says what differs and refuses what only a restart can change. Then it goes in two phases, so
that a reload either happens or leaves the unit as it was:

1. **Prepare**: everything that can fail, and can be undone. It opens added volumes and binds
   their exports, binds moved exports, creates the dirty maps of added peers, and reads new keys
   and the admin token. Any failure undoes what was prepared, and the reload is refused with
   the key and the reason.
2. **Commit**: what should not fail once prepared. It adds and removes peers, volumes and exports,
   and sets the new values of live settings on the running parts. Host connections of volumes
   the change does not touch are never dropped. A removed peer's sender stops and its journal
   cursor is released (the next checkpoint frees its records). A removed volume is drained and
   closed like at a stop. A step that fails anyway (a checkpoint on a failing disk) is logged
   and named in the answer, and the other steps go on: the unit runs the new configuration.

Between the two, the new configuration is recorded, durably, with its ``config_version``
(:mod:`blockmirror.config_store`); a failure to record it refuses the reload too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockmirror.admin.access import AdminAccess
from blockmirror.admin.setup import admin_access
from blockmirror.archive_attach import start_added_peer
from blockmirror.config import Address, Config, VolumeConfig, config_from_bytes
from blockmirror.config_diff import Change, ChangeKind, ConfigDiff, diff
from blockmirror.config_store import ConfigRecord, rebind_copies, record_applied
from blockmirror.config_table import Problem
from blockmirror.errors import BlockmirrorError, ConfigError
from blockmirror.events import EventName, Subject
from blockmirror.frontend.nbd_server import NbdServer
from blockmirror.history.log import HistorySettings
from blockmirror.journal import consumers as consumers_module
from blockmirror.journal.consumers import Consumer
from blockmirror.link.auth import AuthError, load_psk
from blockmirror.link.peer_configs import credential_of
from blockmirror.link.resume import remove_maps
from blockmirror.runtime import VolumeRuntime

if TYPE_CHECKING:
    from blockmirror.daemon import Unit

__all__ = ["ReloadRefused", "ReloadResult", "reload", "reload_file"]

log = logging.getLogger(__name__)


class ReloadRefused(ConfigError):
    """The reload changed nothing: each problem is ``(key, reason)``."""


@dataclass
class ReloadResult:
    # None when the unit restarts to apply it (a unit whose configuration was lost).
    record: ConfigRecord | None
    changes: list[Change]
    notes: list[str]
    restarting: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "config_version": self.record.version if self.record is not None else None,
            "changed": bool(self.changes) or self.restarting,
            "changes": [c.to_json() for c in self.changes],
            "notes": self.notes,
            "restarting": self.restarting,
        }


@dataclass
class _Prepared:
    """What phase 1 made, for phase 2 to use or for the undo to close."""

    volumes: dict[str, VolumeRuntime] = field(default_factory=dict)
    exports: dict[str, NbdServer | None] = field(default_factory=dict)
    consumers: dict[tuple[str, str], Consumer] = field(default_factory=dict)
    unit_psk: tuple[bytes | None] | None = None
    volume_keys: dict[str, bytes | None] = field(default_factory=dict)
    access: AdminAccess | None = None


async def reload_file(unit: Unit) -> ReloadResult:
    """Read the unit's configuration file and apply it; a unit whose configuration was lost is
    restarted with it instead (lifecycle.run_unit starts the new one). Raises ReloadRefused."""
    source = unit.config.source
    if source is None:
        raise ReloadRefused([("file", "this unit was not started from a file")])
    try:
        raw = await asyncio.to_thread(source.read_bytes)
        new = await asyncio.to_thread(config_from_bytes, raw, source)
    except OSError as exc:
        raise ReloadRefused([("file", f"cannot read {source}: {exc.strerror}")]) from exc
    except ConfigError as exc:
        raise ReloadRefused(exc.problems) from exc
    if unit.lost is None:
        return await reload(unit, new, raw)
    unit.events.clear(EventName.CONFIG_LOST, Subject(), f"{source} restored")
    unit.restart_with = (new, raw)
    unit.restart_requested.set()
    return ReloadResult(None, [], [f"the unit restarts with {source}"], restarting=True)


async def reload(unit: Unit, new: Config, text: bytes) -> ReloadResult:
    """Apply ``new`` to the running ``unit``; raises ReloadRefused (nothing changed)."""
    changes = diff(unit.config, new)
    old_version = unit.config_record.version if unit.config_record is not None else None
    if changes.refused:
        raise ReloadRefused(changes.refused)
    prepared = _Prepared()
    try:
        await _prepare(unit, new, changes, prepared)
        # The version is durable before anything of it is applied, and status shows it from
        # the first change on.
        try:
            record = await asyncio.to_thread(record_applied, new.unit.state_dir, text)
        except OSError as exc:
            raise ReloadRefused(
                [("file", f"cannot record the configuration in {new.unit.state_dir}: {exc}")]
            ) from exc
    except ReloadRefused:
        await _undo(unit, prepared)
        raise
    unit.config_record, unit.config_text = record, text
    try:
        changes.notes += await _commit(unit, new, changes, prepared)
    finally:
        # Whatever happened, the unit runs this configuration now (and a failed step says so
        # in the notes): the next reload compares against it.
        unit.config = new
    unit.write_runtime_file()
    if record.version != (old_version or 0):
        unit.share_config()
    for change in changes.changes:
        log.info("reload: %s", change.describe())
    for note in changes.notes:
        log.warning("reload: %s", note)
    log.info("configuration version %d applied (%d changes)", record.version, len(changes.changes))
    return ReloadResult(record, changes.changes, changes.notes)


# --- phase 1: prepare ---------------------------------------------------------------------------


async def _prepare(unit: Unit, new: Config, changes: ConfigDiff, prepared: _Prepared) -> None:
    problems: list[Problem] = []
    for change in changes.of(ChangeKind.VOLUME_ADDED):
        vc = new.volume(str(change.volume))
        problem = await _prepare_volume(unit, vc, prepared)
        if problem is not None:
            problems.append((change.key, problem))
    for change in changes.changes:
        if change.kind is ChangeKind.SETTING and change.key.endswith(".export"):
            problem = await _prepare_export(unit, change, prepared)
            if problem is not None:
                problems.append((change.key, problem))
        elif change.kind is ChangeKind.PEER_ADDED:
            problem = await _prepare_peer(unit, new, change, prepared)
            if problem is not None:
                problems.append((change.key, problem))
        elif change.key.startswith("unit.admin_") and unit.admin is not None:
            try:
                access, _ = await asyncio.to_thread(admin_access, new.unit)
            except (OSError, BlockmirrorError) as exc:
                problems.append((change.key, str(exc)))
            else:
                prepared.access = access
    problems += _prepare_keys(unit, new, changes, prepared)
    if problems:
        raise ReloadRefused(problems)


def _prepare_keys(
    unit: Unit, new: Config, changes: ConfigDiff, prepared: _Prepared
) -> list[Problem]:
    """Key files are read again at every reload, whether or not their path changed: rotating a
    key is rewriting its file. Only keys that differ are applied (from the next connection)."""
    problems: list[Problem] = []
    path = new.replication.psk_file
    try:
        key = load_psk(path) if path is not None else None
    except AuthError as exc:
        problems.append(("replication.psk_file", str(exc)))
    else:
        if key != unit.psk:
            prepared.unit_psk = (key,)
            changes.notes.append("replication.psk_file: a new key, used from the next connection")
    removed = {c.volume for c in changes.of(ChangeKind.VOLUME_REMOVED)}
    for rt in unit.volumes:
        if rt.config.name in removed or rt.replica is None:
            continue
        own = new.volume(rt.config.name).psk_file
        label = f"volume[{rt.config.name}].psk_file"
        try:
            key = load_psk(own) if own is not None else None
        except AuthError as exc:
            problems.append((label, str(exc)))
            continue
        if key != rt.replica.psk:
            prepared.volume_keys[rt.config.name] = key
            changes.notes.append(f"{label}: a new key, used from the next connection")
    return problems


async def _prepare_volume(unit: Unit, vc: VolumeConfig, prepared: _Prepared) -> str | None:
    try:
        rt = await unit.open_volume(vc)
    except OSError as exc:
        return f"cannot open {exc.filename or vc.path}: {exc.strerror or exc}"
    prepared.volumes[vc.name] = rt
    if rt.problem is not None:
        return f"cannot be served: {rt.problem}"
    try:
        await unit.serve_volume(rt)
    except OSError as exc:
        return f"cannot export on {vc.export}: {exc.strerror or exc}"
    return None


async def _prepare_export(unit: Unit, change: Change, prepared: _Prepared) -> str | None:
    rt = _runtime(unit, change.volume)
    if rt is None or rt.problem is not None:
        return None  # nothing serves it now; the new address is used at the next start
    address: Address | None = change.new
    if address is None:
        prepared.exports[rt.config.name] = None
        return None
    try:
        server = await unit.start_export(rt, address.host, address.port)
    except OSError as exc:
        return f"cannot export on {address}: {exc.strerror or exc}"
    prepared.exports[rt.config.name] = server
    return None


async def _prepare_peer(unit: Unit, new: Config, change: Change, prepared: _Prepared) -> str | None:
    rt = _runtime(unit, change.volume)
    if rt is None or rt.journal is None or rt.problem is not None:
        return None
    journal = rt.journal.journal
    name = str(change.peer)
    if name in journal.consumers:
        return None  # a detached cursor of that name is still held: it is reused
    try:
        consumer = await asyncio.to_thread(
            consumers_module.create,
            name,
            state_dir=new.unit.state_dir,
            volume_name=rt.config.name,
            volume_size=rt.volume.size,
            next_seq=journal.next_seq,
        )
    except OSError as exc:
        return f"cannot create the dirty map of peer {name}: {exc.strerror or exc}"
    prepared.consumers[(rt.config.name, name)] = consumer
    return None


async def _undo(unit: Unit, prepared: _Prepared) -> None:
    for server in prepared.exports.values():
        if server is not None:
            await server.shutdown()
    for rt in prepared.volumes.values():
        if rt.server is not None:
            rt.server.stop_reading()
            await rt.server.shutdown()
        await unit.release_volume(rt)
    if prepared.consumers:
        await asyncio.to_thread(remove_maps, list(prepared.consumers.values()))


# --- phase 2: commit ----------------------------------------------------------------------------


class _Failures:
    """What went wrong in the commit phase. Each step is guarded: one that fails (a checkpoint
    on a failing disk, say) is logged and named in the reload's answer, and the others go on,
    so the unit never stops half-way between two configurations."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        try:
            yield
        except (OSError, BlockmirrorError) as exc:
            log.error("reload: %s failed: %s", what, exc)
            self.notes.append(f"{what} failed: {exc}")


async def _commit(unit: Unit, new: Config, changes: ConfigDiff, prepared: _Prepared) -> list[str]:
    """Apply the changes; returns what failed (each failure is also in the log)."""
    failed = _Failures()
    for change in changes.of(ChangeKind.VOLUME_REMOVED):
        rt = _runtime(unit, change.volume)
        if rt is not None:
            with failed.step(change.describe()):
                await unit.close_volume(rt)
    moving = {c.volume for c in changes.of(ChangeKind.PEER_ADDED)}
    for change in changes.of(ChangeKind.PEER_REMOVED):
        with failed.step(change.describe()):
            await _remove_peer(unit, change, moving=change.volume in moving)
    # Keys and settings before additions: an added peer starts with the volume's new keys.
    rotated: list[tuple[bytes | None, bytes | None]] = []
    if prepared.unit_psk is not None:
        rotated.append((unit.psk, prepared.unit_psk[0]))
        _set_unit_psk(unit, prepared.unit_psk[0])
    for name, own_key in prepared.volume_keys.items():
        rt = _runtime(unit, name)
        if rt is not None and rt.replica is not None:
            rotated.append((rt.replica.psk, own_key))
            rt.replica.psk = own_key
            for sender in rt.senders:
                sender.psk = own_key if own_key is not None else unit.psk
    for old_key, new_key in rotated:
        if old_key is not None and new_key is not None:
            # The peers' configuration copies came over the old key; their next ones come
            # over the new one, and must still replace them.
            with failed.step("rebinding the peers' configuration copies to the new key"):
                await asyncio.to_thread(
                    rebind_copies,
                    new.unit.state_dir,
                    credential_of(old_key, None),
                    credential_of(new_key, None),
                )
    for change in changes.changes:
        if change.kind is ChangeKind.SETTING:
            with failed.step(change.describe()):
                await _setting(unit, new, change, prepared)
    for change in changes.of(ChangeKind.PEER_ADDED):
        _add_peer(unit, new, change, prepared)
    for name in dict.fromkeys(str(c.volume) for c in changes.of(ChangeKind.PEER_ADDED)):
        rt = _runtime(unit, name)
        if rt is not None and rt.journal is not None:
            with failed.step(f"volume {name}: the checkpoint of its new peers"):
                await rt.journal.checkpoint()  # the new cursors, durably
    for name, rt in prepared.volumes.items():
        rt.config = new.volume(name)
        unit.volumes.append(rt)
        unit.link_volume(rt)
        if rt.journal is not None:
            rt.journal.alerts.on_alert = unit.monitor.poke
    for rt in unit.volumes:
        with contextlib.suppress(KeyError):
            rt.config = new.volume(rt.config.name)
        # Link settings (the defaults or a peer's own) from the new file, for every link.
        for sender in rt.senders:
            sender.apply_settings(rt.config.link_of(sender.consumer_name, new.replication.link))
    unit.monitor.poke()
    return failed.notes


async def _remove_peer(unit: Unit, change: Change, *, moving: bool) -> None:
    """Stop sending to a removed peer and release its cursor. ``moving``: the same reload adds
    another peer to this volume, which may be this unit at a new address: a cursor that knows
    its unit is then kept detached, for the new address to take over at its first WELCOME
    (journal/consumers.bind) instead of a full resync, as a restart would."""
    rt = _runtime(unit, change.volume)
    name = str(change.peer)
    if rt is None or rt.journal is None:
        return
    for sender in [s for s in rt.senders if s.consumer_name == name]:
        await sender.stop()
        rt.senders.remove(sender)
    wp = rt.journal
    if wp.remote_ack is not None:
        wp.remote_ack.remove_peer(name)
    unit.events.forget(rt.config.name, name)
    kept = wp.journal.consumers.get(name)
    if moving and kept is not None and kept.peer is not None:
        kept.detached = True
        await wp.checkpoint()
        log.info(
            "volume %s: peer %s removed; its cursor (unit %s) is kept for a new address",
            rt.config.name,
            name,
            kept.peer,
        )
        return
    consumer = wp.journal.consumers.pop(name, None)
    if consumer is not None:
        # Durably without it before its map goes: a crash in between finds no cursor that
        # points at a missing map.
        await wp.checkpoint()
        await asyncio.to_thread(remove_maps, [consumer])
        log.info("volume %s: peer %s removed; its journal cursor is released", rt.config.name, name)


def _add_peer(unit: Unit, new: Config, change: Change, prepared: _Prepared) -> None:
    rt = _runtime(unit, change.volume)
    name = str(change.peer)
    if rt is None or rt.journal is None or rt.problem is not None:
        return
    wp = rt.journal
    if any(sender.consumer_name == name for sender in rt.senders):
        return  # already sending to it (a cursor a restart kept)
    consumer = prepared.consumers.get((rt.config.name, name))
    if consumer is not None:
        wp.journal.consumers[name] = consumer
    elif name in wp.journal.consumers:
        # A cursor kept detached (the peer was configured at this address before): it is
        # this peer's again, and must not be dropped as a stranger's.
        wp.journal.consumers[name].detached = False
    if wp.remote_ack is not None:
        wp.remote_ack.add_peer(name)
    vc = new.volume(rt.config.name)
    peer = next(p for p in vc.peers if str(p) == name)
    own_key = rt.replica.psk if rt.replica is not None else None
    # Its sender starts at once, or once the archive's position is durable (archive_attach).
    start_added_peer(wp, consumer, lambda: unit.start_sender(rt, peer, own_key))
    log.info("volume %s: peer %s added (a full resync brings it in step)", rt.config.name, name)


async def _setting(unit: Unit, new: Config, change: Change, prepared: _Prepared) -> None:
    key = change.key
    if key == "alerts":
        unit.apply_alerts(new)
        return
    if key in ("unit.nbd_reply_budget", "unit.nbd_max_connections"):
        unit.nbd_limits.resize(new.unit.nbd_reply_budget, new.unit.nbd_max_connections)
        return
    if key.startswith("unit.admin_"):
        if prepared.access is not None and unit.admin is not None:
            unit.admin.set_access(prepared.access)
        return
    if key == "replication.psk_file":
        return  # keys: see _prepare_keys
    rt = _runtime(unit, change.volume)
    if rt is None:
        return
    vc = new.volume(rt.config.name)
    field_name = key.rsplit(".", 1)[1]
    wp = rt.journal
    match field_name:
        case "export":
            await _move_export(rt, prepared)
        case "description":
            rt.export.description = vc.description
        case "journal_high_water" if wp is not None:
            wp.checkpointer.high_water.mark = vc.journal_high_water
        case "overflow" if wp is not None:
            wp.checkpointer.overflow = vc.overflow
        case "ack_timeout" if wp is not None and wp.remote_ack is not None:
            wp.remote_ack.timeout = vc.ack_timeout
        case "tls_peers" if rt.replica is not None:
            rt.replica.tls_peers = vc.tls_peers
        case "psk_file":
            pass  # keys: see _prepare_keys
        case "history" | "history_size" if wp is not None and wp.history is not None:
            wp.history.settings = HistorySettings(vc.history, vc.history_cap)
        case "replay_delay" if wp is not None:
            wp.replica.delay.seconds = vc.replay_delay
        case "skip_unchanged" if wp is not None:
            wp.unchanged.enabled = vc.skip_unchanged
        case _:
            pass


def _set_unit_psk(unit: Unit, psk: bytes | None) -> None:
    unit.psk = psk
    if unit.replication is not None:
        unit.replication.set_psk(psk)
    for rt in unit.volumes:
        own = rt.replica.psk if rt.replica is not None else None
        if own is None:
            for sender in rt.senders:
                sender.psk = psk


async def _move_export(rt: VolumeRuntime, prepared: _Prepared) -> None:
    old = rt.server
    rt.server = prepared.exports.get(rt.config.name)
    if old is not None:
        # Its hosts asked for the export to move: answer what they sent, then close.
        old.stop_reading()
        await old.shutdown()


def _runtime(unit: Unit, name: str | None) -> VolumeRuntime | None:
    for rt in unit.volumes:
        if rt.config.name == name:
            return rt
    return None
