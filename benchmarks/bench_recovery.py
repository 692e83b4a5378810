"""Recovery time of a full journal: how long a primary takes to open after a crash.

For each variant (4 KiB or 1 MiB writes) the journal is filled in-process with the project's own
classes, the way the export drives them (``JournalWritePath.write`` then ``commit``), with no
checkpointer running, so nothing is freed and every record is still to be replayed. Writing
stops when the next record no longer fits: the ring is full to within one record. Then the
process "crashes" (the journal's and the volume's descriptors are closed without the final
checkpoint, as ``crash()`` in tests/unit/blockdev/test_journaled.py does), both files are synced
(their write-back is the kernel's business after a crash, not recovery's), and
``Journal.open`` is timed: read the checkpoint, scan and verify every record, replay every
record into the volume, sync the volume, write a new checkpoint.

Then the process "crashes" again, right after that recovery (its unclean checkpoint stays), and
the open after it is timed too (*restart*): the log is empty and the ring is all records of
earlier laps, which the search past the end of the log (for a witness of corruption, and for
stale headers to erase) goes through. The first open has just read the journal, so the
restart finds it in the page cache in both cache states. Last, the ratio of the 4 KiB to the
1 MiB time, with the target of issue 15 (at most 2).

Two cache states: *warm*, the journal and the volume still in the page cache (a process crash
and an immediate restart), and *cold*, both dropped from the page cache with
``posix_fadvise(DONTNEED)`` after the sync (closer to a reboot; the device's own cache is not
cleared, so "cold-ish"). Each (variant, cache state) is built afresh and measured ``--repeat``
times; the table shows medians.

Run from the repository root::

    .venv/bin/python benchmarks/bench_recovery.py                       # 1 GiB, about 2 minutes
    .venv/bin/python benchmarks/bench_recovery.py --journal-size 64MiB --repeat 1   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.crash import crash  # noqa: E402

import blockmirror.journal.opening as opening_module  # noqa: E402
from benchmarks.bench_export import (  # noqa: E402
    create_backing_file,
    filesystem_type,
    format_markdown_table,
    format_text_table,
    log,
    machine_info,
    mem_available,
    work_directory,
)
from blockmirror.blockdev.journaled import JournalWritePath  # noqa: E402
from blockmirror.errors import SizeError  # noqa: E402
from blockmirror.journal.format import record_size  # noqa: E402
from blockmirror.journal.journal import Journal  # noqa: E402
from blockmirror.store.volume import Volume  # noqa: E402
from blockmirror.units import KiB, MiB, format_size, parse_size  # noqa: E402

VOLUME_NAME = "bench"
Cache = Literal["warm", "cold"]
CACHE_STATES: tuple[Cache, ...] = ("warm", "cold")


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    block: int  # bytes per write, one record each
    batch: int  # writes accepted per commit (the queue depth an export would see)


VARIANTS: tuple[Variant, ...] = (
    Variant("4k", "4 KiB records", 4 * KiB, 16),
    Variant("1m", "1 MiB records", MiB, 8),
)
VARIANTS_BY_KEY = {v.key: v for v in VARIANTS}


# --- timing the phases of Journal.open ------------------------------------------------------------


class PhaseTimer:
    """Wraps functions the recovery calls, for the duration of one measurement, to time them.

    Patching is local to this process and undone afterwards. A function that is not there (the
    sources moved on) is simply not timed: its phase then reads as missing, never as zero.
    """

    def __init__(self) -> None:
        # Keyed by phase, and by "outer/inner" for a phase timed while another one runs.
        self.seconds: dict[str, float] = defaultdict(float)
        self.known: set[str] = set()
        self._active: list[str] = []

    @contextlib.contextmanager
    def wrap(self, owner: Any, name: str, phase: str) -> Iterator[None]:
        original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name)
        if original is None or isinstance(original, (classmethod, staticmethod)):
            yield
            return
        self.known.add(phase)
        seconds, active = self.seconds, self._active

        def timed(*args: Any, **kwargs: Any) -> Any:
            outer = list(active)
            active.append(phase)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                took = time.perf_counter() - started
                active.pop()
                seconds[phase] += took
                for enclosing in outer:
                    seconds[f"{enclosing}/{phase}"] += took

        setattr(owner, name, timed)
        try:
            yield
        finally:
            setattr(owner, name, original)

    @contextlib.contextmanager
    def recovery_phases(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            # ``opening.py`` imported these by name: patch them where they are looked up.
            stack.enter_context(self.wrap(opening_module, "scan", "scan"))
            stack.enter_context(self.wrap(opening_module, "erase_stale_headers", "erase"))
            stack.enter_context(self.wrap(opening_module, "replay", "replay"))
            stack.enter_context(self.wrap(Volume, "flush", "volume_sync"))
            stack.enter_context(self.wrap(Journal, "write_checkpoint_now", "checkpoint"))
            yield

    def get(self, phase: str) -> float | None:
        """Seconds spent in ``phase`` (or ``outer/inner``); None when it could not be timed."""
        if not set(phase.split("/")) <= self.known:
            return None
        return self.seconds.get(phase, 0.0)


# --- building a full journal ----------------------------------------------------------------------


@dataclass
class Built:
    records: int
    payload_bytes: int
    journal_bytes: int  # ring bytes the live log spans (headers, payloads, padding)
    capacity: int
    seconds: float


def open_journal(workdir: Path, volume: Volume, journal_size: int) -> Journal:
    return Journal.open(
        workdir / f"{VOLUME_NAME}.journal",
        volume=volume,
        journal_size=journal_size,
        consumers=[],
        dirty_dir=workdir,
        volume_name=VOLUME_NAME,
    )


async def fill_journal(
    workdir: Path, backing: Path, variant: Variant, journal_size: int, volume_size: int
) -> Built:
    """A new journal, written until the next record would not fit, then a crash."""
    (workdir / f"{VOLUME_NAME}.journal").unlink(missing_ok=True)
    loop = asyncio.get_running_loop()
    volume = Volume.open(backing, size=volume_size)
    journal = open_journal(workdir, volume, journal_size)
    # Never started: no checkpointer runs, so nothing is freed and every record stays live.
    wp = JournalWritePath(journal, volume, loop)
    data = memoryview(os.urandom(MiB + variant.block))
    block = variant.block
    slots = max(1, volume_size // block)
    size = record_size(block)
    started = time.monotonic()
    records = 0
    full = False
    while not full:
        pending: list[asyncio.Future[None]] = []
        for _ in range(variant.batch):
            if not journal.fits(block):
                full = True
                break
            # Sequential through the volume, wrapping; payloads differ from record to record.
            offset = (records % slots) * block
            shift = (records * 4096) % MiB
            fut = wp.write(offset, [data[shift : shift + block]], fua=False)
            if fut is not None:
                pending.append(fut)
            records += 1
        gate = wp.commit()
        if gate is not None:
            pending.append(gate)
        for fut in pending:
            await fut
    seconds = time.monotonic() - started
    if records != journal.next_seq - 1 or len(journal.records) != records:
        raise RuntimeError(
            f"expected {records} live records, the journal holds {len(journal.records)} "
            f"(next_seq {journal.next_seq}): did something free them?"
        )
    built = Built(
        records=records,
        payload_bytes=records * block,
        journal_bytes=journal.tail_lpos - journal.head_lpos,
        capacity=journal.capacity,
        seconds=seconds,
    )
    assert built.journal_bytes >= records * size
    await asyncio.sleep(0)  # let any commit callback already scheduled run before the crash
    crash(wp)
    return built


# --- page cache -----------------------------------------------------------------------------------


def sync_file(path: Path, *, drop: bool) -> None:
    """fsync; with ``drop``, then ask the kernel to evict the file's (now clean) pages."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: Path) -> int | None:
    """Bytes of ``path`` in the page cache, from util-linux ``fincore`` when it is installed."""
    if shutil.which("fincore") is None:
        return None
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


