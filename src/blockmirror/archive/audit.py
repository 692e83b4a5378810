"""``blockmirror archive verify``: every object of a volume's archive read and checked.

Segments are decoded whole (header and body CRCs, every record's CRC, consecutive numbers that
match the key); manifests are decoded and every object they name must exist; every chunk of
every data object a manifest names is checked against its digest; each chain is checked for
gaps and overlaps. Downloads run ``parallel`` at a time. Nothing is changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from blockmirror.archive import objects as fmt
from blockmirror.archive.catalog import Catalog
from blockmirror.archive.s3 import ArchiveStoreError, ObjectStore

__all__ = ["verify"]


async def verify(store: ObjectStore, root: str, *, parallel: int = 8) -> dict[str, Any]:
    """A report: ``objects_checked``, ``bytes_checked`` and ``problems`` (one line each)."""
    catalog = await Catalog.load(store, root)
    problems: list[str] = [f"{key}: {why}" for key, why in catalog.malformed]
    limit = asyncio.Semaphore(parallel)
    checked = 0
    nbytes = 0

    async def fetch(rel: str) -> bytes | None:
        nonlocal checked, nbytes
        async with limit:
            try:
                data = await store.get(root + rel)
            except ArchiveStoreError as exc:
                problems.append(f"{rel}: cannot be read: {exc}")
                return None
        checked += 1
        nbytes += len(data)
        return data

    async def check(rel: str, decode: Callable[[bytes], object]) -> object | None:
        data = await fetch(rel)
        if data is None:
            return None
        try:
            return await asyncio.to_thread(decode, data)
        except fmt.ArchiveFormatError as exc:
            problems.append(f"{rel}: {exc}")
            return None

    present = {o.key[len(root) :] for o in catalog.objects}
    for gen in catalog.generations():
        chain = catalog.chains[gen]
        for lo, hi in chain.gaps:
            problems.append(f"generation {gen[:8]}: records {lo + 1}..{hi - 1} are missing")
        for a, b in chain.overlaps:
            problems.append(f"generation {gen[:8]}: segments overlap at {a}..{b}")
        if gen not in catalog.claims:
            problems.append(f"generation {gen[:8]}: no claim (which unit wrote it is unknown)")

        async def segment(key: fmt.SegmentKey) -> None:
            found = await check(key.key, fmt.decode_segment)
            if isinstance(found, fmt.Segment) and (found.first, found.last, found.last_ts) != (
                key.first,
                key.last,
                key.last_ts,
            ):
                problems.append(f"{key.key}: holds {found.first}..{found.last}, not its name's")

        jobs: list[Awaitable[None]] = [segment(k) for k in chain.segments]
        manifests: list[tuple[fmt.ManifestKey, fmt.Manifest]] = []

        async def manifest(
            key: fmt.ManifestKey, manifests: list[tuple[fmt.ManifestKey, fmt.Manifest]] = manifests
        ) -> None:
            found = await check(key.key, fmt.decode_manifest)
            if isinstance(found, fmt.Manifest):
                if (found.start_seq, found.end_seq) != (key.start, key.end):
                    problems.append(f"{key.key}: describes {found.start_seq}..{found.end_seq}")
                manifests.append((key, found))

        jobs += [manifest(k) for k in chain.bases]
        await asyncio.gather(*jobs)
        # Each data object once, with every chunk any manifest takes from it.
        wanted: dict[str, list[tuple[fmt.ChunkRef, int]]] = {}
        for key, found in manifests:
            for i, ref in enumerate(found.chunks):
                if ref.object_index == fmt.ZERO_CHUNK:
                    continue
                obj = found.objects[ref.object_index]
                if obj not in present:
                    problems.append(f"{key.key}: chunk {i} is in {obj}, which is missing")
                    continue
                wanted.setdefault(obj, []).append((ref, found.chunk_range(i)[1]))

        async def data(rel: str, refs: list[tuple[fmt.ChunkRef, int]]) -> None:
            raw = await fetch(rel)
            if raw is None:
                return
            bad = await asyncio.to_thread(_check_chunks, raw, refs)
            if bad:
                problems.append(f"{rel}: {bad} chunks do not match their digests")

        await asyncio.gather(*(data(rel, refs) for rel, refs in sorted(wanted.items())))
    return {
        "root": root,
        "objects_checked": checked,
        "bytes_checked": nbytes,
        "objects": len(catalog.objects),
        "problems": problems,
    }


def _check_chunks(raw: bytes, refs: list[tuple[fmt.ChunkRef, int]]) -> int:
    view = memoryview(raw)
    bad = 0
    seen: set[tuple[int, int]] = set()
    for ref, length in refs:
        if (ref.offset, ref.stored_len) in seen:
            continue
        seen.add((ref.offset, ref.stored_len))
        try:
            fmt.decode_chunk(
                view[ref.offset : ref.offset + ref.stored_len], ref.flags, length, ref.digest
            )
        except fmt.ArchiveFormatError:
            bad += 1
    return bad
