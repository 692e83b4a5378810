"""The archive consumer (``ArchiveUploader``) on a real journal, against an in-memory store.

Claims (the root's and the generation's, one writer per chain), the first base, segments that
hold exactly the records written and are acknowledged to the journal only once stored, a store
that refuses writes (stalled, the journal holds the records, no gap after it heals), and a
restart after a segment was stored but not acknowledged (no overlap).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest

from blockmirror.archive import objects as fmt
from blockmirror.archive import uploader as uploader_module
from blockmirror.archive.chain import Chain
from blockmirror.archive.s3 import (
    ArchiveStoreError,
    ObjectExists,
    ObjectInfo,
    ObjectMissing,
    StoreDenied,
    StoreUnavailable,
)
from blockmirror.archive.uploader import ArchiveUploader, consumer_name, list_keys
from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.config_archive import ArchiveConfig
from blockmirror.journal.format import Kind
from blockmirror.journal.journal import Journal
from blockmirror.state import ArchiveState, ConsumerMode
from blockmirror.store.volume import Volume
from tests.unit.link.ends import until, write

MiB = 1024 * 1024
VOLUME = 8 * MiB  # two chunks
GEN = "5a" * 16
VOLUME_ID = "0f" * 16
ROOT = "prefix/vol/"
CONFIG = ArchiveConfig(name="s3", url="s3://bucket/prefix", segment_interval=0.05)
CONSUMER = consumer_name(CONFIG.name)


# --- an in-memory object store --------------------------------------------------------------------


class MemoryStore:
    """An :class:`ObjectStore` in a dict. ``fail``: every put raises this class (a store that
    refuses writes, or cannot be reached). ``hold(key)``: the put waits for ``release`` before
    it stores. ``hang(key)``: the put stores, then never answers (a lost response)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.fail: type[ArchiveStoreError] | None = None
        self.hold: Callable[[str], bool] = lambda key: False
        self.hang: Callable[[str], bool] = lambda key: False
        self.held: builtins.list[str] = []
        self.release = asyncio.Event()

    async def put(self, key: str, data: bytes | memoryview, *, if_none_match: bool = False) -> str:
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail(f"put {key}: refused by the test", operation="put", key=key)
        if self.hold(key):
            self.held.append(key)
            await self.release.wait()
        if if_none_match and key in self.objects:
            raise ObjectExists(f"put {key}: exists", operation="put", key=key)
        self.objects[key] = bytes(data)
        if self.hang(key):
            await asyncio.Event().wait()
        return hashlib.md5(self.objects[key]).hexdigest()

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        await asyncio.sleep(0)
        if key not in self.objects:
            raise ObjectMissing(f"get {key}: no such key", operation="get", key=key)
        return self.objects[key][start:end]

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        await asyncio.sleep(0)
        return [self._info(k) for k in sorted(self.objects) if k.startswith(prefix)]

    async def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.objects.pop(key, None)

    async def head(self, key: str) -> ObjectInfo | None:
        return self._info(key) if key in self.objects else None

    def close(self) -> None:
        pass

    def _info(self, key: str) -> ObjectInfo:
        data = self.objects[key]
        return ObjectInfo(key, len(data), hashlib.md5(data).hexdigest(), 0)

    def keys_under(self, directory: str) -> builtins.list[str]:
        prefix = f"{ROOT}g{GEN}/{directory}/"
        return sorted(k for k in self.objects if k.startswith(prefix))


async def memory_chain(store: MemoryStore) -> Chain:
    return Chain((await list_keys(store, ROOT)).get(GEN, []))


# --- a journal, a volume and uploaders -----------------------------------------------------------


@contextlib.asynccontextmanager
async def site(tmp: Path) -> AsyncIterator[JournalWritePath]:
    volume = Volume.open(tmp / "vol.img", size=VOLUME)
    journal = Journal.open(
        tmp / "vol.journal",
        volume=volume,
        journal_size=4 * MiB,
        consumers=[CONSUMER],
        dirty_dir=tmp,
        volume_name="vol",
    )
    wp = JournalWritePath(journal, volume, asyncio.get_running_loop())
    wp.start()
    try:
        yield wp
    finally:
        await wp.close()
        volume.close()


def make_uploader(
    wp: JournalWritePath, store: MemoryStore, *, writer: str | None = None
) -> ArchiveUploader:
    return ArchiveUploader(
        config=CONFIG,
        unit_name="unit-a",
        volume_name="vol",
        write_path=wp,
        store=store,
        root=ROOT,
        generation=lambda: GEN,
        writer=wp.journal.journal_id if writer is None else writer,
        volume_id=lambda: VOLUME_ID,
    )


