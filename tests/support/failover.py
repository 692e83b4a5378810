"""Symmetric sites for failover tests: every unit lists the others as peers, listens for them,
and exports its volume (read-only while it is not primary); role changes through the CLI."""

from __future__ import annotations

import subprocess
from typing import Any

from tests.support.pair import MiB, Site, Topology, wait_status
from tests.support.unit_process import BLOCKMIRROR, free_port, write_config


def symmetric(
    topo: Topology,
    roles: dict[str, str],
    *,
    size: int = 32 * MiB,
    journal_size: str = "16MiB",
    links: dict[str, list[str]] | None = None,
) -> dict[str, Site]:
    """One site per name in ``roles`` (name -> "primary" | "secondary"). ``links``: who lists
    whom as peers (default: everyone lists everyone else)."""
    ports = {name: free_port() for name in roles}
    sites: dict[str, Site] = {}
    for name, role in roles.items():
        directory = topo.root / name
        directory.mkdir()
        image = directory / "vol.img"
        peers = links[name] if links is not None else [n for n in roles if n != name]
        entry: dict[str, Any] = {
            "name": "vol",
            "role": role,
            "path": str(image),
            "size": size,
            "export": "127.0.0.1:0",
            "journal_size": journal_size,
            "peers": [f"127.0.0.1:{ports[p]}" for p in peers],
        }
        config = write_config(
            directory,
            name=name,
            volumes=[entry],
            replication={"listen": f"127.0.0.1:{ports[name]}"},
        )
        site = Site(directory, name, config, directory / "state", {"vol": image}, ports[name])
        topo.sites[name] = site
        sites[name] = site
    return sites


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BLOCKMIRROR, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def role_change(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    """``blockmirror ARGS vol --config CONFIG`` against the site's running unit."""
    return cli(*args[:1], "vol", *args[1:], "--config", str(site.config))


def wait_role(site: Site, role: str, *, timeout: float = 30) -> dict[str, Any]:
    return wait_status(
        lambda: v if (v := site.volume_status())["role"] == role else None,
        timeout=timeout,
        what=f"{site.name} to be {role}",
    )


def peer_of(site: Site, other: Site) -> dict[str, Any]:
    for peer in site.volume_status()["peers"]:
        if peer["address"].endswith(f":{other.listen_port}"):
            return dict(peer)
    raise AssertionError(f"{site.name} has no peer {other.name}")


def wait_split_brain(
    site: Site, other: Site, *, timeout: float = 30, both_sides: bool = True
) -> dict[str, Any]:
    """The site's split brain with ``other``, once it knows (``both_sides``) what the other
    side wrote since the common point too."""

    def found() -> dict[str, Any] | None:
        for split in site.volume_status().get("split_brain", []):
            if split["peer"] == other.name and (
                split["peer_diverged_bytes"] is not None or not both_sides
            ):
                return dict(split)
        return None

    what = f"{site.name} to see a split brain with {other.name}"
    return wait_status(found, timeout=timeout, what=what)
