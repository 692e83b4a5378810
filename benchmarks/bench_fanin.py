"""Many-to-one replication: N primaries, each with a small volume, into ONE secondary unit.

For each count N (default 1, 8 and 64) the script starts one secondary unit holding N replicas
(one process, one ``[replication] listen``) and N primary units, one ``blockmirror run``
process each with one volume whose only peer is that secondary, all on 127.0.0.1. Once every
link has caught up after the initial copy, a warm-up round 0 (the first writes into the freshly
preallocated journals and sparse images; in the JSON, not in the figures), then each round
(``--repeat``):

1. stops the secondary (SIGTERM: a clean stop, as for maintenance);
2. writes the same backlog (``--backlog``, default the whole ``--volume-size``) of fresh random
   data into every primary's NBD export with the project's own NBD client
   (:class:`blockmirror.frontend.nbd_client.NbdClient`, 1 MiB writes, 8 in flight per export, 4
   exports at a time, then FLUSH), once every primary's journal has room for it (they hold two
   backlogs: no overflow into dirty-map tracking), and fsyncs every unit's files;
3. starts the secondary again and polls every primary's peer status until each reports the
   link replicating with ``lag_bytes`` 0 and ``acked_seq`` at its journal's newest record, then
   the secondary's status until every replica has applied it all and is consistent.

Figures per round, and per N the median over the rounds (the peak RSS: the highest):

- aggregate catch-up rate: all backlogs over the time from the secondary's start, and from the
  first link's new handshake (a primary's ``connects`` went up), until the last link is done;
- the secondary's peak RSS (VmHWM: it is a new process every round), and that per replica;
  the RSS each added replica costs is the difference between the largest and smallest N;
- the secondary's CPU seconds (``/proc/PID/stat``) per MiB of backlog, over its whole run
  (start-up and the opening of its N journals included) and from the first link-up;
- the named baseline: the disk's sequential write + fdatasync rate
  (``bench_replication.disk_write_rate``) over the largest count's total backlog, since the
  secondary must make all of it durable before it acknowledges;
- per-link fairness: each link's rate (its backlog over the time from its own link-up until it
  was done), the min / max of those rates, the spread of the links' completion times, and how
  far the slowest link had got when the first one finished (from the ``lag_bytes`` samples).

The targets are issue 15's: aggregate catch-up with 64 at least 0.8 of that with 1 (here: the
largest count against the smallest), secondary RSS at most 8 MiB per replica. They are printed
as met or missed; the script never fails on a figure (exit 1 only when a unit or a client
failed, 2 for bad arguments).

Every primary is a unit process of its own: 64 Python processes fit this 2-CPU, 23 GiB machine
(about 50 MiB RSS each, idle between rounds), and only that measures 64 links from 64 sources.
Their polls are the resolution of the per-link times: a round of status requests over 64
primaries takes a few hundred milliseconds, small against a catch-up of tens of seconds.
Status polling never touches the secondary until the primaries are done, so its CPU figure is
its own work. All links come from 127.0.0.1, so the listener's per-address cap on connections
still in their handshake (``MAX_UNAUTHENTICATED_PER_ADDRESS`` in ``link/listener.py``) applies
to all of them at once; the secondary's log is searched for its evictions, which are reported.

``--profile DIR`` adds one round per profiler at the largest count, not counted in the
figures: ``perf`` (``perf record -g`` of the secondary for the catch-up), ``cprofile`` (the
secondary run under ``python -m cProfile``; a table of its functions by own time is written
next to the ``.prof``) or ``py-spy`` (when it is on ``PATH``).

Every unit is stopped by its PID (SIGTERM, then SIGKILL after 30 s) on every exit, Ctrl-C and
SIGTERM included. Run from the repository root:
``.venv/bin/python benchmarks/bench_fanin.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.pair import MiB, Site, Topology, peer_address, wait_caught_up
from tests.support.unit_process import UnitProcess, start_unit

from benchmarks.bench_export import machine_info, mem_available, process_cpu_seconds
from benchmarks.bench_replication import disk_write_rate, log, peak_rss_kib, settle
from blockmirror.frontend.nbd_client import NbdClient

DEFAULT_COUNTS = (1, 8, 64)
QUICK_COUNTS = (1, 4)
# Issue 15's targets.
AGGREGATE_TARGET = 0.8
RSS_PER_REPLICA_TARGET_MIB = 8.0

CHUNK = MiB  # one NBD write of the backlog
WRITE_DEPTH = 8  # writes in flight per export
WRITE_EXPORTS = 4  # exports written at once
START_WORKERS = 4  # units started at once (2 CPUs: more only queue)
POLL_SLEEP = 0.02  # between rounds of status polls
STOP_TIMEOUT = 30.0
EVICTION_LOG = "too many unauthenticated links"


class Interrupted(Exception):
    """SIGTERM to the benchmark: unwind like Ctrl-C, so every unit is stopped."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


