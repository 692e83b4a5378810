"""A unit archiving to a real S3 server (tests/support/seaweed.py), and the offline commands.

:func:`add_archive` appends an ``[[archive]]`` table to a site's config; :func:`archive_cli`
runs ``blockmirror archive ...`` with only the URL, endpoint and credentials, as an operator
on another machine would; :func:`wait_archived` waits until a volume's archive holds the
newest record and a base.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from blockmirror.frontend.nbd_client import NbdClient
from tests.support.pair import MiB, Site
from tests.support.seaweed import Seaweed
from tests.support.unit_process import BLOCKMIRROR


def add_archive(site: Site, weed: Seaweed, url: str, **keys: Any) -> None:
    """An ``[[archive]]`` named ``keys.get("name", "s3")`` in ``site``'s config file."""
    entry: dict[str, Any] = {
        "name": "s3",
        "url": url,
        "endpoint": weed.endpoint,
        "credentials_file": str(weed.credentials_file("test")),
        "segment_interval": "1s",
    }
    entry.update(keys)
    lines = ["", "[[archive]]", *(f"{k} = {json.dumps(v)}" for k, v in entry.items())]
    with site.config.open("a") as f:
        f.write("\n".join(lines) + "\n")


def archive_cli(
    weed: Seaweed, *args: str, identity: str = "test", check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``blockmirror archive ARGS --endpoint ... --credentials-file ...`` (no unit, no config)."""
    cmd = [*BLOCKMIRROR, "archive", *args]
    if args[0] != "status":
        cmd += [
            "--endpoint",
            weed.endpoint,
            "--credentials-file",
            str(weed.credentials_file(identity)),
        ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def archive_status(site: Site, name: str = "s3", volume: str = "vol") -> dict[str, Any]:
    for entry in site.volume_status(volume).get("archives") or []:
        if entry["archive"] == name:
            return dict(entry)
    raise AssertionError(f"{site.name} has no archive {name} for {volume}")


def wait_archived(
    site: Site, *, name: str = "s3", volume: str = "vol", timeout: float = 120.0, bases: int = 1
) -> dict[str, Any]:
    """Until the archive holds the volume's newest record and at least ``bases`` bases."""
    end = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < end:
        newest = int(site.volume_status(volume)["journal"]["newest_seq"])
        last = archive_status(site, name, volume)
        if (
            last["state"] == "archiving"
            and last["last_seq"] >= newest
            and last["bases"] >= bases
            and not last["base_running"]
        ):
            return last
        time.sleep(0.2)
    raise AssertionError(f"archive not caught up on {site.name}: {last}")


def archive_list(weed: Seaweed, url: str, volume: str = "vol") -> dict[str, Any]:
    proc = archive_cli(weed, "list", volume, "--url", url, "--json")
    return dict(json.loads(proc.stdout))


def restore_from_archive(
    weed: Seaweed, url: str, to: Path, *point: str, volume: str = "vol"
) -> dict[str, Any]:
    proc = archive_cli(weed, "restore", volume, "--url", url, *point, "--to", str(to), "--json")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def write_random(site: Site, offset: int, data: bytes) -> None:
    """``data`` written at ``offset`` through the site's NBD export, in 1 MiB writes, flushed."""

    async def go() -> None:
        assert site.unit is not None
        host, port = site.unit.export_address("vol")
        async with await NbdClient.connect(host, port, "vol") as client:
            for pos in range(0, len(data), MiB):
                await client.write(offset + pos, data[pos : pos + MiB])
            await client.flush()

    asyncio.run(go())
