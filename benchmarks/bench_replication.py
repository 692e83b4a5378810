"""Replication on loopback: what a peer costs the host, how fast a backlog drains, and memory.

Three measurements, each against its own baseline in the same run:

1. Host write throughput through the primary's export with one peer (a secondary unit on
   loopback) against the same primary with no peer: fio sequential 1 MiB writes at iodepth 8
   and random 4 KiB writes at iodepth 16. Ratio with-peer / no-peer; target >= 0.8.
2. Catch-up rate: the secondary is stopped, the host writes a backlog (default 1 GiB) into the
   journal, the secondary starts again, and the time until it has applied everything is
   measured. Target >= 300 MiB/s.
3. Peak memory (VmHWM) of the primary unit with that backlog, against the same run with a
   quarter of the backlog: bounded memory means the two are about the same.

Run from the repository root: ``.venv/bin/python benchmarks/bench_replication.py``. It never
fails on a threshold; it prints the figures and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.pair import (
    MiB,
    peer_address,
    topology,
    wait_caught_up,
)

JOBS = {
    "seq write 1M qd8": ["--rw=write", "--bs=1M", "--iodepth=8"],
    "randwrite 4k qd16": ["--rw=randwrite", "--bs=4k", "--iodepth=16"],
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fio(url: str, cwd: Path, args: list[str], size: int, runtime: int) -> float:
    """Run one fio job; returns MiB/s written."""
    proc = subprocess.run(
        [
            "fio",
            "--name=bench",
            "--ioengine=nbd",
            f"--uri={url}",
            *args,
            f"--size={size}",
            "--time_based",
            f"--runtime={runtime}",
            "--ramp_time=1",
            "--output-format=json",
            "--verify_state_save=0",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        timeout=runtime * 10 + 60,
    )
    text = proc.stdout[proc.stdout.index("{") :]
    job = json.loads(text)["jobs"][0]
    return float(job["write"]["bw_bytes"]) / MiB


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def host_throughput(
    root: Path, size: int, runtime: int, repeat: int, replication: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Medians of each job with a peer and without, alternating which runs first."""
    results: dict[str, dict[str, list[float]]] = {job: {"peer": [], "no peer": []} for job in JOBS}
    (root / "tput").mkdir()
    with topology(root / "tput") as topo:
        b = topo.add_secondary(
            "b", volumes={"vol": size}, journal_size="1GiB", replication=replication
        )
        a = topo.add_primary(
            "a", peers=[peer_address(b)], size=size, journal_size="1GiB", replication=replication
        )
        alone = topo.add_primary("alone", peers=[], size=size, journal_size="1GiB")
        b.start()
        pa = a.start()
        solo = alone.start()
        wait_caught_up(a, b, timeout=300)
        for i in range(repeat):
            for job, args in JOBS.items():
                order = [("peer", pa), ("no peer", solo)]
                if i % 2:
                    order.reverse()
                for label, unit in order:
                    mib = fio(unit.export_url("vol"), root, args, size, runtime)
                    results[job][label].append(mib)
                    log(f"  {job:<18} {label:<8} run {i + 1}: {mib:8.1f} MiB/s")
                # Let the peer drain between runs so each starts with no backlog.
                wait_caught_up(a, b, timeout=300)
    out: dict[str, Any] = {}
    for job, runs in results.items():
        peer = statistics.median(runs["peer"])
        none = statistics.median(runs["no peer"])
        out[job] = {"peer": peer, "no_peer": none, "ratio": peer / none, "runs": runs}
    return out


def catch_up(
    root: Path, backlog: int, size: int, replication: dict[str, Any] | None = None
) -> dict[str, Any]:
    with topology(root) as topo:
        b = topo.add_secondary(
            "b", volumes={"vol": size}, journal_size="1GiB", replication=replication
        )
        journal = f"{backlog // MiB + 256}MiB"
        a = topo.add_primary(
            "a", peers=[peer_address(b)], size=size, journal_size=journal, replication=replication
        )
        b.start()
        pa = a.start()
        wait_caught_up(a, b, timeout=300)
        b.kill()
        subprocess.run(
            [
                "fio",
                "--name=backlog",
                "--ioengine=nbd",
                f"--uri={pa.export_url('vol')}",
                "--rw=write",
                "--bs=1M",
                "--iodepth=8",
                f"--io_size={backlog}",
                f"--size={size}",
                "--verify_state_save=0",
            ],
            cwd=root,
            capture_output=True,
            check=True,
            timeout=600,
        )
        peer = a.volume_status()["peers"][0]
        lag = int(peer["lag_bytes"])
        started = time.monotonic()
        b.start()
        wait_caught_up(a, b, timeout=900)
        seconds = time.monotonic() - started
        rss = peak_rss_kib(pa.pid)
        return {
            "backlog_bytes": lag,
            "mode_before": peer["mode"],
            "seconds": seconds,
            "mib_per_second": lag / MiB / seconds,
            "primary_peak_rss_mib": rss / 1024,
        }