def stop_units(units: Sequence[UnitProcess], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every running unit, wait for them all, SIGKILL any still running after
    ``timeout`` seconds. Only these PIDs, never a name."""
    live = [u for u in units if u.proc.poll() is None]
    for unit in live:
        with contextlib.suppress(ProcessLookupError):
            unit.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for unit in live:
        try:
            unit.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"  unit {unit.pid} still running {timeout:.0f}s after SIGTERM: SIGKILL")
            unit.proc.kill()
            unit.proc.wait()


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_of(pid: int) -> float:
    return process_cpu_seconds(pid) or 0.0


@dataclass
class FanIn:
    """One secondary holding ``len(primaries)`` replicas; primary i holds volume ``volumes[i]``."""

    topo: Topology
    secondary: Site
    primaries: list[Site]
    volumes: list[str]

    def units(self) -> list[UnitProcess]:
        return [s.unit for s in self.topo.sites.values() if s.unit is not None]

    def pairs(self) -> Iterator[tuple[Site, str]]:
        return zip(self.primaries, self.volumes, strict=True)


def build(root: Path, count: int, volume_size: int, journal_size: int) -> FanIn:
    topo = Topology(root)
    volumes = [f"v{i:03d}" for i in range(count)]
    journal = f"{journal_size // MiB}MiB"
    secondary = topo.add_secondary(
        "secondary", volumes=dict.fromkeys(volumes, volume_size), journal_size=journal
    )
    primaries = [
        topo.add_primary(
            f"p{i:03d}",
            peers=[peer_address(secondary)],
            size=volume_size,
            volume=volume,
            journal_size=journal,
        )
        for i, volume in enumerate(volumes)
    ]
    return FanIn(topo, secondary, primaries, volumes)


def start_primaries(fan: FanIn) -> None:
    pool = ThreadPoolExecutor(START_WORKERS)
    try:
        for _unit in pool.map(Site.start, fan.primaries):
            pass
    finally:
        # On Ctrl-C the units not started yet stay so; those started are stopped by the caller.
        pool.shutdown(wait=True, cancel_futures=True)


# --- the backlog ------------------------------------------------------------------------------


async def _write_export(
    address: tuple[str, int], name: str, backlog: int, pool: bytes, salt: int
) -> None:
    client = await NbdClient.connect(address[0], address[1], name)
    async with client:
        inflight: set[asyncio.Future[None]] = set()
        for k, offset in enumerate(range(0, backlog, CHUNK)):
            # A slice of the pool at an offset no earlier round used here: fresh data, so no
            # write is skipped as unchanged and none compresses.
            start = (salt * 7919 + k * 104729) % (len(pool) - CHUNK)
            length = min(CHUNK, backlog - offset)
            inflight.add(asyncio.ensure_future(client.write(offset, pool[start : start + length])))
            if len(inflight) >= WRITE_DEPTH:
                done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    fut.result()
        await asyncio.gather(*inflight)
        await client.flush()


async def _write_all(fan: FanIn, backlog: int, round_no: int) -> None:
    pool = os.urandom(16 * MiB)
    gate = asyncio.Semaphore(WRITE_EXPORTS)

    async def one(index: int, site: Site, volume: str) -> None:
        assert site.unit is not None
        async with gate:
            salt = round_no * 65537 + index
            await _write_export(site.unit.export_address(volume), volume, backlog, pool, salt)

    await asyncio.gather(*(one(i, s, v) for i, (s, v) in enumerate(fan.pairs())))


def write_backlogs(fan: FanIn, backlog: int, round_no: int) -> float:
    """Write ``backlog`` bytes into every primary's export; returns the seconds it took."""
    began = time.monotonic()
    asyncio.run(_write_all(fan, backlog, round_no))
    return time.monotonic() - began


# --- one catch-up -----------------------------------------------------------------------------


@dataclass
class Link:
    site: Site
    volume: str
    connects: int
    newest: int
    backlog: int
    mode: str
    up: float | None = None
    done: float | None = None
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds, lag_bytes)

    def peer(self) -> dict[str, Any]:
        return dict(self.site.volume_status(self.volume)["peers"][0])

    def caught_up(self, peer: dict[str, Any]) -> bool:
        return (
            peer["state"] == "replicating"
            and int(peer["lag_bytes"]) == 0
            and int(peer["acked_seq"]) >= self.newest
        )

    def seconds(self) -> float:
        assert self.up is not None and self.done is not None
        return max(self.done - self.up, POLL_SLEEP)

    def rate(self) -> float:
        return self.backlog / MiB / self.seconds()

    def progress_at(self, t: float) -> float:
        """The share of the backlog acknowledged by ``t`` seconds (the last sample before)."""
        lag = self.backlog
        for when, sample in self.samples:
            if when > t:
                break
            lag = sample
        return 1.0 - lag / self.backlog if self.backlog else 1.0


