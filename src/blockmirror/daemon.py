"""A unit: the process that holds volumes, serves their exports and the admin API.

``Unit.start`` opens every volume and listener or fails before serving anything; ``Unit.stop``
stops accepting, lets requests in flight finish, makes every volume durable and closes it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockmirror import __version__, statedir
from blockmirror.admin.api import AdminServer
from blockmirror.admin.controls import handle as handle_control
from blockmirror.admin.history_routes import handle_path as handle_history_path
from blockmirror.admin.setup import admin_access, unit_token_path
from blockmirror.blockdev.ackmode import RemoteAck
from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.blockdev.service import BlockDevice
from blockmirror.blockdev.writepath import DirectWritePath, WritePath
from blockmirror.config import Config, ReplicationConfig, VolumeConfig
from blockmirror.drills import VolumeDrills, clear_leftovers
from blockmirror.errors import BlockmirrorError, JournalError, VolumeError
from blockmirror.failover import VolumeRoles
from blockmirror.frontend.nbd_limits import NbdLimits
from blockmirror.frontend.nbd_server import NbdServer
from blockmirror.history.capture import replay_capturing
from blockmirror.history.log import HistoryLog
from blockmirror.history_attach import attach_history, open_history
from blockmirror.journal import generations
from blockmirror.journal.checkpoint import CheckpointError
from blockmirror.journal.dirtymap import DirtyMapError
from blockmirror.journal.generations import GenerationsError, VolumeHistory
from blockmirror.journal.journal import Journal
from blockmirror.journal.record import origin_id
from blockmirror.journal.scan import JournalCorruptError
from blockmirror.link.auth import AuthError, load_psk
from blockmirror.link.listener import ReplicationServer
from blockmirror.link.replica_runtime import ReplicaRuntime
from blockmirror.link.sender import PeerSender
from blockmirror.link.tls import TlsFiles, client_ssl_context, server_ssl_context
from blockmirror.runtime import VolumeRuntime, volume_status
from blockmirror.state import Role, VolumeState
from blockmirror.store.volume import Volume

log = logging.getLogger(__name__)

# Written to the state directory once every listener is up, so scripts and tests learn the real
# addresses when the configuration asked for port 0.


class UnitLockedError(BlockmirrorError):
    """Another unit process already owns this state directory."""


# How often history is expired.
HISTORY_UPKEEP = 1.0


class Unit:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.volumes: list[VolumeRuntime] = []
        self.admin: AdminServer | None = None
        self.replication: ReplicationServer | None = None
        self.started_at = time.monotonic()
        self._lock_fd: int | None = None
        self._upkeep: asyncio.Task[None] | None = None
        # One budget and one connection limit for every export of the unit.
        self.nbd_limits = NbdLimits(
            reply_budget=config.unit.nbd_reply_budget,
            max_connections=config.unit.nbd_max_connections,
        )

    # --- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        raise_fd_limit()
        state_dir = self.config.unit.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock(state_dir)
        try:
            await asyncio.to_thread(clear_leftovers, state_dir)
            for vc in self.config.volumes:
                self.volumes.append(await self._open_volume(vc, loop))
            for rt in self.volumes:
                if rt.problem is not None:
                    continue
                if rt.config.export is not None:
                    rt.server = NbdServer({rt.config.name: rt.export}, self.nbd_limits)
                    await rt.server.start(rt.config.export.host, rt.config.export.port)
                    log.info(
                        "volume %s exported on nbd://%s/%s",
                        rt.config.name,
                        rt.export_address,
                        rt.config.name,
                    )
                rt.enter(rt.serving_state)
            await self._start_replication()
            if self.config.unit.admin is not None:
                access, admin_tls = await asyncio.to_thread(admin_access, self.config.unit)
                self.admin = AdminServer(
                    self.status,
                    self._control,
                    access=access,
                    tls=admin_tls,
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
        self._write_runtime_file()
        self._upkeep = asyncio.create_task(self._history_upkeep())

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

    async def _open_volume(
        self, vc: VolumeConfig, loop: asyncio.AbstractEventLoop
    ) -> VolumeRuntime:
        volume = Volume.open(vc.path, size=vc.size, offset=vc.offset, read_only=vc.read_only)
        write_path: WritePath = DirectWritePath(volume, loop)
        journal_wp: JournalWritePath | None = None
        problem = None
        history_log: HistoryLog | None = None
        if not vc.read_only and vc.journal:
            try:
                history_log = await asyncio.to_thread(open_history, self.config.unit.state_dir, vc)
            except OSError as exc:
                problem = f"cannot open the history: {exc.filename or ''}: {exc.strerror or exc}"
                log.error("volume %s is not served: %s", vc.name, problem)
        if not vc.read_only and vc.journal and problem is None:
            try:
                journal = await asyncio.to_thread(
                    Journal.open,
                    statedir.journal_path(self.config.unit.state_dir, vc.name),
                    volume=volume,
                    journal_size=vc.journal_size,
                    consumers=[str(peer) for peer in vc.peers],
                    dirty_dir=self.config.unit.state_dir,
                    volume_name=vc.name,
                    origin=origin_id(self.config.unit.name),
                    replayer=(
                        functools.partial(replay_capturing, history_log, delay=vc.replay_delay)
                        if history_log is not None
                        else None
                    ),
                )
            except (
                JournalCorruptError,
                JournalError,
                CheckpointError,
                DirtyMapError,
                VolumeError,
            ) as exc:
                # This volume is not served; the others are. Status and the log say why.
                problem = str(exc)
                log.error("volume %s is not served: %s", vc.name, exc)
            except OSError as exc:
                # ENOSPC preallocating it, say: name the file, the errno alone says not where.
                where = exc.filename or statedir.journal_path(self.config.unit.state_dir, vc.name)
                problem = f"cannot open the journal: {where}: {exc.strerror or exc}"
                log.error("volume %s is not served: %s", vc.name, problem)
            else:
                if journal.recovery is not None:
                    r = journal.recovery
                    log.info(
                        "volume %s: journal recovered: %d records, %d replayed in %.3f s%s",
                        vc.name,
                        r.records,
                        r.replayed,
                        r.seconds,
                        f", torn tail cut ({r.torn_tail})" if r.torn_tail else "",
                    )
                journal_wp = JournalWritePath(
                    journal,
                    volume,
                    loop,
                    overflow=vc.overflow,
                    high_water=vc.journal_high_water,
                )
                if vc.ack == "remote" and vc.peers:
                    remote = RemoteAck(
                        loop, [str(p) for p in vc.peers], vc.ack_timeout, journal_wp.alert
                    )
                    for peer in vc.peers:
                        consumer = journal.consumers[str(peer)]
                        if consumer.mode == "journal":
                            remote.set_acked(str(peer), consumer.acked_seq)
                    journal_wp.remote_ack = remote
                if history_log is not None:
                    await attach_history(history_log, journal_wp)
                delay = journal_wp.replica.delay
                delay.seconds = vc.replay_delay
                delay.on_shortened = functools.partial(journal_wp.alert, "replay_delay_shortened")
                journal_wp.replica.hold_unapplied()
                journal_wp.start()
                write_path = journal_wp
        history: VolumeHistory | None = None
        if problem is None:
            try:
                history = await asyncio.to_thread(
                    generations.load_or_create,
                    statedir.role_path(self.config.unit.state_dir, vc.name),
                    volume=vc.name,
                    configured=Role(vc.role),
                    unit=self.config.unit.name,
                    next_seq=journal_wp.journal.next_seq if journal_wp else 1,
                )
            except (GenerationsError, OSError) as exc:
                problem = f"cannot use the role file: {exc}"
                log.error("volume %s is not served: %s", vc.name, problem)
        role = history.role if history is not None else Role(vc.role)
        # A replica is written only by replication: whenever it is exported, it is read-only.
        read_only = vc.read_only or role is not Role.PRIMARY
        export = BlockDevice(
            vc.name,
            volume,
            write_path,
            description=vc.description or f"blockmirror {role} volume {vc.name}",
            read_only=read_only,
        )
        if journal_wp is None and history_log is not None:
            history_log.close()
        rt = VolumeRuntime(vc, volume, export, journal=journal_wp, history=history)
        if journal_wp is not None and journal_wp.history is not None:
            rt.drills = VolumeDrills(
                vc.name,
                journal_wp.history,
                volume,
                state_dir=self.config.unit.state_dir,
                # A drill is served where the volume is (or only on this machine).
                host=vc.export.host if vc.export is not None else "127.0.0.1",
                limits=self.nbd_limits,
            )
        if problem is not None:
            rt.problem = problem
            rt.enter(VolumeState.FAILED)
        return rt

    async def _control(self, method: str, path: str, query: str) -> tuple[int, dict[str, Any]]:
        """Every control of the admin API: history routes, then the others."""
        reply = await handle_history_path(self.runtime, method, path, query)
        if reply is not None:
            return reply
        return await handle_control(self, method, path, query)

    def runtime(self, name: str) -> VolumeRuntime:
        for rt in self.volumes:
            if rt.config.name == name:
                return rt
        raise KeyError(name)

    async def _start_replication(self) -> None:
        """The listener for sources (secondaries here) and one sender per peer of each volume."""
        rc = self.config.replication
        psk = load_psk(rc.psk_file) if rc.psk_file is not None else None
        if rc.listen is not None:
            self.replication = ReplicationServer(
                self.config.unit.name,
                self._replica_runtime,
                psk=psk,
                ssl_context=server_ssl_context(_tls_files(rc)),
            )
            host, port = await self.replication.start(rc.listen.host, rc.listen.port)
            log.info("accepting links on %s:%d", host, port)
        client_ssl = client_ssl_context(_tls_files(rc))
        for rt in self.volumes:
            if rt.journal is None or rt.problem is not None:
                continue
            try:
                own_key = load_psk(rt.config.psk_file) if rt.config.psk_file else None
            except AuthError as exc:
                rt.problem = str(exc)
                rt.enter(VolumeState.FAILED)
                log.error("volume %s: %s", rt.config.name, exc)
                continue
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
                sender = PeerSender(
                    unit_name=self.config.unit.name,
                    volume_name=rt.config.name,
                    write_path=rt.journal,
                    consumer=str(peer),
                    host=peer.host,
                    port=peer.port,
                    volume_id=self._volume_id(rt),
                    psk=own_key if own_key is not None else psk,
                    ssl_context=client_ssl,
                    roles=rt.roles,
                )
                rt.senders.append(sender)
                sender.start()

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
        """Graceful: no new connections, requests in flight answered, volumes durable."""
        # First, at once: no new connection and no new request is read from a host. Requests
        # already read are answered while the links still run (an ack = "remote" write needs
        # its peers); only then do the links stop.
        if self._upkeep is not None:
            self._upkeep.cancel()
            self._upkeep = None
        for rt in self.volumes:
            if rt.drills is not None:
                await rt.drills.stop()
        servers = [rt.server for rt in self.volumes if rt.server is not None]
        for server in servers:
            server.stop_reading()
        await asyncio.gather(*(s.shutdown() for s in servers), return_exceptions=True)
        for rt in self.volumes:
            for sender in rt.senders:
                await sender.stop()
        if self.replication is not None:
            await self.replication.close()
            self.replication = None
        if self.admin is not None:
            await self.admin.close()
            self.admin = None
        for rt in self.volumes:
            rt.enter(VolumeState.STOPPED)
            if rt.journal is not None:
                try:
                    await rt.journal.close()
                except (OSError, BlockmirrorError) as exc:
                    log.error("volume %s: closing the journal failed: %s", rt.config.name, exc)
                history_log = rt.journal.history
                if history_log is not None:
                    try:
                        await asyncio.to_thread(history_log.sync)
                    except OSError as exc:
                        log.error("volume %s: syncing the history failed: %s", rt.config.name, exc)
                    history_log.close()
            if not rt.volume.read_only:
                try:
                    await asyncio.to_thread(rt.volume.flush)
                except OSError as exc:
                    log.error("volume %s: final flush failed: %s", rt.config.name, exc)
            rt.volume.close()
        self.volumes.clear()
        statedir.remove_runtime_file(self.config.unit.state_dir)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock(self, state_dir: Path) -> None:
        fd = statedir.try_lock(state_dir)
        if fd is None:
            raise UnitLockedError(
                f"state directory {state_dir} is in use by another blockmirror unit"
            )
        self._lock_fd = fd

    def _write_runtime_file(self) -> None:
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
        }
        statedir.write_runtime_file(self.config.unit.state_dir, info)

    # --- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "unit": self.config.unit.name,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.monotonic() - self.started_at, 3),
            "nbd": self.nbd_limits.status(),
            "replication": self.replication.status() if self.replication is not None else None,
            "volumes": [volume_status(rt) for rt in self.volumes],
        }


def raise_fd_limit() -> None:
    """Raise the descriptor soft limit to the hard limit: links, NBD clients and the admin API
    share it, and the soft default (often 1024) is easily reached by a flood of connections."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            if target > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                log.info("descriptor limit raised from %d to %d", soft, target)
    except (OSError, ValueError) as exc:
        log.warning("could not raise the descriptor limit: %s", exc)


def _tls_files(rc: ReplicationConfig) -> TlsFiles:
    return TlsFiles(rc.tls_cert, rc.tls_key, rc.tls_ca)
