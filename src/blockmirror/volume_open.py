"""Opening one volume of a unit (its file, history, journal, write path, roles and drills), and
closing it durably at the end.

The daemon opens every configured volume with :func:`open_volume` at start, and a reload opens
the volumes it adds the same way. A volume that cannot be used comes back FAILED with its
problem, so that the unit serves the others and status says why.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence

from blockmirror import statedir
from blockmirror.archive_attach import adopt_archive_position, settle_adopted
from blockmirror.blockdev.ackmode import RemoteAck
from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.blockdev.service import BlockDevice
from blockmirror.blockdev.writepath import DirectWritePath, WritePath
from blockmirror.config import UnitConfig, VolumeConfig
from blockmirror.drills import VolumeDrills
from blockmirror.errors import BlockmirrorError, JournalError, VolumeError
from blockmirror.frontend.nbd_limits import NbdLimits
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
from blockmirror.runtime import VolumeRuntime
from blockmirror.state import Role, VolumeState
from blockmirror.store.volume import Volume

__all__ = ["open_volume", "release_volume"]

log = logging.getLogger("blockmirror.daemon")


async def open_volume(
    unit: UnitConfig,
    vc: VolumeConfig,
    limits: NbdLimits,
    *,
    archive_consumers: Sequence[str] = (),
) -> VolumeRuntime:
    """The volume's runtime: its file, journal, history and roles. A volume that cannot be
    used comes back FAILED with its problem (the others are served); raises OSError only
    when the volume's own file cannot be opened. ``archive_consumers``: the journal consumers
    of the archives that upload this volume, besides one per peer."""
    loop = asyncio.get_running_loop()
    volume = Volume.open(vc.path, size=vc.size, offset=vc.offset, read_only=vc.read_only)
    write_path: WritePath = DirectWritePath(volume, loop)
    journal_wp: JournalWritePath | None = None
    problem = None
    history_log: HistoryLog | None = None
    if not vc.read_only and vc.journal:
        try:
            history_log = await asyncio.to_thread(open_history, unit.state_dir, vc)
        except OSError as exc:
            problem = f"cannot open the history: {exc.filename or ''}: {exc.strerror or exc}"
            log.error("volume %s is not served: %s", vc.name, problem)
    if not vc.read_only and vc.journal and problem is None:
        try:
            journal = await asyncio.to_thread(
                Journal.open,
                statedir.journal_path(unit.state_dir, vc.name),
                volume=volume,
                journal_size=vc.journal_size,
                consumers=[*(str(peer) for peer in vc.peers), *archive_consumers],
                dirty_dir=unit.state_dir,
                volume_name=vc.name,
                origin=origin_id(unit.name),
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
            where = exc.filename or statedir.journal_path(unit.state_dir, vc.name)
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
            peer_consumers = [journal.consumers[str(peer)] for peer in vc.peers]
            adopted = adopt_archive_position(journal, peer_consumers)
            if adopted:
                # The cursors durably first, then the bits they make needless (archive_attach).
                await asyncio.to_thread(journal.write_checkpoint_now, clean=False)
                settle_adopted(adopted)
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
            journal_wp.unchanged.enabled = vc.skip_unchanged
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
                statedir.role_path(unit.state_dir, vc.name),
                volume=vc.name,
                configured=Role(vc.role),
                unit=unit.name,
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
            state_dir=unit.state_dir,
            # A drill is served where the volume is (or only on this machine).
            host=vc.export.host if vc.export is not None else "127.0.0.1",
            limits=limits,
        )
    if problem is not None:
        rt.problem = problem
        rt.enter(VolumeState.FAILED)
    return rt


async def release_volume(rt: VolumeRuntime) -> None:
    """Close a stopped volume's journal, history and file, durably. Never raises."""
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
