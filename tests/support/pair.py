"""A primary and its secondaries as real processes, and waiting until replicas catch up."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.support.unit_process import (
    UnitProcess,
    fetch_status,
    free_port,
    start_unit,
    write_config,
)

MiB = 1024 * 1024

_T = TypeVar("_T")


@dataclass
class Site:
    """One unit's files: config, state, and the image of its volume(s)."""

    directory: Path
    name: str
    config: Path
    state: Path
    images: dict[str, Path]
    listen_port: int | None = None
    unit: UnitProcess | None = None
    # The network namespace the unit runs in (tests/support/netns.py); None: this one.
    netns: str | None = None

    def start(self) -> UnitProcess:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else None
        self.unit = start_unit(self.config, self.state, prefix=prefix)
        return self.unit

    def kill(self) -> None:
        if self.unit is not None:
            self.unit.kill()

    def status(self) -> dict[str, Any]:
        unit = self.unit
        assert unit is not None
        if self.netns is not None:
            from tests.support.netns import in_netns

            return in_netns(self.netns, lambda: fetch_status(unit))
        return fetch_status(unit)

    def volume_status(self, volume: str = "vol") -> dict[str, Any]:
        for vol in self.status()["volumes"]:
            if vol["name"] == volume:
                return dict(vol)
        raise AssertionError(f"no volume {volume} on {self.name}")


