"""Replication on loopback: what a peer costs the host, how fast a backlog drains, and memory.

Three measurements, each against its own baseline in the same run:

1. Host write throughput through the primary's export with one peer (a secondary unit on
   loopback) against the same primary with no peer: fio sequential 1 MiB writes at iodepth 8
   and random 4 KiB writes at iodepth 16. Ratio with-peer / no-peer (reported); and the
   primary's CPU per MiB written (its process's user + system time over the fio run, divided
   by what fio wrote), one peer against none: issue 15's target is at most 1.3x.
2. Catch-up rate: the secondary is stopped, the host writes a backlog (default 1 GiB) into the
   journal, the secondary starts again, and the time until the secondary has applied
   everything is measured from the secondary's start (issue 15: at least 0.8 of the disk's own
   write-and-sync rate, measured in the same run) and from the primary's new handshake (the
   transfer alone; the difference is the reconnect).
3. Peak memory (VmHWM) of the primary unit with that backlog (issue 15: at most 150 MiB),
   against the same run with a quarter of the backlog: bounded memory means the two are about
   the same.

With ``--baseline-rev REV`` the with-peer throughput and the catch-up rate are also measured
for a pair of units (primary and secondary) run from an older commit's tree (``git archive
REV`` into the work directory), interleaved with the current tree's, and the new/old ratios
are printed, marking any below 0.95.

Run from the repository root: ``.venv/bin/python benchmarks/bench_replication.py``. It never
fails on a threshold; it prints the figures and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.pair import (
    MiB,
    Site,
    peer_address,
    topology,
    wait_caught_up,
)
from tests.support.unit_process import UnitProcess

from benchmarks.baseline_tree import (
    MIN_RATIO,
    SourceTree,
    current_tree,
    extract_tree,
    ratio_mark,
    resolve_revision,
)
from benchmarks.bench_export import process_cpu_seconds, stop_on_signal

# The with-peer runs of the baseline tree's pair, next to "peer" and "no peer".
BASE_PEER = "peer (baseline)"

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


def fio_with_cpu(
    url: str, cwd: Path, args: list[str], size: int, runtime: int, pid: int
) -> tuple[float, float | None]:
    """:func:`fio`, and the CPU the process ``pid`` spent per MiB written (µs), from its CPU
    cores over the run and fio's rate (the ramp is counted on both sides alike)."""
    before = process_cpu_seconds(pid)
    began = time.monotonic()
    mib = fio(url, cwd, args, size, runtime)
    elapsed = time.monotonic() - began
    after = process_cpu_seconds(pid)
    if before is None or after is None or mib <= 0:
        return mib, None
    return mib, (after - before) / elapsed / mib * 1e6


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def start_from(tree: SourceTree, site: Site) -> UnitProcess:
    """Start ``site``'s unit from ``tree``'s code (``start_unit`` passes on ``os.environ``)."""
    with tree.activated():
        unit = site.start()
    tree.check_process(unit.pid)
    return unit