def links_before(fan: FanIn) -> list[Link]:
    links = []
    for site, volume in fan.pairs():
        status = site.volume_status(volume)
        peer = status["peers"][0]
        links.append(
            Link(
                site,
                volume,
                connects=int(peer["connects"]),
                newest=int(status["journal"]["newest_seq"]),
                backlog=int(peer["lag_bytes"]),
                mode=str(peer["mode"]),
            )
        )
    return links


def wait_links(
    links: list[Link], t0: float, timeout: float, pid: int
) -> tuple[float | None, float, int]:
    """Poll every primary until each link is caught up; (first link-up, the CPU seconds of
    process ``pid`` then, poll rounds)."""
    deadline = time.monotonic() + timeout
    pending = list(links)
    first_up: float | None = None
    cpu_at_up = 0.0
    rounds = 0
    while pending:
        if time.monotonic() > deadline:
            late = ", ".join(link.volume for link in pending[:8])
            raise RuntimeError(f"{len(pending)} links not caught up in {timeout:.0f}s: {late}")
        rounds += 1
        for link in list(pending):
            try:
                peer = link.peer()
            except (OSError, AssertionError) as exc:
                log(f"  status of {link.site.name}: {exc!r}")
                continue
            now = time.monotonic()
            if link.up is None and int(peer["connects"]) > link.connects:
                link.up = now
                if first_up is None:
                    first_up, cpu_at_up = now, cpu_of(pid)
            link.samples.append((round(now - t0, 4), int(peer["lag_bytes"])))
            if link.up is not None and link.caught_up(peer):
                link.done = now
                pending.remove(link)
        if pending:
            time.sleep(POLL_SLEEP)
    return first_up, cpu_at_up, rounds


def wait_applied(secondary: Site, links: list[Link], timeout: float) -> float:
    """Until every replica on the secondary is consistent and has applied its link's newest
    record; returns the time (monotonic) of the poll that saw it."""
    newest = {link.volume: link.newest for link in links}
    deadline = time.monotonic() + timeout
    while True:
        volumes = {v["name"]: v for v in secondary.status()["volumes"]}
        if all(
            volumes[name]["replica"]["consistent"]
            and int(volumes[name]["replica"]["applied_seq"]) >= seq
            for name, seq in newest.items()
        ):
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the secondary did not apply everything in {timeout:.0f}s")
        time.sleep(POLL_SLEEP)