@dataclass
class Topology:
    root: Path
    sites: dict[str, Site] = field(default_factory=dict)

    def add_secondary(
        self,
        name: str,
        *,
        volumes: dict[str, int] | None = None,
        peers: list[str] | None = None,
        replication: dict[str, Any] | None = None,
        journal_size: str = "64MiB",
        image_size: int | None = None,
        volume_extra: dict[str, dict[str, Any]] | None = None,
    ) -> Site:
        directory = self.root / name
        directory.mkdir()
        port = free_port()
        vols = volumes or {"vol": 64 * MiB}
        images = {v: directory / f"{v}.img" for v in vols}
        entries = []
        for vol, size in vols.items():
            entry: dict[str, Any] = {
                "name": vol,
                "role": "secondary",
                "path": str(images[vol]),
                "size": image_size or size,
                "journal_size": journal_size,
            }
            if peers:
                entry["peers"] = peers
            entry.update((volume_extra or {}).get(vol, {}))
            entries.append(entry)
        rep = {"listen": f"127.0.0.1:{port}"}
        rep.update(replication or {})
        config = write_config(directory, name=name, volumes=entries, replication=rep)
        site = Site(directory, name, config, directory / "state", images, listen_port=port)
        self.sites[name] = site
        return site

    def add_primary(
        self,
        name: str,
        *,
        peers: list[str],
        size: int = 64 * MiB,
        volume: str = "vol",
        journal_size: str = "64MiB",
        replication: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Site:
        directory = self.root / name
        directory.mkdir()
        image = directory / f"{volume}.img"
        entry: dict[str, Any] = {
            "name": volume,
            "role": "primary",
            "path": str(image),
            "size": size,
            "export": "127.0.0.1:0",
            "journal_size": journal_size,
            "peers": peers,
        }
        entry.update(extra or {})
        config = write_config(directory, name=name, volumes=[entry], replication=replication)
        site = Site(directory, name, config, directory / "state", {volume: image})
        self.sites[name] = site
        return site

    def stop_all(self) -> None:
        for site in self.sites.values():
            site.kill()


@contextmanager
def topology(root: Path) -> Iterator[Topology]:
    topo = Topology(root)
    try:
        yield topo
    finally:
        topo.stop_all()


def peer_address(site: Site) -> str:
    assert site.listen_port is not None
    return f"127.0.0.1:{site.listen_port}"


def wait_caught_up(
    source: Site, replica: Site, *, volume: str = "vol", timeout: float = 60.0
) -> dict[str, Any]:
    """Until the source's peer is replicating with no lag and the replica is consistent and has
    applied everything the source journaled. Returns the replica's volume status."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        src = source.volume_status(volume)
        rep = replica.volume_status(volume)
        newest = src["journal"]["newest_seq"]
        peer = next(
            (p for p in src["peers"] if p["address"].endswith(f":{replica.listen_port}")), None
        )
        r = rep["replica"]
        last = (peer, r, newest)
        if (
            peer is not None
            and peer["state"] == "replicating"
            and peer["lag_bytes"] == 0
            and r["consistent"]
            and r["applied_seq"] >= newest
            and peer["acked_seq"] >= newest
        ):
            return dict(rep)
        time.sleep(0.1)
    raise AssertionError(f"replica {replica.name} did not catch up: {last}")


def file_hash(path: Path, size: int, offset: int = 0) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        remaining = size
        while remaining:
            chunk = f.read(min(4 * MiB, remaining))
            if not chunk:
                chunk = bytes(min(4 * MiB, remaining))
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


@contextmanager
def frozen(site: Site, *, timeout: float = 5.0) -> Iterator[None]:
    """SIGSTOP the site's unit for the block, SIGCONT it afterwards whatever happens.

    The block starts only once every thread of the unit is stopped (state ``T`` in /proc): a
    signal is delivered asynchronously, and a thread on another CPU runs on until it notices.
    While stopped the unit changes nothing (a ``pwrite`` in progress completes first), so a copy
    of its files taken inside the block is one instant of it.
    """
    import os
    import signal

    assert site.unit is not None and site.unit.proc.poll() is None, f"{site.name} is not running"
    pid = site.unit.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout
        while not _all_threads_stopped(pid):
            assert time.monotonic() < deadline, f"{site.name} ({pid}) did not stop in {timeout}s"
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _all_threads_stopped(pid: int) -> bool:
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            text = stat.read_text()
        except FileNotFoundError:
            continue  # the thread ended
        # The state follows the command name, which is in parentheses and may hold spaces.
        state = text[text.rindex(")") + 2]
        if state not in "TtXZ":
            return False
    return True


# --- helpers for link tests: peers by address, waiting on status, real clients --------------------


def find_peer(source: Site, address: str, volume: str = "vol") -> dict[str, Any]:
    """The source's peer entry whose address is ``address`` (HOST:PORT, as configured)."""
    for peer in source.volume_status(volume)["peers"]:
        if peer["address"] == address:
            return dict(peer)
    raise AssertionError(f"{source.name} has no peer {address}")


def wait_status(
    check: Callable[[], _T | None], *, timeout: float, what: str, interval: float = 0.05
) -> _T:
    """Poll ``check`` until it returns something other than None (or False); return that."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = check()
        except (OSError, KeyError) as exc:  # a unit restarting: keep polling
            value, last_error = None, exc
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}"
                + (f" (last error: {last_error!r})" if last_error else "")
            )
        time.sleep(interval)


def wait_caught_up_via(
    source: Site,
    replica: Site,
    address: str,
    *,
    volume: str = "vol",
    timeout: float = 60.0,
) -> dict[str, Any]:
    """:func:`wait_caught_up` for a peer configured as ``address`` (a proxy in front of the
    replica's listener, say). Returns the replica's volume status."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        src = source.volume_status(volume)
        rep = replica.volume_status(volume)
        newest = src["journal"]["newest_seq"]
        peer = next((p for p in src["peers"] if p["address"] == address), None)
        r = rep["replica"]
        last = (peer, r, newest)
        if (
            peer is not None
            and peer["state"] == "replicating"
            and peer["lag_bytes"] == 0
            and r["consistent"]
            and r["applied_seq"] >= newest
            and peer["acked_seq"] >= newest
        ):
            return dict(rep)
        time.sleep(0.1)
    raise AssertionError(f"replica {replica.name} did not catch up via {address}: {last}")


def run_client(args: list[str], *, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a client program with a timeout (subprocess kills it when the timeout expires)."""
    return subprocess.run(
        args,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def fio_args(
    url: str,
    *,
    size: str,
    bs: str = "4k",
    offset: str = "0",
    seed: int = 1,
    iodepth: int = 16,
    verify: bool = True,
) -> list[str]:
    """A bounded fio random-write job on an NBD export (``size`` bytes from ``offset``)."""
    args = [
        "fio",
        "--name=link",
        "--ioengine=nbd",
        f"--uri={url}",
        "--rw=randwrite",
        f"--bs={bs}",
        f"--iodepth={iodepth}",
        f"--offset={offset}",
        f"--size={size}",
        f"--randseed={seed}",
        "--verify_state_save=0",
    ]
    if verify:
        args += ["--verify=crc32c", "--do_verify=1", "--verify_fatal=1"]
    return args


def fio_write(url: str, cwd: Path, **job: Any) -> None:
    """Run :func:`fio_args` to completion; fails unless fio exits 0 with no I/O error."""
    proc = subprocess.run(
        fio_args(url, **job),
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0 and "err= 0" in proc.stdout, proc.stdout + proc.stderr


def qemu_img_compare(a: Path, b: Path) -> None:
    """Byte-for-byte comparison of two raw images (qemu-img compare exits 0 when identical)."""
    proc = run_client(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)])
    assert proc.returncode == 0, f"{a} and {b} differ: {proc.stdout}{proc.stderr}"


def qemu_write(site: Site, pattern: int, offset: int, length: str, volume: str = "vol") -> None:
    """Write ``length`` bytes of ``pattern`` at ``offset`` through the site's export (qemu-io),
    and fail unless it succeeded."""
    assert site.unit is not None
    command = f"write -P {pattern} {offset} {length}"
    done = run_client(["qemu-io", "-f", "raw", "-c", command, site.unit.export_url(volume)])
    assert done.returncode == 0, done.stderr
