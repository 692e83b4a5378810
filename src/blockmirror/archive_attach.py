"""A unit's archives (docs/archive.md): one object-store client per ``[[archive]]`` and one
archive consumer per volume it uploads, started after the volumes' roles and stopped before
the volumes close.

An archive whose credentials cannot be read does not stop the unit: its consumers are not
started, status shows the archive ``stalled`` with the reason, and the journal holds the
records (then tracks their regions) as for an unreachable peer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from blockmirror.archive.s3 import ArchiveStoreError, S3Store, load_credentials, parse_url
from blockmirror.archive.seeding import needs_seed, seed_replica
from blockmirror.archive.uploader import CONSUMER_PREFIX, ArchiveUploader, consumer_name
from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.config import Config, VolumeConfig
from blockmirror.config_archive import ArchiveConfig
from blockmirror.errors import ArchiveError
from blockmirror.journal.consumers import Consumer
from blockmirror.journal.journal import Journal
from blockmirror.runtime import VolumeRuntime
from blockmirror.state import ConsumerMode, Role

__all__ = [
    "UnitArchives",
    "adopt_archive_position",
    "archive_consumers",
    "settle_adopted",
    "start_added_peer",
    "volume_root",
]

log = logging.getLogger(__name__)


def archive_consumers(config: Config, vc: VolumeConfig) -> list[str]:
    """The journal consumers of the archives that upload volume ``vc``."""
    return [consumer_name(a.name) for a in config.archives if a.upload and a.covers(vc.name)]


def adopt_archive_position(journal: Journal, consumers: Sequence[Consumer]) -> list[Consumer]:
    """Start every peer consumer new to ``journal`` where the archive stands, when an archive
    consumer is in step (journal mode, nothing dirty): a replica seeded from that archive then
    resumes with the records after its point, which the journal keeps from here on. A peer
    that was not seeded proves nothing at its WELCOME (another identity, or records the
    journal no longer has) and is copied in full, as before (link/resume.py).

    Only the cursor moves here; the dirty bits stay until the caller has written a checkpoint
    that records it, then :func:`settle_adopted` clears them. A crash in between comes back to
    a journal-mode cursor with every region dirty: a full copy, never a missed one."""
    archives = [
        c
        for name, c in journal.consumers.items()
        if name.startswith(CONSUMER_PREFIX)
        and not c.fresh
        and c.mode == ConsumerMode.JOURNAL
        and c.dirty.is_clean()
    ]
    if not archives:
        return []
    position = min(c.acked_seq for c in archives)  # the one that has archived least
    changed = []
    for consumer in consumers:
        if not consumer.fresh or consumer.mode != ConsumerMode.TRACKING:
            continue
        if consumer.name.startswith(CONSUMER_PREFIX):
            continue
        consumer.generation += 1
        consumer.set_mode(ConsumerMode.JOURNAL)
        consumer.acked_seq = position
        changed.append(consumer)
        log.info(
            "%s: peer %s is new: it starts where the archive stands (seq %d), so a replica "
            "seeded from the archive needs only the records after it",
            journal.path.name,
            consumer.name,
            position,
        )
    return changed


def settle_adopted(consumers: Sequence[Consumer]) -> None:
    """After a checkpoint recorded their cursors: the adopted consumers lack nothing before
    them."""
    for consumer in consumers:
        consumer.generation += 1
        consumer.dirty.clear_all()
        consumer.fresh = False


_SETTLING: set[asyncio.Task[None]] = set()


def start_added_peer(
    wp: JournalWritePath, consumer: Consumer | None, start: Callable[[], None]
) -> None:
    """A peer added by a reload: its new consumer starts where the archive stands when it can
    (:func:`adopt_archive_position`); ``start`` (its sender) runs once that is durable."""
    adopted = adopt_archive_position(wp.journal, [consumer] if consumer is not None else [])
    if not adopted:
        start()
        return

    async def settle() -> None:
        await wp.checkpoint()
        settle_adopted(adopted)
        start()

    task = asyncio.get_running_loop().create_task(settle())
    _SETTLING.add(task)  # held until done: the loop keeps only weak references to tasks
    task.add_done_callback(_SETTLING.discard)


def volume_root(archive: ArchiveConfig, volume: str) -> str:
    """Where the keys of ``volume`` start in ``archive``: PREFIX/VOLUME/."""
    return "/".join(p for p in (archive.prefix, volume) if p) + "/"


def open_store(archive: ArchiveConfig) -> S3Store:
    """The client of one archive (blocking: it reads the credentials file)."""
    url = parse_url(archive.url)
    return S3Store(
        bucket=url.bucket,
        endpoint=archive.endpoint,
        region=archive.region,
        credentials=load_credentials(archive.credentials_file),
    )


class UnitArchives:
    """Every archive consumer of one unit."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stores: dict[str, S3Store] = {}
        self.problems: dict[str, str] = {}
        # Per volume: how its replica was seeded (or why it could not be), for status.
        self.seeds: dict[str, dict[str, Any]] = {}

    async def seed(self, volumes: Sequence[VolumeRuntime]) -> None:
        """Restore every new replica whose volume says ``seed_from`` from that archive, before
        any source may connect. A seed that fails leaves the replica new: its source then
        copies it in full, as without an archive."""
        by_name = {a.name: a for a in self.config.archives}
        for rt in volumes:
            name = rt.config.seed_from
            wp = rt.journal
            if name is None or wp is None or rt.problem is not None or not needs_seed(wp):
                continue
            archive = by_name[name]
            try:
                store = await asyncio.to_thread(open_store, archive)
            except (ArchiveError, OSError) as exc:
                self._seed_failed(rt, name, exc)
                continue
            try:
                result = await seed_replica(
                    store, volume_root(archive, rt.config.name), wp, volume=rt.config.name
                )
            except (ArchiveError, OSError) as exc:
                self._seed_failed(rt, name, exc)
            else:
                self.seeds[rt.config.name] = {
                    "archive": name,
                    "seq": result.point.seq,
                    "generation": result.point.generation,
                    "bytes_downloaded": result.restored.bytes_downloaded,
                    "seconds": round(result.restored.seconds, 3),
                }
                log.info(
                    "volume %s: replica seeded from archive %s at seq %d (%d bytes in %.1f s)",
                    rt.config.name,
                    name,
                    result.point.seq,
                    result.restored.bytes_downloaded,
                    result.restored.seconds,
                )
            finally:
                store.close()

    def _seed_failed(self, rt: VolumeRuntime, archive: str, exc: BaseException) -> None:
        self.seeds[rt.config.name] = {"archive": archive, "problem": str(exc)}
        log.error(
            "volume %s: cannot seed the replica from archive %s (its source will copy it "
            "in full): %s",
            rt.config.name,
            archive,
            exc,
        )

    async def start(
        self,
        volumes: Sequence[VolumeRuntime],
        volume_id: Callable[[VolumeRuntime], Callable[[], str | None]],
    ) -> None:
        """Start every archive consumer; ``volume_id(rt)`` reads a volume's identity (the
        origin's, on a replica, once its source has told it)."""
        for archive in self.config.archives:
            if not archive.upload:
                continue
            try:
                store = await asyncio.to_thread(open_store, archive)
            except (ArchiveStoreError, OSError) as exc:
                self.problems[archive.name] = str(exc)
                log.error("archive %s is not used: %s", archive.name, exc)
                continue
            self.stores[archive.name] = store
            for rt in volumes:
                if archive.covers(rt.config.name):
                    self.attach(archive, store, rt, volume_id(rt))

    def attach(
        self,
        archive: ArchiveConfig,
        store: S3Store,
        rt: VolumeRuntime,
        volume_id: Callable[[], str | None],
    ) -> None:
        wp = rt.journal
        name = consumer_name(archive.name)
        if wp is None or rt.problem is not None or name not in wp.journal.consumers:
            return
        consumer = wp.journal.consumers[name]
        # Known by its own name, so the journal never takes it for a peer at a new address.
        consumer.peer = name

        def generation() -> str | None:
            history = rt.roles.history if rt.roles is not None else rt.history
            current = history.current if history is not None else None
            return current.id if current is not None else None

        def can_base() -> str | None:
            # A replica in the middle of a resync mixes old and new data: no base from it.
            if rt.role is Role.PRIMARY:
                return None
            replica = wp.journal.replica
            if replica is not None and not replica.consistent:
                return "the replica is not consistent"
            if not volume_id():
                return "the replica has not learned the volume's identity from its source"
            return None

        uploader = ArchiveUploader(
            config=archive,
            unit_name=self.config.unit.name,
            volume_name=rt.config.name,
            write_path=wp,
            store=store,
            root=volume_root(archive, rt.config.name),
            generation=generation,
            writer=wp.journal.journal_id,
            volume_id=volume_id,
            can_base=can_base,
        )
        rt.archives.append(uploader)
        uploader.start()

    async def stop(self, volumes: Sequence[VolumeRuntime]) -> None:
        for rt in volumes:
            for uploader in rt.archives:
                await uploader.stop()
        for store in self.stores.values():
            store.close()
        self.stores.clear()

    def status(self) -> list[dict[str, Any]]:
        """The unit's archives, with the problem that keeps one from being used."""
        return [
            {
                "name": a.name,
                "url": a.url,
                "upload": a.upload,
                "volumes": list(a.volumes),
                "problem": self.problems.get(a.name),
                "seeded": {v: s for v, s in self.seeds.items() if s["archive"] == a.name},
            }
            for a in self.config.archives
        ]