def settle(sites: Iterable[Site]) -> None:
    """fsync every unit's volume images and journals: a run's dirty pages would otherwise be
    written back during whichever run comes next, so the order of the runs would matter."""
    for site in sites:
        for path in [*site.images.values(), *site.state.glob("*.journal")]:
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def host_throughput(
    root: Path,
    size: int,
    runtime: int,
    repeat: int,
    replication: dict[str, Any] | None = None,
    baseline: SourceTree | None = None,
) -> dict[str, Any]:
    """Medians of each job with a peer and without (and with a peer on the baseline tree's
    pair), rotating which runs first."""
    current = current_tree()
    labels = ["peer", "no peer"] + ([BASE_PEER] if baseline is not None else [])
    results: dict[str, dict[str, list[float]]] = {
        job: {label: [] for label in labels} for job in JOBS
    }
    cpu: dict[str, dict[str, list[float]]] = {job: {label: [] for label in labels} for job in JOBS}
    (root / "tput").mkdir()
    with topology(root / "tput") as topo:
        b = topo.add_secondary(
            "b", volumes={"vol": size}, journal_size="1GiB", replication=replication
        )
        a = topo.add_primary(
            "a", peers=[peer_address(b)], size=size, journal_size="1GiB", replication=replication
        )
        alone = topo.add_primary("alone", peers=[], size=size, journal_size="1GiB")
        pairs = [(a, b)]
        start_from(current, b)
        units = {"peer": start_from(current, a), "no peer": start_from(current, alone)}
        log(f"  a, b, alone: the current tree, {current.probe()}")
        if baseline is not None:
            b_old = topo.add_secondary(
                "b-base", volumes={"vol": size}, journal_size="1GiB", replication=replication
            )
            a_old = topo.add_primary(
                "a-base",
                peers=[peer_address(b_old)],
                size=size,
                journal_size="1GiB",
                replication=replication,
            )
            start_from(baseline, b_old)
            units[BASE_PEER] = start_from(baseline, a_old)
            pairs.append((a_old, b_old))
            log(f"  a-base, b-base: the {baseline.label} tree, {baseline.probe()}")
        for source, replica in pairs:
            wait_caught_up(source, replica, timeout=300)
        # One unmeasured round first: the volumes are new sparse files, and the first writes
        # into them allocate their blocks (CPU charged to the unit, a fraction of the rate).
        for args in JOBS.values():
            for label in labels:
                fio(units[label].export_url("vol"), root, args, size, runtime)
            for source, replica in pairs:
                wait_caught_up(source, replica, timeout=300)
        settle(topo.sites.values())
        for i in range(repeat):
            for job, args in JOBS.items():
                # Rotated by one each round: with two labels, the reverse every other round.
                shift = i % len(labels)
                for label in labels[shift:] + labels[:shift]:
                    unit = units[label]
                    mib, per_mib = fio_with_cpu(
                        unit.export_url("vol"), root, args, size, runtime, unit.pid
                    )
                    results[job][label].append(mib)
                    if per_mib is not None:
                        cpu[job][label].append(per_mib)
                    log(
                        f"  {job:<18} {label:<15} run {i + 1}: {mib:8.1f} MiB/s, primary CPU"
                        f" {per_mib or 0:.0f} µs/MiB"
                    )
                    # Let the peer drain between runs so each starts with no backlog, and
                    # write back what it dirtied, so the next run does not pay for that.
                    for source, replica in pairs:
                        wait_caught_up(source, replica, timeout=300)
                    settle(topo.sites.values())
    out: dict[str, Any] = {}
    for job, runs in results.items():
        peer = statistics.median(runs["peer"])
        none = statistics.median(runs["no peer"])
        out[job] = {"peer": peer, "no_peer": none, "ratio": peer / none, "runs": runs}
        if cpu[job]["peer"] and cpu[job]["no peer"]:
            cpu_peer = statistics.median(cpu[job]["peer"])
            cpu_none = statistics.median(cpu[job]["no peer"])
            out[job] |= {
                "primary_cpu_us_per_mib_peer": cpu_peer,
                "primary_cpu_us_per_mib_no_peer": cpu_none,
                "primary_cpu_ratio": cpu_peer / cpu_none,
                "primary_cpu_runs": cpu[job],
            }
        if baseline is not None:
            old = statistics.median(runs[BASE_PEER])
            out[job] |= {
                "peer_baseline": old,
                "new_old": peer / old,
                "new_old_per_round": [
                    n / o for n, o in zip(runs["peer"], runs[BASE_PEER], strict=True)
                ],
            }
    return out


def catch_up(
    root: Path,
    backlog: int,
    size: int,
    replication: dict[str, Any] | None = None,
    tree: SourceTree | None = None,
) -> dict[str, Any]:
    """One catch-up of ``backlog`` bytes, both units run from ``tree`` (default: current)."""
    tree = tree or current_tree()
    with topology(root) as topo:
        b = topo.add_secondary(
            "b", volumes={"vol": size}, journal_size="1GiB", replication=replication
        )
        journal = f"{backlog // MiB + 256}MiB"
        a = topo.add_primary(
            "a", peers=[peer_address(b)], size=size, journal_size=journal, replication=replication
        )
        start_from(tree, b)
        pa = start_from(tree, a)
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
        start_from(tree, b)
        up = time.monotonic()  # its recovery done, its listener open (the runtime file)
        linked = wait_linked(a, int(peer["connects"]))
        wait_caught_up(a, b, timeout=900)
        done = time.monotonic()
        rss = peak_rss_kib(pa.pid)
        return {
            "backlog_bytes": lag,
            "mode_before": peer["mode"],
            # From the handshake: the transfer alone. From the secondary's start: what an
            # operator waits for, the reconnect included.
            "seconds": done - linked,
            "reconnect_wait_seconds": linked - started,
            "secondary_start_seconds": up - started,
            "mib_per_second": lag / MiB / (done - linked),
            "seconds_from_start": done - started,
            "mib_per_second_from_start": lag / MiB / (done - started),
            "primary_peak_rss_mib": rss / 1024,
            "tree": tree.label,
        }


