"""A unit: the process that holds volumes, serves their exports and the admin API.

``Unit.start`` opens every volume and listener or fails before serving anything; ``Unit.stop``
stops accepting, lets requests in flight finish, makes every volume durable and closes it.

Why one module: this is the composition root, the one place that knows the order in which a
unit's parts start and stop (volumes, replication, archives, iSCSI, the admin API); each part's
own wiring lives in its module (volume_open, archive_attach, iscsi_attach, history_attach).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

from blockmirror import __version__, reconfigure, statedir
from blockmirror.admin.api import AdminServer
from blockmirror.admin.controls import handle as handle_control
from blockmirror.admin.event_routes import LogBuffer, events_route, lag_history_route, log_route
from blockmirror.admin.history_routes import handle_path as handle_history_path
from blockmirror.admin.lag_history import LagHistory
from blockmirror.admin.link_controls import handle_link_path
from blockmirror.admin.setup import admin_access, unit_token_path
from blockmirror.archive_attach import UnitArchives, archive_consumers
from blockmirror.config import Address, Config, ReplicationConfig, VolumeConfig
from blockmirror.config_sharing import UnitConfigShare
from blockmirror.config_store import ConfigRecord, record_applied
from blockmirror.drills import clear_leftovers
from blockmirror.errors import BlockmirrorError
from blockmirror.events import EventLog, EventName, Subject
from blockmirror.failover import VolumeRoles
from blockmirror.frontend.iscsi_server import IscsiServer
from blockmirror.frontend.nbd_limits import NbdLimits
from blockmirror.frontend.nbd_server import NbdServer
from blockmirror.io.limits import raise_fd_limit
from blockmirror.iscsi_attach import start_iscsi
from blockmirror.link.auth import AuthError, load_psk
from blockmirror.link.listener import ReplicationServer
from blockmirror.link.replica_runtime import ReplicaRuntime
from blockmirror.link.sender import PeerSender
from blockmirror.link.tls import TlsFiles, client_ssl_context, server_ssl_context
from blockmirror.monitor import UnitMonitor
from blockmirror.notify.dispatch import AlertDispatcher
from blockmirror.reconfigure import ReloadRefused, ReloadResult
from blockmirror.runtime import VolumeRuntime, volume_status
from blockmirror.state import Role, VolumeState
from blockmirror.volume_open import open_volume, release_volume

log = logging.getLogger(__name__)

# Written to the state directory once every listener is up, so scripts and tests learn the real
# addresses when the configuration asked for port 0.


class UnitLockedError(BlockmirrorError):
    """Another unit process already owns this state directory."""


# How often history is expired.
HISTORY_UPKEEP = 1.0
# How long a stopping unit waits for alerts still queued for their targets.
ALERT_DRAIN = 3.0


class Unit:
    def __init__(
        self, config: Config, *, text: bytes | None = None, lost: str | None = None
    ) -> None:
        self.config = config
        # Why the configuration file could not be read, when it could not: the unit then
        # serves nothing but its admin API, and a reload of a restored file restarts it.
        self.lost = lost
        self.restart_requested = asyncio.Event()
        self.restart_with: tuple[Config, bytes] | None = None
        # The configuration's text as read (None: built in memory, as tests do) and the record
        # of its version (config_store) once the unit has started.
        self.config_text = text
        self.config_record: ConfigRecord | None = None
        self._reloading: asyncio.Lock | None = None
        self.started = False
        self.iscsi: IscsiServer | None = None
        self.stopping = False
        self.volumes: list[VolumeRuntime] = []
        self.admin: AdminServer | None = None
        self.replication: ReplicationServer | None = None
        self.started_at = time.monotonic()
        self._lock_fd: int | None = None
        self._upkeep: asyncio.Task[None] | None = None
        # What the unit saw: events for /api/events and the alert targets, log lines for the
        # log dump, and the loop that turns status into events.
        self.events = EventLog(config.unit.name)
        self.log_buffer = LogBuffer()
        self._lag = LagHistory()
        # Every event goes to the configured targets (SNMP, e-mail, webhook), off the data
        # path: the dispatcher queues and retries on its own tasks.
        self.alerts = AlertDispatcher(config.unit.name, config.alerts, version=__version__)
        self.events.listeners.append(self.alerts.submit)
        self.monitor = UnitMonitor(
            self.status,
            self.events,
            rpo_seconds=config.alerts.rpo_seconds,
            link_down_seconds=config.alerts.link_down_seconds,
            samplers=[self._lag.sample],
        )
        self.configs = UnitConfigShare(
            config.unit.name,
            config.unit.state_dir,
            lambda: (self.config_record, self.config_text),
        )
        # The links' unit-wide key and client TLS (a volume's own key overrides the first).
        self.psk: bytes | None = None
        self.client_ssl: ssl.SSLContext | None = None
        # One budget and one connection limit for every export of the unit.
        self.nbd_limits = NbdLimits(
            reply_budget=config.unit.nbd_reply_budget,
            max_connections=config.unit.nbd_max_connections,
        )
        self.archives = UnitArchives(config)

    # --- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        raise_fd_limit()
        state_dir = self.config.unit.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock(state_dir)
        logging.getLogger("blockmirror").addHandler(self.log_buffer)
        self.alerts.start()
        if self.config_text is not None:
            self.config_record = await asyncio.to_thread(
                record_applied, state_dir, self.config_text
            )
        try:
            await asyncio.to_thread(clear_leftovers, state_dir)
            for vc in self.config.volumes:
                self.volumes.append(await self.open_volume(vc))
            for rt in self.volumes:
                await self.serve_volume(rt)
            await self.archives.seed(self.volumes)  # new replicas, before any source connects
            await self._start_replication()
            await self.archives.start(self.volumes, self._volume_id)
            self.iscsi = await start_iscsi(self.config, self.volumes, self._identity_of)
            if self.config.unit.admin is not None:
                access, admin_tls = await asyncio.to_thread(admin_access, self.config.unit)
                self.admin = AdminServer(
                    self.status,
                    self._control,
                    access=access,
                    tls=admin_tls,
                    reads={
                        "/api/events": (events_route(self.events), True),
                        "/api/lag-history": (lag_history_route(self.lag_history), True),
                        # Log lines name files and addresses: never public.
                        "/api/log": (log_route(self.log_buffer, self.config.unit.name), False),
                        "/api/peer-configs": (self.configs.route, False),
                    },
                )
                host, port = await self.admin.start(
                    self.config.unit.admin.host, self.config.unit.admin.port
                )
                log.info(
                    "admin API on %s://%s:%d/ (admin token in %s)",
                    self.admin.scheme,
                    host,
                    port,
                    unit_token_path(self.config.unit),
                )
        except BaseException:
            await self.stop()
            raise
        self.write_runtime_file()
        self._upkeep = asyncio.create_task(self._history_upkeep())
        for rt in self.volumes:
            if rt.journal is not None:
                rt.journal.alerts.on_alert = self.monitor.poke
        self.monitor.start()
        self.started = True
        if self.lost is not None:
            self.events.raise_event(
                EventName.CONFIG_LOST,
                Subject(),
                f"{self.lost}; serving nothing until it is restored "
                "(blockmirror config fetch) and reloaded",
            )

    async def _history_upkeep(self) -> None:
        """Expire history by age and size, once a second (docs/history.md, "Retention")."""
        while True:
            await asyncio.sleep(HISTORY_UPKEEP)
            for rt in self.volumes:
                history_log = rt.journal.history if rt.journal is not None else None
                if history_log is None:
                    continue
                try:
                    history_log.expire()
                except OSError as exc:
                    log.error("volume %s: expiring history failed: %s", rt.config.name, exc)

    async def serve_volume(self, rt: VolumeRuntime) -> None:
        """Start the volume's export (if it has one) and enter its serving state. Raises
        OSError when the export's address cannot be bound."""
        if rt.problem is not None:
            return
        if rt.config.export is not None:
            rt.server = await self.start_export(rt, rt.config.export.host, rt.config.export.port)
        rt.enter(rt.serving_state)

    async def start_export(self, rt: VolumeRuntime, host: str, port: int) -> NbdServer:
        server = NbdServer({rt.config.name: rt.export}, self.nbd_limits)
        await server.start(host, port)
        bound_host, bound_port = server.address
        where = f"[{bound_host}]" if ":" in bound_host else bound_host
        log.info(
            "volume %s exported on nbd://%s:%d/%s",
            rt.config.name,
            where,
            bound_port,
            rt.config.name,
        )
        return server

    async def open_volume(self, vc: VolumeConfig) -> VolumeRuntime:
        return await open_volume(
            self.config.unit,
            vc,
            self.nbd_limits,
            archive_consumers=archive_consumers(self.config, vc),
        )

    async def _control(self, method: str, path: str, query: str) -> tuple[int, dict[str, Any]]:
        """Every control of the admin API: history routes, then the others."""
        if path == "/api/reload":
            return await self._reload_control(method)
        reply = await handle_history_path(self.runtime, method, path, query)
        if reply is None:
            reply = await handle_link_path(self.runtime, method, path, query)
        if reply is not None:
            return reply
        return await handle_control(self, method, path, query)

    async def _reload_control(self, method: str) -> tuple[int, dict[str, Any]]:
        if method != "POST":
            return HTTPStatus.METHOD_NOT_ALLOWED, {"error": "/api/reload takes POST"}
        try:
            result = await self.reload()
        except ReloadRefused as exc:
            return HTTPStatus.CONFLICT, {
                "error": "the configuration was not applied; nothing was changed",
                "problems": [{"key": key, "message": message} for key, message in exc.problems],
            }
        return HTTPStatus.OK, result.to_json()

    def runtime(self, name: str) -> VolumeRuntime:
        for rt in self.volumes:
            if rt.config.name == name:
                return rt
        raise KeyError(name)

    async def _start_replication(self) -> None:
        """The listener for sources (secondaries here) and one sender per peer of each volume."""
        rc = self.config.replication
        self.psk = load_psk(rc.psk_file) if rc.psk_file is not None else None
        if rc.listen is not None:
            self.replication = ReplicationServer(
                self.config.unit.name,
                self._replica_runtime,
                psk=self.psk,
                ssl_context=server_ssl_context(_tls_files(rc)),
                configs=self.configs.share,
            )
            host, port = await self.replication.start(rc.listen.host, rc.listen.port)
            log.info("accepting links on %s:%d", host, port)
        self.client_ssl = client_ssl_context(_tls_files(rc))
        for rt in self.volumes:
            self.link_volume(rt)

    def link_volume(self, rt: VolumeRuntime) -> None:
        """The volume's replication: its receiving side, its roles and one sender per peer."""
        if rt.journal is None or rt.problem is not None:
            return
        try:
            own_key = load_psk(rt.config.psk_file) if rt.config.psk_file else None
        except AuthError as exc:
            rt.problem = str(exc)
            rt.enter(VolumeState.FAILED)
            log.error("volume %s: %s", rt.config.name, exc)
            return
        # Every journaled volume can receive: its role decides, link by link, whether a
        # peer may send to it (peers are symmetric).
        rt.replica = ReplicaRuntime(
            rt.config.name,
            rt.volume.size,
            rt.journal,
            psk=own_key,
            tls_peers=rt.config.tls_peers,
        )
        if rt.history is not None:
            rt.roles = VolumeRoles(
                unit=self.config.unit.name,
                volume=rt.config.name,
                state_dir=self.config.unit.state_dir,
                history=rt.history,
                write_path=rt.journal,
                export=rt.export,
                replica=rt.replica,
                read_only=rt.config.read_only,
                set_state=rt.enter,
            )
        for peer in rt.config.peers:
            self.start_sender(rt, peer, own_key)

    def start_sender(self, rt: VolumeRuntime, peer: Address, own_key: bytes | None) -> None:
        """A sender to ``peer`` over the consumer of its name (which the journal has)."""
        assert rt.journal is not None
        sender = PeerSender(
            unit_name=self.config.unit.name,
            volume_name=rt.config.name,
            write_path=rt.journal,
            consumer=str(peer),
            host=peer.host,
            port=peer.port,
            volume_id=self._volume_id(rt),
            psk=own_key if own_key is not None else self.psk,
            configs=self.configs.share,
            ssl_context=self.client_ssl,
            roles=rt.roles,
        )
        sender.apply_settings(rt.config.link_of(str(peer), self.config.replication.link))
        rt.senders.append(sender)
        sender.start()

    def _identity_of(self, rt: VolumeRuntime) -> str:
        """The identity a volume's SCSI logical unit derives its NAA and serial from: the
        volume's (the same on its replicas), or, before a replica has one, unit and name."""
        if rt.journal is not None:
            found = self._volume_id(rt)()
            if found:
                return found
        return f"{self.config.unit.name}/{rt.config.name}"

    def _volume_id(self, rt: VolumeRuntime) -> Callable[[], str | None]:
        assert rt.journal is not None
        journal = rt.journal.journal

        def identity() -> str | None:
            if rt.role is Role.PRIMARY:
                # The volume's identity, not the journal's: a journal resize keeps it.
                return journal.volume_id
            # A relay passes on the origin's identity, once it has one.
            return journal.replica.volume_id if journal.replica is not None else None

        return identity

    def _replica_runtime(self, name: str) -> ReplicaRuntime | None:
        for rt in self.volumes:
            if rt.config.name == name and rt.replica is not None:
                return rt.replica
        return None

    async def stop(self) -> None:
        """Graceful: no new connections, requests in flight answered, volumes durable. A reload
        in progress finishes first; one asked for later is refused."""
        self.stopping = True
        if self._reloading is None:
            self._reloading = asyncio.Lock()
        async with self._reloading:
            await self._stop()

    async def _stop(self) -> None:
        # First, at once: no new connection and no new request is read from a host. Requests
        # already read are answered while the links still run (an ack = "remote" write needs
        # its peers); only then do the links stop.
        if self._upkeep is not None:
            self._upkeep.cancel()
            self._upkeep = None
        await self.monitor.stop()
        for rt in self.volumes:
            if rt.drills is not None:
                await rt.drills.stop()
        if self.iscsi is not None:
            await self.iscsi.close()
            self.iscsi = None
        servers = [rt.server for rt in self.volumes if rt.server is not None]
        for server in servers:
            server.stop_reading()
        await asyncio.gather(*(s.shutdown() for s in servers), return_exceptions=True)
        for rt in self.volumes:
            for sender in rt.senders:
                await sender.stop()
        await self.archives.stop(self.volumes)
        if self.replication is not None:
            await self.replication.close()
            self.replication = None
        if self.admin is not None:
            await self.admin.close()
            self.admin = None
        await self.configs.wait()
        # Alerts raised until now (a stop after a failure, say) get a moment to go out.
        await self.alerts.close(drain=ALERT_DRAIN)
        for rt in self.volumes:
            await self.release_volume(rt)
        self.volumes.clear()
        statedir.remove_runtime_file(self.config.unit.state_dir)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        logging.getLogger("blockmirror").removeHandler(self.log_buffer)

    async def close_volume(self, rt: VolumeRuntime) -> None:
        """Take one volume out of a running unit (a reload removed it): no new link or host
        connection finds it, requests in flight are answered, and it is closed durably."""
        self.volumes.remove(rt)
        if rt.drills is not None:
            await rt.drills.stop()
        if rt.server is not None:
            rt.server.stop_reading()
            await rt.server.shutdown()
        for sender in rt.senders:
            await sender.stop()
        if rt.replica is not None:
            rt.replica.closed = True
            await rt.replica.disconnect(timeout=30.0)
        self.events.forget(rt.config.name)
        await self.release_volume(rt)

    async def release_volume(self, rt: VolumeRuntime) -> None:
        await release_volume(rt)

    def _lock(self, state_dir: Path) -> None:
        fd = statedir.try_lock(state_dir)
        if fd is None:
            raise UnitLockedError(
                f"state directory {state_dir} is in use by another blockmirror unit"
            )
        self._lock_fd = fd

    def write_runtime_file(self) -> None:
        info = {
            "pid": os.getpid(),
            "unit": self.config.unit.name,
            "admin": "{}:{}".format(*self.admin.address) if self.admin else None,
            # Where the admin token is (never the token: this file is world-readable).
            "admin_token_file": str(unit_token_path(self.config.unit)) if self.admin else None,
            "admin_scheme": self.admin.scheme if self.admin else None,
            "exports": {rt.config.name: rt.export_address for rt in self.volumes},
            "replication": (
                "{}:{}".format(*self.replication.address) if self.replication else None
            ),
            "iscsi": "{}:{}".format(*self.iscsi.address) if self.iscsi else None,
        }
        statedir.write_runtime_file(self.config.unit.state_dir, info)

    # --- status ---------------------------------------------------------------------------------

    def lag_history(self) -> dict[str, Any]:
        return self._lag.to_json()

    def share_config(self) -> None:
        """Hand the configuration applied now to every connected peer (after a reload)."""
        for rt in self.volumes:
            for sender in rt.senders:
                sender.share_config()
            if rt.replica is not None and rt.replica.session is not None:
                rt.replica.session.share_config()

    # --- reconfiguration ------------------------------------------------------------------------

    async def reload(self) -> ReloadResult:
        """Read the configuration file again and apply it (:mod:`blockmirror.reconfigure`).
        Raises ReloadRefused, with every problem, when nothing was changed. One at a time."""
        if self._reloading is None:
            self._reloading = asyncio.Lock()
        async with self._reloading:
            if self.stopping:
                raise ReloadRefused([("unit", "the unit is stopping")])
            return await reconfigure.reload_file(self)

    def apply_alerts(self, new: Config) -> None:
        """New alert thresholds (and targets) from a reload."""
        alerts = new.alerts
        self.alerts.reconfigure(alerts)
        self.monitor.reconfigure(
            rpo_seconds=alerts.rpo_seconds, link_down_seconds=alerts.link_down_seconds
        )

    def status(self) -> dict[str, Any]:
        return {
            "unit": self.config.unit.name,
            "version": __version__,
            "config_version": (
                self.config_record.version if self.config_record is not None else None
            ),
            "config_lost": self.lost,
            "pid": os.getpid(),
            "uptime_seconds": round(time.monotonic() - self.started_at, 3),
            "nbd": self.nbd_limits.status(),
            "replication": self.replication.status() if self.replication is not None else None,
            "volumes": [volume_status(rt) for rt in self.volumes],
            # The open episodes (docs/operations.md, "Monitoring and alerts").
            "events": [event.to_json() for event in self.events.active()],
            "alert_targets": self.alerts.status(),
            "archives": self.archives.status(),
        }


def _tls_files(rc: ReplicationConfig) -> TlsFiles:
    return TlsFiles(rc.tls_cert, rc.tls_key, rc.tls_ca)
