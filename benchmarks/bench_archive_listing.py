"""What a listing costs the archive (issue 14, the scale note of docs/archive.md).

A consumer lists its own generation's prefix at start and once per retention pass; `archive
list`, `restore` and `verify` list a volume's root. This puts N small segment keys (default
20 000, a volume's segments of about two days at the default 10 s) under one volume root of a
real SeaweedFS (`weed mini` on 127.0.0.1), with 4 other volumes' keys beside them in the same
bucket, then times, in the same run:

- a plain ListObjectsV2 of the root by boto3 (the baseline: the store's own cost),
- `Catalog.load` of that root: the same listing through the archive's client plus parsing
  every key and building the chain (gaps, restorable ranges).

Prints keys per second for both and their ratio. Run from the repository root:
``.venv/bin/python benchmarks/bench_archive_listing.py``. Never fails on a threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.seaweed import running_seaweed

from blockmirror.archive import objects as fmt
from blockmirror.archive.catalog import Catalog
from blockmirror.archive.s3 import Credentials, S3Store

BUCKET = "listing"
GEN = "ab" * 16


def fill(weed_client: object, root: str, count: int) -> None:
    """``count`` consecutive segment keys (tiny bodies) under ``root``, 16 puts at a time."""
    client = weed_client

    def put(n: int) -> None:
        key = fmt.SegmentKey(GEN, 10 * n + 1, 10 * n + 10, 1_000_000 + n).key
        client.put_object(Bucket=BUCKET, Key=root + key, Body=b"x")  # type: ignore[attr-defined]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(count)))
    claim = fmt.Claim("vol", GEN, "bench", "w", 1)
    client.put_object(  # type: ignore[attr-defined]
        Bucket=BUCKET, Key=root + fmt.ClaimKey(GEN).key, Body=fmt.encode_claim(claim)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(dir="/var/tmp") as tmp,
        running_seaweed(Path(tmp) / "s3", bucket=BUCKET) as weed,
    ):
        client = weed.client()
        print(f"putting {args.keys} keys under vol0/ and {args.keys // 10} under each of 4 more")
        fill(client, "vol0/", args.keys)
        for v in range(1, 5):
            fill(client, f"vol{v}/", args.keys // 10)
        store = S3Store(
            bucket=BUCKET,
            endpoint=weed.endpoint,
            credentials=Credentials("TESTKEY", "testsecret"),
        )
        try:
            plain: list[float] = []
            ours: list[float] = []
            for _ in range(args.repeat):
                began = time.perf_counter()
                found = 0
                pages = client.get_paginator("list_objects_v2").paginate(
                    Bucket=BUCKET, Prefix="vol0/"
                )
                for page in pages:
                    found += len(page.get("Contents", []))
                plain.append(time.perf_counter() - began)
                began = time.perf_counter()
                catalog = asyncio.run(Catalog.load(store, "vol0/"))
                ours.append(time.perf_counter() - began)
                chain = catalog.chains[GEN]
                assert len(chain.segments) == args.keys and found == args.keys + 1
        finally:
            store.close()
    best_plain, best_ours = min(plain), min(ours)
    print(f"{'listing of one volume root':40} {'seconds':>8} {'keys/s':>10}")
    print(f"{'boto3 ListObjectsV2 (baseline)':40} {best_plain:8.2f} {args.keys / best_plain:10.0f}")
    print(
        f"{'Catalog.load (list, parse, chain)':40} {best_ours:8.2f} {args.keys / best_ours:10.0f}"
    )
    print(f"ratio (ours / baseline time): {best_ours / best_plain:.2f}")


if __name__ == "__main__":
    main()
