"""The iSCSI target against Debian's tgtd on the same kind of file, in the same run.

``qemu-img bench`` over ``iscsi://`` (QEMU's libiscsi driver; fio has no iSCSI engine here):
sequential 1 MiB writes and reads at depth 8, and 4 KiB writes and reads at depth 16 strided
by 1 MiB (qemu-img bench has no random pattern; a stride defeats the same read-ahead and merge
a random pattern would). blockmirror's target is a primary with its journal on (the product's
default, and what a host gets), on a volume file beside tgtd's backing file. Runs interleave,
the median of ``--repeat`` is printed, and each blockmirror/tgtd ratio. Never fails on a
threshold.

Run from the repository root: ``.venv/bin/python benchmarks/bench_iscsi.py``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.test_iscsi import TARGET, serve_iscsi
from tests.support.iscsi import tgtd_target
from tests.support.pair import MiB, topology

JOBS = {
    "seq write 1 MiB qd8": ["-w", "-s", "1M", "-d", "8"],
    "seq read 1 MiB qd8": ["-s", "1M", "-d", "8"],
    "4 KiB write qd16 (1 MiB stride)": ["-w", "-s", "4k", "-S", "1M", "-d", "16"],
    "4 KiB read qd16 (1 MiB stride)": ["-s", "4k", "-S", "1M", "-d", "16"],
}


def bench(url: str, job: list[str], count: int) -> float:
    """Seconds ``qemu-img bench`` took for ``count`` requests."""
    done = subprocess.run(
        ["qemu-img", "bench", "-f", "raw", "-t", "none", "-c", str(count), *job, url],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    found = re.search(r"Run completed in ([0-9.]+) seconds", done.stdout)
    assert found, done.stdout + done.stderr
    return float(found[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="volume size, MiB (default 1024)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per job")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default /tmp)")
    args = parser.parse_args()
    size = args.size * MiB
    root = Path(tempfile.mkdtemp(prefix="bench-iscsi-", dir=args.dir))
    try:
        scratch = root / "tgtd.img"
        with open(scratch, "wb") as f:
            f.truncate(size)
        with topology(root) as topo, tgtd_target(scratch) as baseline:
            site = topo.add_primary("site-a", peers=[], size=size, journal_size="256MiB")
            port = serve_iscsi(site)
            site.start()
            urls = {
                "blockmirror": f"iscsi://127.0.0.1:{port}/{TARGET}/0",
                "tgtd": baseline.url,
            }
            print(f"{'job':34} {'blockmirror':>12} {'tgtd':>12} {'ratio':>6}")
            for name, job in JOBS.items():
                request = MiB if "1M" in job[job.index("-s") + 1] else 4096
                count = max(64, min(4096, size // request // 2))
                times: dict[str, list[float]] = {k: [] for k in urls}
                for _ in range(args.repeat):
                    for target, url in urls.items():
                        times[target].append(bench(url, job, count))
                rate = {k: count * request / statistics.median(v) / MiB for k, v in times.items()}
                ratio = rate["blockmirror"] / rate["tgtd"]
                print(
                    f"{name:34} {rate['blockmirror']:9.1f} MiB/s {rate['tgtd']:7.1f} MiB/s "
                    f"{ratio:6.2f}"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