def wait_linked(source: Site, connects_before: int, timeout: float = 60.0) -> float:
    """The time (monotonic) at which the source's peer completed a new handshake: its status's
    ``connects`` count went past ``connects_before``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(source.volume_status()["peers"][0]["connects"]) > connects_before:
            return time.monotonic()
        time.sleep(0.01)
    raise AssertionError(f"{source.name}'s peer did not connect again within {timeout}s")


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
    root: Path,
    name: str,
    backlog: int,
    size: int,
    replication: dict[str, Any] | None = None,
    tree: SourceTree | None = None,
) -> dict[str, Any]:
    where = root / name
    where.mkdir()
    result = catch_up(where, backlog, size, replication, tree)
    log(f"  catch-up {backlog // MiB} MiB: {result}")
    # Its units are stopped; its volumes and journals (several GiB) are not needed any more,
    # and with --baseline-rev there are 2 x --repeat of them.
    shutil.rmtree(where, ignore_errors=True)
    return result


def catch_up_rounds(
    root: Path,
    backlog: int,
    size: int,
    repeat: int,
    replication: dict[str, Any] | None,
    baseline: SourceTree,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``repeat`` catch-ups per tree, alternating which tree goes first; (current, baseline)."""
    current = current_tree()
    runs: dict[str, list[dict[str, Any]]] = {"current": [], "baseline": []}
    for i in range(repeat):
        order = [("current", current), ("baseline", baseline)]
        if i % 2:
            order.reverse()
        for key, tree in order:
            name = f"full-{key}-{i + 1}"
            runs[key].append(_run_catch_up(root, name, backlog, size, replication, tree))
    return runs["current"], runs["baseline"]


def median_of(runs: Sequence[dict[str, Any]], key: str) -> float:
    return float(statistics.median(float(r[key]) for r in runs))