# --- one measurement ------------------------------------------------------------------------------


@dataclass
class Measurement:
    variant: str
    cache: Cache
    repeat: int
    records: int
    replayed: int
    payload_bytes: int
    journal_bytes: int
    seconds: float  # the whole Journal.open
    # CPU time (user and system) of this process during the open: less disturbed than the
    # seconds by other work on the machine (the kernel's copies count, waits for the disk not).
    cpu_seconds: float | None = None
    phases: dict[str, float | None] = field(default_factory=dict)
    report_seconds: float | None = None  # RecoveryReport.seconds: scan + erase + replay
    # Journal.open after a second crash right after the first recovery: an empty log in a ring
    # of stale records (None when not measured).
    restart_seconds: float | None = None
    journal_resident: int | None = None  # page-cache bytes of the journal before the open
    build_seconds: float = 0.0

    @property
    def mib_per_s(self) -> float:
        return self.journal_bytes / MiB / self.seconds if self.seconds > 0 else 0.0


def measure(
    workdir: Path,
    backing: Path,
    variant: Variant,
    cache: Cache,
    repeat: int,
    *,
    journal_size: int,
    volume_size: int,
) -> Measurement:
    built = asyncio.run(fill_journal(workdir, backing, variant, journal_size, volume_size))
    # The filled journal's objects (a quarter of a million records, in reference cycles with
    # the write path) are garbage now: collected here, not by a collection the timed open makes.
    gc.collect()
    journal_path = workdir / f"{VOLUME_NAME}.journal"
    for path in (journal_path, backing):
        sync_file(path, drop=cache == "cold")
    resident = resident_bytes(journal_path)

    volume = Volume.open(backing, size=volume_size)
    timer = PhaseTimer()
    try:
        with timer.recovery_phases():
            started = time.perf_counter()
            cpu_started = time.process_time()
            journal = open_journal(workdir, volume, journal_size)
            seconds = time.perf_counter() - started
            cpu_seconds = time.process_time() - cpu_started
        try:
            report = journal.recovery
            if report is None:
                raise RuntimeError("Journal.open did not recover: the journal was not found")
            if report.records != built.records or report.replayed != built.records:
                raise RuntimeError(
                    f"recovery found {report.records} records and replayed {report.replayed};"
                    f" {built.records} were written"
                )
            if report.torn_tail is not None:
                raise RuntimeError(f"recovery cut a torn tail: {report.torn_tail}")
        except BaseException:
            journal.close()
            raise
        # A crash right after the recovery: its unclean checkpoint (everything freed) stays.
        journal.abandon()
        started = time.perf_counter()
        journal = open_journal(workdir, volume, journal_size)
        restart_seconds = time.perf_counter() - started
        journal.close()
    finally:
        volume.close()
    phases = {
        phase: timer.get(phase)
        for phase in ("scan", "erase", "replay", "replay/volume_sync", "checkpoint")
    }
    return Measurement(
        variant=variant.key,
        cache=cache,
        repeat=repeat,
        records=report.records,
        replayed=report.replayed,
        payload_bytes=built.payload_bytes,
        journal_bytes=built.journal_bytes,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        phases=phases,
        report_seconds=report.seconds,
        restart_seconds=restart_seconds,
        journal_resident=resident,
        build_seconds=built.seconds,
    )


