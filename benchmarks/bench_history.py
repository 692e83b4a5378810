"""Point-in-time history: what it costs the host, how much it keeps, how fast it restores.

Four measurements, each against its baseline in the same run:

1. Host write throughput through a primary's export with ``history = "1h"`` against the same
   primary with ``history = "0"`` (fio sequential 1 MiB writes at iodepth 8 and random 4 KiB
   writes at iodepth 16, the runs interleaved). Ratio history / none.
2. History bytes per GiB written (the segments in ``state_dir`` after the runs, over the bytes
   the host wrote).
3. Restore time of a point 1 GiB of writes back on a 1 GiB volume, against the time to copy
   the volume (``cp --sparse=always``) in the same run.
4. Drill start time for that point (the command's answer), and the time to read the whole
   drill back with ``nbdcopy``.

Run from the repository root: ``.venv/bin/python benchmarks/bench_history.py``. It never fails
on a threshold; it prints the figures and the ratios.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.failover import cli
from tests.support.history import history, restore
from tests.support.pair import MiB, topology

from benchmarks.bench_replication import JOBS, fio, log, settle

GiB = 1024 * MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="volume size, MiB (default 1024)")
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per job")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    size = args.size * MiB
    root = Path(tempfile.mkdtemp(prefix="bench-history-", dir=args.dir))
    log(f"work directory {root}")
    with topology(root) as topo:
        sites = {
            "none": topo.add_primary(
                "none", peers=[], size=size, journal_size="256MiB", extra={"history": "0"}
            ),
            "1h": topo.add_primary(
                "hist",
                peers=[],
                size=size,
                journal_size="256MiB",
                extra={"history": "1h", "history_size": f"{4 * args.size}MiB"},
            ),
        }
        for site in sites.values():
            site.start()
        results: dict[tuple[str, str], list[float]] = {}
        written = 0.0
        for _ in range(args.repeat):
            for job, job_args in JOBS.items():
                for label, site in sites.items():
                    assert site.unit is not None
                    settle(sites.values())
                    rate = fio(site.unit.export_url("vol"), root, job_args, size, args.runtime)
                    results.setdefault((job, label), []).append(rate)
                    if label == "1h":
                        written += rate * args.runtime * MiB
                    log(f"{job:20s} history={label:4s} {rate:8.1f} MiB/s")
        print('\n## Host throughput, history = "1h" against "0" (median MiB/s)\n')
        print("| job | history 0 | history 1h | ratio |")
        print("|---|---|---|---|")
        for job in JOBS:
            none = statistics.median(results[(job, "none")])
            hist = statistics.median(results[(job, "1h")])
            print(f"| {job} | {none:.1f} | {hist:.1f} | {hist / none:.2f} |")

        hsite = sites["1h"]
        h = history(hsite)
        # Bytes the history holds for what it still covers, over what the host wrote (at least
        # the fio runs' volume, counted from their rates; ramp time is not counted).
        print("\n## History space\n")
        print(f"history bytes {h['bytes'] / MiB:.1f} MiB after ~{written / GiB:.2f} GiB written;")
        print(f"per GiB written: {h['bytes'] / max(written / GiB, 1e-9) / MiB:.1f} MiB")

        # A point 1 GiB of writes back: the oldest point, then write the whole volume once.
        assert hsite.unit is not None
        subprocess.run(
            [
                "fio",
                "--name=fill",
                "--ioengine=nbd",
                f"--uri={hsite.unit.export_url('vol')}",
                "--rw=write",
                "--bs=1M",
                "--iodepth=8",
                f"--size={size}",
            ],
            cwd=root,
            check=True,
            capture_output=True,
        )
        before = history(hsite)
        seq = int(before["newest"]["seq"])
        subprocess.run(
            [
                "fio",
                "--name=over",
                "--ioengine=nbd",
                f"--uri={hsite.unit.export_url('vol')}",
                "--rw=randwrite",
                "--bs=64k",
                "--iodepth=16",
                f"--size={size}",
                f"--io_size={size}",
            ],
            cwd=root,
            check=True,
            capture_output=True,
        )
        settle([hsite])
        started = time.monotonic()
        code, body = restore(hsite, root / "restored.img", seq=seq)
        restore_s = time.monotonic() - started
        assert code == 200, body
        started = time.monotonic()
        subprocess.run(
            ["cp", "--sparse=always", str(hsite.images["vol"]), str(root / "copy.img")], check=True
        )
        copy_s = time.monotonic() - started
        print("\n## Restore of a point 1 GiB of writes back\n")
        print(
            f"restore {restore_s:.2f} s ({body['undone']} before-images written back); "
            f"cp of the volume {copy_s:.2f} s; ratio {restore_s / copy_s:.2f}"
        )
        (root / "restored.img").unlink()
        (root / "copy.img").unlink()

        started = time.monotonic()
        proc = cli("drill", "start", "vol", "--seq", str(seq), "--config", str(hsite.config))
        drill_s = time.monotonic() - started
        assert proc.returncode == 0, proc.stderr
        url = proc.stdout.splitlines()[0]
        started = time.monotonic()
        subprocess.run(["nbdcopy", url, "null:"], check=True)
        read_s = time.monotonic() - started
        print("\n## Drill\n")
        print(
            f"drill start (the command, round trip) {drill_s:.2f} s; reading the whole drill "
            f"with nbdcopy {read_s:.2f} s ({size / MiB / read_s:.0f} MiB/s)"
        )
        cli("drill", "stop", "vol", "--config", str(hsite.config))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
