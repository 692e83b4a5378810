"""The command line's history commands: ``history``, ``bookmark`` and ``restore``.

Each is an admin API control (:mod:`blockmirror.admin.history_controls`) with the same
``--admin`` / ``--config`` / ``--token-file`` options as the other controls.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.parse
from collections.abc import Callable
from typing import Any

from blockmirror.units import human_size

__all__ = ["add_history_commands"]

EXIT_FAILURE = 1
RunControl = Callable[..., "dict[str, Any] | None"]
FetchStatus = Callable[[argparse.Namespace], "dict[str, Any] | None"]


def _path(volume: str, action: str) -> str:
    return f"/api/volumes/{urllib.parse.quote(volume, safe='')}/{action}"


def _point(doc: dict[str, Any] | None) -> str:
    if not doc:
        return "none"
    return f"seq {doc.get('seq')} at {doc.get('time') or 'an unknown time'}"


def _history(run_control: RunControl) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        reply = run_control(args, _path(args.volume, "history"))
        if reply is None:
            return EXIT_FAILURE
        if args.json:
            print(json.dumps(reply, indent=2))
            return 0
        if not reply.get("enabled"):
            print(f'volume {args.volume}: no history kept (history = "0")')
        else:
            print(
                f"volume {args.volume}: history {reply.get('retention_seconds'):g} s, "
                f"{human_size(int(reply.get('bytes') or 0))} of "
                f"{human_size(int(reply.get('size_cap') or 0))}"
            )
            print(f"  oldest point  {_point(reply.get('oldest'))}")
            print(f"  newest point  {_point(reply.get('newest'))}")
        if reply.get("failed"):
            print(f"  FAILED: {reply['failed']}")
        if reply.get("shortened"):
            print("  history_size is shortening history")
        if reply.get("resyncing"):
            print(f"  resync running; consistent point {_point(reply.get('consistent_point'))}")
        marks = reply.get("bookmark_list") or []
        for mark in marks:
            print(f"  bookmark {mark.get('name')}: {_point(mark)}")
        return 0

    return command


def _bookmark(run_control: RunControl) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        reply = run_control(args, _path(args.volume, "bookmark"), {"name": args.name})
        if reply is None:
            return EXIT_FAILURE
        print(f"volume {args.volume}: bookmark {args.name} at seq {reply.get('seq')}")
        return 0

    return command


def _point_query(args: argparse.Namespace) -> dict[str, str | int]:
    """The query parameter of ``--seq``, ``--at`` or ``--bookmark`` (exactly one is given)."""
    if args.seq is not None:
        return {"seq": args.seq}
    if args.at is not None:
        return {"at": args.at}
    return {"bookmark": args.bookmark}


def _restore(run_control: RunControl) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        params = _point_query(args) | {"to": os.path.abspath(args.to)}
        reply = run_control(args, _path(args.volume, "restore"), params, timeout=24 * 3600.0)
        if reply is None:
            return EXIT_FAILURE
        print(
            f"volume {args.volume}: {reply.get('to')} holds the volume at seq "
            f"{reply.get('seq')} ({reply.get('time') or 'time unknown'}); "
            f"{reply.get('undone')} before-images written back in {reply.get('seconds')} s"
        )
        return 0

    return command


def _drill(
    run_control: RunControl, fetch_status: FetchStatus
) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        if args.drill_action == "start":
            params = _point_query(args)
            if args.writable:
                params["writable"] = 1
            if args.name:
                params["name"] = args.name
            reply = run_control(args, _path(args.volume, "drill/start"), params)
            if reply is None:
                return EXIT_FAILURE
            kind = "writable (copy-on-write)" if reply.get("writable") else "read-only"
            print(reply.get("url"))
            print(
                f"drill {reply.get('name')} of {args.volume}: {kind}, seq {reply.get('seq')} "
                f"({reply.get('time') or 'time unknown'}), started in "
                f"{reply.get('start_seconds')} s; replication goes on"
            )
            return 0
        if args.drill_action == "stop":
            params = {"name": args.name} if args.name else {}
            reply = run_control(args, _path(args.volume, "drill/stop"), params)
            if reply is None:
                return EXIT_FAILURE
            stopped = reply.get("stopped") or []
            print(f"{args.volume}: stopped {', '.join(stopped) if stopped else 'no drill'}")
            return 0
        drills: list[dict[str, Any]] = []
        if args.volume is not None:
            reply = run_control(args, _path(args.volume, "drills"))
            if reply is None:
                return EXIT_FAILURE
            drills = [{"volume": args.volume, **d} for d in reply.get("drills") or []]
        else:
            status = fetch_status(args)
            if status is None:
                return EXIT_FAILURE
            for vol in status.get("volumes") or []:
                drills.extend({"volume": vol.get("name"), **d} for d in vol.get("drills") or [])
        if args.json:
            print(json.dumps(drills, indent=2))
            return 0
        if not drills:
            print("no drills")
        for d in drills:
            print(
                f"{d.get('volume')}  {d.get('name')}  {d.get('url')}  seq {d.get('seq')}  "
                f"{'writable' if d.get('writable') else 'read-only'}  "
                f"{d.get('connections')} connections  "
                f"{human_size(int(d.get('cow_bytes') or 0))} written"
            )
        return 0

    return command


EXIT_DIFFERS = 3


def _verify(run_control: RunControl) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        params: dict[str, str | int] = {}
        if args.peer:
            params["peer"] = args.peer
        if args.repair:
            params["repair"] = 1
        reply = run_control(args, _path(args.volume, "verify"), params, timeout=24 * 3600.0)
        if reply is None:
            return EXIT_FAILURE
        if args.json:
            print(json.dumps(reply, indent=2))
        differs = False
        for peer in reply.get("peers") or []:
            regions = peer.get("differing") or []
            differs = differs or bool(regions)
            if args.json:
                continue
            print(
                f"{args.volume} -> {peer.get('peer')}: {len(regions)} of {peer.get('regions')} "
                f"regions of {human_size(int(peer.get('region_size') or 0))} differ"
                + (" (marked for resync)" if peer.get("repaired") else "")
                + f", {peer.get('seconds')} s"
            )
            for region in regions:
                print(f"  differs: offset {region['offset']} length {region['length']}")
            for region in peer.get("unsettled") or []:
                print(f"  kept changing, not compared: offset {region['offset']}")
        return EXIT_DIFFERS if differs else 0

    return command


def add_point_arguments(parser: argparse.ArgumentParser) -> None:
    """``--at TIME | --seq N | --bookmark NAME``, exactly one."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--at", help="a time: ISO 8601 (UTC unless it says) or relative, like -15m")
    which.add_argument("--seq", type=int, help="the state right after record N")
    which.add_argument("--bookmark", help="a bookmark's name")