# --- results --------------------------------------------------------------------------------------


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table_rows(measurements: Sequence[Measurement]) -> list[list[str]]:
    rows = [
        [
            "variant",
            "cache",
            "records",
            "bytes",
            "seconds",
            "cpu",
            "MiB/s",
            "scan",
            "replay",
            "of which volume sync",
            "checkpoint",
            "restart",
            "runs (s)",
        ]
    ]
    groups: dict[tuple[str, Cache], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.variant, m.cache), []).append(m)
    for (variant, cache), ms in groups.items():
        seconds = statistics.median(m.seconds for m in ms)
        first = ms[0]

        def phase(name: str, group: list[Measurement] = ms) -> float | None:
            return _median([m.phases.get(name) for m in group])

        rows.append(
            [
                VARIANTS_BY_KEY[variant].label,
                cache,
                f"{first.records}",
                f"{first.journal_bytes / MiB:.1f} MiB",
                f"{seconds:.2f}",
                _secs(_median([m.cpu_seconds for m in ms])),
                f"{first.journal_bytes / MiB / seconds:.0f}",
                _secs(phase("scan")),
                _secs(phase("replay")),
                _secs(phase("replay/volume_sync")),
                _secs(phase("checkpoint")),
                _secs(_median([m.restart_seconds for m in ms])),
                ", ".join(f"{m.seconds:.2f}" for m in ms),
            ]
        )
    return rows