@contextlib.asynccontextmanager
async def running(up: ArchiveUploader) -> AsyncIterator[ArchiveUploader]:
    up.start()
    try:
        yield up
    finally:
        await up.stop()


def newest(wp: JournalWritePath) -> int:
    return wp.journal.next_seq - 1


async def first_base(up: ArchiveUploader) -> fmt.ManifestKey:
    """Wait for the uploader's first base; it is the chain's only one."""
    await until(lambda: up.stats.bases == 1, "the first base")
    (manifest,) = [k for k in up.keys if isinstance(k, fmt.ManifestKey)]
    return manifest


async def writes(wp: JournalWritePath, count: int, *, tag: int) -> list[tuple[int, bytes]]:
    done = []
    for i in range(count):
        offset, data = (i * 3 % 2048) * 4096, bytes([tag, i]) * 2048
        await write(wp, offset, data)
        done.append((offset, data))
    return done


def written(store: MemoryStore, after: int) -> list[tuple[int, bytes]]:
    """The writes the stored segments hold after record ``after``, checking on the way that
    they hold every record from ``after + 1`` once, in order."""
    seqs: list[int] = []
    out: list[tuple[int, bytes]] = []
    for key in store.keys_under("seg"):
        segment = fmt.decode_segment(store.objects[key])
        for rec in segment.records:
            if rec.seq <= after:
                continue
            seqs.append(rec.seq)
            if rec.kind == Kind.WRITE:
                out.append((rec.offset, b"".join(bytes(part) for part in rec.data)))
    assert seqs == list(range(after + 1, after + 1 + len(seqs)))
    return out


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploader_module, "BACKOFF_MIN", 0.02)
    monkeypatch.setattr(uploader_module, "BACKOFF_MAX", 0.05)


# --- tests ----------------------------------------------------------------------------------------


def test_first_run_claims_makes_a_base_then_segments(tmp_path: Path) -> None:
    async def body() -> None:
        store = MemoryStore()
        async with site(tmp_path) as wp:
            # Written before the archive exists: only the base can hold them.
            await write(wp, 0, b"\x11" * 4096)
            await write(wp, 5 * MiB, b"\x22" * 8192)
            async with running(make_uploader(wp, store)) as up:
                base = await first_base(up)
                claim = fmt.decode_claim(store.objects[f"{ROOT}g{GEN}/claim"])
                assert (claim.unit, claim.writer, claim.generation) == (
                    "unit-a",
                    wp.journal.journal_id,
                    GEN,
                )
                root = fmt.decode_volume_claim(store.objects[ROOT + fmt.VOLUME_CLAIM_KEY])
                assert root.volume_id == VOLUME_ID
                manifest = fmt.decode_manifest(store.objects[ROOT + base.key])
                assert manifest.start_seq == base.start and manifest.end_seq == base.end
                assert manifest.objects and all(ROOT + o in store.objects for o in manifest.objects)
                assert store.keys_under("data") == sorted(ROOT + o for o in manifest.objects)
                consumer = wp.journal.consumers[CONSUMER]
                await until(consumer.dirty.is_clean, "the base covering the map")
                assert consumer.mode == ConsumerMode.JOURNAL
                assert up.stats.state is ArchiveState.ARCHIVING

                expected = await writes(wp, 20, tag=1)
                await until(lambda: up.stats.last_seq == newest(wp), "the segments")
                assert written(store, base.start) == expected
                assert consumer.acked_seq == newest(wp)
                chain = await memory_chain(store)
                assert chain.gaps == [] and chain.overlaps == []
                assert chain.is_restorable(newest(wp))

    run(body)


def test_records_are_acknowledged_only_once_stored(tmp_path: Path) -> None:
    async def body() -> None:
        store = MemoryStore()
        async with site(tmp_path) as wp, running(make_uploader(wp, store)) as up:
            base = await first_base(up)
            consumer = wp.journal.consumers[CONSUMER]
            acked = consumer.acked_seq
            store.hold = lambda key: key.endswith(".seg")
            await writes(wp, 5, tag=2)
            await until(lambda: store.held, "a segment's put")
            await asyncio.sleep(0.1)
            assert consumer.acked_seq == acked == base.start
            assert store.keys_under("seg") == []
            assert wp.journal.backlog(consumer)[1] == newest(wp) - acked
            store.release.set()
            await until(lambda: consumer.acked_seq == newest(wp), "the acknowledgement")
            (key,) = store.keys_under("seg")
            assert fmt.decode_segment(store.objects[key]).last == newest(wp)

    run(body)


