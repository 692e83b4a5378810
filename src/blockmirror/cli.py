"""The ``blockmirror`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from blockmirror import COPYRIGHT, __version__
from blockmirror.admin.table import format_status_table
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


def cmd_status(args: argparse.Namespace) -> int:
    admin = args.admin
    if args.config:
        admin = _admin_from_config(args.config)
        if admin is None:
            return EXIT_CONFIG
    try:
        status = fetch_status(admin or DEFAULT_ADMIN)
    except (OSError, urllib.error.URLError, ValueError, BlockmirrorError) as exc:
        print(
            f"cannot reach the unit's admin API at {admin or DEFAULT_ADMIN}: {exc}", file=sys.stderr
        )
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status_table(status))
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
