"""``blockmirror run`` when the configuration file is lost, and ``blockmirror config fetch``.

A unit whose file is missing, unreadable or damaged (not UTF-8 TOML) does not exit: given its
state directory (``--state-dir``), it starts from what that directory remembers of its last
configuration (its admin API and alert targets), serves nothing, and raises ``config-lost``.
``config fetch`` gets the copy a peer keeps (``GET /api/peer-configs?unit=NAME`` on the peer's
admin API) and writes it where the file was; ``blockmirror reload`` then starts the unit with it.
A file that reads but is invalid is the operator's edit, not a loss: ``run`` refuses it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
import urllib.error
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockmirror.admin.client import AdminClient, tls_for, token_for
from blockmirror.config import Config, config_from_bytes
from blockmirror.errors import ConfigError

__all__ = ["add_config_commands", "read_for_run"]

EXIT_FAILURE = 1
EXIT_CONFIG = 2

log = logging.getLogger("blockmirror")


def read_for_run(
    path: Path, state_dir: str | None
) -> tuple[Config, bytes | None, str | None] | int:
    """What ``run`` starts with: (config, its text, why it is lost or None), or an exit code
    (the reason is printed)."""
    try:
        text = path.read_bytes()
        tomllib.loads(text.decode("utf-8"))
    except OSError as exc:
        lost = f"configuration file {path} cannot be read: {exc.strerror}"
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        lost = f"configuration file {path} is damaged: {exc}"
    else:
        try:
            config = config_from_bytes(text, path)
        except ConfigError as exc:
            print(f"{path}: configuration is invalid:", file=sys.stderr)
            for key, message in exc.problems:
                print(f"  {key}: {message}", file=sys.stderr)
            return EXIT_CONFIG
        for key, message in config.warnings:
            print(f"{path}: warning: {key}: {message}", file=sys.stderr)
        return config, text, None
    if state_dir is None:
        print(
            f"blockmirror: {lost}; give --state-dir to keep the unit up (serving nothing) "
            "until the file is restored",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    from blockmirror.config_store import lost_config

    config = lost_config(path, Path(state_dir))
    log.error("%s: the unit serves nothing until it is restored and reloaded", lost)
    return config, None, lost


def add_config_commands(
    sub: Any, *, admin_tls_argument: Callable[[argparse.ArgumentParser], None]
) -> None:
    config = sub.add_parser("config", help="configuration copies peers keep of each other")
    csub = config.add_subparsers(dest="config_command", required=True)
    fetch = csub.add_parser(
        "fetch", help="get a unit's configuration from the copy a peer keeps of it"
    )
    fetch.add_argument(
        "--from", dest="peer", required=True, metavar="PEER_ADMIN", help="the peer's admin API"
    )
    fetch.add_argument("--unit", required=True, help="whose configuration (its unit name)")
    fetch.add_argument("--token-file", default=None, metavar="PATH", help="the peer's admin token")
    admin_tls_argument(fetch)
    fetch.add_argument(
        "-o", "--output", default=None, metavar="PATH", help="write it here (default: stdout)"
    )
    fetch.set_defaults(func=cmd_config_fetch)


def cmd_config_fetch(args: argparse.Namespace) -> int:
    address = str(args.peer)
    scheme, sep, rest = address.partition("://")
    https = sep and scheme == "https"
    if sep:
        address = rest.rstrip("/")
    try:
        client = AdminClient(
            address,
            token_for(args.token_file, None),
            tls_for(getattr(args, "admin_ca", None), None, bool(https)),
        )
        doc = client.open(
            "GET", "/api/peer-configs?" + urllib.parse.urlencode({"unit": args.unit}), 30.0
        )
    except urllib.error.HTTPError as exc:
        print(f"blockmirror: {args.peer}: {client.refusal(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except (ConfigError, OSError, urllib.error.URLError, ValueError) as exc:
        print(f"blockmirror: cannot fetch from {args.peer}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    text = str(doc.get("text", ""))
    version, received = doc.get("config_version"), doc.get("received")
    if args.output is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(out)
    except OSError as exc:
        print(f"blockmirror: cannot write {out}: {exc.strerror}", file=sys.stderr)
        tmp.unlink(missing_ok=True)
        return EXIT_FAILURE
    print(
        f"unit {args.unit}: configuration version {version} (as {args.peer} received it at "
        f"{received}) written to {out}; `blockmirror reload` applies it"
    )
    return 0
