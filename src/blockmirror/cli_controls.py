"""The command line's journal and consumer controls: ``journal pause|resume`` and
``consumer pause|resume|discard``, each an admin API control (:mod:`blockmirror.admin.controls`);
:mod:`blockmirror.cli` hands in how to reach the unit."""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any

from blockmirror.units import format_rate, human_size

__all__ = ["ControlCommands", "add_link_commands", "consumer_summary"]

EXIT_FAILURE = 1
RunControl = Callable[..., "dict[str, Any] | None"]


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def consumer_summary(reply: dict[str, Any]) -> str:
    return (
        f"mode {reply.get('mode', '?')}, acked seq {reply.get('acked_seq', '?')}, "
        f"backlog {reply.get('backlog_records', '?')} records, "
        f"{human_size(int(reply.get('dirty_bytes') or 0))} dirty"
    )


class ControlCommands:
    """The commands, bound to the CLI's way of calling a control."""

    def __init__(self, run_control: RunControl) -> None:
        self.run_control = run_control

    def journal_pause(self, args: argparse.Namespace) -> int:
        action = "pause" if args.pause else "resume"
        reply = self.run_control(args, f"/api/volumes/{_quote(args.volume)}/journal/{action}")
        if reply is None:
            return EXIT_FAILURE
        again = "" if reply.get("changed", True) else " (it already was)"
        if args.pause:
            print(
                f"volume {args.volume}: journal enqueueing paused{again}; writes are served and "
                "recorded in every consumer's dirty map"
            )
        else:
            print(
                f"volume {args.volume}: journal enqueueing resumed{again} "
                f"(newest seq {reply.get('newest_seq', '?')})"
            )
        return 0

    def consumer_pause(self, args: argparse.Namespace) -> int:
        action = "pause" if args.pause else "resume"
        path = f"/api/volumes/{_quote(args.volume)}/consumers/{_quote(args.consumer)}/{action}"
        reply = self.run_control(args, path)
        if reply is None:
            return EXIT_FAILURE
        again = "" if reply.get("changed", True) else " (it already was)"
        done = "paused" if args.pause else "resumed"
        print(
            f"volume {args.volume}: consumer {args.consumer} {done}{again} "
            f"({consumer_summary(reply)})"
        )
        return 0

    def consumer_discard(self, args: argparse.Namespace) -> int:
        path = f"/api/volumes/{_quote(args.volume)}/consumers/{_quote(args.consumer)}/discard"
        reply = self.run_control(args, path, {"from": args.first, "to": args.last})
        if reply is None:
            return EXIT_FAILURE
        print(
            f"volume {args.volume}: consumer {args.consumer}: "
            f"{reply.get('discarded', '?')} records in seq {args.first}..{args.last} turned "
            f"into dirty bits ({consumer_summary(reply)})"
        )
        return 0


def add_link_commands(
    sub: Any,
    *,
    admin_arguments: Callable[[argparse.ArgumentParser], None],
    run_control: RunControl,
) -> None:
    """``blockmirror link set VOLUME PEER --bandwidth RATE``: change a live link."""
    link = sub.add_parser("link", help="change a live link's settings")
    lsub = link.add_subparsers(dest="link_command", required=True)
    change = lsub.add_parser(
        "set",
        help="change a link now, without a reconnect (until the next reload or restart, "
        "which apply the file's values)",
    )
    change.add_argument("volume")
    change.add_argument("peer", help="the peer's address, HOST:PORT, as in the volume's peers")
    change.add_argument("--bandwidth", help="a rate such as 10Mbit or 1544kbit, or none")
    change.add_argument("--compression", help="zstd or none")
    change.add_argument("--compression-level", help="zstd's level, 1..19")
    change.add_argument("--priority", help="normal, or background (yield to other traffic)")
    admin_arguments(change)

    def run(args: argparse.Namespace) -> int:
        values = {
            "bandwidth": args.bandwidth,
            "compression": args.compression,
            "compression_level": args.compression_level,
            "priority": args.priority,
        }
        given = {k: v for k, v in values.items() if v is not None}
        if not given:
            print(
                "blockmirror link set: give --bandwidth, --compression, --compression-level "
                "or --priority",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        path = f"/api/volumes/{_quote(args.volume)}/peers/{_quote(args.peer)}/link"
        reply = run_control(args, path, given)
        if reply is None:
            return EXIT_FAILURE
        limit = reply.get("rate_limit")
        shown = "none" if limit is None else format_rate(int(limit))
        print(
            f"volume {args.volume} -> {args.peer}: bandwidth limit {shown}, compression "
            f"{reply.get('compression')}, priority {reply.get('priority')} "
            f"({reply.get('priority_control')})"
        )
        return 0

    change.set_defaults(func=run)
