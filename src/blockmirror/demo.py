"""``blockmirror demo``: a primary and a secondary on loopback, driven through the real export.

Both units run in this process with file-backed volumes in a directory the demo names. A host
workload goes through the primary's NBD export with the project's own client; progress shows what
was written, journaled and replicated, and the lag. At the end the replica is compared with the
volume byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from blockmirror.admin.table import format_status_table
from blockmirror.config import parse_config
from blockmirror.daemon import Unit
from blockmirror.frontend.nbd_client import NbdClient
from blockmirror.units import format_size, human_size, parse_size

BLOCK = 64 * 1024
QUEUE_DEPTH = 8
CHUNK = 4 * 1024 * 1024
CATCH_UP_TIMEOUT = 120.0


def _say(text: str = "") -> None:
    print(text, flush=True)


def _configs(directory: Path, size: int, secondary_port: int | None) -> dict[str, Any]:
    if secondary_port is None:
        return {
            "unit": {
                "name": "demo-secondary",
                "state_dir": str(directory / "secondary-state"),
                "admin": "127.0.0.1:0",
            },
            "replication": {"listen": "127.0.0.1:0"},
            "volume": [
                {
                    "name": "demo",
                    "role": "secondary",
                    "path": str(directory / "secondary.img"),
                    "size": size,
                    "journal_size": "64MiB",
                }
            ],
        }
    return {
        "unit": {
            "name": "demo-primary",
            "state_dir": str(directory / "primary-state"),
            "admin": "127.0.0.1:0",
        },
        "volume": [
            {
                "name": "demo",
                "role": "primary",
                "path": str(directory / "primary.img"),
                "size": size,
                "export": "127.0.0.1:0",
                "journal_size": "256MiB",
                "peers": [f"127.0.0.1:{secondary_port}"],
                "description": "blockmirror demo volume",
            }
        ],
    }


async def run_demo(
    directory: Path | None, *, size: str, duration: float, keep_running: bool
) -> int:
    size_bytes = parse_size(size, key="--size")
    if size_bytes < BLOCK or size_bytes % BLOCK:
        _say(f"--size must be a multiple of {format_size(BLOCK)}")
        return 2
    directory = directory or Path(tempfile.mkdtemp(prefix="blockmirror-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    _say(f"blockmirror demo: files in {directory}")
    secondary = Unit(parse_config(_configs(directory, size_bytes, None), base_dir=directory))
    await secondary.start()
    primary: Unit | None = None
    try:
        assert secondary.replication is not None
        _, listen_port = secondary.replication.address
        primary = Unit(
            parse_config(_configs(directory, size_bytes, listen_port), base_dir=directory)
        )
        await primary.start()
        ok = await _drive(primary, secondary, directory, size_bytes, duration)
        _say()
        _say(format_status_table(primary.status()))
        _say()
        _say(format_status_table(secondary.status()))
        if keep_running:
            assert primary.admin is not None
            _say("\nstill running; press Ctrl-C to stop")
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
    finally:
        if primary is not None:
            await primary.stop()
        await secondary.stop()
    _say("\ndemo " + ("PASSED: the replica is identical to the volume" if ok else "FAILED"))
    return 0 if ok else 1


async def _drive(
    primary: Unit, secondary: Unit, directory: Path, size: int, duration: float
) -> bool:
    prt = primary.runtime("demo")
    assert prt.server is not None and primary.admin is not None and secondary.admin is not None
    host, port = prt.server.address
    _say(f"primary   volume 'demo' ({format_size(size)}) exported at nbd://{host}:{port}/demo")
    _say("          admin http://{}:{}/".format(*primary.admin.address))
    _say("secondary admin http://{}:{}/".format(*secondary.admin.address))
    _say(f"          (sign in with the token in {directory / 'primary-state' / 'admin.token'})")
    _say("waiting for the initial sync of the new replica …")
    if not await _caught_up(primary, secondary, timeout=CATCH_UP_TIMEOUT):
        _say("the initial sync did not finish")
        return False
    _say(
        f"writing random {format_size(BLOCK)} blocks for {duration:.0f} s, "
        f"{QUEUE_DEPTH} in flight, flushing every second"
    )
    model = bytearray(size)
    await _workload(primary, host, port, model, duration)
    _say("waiting for the secondary to catch up …")
    if not await _caught_up(primary, secondary, timeout=CATCH_UP_TIMEOUT):
        _say("the secondary did not catch up")
        return False
    expected = hashlib.sha256(model).hexdigest()
    on_primary = _file_hash(directory / "primary.img", size)
    on_secondary = _file_hash(directory / "secondary.img", size)
    _say(f"  host wrote       sha256 {expected[:16]}…")
    for label, digest in (("primary volume", on_primary), ("replica       ", on_secondary)):
        _say(f"  {label}   sha256 {digest[:16]}…  {'ok' if digest == expected else 'MISMATCH'}")
    return expected == on_primary == on_secondary


def _progress(primary: Unit) -> dict[str, Any]:
    vol = primary.status()["volumes"][0]
    peer = vol["peers"][0] if vol["peers"] else {}
    return {
        "written": vol["counters"]["bytes_written"],
        "journaled": vol["journal"]["newest_seq"] if vol["journal"] else 0,
        "replicated": peer.get("acked_seq", 0),
        "lag": peer.get("lag_bytes", 0),
        "state": peer.get("state", "?"),
    }


async def _caught_up(primary: Unit, secondary: Unit, *, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = primary.status()["volumes"][0]
        s = secondary.status()["volumes"][0]
        peer = p["peers"][0]
        replica = s["replica"] or {}
        newest = p["journal"]["newest_seq"]
        if (
            peer["state"] == "replicating"
            and peer["lag_bytes"] == 0
            and replica.get("consistent")
            and replica.get("applied_seq", -1) >= newest
        ):
            return True
        sys.stdout.write(
            f"\r  {peer['state']:<11} lag {human_size(int(peer['lag_bytes'])):>10}  "
            f"replica applied {replica.get('applied_seq', 0)} of {newest}   "
        )
        sys.stdout.flush()
        await asyncio.sleep(0.25)
    return False


async def _workload(primary: Unit, host: str, port: int, model: bytearray, duration: float) -> None:
    rng = random.Random(0xB10C)
    blocks = len(model) // BLOCK
    client = await NbdClient.connect(host, port, "demo")
    sem = asyncio.Semaphore(QUEUE_DEPTH)
    tasks: set[asyncio.Task[None]] = set()
    start = last_report = last_flush = time.monotonic()

    async def one(offset: int, data: bytes) -> None:
        try:
            await client.write(offset, data)
        finally:
            sem.release()

    try:
        while time.monotonic() - start < duration:
            await sem.acquire()
            offset = rng.randrange(blocks) * BLOCK
            data = rng.randbytes(BLOCK)
            model[offset : offset + BLOCK] = data
            task = asyncio.create_task(one(offset, data))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            now = time.monotonic()
            if now - last_flush >= 1.0:
                await asyncio.gather(*tasks)
                await client.flush()
                last_flush = now
            if now - last_report >= 0.5:
                p = _progress(primary)
                sys.stdout.write(
                    f"\r  written {human_size(p['written']):>10}  journaled seq {p['journaled']:>7}"
                    f"  replicated seq {p['replicated']:>7}  lag {human_size(p['lag']):>10}  "
                    f"({p['state']})   "
                )
                sys.stdout.flush()
                last_report = now
        await asyncio.gather(*tasks)
        await client.flush()
    finally:
        await client.close()
    _say()


def _file_hash(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        remaining = size
        while remaining:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                chunk = bytes(min(CHUNK, remaining))  # a sparse tail reads as zeros
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()