def add_history_commands(
    sub: Any,
    *,
    admin_arguments: Callable[[argparse.ArgumentParser], None],
    run_control: RunControl,
    fetch_status: FetchStatus,
) -> None:
    """Add ``history``, ``bookmark`` and ``restore`` to the ``blockmirror`` subcommands."""
    history = sub.add_parser("history", help="a volume's restorable points and bookmarks")
    history.add_argument("volume")
    history.add_argument("--json", action="store_true", help="print the admin API's JSON")
    admin_arguments(history)
    history.set_defaults(func=_history(run_control))

    bookmark = sub.add_parser(
        "bookmark", help="name the current point of a primary volume (reaches every replica)"
    )
    bookmark.add_argument("volume")
    bookmark.add_argument("name")
    admin_arguments(bookmark)
    bookmark.set_defaults(func=_bookmark(run_control))

    restore = sub.add_parser("restore", help="write a full image of a volume at a past point")
    restore.add_argument("volume")
    add_point_arguments(restore)
    restore.add_argument("--to", required=True, help="the new image file (on the unit's machine)")
    admin_arguments(restore)
    restore.set_defaults(func=_restore(run_control))

    verify = sub.add_parser(
        "verify", help="compare a volume with its peers' replicas, region by region"
    )
    verify.add_argument("volume")
    verify.add_argument("--peer", help="only this peer (its address as in peers)")
    verify.add_argument(
        "--repair", action="store_true", help="mark the regions that differ for resync"
    )
    verify.add_argument("--json", action="store_true")
    admin_arguments(verify)
    verify.set_defaults(func=_verify(run_control))

    drill = sub.add_parser("drill", help="serve a past point as an NBD export (a failover test)")
    actions = drill.add_subparsers(dest="drill_action", required=True, metavar="ACTION")
    start = actions.add_parser("start", help="start a drill; prints its nbd:// URL")
    start.add_argument("volume")
    add_point_arguments(start)
    start.add_argument(
        "--writable",
        action="store_true",
        help="take writes into a copy-on-write file (never into the volume or its replica)",
    )
    start.add_argument("--name", help="the drill's export name (default VOLUME-SEQ)")
    admin_arguments(start)
    listing = actions.add_parser("list", help="the drills of every volume (or of one)")
    listing.add_argument("volume", nargs="?")
    listing.add_argument("--json", action="store_true")
    admin_arguments(listing)
    stop = actions.add_parser("stop", help="stop a drill (or every drill of the volume)")
    stop.add_argument("volume")
    stop.add_argument("name", nargs="?")
    admin_arguments(stop)
    for parser in (start, listing, stop):
        parser.set_defaults(func=_drill(run_control, fetch_status))
