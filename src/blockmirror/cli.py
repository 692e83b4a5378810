"""The ``blockmirror`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from blockmirror import COPYRIGHT, __version__
from blockmirror.admin.client import (
    TOKEN_ENV,
    AdminClient,
    ControlFailed,
    call_control,
    fetch_status,
    tls_for,
    token_for,
)
from blockmirror.admin.table import format_status_table, status_problems
from blockmirror.cli_archive import add_archive_commands
from blockmirror.cli_config import add_config_commands, read_for_run
from blockmirror.cli_controls import ControlCommands, add_link_commands
from blockmirror.cli_history import add_history_commands
from blockmirror.cli_roles import add_role_commands
from blockmirror.config import Config, load_config
from blockmirror.errors import BlockmirrorError, ConfigError
from blockmirror.io.allocator import tune_malloc
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


def _confirm(question: str, doing: str) -> bool:
    """Ask on the terminal before an offline command changes anything; False: say why."""
    if not sys.stdin.isatty():
        print(
            f"blockmirror: not {doing}: confirm with --yes (stdin is not a terminal to ask on); "
            "nothing was changed",
            file=sys.stderr,
        )
        return False
    try:
        answer = input(f"{question} Type 'yes' to go on: ")
    except EOFError:
        answer = ""
    if answer.strip().lower() != "yes":
        print(f"blockmirror: not {doing}; nothing was changed", file=sys.stderr)
        return False
    return True


def _load(path: str) -> Config | None:
    try:
        config = load_config(Path(path))
        for key, message in config.warnings:
            print(f"{path}: warning: {key}: {message}", file=sys.stderr)
        return config
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
    loaded = read_for_run(Path(args.config), args.state_dir)
    if isinstance(loaded, int):
        return loaded
    config, text, lost = loaded
    from blockmirror.lifecycle import run_unit

    try:
        return run_async(run_unit(config, text=text, lost=lost))
    except BlockmirrorError as exc:
        logging.getLogger("blockmirror").error("cannot start: %s", exc)
        return EXIT_FAILURE
    except OSError as exc:
        logging.getLogger("blockmirror").error("cannot start: %s", exc)
        return EXIT_FAILURE


def _admin_client(args: argparse.Namespace) -> AdminClient | None:
    """The admin API to talk to: from --config (its unit.json first), --admin, or the default."""
    config: Config | None = None
    https = False
    if getattr(args, "config", None):
        config = _load(args.config)
        if config is None:
            return None
        from blockmirror.statedir import read_runtime_file

        runtime = read_runtime_file(config.unit.state_dir)
        if runtime and runtime.get("admin"):
            address = str(runtime["admin"])
        elif config.unit.admin is None:
            print(
                f"{args.config}: unit.admin is not set; the unit has no admin API", file=sys.stderr
            )
            return None
        else:
            address = str(config.unit.admin)
    else:
        address = str(args.admin or DEFAULT_ADMIN)
        scheme, sep, rest = address.partition("://")
        if sep:
            if scheme not in ("http", "https"):
                message = f"blockmirror: --admin {address}: use HOST:PORT or https://HOST:PORT"
                print(message, file=sys.stderr)
                return None
            address, https = rest.rstrip("/"), scheme == "https"
    try:
        return AdminClient(
            address,
            token_for(getattr(args, "token_file", None), config),
            tls_for(getattr(args, "admin_ca", None), config, https),
        )
    except (ConfigError, OSError, ssl.SSLError) as exc:
        print(f"blockmirror: {exc}", file=sys.stderr)
        return None


def _fetch_status_or_say(args: argparse.Namespace) -> dict[str, Any] | None:
    """The unit's status (None: the error was printed; no client: ``args.no_client`` set)."""
    client = _admin_client(args)
    if client is None:
        args.no_client = True
        return None
    try:
        return fetch_status(client)
    except urllib.error.HTTPError as exc:
        print(f"blockmirror: {client.refusal(exc)}", file=sys.stderr)
    except (OSError, urllib.error.URLError, ValueError, BlockmirrorError) as exc:
        print(f"cannot reach the unit's admin API at {client.address}: {exc}", file=sys.stderr)
    return None


