"""What the WAN link's features cost (issue 13), measured in one run.

1. Compression: the link's own :class:`~blockmirror.link.compression.Compressor` over 1 MiB
   frames (a RECORDS frame's usual size under load) at zstd levels 1 and 3, on random data and
   on a mixed filesystem image (ext4 made by ``mkfs.ext4 -d`` from Python's standard library:
   text, byte code and shared objects). Prints the ratio and CPU seconds per MiB (process time,
   so it is the compressing thread's cost whatever else the machine does), and decompression's.
2. ``skip_unchanged``: fio against a journaled primary with it off and on, same run, side by
   side: new data (every compare fails: the pure cost of the check) and a rewrite of the same
   data (every compare succeeds: nothing is journaled).

Run from the repository root: ``.venv/bin/python benchmarks/bench_wan.py``. Never fails on a
threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.pair import MiB, topology

from blockmirror.link.compression import Codec, Compressor, decompress

FRAME = MiB


def filesystem_image(path: Path, size_mib: int) -> bytes:
    """The first ``size_mib`` MiB of an ext4 image of the standard library (without its tests
    and the installed packages), as a host's disk would hold it."""
    source = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    tree = path.parent / "tree"
    shutil.copytree(
        source, tree, ignore=shutil.ignore_patterns("test", "tests", "__pycache__", "site-packages")
    )
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(tree), str(path), f"{max(size_mib, 512)}M"],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(tree)
    with path.open("rb") as f:
        return f.read(size_mib * MiB)


def compression(data: bytes, level: int) -> tuple[float, float, float]:
    """(ratio, CPU s per MiB compressing, CPU s per MiB decompressing) over 1 MiB frames."""
    compressor = Compressor(Codec.ZSTD, level)
    frames = [data[i : i + FRAME] for i in range(0, len(data), FRAME)]
    start = time.process_time()
    packed = [compressor.compress(f) for f in frames]
    spent = time.process_time() - start
    wire = sum(len(p) if p is not None else len(f) for p, f in zip(packed, frames, strict=True))
    start = time.process_time()
    for p in packed:
        if p is not None:
            decompress(memoryview(p), compressor.flag, 64 * MiB)
    unpacked = time.process_time() - start
    mib = len(data) / MiB
    return len(data) / wire, spent / mib, unpacked / mib


def fio(url: str, rw: str, bs: str, size: str, pattern: str, cwd: Path) -> float:
    """MiB/s of one fio write job whose every block holds ``pattern``."""
    done = subprocess.run(
        [
            "fio", "--name=w", "--ioengine=nbd", f"--uri={url}", f"--rw={rw}", f"--bs={bs}",
            "--iodepth=16", f"--size={size}", f"--buffer_pattern={pattern}",
            "--output-format=json",
            "--randrepeat=1", "--norandommap",
        ],
        check=True, capture_output=True, text=True, cwd=cwd,
    )  # fmt: skip
    job = json.loads(done.stdout[done.stdout.index("{") :])["jobs"][0]["write"]
    return float(job["bw_bytes"]) / MiB


def skip_unchanged(root: Path, size: int) -> list[tuple[str, float, float]]:
    out = []
    with topology(root) as topo:
        off = topo.add_primary("off", peers=[], size=size, journal_size="512MiB")
        on = topo.add_primary(
            "on", peers=[], size=size, journal_size="512MiB", extra={"skip_unchanged": True}
        )
        units = {"off": off.start(), "on": on.start()}
        for name, rw, bs, pattern in (
            ("new data, random 4 KiB", "randwrite", "4k", "0x5a"),
            ("new data, seq 1 MiB", "write", "1M", "0xa5"),
        ):
            rates = {}
            for which, unit in units.items():
                # Each job writes a pattern the volume does not hold yet, so every compare
                # fails: the check's whole cost.
                rates[which] = fio(unit.export_url("vol"), rw, bs, f"{size // MiB}M", pattern, root)
            out.append((name, rates["off"], rates["on"]))
        # The last job again: identical data at identical offsets.
        rates = {}
        for which, unit in units.items():
            rates[which] = fio(
                unit.export_url("vol"), "write", "1M", f"{size // MiB}M", "0xa5", root
            )
        out.append(("rewrite of the same data, seq 1 MiB", rates["off"], rates["on"]))
        skipped = on.volume_status()["journal"]["unchanged"]["skipped_bytes"]
        print(f"(skip_unchanged skipped {skipped / MiB:.0f} MiB in all)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="MiB of data per figure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-wan-") as tmp:
        root = Path(tmp)
        samples = {
            "random": os.urandom(args.size * MiB),
            "ext4 image of a source tree": filesystem_image(root / "fs.img", args.size),
        }
        print(f"compression, 1 MiB frames, {args.size} MiB each")
        print(f"{'data':30} {'level':>5} {'ratio':>7} {'CPU ms/MiB':>11} {'decode ms/MiB':>14}")
        for name, data in samples.items():
            for level in (1, 3):
                ratio, cpu, decode = compression(data, level)
                print(f"{name:30} {level:5} {ratio:7.2f} {cpu * 1e3:11.2f} {decode * 1e3:14.2f}")
        print()
        print(f"skip_unchanged, fio iodepth 16, {args.size} MiB volumes, MiB/s")
        print(f"{'job':40} {'off':>8} {'on':>8} {'on/off':>7}")
        for name, off, on in skip_unchanged(root, args.size * MiB):
            print(f"{name:40} {off:8.1f} {on:8.1f} {on / off:7.2f}")


if __name__ == "__main__":
    main()