def disk_write_rate(root: Path, total: int) -> float:
    """MiB/s of sequential 8 MiB writes with an fdatasync every 64 MiB: the disk's own pace.

    A secondary must make what it receives durable before acknowledging it, so a catch-up can
    never beat this; it is the named baseline the catch-up rate is compared with.
    """
    path = root / "disk-probe"
    chunk = bytes(range(256)) * (8 * MiB // 256)
    started = time.monotonic()
    with path.open("wb") as f:
        written = 0
        while written < total:
            f.write(chunk)
            written += len(chunk)
            if written % (64 * MiB) == 0:
                f.flush()
                os.fdatasync(f.fileno())
        f.flush()
        os.fdatasync(f.fileno())
    seconds = time.monotonic() - started
    path.unlink()
    return total / MiB / seconds


def seal_throughput(seconds: float = 1.0) -> dict[str, dict[str, float]]:
    """MiB/s of one core sealing and opening link frames (session_crypto, ChaCha20-Poly1305),
    in process with the daemon's malloc tuning: the CPU a sealed session adds per byte, without
    the noise of the units, fio and the disk."""
    from blockmirror.io.allocator import tune_malloc
    from blockmirror.link.protocol import FRAME_HEADER_SIZE, Hello
    from blockmirror.link.session_crypto import CHACHA20_POLY1305, Opener, Sealer, derive_keys

    tune_malloc()
    hello = Hello(1, "a", "vol", "j", 1 << 30, "0a" * 32, "psk", None, CHACHA20_POLY1305)
    key = derive_keys(b"benchmark pre-shared key", "0a" * 32, "0b" * 32, hello).source
    out: dict[str, dict[str, float]] = {}
    for size in (4 * MiB, MiB, 64 * 1024, 4096):
        frame = [bytes(FRAME_HEADER_SIZE), os.urandom(size)]
        sealer = Sealer(key)
        count, began = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - began) < seconds:
            sealer.seal(frame)  # what a sender does per frame (the join included)
            count += 1
        sealed = count * size / MiB / elapsed
        sealer = Sealer(key)
        records = [b"".join(sealer.seal(frame)) for _ in range(8)]
        count, began = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - began) < seconds:
            opener = Opener(key)  # a session of 8 records, opened again and again
            for record in records:
                opener.feed(record)
            count += len(records)
        out[f"{size // 1024} KiB"] = {"seal": sealed, "open": count * size / MiB / elapsed}
    return out


def _run_catch_up(
    root: Path, name: str, backlog: int, size: int, replication: dict[str, Any] | None = None
) -> dict[str, Any]:
    where = root / name
    where.mkdir()
    result = catch_up(where, backlog, size, replication)
    log(f"  catch-up {backlog // MiB} MiB: {result}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="work directory on a real disk (default: a temp dir)")
    parser.add_argument("--size", type=int, default=1024, help="volume size in MiB")
    parser.add_argument("--backlog", type=int, default=1024, help="backlog in MiB")
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="256 MiB, 2 s runs, one repeat")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument(
        "--psk",
        action="store_true",
        help="give both units a pre-shared key (no TLS): links are sealed (ChaCha20-Poly1305)",
    )
    parser.add_argument(
        "--seal-only",
        action="store_true",
        help="only measure sealing and opening link frames in process (one core), then exit",
    )
    args = parser.parse_args(argv)
    if args.seal_only:
        print("| frame payload | seal (one core) | open (one core) |")
        print("|---|---:|---:|")
        for size, r in seal_throughput().items():
            print(f"| {size} | {r['seal']:.0f} MiB/s | {r['open']:.0f} MiB/s |")
        return 0
    if args.quick:
        args.size, args.backlog, args.runtime, args.repeat = 256, 128, 2, 1
    size, backlog = args.size * MiB, args.backlog * MiB
    root = Path(args.dir or tempfile.mkdtemp(prefix="bm-repl-bench-", dir="/var/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    replication: dict[str, Any] | None = None
    if args.psk:
        key = root / "psk"
        key.write_text("benchmark pre-shared key 0123456789\n")
        key.chmod(0o600)
        replication = {"psk_file": str(key)}
    try:
        log("host throughput, with and without a peer:")
        tput = host_throughput(root, size, args.runtime, args.repeat, replication)
        log("disk baseline:")
        disk = disk_write_rate(root, backlog)
        log(f"  sequential write + fdatasync: {disk:.0f} MiB/s")
        log("catch-up and memory:")
        full = _run_catch_up(root, "full", backlog, max(size, backlog), replication)
        quarter = _run_catch_up(root, "quarter", backlog // 4, max(size, backlog), replication)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print("| measurement | with peer | baseline | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    for job, r in tput.items():
        verdict = "met" if r["ratio"] >= 0.8 else "missed"
        print(
            f"| host {job} | {r['peer']:.0f} MiB/s | {r['no_peer']:.0f} MiB/s (no peer) | "
            f"{r['ratio']:.2f} | >= 0.8 ({verdict}) |"
        )
    rate = full["mib_per_second"]
    print(
        f"| catch-up of {full['backlog_bytes'] // MiB} MiB | {rate:.0f} MiB/s | "
        f"{disk:.0f} MiB/s (disk write + sync) | {rate / disk:.2f} | "
        f">= 300 MiB/s ({'met' if rate >= 300 else 'missed'}) |"
    )
    ratio = full["primary_peak_rss_mib"] / max(quarter["primary_peak_rss_mib"], 1)
    print(
        f"| primary peak RSS, {full['backlog_bytes'] // MiB} MiB backlog | "
        f"{full['primary_peak_rss_mib']:.0f} MiB | {quarter['primary_peak_rss_mib']:.0f} MiB "
        f"({quarter['backlog_bytes'] // MiB} MiB backlog) | {ratio:.2f} | bounded (~1.0) |"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"throughput": tput, "catch_up": full, "catch_up_quarter": quarter}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