def test_a_second_writer_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        store = MemoryStore()
        async with site(tmp_path) as wp:
            async with running(make_uploader(wp, store)) as up:
                await first_base(up)
            before = dict(store.objects)
            acked = wp.journal.consumers[CONSUMER].acked_seq
            # Another journal of the same unit name (a copied state directory, say).
            async with running(make_uploader(wp, store, writer="another-journal")) as other:
                await until(lambda: other.stats.state is ArchiveState.REFUSED, "the refusal")
                await writes(wp, 3, tag=3)
                await asyncio.sleep(0.2)
                assert "already archives" in other.stats.reason
                assert other.stats.state is ArchiveState.REFUSED
            assert store.objects == before
            assert wp.journal.consumers[CONSUMER].acked_seq == acked

    run(body)


@pytest.mark.parametrize(
    "failure, why", [(StoreDenied, "refuses writes"), (StoreUnavailable, "cannot be reached")]
)
def test_a_store_away_stalls_then_continues_without_a_gap(
    tmp_path: Path, failure: type[ArchiveStoreError], why: str
) -> None:
    async def body() -> None:
        store = MemoryStore()
        async with site(tmp_path) as wp, running(make_uploader(wp, store)) as up:
            base = await first_base(up)
            first = await writes(wp, 4, tag=4)
            await until(lambda: up.stats.last_seq == newest(wp), "the first segment")
            consumer = wp.journal.consumers[CONSUMER]
            acked = consumer.acked_seq
            store.fail = failure
            during = await writes(wp, 6, tag=5)
            await until(lambda: up.stats.state is ArchiveState.STALLED, "the stall")
            assert why in up.stats.reason and up.stats.errors >= 1
            await asyncio.sleep(0.2)  # retries, all refused
            assert consumer.acked_seq == acked
            assert consumer.mode == ConsumerMode.JOURNAL  # the journal holds the records
            assert wp.journal.backlog(consumer)[1] == newest(wp) - acked
            store.fail = None
            after = await writes(wp, 3, tag=6)
            await until(lambda: up.stats.last_seq == newest(wp), "the segments after the heal")
            await until(lambda: up.stats.state is ArchiveState.ARCHIVING, "archiving again")
            assert consumer.acked_seq == newest(wp)
            assert written(store, base.start) == first + during + after
            chain = await memory_chain(store)
            assert chain.gaps == [] and chain.overlaps == [] and up.stats.gaps == []

    run(body)


def test_a_restart_continues_after_a_segment_stored_but_not_acknowledged(tmp_path: Path) -> None:
    async def body() -> None:
        store = MemoryStore()
        async with site(tmp_path) as wp:
            consumer = wp.journal.consumers[CONSUMER]
            async with running(make_uploader(wp, store)) as up:
                base = await first_base(up)
                first = await writes(wp, 4, tag=7)
                await until(lambda: up.stats.last_seq == newest(wp), "the first segment")
                acked = consumer.acked_seq
                # The next segment is stored, but its answer never comes: the unit dies.
                store.hang = lambda key: key.endswith(".seg")
                lost = await writes(wp, 5, tag=8)
                await until(lambda: len(store.keys_under("seg")) == 2, "the stored segment")
            store.hang = lambda key: False
            assert consumer.acked_seq == acked < newest(wp)
            stored = fmt.decode_segment(store.objects[store.keys_under("seg")[-1]])
            assert stored.last == newest(wp)
            later = await writes(wp, 3, tag=9)
            async with running(make_uploader(wp, store)) as again:
                await until(lambda: again.stats.last_seq == newest(wp), "the segments")
                assert consumer.acked_seq == newest(wp)
            chain = await memory_chain(store)
            assert chain.overlaps == [] and chain.gaps == []
            assert [s.first for s in chain.segments][2] == stored.last + 1
            assert written(store, base.start) == first + lost + later

    run(body)


def test_a_restart_does_not_start_a_base_before_base_interval(tmp_path: Path) -> None:
    async def body() -> None:
        store = MemoryStore()
        async with site(tmp_path) as wp:
            async with running(make_uploader(wp, store)) as up:
                await first_base(up)
            await writes(wp, 2, tag=10)
            async with running(make_uploader(wp, store)) as again:
                await until(lambda: again.stats.last_seq == newest(wp), "the segments")
                await asyncio.sleep(0.3)
                assert len(store.keys_under("base")) == 1

    run(body)