def cmd_status(args: argparse.Namespace) -> int:
    status = _fetch_status_or_say(args)
    if status is None:
        return EXIT_CONFIG if getattr(args, "no_client", False) else EXIT_FAILURE
    if args.problems_only:
        problems = status_problems(status)
        print("\n".join(problems) if problems else "all volumes are healthy")
        return EXIT_FAILURE if problems else 0
    print(json.dumps(status, indent=2) if args.json else format_status_table(status))
    return 0


# --- operator controls (through the admin API) -------------------------------------------------


def _run_control(
    args: argparse.Namespace,
    path: str,
    params: dict[str, str | int] | None = None,
    *,
    timeout: float = 60.0,
) -> dict[str, Any] | None:
    client = _admin_client(args)
    if client is None:
        return None
    try:
        return call_control(client, path, params, timeout)
    except (ControlFailed, ConfigError) as exc:
        print(f"blockmirror: {exc}", file=sys.stderr)
        return None


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running unit to read its configuration file again and apply it."""
    reply = _run_control(args, "/api/reload")
    if reply is None:
        return EXIT_FAILURE
    version = reply.get("config_version")
    if not reply.get("changed"):
        print(f"configuration version {version}: nothing to change")
    else:
        print(f"configuration version {version} applied:")
        for change in reply.get("changes") or []:
            print(f"  {change.get('description')}")
    for note in reply.get("notes") or []:
        print(f"note: {note}")
    return 0


def cmd_journal_recover(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from blockmirror.offline.repair import JournalRecovery, RecoverError

    try:
        with JournalRecovery(config, args.volume) as recovery:
            for line in recovery.plan.describe():
                print(line)
            if not args.yes and not _confirm("Recover this journal as described?", "recovering"):
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


def cmd_journal_resize(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from blockmirror.errors import SizeError
    from blockmirror.offline.lock import OfflineError
    from blockmirror.offline.resize import resize_journal
    from blockmirror.units import parse_size

    try:
        size = parse_size(args.size, key="SIZE")
    except SizeError as exc:
        print(f"blockmirror: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        report = resize_journal(config, args.volume, size)
    except OfflineError as exc:
        print(f"blockmirror: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (BlockmirrorError, OSError) as exc:
        print(f"blockmirror: journal resize failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    for line in report.lines:
        print(line)
    return 0


def cmd_volume_adopt(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from blockmirror.offline.adopt import adopt_volume
    from blockmirror.offline.lock import OfflineError

    if not args.yes:
        print(
            f"adopting volume {args.volume} drops its journal's records unreplayed, takes the "
            "volume as it is and sends every peer a full resync"
        )
        if not _confirm("Adopt this volume as it is?", "adopting"):
            return EXIT_CONFIG
    try:
        lines = adopt_volume(config, args.volume)
    except OfflineError as exc:
        print(f"blockmirror: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (BlockmirrorError, OSError) as exc:
        print(f"blockmirror: adopting the volume failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    for line in lines:
        print(line)
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
    where.add_argument(
        "--admin",
        default=None,
        help=f"HOST:PORT or https://HOST:PORT (default {DEFAULT_ADMIN})",
    )
    where.add_argument(
        "--config", default=None, help="find the admin address and token in this config"
    )
    parser.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help=f"the admin token (default: ${TOKEN_ENV}, or the token file of --config)",
    )
    _admin_ca_argument(parser)


def _admin_ca_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin-ca",
        default=None,
        metavar="PATH",
        help="verify the admin API's TLS certificate with this CA (implies https)",
    )


def _seq_arg(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a sequence number (1 or more): {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockmirror",
        description="Remote block-level data mirroring over NBD and TCP.",
    )
    parser.add_argument("--version", action="version", version=f"blockmirror {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    controls = ControlCommands(_run_control)

    run = sub.add_parser("run", help="run one unit in the foreground until SIGTERM/SIGINT")
    run.add_argument("config", help="the unit's TOML configuration")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="the unit's state_dir: if the configuration is lost, stay up (serving nothing) "
        "with what DIR remembers of it",
    )
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
    _admin_arguments(status)
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument(
        "-x", dest="problems_only", action="store_true", help="problems only; exit 1 if any"
    )
    status.set_defaults(func=cmd_status)

    reload = sub.add_parser(
        "reload",
        help="make a running unit read its configuration file again and apply it live",
    )
    _admin_arguments(reload)
    reload.set_defaults(func=cmd_reload)

    journal = sub.add_parser("journal", help="pause, resume, recover or resize a volume's journal")
    jsub = journal.add_subparsers(dest="journal_command", required=True)
    for action, text in (
        ("pause", "stop journaling writes (they are tracked in every consumer's dirty map)"),
        ("resume", "journal writes again"),
    ):
        p = jsub.add_parser(action, help=text)
        p.add_argument("volume")
        _admin_arguments(p)
        p.set_defaults(func=controls.journal_pause, pause=action == "pause")
    recover = jsub.add_parser(
        "recover", help="offline: replay what can be, rewrite a corrupt journal, full resync"
    )
    recover.add_argument("config", help="the unit's TOML configuration (the unit must be stopped)")
    recover.add_argument("volume")
    recover.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    recover.set_defaults(func=cmd_journal_recover)
    resize = jsub.add_parser(
        "resize", help="offline: rewrite the journal at a new size, keeping peers streaming"
    )
    resize.add_argument("config", help="the unit's TOML configuration (the unit must be stopped)")
    resize.add_argument("volume")
    resize.add_argument("size", help="the new journal_size, e.g. 2GiB")
    resize.set_defaults(func=cmd_journal_resize)

    volume = sub.add_parser("volume", help="offline volume operations")
    vsub = volume.add_subparsers(dest="volume_command", required=True)
    adopt = vsub.add_parser(
        "adopt",
        help="offline: serve a volume its journal does not recognise (restored), full resync",
    )
    adopt.add_argument("config", help="the unit's TOML configuration (the unit must be stopped)")
    adopt.add_argument("volume")
    adopt.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    adopt.set_defaults(func=cmd_volume_adopt)

    consumer = sub.add_parser("consumer", help="pause, resume or discard for one journal consumer")
    csub = consumer.add_subparsers(dest="consumer_command", required=True)
    for action, text in (("pause", "stop the consumer's dequeueing"), ("resume", "dequeue again")):
        p = csub.add_parser(action, help=text)
        p.add_argument("volume")
        p.add_argument("consumer", help="the consumer's name: the peer address, HOST:PORT")
        _admin_arguments(p)
        p.set_defaults(func=controls.consumer_pause, pause=action == "pause")
    discard = csub.add_parser(
        "discard", help="turn the consumer's records in a seq range into dirty bits"
    )
    discard.add_argument("volume")
    discard.add_argument("consumer", help="the consumer's name: the peer address, HOST:PORT")
    discard.add_argument("--from", dest="first", type=_seq_arg, required=True, metavar="SEQ")
    discard.add_argument("--to", dest="last", type=_seq_arg, required=True, metavar="SEQ")
    _admin_arguments(discard)
    discard.set_defaults(func=controls.consumer_discard)

    add_role_commands(sub, admin_arguments=_admin_arguments, run_control=_run_control)
    add_config_commands(sub, admin_tls_argument=_admin_ca_argument)
    add_link_commands(sub, admin_arguments=_admin_arguments, run_control=_run_control)
    add_history_commands(
        sub,
        admin_arguments=_admin_arguments,
        run_control=_run_control,
        fetch_status=_fetch_status_or_say,
    )
    add_archive_commands(sub, admin_arguments=_admin_arguments, fetch_status=_fetch_status_or_say)

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
