"""The S3 client of the archive against a real S3 server (SeaweedFS ``weed mini`` on 127.0.0.1).

What must hold: what is put is got back byte for byte, whole and by range, small or in parts; a
listing has every key across pages; a conditional put never replaces an object; a read-only key
and a wrong secret are refused with errors that say so and change nothing; a stopped server is
StoreUnavailable (not a hang), and the same store works again once it is back. Nothing here
measures time.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blockmirror.archive.s3 import (
    ArchiveStoreError,
    ObjectExists,
    ObjectMissing,
    ObjectStore,
    S3Store,
    StoreDenied,
    StoreUnavailable,
    load_credentials,
)
from tests.support.seaweed import Seaweed, running_seaweed, seaweed_fixture

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
BUCKET = "archive"
_T = TypeVar("_T")

seaweed = seaweed_fixture(scope="module", bucket=BUCKET)


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


def open_store(weed: Seaweed, identity: str = "test", **kwargs: Any) -> S3Store:
    return S3Store(
        BUCKET,
        load_credentials(weed.credentials_file(identity)),
        endpoint=weed.endpoint,
        **kwargs,
    )


@pytest.fixture
def store(seaweed: Seaweed) -> Iterator[S3Store]:
    s = open_store(seaweed)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own, so tests sharing the server do not see each other."""
    return f"{request.node.name}/"


def test_put_get_ranges_head(store: S3Store, prefix: str) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    _: ObjectStore = store  # mypy checks that S3Store keeps the protocol

    async def main() -> None:
        etag = await store.put(prefix + "obj", data)
        assert etag and not etag.startswith('"')
        assert await store.get(prefix + "obj") == data
        assert await store.get(prefix + "obj", start=100, end=300) == data[100:300]
        assert await store.get(prefix + "obj", start=10000) == data[10000:]
        assert await store.get(prefix + "obj", end=16) == data[:16]
        assert await store.get(prefix + "obj", start=5, end=5) == b""
        # A range past the end is cut short, as S3 does.
        assert await store.get(prefix + "obj", start=10200, end=20000) == data[10200:]
        info = await store.head(prefix + "obj")
        assert info is not None
        assert (info.key, info.size, info.etag) == (prefix + "obj", len(data), etag)
        assert info.last_modified_ns > 0
        assert await store.head(prefix + "nothing") is None
        with pytest.raises(ObjectMissing, match="NoSuchKey"):
            await store.get(prefix + "nothing")
        # A memoryview of any item format is stored as its bytes; an empty object is an object.
        await store.put(prefix + "view", memoryview(data).cast("I"))
        assert await store.get(prefix + "view") == data
        await store.put(prefix + "empty", b"")
        assert await store.get(prefix + "empty") == b""

    run(main())
    assert store.objects_uploaded == 3
    assert store.bytes_uploaded == 2 * len(data)
    assert store.errors == 0  # a missing key is an answer, not a failure
    assert store.requests >= 12


def test_list_all_pages_and_delete(seaweed: Seaweed, store: S3Store, prefix: str) -> None:
    keys = [f"{prefix}k/{n:05d}" for n in range(1100)]

    async def main() -> None:
        gate = asyncio.Semaphore(32)

        async def put(key: str) -> None:
            async with gate:
                await store.put(key, key.encode())

        await asyncio.gather(*(put(k) for k in keys))
        await store.put(prefix + "other", b"x")
        # 1100 keys: two pages of S3's 1000.
        listed = await store.list(prefix + "k/")
        assert [i.key for i in listed] == keys
        assert all(i.size == len(i.key) for i in listed)
        # A page size of 7: many pages, the same listing.
        small = open_store(seaweed, list_page_size=7)
        try:
            assert [i.key for i in await small.list(prefix + "k/000")] == keys[:100]
        finally:
            small.close()
        await store.delete(keys)  # two DeleteObjects calls
        assert await store.list(prefix + "k/") == []
        assert [i.key for i in await store.list(prefix)] == [prefix + "other"]
        await store.delete([prefix + "gone-already", prefix + "other"])
        assert await store.list(prefix) == []
        await store.delete([])

    run(main())


def test_multipart_put_reads_back_equal(seaweed: Seaweed, prefix: str) -> None:
    data = os.urandom(40 * MiB)
    store = open_store(seaweed, multipart_threshold=8 * MiB, part_size=8 * MiB)
    try:

        async def main() -> None:
            etag = await store.put(prefix + "big", memoryview(data))
            assert etag.endswith("-5")  # five parts
            got = await store.get(prefix + "big")
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            tail = await store.get(prefix + "big", start=40 * MiB - 1000)
            assert tail == data[-1000:]

        run(main())
        assert store.objects_uploaded == 1
        assert store.bytes_uploaded == len(data)
        assert store.requests == 1 + 5 + 1 + 2  # create, parts, complete; two gets
    finally:
        store.close()
    assert open_uploads(seaweed, prefix) == []


