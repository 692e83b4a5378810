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


def _restore(run_control: RunControl) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        params: dict[str, str | int] = {"to": os.path.abspath(args.to)}
        if args.seq is not None:
            params["seq"] = args.seq
        elif args.at is not None:
            params["at"] = args.at
        else:
            params["bookmark"] = args.bookmark
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