# The target of issue 15: a full journal of 4 KiB records recovers in at most twice the time of
# one of 1 MiB records (same run).
RATIO_TARGET = 2.0


def ratios(measurements: Sequence[Measurement], *, cpu: bool = False) -> dict[str, float]:
    """The 4 KiB / 1 MiB ratio of the median times (or CPU times), per cache state measured
    for both."""
    found: dict[str, float] = {}
    for cache in CACHE_STATES:
        small = [_time(m, cpu) for m in measurements if m.variant == "4k" and m.cache == cache]
        large = [_time(m, cpu) for m in measurements if m.variant == "1m" and m.cache == cache]
        if small and large:
            found[cache] = statistics.median(small) / statistics.median(large)
    return found


def _time(m: Measurement, cpu: bool) -> float:
    return (m.cpu_seconds or 0.0) if cpu else m.seconds


def ratio_lines(measurements: Sequence[Measurement]) -> list[str]:
    """The ratios, each with the target (and the ratio of the CPU times, for comparison)."""
    by_cpu = ratios(measurements, cpu=True)
    return [
        f"4 KiB / 1 MiB records, {cache}: {ratio:.2f}x (target <= {RATIO_TARGET:.0f}x: "
        f"{'met' if ratio <= RATIO_TARGET else 'missed'}; CPU time {by_cpu[cache]:.2f}x)"
        for cache, ratio in ratios(measurements).items()
    ]


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Recovery time of a full journal: Journal.open after a crash, timed."
    )
    parser.add_argument("--journal-size", default="1GiB", help="journal_size (default 1GiB)")
    parser.add_argument(
        "--volume-size", help="size of the volume the writes go to (default: the journal size)"
    )
    parser.add_argument(
        "--dir", type=Path, help="where to create the temporary directory (a real disk, not tmpfs)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant and cache state")
    parser.add_argument(
        "--variants", help=f"comma-separated subset of: {', '.join(VARIANTS_BY_KEY)}"
    )
    parser.add_argument(
        "--cache", help=f"comma-separated subset of: {', '.join(CACHE_STATES)} (default: both)"
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="save every result here")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (journal, volume)"
    )
    args = parser.parse_args(argv)
    try:
        args.journal_size_bytes = parse_size(args.journal_size, key="--journal-size")
        args.volume_size_bytes = (
            parse_size(args.volume_size, key="--volume-size")
            if args.volume_size
            else args.journal_size_bytes
        )
    except SizeError as exc:
        parser.error(str(exc))
    if args.journal_size_bytes < MiB or args.journal_size_bytes % MiB:
        parser.error("--journal-size must be a whole number of MiB, at least 1 MiB")
    if args.volume_size_bytes < MiB or args.volume_size_bytes % MiB:
        parser.error("--volume-size must be a whole number of MiB, at least 1 MiB")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    def choose(text: str | None, known: Sequence[str], what: str) -> list[str]:
        if not text:
            return list(known)
        keys = [k.strip() for k in text.split(",") if k.strip()]
        unknown = [k for k in keys if k not in known]
        if unknown or not keys:
            parser.error(f"unknown {what} {unknown}; choose from {', '.join(known)}")
        return [k for k in known if k in keys]

    args.selected = [
        VARIANTS_BY_KEY[k] for k in choose(args.variants, list(VARIANTS_BY_KEY), "variant(s)")
    ]
    args.caches = choose(args.cache, list(CACHE_STATES), "cache state(s)")
    return args


