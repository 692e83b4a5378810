"""``blockmirror demo``: a unit with a file-backed volume, driven through its real NBD export.

The workload is written with the project's own NBD client while an in-memory model records what the
volume must contain; at the end the export and the file itself are checked against the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from blockmirror.admin.table import format_status_table, human_size
from blockmirror.config import parse_config
from blockmirror.daemon import Unit
from blockmirror.frontend.nbd_client import NbdClient
from blockmirror.units import format_size, parse_size

BLOCK = 64 * 1024
QUEUE_DEPTH = 8
CHUNK = 4 * 1024 * 1024


def _say(text: str = "") -> None:
    print(text, flush=True)


async def run_demo(
    directory: Path | None, *, size: str, duration: float, keep_running: bool
) -> int:
    size_bytes = parse_size(size, key="--size")
    if size_bytes < BLOCK or size_bytes % BLOCK:
        _say(f"--size must be a multiple of {format_size(BLOCK)}")
        return 2
    directory = directory or Path(tempfile.mkdtemp(prefix="blockmirror-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    image = directory / "primary.img"
    config = parse_config(
        {
            "unit": {
                "name": "demo-primary",
                "state_dir": str(directory / "state"),
                "admin": "127.0.0.1:0",
            },
            "volume": [
                {
                    "name": "demo",
                    "role": "primary",
                    "path": str(image),
                    "size": size_bytes,
                    "export": "127.0.0.1:0",
                    "description": "blockmirror demo volume",
                }
            ],
        },
        base_dir=directory,
    )
    _say(f"blockmirror demo: files in {directory}")
    unit = Unit(config)
    await unit.start()
    try:
        runtime = unit.volumes[0]
        assert runtime.server is not None and unit.admin is not None
        host, port = runtime.server.address
        admin_host, admin_port = unit.admin.address
        _say(f"volume 'demo' ({format_size(size_bytes)}) exported at nbd://{host}:{port}/demo")
        _say(f"admin API at http://{admin_host}:{admin_port}/  (JSON at /api/status)")
        _say(
            f"writing random {format_size(BLOCK)} blocks for {duration:.0f} s, "
            f"{QUEUE_DEPTH} in flight, flushing every second"
        )
        model = bytearray(size_bytes)
        ok = await _workload(host, port, model, duration)
        ok = await _verify(host, port, image, model) and ok
        _say()
        _say(format_status_table(unit.status()))
        if keep_running:
            _say(f"\nstill serving nbd://{host}:{port}/demo; press Ctrl-C to stop")
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
    finally:
        await unit.stop()
    _say("\ndemo " + ("PASSED: the volume holds exactly what the host wrote" if ok else "FAILED"))
    return 0 if ok else 1


async def _workload(host: str, port: int, model: bytearray, duration: float) -> bool:
    rng = random.Random(0xB10C)
    blocks = len(model) // BLOCK
    client = await NbdClient.connect(host, port, "demo")
    written = writes = flushes = 0
    start = last_report = last_flush = time.monotonic()
    sem = asyncio.Semaphore(QUEUE_DEPTH)
    tasks: set[asyncio.Task[None]] = set()

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
            written += BLOCK
            writes += 1
            now = time.monotonic()
            if now - last_flush >= 1.0:
                await asyncio.gather(*tasks)
                await client.flush()
                flushes += 1
                last_flush = now
            if now - last_report >= 0.5:
                rate = written / (now - start) / 2**20
                sys.stdout.write(
                    f"\r  written {human_size(written):>10}  writes {writes:>7}  "
                    f"flushes {flushes:>3}  {rate:7.1f} MiB/s"
                )
                sys.stdout.flush()
                last_report = now
        await asyncio.gather(*tasks)
        await client.flush()
    finally:
        await client.close()
    elapsed = time.monotonic() - start
    _say(
        f"\r  written {human_size(written):>10}  writes {writes:>7}  flushes {flushes + 1:>3}  "
        f"{written / elapsed / 2**20:7.1f} MiB/s"
    )
    return True


async def _verify(host: str, port: int, image: Path, model: bytearray) -> bool:
    expected = hashlib.sha256(model).hexdigest()
    client = await NbdClient.connect(host, port, "demo")
    digest = hashlib.sha256()
    try:
        for offset in range(0, len(model), CHUNK):
            digest.update(await client.read(offset, min(CHUNK, len(model) - offset)))
    finally:
        await client.close()
    via_export = digest.hexdigest()
    file_digest = hashlib.sha256()
    fd = os.open(image, os.O_RDONLY)
    try:
        for offset in range(0, len(model), CHUNK):
            file_digest.update(os.pread(fd, CHUNK, offset))
    finally:
        os.close(fd)
    on_disk = file_digest.hexdigest()
    _say(f"  expected       sha256 {expected[:16]}…")
    for label, digest_hex in (("read via NBD ", via_export), ("volume file  ", on_disk)):
        verdict = "ok" if digest_hex == expected else "MISMATCH"
        _say(f"  {label}  sha256 {digest_hex[:16]}…  {verdict}")
    return via_export == expected == on_disk
