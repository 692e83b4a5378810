"""The archive on S3-compatible object storage (issue 14), measured in one run against one
SeaweedFS ``weed mini`` on 127.0.0.1 (authentication on, as in the tests).

1. Upload rate: a primary with an ``[[archive]]`` (``segment_size`` 64 MiB, compression
   ``none``, then ``zstd``), fio writes ``--size`` MiB of random data through its NBD export, and
   the clock runs from fio's start until the archive's ``last_seq`` reaches the journal's
   ``newest_seq``. Baselines in the same run, to the same server: one object of the same
   number of bytes put by :class:`~blockmirror.archive.s3.S3Store` (the unit's own client and
   settings: multipart, 16 MiB parts, 4 in parallel) and by boto3's ``upload_fileobj`` (its
   default transfer settings). Rounds rotate the four.
2. The host's write throughput with and without an archive: fio sequential 1 MiB writes at
   iodepth 8, ``--size`` MiB, against two primaries side by side that differ only in the
   ``[[archive]]`` (zstd, the defaults), rotating which goes first; after every run the archive
   catches up and both units' files are synced, so no run pays for the one before.
3. Restore rate: a ``--restore-size`` volume (default 1 GiB) of random data archived (its base
   and segments), then ``blockmirror archive restore`` timed end to end (a new process, as an
   operator runs it), against downloading the same objects with ``S3Store.get``, 8 in parallel,
   in the same run. Also a restore that replays the segments of part 1's zstd archive.

Run from the repository root: ``.venv/bin/python benchmarks/bench_archive.py`` (``--quick`` for
a smoke run). It prints figures and ratios and never fails on a threshold. Units and weed are
stopped by PID on any exit (also on SIGTERM and Ctrl-C) and the work directory is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from tests.support.archive import add_archive, archive_cli, archive_status, wait_archived
from tests.support.pair import MiB, Site, topology
from tests.support.seaweed import IDENTITIES, Seaweed

from benchmarks.bench_export import stop_on_signal
from benchmarks.bench_replication import settle as settle_units
from blockmirror.archive.s3 import S3Store, load_credentials

BUCKET: Final = "bench"
SEGMENT_SIZE: Final = "64MiB"
# The product's default; the archive cuts a segment sooner once 64 MiB are pending.
SEGMENT_INTERVAL: Final = "10s"
# Part 1 waits for the last, partial segment: the shortest interval a unit takes that is not
# a busy loop, so the tail of the data does not wait out 10 s.
UPLOAD_SEGMENT_INTERVAL: Final = "1s"
PARALLEL: Final = 8  # restore's default --parallel, and the baseline's
CAPACITY_MB: Final = 1024  # weed volume size limit here (the tests' 64 MiB x 4 hold 256 MiB)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the store ------------------------------------------------------------------------------------


class BenchSeaweed(Seaweed):
    """The tests' ``weed mini`` with room for gigabytes: volumes of 1 GiB, as many as the disk
    holds (the tests' four 64 MiB volumes fill up after 256 MiB). Otherwise the same command."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, volume_size_mb=CAPACITY_MB, volume_max=0)

    @property
    def weed(self) -> Path:
        return Path(sys.executable).with_name("weed")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def open_store(weed: Seaweed) -> S3Store:
    """The unit's client with the unit's settings (archive_attach.open_store's defaults)."""
    return S3Store(BUCKET, load_credentials(weed.credentials_file("test")), endpoint=weed.endpoint)


def boto3_client(weed: Seaweed) -> Any:
    key, secret, _ = IDENTITIES["test"]
    return boto3.client(
        "s3",
        endpoint_url=weed.endpoint,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(
            s3={"addressing_style": "path"},
            max_pool_connections=10,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


# -- processes ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """Cores busy per process between :meth:`start` and :meth:`stop`."""

    pids: dict[str, int]
    began: float = 0.0
    before: dict[str, float] = field(default_factory=dict)
    cores: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.began = time.monotonic()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.began
        self.cores = {
            name: (cpu_seconds(pid) - self.before[name]) / wall for name, pid in self.pids.items()
        }
        return self.cores

    def text(self) -> str:
        return ", ".join(f"{name} {c:.2f}" for name, c in self.cores.items())


def fio_write(url: str, size_mib: int, cwd: Path, *, io_mib: int | None = None) -> float:
    """MiB/s of one fio sequential write job (1 MiB, iodepth 8) of fresh random data."""
    proc = subprocess.run(
        [
            "fio", "--name=bench", "--ioengine=nbd", f"--uri={url}", "--rw=write", "--bs=1M",
            "--iodepth=8", f"--size={size_mib}M", f"--io_size={io_mib or size_mib}M",
            "--refill_buffers", "--output-format=json", "--verify_state_save=0",
        ],
        cwd=cwd, capture_output=True, text=True, check=True, timeout=900,
    )  # fmt: skip
    job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]["write"]
    return float(job["bw_bytes"]) / MiB


def settle(sites: list[Site]) -> None:
    """The replication benchmark's settle (fsync every volume and journal), then sync(2) for
    weed's files, so no run pays for another's write-back."""
    settle_units(sites)
    os.sync()


def wait_caught_up(site: Site, timeout: float = 900.0, poll: float = 0.05) -> float:
    """Until the archive's last_seq reaches the journal's newest_seq; returns that moment."""
    end = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < end:
        vol = site.volume_status()
        newest = int(vol["journal"]["newest_seq"])
        last = next(a for a in vol["archives"] if a["archive"] == "s3")
        if last["last_seq"] >= newest:
            return time.monotonic()
        if last["state"] not in ("archiving", "starting"):
            log(f"  (archive {last['state']}: {last['reason']})")
        time.sleep(poll)
    raise AssertionError(f"{site.name}: the archive did not catch up in {timeout} s: {last}")


def archived_unit(
    topo: Any, weed: Seaweed, name: str, size: int, journal: str, url: str, **archive: Any
) -> Site:
    site: Site = topo.add_primary(name, peers=[], size=size, journal_size=journal)
    keys = {"segment_size": SEGMENT_SIZE, "segment_interval": SEGMENT_INTERVAL, **archive}
    add_archive(site, weed, url, **keys)
    return site


# -- 1. upload rate -------------------------------------------------------------------------------


def archive_upload(
    root: Path, weed: BenchSeaweed, codec: str, size_mib: int, run: int
) -> dict[str, Any]:
    url = f"s3://{BUCKET}/upload-{codec}-{run}"
    where = root / f"upload-{codec}-{run}"
    where.mkdir()
    with topology(where) as topo:
        site = archived_unit(
            topo, weed, "up", size_mib * MiB, f"{size_mib + 256}MiB", url,
            compression=codec, segment_interval=UPLOAD_SEGMENT_INTERVAL,
        )  # fmt: skip
        unit = site.start()
        wait_archived(site)  # the first base, of the empty volume
        meter = CpuMeter({"unit": unit.pid, "weed": weed.pid})
        meter.start()
        began = time.monotonic()
        fio_mib = fio_write(unit.export_url("vol"), size_mib, where)
        written = time.monotonic()
        backlog = int(archive_status(site)["backlog_bytes"])
        done = wait_caught_up(site)
        meter.stop()
        status = archive_status(site)
    shutil.rmtree(where, ignore_errors=True)
    seconds = done - began
    result = {
        "codec": codec,
        "url": url,
        "seconds": seconds,
        "mib_per_second": size_mib / seconds,
        "fio_mib_per_second": fio_mib,
        "drain_after_fio_seconds": done - written,
        "backlog_at_fio_end_bytes": backlog,
        "drain_mib_per_second": backlog / MiB / (done - written),
        "raw_bytes": status["raw_bytes"],
        "bytes_uploaded": status["bytes_uploaded"],
        "segments": status["segments"],
        "errors": status["errors"],
        "cores": meter.cores,
    }
    log(
        f"  archive {codec:4}: {result['mib_per_second']:6.1f} MiB/s ({seconds:.1f} s; fio"
        f" {fio_mib:.0f} MiB/s, then {backlog / MiB:.0f} MiB in {done - written:.1f} s;"
        f" {status['segments']}"
        f" segments, {status['bytes_uploaded'] / MiB:.0f} MiB stored; cores: {meter.text()})"
    )
    return result


def plain_put(weed: BenchSeaweed, data: bytes, key: str) -> dict[str, Any]:
    """One object put by S3Store (the archive's client and settings)."""

    async def put() -> float:
        store = open_store(weed)
        try:
            began = time.monotonic()
            await store.put(key, data)
            return time.monotonic() - began
        finally:
            store.close()

    meter = CpuMeter({"weed": weed.pid, "bench": os.getpid()})
    meter.start()
    seconds = asyncio.run(put())
    meter.stop()
    rate = len(data) / MiB / seconds
    log(f"  S3Store.put : {rate:6.1f} MiB/s ({seconds:.1f} s; cores: {meter.text()})")
    return {"seconds": seconds, "mib_per_second": rate, "cores": meter.cores}


def boto3_put(weed: BenchSeaweed, data: bytes, key: str) -> dict[str, Any]:
    """One object put by boto3's managed transfer (upload_fileobj, default TransferConfig)."""
    client = boto3_client(weed)
    meter = CpuMeter({"weed": weed.pid, "bench": os.getpid()})
    meter.start()
    began = time.monotonic()
    client.upload_fileobj(io.BytesIO(data), BUCKET, key, Config=TransferConfig())
    seconds = time.monotonic() - began
    meter.stop()
    client.close()
    rate = len(data) / MiB / seconds
    log(f"  upload_fileobj: {rate:6.1f} MiB/s ({seconds:.1f} s; cores: {meter.text()})")
    return {"seconds": seconds, "mib_per_second": rate, "cores": meter.cores}


def upload_rates(
    root: Path, weed: BenchSeaweed, size_mib: int, repeat: int
) -> dict[str, list[dict[str, Any]]]:
    data = os.urandom(size_mib * MiB)
    runs: dict[str, list[dict[str, Any]]] = {
        "S3Store.put": [],
        "upload_fileobj": [],
        "none": [],
        "zstd": [],
    }
    jobs: dict[str, Callable[[int], dict[str, Any]]] = {
        "S3Store.put": lambda i: plain_put(weed, data, f"plain/put-{i}"),
        "upload_fileobj": lambda i: boto3_put(weed, data, f"plain/fileobj-{i}"),
        "none": lambda i: archive_upload(root, weed, "none", size_mib, i),
        "zstd": lambda i: archive_upload(root, weed, "zstd", size_mib, i),
    }
    order = list(jobs)
    for i in range(repeat):
        shift = i % len(order)
        for name in order[shift:] + order[:shift]:
            runs[name].append(jobs[name](i))
    return runs


# -- 2. host throughput ---------------------------------------------------------------------------


def host_throughput(
    root: Path, weed: BenchSeaweed, size_mib: int, repeat: int
) -> dict[str, list[float]]:
    where = root / "host"
    where.mkdir()
    rates: dict[str, list[float]] = {"no archive": [], "archive": []}
    with topology(where) as topo:
        plain = topo.add_primary("plain", peers=[], size=size_mib * MiB, journal_size="1GiB")
        archived = archived_unit(
            topo, weed, "archived", size_mib * MiB, "1GiB", f"s3://{BUCKET}/host"
        )
        units = {"no archive": plain.start(), "archive": archived.start()}
        wait_archived(archived)
        # Write each journal over once, unmeasured: a new journal's first lap pays for the
        # allocation of its blocks.
        for unit in units.values():
            fio_write(unit.export_url("vol"), size_mib, where, io_mib=1100)
        wait_caught_up(archived)
        settle([plain, archived])
        order = list(units)
        for i in range(repeat):
            shift = i % len(order)
            for name in order[shift:] + order[:shift]:
                meter = CpuMeter({"unit": units[name].pid, "weed": weed.pid})
                meter.start()
                mib = fio_write(units[name].export_url("vol"), size_mib, where)
                meter.stop()
                backlog = archive_status(archived)["backlog_bytes"] if name == "archive" else 0
                rates[name].append(mib)
                log(
                    f"  {name:10} run {i + 1}: {mib:7.1f} MiB/s (cores: {meter.text()};"
                    f" archive backlog at fio's end {backlog / MiB:.0f} MiB)"
                )
                wait_caught_up(archived)
                settle([plain, archived])
    shutil.rmtree(where, ignore_errors=True)
    return rates


# -- 3. restore -----------------------------------------------------------------------------------


def newest_restorable(weed: Seaweed, url: str) -> tuple[int, list[str]]:
    """The newest restorable seq of the archive's one generation, and the keys a restore of it
    downloads (the base's manifest and data objects, the segments after its start)."""
    listing = json.loads(archive_cli(weed, "list", "vol", "--url", url, "--json").stdout)
    [gen] = listing["generations"]
    seq = int(gen["restorable"][-1][1])
    prefix = url.removeprefix(f"s3://{BUCKET}/") + "/vol/"

    async def keys() -> list[str]:
        store = open_store(weed)
        try:
            return [info.key for info in await store.list(prefix)]
        finally:
            store.close()

    every = asyncio.run(keys())
    bases = [k for k in every if "/base/" in k]
    newest = max(bases)  # 20-digit END first: the newest base sorts last
    start = int(newest.rsplit("/", 1)[1].split("-")[1])
    wanted = [newest, *(k for k in every if "/data/" in k)]
    for key in every:
        if "/seg/" in key:
            first, last = (int(n) for n in key.rsplit("/", 1)[1].split("-")[:2])
            if last > start and first <= seq:
                wanted.append(key)
    return seq, wanted


def plain_download(weed: BenchSeaweed, keys: list[str]) -> dict[str, Any]:
    """Every key fetched with S3Store.get, ``PARALLEL`` at a time, into memory."""

    async def fetch() -> tuple[float, int]:
        store = open_store(weed)
        limit = asyncio.Semaphore(PARALLEL)
        total = 0

        async def one(key: str) -> None:
            nonlocal total
            async with limit:
                data = await store.get(key)
            total += len(data)  # not `total += len(await ...)`: that reads total before the await

        try:
            began = time.monotonic()
            await asyncio.gather(*(one(k) for k in keys))
            return time.monotonic() - began, total
        finally:
            store.close()

    meter = CpuMeter({"weed": weed.pid, "bench": os.getpid()})
    meter.start()
    seconds, total = asyncio.run(fetch())
    meter.stop()
    log(
        f"  S3Store.get x{len(keys)}: {total / MiB / seconds:6.1f} MiB/s of objects"
        f" ({total / MiB:.0f} MiB in {seconds:.1f} s; cores: {meter.text()})"
    )
    return {"seconds": seconds, "bytes": total, "cores": meter.cores}


def disk_write(root: Path, size: int) -> dict[str, Any]:
    """A new file of ``size`` random bytes written in 4 MiB pieces and fsynced: what a restore
    must do at least once it has the bytes (the image is synced before restore returns)."""
    path = root / "disk-probe.img"
    piece = os.urandom(4 * MiB)
    began = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for offset in range(0, size, len(piece)):
            os.pwrite(fd, piece[: size - offset], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.monotonic() - began
    path.unlink()
    log(f"  write + fsync: {size / MiB / seconds:6.1f} MiB/s ({seconds:.1f} s)")
    return {"seconds": seconds, "bytes": size}


def timed_restore(weed: BenchSeaweed, url: str, seq: int, to: Path) -> dict[str, Any]:
    """``blockmirror archive restore`` end to end, in a new process."""
    meter = CpuMeter({"weed": weed.pid})
    meter.start()
    began = time.monotonic()
    proc = archive_cli(
        weed, "restore", "vol", "--url", url, "--seq", str(seq), "--to", str(to), "--json",
        "--quiet", timeout=1800,
    )  # fmt: skip
    seconds = time.monotonic() - began
    meter.stop()
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    image = int(doc["image_bytes"])
    to.unlink()
    log(
        f"  restore: {image / MiB / seconds:6.1f} MiB/s of image ({seconds:.1f} s end to end,"
        f" {doc['seconds']:.1f} s inside; {doc['bytes_downloaded'] / MiB:.0f} MiB downloaded,"
        f" {doc['records']} records; weed cores {meter.cores['weed']:.2f})"
    )
    return {
        "seconds": seconds,
        "inner_seconds": float(doc["seconds"]),
        "image_bytes": image,
        "bytes_downloaded": int(doc["bytes_downloaded"]),
        "records": int(doc["records"]),
        "cores": meter.cores,
    }


def archive_random_volume(root: Path, weed: BenchSeaweed, size_mib: int) -> tuple[str, float]:
    """A primary whose volume holds ``size_mib`` MiB of random data, archived (its first base
    copies it); a 1 MiB write after the base gives the chain a segment. Returns the URL and
    the seconds the base took."""
    url = f"s3://{BUCKET}/restore"
    where = root / "restore-unit"
    where.mkdir()
    with topology(where) as topo:
        site = archived_unit(
            topo, weed, "r", size_mib * MiB, "256MiB", url,
            segment_interval=UPLOAD_SEGMENT_INTERVAL,
        )  # fmt: skip
        with site.images["vol"].open("wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())
        began = time.monotonic()
        unit = site.start()
        wait_archived(site, timeout=900)
        base_seconds = time.monotonic() - began
        fio_write(unit.export_url("vol"), 1, where)
        wait_archived(site)
    shutil.rmtree(where, ignore_errors=True)
    log(f"  base of {size_mib} MiB of random data: {size_mib / base_seconds:.1f} MiB/s")
    return url, base_seconds


def restore_rates(
    root: Path, weed: BenchSeaweed, urls: dict[str, tuple[str, int]], repeat: int
) -> dict[str, dict[str, Any]]:
    """Per archive (label: URL and volume size), restores of its newest point, downloads of the
    objects they fetch and writes of as many bytes to a new file, rotated."""
    out: dict[str, dict[str, Any]] = {}
    for label, (url, size) in urls.items():
        seq, keys = newest_restorable(weed, url)
        log(f" {label}: seq {seq}, {len(keys)} objects")
        restores: list[dict[str, Any]] = []
        downloads: list[dict[str, Any]] = []
        disk: list[dict[str, Any]] = []
        steps = ["restore", "download", "disk"]
        for i in range(repeat):
            shift = i % len(steps)
            for step in steps[shift:] + steps[:shift]:
                if step == "restore":
                    restores.append(timed_restore(weed, url, seq, root / "restored.img"))
                    settle([])
                elif step == "download":
                    downloads.append(plain_download(weed, keys))
                else:
                    disk.append(disk_write(root, size))
                    settle([])
        out[label] = {
            "restores": restores,
            "downloads": downloads,
            "disk": disk,
            "objects": len(keys),
        }
    return out


# -- the run --------------------------------------------------------------------------------------


def median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(float(r[key]) for r in runs))


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    up = results["upload"]
    print(f"1. archive upload of {args.size} MiB of random data, MiB/s (median of {args.repeat})")
    print("| upload | MiB/s | vs S3Store.put | vs upload_fileobj | stored MiB | drain MiB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    put = median(up["S3Store.put"], "mib_per_second")
    fileobj = median(up["upload_fileobj"], "mib_per_second")
    print(f"| S3Store.put, one object | {put:.1f} | 1.00 | {put / fileobj:.2f} | {args.size} | - |")
    print(
        f"| boto3 upload_fileobj | {fileobj:.1f} | {fileobj / put:.2f} | 1.00 | {args.size} | - |"
    )
    for codec in ("none", "zstd"):
        rate = median(up[codec], "mib_per_second")
        stored = median(up[codec], "bytes_uploaded") / MiB
        drain = median(up[codec], "drain_mib_per_second")
        print(
            f"| archive, compression {codec} | {rate:.1f} | {rate / put:.2f} | "
            f"{rate / fileobj:.2f} | {stored:.0f} | {drain:.1f} |"
        )
    print("(drain: the backlog at fio's end over the time from then until caught up)")
    print()
    host = results["host"]
    print(f"2. host fio seq write 1M qd8, {args.size} MiB, MiB/s (median of {args.repeat})")
    print("| no archive | archive (zstd) | ratio |")
    print("|---:|---:|---:|")
    none, arch = statistics.median(host["no archive"]), statistics.median(host["archive"])
    print(f"| {none:.1f} | {arch:.1f} | {arch / none:.2f} |")
    print()
    print(f"3. restore, end to end (median of {args.repeat}), against S3Store.get of its objects")
    print(
        "| restore of | image | restore | MiB/s | download MiB/s | ratio"
        " | write + fsync MiB/s | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in results["restore"].items():
        image = r["restores"][0]["image_bytes"] / MiB
        seconds = median(r["restores"], "seconds")
        got = statistics.median(d["bytes"] / MiB / d["seconds"] for d in r["downloads"])
        disk = statistics.median(d["bytes"] / MiB / d["seconds"] for d in r["disk"])
        rate = image / seconds
        print(
            f"| {label} | {image:.0f} MiB | {seconds:.1f} s | {rate:.1f} | {got:.1f} |"
            f" {rate / got:.2f} | {disk:.1f} | {rate / disk:.2f} |"
        )
    print(f"(base of the {args.restore_size} MiB volume: {results['base_seconds']:.1f} s)")


@contextlib.contextmanager
def work_directory(parent: str | None, keep: bool) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="bm-archive-bench-", dir=parent or "/var/tmp"))
    try:
        yield root
    finally:
        if keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="MiB written in parts 1 and 2")
    parser.add_argument("--restore-size", type=int, default=1024, help="MiB of part 3's volume")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every measurement")
    parser.add_argument("--quick", action="store_true", help="64 MiB, 128 MiB, one round")
    parser.add_argument("--dir", help="parent of the work directory (default /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", help="write every run here")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.restore_size, args.repeat = 64, 128, 1
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop_on_signal)  # the finally blocks stop units and weed
    began = time.monotonic()
    with work_directory(args.dir, args.keep) as root:
        weed = BenchSeaweed(root / "s3")
        try:
            weed.start()
            weed.wait_writable(BUCKET)
            log(f"weed mini pid {weed.pid} at {weed.endpoint}")
            log("1. upload rate:")
            upload = upload_rates(root, weed, args.size, args.repeat)
            log("2. host throughput:")
            host = host_throughput(root, weed, args.size, args.repeat)
            log("3. restore:")
            url, base_seconds = archive_random_volume(root, weed, args.restore_size)
            urls = {
                f"{args.restore_size} MiB of random data (a base)": (
                    url,
                    args.restore_size * MiB,
                ),
                f"part 1's zstd archive (a {args.size} MiB replay)": (
                    upload["zstd"][0]["url"],
                    args.size * MiB,
                ),
            }
            restore = restore_rates(root, weed, urls, args.repeat)
        finally:
            weed.stop()
    results = {"upload": upload, "host": host, "restore": restore, "base_seconds": base_seconds}
    log(f"done in {time.monotonic() - began:.0f} s")
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