def open_uploads(weed: Seaweed, prefix: str) -> list[str]:
    s3 = weed.client()
    try:
        uploads = s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])
        return [str(u["Key"]) for u in uploads]
    finally:
        s3.close()


def test_failed_multipart_put_is_aborted(seaweed: Seaweed, prefix: str) -> None:
    data = os.urandom(24 * MiB)
    store = open_store(seaweed, multipart_threshold=5 * MiB, part_size=5 * MiB)
    real = store._client.upload_part
    calls = 0

    def flaky(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if kwargs["PartNumber"] == 3:
            # Sent to a key of the wrong upload, so the server itself refuses the part.
            kwargs["UploadId"] = "no-such-upload"
        return real(**kwargs)

    store._client.upload_part = flaky
    try:
        with pytest.raises(ArchiveStoreError, match="upload_part"):
            run(store.put(prefix + "big", data))
        assert store.objects_uploaded == 0
    finally:
        store.close()
    assert open_uploads(seaweed, prefix) == []
    assert run(_head(seaweed, prefix + "big")) is None


async def _head(weed: Seaweed, key: str) -> Any:
    store = open_store(weed)
    try:
        return await store.head(key)
    finally:
        store.close()


def test_conditional_put_never_replaces(store: S3Store, prefix: str) -> None:
    async def main() -> None:
        await store.put(prefix + "claim", b"first", if_none_match=True)
        with pytest.raises(ObjectExists, match="claim"):
            await store.put(prefix + "claim", b"second", if_none_match=True)
        assert await store.get(prefix + "claim") == b"first"
        # Unconditional: replaced.
        await store.put(prefix + "claim", b"third")
        assert await store.get(prefix + "claim") == b"third"

    run(main())


def test_conditional_multipart_put_never_replaces(seaweed: Seaweed, prefix: str) -> None:
    data = os.urandom(12 * MiB)
    store = open_store(seaweed, multipart_threshold=5 * MiB, part_size=5 * MiB)
    try:

        async def main() -> None:
            await store.put(prefix + "big", b"small first", if_none_match=True)
            with pytest.raises(ObjectExists):
                await store.put(prefix + "big", data, if_none_match=True)
            assert await store.get(prefix + "big") == b"small first"

        run(main())
    finally:
        store.close()
    assert open_uploads(seaweed, prefix) == []


def test_read_only_key_is_denied(seaweed: Seaweed, store: S3Store, prefix: str) -> None:
    reader = open_store(seaweed, "reader")
    try:

        async def main() -> None:
            await store.put(prefix + "obj", b"kept")
            with pytest.raises(StoreDenied, match="AccessDenied") as denied:
                await reader.put(prefix + "obj", b"replaced")
            assert denied.value.code == "AccessDenied"
            assert denied.value.operation == "put_object"
            assert denied.value.key == prefix + "obj"
            assert reader.errors == 1
            with pytest.raises(StoreDenied):
                await reader.delete([prefix + "obj"])
            # Reading and listing are allowed.
            assert await reader.get(prefix + "obj") == b"kept"
            assert [i.key for i in await reader.list(prefix)] == [prefix + "obj"]

        run(main())
    finally:
        reader.close()


def test_wrong_secret_is_refused(seaweed: Seaweed, prefix: str) -> None:
    path = seaweed.credentials_file("test", secret="not-the-secret")
    store = S3Store(BUCKET, load_credentials(path), endpoint=seaweed.endpoint)
    try:
        with pytest.raises(ArchiveStoreError, match="SignatureDoesNotMatch") as refused:
            run(store.put(prefix + "obj", b"data"))
        assert refused.value.code == "SignatureDoesNotMatch"
        assert "not-the-secret" not in str(refused.value)
    finally:
        store.close()
    assert run(_head(seaweed, prefix + "obj")) is None


def test_missing_bucket_is_named(seaweed: Seaweed) -> None:
    store = S3Store(
        "no-such-bucket", load_credentials(seaweed.credentials_file()), endpoint=seaweed.endpoint
    )
    try:

        async def main() -> None:
            with pytest.raises(ArchiveStoreError, match="bucket 'no-such-bucket' does not exist"):
                await store.list("")
            await store.ensure_bucket()
            await store.ensure_bucket()  # there already: nothing to do
            assert await store.list("") == []

        run(main())
    finally:
        store.close()


def test_stopped_server_is_unavailable_then_back(tmp_path: Path) -> None:
    with running_seaweed(tmp_path / "s3", bucket=BUCKET) as weed:
        store = open_store(weed, connect_timeout=1, read_timeout=5, max_attempts=2)
        try:
            run(store.put("before", b"1"))
            weed.stop()
            with pytest.raises(StoreUnavailable, match="put_object") as down:
                run(store.put("during", b"2"))
            assert down.value.key == "during"
            with pytest.raises(StoreUnavailable):
                run(store.get("before"))
            weed.restart()
            run(store.put("after", b"3"))
            assert run(store.get("before")) == b"1"
            assert [i.key for i in run(store.list(""))] == ["after", "before"]
        finally:
            store.close()