def run(args: argparse.Namespace, workdir: Path, on_result: Callable[[Measurement], None]) -> None:
    journal_size: int = args.journal_size_bytes
    volume_size: int = args.volume_size_bytes
    available = mem_available()
    if available is not None and available < 2 * (journal_size + volume_size):
        log(f"warning: only {format_size(available)} of memory available; warm runs may read disk")
    backing = workdir / "volume.img"
    log(f"volume {backing}: {format_size(volume_size)} on {filesystem_type(workdir)}")
    seconds = create_backing_file(backing, volume_size)
    log(f"  allocated, written and read back in {seconds:.1f}s")
    total = args.repeat * len(args.selected) * len(args.caches)
    done = 0
    for repeat in range(args.repeat):
        for variant in args.selected:
            for cache in args.caches:
                done += 1
                m = measure(
                    workdir,
                    backing,
                    variant,
                    cache,
                    repeat,
                    journal_size=journal_size,
                    volume_size=volume_size,
                )
                resident = (
                    ""
                    if m.journal_resident is None
                    else f", {m.journal_resident / MiB:.0f} MiB of it cached"
                )
                phases = ", ".join(
                    f"{name} {value:.2f}s" for name, value in m.phases.items() if value is not None
                )
                log(
                    f"[{done}/{total}] {variant.label}, {cache}: built {m.records} records"
                    f" ({m.journal_bytes / MiB:.0f} MiB{resident}) in {m.build_seconds:.1f}s;"
                    f" Journal.open {m.seconds:.2f}s ({m.mib_per_s:.0f} MiB/s,"
                    f" {m.cpu_seconds or 0:.2f}s CPU): {phases};"
                    f" restart {m.restart_seconds or 0:.2f}s"
                )
                on_result(m)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Recovery's own warnings (a torn tail, erased headers) are worth seeing; the high-water
    # alert is what filling the journal is meant to cause.
    logging.basicConfig(level=logging.WARNING, format="  log: %(name)s: %(message)s")
    logging.getLogger("blockmirror.blockdev.journaled").setLevel(logging.ERROR)
    info = machine_info()
    settings = {
        "journal_size": args.journal_size_bytes,
        "volume_size": args.volume_size_bytes,
        "repeat": args.repeat,
        "variants": [v.key for v in args.selected],
        "caches": args.caches,
    }
    log(
        f"blockmirror {info['blockmirror']} ({info['git']}, sources {info['source_digest']});"
        f" {info['cpus']} CPUs, kernel {info['kernel']}, Python {info['python']}"
    )
    log(
        f"journal_size {format_size(args.journal_size_bytes)}, volume"
        f" {format_size(args.volume_size_bytes)}, {args.repeat} repeat(s),"
        f" variants {', '.join(settings['variants'])}, cache {', '.join(args.caches)}"
    )
    measurements: list[Measurement] = []
    started = time.monotonic()
    with work_directory(args.dir, args.keep) as workdir:
        run(args, workdir, measurements.append)
    rows = table_rows(measurements)
    print(format_markdown_table(rows) if args.markdown else format_text_table(rows))
    for line in ratio_lines(measurements):
        print(line)
    log(f"finished in {time.monotonic() - started:.0f}s")
    if args.json is not None:
        report = {
            "machine": info,
            "settings": settings,
            "runs": [asdict(m) | {"mib_per_s": m.mib_per_s} for m in measurements],
            "ratio_4k_1m": ratios(measurements),
            "ratio_4k_1m_cpu": ratios(measurements, cpu=True),
            "ratio_target": RATIO_TARGET,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"results saved to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
