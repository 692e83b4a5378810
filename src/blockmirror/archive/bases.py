"""Base images of an archived volume (docs/archive.md, "Bases").

A base is copied from the live volume while the segments go on: the copy starts after record
``start`` (every record up to it is on the volume) and ends before record ``end`` is applied,
so each chunk holds the volume as it was at some point between the two. Replaying the records
``start+1 .. end`` over it, which the segments hold, gives the volume at ``end`` exactly: the
manifest is written only once the segments reach ``end``, and names both numbers.

A base after the first is a synthetic full: a chunk whose bytes equal the previous base's chunk
(the same BLAKE2b digest) is not uploaded again, the manifest points at the older object. A
consumer that fell back to tracking (the journal gave its records up while the store was away)
is switched back to the journal at ``start``, exactly as a peer's resync does: the base covers
what its dirty map held, and the segments go on from ``start``. The records between the last
segment and ``start`` are a gap the chain reports; no restore crosses it.

Reads, digests and compression run in worker threads; nothing here waits on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Final

from blockmirror.archive import objects as fmt
from blockmirror.archive.s3 import ArchiveStoreError
from blockmirror.state import ConsumerMode
from blockmirror.store.base import Store

if TYPE_CHECKING:
    from blockmirror.archive.uploader import ArchiveUploader

log = logging.getLogger(__name__)

__all__ = ["DATA_OBJECT_BYTES", "BaseAbandoned", "BaseBuilder"]

# Stored bytes per data object: large enough that a 1 TiB volume is 16 000 objects, not
# millions, small enough that a failed upload is cheap to redo.
DATA_OBJECT_BYTES: Final = 64 * 1024 * 1024


class BaseAbandoned(ArchiveStoreError):
    """The base cannot be finished (the segments fell back to tracking meanwhile); the next
    one starts over."""


def _read_chunk(
    volume: Store,
    offset: int,
    length: int,
    previous: bytes | None,
    codec: fmt.Codec,
    level: int,
) -> tuple[bytes, bytes | None, int]:
    """(digest, stored bytes or None when it equals ``previous`` or is all zeros, flags).

    Runs in a worker thread: one read, one digest, one compression of one chunk."""
    extents = volume.extents(offset, length)
    if all(e.hole or e.zero for e in extents):
        return fmt.chunk_digest(bytes(length)), None, -1
    data = volume.pread(offset, length)
    digest = fmt.chunk_digest(data)
    if digest == previous:
        return digest, None, 0
    if data.count(0) == length:
        return digest, None, -1
    stored, flags = fmt.encode_chunk(data, codec, level)
    return digest, stored, flags


class BaseBuilder:
    """Builds one base of an uploader's volume."""

    def __init__(self, uploader: ArchiveUploader) -> None:
        self.up = uploader
        self.objects: list[str] = []
        self.refs: list[fmt.ChunkRef] = []
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._data_index = 0

    async def run(self) -> None:
        up = self.up
        up.stats.base_running = True
        up.stats.base_progress = 0.0
        try:
            await self._build()
        finally:
            up.stats.base_running = False

    async def _previous(self) -> fmt.Manifest | None:
        """The newest manifest of this chain, whose chunks a synthetic full may reuse."""
        up = self.up
        manifests = [k for k in up.keys if isinstance(k, fmt.ManifestKey)]
        if not manifests:
            return None
        newest = max(manifests, key=lambda k: k.end)
        try:
            manifest = fmt.decode_manifest(await up.store.get(up.key(newest.key)))
        except fmt.ArchiveFormatError as exc:
            log.error(
                "%s: %s is damaged, the next base is a full one: %s",
                up.volume_name,
                newest.key,
                exc,
            )
            return None
        if manifest.volume_size != up.wp.volume.size or manifest.chunk_size != fmt.CHUNK_SIZE:
            return None
        return manifest

    async def _build(self) -> None:
        up = self.up
        wp = up.wp
        consumer = up.consumer
        manifests = [k for k in up.keys if isinstance(k, fmt.ManifestKey)]
        if (
            manifests
            and consumer.mode == ConsumerMode.JOURNAL
            and consumer.dirty.is_clean()
            and max(k.end for k in manifests) == wp.applied_seq
        ):
            # Nothing reached the volume since the newest base: it is this base already (and
            # its key would be this one's).
            return
        previous = await self._previous()
        dirty_before = list(consumer.dirty.dirty_regions())
        if consumer.mode == ConsumerMode.TRACKING:
            # Listing and reading work for a store that refuses writes: prove it takes one
            # before leaving tracking, or the journal would hold records for a base that fails.
            await up.store.put(up.key(fmt.PROBE_KEY), str(time.time_ns()).encode())
            start = wp.applied_seq
            consumer.set_mode(ConsumerMode.JOURNAL)
            consumer.acked_seq = start
            await wp.checkpoint()
            if up.stats.last_seq and up.stats.last_seq < start:
                up.stats.gaps.append((up.stats.last_seq, start + 1))
            up.stats.last_seq = start
        else:
            start = wp.applied_seq
        generation = consumer.generation
        # An abandoned base may have left data objects under this start: number after them.
        self._data_index = 1 + max(
            (k.n for k in up.keys if isinstance(k, fmt.DataKey) and k.base_end == start),
            default=-1,
        )
        size = wp.volume.size
        chunk = fmt.CHUNK_SIZE
        count = (size + chunk - 1) // chunk
        old_index: dict[int, int] = {}
        began = time.monotonic()
        for i in range(count):
            offset = i * chunk
            length = min(chunk, size - offset)
            prev = previous.chunks[i] if previous is not None else None
            digest, stored, flags = await asyncio.to_thread(
                _read_chunk,
                wp.volume,
                offset,
                length,
                prev.digest if prev is not None else None,
                up.config.compression,
                up.config.compression_level,
            )
            if stored is None and flags == -1:
                self.refs.append(fmt.ChunkRef(fmt.ZERO_CHUNK, 0, 0, 0, digest))
            elif stored is None:
                assert previous is not None and prev is not None
                index = old_index.get(prev.object_index)
                if index is None:
                    index = old_index[prev.object_index] = len(self.objects)
                    self.objects.append(previous.objects[prev.object_index])
                self.refs.append(
                    fmt.ChunkRef(index, prev.offset, prev.stored_len, prev.flags, digest)
                )
            else:
                await self._add(stored, flags, digest, end_hint=start)
            up.stats.base_progress = (i + 1) / count
            if consumer.mode != ConsumerMode.JOURNAL:
                raise BaseAbandoned("the journal gave up records during the base")
        await self._flush_data(start)
        end = wp.applied_seq
        # The base is the volume at ``end`` only with the records up to ``end``: wait for the
        # segments to hold them.
        while up.stats.last_seq < end:
            if consumer.mode != ConsumerMode.JOURNAL:
                raise BaseAbandoned("the journal gave up records before the base was complete")
            up.segment_event.clear()
            up.wake()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(up.segment_event.wait(), 1.0)
        if consumer.generation != generation or wp.unjournaled_pending:
            # A change outside the journal while the copy ran: a chunk read before it lacks
            # it, and no record brings it. This base would not be exact: the next one starts
            # over (its data objects go with retention).
            raise BaseAbandoned("a change outside the journal came during the base")
        end_ts = wp.journal.stamp_of(end) if end else 0
        if end and not end_ts:
            end_ts = up.stats.last_record_ns
        manifest = fmt.Manifest(
            volume_size=size,
            chunk_size=chunk,
            generation=up.generation,
            start_seq=start,
            end_seq=end,
            end_ts=end_ts,
            created_ns=time.time_ns(),
            objects=tuple(self.objects),
            chunks=tuple(self.refs),
        )
        body = await asyncio.to_thread(fmt.encode_manifest, manifest)
        key = fmt.ManifestKey(up.generation, end, start, end_ts)
        await up.throttle(len(body))
        if key in up.keys:
            return  # the same point, under the same name: written already
        await up.put_once(up.key(key.key), body)
        up.keys.append(key)
        up.manifest_objects[key.key] = frozenset(self.objects)
        up.stats.objects += 1
        up.stats.bases += 1
        up.stats.bytes_uploaded += len(body)
        if consumer.generation == generation and not wp.unjournaled_pending:
            # Every region dirty when the base began is in it (or in the segments after it).
            for offset, length in dirty_before:
                consumer.dirty.clear(offset, length)
            consumer.fresh = False  # in step now: a new peer may start where it stands
        else:
            log.warning(
                "%s: a change outside the journal after base %d..%d: another base follows",
                up.volume_name,
                start,
                end,
            )
        log.info(
            "%s: base %d..%d in archive %s: %d chunks, %d objects, %.1f s",
            up.volume_name,
            start,
            end,
            up.config.name,
            count,
            len(self.objects),
            time.monotonic() - began,
        )

    async def _add(self, stored: bytes, flags: int, digest: bytes, *, end_hint: int) -> None:
        if not self._buffer or self._buffered + len(stored) > DATA_OBJECT_BYTES:
            await self._flush_data(end_hint)
        if not self._buffer:
            self.objects.append(self._data_key(end_hint).key)
        index = len(self.objects) - 1
        self.refs.append(fmt.ChunkRef(index, self._buffered, len(stored), flags, digest))
        self._buffer.append(stored)
        self._buffered += len(stored)

    def _data_key(self, start: int) -> fmt.DataKey:
        # Named by the base's start: the end is not known until the copy is done, and the
        # manifest (which is named by both) lists its objects anyway.
        return fmt.DataKey(self.up.generation, start, self._data_index)

    async def _flush_data(self, start: int) -> None:
        if not self._buffer:
            return
        up = self.up
        data = b"".join(self._buffer)
        key = self._data_key(start)
        self._buffer = []
        self._buffered = 0
        self._data_index += 1
        await up.throttle(len(data))
        await up.put_once(up.key(key.key), data)
        up.keys.append(key)
        up.stats.objects += 1
        up.stats.bytes_uploaded += len(data)