def evictions(log_path: Path) -> str | None:
    """The listener's last eviction warning in the secondary's log (a new one every start)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    found = [line for line in text.splitlines() if EVICTION_LOG in line]
    return found[-1].split(": ", 1)[-1] if found else None


class Profiler:
    """A profiler of the secondary for one round: ``perf``/``py-spy`` attach after its start;
    ``cprofile`` runs it under ``python -m cProfile`` (written when it stops)."""

    def __init__(self, kind: str, out: Path) -> None:
        self.kind = kind
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None

    def prefix(self) -> list[str] | None:
        if self.kind != "cprofile":
            return None
        # start_unit runs PREFIX + [python, -m, blockmirror.cli, run, CONFIG]: drop the first
        # three and exec the same interpreter under cProfile (the PID stays the unit's).
        script = 'shift 3; exec "$0" -m cProfile -o "$OUT" -m blockmirror.cli "$@"'
        return ["env", f"OUT={self.out}", "sh", "-c", script, sys.executable]

    def attach(self, pid: int) -> None:
        if self.kind == "perf":
            argv = ["perf", "record", "-F", "499", "-g", "-p", str(pid), "-o", str(self.out)]
        elif self.kind == "py-spy":
            argv = ["py-spy", "record", "-p", str(pid), "-r", "100", "-f", "raw"]
            argv += ["-o", str(self.out), "--nonblocking"]
        else:
            return
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def detach(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def summarize(self) -> None:
        """After the secondary stopped: cProfile's table of functions by own time."""
        if self.kind == "cprofile" and self.out.exists():
            text = self.out.with_suffix(".txt")
            with text.open("w") as f:
                stats = pstats.Stats(str(self.out), stream=f)
                stats.sort_stats("tottime").print_stats(40)
                stats.sort_stats("cumulative").print_stats(40)
            log(f"  cProfile table: {text}")
        elif self.out.exists():
            log(f"  profile: {self.out}")


def wait_room(fan: FanIn, backlog: int, timeout: float) -> None:
    """Until every primary's journal has room for one more backlog: the last round's records
    are acknowledged at once but freed by a later checkpoint, and a backlog that does not fit
    would overflow into dirty-map tracking (a resync, not a catch-up of records)."""
    deadline = time.monotonic() + timeout
    for site, volume in fan.pairs():
        while True:
            journal = site.volume_status(volume)["journal"]
            if int(journal["capacity"]) - int(journal["used"]) >= backlog + backlog // 16:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{site.name}'s journal was not freed in {timeout:.0f}s")
            time.sleep(0.1)


