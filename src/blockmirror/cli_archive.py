"""The command line's archive commands (docs/archive.md, docs/operations.md "Archives").

``archive status [VOLUME]`` asks a running unit (admin API). ``archive list``, ``restore`` and
``verify`` need no unit: only the archive's URL and credentials (``--endpoint``,
``--credentials-file``, or the standard ``AWS_*`` environment variables), so they run on any
machine after a site is lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockmirror.admin.history_controls import parse_time
from blockmirror.archive.audit import verify
from blockmirror.archive.catalog import Catalog, Target
from blockmirror.archive.chain import NotRestorable
from blockmirror.archive.restore_image import RestoreError, restore
from blockmirror.archive.s3 import S3Store, load_credentials, parse_url
from blockmirror.errors import ArchiveError
from blockmirror.units import human_size

__all__ = ["add_archive_commands"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
FetchStatus = Callable[[argparse.Namespace], "dict[str, Any] | None"]


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("volume")
    parser.add_argument("--url", required=True, help="the archive: s3://BUCKET/PREFIX")
    parser.add_argument(
        "--endpoint",
        default=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        help="the store's URL, for stores other than AWS (default: $AWS_ENDPOINT_URL)",
    )
    parser.add_argument(
        "--region", default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    )
    parser.add_argument(
        "--credentials-file",
        type=Path,
        help="AWS shared credentials ([default] aws_access_key_id, aws_secret_access_key); "
        "default: the AWS_* environment variables",
    )


def _open(args: argparse.Namespace) -> tuple[S3Store, str]:
    url = parse_url(args.url)
    store = S3Store(
        bucket=url.bucket,
        endpoint=args.endpoint,
        region=args.region or "us-east-1",
        credentials=load_credentials(args.credentials_file),
    )
    root = "/".join(p for p in (url.prefix, args.volume) if p) + "/"
    return store, root


def _offline(command: Callable[[argparse.Namespace, S3Store, str], Any]) -> Callable[..., int]:
    def run(args: argparse.Namespace) -> int:
        try:
            store, root = _open(args)
        except ArchiveError as exc:
            print(f"blockmirror: {exc}", file=sys.stderr)
            return EXIT_USAGE
        try:
            return int(asyncio.run(command(args, store, root)))
        except (ArchiveError, OSError) as exc:
            print(f"blockmirror: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        finally:
            store.close()

    return run


async def _list(args: argparse.Namespace, store: S3Store, root: str) -> int:
    catalog = await Catalog.load(store, root)
    doc = catalog.describe()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    if not doc["generations"]:
        print(f"{args.url}: nothing archived for volume {args.volume}")
        return EXIT_FAILURE
    print(f"{args.url} volume {args.volume}: {doc['objects']} objects, {human_size(doc['bytes'])}")
    for gen in doc["generations"]:
        print(f"generation {gen['generation']} (unit {gen['unit']}, since {gen['claimed']})")
        for base in gen["bases"]:
            print(f"  base      seq {base['start']}..{base['end']}  {base['time']}")
        print(
            f"  segments  {gen['segments']}: seq {gen['first_seq']}..{gen['last_seq']}"
            f"  newest {gen['last_time']}"
        )
        ranges = ", ".join(f"{lo}..{hi}" for lo, hi in gen["restorable"]) or "none"
        print(f"  restorable seq {ranges}")
        for lo, hi in gen["gaps"]:
            print(f"  GAP       records {lo + 1}..{hi - 1} are not archived")
        for a, b in gen["overlaps"]:
            print(f"  OVERLAP   segments overlap at {a}..{b}")
        for mark in gen["bookmarks"]:
            print(f"  bookmark  {mark['name']}  seq {mark['seq']}  {mark['time']}")
    for stray in doc["strays"]:
        print(f"  (not ours: {stray})")
    return 0


def _target(args: argparse.Namespace) -> Target:
    if args.seq is not None:
        return Target(seq=args.seq, generation=args.generation)
    if args.bookmark is not None:
        return Target(bookmark=args.bookmark, generation=args.generation)
    try:
        return Target(time_ns=parse_time(args.at), generation=args.generation)
    except ValueError as exc:
        raise RestoreError(str(exc)) from None


async def _restore(args: argparse.Namespace, store: S3Store, root: str) -> int:
    target = _target(args)
    if args.to.exists():
        print(f"blockmirror: {args.to} exists; restore writes a new file", file=sys.stderr)
        return EXIT_FAILURE
    quiet = args.quiet

    def say(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    try:
        result = await restore(store, root, target, args.to, parallel=args.parallel, progress=say)
    except NotRestorable as exc:
        print(f"blockmirror: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    doc = {
        "seq": result.seq,
        "generation": result.generation,
        "base_end": result.base_end,
        "records": result.records,
        "bytes_downloaded": result.bytes_downloaded,
        "seconds": round(result.seconds, 3),
        "image_bytes": result.image_bytes,
        "path": str(args.to),
    }
    print(json.dumps(doc) if args.json else f"restored seq {result.seq} to {args.to}")
    return 0


async def _verify(args: argparse.Namespace, store: S3Store, root: str) -> int:
    report = await verify(store, root, parallel=args.parallel)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{args.url} volume {args.volume}: {report['objects_checked']} objects checked, "
            f"{len(report['problems'])} problems"
        )
        for problem in report["problems"]:
            print(f"  {problem}")
    return 0 if not report["problems"] else EXIT_FAILURE


def _status(fetch_status: FetchStatus) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        status = fetch_status(args)
        if status is None:
            return EXIT_FAILURE
        rows = [
            (v["name"], a)
            for v in status.get("volumes", [])
            for a in v.get("archives") or []
            if args.volume is None or v["name"] == args.volume
        ]
        if args.json:
            print(json.dumps([{"volume": n, **a} for n, a in rows], indent=2))
            return 0
        for archive in status.get("archives") or []:
            if archive.get("problem"):
                print(f"archive {archive['name']}: NOT USED: {archive['problem']}")
        if not rows:
            print("no archive uploads " + (f"volume {args.volume}" if args.volume else "here"))
            return EXIT_FAILURE if args.volume else 0
        for name, a in rows:
            reason = f" ({a['reason']})" if a.get("reason") else ""
            print(
                f"{name} -> {a['archive']} {a['url']}: {a['state']}{reason}; last seq "
                f"{a['last_seq']}, lag {a['lag_seconds']:g} s, "
                f"{human_size(int(a['bytes_uploaded']))} in {a['objects']} objects, "
                f"{a['errors']} errors"
            )
            for lo, hi in a.get("gaps") or []:
                print(f"  GAP: records {lo + 1}..{hi - 1} are not archived")
        return 0

    return command


def add_archive_commands(
    sub: Any,
    *,
    admin_arguments: Callable[[argparse.ArgumentParser], None],
    fetch_status: FetchStatus,
) -> None:
    """Add ``archive status|list|restore|verify`` to the ``blockmirror`` subcommands."""
    archive = sub.add_parser("archive", help="a volume's history on S3-compatible storage")
    asub = archive.add_subparsers(dest="archive_command", required=True)

    status = asub.add_parser("status", help="the archives of a running unit")
    status.add_argument("volume", nargs="?")
    status.add_argument("--json", action="store_true")
    admin_arguments(status)
    status.set_defaults(func=_status(fetch_status))

    listing = asub.add_parser("list", help="bases, segments, restorable range, bookmarks")
    _store_arguments(listing)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_offline(_list))

    rest = asub.add_parser("restore", help="write the volume at a point to a new file")
    _store_arguments(rest)
    which = rest.add_mutually_exclusive_group(required=True)
    which.add_argument("--at", help="a time: ISO 8601 (UTC unless it says) or relative, like -15m")
    which.add_argument("--seq", type=int, help="the state right after record N")
    which.add_argument("--bookmark", help="a bookmark's name")
    rest.add_argument("--to", type=Path, required=True, help="the new image file")
    rest.add_argument("--generation", help="only this generation (an id or its prefix)")
    rest.add_argument("--parallel", type=int, default=8, help="downloads at once (default 8)")
    rest.add_argument("--json", action="store_true", help="print the result as JSON")
    rest.add_argument("--quiet", action="store_true", help="no progress lines")
    rest.set_defaults(func=_offline(_restore))

    check = asub.add_parser("verify", help="check every object's checksum and the chain")
    _store_arguments(check)
    check.add_argument("--parallel", type=int, default=8)
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=_offline(_verify))
