"""The ``blockmirror`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from blockmirror import COPYRIGHT, __version__
from blockmirror.admin.table import format_status_table, human_size
from blockmirror.allocator import tune_malloc
from blockmirror.config import Config, load_config, parse_address
from blockmirror.errors import BlockmirrorError, ConfigError
from blockmirror.units import format_size

EXIT_CONFIG = 2
EXIT_FAILURE = 1
DEFAULT_ADMIN = "127.0.0.1:7700"

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (it is a dependency); plain asyncio otherwise."""
    tune_malloc()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load(path: str) -> Config | None:
    try:
        return load_config(Path(path))
    except ConfigError as exc:
        print(f"{path}: configuration is invalid:", file=sys.stderr)
        for key, message in exc.problems:
            print(f"  {key}: {message}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    print(f"{args.config}: OK")
    for vc in config.volumes:
        where = f"{vc.path}" + (f" at offset {vc.offset}" if vc.offset else "")
        export = f", exported on {vc.export}" if vc.export else ""
        print(f"  volume {vc.name}: {vc.role}, {format_size(vc.size)} on {where}{export}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from blockmirror.daemon import run_unit

    try:
        return run_async(run_unit(config))
    except BlockmirrorError as exc:
        logging.getLogger("blockmirror").error("cannot start: %s", exc)
        return EXIT_FAILURE
    except OSError as exc:
        logging.getLogger("blockmirror").error("cannot start: %s", exc)
        return EXIT_FAILURE


def _admin_from_config(path: str) -> str | None:
    config = _load(path)
    if config is None:
        return None
    from blockmirror.daemon import read_runtime_file

    runtime = read_runtime_file(config.unit.state_dir)
    if runtime and runtime.get("admin"):
        return str(runtime["admin"])
    if config.unit.admin is None:
        print(f"{path}: unit.admin is not set; the unit has no admin API", file=sys.stderr)
        return None
    return str(config.unit.admin)


def fetch_status(admin: str, timeout: float = 5.0) -> dict[str, Any]:
    address = parse_address(admin, "--admin")
    host = f"[{address.host}]" if ":" in address.host else address.host
    url = f"http://{host}:{address.port}/api/status"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data = json.loads(response.read())
    if not isinstance(data, dict):
        raise BlockmirrorError(f"{url} did not return a JSON object")
    return data


def _resolve_admin(args: argparse.Namespace) -> str | None:
    """The admin address from --admin, or from --config (its unit.json first), or the default."""
    if getattr(args, "config", None):
        return _admin_from_config(args.config)
    return str(args.admin or DEFAULT_ADMIN)


def cmd_status(args: argparse.Namespace) -> int:
    admin = _resolve_admin(args)
    if admin is None:
        return EXIT_CONFIG
    try:
        status = fetch_status(admin)
    except (OSError, urllib.error.URLError, ValueError, BlockmirrorError) as exc:
        print(f"cannot reach the unit's admin API at {admin}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status_table(status))
    return 0


# --- operator controls (through the admin API) -------------------------------------------------


class ControlFailed(BlockmirrorError):
    """The admin API refused a control, or could not be reached."""


def call_control(
    admin: str, path: str, params: dict[str, int] | None = None, timeout: float = 60.0
) -> dict[str, Any]:
    """POST one control (``path`` already percent-encoded); its JSON answer, or ControlFailed."""
    address = parse_address(admin, "--admin")
    host = f"[{address.host}]" if ":" in address.host else address.host
    url = f"http://{host}:{address.port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = str(json.loads(exc.read())["error"])
        except (ValueError, KeyError, TypeError, OSError):
            message = exc.reason if isinstance(exc.reason, str) else str(exc)
        raise ControlFailed(f"the unit refused ({exc.code}): {message}") from None
    except (OSError, urllib.error.URLError) as exc:
        raise ControlFailed(f"cannot reach the unit's admin API at {admin}: {exc}") from None
    except ValueError as exc:
        raise ControlFailed(f"{url} did not answer JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ControlFailed(f"{url} did not return a JSON object")
    return data


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _run_control(
    args: argparse.Namespace, path: str, params: dict[str, int] | None = None
) -> dict[str, Any] | None:
    admin = _resolve_admin(args)
    if admin is None:
        return None
    try:
        return call_control(admin, path, params)
    except (ControlFailed, ConfigError) as exc:
        print(f"blockmirror: {exc}", file=sys.stderr)
        return None


def _consumer_summary(reply: dict[str, Any]) -> str:
    return (
        f"mode {reply.get('mode', '?')}, acked seq {reply.get('acked_seq', '?')}, "
        f"backlog {reply.get('backlog_records', '?')} records, "
        f"{human_size(int(reply.get('dirty_bytes') or 0))} dirty"
    )


def cmd_journal_pause(args: argparse.Namespace) -> int:
    action = "pause" if args.pause else "resume"
    reply = _run_control(args, f"/api/volumes/{_quote(args.volume)}/journal/{action}")
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


def cmd_consumer_pause(args: argparse.Namespace) -> int:
    action = "pause" if args.pause else "resume"
    path = f"/api/volumes/{_quote(args.volume)}/consumers/{_quote(args.consumer)}/{action}"
    reply = _run_control(args, path)
    if reply is None:
        return EXIT_FAILURE
    again = "" if reply.get("changed", True) else " (it already was)"
    done = "paused" if args.pause else "resumed"
    print(
        f"volume {args.volume}: consumer {args.consumer} {done}{again} ({_consumer_summary(reply)})"
    )
    return 0


def cmd_consumer_discard(args: argparse.Namespace) -> int:
    path = f"/api/volumes/{_quote(args.volume)}/consumers/{_quote(args.consumer)}/discard"
    reply = _run_control(args, path, {"from": args.first, "to": args.last})
    if reply is None:
        return EXIT_FAILURE
    print(
        f"volume {args.volume}: consumer {args.consumer}: {reply.get('discarded', '?')} records "
        f"in seq {args.first}..{args.last} turned into dirty bits ({_consumer_summary(reply)})"
    )
    return 0


def cmd_journal_recover(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from blockmirror.journal.recover import JournalRecovery, RecoverError

    try:
        with JournalRecovery(config, args.volume) as recovery:
            for line in recovery.plan.describe():
                print(line)
            if not args.yes:
                if not sys.stdin.isatty():
                    print(
                        "blockmirror: not recovering: confirm with --yes (stdin is not a "
                        "terminal to ask on); nothing was changed",
                        file=sys.stderr,
                    )
                    return EXIT_CONFIG
                try:
                    answer = input("Recover this journal as described? Type 'yes' to go on: ")
                except EOFError:
                    answer = ""
                if answer.strip().lower() != "yes":
                    print("blockmirror: not recovering; nothing was changed", file=sys.stderr)
                    return EXIT_CONFIG
            for line in recovery.run():
                print(line)
    except RecoverError as exc:
        print(f"blockmirror: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (BlockmirrorError, OSError) as exc:
        print(f"blockmirror: journal recovery failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"blockmirror {__version__}")
    print(COPYRIGHT)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from blockmirror.demo import run_demo

    _setup_logging(args.verbose)
    logging.getLogger("blockmirror").setLevel(
        logging.WARNING if not args.verbose else logging.DEBUG
    )
    directory = Path(args.dir) if args.dir else None
    return run_async(
        run_demo(directory, size=args.size, duration=args.duration, keep_running=args.keep_running)
    )


def _admin_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--admin", default=None, help=f"HOST:PORT (default {DEFAULT_ADMIN})")
    where.add_argument("--config", default=None, help="find the admin address in this config")


def _seq_arg(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a sequence number (1 or more): {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockmirror",
        description="Remote block-level data mirroring over NBD and TCP.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one unit in the foreground until SIGTERM/SIGINT")
    run.add_argument("config", help="the unit's TOML configuration")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="run the embedded demo on loopback")
    demo.add_argument("--dir", help="directory for the demo's volumes (default: a new one)")
    demo.add_argument("--size", default="256MiB", help="volume size (default 256MiB)")
    demo.add_argument(
        "--duration", type=float, default=10.0, help="seconds of workload (default 10)"
    )
    demo.add_argument(
        "--keep-running", action="store_true", help="keep serving after the workload until Ctrl-C"
    )
    demo.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    demo.set_defaults(func=cmd_demo)

    status = sub.add_parser("status", help="show every volume of a running unit")
    status.add_argument("--admin", default=None, help=f"HOST:PORT (default {DEFAULT_ADMIN})")
    status.add_argument("--config", default=None, help="find the admin address in this config")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.set_defaults(func=cmd_status)

    journal = sub.add_parser("journal", help="pause, resume or recover a volume's journal")
    jsub = journal.add_subparsers(dest="journal_command", required=True)
    for action, text in (
        ("pause", "stop journaling writes (they are tracked in every consumer's dirty map)"),
        ("resume", "journal writes again"),
    ):
        p = jsub.add_parser(action, help=text)
        p.add_argument("volume")
        _admin_arguments(p)
        p.set_defaults(func=cmd_journal_pause, pause=action == "pause")
    recover = jsub.add_parser(
        "recover", help="offline: replay what can be, rewrite a corrupt journal, full resync"
    )
    recover.add_argument("config", help="the unit's TOML configuration (the unit must be stopped)")
    recover.add_argument("volume")
    recover.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    recover.set_defaults(func=cmd_journal_recover)

    consumer = sub.add_parser("consumer", help="pause, resume or discard for one journal consumer")
    csub = consumer.add_subparsers(dest="consumer_command", required=True)
    for action, text in (("pause", "stop the consumer's dequeueing"), ("resume", "dequeue again")):
        p = csub.add_parser(action, help=text)
        p.add_argument("volume")
        p.add_argument("consumer", help="the consumer's name: the peer address, HOST:PORT")
        _admin_arguments(p)
        p.set_defaults(func=cmd_consumer_pause, pause=action == "pause")
    discard = csub.add_parser(
        "discard", help="turn the consumer's records in a seq range into dirty bits"
    )
    discard.add_argument("volume")
    discard.add_argument("consumer", help="the consumer's name: the peer address, HOST:PORT")
    discard.add_argument("--from", dest="first", type=_seq_arg, required=True, metavar="SEQ")
    discard.add_argument("--to", dest="last", type=_seq_arg, required=True, metavar="SEQ")
    _admin_arguments(discard)
    discard.set_defaults(func=cmd_consumer_discard)

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("config")
    check.set_defaults(func=cmd_check_config)

    version = sub.add_parser("version", help="print version and copyright")
    version.set_defaults(func=cmd_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