def catch_up_round(
    fan: FanIn, backlog: int, round_no: int, timeout: float, profiler: Profiler | None = None
) -> dict[str, Any]:
    secondary = fan.secondary
    assert secondary.unit is not None
    wait_room(fan, backlog, timeout)
    stop_units([secondary.unit])
    written = write_backlogs(fan, backlog, round_no)
    links = links_before(fan)
    settle(fan.topo.sites.values())
    modes = sorted({link.mode for link in links})
    if modes != ["journal"]:
        log(f"  warning: peers in mode {modes} before the catch-up (not all journal records)")
    total = sum(link.backlog for link in links)
    primary_pids = [s.unit.pid for s in fan.primaries if s.unit is not None]
    primaries_cpu = sum(cpu_of(pid) for pid in primary_pids)

    t0 = time.monotonic()
    prefix = profiler.prefix() if profiler else None
    secondary.unit = start_unit(secondary.config, secondary.state, timeout=120, prefix=prefix)
    started = time.monotonic()
    pid = secondary.unit.pid
    if profiler is not None:
        profiler.attach(pid)
    try:
        first_up, cpu_at_up, polls = wait_links(links, t0, timeout, pid)
        last_done = max(link.done or 0.0 for link in links)
        cpu = cpu_of(pid)
        applied = wait_applied(secondary, links, timeout)
    finally:
        if profiler is not None:
            profiler.detach()
    peak = peak_rss_kib(pid) / 1024
    rss = vm_rss_kib(pid) / 1024
    primaries_cpu = sum(cpu_of(p) for p in primary_pids) - primaries_cpu
    # The primaries were done at last_done; the secondary's apply may have finished later.
    end = max(last_done, applied) if applied > last_done + 2 * POLL_SLEEP else last_done
    assert first_up is not None
    rates = [link.rate() for link in links]
    dones = [(link.done or 0.0) - t0 for link in links]
    ups = [(link.up or 0.0) - t0 for link in links]
    first_done = min(dones)
    mib = total / MiB
    result = {
        "round": round_no,
        "primaries": len(links),
        "backlog_bytes": total,
        "modes_before": modes,
        "backlog_write_seconds": written,
        "secondary_start_seconds": started - t0,
        "first_link_up_seconds": first_up - t0,
        "last_link_up_seconds": max(ups),
        "seconds_from_start": end - t0,
        "seconds_from_link_up": end - first_up,
        "apply_after_ack_seconds": max(0.0, applied - last_done),
        "mib_per_second_from_start": mib / (end - t0),
        "mib_per_second_from_link_up": mib / (end - first_up),
        "secondary_peak_rss_mib": peak,
        "secondary_rss_mib": rss,
        "secondary_peak_rss_per_replica_mib": peak / len(links),
        "secondary_cpu_seconds": cpu,
        "secondary_cpu_seconds_per_mib": cpu / mib,
        "secondary_cpu_seconds_from_link_up": cpu - cpu_at_up,
        "secondary_cpu_seconds_per_mib_from_link_up": (cpu - cpu_at_up) / mib,
        "primaries_cpu_seconds": primaries_cpu,
        "primaries_cpu_seconds_per_mib": primaries_cpu / mib,
        "link_rate_min": min(rates),
        "link_rate_max": max(rates),
        "link_rate_min_over_max": min(rates) / max(rates),
        "first_link_done_seconds": first_done,
        "last_link_done_seconds": max(dones),
        "slowest_progress_at_first_done": min(link.progress_at(first_done) for link in links),
        "status_poll_rounds": polls,
        "poll_round_seconds": (last_done - started) / max(polls, 1),
        "listener_evictions": evictions(secondary.unit.log_path),
        "profiled": profiler.kind if profiler else None,
        "links": [
            {
                "volume": link.volume,
                "backlog_bytes": link.backlog,
                "up_seconds": (link.up or 0.0) - t0,
                "done_seconds": (link.done or 0.0) - t0,
                "mib_per_second": link.rate(),
                "samples": link.samples,
            }
            for link in links
        ],
    }
    log(
        f"  N={len(links)} round {round_no}: {mib:.0f} MiB, from start"
        f" {result['mib_per_second_from_start']:.0f} MiB/s ({end - t0:.2f} s), from link-up"
        f" {result['mib_per_second_from_link_up']:.0f} MiB/s; links up {first_up - t0:.2f}"
        f"..{max(ups):.2f} s, done {first_done:.2f}..{max(dones):.2f} s; link rates"
        f" {min(rates):.1f}..{max(rates):.1f} MiB/s; secondary peak RSS {peak:.0f} MiB,"
        f" CPU {cpu:.1f} s ({cpu - cpu_at_up:.1f} s from link-up); polls {polls}"
        + (f"; evictions: {result['listener_evictions']}" if result["listener_evictions"] else "")
    )
    return result


