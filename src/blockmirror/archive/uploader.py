"""The archive consumer of one volume: a journal consumer, like a peer, whose "peer" is an
object store (docs/archive.md).

It claims the volume's generation in the archive (one writer per chain: a conditional put), then
cuts the journal's records into segments (every ``segment_interval``, or sooner at
``segment_size``), compresses and uploads each, and acknowledges its records to the journal only
once the store has the segment: the journal holds them until then. A new chain, a consumer that
fell back to tracking (the journal gave up records while the store was away) and every
``base_interval`` start a base (:mod:`.bases`) beside the stream.

Nothing here blocks the event loop: compression runs in a worker thread and the store's calls
are the store's own (boto3 in its thread pool). Failures of the store are retried with capped
backoff; the state and its reason say what is happening (``state.ArchiveState``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Final

from blockmirror.archive import objects as fmt
from blockmirror.archive.chain import Chain
from blockmirror.archive.claiming import ChainRefused, Writer, claim, put_once
from blockmirror.archive.retention import expired, generation_expired
from blockmirror.archive.s3 import (
    ArchiveStoreError,
    ObjectExists,
    ObjectStore,
    StoreDenied,
    StoreFull,
)
from blockmirror.archive.upload_stats import ArchiveStats
from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.config_archive import ArchiveConfig
from blockmirror.journal.consumers import Consumer
from blockmirror.journal.format import Kind
from blockmirror.journal.journal import RecordsGone
from blockmirror.journal.record import Record
from blockmirror.link.ratelimit import TokenBucket
from blockmirror.state import ArchiveState, ConsumerMode, transition

log = logging.getLogger(__name__)

__all__ = ["CONSUMER_PREFIX", "ArchiveUploader", "consumer_name"]

CONSUMER_PREFIX: Final = "archive:"
# One read of the ring at a time: a segment is built of runs of at most this many bytes.
RUN_BYTES: Final = 4 * 1024 * 1024
BACKOFF_MIN: Final = 0.5
BACKOFF_MAX: Final = 10.0
# How often a refused claim is looked at again (the other writer may have gone).
REFUSED_RECHECK: Final = 60.0


def consumer_name(archive: str) -> str:
    """The journal consumer an archive uses (never a peer address: those hold a colon too,
    but never this prefix)."""
    return CONSUMER_PREFIX + archive


class ArchiveUploader:
    """Archives one volume into one ``[[archive]]``."""

    def __init__(
        self,
        *,
        config: ArchiveConfig,
        unit_name: str,
        volume_name: str,
        write_path: JournalWritePath,
        store: ObjectStore,
        root: str,
        generation: Callable[[], str | None],
        writer: str,
        volume_id: Callable[[], str | None] = lambda: None,
        can_base: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.config = config
        self.unit_name = unit_name
        self.volume_name = volume_name
        self.wp = write_path
        self.store = store
        self.root = root  # the volume's keys start with this (the prefix and the volume name)
        self._generation = generation
        self.writer = writer
        self._volume_id = volume_id
        self.can_base = can_base
        self.consumer_name = consumer_name(config.name)
        self.stats = ArchiveStats()
        self.bucket = TokenBucket(config.bandwidth / 8 if config.bandwidth else None)
        self.generation = ""
        # What the archive holds of this generation: the listing at start, and every object
        # put since.
        self.keys: list[fmt.ArchiveKey] = []
        # The chains of other generations under the same root (a promote began ours), for
        # retention: as listed when the session started.
        self.other_generations: dict[str, list[fmt.ArchiveKey]] = {}
        self._task: asyncio.Task[None] | None = None
        self._base_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last_cut = time.monotonic()
        self._next_base = 0.0
        # The base builder reads this: the newest record the segments hold durably.
        self.segment_event = asyncio.Event()
        # For retention: the data objects each manifest (by relative key) takes chunks from.
        self.manifest_objects: dict[str, frozenset[str]] = {}
        self._next_expiry = 0.0
        self._denied = False  # the last failure was a refusal to write (or a full store)

    # --- the consumer -------------------------------------------------------------------------

    @property
    def chain(self) -> Chain:
        return Chain(self.keys)

    @property
    def consumer(self) -> Consumer:
        return self.wp.journal.consumers[self.consumer_name]

    def enter(self, state: ArchiveState, reason: str = "") -> None:
        what = f"archive {self.config.name} of {self.volume_name}"
        self.stats.state = transition(self.stats.state, state, what=what)
        self.stats.reason = reason

    def key(self, rel: str) -> str:
        return self.root + rel

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        for task in (self._base_task, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.stats.state is not ArchiveState.STOPPED:
            self.enter(ArchiveState.STOPPED)

    def wake(self) -> None:
        self._wake.set()

    # --- the main loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            try:
                await self._session()
                backoff = BACKOFF_MIN
            except asyncio.CancelledError:
                raise
            except ChainRefused as exc:
                self._enter_quietly(ArchiveState.REFUSED, str(exc))
                log.error("archive %s of %s: %s", self.config.name, self.volume_name, exc)
                refused_for = self._generation()
                for _ in range(int(REFUSED_RECHECK)):
                    await asyncio.sleep(1.0)
                    if self._generation() != refused_for:
                        break  # a promote (or a demote) began another generation: try it now
            except (ArchiveStoreError, OSError) as exc:
                self._failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
            except Exception:  # a bug must not end archiving for good: log, retry
                log.exception("archive %s of %s failed", self.config.name, self.volume_name)
                self.stats.errors += 1
                await asyncio.sleep(BACKOFF_MAX)

    def _enter_quietly(self, state: ArchiveState, reason: str) -> None:
        if self.stats.state is not state:
            self.enter(state, reason)
        self.stats.reason = reason

    def _failed(self, exc: BaseException) -> None:
        self.stats.errors += 1
        self.stats.last_error = str(exc)
        kind = (
            "the store refuses writes"
            if isinstance(exc, StoreDenied)
            else "the store is full"
            if isinstance(exc, StoreFull)
            else "the store cannot be reached"
        )
        self._denied = isinstance(exc, (StoreDenied, StoreFull))
        self._enter_quietly(ArchiveState.STALLED, f"{kind}: {exc}")
        log.warning("archive %s of %s: %s", self.config.name, self.volume_name, exc)

    async def _session(self) -> None:
        """Claim the generation, learn what the archive holds, then stream."""
        if self.stats.state is not ArchiveState.STALLED:
            # (A retry while stalled keeps saying why it is stalled.)
            self._enter_quietly(ArchiveState.STARTING, "claiming the chain")
        while (why := self.can_base()) is not None:
            # A replica knows which volume (and generation) it holds only once its source has
            # brought it in step: claiming earlier could claim for the wrong one.
            self.stats.reason = f"waiting: {why}"
            await asyncio.sleep(1.0)
        generation = self._generation()
        if not generation:
            raise ArchiveStoreError("the volume has no generation yet")
        await self._claim(generation)
        self.generation = generation
        await self._resume()
        if not (self.stats.state is ArchiveState.STALLED and self._denied):
            # Reachable again. (A store that refused writes is trusted again only once a put
            # succeeds: listing and reading prove nothing of writing.)
            self._enter_quietly(ArchiveState.ARCHIVING, "")
        while True:
            if self._generation() != self.generation:
                return  # a promote began a new generation: claim it, start its chain
            self._maybe_start_base()
            cut = await self._next_segment()
            if time.monotonic() >= self._next_expiry:
                await self.expire()
            if cut is None:
                await self._idle()

    async def _claim(self, generation: str) -> None:
        volume_id = self._volume_id()
        if not volume_id:
            raise ArchiveStoreError("the volume has no identity yet")
        who = Writer(
            self.config.url, self.root, self.volume_name, volume_id, self.unit_name, self.writer
        )
        self.stats.objects += await claim(self.store, who, generation)

    async def _resume(self) -> None:
        """Start after what the archive holds: a segment stored before a crash is not cut again
        (its records may be acknowledged only in a checkpoint the crash lost)."""
        found = await list_keys(self.store, self.root)
        self.keys = found.pop(self.generation, [])
        self.other_generations = found
        chain = self.chain
        consumer = self.consumer
        if chain.segments:
            newest = chain.segments[-1]
            self.stats.last_seq = newest.last
            self.stats.last_record_ns = newest.last_ts
            if consumer.mode == ConsumerMode.JOURNAL and newest.last > consumer.acked_seq:
                self.wp.acknowledge(self.consumer_name, newest.last)
        self.stats.gaps = list(chain.gaps)
        self.stats.segments = len(chain.segments)
        self.stats.bases = len(chain.bases)
        if not chain.bases:
            self._next_base = 0.0  # a chain without a base restores nothing: one at once
        else:
            # A restart does not copy the volume again before its time: the newest manifest
            # says when it was made.
            newest_base = max(chain.bases, key=lambda b: b.end)
            manifest = fmt.decode_manifest(await self.store.get(self.key(newest_base.key)))
            self.manifest_objects[newest_base.key] = frozenset(manifest.objects)
            age = time.time() - manifest.created_ns / 1e9
            self._next_base = time.monotonic() + max(0.0, self.config.base_interval - age)

    async def _idle(self) -> None:
        self.wp.applied_event.clear()
        self._wake.clear()
        waits = [
            asyncio.ensure_future(self.wp.applied_event.wait()),
            asyncio.ensure_future(self._wake.wait()),
        ]
        try:
            await asyncio.wait(waits, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        base = self._base_task
        if base is not None and base.done():
            self._base_task = None
            exc = base.exception() if not base.cancelled() else None
            if exc is not None:
                self._next_base = 0.0  # try again as soon as the store answers
                raise exc

    # --- segments -----------------------------------------------------------------------------

    def _due(self, pending_bytes: int) -> bool:
        if pending_bytes >= self.config.segment_size:
            return True
        return time.monotonic() - self._last_cut >= self.config.segment_interval

    async def _next_segment(self) -> int | None:
        """Cut, upload and acknowledge one segment when one is due; its last seq, or None."""
        consumer = self.consumer
        if consumer.mode != ConsumerMode.JOURNAL or consumer.paused:
            if consumer.mode != ConsumerMode.JOURNAL and not self.stats.tracking_since:
                self.stats.tracking_since = time.time()
            return None
        journal = self.wp.journal
        if self._base_task is None and not consumer.dirty.is_clean():
            # A change reached the volume outside the journal (a paused journal, a relay's
            # resync): records after it would restore points without it. Give the records up
            # to the dirty map; a base covers them, and the chain shows the gap honestly.
            journal.switch_to_tracking(consumer)
            return None
        limit = self.wp.applied_seq
        start = consumer.acked_seq + 1
        if start > limit:
            self._last_cut = time.monotonic()
            return None
        pending, _ = journal.backlog(consumer)
        if not self._due(pending):
            return None
        runs: list[bytes] = []
        records: list[Record] = []
        size = 0
        seq = start
        while seq <= limit and size < self.config.segment_size:
            try:
                run, raw = journal.read_run(seq, limit, min(RUN_BYTES, self.config.segment_size))
            except RecordsGone:
                return None  # the journal gave them up: the consumer is tracking now
            if not run:
                break
            runs.append(raw)
            records.extend(run)
            size += len(raw)
            seq = run[-1].seq + 1
            await asyncio.sleep(0)  # a 64 MiB segment is 16 reads: let the loop breathe
        if not records:
            return None
        first, last = records[0], records[-1]
        body = b"".join(runs)
        obj = await asyncio.to_thread(
            fmt.encode_segment,
            body,
            first=first.seq,
            last=last.seq,
            first_ts=first.timestamp_ns,
            last_ts=last.timestamp_ns,
            codec=self.config.compression,
            level=self.config.compression_level,
        )
        key = fmt.SegmentKey(self.generation, first.seq, last.seq, last.timestamp_ns)
        await self.throttle(len(obj))
        await self.put_once(self.key(key.key), obj)
        self.stats.bytes_uploaded += len(obj)
        self.stats.raw_bytes += len(body)
        self.stats.objects += 1
        self.stats.segments += 1
        self.keys.append(key)
        await self._bookmarks(records)
        # Durable in the store: the journal may free these records now.
        self.wp.acknowledge(self.consumer_name, last.seq)
        self.stats.last_seq = last.seq
        self.stats.last_time = time.time()
        self.stats.last_record_ns = last.timestamp_ns
        self.stats.tracking_since = 0.0
        self._last_cut = time.monotonic()
        self.stored()
        self.segment_event.set()
        return last.seq

    async def put_once(self, key: str, data: bytes) -> None:
        await put_once(self.store, key, data)
        self.stored()

    def stored(self) -> None:
        """A put succeeded: the store takes writes."""
        self._denied = False
        if self.stats.state in (ArchiveState.STALLED, ArchiveState.STARTING):
            self.enter(ArchiveState.ARCHIVING)

    async def _bookmarks(self, records: list[Record]) -> None:
        """A key per bookmark, so that a listing shows every bookmark without a download."""
        for rec in records:
            if rec.kind != Kind.BOOKMARK:
                continue
            # Still in the ring: this segment's records are not acknowledged yet.
            name = self.wp.journal.read_payload(rec).decode("utf-8", "replace")
            key = fmt.BookmarkKey(self.generation, rec.seq, rec.timestamp_ns, name)
            with contextlib.suppress(ObjectExists):
                await self.store.put(self.key(key.key), b"", if_none_match=True)
            self.stats.objects += 1
            self.keys.append(key)

    async def throttle(self, nbytes: int) -> None:
        await self.bucket.pace()
        self.bucket.charge(nbytes)

    # --- bases --------------------------------------------------------------------------------

    def _maybe_start_base(self) -> None:
        if self._base_task is not None:
            return
        consumer = self.consumer
        due = (
            consumer.mode == ConsumerMode.TRACKING
            # A base that failed after its switch back to the journal left its regions dirty.
            or not consumer.dirty.is_clean()
            or not any(isinstance(k, fmt.ManifestKey) for k in self.keys)
            or time.monotonic() >= self._next_base
        )
        if not due or self.can_base() is not None:
            return
        from blockmirror.archive.bases import BaseBuilder

        builder = BaseBuilder(self)
        self._base_task = asyncio.get_running_loop().create_task(builder.run())
        self._next_base = time.monotonic() + self.config.base_interval

    # --- retention ----------------------------------------------------------------------------

    async def expire(self) -> int:
        """Delete what no point within ``history`` needs (:mod:`.retention`); how many."""
        # Often enough that a short history (tests, drills) is kept closely, at most a listing's
        # worth of work a minute for a long one.
        self._next_expiry = time.monotonic() + min(60.0, max(1.0, self.config.history / 20))
        for key in self.keys:
            if isinstance(key, fmt.ManifestKey) and key.key not in self.manifest_objects:
                manifest = fmt.decode_manifest(await self.store.get(self.key(key.key)))
                self.manifest_objects[key.key] = frozenset(manifest.objects)
        cutoff = time.time_ns() - int(self.config.history * 1e9)
        result = expired(self.keys, cutoff, self.manifest_objects)
        referenced = set().union(*self.manifest_objects.values())
        old = 0
        for gen, keys in list(self.other_generations.items()):
            if generation_expired(keys, cutoff, result.anchor):
                # Whole, claim last: a listing never shows a chain without its claim.
                doomed = [k.key for k in keys if k.key not in referenced]
                claims = [k for k in doomed if k.endswith("/claim")]
                await self.store.delete([self.key(k) for k in doomed if k not in claims])
                await self.store.delete([self.key(k) for k in claims])
                del self.other_generations[gen]
                old += len(doomed)
                log.info(
                    "archive %s of %s: generation %s is older than history: %d objects deleted",
                    self.config.name,
                    self.volume_name,
                    gen[:8],
                    len(doomed),
                )
        self.stats.deleted += old
        if not result.delete:
            return old
        await self.store.delete([self.key(k.key) for k in result.delete])
        gone = set(result.delete)
        self.keys = [k for k in self.keys if k not in gone]
        for k in result.delete:
            self.manifest_objects.pop(k.key, None)
        self.stats.deleted += len(gone)
        log.info(
            "archive %s of %s: retention deleted %d objects (oldest base kept: %d..%d)",
            self.config.name,
            self.volume_name,
            len(gone),
            result.anchor.start if result.anchor else 0,
            result.anchor.end if result.anchor else 0,
        )
        return old + len(gone)

    # --- status -------------------------------------------------------------------------------

    def lag_seconds(self) -> float:
        """Age of the oldest record not yet archived; 0 when every record is."""
        consumer = self.consumer
        if consumer.mode != ConsumerMode.JOURNAL:
            since = self.stats.tracking_since or time.time()
            return max(0.0, time.time() - since)
        journal = self.wp.journal
        nxt = consumer.acked_seq + 1
        if nxt >= journal.next_seq:
            return 0.0
        stamp = journal.stamp_of(nxt)
        return max(0.0, time.time() - stamp / 1e9) if stamp else 0.0

    def status(self) -> dict[str, object]:
        backlog_bytes, backlog_records = self.wp.journal.backlog(self.consumer)
        bases = [k for k in self.keys if isinstance(k, fmt.ManifestKey)]
        newest = max(bases, key=lambda k: k.end, default=None)
        return self.stats.to_json(
            newest_base=(newest.start, newest.end) if newest is not None else None,
            archive=self.config.name,
            url=self.config.url,
            generation=self.generation,
            mode=str(self.consumer.mode),
            lag_seconds=self.lag_seconds(),
            backlog=(backlog_bytes, backlog_records),
            rate_limit=self.config.bandwidth,
        )


async def list_keys(store: ObjectStore, root: str) -> dict[str, list[fmt.ArchiveKey]]:
    """What the store holds under a volume's root, as parsed keys by generation (strays and
    the root's own objects left out)."""
    found: dict[str, list[fmt.ArchiveKey]] = {}
    for info in await store.list(root):
        try:
            parsed = fmt.parse_key(info.key[len(root) :])
        except fmt.ArchiveFormatError:
            continue  # not ours to judge here: `archive verify` reports it
        if parsed is not None:
            found.setdefault(parsed.gen, []).append(parsed)
    return found
