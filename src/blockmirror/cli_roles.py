"""The command line's role changes: ``promote``, ``demote`` and ``resolve``.

Each is an admin API action (``POST /api/volumes/VOLUME/promote`` and so on, see
:mod:`blockmirror.admin.controls`) with the same ``--admin`` / ``--config`` / ``--token-file``
options as the other controls; :mod:`blockmirror.cli` hands in how to reach the unit.
"""

from __future__ import annotations

import argparse
import math
import urllib.parse
from collections.abc import Callable
from typing import Any

__all__ = ["add_role_commands"]

EXIT_FAILURE = 1
RunControl = Callable[..., "dict[str, Any] | None"]


def _path(volume: str, action: str) -> str:
    return f"/api/volumes/{urllib.parse.quote(volume, safe='')}/{action}"


def _promote(run_control: RunControl) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        params: dict[str, str | int] = {"force": 1} if args.force else {}
        if args.apply_delayed or args.discard_delayed:
            params["delayed"] = "apply" if args.apply_delayed else "discard"
        reply = run_control(args, _path(args.volume, "promote"), params)
        if reply is None:
            return EXIT_FAILURE
        rolled = reply.get("rolled_back_to")
        if rolled:
            print(
                f"volume {args.volume}: a resync was cut short; the replica was brought back to "
                f"its consistent point, seq {rolled.get('seq')}"
            )
        print(
            f"volume {args.volume}: primary now; generation {reply.get('generation')} begins at "
            f"seq {reply.get('start_seq')}{' (forced)' if args.force else ''}"
        )
        return 0

    return command


def _demote(run_control: RunControl) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        reply = run_control(
            args,
            _path(args.volume, "demote"),
            {"timeout": math.ceil(args.timeout)},
            timeout=args.timeout + 15,
        )
        if reply is None:
            return EXIT_FAILURE
        behind = reply.get("behind") or {}
        if behind:
            shown = ", ".join(f"{name} at seq {seq}" for name, seq in behind.items())
            print(
                f"volume {args.volume}: demoted (host writes refused), newest seq "
                f"{reply.get('newest_seq')}; NOT every peer has it: {shown}"
            )
            return EXIT_FAILURE
        print(
            f"volume {args.volume}: demoted (host writes refused); every peer holds every "
            f"record up to seq {reply.get('newest_seq')}"
        )
        return 0

    return command


def _resolve(run_control: RunControl) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        params = {"discard_local": 1} if args.discard_local else None
        reply = run_control(args, _path(args.volume, "resolve"), params)
        if reply is None:
            return EXIT_FAILURE
        print(
            f"volume {args.volume}: writes since seq {reply.get('common_seq')} given up "
            f"({reply.get('discarded_bytes')} bytes of regions); it follows {reply.get('peer')}, "
            "which copies those regions back with its own"
        )
        return 0

    return command


def add_role_commands(
    sub: Any,
    *,
    admin_arguments: Callable[[argparse.ArgumentParser], None],
    run_control: RunControl,
) -> None:
    """Add ``promote``, ``demote`` and ``resolve`` to the ``blockmirror`` subcommands."""
    promote = sub.add_parser(
        "promote", help="make a secondary volume primary (it starts a new generation)"
    )
    promote.add_argument("volume")
    promote.add_argument(
        "--force",
        action="store_true",
        help="promote although the replica is not consistent or a source is connected",
    )
    delayed = promote.add_mutually_exclusive_group()
    delayed.add_argument(
        "--apply-delayed",
        action="store_true",
        help="with replay_delay: apply the records still held back, then promote",
    )
    delayed.add_argument(
        "--discard-delayed",
        action="store_true",
        help="with replay_delay: give up the records held back; serve the replica as it is",
    )
    admin_arguments(promote)
    promote.set_defaults(func=_promote(run_control))

    demote = sub.add_parser(
        "demote", help="stop host writes on a primary volume, drain its peers, make it follow"
    )
    demote.add_argument("volume")
    demote.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for every peer to take every record (default 60)",
    )
    admin_arguments(demote)
    demote.set_defaults(func=_demote(run_control))

    resolve = sub.add_parser(
        "resolve", help="end a split brain on the unit that gives up its writes"
    )
    resolve.add_argument("volume")
    resolve.add_argument(
        "--discard-local",
        action="store_true",
        help="give up this unit's writes since the common point and follow the other unit",
    )
    admin_arguments(resolve)
    resolve.set_defaults(func=_resolve(run_control))
