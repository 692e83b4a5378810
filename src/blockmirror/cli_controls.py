"""The command line's journal and consumer controls: ``journal pause|resume`` and
``consumer pause|resume|discard``, each an admin API control (:mod:`blockmirror.admin.controls`);
:mod:`blockmirror.cli` hands in how to reach the unit."""

from __future__ import annotations

import argparse
import urllib.parse
from collections.abc import Callable
from typing import Any

from blockmirror.units import human_size

__all__ = ["ControlCommands", "consumer_summary"]

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