def new_old_rows(
    tput: dict[str, Any],
    full_runs: Sequence[dict[str, Any]],
    base_runs: Sequence[dict[str, Any]],
    baseline: SourceTree,
) -> list[str]:
    """The Markdown table of new / old: with-peer throughput and catch-up rate per tree."""
    assert baseline.commit is not None
    lines = [
        f"new / old: the current tree over {baseline.label} ({baseline.commit[:12]}),"
        " primary and secondary from the same tree",
        "",
        f"| measurement | current | {baseline.label} | new / old | minimum | result | per round |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for job, r in tput.items():
        rounds = ", ".join(f"{x:.2f}" for x in r["new_old_per_round"])
        lines.append(
            f"| host {job}, with peer | {r['peer']:.0f} MiB/s | {r['peer_baseline']:.0f} MiB/s"
            f" | {r['new_old']:.2f} | ≥ {MIN_RATIO:.2f} | {ratio_mark(r['new_old'])} | {rounds} |"
        )
    new = median_of(full_runs, "mib_per_second")
    old = median_of(base_runs, "mib_per_second")
    rounds = ", ".join(
        f"{n['mib_per_second'] / o['mib_per_second']:.2f}"
        for n, o in zip(full_runs, base_runs, strict=True)
    )
    lines.append(
        f"| catch-up of {full_runs[0]['backlog_bytes'] // MiB} MiB | {new:.0f} MiB/s"
        f" | {old:.0f} MiB/s | {new / old:.2f} | ≥ {MIN_RATIO:.2f} | {ratio_mark(new / old)}"
        f" | {rounds} |"
    )
    new_rss = median_of(full_runs, "primary_peak_rss_mib")
    old_rss = median_of(base_runs, "primary_peak_rss_mib")
    lines.append(
        f"| primary peak RSS (lower is better) | {new_rss:.0f} MiB | {old_rss:.0f} MiB"
        f" | {new_rss / old_rss:.2f} | - | reported | - |"
    )
    return lines


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
        "--baseline-rev",
        metavar="REV",
        help="also measure the with-peer throughput and the catch-up rate with both units run"
        f" from REV's tree (git archive), and print new/old ratios (minimum {MIN_RATIO:.2f})",
    )
    parser.add_argument(
        "--seal-only",
        action="store_true",
        help="only measure sealing and opening link frames in process (one core), then exit",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_signal)
    if args.baseline_rev is not None:
        try:
            log(f"baseline {args.baseline_rev} = {resolve_revision(args.baseline_rev)}")
        except ValueError as exc:
            parser.error(str(exc))
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
    baseline: SourceTree | None = None
    base_runs: list[dict[str, Any]] = []
    try:
        if args.baseline_rev is not None:
            baseline = extract_tree(args.baseline_rev, root)
            log(f"baseline tree {baseline.describe()}")
        log("host throughput, with and without a peer:")
        tput = host_throughput(root, size, args.runtime, args.repeat, replication, baseline)
        log("disk baseline:")
        disk = disk_write_rate(root, backlog)
        log(f"  sequential write + fdatasync: {disk:.0f} MiB/s")
        log("catch-up and memory:")
        volume = max(size, backlog)
        if baseline is None:
            full_runs = [_run_catch_up(root, "full", backlog, volume, replication)]
        else:
            full_runs, base_runs = catch_up_rounds(
                root, backlog, volume, args.repeat, replication, baseline
            )
        quarter = _run_catch_up(root, "quarter", backlog // 4, volume, replication)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
        elif baseline is not None:
            shutil.rmtree(baseline.src.parent, ignore_errors=True)
    # The median run: one catch-up without --baseline-rev, --repeat of them with it.
    full = dict(full_runs[0])
    for name in ("mib_per_second", "mib_per_second_from_start", "primary_peak_rss_mib"):
        full[name] = median_of(full_runs, name)
    full["reconnect_wait_seconds"] = median_of(full_runs, "reconnect_wait_seconds")
    full["secondary_start_seconds"] = median_of(full_runs, "secondary_start_seconds")
    print("| measurement | with peer | baseline | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    for job, r in tput.items():
        print(
            f"| host {job} | {r['peer']:.0f} MiB/s | {r['no_peer']:.0f} MiB/s (no peer) | "
            f"{r['ratio']:.2f} | reported |"
        )
        if "primary_cpu_ratio" in r:
            ratio = r["primary_cpu_ratio"]
            print(
                f"| primary CPU per MiB, {job} | {r['primary_cpu_us_per_mib_peer']:.0f} µs |"
                f" {r['primary_cpu_us_per_mib_no_peer']:.0f} µs (no peer) | {ratio:.2f} |"
                f" ≤ 1.3 ({'met' if ratio <= 1.3 else 'missed'}) |"
            )
    rate = full["mib_per_second_from_start"]
    print(
        f"| catch-up of {full['backlog_bytes'] // MiB} MiB from the secondary's start |"
        f" {rate:.0f} MiB/s | {disk:.0f} MiB/s (disk write + sync) | {rate / disk:.2f} |"
        f" ≥ 0.8 ({'met' if rate >= 0.8 * disk else 'missed'}) |"
    )
    link_rate = full["mib_per_second"]
    print(
        f"| the same from link-up (link up {full['reconnect_wait_seconds']:.1f} s after the"
        f" start, {full['secondary_start_seconds']:.1f} s of it the secondary's own start) |"
        f" {link_rate:.0f} MiB/s | {disk:.0f} MiB/s | {link_rate / disk:.2f} | reported |"
    )
    rss = full["primary_peak_rss_mib"]
    ratio = rss / max(quarter["primary_peak_rss_mib"], 1)
    print(
        f"| primary peak RSS, {full['backlog_bytes'] // MiB} MiB backlog | "
        f"{rss:.0f} MiB | {quarter['primary_peak_rss_mib']:.0f} MiB "
        f"({quarter['backlog_bytes'] // MiB} MiB backlog) | {ratio:.2f} |"
        f" ≤ 150 MiB, flat ({'met' if rss <= 150 and ratio <= 1.1 else 'missed'}) |"
    )
    if baseline is not None:
        print()
        print("\n".join(new_old_rows(tput, full_runs, base_runs, baseline)))
    if args.json:
        report: dict[str, Any] = {
            "throughput": tput,
            "catch_up": full,
            "catch_up_runs": full_runs,
            "catch_up_quarter": quarter,
        }
        if baseline is not None:
            report["baseline"] = {"rev": baseline.label, "commit": baseline.commit}
            report["catch_up_baseline_runs"] = base_runs
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
