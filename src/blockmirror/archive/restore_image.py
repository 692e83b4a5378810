"""Restore a point of an archived volume anywhere, with no unit (docs/archive.md, "Restore").

The listing names the chain; :meth:`Chain.plan` picks the base and the segments. The base's data
objects are fetched in parallel and every chunk is checked against the manifest's digest as it
is written; then the segments are fetched ahead (in parallel) and applied in order up to the
point, each record checked by its CRC. Last, every chunk no record touched is read back and
checked against the manifest once more, and the image is synced. A point that lies in a gap, or
outside what the chain holds, is refused before anything is written.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from blockmirror.archive import objects as fmt
from blockmirror.archive.catalog import Catalog, Point, Target
from blockmirror.archive.s3 import ObjectStore
from blockmirror.errors import ArchiveError
from blockmirror.journal.format import Kind
from blockmirror.store.base import Store
from blockmirror.store.volume import Volume

__all__ = ["RestoreError", "RestoreResult", "restore", "restore_into"]

PARALLEL: Final = 8
Progress = Callable[[str], None]


class RestoreError(ArchiveError):
    """A restore cannot be done (or failed a check); the message says why."""


@dataclass(frozen=True)
class RestoreResult:
    seq: int
    time_ns: int
    generation: str
    base_end: int
    records: int
    bytes_downloaded: int
    seconds: float
    image_bytes: int


async def restore(
    store: ObjectStore,
    root: str,
    target: Target,
    to: Path,
    *,
    parallel: int = PARALLEL,
    progress: Progress | None = None,
) -> RestoreResult:
    """Write the volume at ``target`` to the new file ``to`` (refused if it exists)."""
    catalog = await Catalog.load(store, root)
    point = await catalog.resolve(target)
    manifest_key = catalog.chains[point.generation].plan(point.seq).base
    manifest = fmt.decode_manifest(await store.get(root + manifest_key.key))
    fd = os.open(to, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, manifest.volume_size)
    finally:
        os.close(fd)
    try:
        image = Volume.open(to, size=manifest.volume_size, create=False)
        try:
            return await restore_into(
                store, root, catalog, point, image, fresh=True, parallel=parallel,
                progress=progress,
            )  # fmt: skip
        finally:
            image.close()
    except BaseException:
        os.unlink(to)
        raise


async def restore_into(
    store: ObjectStore,
    root: str,
    catalog: Catalog,
    point: Point,
    image: Store,
    *,
    fresh: bool,
    parallel: int = PARALLEL,
    progress: Progress | None = None,
) -> RestoreResult:
    """Write ``point`` over ``image`` (of the volume's size); ``fresh``: it reads as zeros
    already, so zero chunks need no writing. Synced before it returns."""
    began = time.monotonic()
    say = progress or (lambda _line: None)
    chain = catalog.chains[point.generation]
    plan = chain.plan(point.seq)
    say(
        f"point: seq {point.seq} of generation {point.generation[:8]}; base "
        f"{plan.base.start}..{plan.base.end}, {len(plan.segments)} segments to replay"
    )
    manifest_bytes = await store.get(root + plan.base.key)
    manifest = fmt.decode_manifest(manifest_bytes)
    if manifest.volume_size != image.size:
        raise RestoreError(
            f"the archived volume is {manifest.volume_size} bytes, the target {image.size}"
        )
    downloaded = len(manifest_bytes)
    downloaded += await _write_base(store, root, manifest, image, fresh, parallel, say)
    touched: set[int] = set()
    fetched, records = await _replay(
        store, root, plan.segments, plan.base.start, point.seq, image, manifest, touched,
        parallel, say,
    )  # fmt: skip
    downloaded += fetched
    # The digests of the read-back run in parallel threads (hashlib drops the GIL).
    untouched = [i for i in range(len(manifest.chunks)) if i not in touched]
    workers = max(1, min(4, os.cpu_count() or 1))
    await asyncio.gather(
        *(
            asyncio.to_thread(_check_untouched, image, manifest, untouched[n::workers])
            for n in range(workers)
        )
    )
    await asyncio.to_thread(image.flush)
    seconds = time.monotonic() - began
    say(f"restored seq {point.seq}: {records} records replayed, {seconds:.1f} s")
    return RestoreResult(
        point.seq, point.time_ns, point.generation, plan.base.end, records, downloaded, seconds,
        manifest.volume_size,
    )  # fmt: skip


async def _write_base(
    store: ObjectStore,
    root: str,
    manifest: fmt.Manifest,
    image: Store,
    fresh: bool,
    parallel: int,
    say: Progress,
) -> int:
    """Every data chunk of the base, checked against its digest, at its offset."""
    by_object: dict[int, list[int]] = {}
    zeros: list[int] = []
    for i, ref in enumerate(manifest.chunks):
        if ref.object_index != fmt.ZERO_CHUNK:
            by_object.setdefault(ref.object_index, []).append(i)
        elif not fresh:
            zeros.append(i)
    for i in zeros:
        offset, length = manifest.chunk_range(i)
        await asyncio.to_thread(image.write_zeroes, offset, length, may_trim=True)
    limit = asyncio.Semaphore(parallel)
    total = len(by_object)
    done = 0
    downloaded = 0

    async def one(index: int, chunks: list[int]) -> None:
        nonlocal done, downloaded
        async with limit:
            data = await store.get(root + manifest.objects[index])
        downloaded += len(data)
        await asyncio.to_thread(_write_chunks, image, manifest, data, chunks)
        done += 1
        if done == total or done % 16 == 0:
            say(f"base: {done}/{total} objects")

    await asyncio.gather(*(one(i, c) for i, c in sorted(by_object.items())))
    return downloaded


def _write_chunks(image: Store, manifest: fmt.Manifest, data: bytes, chunks: list[int]) -> None:
    view = memoryview(data)
    for i in chunks:
        ref = manifest.chunks[i]
        offset, length = manifest.chunk_range(i)
        stored = view[ref.offset : ref.offset + ref.stored_len]
        if len(stored) != ref.stored_len:
            raise RestoreError(
                f"chunk {i} overruns its object {manifest.objects[ref.object_index]}"
            )
        raw = fmt.decode_chunk(stored, ref.flags, length, ref.digest)
        image.pwritev(offset, [raw])


async def _replay(
    store: ObjectStore,
    root: str,
    segments: Sequence[fmt.SegmentKey],
    after: int,
    upto: int,
    image: Store,
    manifest: fmt.Manifest,
    touched: set[int],
    parallel: int,
    say: Progress,
) -> tuple[int, int]:
    """Apply the records after ``after`` up to ``upto`` in order; segments are fetched
    ``parallel`` ahead. Returns (bytes downloaded, records applied)."""
    limit = asyncio.Semaphore(parallel)

    async def fetch(key: fmt.SegmentKey) -> bytes:
        async with limit:
            return await store.get(root + key.key)

    tasks = [asyncio.ensure_future(fetch(k)) for k in segments]
    downloaded = 0
    applied = 0
    expected = after + 1
    try:
        for n, (key, task) in enumerate(zip(segments, tasks, strict=True), 1):
            obj = await task
            downloaded += len(obj)
            segment = await asyncio.to_thread(fmt.decode_segment, obj)
            if (segment.first, segment.last) != (key.first, key.last):
                raise RestoreError(f"{key.key} holds records {segment.first}..{segment.last}")
            if segment.first > expected:
                raise RestoreError(f"records {expected}..{segment.first - 1} are missing")
            applied += await asyncio.to_thread(
                _apply, image, segment.records, expected, upto, manifest, touched
            )
            expected = max(expected, segment.last + 1)
            say(f"segments: {n}/{len(segments)} (seq {min(segment.last, upto)})")
    finally:
        for task in tasks:
            task.cancel()
    if expected <= upto:
        raise RestoreError(f"the segments end at {expected - 1}, before seq {upto}")
    return downloaded, applied


def _apply(
    image: Store,
    records: Sequence[fmt.Record],
    first: int,
    upto: int,
    manifest: fmt.Manifest,
    touched: set[int],
) -> int:
    applied = 0
    chunk = manifest.chunk_size
    for rec in records:
        if rec.seq < first or rec.seq > upto:
            continue
        applied += 1
        if rec.kind not in (Kind.WRITE, Kind.ZERO, Kind.TRIM):
            continue
        if rec.offset + rec.length > manifest.volume_size:
            raise RestoreError(f"record {rec.seq} is beyond the volume's end")
        touched.update(range(rec.offset // chunk, (rec.offset + rec.length - 1) // chunk + 1))
        if rec.kind == Kind.WRITE:
            image.pwritev(rec.offset, list(rec.data))
        else:
            # A trimmed range reads as zeros on every volume we serve (docs/journal.md).
            image.write_zeroes(rec.offset, rec.length, may_trim=True)
    return applied


def _check_untouched(image: Store, manifest: fmt.Manifest, chunks: list[int]) -> None:
    """Read back ``chunks`` (ones no record changed): each must be the base's, digest for
    digest."""
    for i in chunks:
        ref = manifest.chunks[i]
        offset, length = manifest.chunk_range(i)
        data = image.pread(offset, length)
        if fmt.chunk_digest(data) != ref.digest:
            raise RestoreError(f"chunk {i} at {offset} does not match the manifest after writing")