def run_count(
    root: Path,
    count: int,
    *,
    volume_size: int,
    backlog: int,
    repeat: int,
    timeout: float,
    profilers: Sequence[str],
    profile_dir: Path | None,
) -> dict[str, Any]:
    """Every round of one count N, its own units and files, all stopped before it returns."""
    where = root / f"n{count}"
    where.mkdir()
    # The journals hold two backlogs (no overflow to dirty tracking while the last is freed).
    journal_size = 2 * backlog + 16 * MiB
    fan = build(where, count, volume_size, journal_size)
    rounds: list[dict[str, Any]] = []
    try:
        began = time.monotonic()
        fan.secondary.start()
        start_primaries(fan)
        started = time.monotonic() - began
        for site, volume in fan.pairs():
            wait_caught_up(site, fan.secondary, volume=volume, timeout=timeout)
        primary_rss = [vm_rss_kib(s.unit.pid) / 1024 for s in fan.primaries if s.unit]
        log(
            f"N={count}: {count + 1} units started in {started:.1f} s, initial copy done after"
            f" {time.monotonic() - began:.1f} s; primary RSS {statistics.mean(primary_rss):.0f}"
            f" MiB each; MemAvailable {(mem_available() or 0) / 2**30:.1f} GiB"
        )
        # Round 0 writes every journal and replica for the first time (ext4 converts the
        # preallocated extents, the sparse images get their blocks): not what a returning
        # secondary meets, so it is a warm-up, kept in the JSON but not in the figures.
        warmup = catch_up_round(fan, backlog, 0, timeout)
        for r in range(repeat):
            rounds.append(catch_up_round(fan, backlog, r + 1, timeout))
        profiled: list[dict[str, Any]] = []
        for kind in profilers if profile_dir is not None else []:
            assert profile_dir is not None
            suffix = {"perf": "perf.data", "py-spy": "pyspy.txt", "cprofile": "prof"}[kind]
            profiler = Profiler(kind, profile_dir / f"fanin-{count}.{suffix}")
            profiled.append(
                catch_up_round(fan, backlog, repeat + len(profiled) + 1, timeout, profiler)
            )
            assert fan.secondary.unit is not None
            stop_units([fan.secondary.unit])
            profiler.summarize()
    finally:
        stop_units(fan.units())
    shutil.rmtree(where, ignore_errors=True)
    summary = summarize(count, rounds, profiled, primary_rss, volume_size, backlog)
    summary["warmup_round"] = warmup
    return summary


def summarize(
    count: int,
    rounds: list[dict[str, Any]],
    profiled: list[dict[str, Any]],
    primary_rss: list[float],
    volume_size: int,
    backlog: int,
) -> dict[str, Any]:
    def median(key: str) -> float:
        return float(statistics.median(float(r[key]) for r in rounds))

    keys = [
        "mib_per_second_from_start",
        "mib_per_second_from_link_up",
        "seconds_from_start",
        "seconds_from_link_up",
        "first_link_up_seconds",
        "last_link_up_seconds",
        "secondary_cpu_seconds_per_mib",
        "secondary_cpu_seconds_per_mib_from_link_up",
        "primaries_cpu_seconds_per_mib",
        "link_rate_min",
        "link_rate_max",
        "link_rate_min_over_max",
        "slowest_progress_at_first_done",
        "poll_round_seconds",
    ]
    peak = max(float(r["secondary_peak_rss_mib"]) for r in rounds)
    return {
        "primaries": count,
        "volume_bytes": volume_size,
        "backlog_bytes_per_primary": backlog,
        "backlog_bytes": rounds[0]["backlog_bytes"],
        **{key: median(key) for key in keys},
        "secondary_peak_rss_mib": peak,
        "secondary_peak_rss_per_replica_mib": peak / count,
        "primary_rss_mib_mean": statistics.mean(primary_rss),
        "rounds": rounds,
        "profiled_rounds": profiled,
    }


# --- the report -------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def tables(results: list[dict[str, Any]], disk: float) -> list[str]:
    lines = [
        "| primaries | backlog | catch-up from start | from first link-up | links up (s)"
        " | links done (s) | secondary peak RSS | RSS / replica"
        " | secondary CPU / MiB (run / from link-up)"
        " | link rate min / max | min / max | slowest link at first done |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        done = statistics.median(float(x["first_link_done_seconds"]) for x in r["rounds"])
        last = statistics.median(float(x["last_link_done_seconds"]) for x in r["rounds"])
        lines.append(
            f"| {r['primaries']} | {r['backlog_bytes'] / MiB:.0f} MiB"
            f" | {r['mib_per_second_from_start']:.0f} MiB/s"
            f" ({r['seconds_from_start']:.2f} s)"
            f" | {r['mib_per_second_from_link_up']:.0f} MiB/s"
            f" ({r['seconds_from_link_up']:.2f} s)"
            f" | {r['first_link_up_seconds']:.2f} .. {r['last_link_up_seconds']:.2f}"
            f" | {done:.2f} .. {last:.2f}"
            f" | {r['secondary_peak_rss_mib']:.0f} MiB"
            f" | {r['secondary_peak_rss_per_replica_mib']:.1f} MiB"
            f" | {r['secondary_cpu_seconds_per_mib'] * 1000:.1f}"
            f" / {r['secondary_cpu_seconds_per_mib_from_link_up'] * 1000:.1f} ms"
            f" | {r['link_rate_min']:.1f} / {r['link_rate_max']:.1f} MiB/s"
            f" | {r['link_rate_min_over_max']:.2f}"
            f" | {r['slowest_progress_at_first_done']:.0%} |"
        )
    low, high = results[0], results[-1]
    n_low, n_high = low["primaries"], high["primaries"]
    lines += ["", "| figure | measured | target | result |", "|---|---:|---:|---|"]
    for key, label in (
        ("mib_per_second_from_start", "from the secondary's start"),
        ("mib_per_second_from_link_up", "from the first link-up"),
    ):
        ratio = high[key] / low[key]
        lines.append(
            f"| aggregate catch-up {label}, {n_high} vs {n_low} primaries | {ratio:.2f}"
            f" ({high[key]:.0f} / {low[key]:.0f} MiB/s) | >= {AGGREGATE_TARGET}"
            f" | {verdict(ratio >= AGGREGATE_TARGET)} |"
        )
    per = high["secondary_peak_rss_per_replica_mib"]
    lines.append(
        f"| secondary peak RSS per replica, {n_high} replicas | {per:.1f} MiB"
        f" ({high['secondary_peak_rss_mib']:.0f} MiB / {n_high})"
        f" | <= {RSS_PER_REPLICA_TARGET_MIB:.0f} MiB"
        f" | {verdict(per <= RSS_PER_REPLICA_TARGET_MIB)} |"
    )
    if n_high > n_low:
        added = (high["secondary_peak_rss_mib"] - low["secondary_peak_rss_mib"]) / (n_high - n_low)
        lines.append(
            f"| secondary peak RSS per added replica, {n_low} to {n_high} | {added:.1f} MiB"
            f" | <= {RSS_PER_REPLICA_TARGET_MIB:.0f} MiB"
            f" | {verdict(added <= RSS_PER_REPLICA_TARGET_MIB)} |"
        )
    rate = high["mib_per_second_from_link_up"]
    lines.append(
        f"| aggregate catch-up from the first link-up, {n_high} primaries, vs the disk's"
        f" sequential write + fdatasync of as many bytes (same run) | {rate / disk:.2f}"
        f" ({rate:.0f} / {disk:.0f} MiB/s) | none (reported) | - |"
    )
    for r in results:
        lines.append(
            f"| secondary CPU per MiB, {r['primaries']} primaries"
            f" | {r['secondary_cpu_seconds_per_mib'] * 1000:.1f} ms whole run,"
            f" {r['secondary_cpu_seconds_per_mib_from_link_up'] * 1000:.1f} ms from link-up"
            f" (primaries: {r['primaries_cpu_seconds_per_mib'] * 1000:.1f} ms)"
            " | none (reported) | - |"
        )
    lines.append(
        f"| per-link fairness, {n_high} primaries: min / max link rate"
        f" | {high['link_rate_min_over_max']:.2f} | none (reported) | - |"
    )
    return lines


def parse_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("counts are whole numbers from 1")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--counts",
        type=parse_counts,
        help="numbers of primaries, comma-separated (default 1,8,64; --quick: 1,4)",
    )
    parser.add_argument("--volume-size", type=int, default=32, help="MiB per volume (32)")
    parser.add_argument("--backlog", type=int, help="MiB per primary (default: the volume)")
    parser.add_argument("--repeat", type=int, default=3, help="catch-ups per count (3)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per wait (900)")
    parser.add_argument("--quick", action="store_true", help="counts 1,4, 16 MiB, one round")
    parser.add_argument("--dir", help="parent of the work directory (default /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", metavar="PATH", help="write every result here")
    parser.add_argument("--profile", metavar="DIR", help="profile the secondary in extra rounds")
    parser.add_argument(
        "--profilers",
        default="perf",
        help="with --profile: perf, cprofile, py-spy, comma-separated (one round each)",
    )
    args = parser.parse_args(argv)
    counts: list[int] = args.counts or list(QUICK_COUNTS if args.quick else DEFAULT_COUNTS)
    if args.quick:
        args.volume_size, args.repeat = min(args.volume_size, 16), 1
    backlog_mib = args.backlog if args.backlog is not None else args.volume_size
    if not 1 <= backlog_mib <= args.volume_size or args.repeat < 1:
        parser.error("--backlog must be 1..--volume-size MiB and --repeat at least 1")
    profilers = [p for p in args.profilers.split(",") if p]
    if unknown := set(profilers) - {"perf", "cprofile", "py-spy"}:
        parser.error(f"unknown profilers {sorted(unknown)}")
    profile_dir = Path(args.profile).resolve() if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    parent = Path(args.dir) if args.dir else Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bm-fanin-bench-", dir=parent))
    signal.signal(signal.SIGTERM, _on_sigterm)
    info = machine_info()
    log(
        f"fan-in: counts {counts}, {args.volume_size} MiB volumes, {backlog_mib} MiB backlog per"
        f" primary, {args.repeat} round(s); one unit process per primary; work dir {root};"
        f" git {info['git']}, source {info['source_digest']}"
    )
    results: list[dict[str, Any]] = []
    disk = 0.0
    try:
        for count in counts:
            results.append(
                run_count(
                    root,
                    count,
                    volume_size=args.volume_size * MiB,
                    backlog=backlog_mib * MiB,
                    repeat=args.repeat,
                    timeout=args.timeout,
                    # Only the largest count is profiled: that is where the secondary is busiest.
                    profilers=profilers if count == counts[-1] else [],
                    profile_dir=profile_dir,
                )
            )
        # The named baseline: the disk's own pace for what the secondary must make durable.
        total = max(counts) * backlog_mib * MiB
        disk = disk_write_rate(root, total - total % (8 * MiB) or 8 * MiB)
        log(f"disk: sequential write + fdatasync of {total // MiB} MiB: {disk:.0f} MiB/s")
    except (Interrupted, KeyboardInterrupt):
        log("interrupted: every unit stopped")
        return 130
    except (RuntimeError, AssertionError, OSError) as exc:
        log(f"failed: {exc}")
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"Fan-in on loopback: N primaries (one unit process each, one {args.volume_size} MiB"
        f" volume each) into one secondary unit; {backlog_mib} MiB backlog per primary;"
        f" medians of {args.repeat} round(s), peak RSS the highest"
    )
    print()
    print("\n".join(tables(results, disk)))
    if args.json:
        report = {
            "machine": info,
            "settings": {
                "counts": counts,
                "volume_mib": args.volume_size,
                "backlog_mib_per_primary": backlog_mib,
                "repeat": args.repeat,
                "units": "one unit process per primary",
                "targets": {
                    "aggregate_largest_over_smallest": AGGREGATE_TARGET,
                    "secondary_rss_per_replica_mib": RSS_PER_REPLICA_TARGET_MIB,
                },
            },
            "results": results,
            "disk_write_sync_mib_per_second": disk,
        }
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
