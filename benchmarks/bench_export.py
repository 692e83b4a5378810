"""fio over NBD: blockmirror's export, with and without its journal, against nbdkit's file plugin.

Three servers serve one backing file that is fully allocated and warm in the page cache: nbdkit's
``file`` plugin (the baseline), a blockmirror unit whose volume has ``journal = false`` (the
previous release's plain export) and a blockmirror unit with the journal (``journal_size``
1 GiB by default, in a state directory on the backing file's file system). Each job runs against
every server back to back, rotating which goes first, ``--repeat`` times; the table shows
medians, the ratios to nbdkit and the journal's cost (1 - journal / no journal) against their
targets. Targets are reported, never enforced: a wall-clock figure on a shared machine is a
measurement, not a test.

With ``--baseline-rev REV`` the same run also serves the file from units of an older commit's
tree (``git archive REV`` into the temporary directory), "no journal (REV)" and "journal (REV)",
rotated with the others, and prints the new/old ratio per job, marking any below 0.95.

Run from the repository root::

    .venv/bin/python benchmarks/bench_export.py            # full run, about 5 minutes
    .venv/bin/python benchmarks/bench_export.py --quick --size 256MiB   # smoke run
    .venv/bin/python benchmarks/bench_export.py --baseline-rev 359b420 --repeat 5
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.baseline_tree import (  # noqa: E402
    MIN_RATIO,
    SourceTree,
    current_tree,
    extract_tree,
    ratio_mark,
    resolve_revision,
)
from blockmirror import __version__ as blockmirror_version  # noqa: E402
from blockmirror.errors import SizeError  # noqa: E402
from blockmirror.units import GiB, MiB, format_size, parse_size  # noqa: E402

VOLUME_NAME = "bench"
RAMP_SECONDS = 1
# Memory-backed file systems would make the file "warm" trivially and differ from a real volume.
MEMORY_FS_TYPES = frozenset({"tmpfs", "ramfs", "hugetlbfs"})
SERVER_START_TIMEOUT = 60.0  # the journaled unit allocates its journal file before serving
SERVER_STOP_TIMEOUT = 30.0  # and syncs it, with a clean checkpoint, when it stops
DEFAULT_JOURNAL_SIZE = GiB
# The journal is written once over its whole length (plus this margin) before any measurement.
WARMUP_FACTOR = 1.1
# --profile: how far into a fio run (past its ramp) the profilers start, and for how long.
PROFILE_DELAY = 1.5
PROFILE_SECONDS = 4.0

Metric = Literal["MiB/s", "kIOPS"]
Direction = Literal["read", "write"]


# --- servers and jobs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerKind:
    key: str
    title: str
    journaled: bool = False
    baseline: bool = False  # a blockmirror unit run from the --baseline-rev tree


NBDKIT = ServerKind("nbdkit", "nbdkit file")
NOJOURNAL = ServerKind("nojournal", "no journal")
JOURNAL = ServerKind("journal", "journal", journaled=True)
SERVER_KINDS: tuple[ServerKind, ...] = (NBDKIT, NOJOURNAL, JOURNAL)
SERVERS_BY_KEY = {kind.key: kind for kind in SERVER_KINDS}


def baseline_kind(kind: ServerKind, rev: str) -> ServerKind:
    """The same unit as ``kind``, run from the tree of ``rev``: "journal (359b420)"."""
    return ServerKind(f"{kind.key}-base", f"{kind.title} ({rev})", kind.journaled, baseline=True)


def with_baselines(kinds: Sequence[ServerKind], rev: str | None) -> list[ServerKind]:
    """``kinds`` with each blockmirror unit's baseline right after it, so the two run back to
    back in most rounds of the rotation."""
    out: list[ServerKind] = []
    for kind in kinds:
        out.append(kind)
        if rev is not None and kind is not NBDKIT:
            out.append(baseline_kind(kind, rev))
    return out


@dataclass(frozen=True)
class Job:
    """One fio workload and how its result is judged."""

    key: str
    label: str
    rw: str
    bs: str
    iodepth: int
    metric: Metric
    target: float | None  # minimum ratio no-journal / nbdkit; None: reported only
    max_cost: float | None  # maximum journal cost, 1 - journal / no-journal; None: reported only
    fsync: int = 0  # fio's --fsync: a FLUSH after every this many writes (0: none)
    journal_target: float | None = None  # minimum ratio journal / nbdkit; None: reported only

    @property
    def direction(self) -> Direction:
        return "write" if "write" in self.rw else "read"


# The targets are issue 15's (docs/benchmarks.md, "Performance (issue 15)").
JOBS: tuple[Job, ...] = (
    Job("seqwrite", "seq write 1M qd8", "write", "1M", 8, "MiB/s", 1.0, 0.15),
    Job("seqread", "seq read 1M qd8", "read", "1M", 8, "MiB/s", 0.7, None),
    Job("randwrite", "randwrite 4k qd16", "randwrite", "4k", 16, "kIOPS", 1.0, 0.20),
    Job("randread", "randread 4k qd16", "randread", "4k", 16, "kIOPS", 1.0, None),
    Job("randwrite-qd1", "randwrite 4k qd1", "randwrite", "4k", 1, "kIOPS", None, 0.20),
    # What a database or a filesystem's journal does: every write followed by a FLUSH.
    Job(
        "randwrite-fsync",
        "randwrite 4k qd1 fsync=1",
        "randwrite",
        "4k",
        1,
        "kIOPS",
        None,
        None,
        fsync=1,
        journal_target=0.9,
    ),
)
JOBS_BY_KEY = {job.key: job for job in JOBS}


# --- helpers --------------------------------------------------------------------------------------


def log(message: str) -> None:
    """Progress goes to stderr so stdout carries only the result table."""
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    """An ephemeral port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _unescape_mountinfo(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def filesystem_type(path: Path) -> str:
    """The type of the file system holding ``path`` (longest mount point prefix)."""
    target = str(path.resolve())
    best_mount, best_type = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, sep, right = line.partition(" - ")
            fields = left.split()
            if not sep or len(fields) < 5 or not right:
                continue
            mount = _unescape_mountinfo(fields[4])
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best_mount):
                best_mount, best_type = mount, right.split()[0]
    return best_type


def default_parent_dir() -> Path:
    """The first of $TMPDIR (or /tmp) and /var/tmp that is on a real disk."""
    candidates = [Path(tempfile.gettempdir()), Path("/var/tmp")]
    for candidate in candidates:
        if candidate.is_dir() and filesystem_type(candidate) not in MEMORY_FS_TYPES:
            return candidate
    raise SystemExit(
        "every default temporary directory is memory-backed (tmpfs); pass --dir on a real disk"
    )


def mem_available() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def stop_on_signal(signum: int, _frame: FrameType | None) -> None:
    """A SIGTERM handler for the benchmarks: raise, so that their ``finally`` blocks stop
    what they started (by PID) and remove their work directories."""
    raise SystemExit(128 + signum)


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process and all its threads, from /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces; fields follow the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
    return ticks / os.sysconf("SC_CLK_TCK")


def command_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def git_revision() -> str:
    """HEAD plus a marker when the work tree has changes: the server code may be in flux."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "src"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}+local-changes" if dirty else rev


def source_digest() -> str:
    """A digest of the server's sources as this run started them (they may change meanwhile)."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "src" / "blockmirror").rglob("*.py")):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fio": command_version(["fio", "--version"]),
        "nbdkit": command_version(["nbdkit", "--version"]),
        "blockmirror": blockmirror_version,
        "git": git_revision(),
        "source_digest": source_digest(),
    }


# --- backing file ---------------------------------------------------------------------------------


def create_backing_file(path: Path, size: int) -> float:
    """Allocate every block, write non-zero data once, make it clean, read it back (warm).

    Returns the seconds taken. Allocating and writing up front means neither server pays for
    block allocation or zero-filling during a run, and the fsync leaves no dirty pages whose
    writeback would land in the first measurement.
    """
    started = time.monotonic()
    chunk = bytearray(os.urandom(MiB))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
        for index, pos in enumerate(range(0, size, MiB)):
            # A distinct stamp per MiB, so no two blocks are identical.
            chunk[:8] = index.to_bytes(8, "little")
            length = min(MiB, size - pos)
            view = memoryview(chunk)[:length]
            while view:
                written = os.pwrite(fd, view, pos + (length - len(view)))
                view = view[written:]
        os.fsync(fd)
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
        pos = 0
        while pos < size:
            data = os.pread(fd, 8 * MiB, pos)
            if not data:
                raise OSError(f"{path}: short read at {pos}")
            pos += len(data)
    finally:
        os.close(fd)
    return time.monotonic() - started


def settle(paths: Sequence[Path]) -> None:
    """Write back what the previous run dirtied, so each run starts with a clean, warm cache.

    The backing file and every journal: a journal's dirty pages would otherwise be written back
    in the middle of whichever run comes next, whatever server it drives.
    """
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- servers --------------------------------------------------------------------------------------


@dataclass
class Server:
    """A running NBD server process, stopped by its own PID."""

    kind: ServerKind
    proc: subprocess.Popen[bytes]
    uri: str
    log_path: Path
    journal_path: Path | None = None
    tree: SourceTree | None = None  # where a blockmirror unit's code came from
    package: Path | None = None  # its blockmirror/__init__.py, as the unit resolves it

    @property
    def key(self) -> str:
        return self.kind.key

    @property
    def title(self) -> str:
        return self.kind.title

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL only when it hangs (and say so)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log(f"{self.title} (pid {self.pid}) ignored SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        if code not in (0, -signal.SIGTERM):
            log(f"{self.title} (pid {self.pid}) exited with {code}")


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log_path.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server not listening on port {port} after {SERVER_START_TIMEOUT}s")


def start_nbdkit(workdir: Path, backing: Path) -> Server:
    """``nbdkit file`` on an ephemeral loopback port; it exits with us if we die."""
    log_path = workdir / "nbdkit.log"
    pidfile = workdir / "nbdkit.pid"
    last_error: Exception | None = None
    for _attempt in range(3):  # another process may grab the free port before nbdkit binds it
        port = free_port()
        argv = [
            "nbdkit",
            "--foreground",
            "--exit-with-parent",
            "--ipaddr",
            "127.0.0.1",
            "--port",
            str(port),
            "--pidfile",
            str(pidfile),
            "file",
            f"file={backing}",
        ]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _wait_for_port(proc, port, log_path)
        except RuntimeError as exc:
            last_error = exc
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            continue
        # Export names are ignored by nbdkit's file plugin: the empty name is the file.
        return Server(NBDKIT, proc, f"nbd://127.0.0.1:{port}/", log_path)
    raise RuntimeError(f"nbdkit did not start: {last_error}")


def start_blockmirror(
    kind: ServerKind,
    workdir: Path,
    backing: Path,
    size: int,
    journal_size: int,
    tree: SourceTree,
) -> Server:
    """A unit with one primary volume on the backing file, exported on an ephemeral port.

    Each unit has its own directory (config, log, state); the journaled unit's journal is
    ``STATE_DIR/bench.journal``, on the file system of the backing file like the rest of
    ``workdir``. The unit runs ``tree``'s code (``PYTHONPATH``, checked by a probe with the
    same interpreter, environment and working directory, the unit's directory, which holds no
    package that could shadow it); one config serves every tree, its format being the same.
    """
    journaled = kind.journaled
    unit_dir = workdir / f"unit-{kind.key}"
    state_dir = unit_dir / "state"
    unit_dir.mkdir()
    config = unit_dir / "bench.toml"
    volume: dict[str, Any] = {
        "name": VOLUME_NAME,
        "role": "primary",
        "path": str(backing),
        "size": size,
        "export": "127.0.0.1:0",
        "journal": journaled,
    }
    if journaled:
        volume["journal_size"] = journal_size
    unit_name = f"bench-{kind.key}"
    lines = ["[unit]", f"name = {json.dumps(unit_name)}"]
    lines += [f"state_dir = {json.dumps(str(state_dir))}", ""]
    lines += ["[[volume]]", *(f"{key} = {json.dumps(value)}" for key, value in volume.items())]
    config.write_text("\n".join(lines) + "\n")

    log_path = unit_dir / "unit.log"
    runtime_file = state_dir / "unit.json"
    env = tree.env(dict(os.environ, PYTHONUNBUFFERED="1"))
    package = tree.probe(cwd=unit_dir)
    argv = [sys.executable, "-m", "blockmirror.cli", "run", str(config)]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=unit_dir
        )
    server: Server | None = None
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"blockmirror unit exited {proc.returncode}:\n{log_path.read_text()}"
                )
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                runtime = json.loads(runtime_file.read_text())
                if runtime.get("pid") == proc.pid:
                    address = runtime["exports"][VOLUME_NAME]
                    if address is None:
                        raise RuntimeError(
                            f"blockmirror unit does not serve {VOLUME_NAME}:\n"
                            f"{log_path.read_text()}"
                        )
                    uri = f"nbd://{address}/{VOLUME_NAME}"
                    journal_path = state_dir / f"{VOLUME_NAME}.journal" if journaled else None
                    if journal_path is not None and not journal_path.exists():
                        raise RuntimeError(f"the journaled unit has no journal at {journal_path}")
                    if not journaled and (state_dir / f"{VOLUME_NAME}.journal").exists():
                        raise RuntimeError("the unit with journal = false created a journal")
                    tree.check_process(proc.pid)
                    server = Server(kind, proc, uri, log_path, journal_path, tree, package)
                    return server
            time.sleep(0.05)
        raise RuntimeError(
            f"blockmirror unit not up after {SERVER_START_TIMEOUT}s:\n{log_path.read_text()}"
        )
    finally:
        if server is None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- profiling ------------------------------------------------------------------------------------


def _io_counters(pid: int) -> tuple[int, int] | None:
    """(rchar, wchar) of a process: bytes through read-like and write-like calls, sockets too."""
    try:
        fields = dict(
            line.split(": ", 1) for line in Path(f"/proc/{pid}/io").read_text().splitlines()
        )
        return int(fields["rchar"]), int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return None


@dataclass
class Profiler:
    """``--profile``: py-spy (blockmirror units) and/or perf (any server) during each fio run.

    Each profile covers ``PROFILE_SECONDS`` from ``PROFILE_DELAY`` into the run, files named
    ``JOB-SERVER-REPEAT``: ``.pyspy.txt`` (py-spy's raw, collapsed stacks), ``.perf.data`` and
    ``.json``, the server's CPU and bytes in and out over the same window, so that costs can be
    turned into CPU time per request. A profiled run is perturbed: take figures from a run
    without ``--profile``.
    """

    directory: Path
    py_spy: str | None
    perf: str | None

    def seconds(self, runtime: int) -> float:
        return max(1.0, min(PROFILE_SECONDS, RAMP_SECONDS + runtime - PROFILE_DELAY - 0.5))

    def record(self, server: Server, job: Job, repeat: int, runtime: int) -> None:
        name = f"{job.key}-{server.key}-{repeat}"
        seconds = self.seconds(runtime)
        argvs: list[list[str]] = []
        if self.py_spy is not None and server.kind is not NBDKIT:
            argvs.append(
                [
                    self.py_spy,
                    "record",
                    "-p",
                    str(server.pid),
                    "-d",
                    str(round(seconds)),
                    "-r",
                    "200",
                    "-f",
                    "raw",
                    "-o",
                    str(self.directory / f"{name}.pyspy.txt"),
                    "--nonblocking",
                ]
            )
        if self.perf is not None:
            argvs.append(
                [
                    self.perf,
                    "record",
                    "-F",
                    "999",
                    "-g",
                    "-p",
                    str(server.pid),
                    "-o",
                    str(self.directory / f"{name}.perf.data"),
                    "--",
                    "sleep",
                    str(seconds),
                ]
            )
        if not argvs:
            return  # py-spy only, and this server is not a Python process
        io_before, cpu_before = _io_counters(server.pid), process_cpu_seconds(server.pid)
        started = time.monotonic()
        procs = [
            subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for argv in argvs
        ]
        for argv, proc in zip(argvs, procs, strict=True):
            try:
                _out, err = proc.communicate(timeout=seconds + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _out, err = proc.communicate()
            if proc.returncode != 0:
                log(f"  {Path(argv[0]).name} failed ({proc.returncode}): {err.decode()[-500:]}")
        elapsed = time.monotonic() - started
        io_after, cpu_after = _io_counters(server.pid), process_cpu_seconds(server.pid)
        window: dict[str, Any] = {
            "server": server.key,
            "job": job.key,
            "repeat": repeat,
            "seconds": round(elapsed, 3),
            "block_size": parse_size(job.bs, key="bs"),
        }
        if cpu_before is not None and cpu_after is not None:
            window["server_cpu_cores"] = round((cpu_after - cpu_before) / elapsed, 3)
        if io_before is not None and io_after is not None:
            received = (io_after[0] - io_before[0]) / elapsed
            sent = (io_after[1] - io_before[1]) / elapsed
            window["read_bytes_per_s"] = round(received)
            window["written_bytes_per_s"] = round(sent)
            # Every payload byte passes through a read-like call: a write's is received from
            # the socket, a read's is read from the file. (Sends may not be counted: nbdkit's
            # send(2) is not in wchar.)
            window["requests_per_s"] = round(received / window["block_size"], 1)
        (self.directory / f"{name}.json").write_text(json.dumps(window, indent=2) + "\n")
        rate = window.get("requests_per_s")
        log(f"  profiled {server.title} for {elapsed:.1f}s: {name}.*, {rate} requests/s")


# --- fio ------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One fio run of one job against one server."""

    server: str
    job: str
    repeat: int
    value: float | None  # in the job's metric; None when the run failed
    server_cpu: float | None  # cores the server kept busy, averaged over the whole fio run
    error: str | None = None
    fio: dict[str, Any] | None = None
    order: int = 0  # position in the round: 0 went first

    @property
    def latency_us(self) -> float | None:
        """fio's mean total latency per request (submission to completion), in µs."""
        side = self._side()
        with contextlib.suppress(KeyError, TypeError, ValueError):
            return float(side["lat_ns"]["mean"]) / 1000 if side else None
        return None

    @property
    def p99_us(self) -> float | None:
        """fio's 99th percentile completion latency, in µs."""
        side = self._side()
        with contextlib.suppress(KeyError, TypeError, ValueError):
            return float(side["clat_ns"]["percentile"]["99.000000"]) / 1000 if side else None
        return None

    @property
    def cpu_per_request_us(self) -> float | None:
        """Server CPU time per request, in µs: cores busy over requests per second.

        The cores are averaged over the whole fio process (start-up and ramp included), the
        rate over the measured part, so this reads a few percent low; unlike the throughput it
        hardly moves when the scheduler gives the server less of a CPU.
        """
        side = self._side()
        if side is None or self.server_cpu is None:
            return None
        with contextlib.suppress(KeyError, TypeError, ValueError):
            iops = float(side["iops"])
            return self.server_cpu / iops * 1e6 if iops > 0 else None
        return None

    def _side(self) -> dict[str, Any] | None:
        if self.fio is None or self.value is None:
            return None
        side: dict[str, Any] = self.fio["jobs"][0][JOBS_BY_KEY[self.job].direction]
        return side

    def summary(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "job": self.job,
            "repeat": self.repeat,
            "order": self.order,
            "value": self.value,
            "server_cpu_cores": self.server_cpu,
            "mean_latency_us": self.latency_us,
            "p99_latency_us": self.p99_us,
            "server_cpu_per_request_us": self.cpu_per_request_us,
            "error": self.error,
        }


def fio_argv(job: Job, uri: str, size: int, runtime: int, output: Path) -> list[str]:
    return [
        "fio",
        f"--name={job.key}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        *([f"--fsync={job.fsync}"] if job.fsync else []),
        "--numjobs=1",
        f"--size={size}",
        "--time_based",
        f"--runtime={runtime}",
        f"--ramp_time={RAMP_SECONDS}",
        "--output-format=json",
        f"--output={output}",
    ]


def _parse_fio_json(text: str) -> dict[str, Any]:
    # fio may print notices ("fio: connected to NBD server") before the JSON document.
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in fio output")
    document, _end = json.JSONDecoder().raw_decode(text[start:])
    if not isinstance(document, dict):
        raise ValueError("fio output is not a JSON object")
    return document


def run_fio(
    job: Job,
    server: Server,
    *,
    size: int,
    runtime: int,
    workdir: Path,
    repeat: int,
    profiler: Profiler | None = None,
) -> RunResult:
    output = workdir / f"fio-{job.key}-{server.key}-{repeat}.json"
    argv = fio_argv(job, server.uri, size, runtime, output)
    cpu_before = process_cpu_seconds(server.pid)
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if profiler is not None:
            time.sleep(PROFILE_DELAY)
            profiler.record(server, job, repeat, runtime)
        stdout, stderr = proc.communicate(timeout=runtime + 120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return RunResult(server.key, job.key, repeat, None, None, "fio timed out")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    elapsed = time.monotonic() - started
    cpu_after = process_cpu_seconds(server.pid)
    server_cpu = None
    if cpu_before is not None and cpu_after is not None and elapsed > 0:
        server_cpu = round((cpu_after - cpu_before) / elapsed, 3)
    try:
        document = _parse_fio_json(output.read_text())
    except (OSError, ValueError) as exc:
        detail = (stderr or stdout).strip()[-2000:]
        return RunResult(
            server.key,
            job.key,
            repeat,
            None,
            server_cpu,
            f"fio exit {proc.returncode}: {exc}\n{detail}",
        )
    stats = document["jobs"][0]
    if proc.returncode != 0 or stats.get("error"):
        detail = (stderr or stdout).strip()[-2000:]
        return RunResult(
            server.key,
            job.key,
            repeat,
            None,
            server_cpu,
            f"fio exit {proc.returncode}, job error {stats.get('error')}: {detail}",
            document,
        )
    side = stats[job.direction]
    # Bandwidth for the 1 MiB jobs, operations for the 4 KiB ones: what each workload stresses.
    value = float(side["bw_bytes"]) / MiB if job.metric == "MiB/s" else float(side["iops"]) / 1000
    return RunResult(server.key, job.key, repeat, value, server_cpu, None, document)


def warm_journal(server: Server, *, size: int, journal_size: int, workdir: Path) -> float:
    """Write the whole journal once, unmeasured, through the journaled export.

    A new journal is allocated but never written: its first lap would pay for converting
    unwritten extents and for pages not yet cached, a cost a running unit pays once. Writing
    ``WARMUP_FACTOR`` times its size in 1 MiB writes laps the ring. Returns the seconds taken.
    """
    loops = max(1, math.ceil(journal_size * WARMUP_FACTOR / size))
    output = workdir / "fio-warmup.json"
    argv = [
        "fio",
        "--name=warmup",
        "--ioengine=nbd",
        f"--uri={server.uri}",
        "--rw=write",
        "--bs=1M",
        "--iodepth=8",
        "--numjobs=1",
        f"--size={size}",
        f"--loops={loops}",
        "--output-format=json",
        f"--output={output}",
    ]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise RuntimeError(f"journal warm-up failed (fio exit {proc.returncode}): {detail}")
    return time.monotonic() - started


# --- results --------------------------------------------------------------------------------------


@dataclass
class JobSummary:
    """Every completed run of one job, by server key, in the order they ran."""

    job: Job
    runs: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=dict)
    p99: dict[str, list[float]] = field(default_factory=dict)
    cpu_per_request: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0

    def add(self, result: RunResult) -> None:
        if result.value is None:
            self.errors += 1
            return
        self.runs.setdefault(result.server, []).append(result.value)
        for store, value in (
            (self.cpu, result.server_cpu),
            (self.latency, result.latency_us),
            (self.p99, result.p99_us),
            (self.cpu_per_request, result.cpu_per_request_us),
        ):
            if value is not None:
                store.setdefault(result.server, []).append(value)

    def median(self, key: str, store: dict[str, list[float]] | None = None) -> float | None:
        values = (self.runs if store is None else store).get(key)
        return statistics.median(values) if values else None

    def ratio(self, num: str, den: str) -> float | None:
        ours, theirs = self.median(num), self.median(den)
        if ours is None or theirs is None or theirs == 0:
            return None
        return ours / theirs

    @property
    def nojournal_ratio(self) -> float | None:
        """No-journal blockmirror over nbdkit: the export's own cost."""
        return self.ratio(NOJOURNAL.key, NBDKIT.key)

    @property
    def journal_ratio(self) -> float | None:
        return self.ratio(JOURNAL.key, NBDKIT.key)

    @property
    def journal_cost(self) -> float | None:
        """1 - journal / no-journal: the share of throughput the journal takes away."""
        ratio = self.ratio(JOURNAL.key, NOJOURNAL.key)
        return None if ratio is None else 1 - ratio

    @property
    def journal_cpu_cost(self) -> float | None:
        """1 - no-journal / journal server CPU per request: the cost if CPU were the limit."""
        ours = self.median(JOURNAL.key, self.cpu_per_request)
        base = self.median(NOJOURNAL.key, self.cpu_per_request)
        if ours is None or base is None or ours == 0:
            return None
        return 1 - base / ours

    @property
    def ratio_verdict(self) -> str:
        ratio = self.nojournal_ratio
        if ratio is None:
            return "error" if self.errors else "-"
        if self.job.target is None:
            return "n/a"
        return "met" if ratio >= self.job.target else "missed"

    @property
    def journal_verdict(self) -> str:
        ratio = self.journal_ratio
        if ratio is None:
            return "error" if self.errors else "-"
        if self.job.journal_target is None:
            return "n/a"
        return "met" if ratio >= self.job.journal_target else "missed"

    @property
    def cost_verdict(self) -> str:
        cost = self.journal_cost
        if cost is None:
            return "error" if self.errors else "-"
        if self.job.max_cost is None:
            return "n/a"
        return "met" if cost <= self.job.max_cost else "missed"

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job.key,
            "label": self.job.label,
            "metric": self.job.metric,
            "runs": self.runs,
            "medians": {key: self.median(key) for key in self.runs},
            "server_cpu_cores_median": {key: self.median(key, self.cpu) for key in self.cpu},
            "mean_latency_us_median": {key: self.median(key, self.latency) for key in self.latency},
            "p99_latency_us_median": {key: self.median(key, self.p99) for key in self.p99},
            "server_cpu_per_request_us_median": {
                key: self.median(key, self.cpu_per_request) for key in self.cpu_per_request
            },
            "journal_cpu_cost": self.journal_cpu_cost,
            "ratio_nojournal_nbdkit": self.nojournal_ratio,
            "ratio_journal_nbdkit": self.journal_ratio,
            "journal_cost": self.journal_cost,
            "target_ratio": self.job.target,
            "target_journal_ratio": self.job.journal_target,
            "journal_ratio_verdict": self.journal_verdict,
            "max_journal_cost": self.job.max_cost,
            "ratio_verdict": self.ratio_verdict,
            "cost_verdict": self.cost_verdict,
            "failed_runs": self.errors,
        }


def _fmt(value: float | None, metric: Metric) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} {metric}" if metric == "MiB/s" else f"{value:.1f} {metric}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _fmt_us(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 100:
        return f"{value:.1f} µs"
    return f"{value:.0f} µs" if value < 1000 else f"{value / 1000:.1f} ms"


def table_rows(summaries: Sequence[JobSummary], servers: Sequence[ServerKind]) -> list[list[str]]:
    """The result table; ratio and cost columns appear when both servers they need ran."""
    keys = {kind.key for kind in servers}
    with_ratio = {NBDKIT.key, NOJOURNAL.key} <= keys
    with_journal_ratio = {NBDKIT.key, JOURNAL.key} <= keys
    with_cost = {NOJOURNAL.key, JOURNAL.key} <= keys
    header = ["job", *(kind.title for kind in servers)]
    if with_ratio:
        header += ["no-journal / nbdkit", "target", "result"]
    if with_journal_ratio:
        header += ["journal / nbdkit", "target", "result"]
    if with_cost:
        header += ["journal cost", "max cost", "result"]
    rows = [header]
    for s in summaries:
        job = s.job
        row = [job.label, *(_fmt(s.median(kind.key), job.metric) for kind in servers)]
        if with_ratio:
            target = "-" if job.target is None else f"≥ {job.target:.1f}"
            row += [_fmt_ratio(s.nojournal_ratio), target, s.ratio_verdict]
        if with_journal_ratio:
            target = "-" if job.journal_target is None else f"≥ {job.journal_target:.1f}"
            row += [_fmt_ratio(s.journal_ratio), target, s.journal_verdict]
        if with_cost:
            max_cost = "-" if job.max_cost is None else f"≤ {job.max_cost * 100:.0f}%"
            row += [_fmt_pct(s.journal_cost), max_cost, s.cost_verdict]
        rows.append(row)
    return rows


def baseline_pairs(servers: Sequence[ServerKind]) -> list[tuple[ServerKind, ServerKind]]:
    """(current tree's unit, the same unit from the baseline tree), for those that ran."""
    by_key = {kind.key: kind for kind in servers}
    return [
        (kind, by_key[f"{kind.key}-base"])
        for kind in servers
        if not kind.baseline and f"{kind.key}-base" in by_key
    ]


def round_ratios(results: Sequence[RunResult], job: str, new: str, old: str) -> list[float]:
    """new / old within each round (the two ran minutes apart at most, in the same rotation)."""
    values: dict[tuple[str, int], float] = {
        (r.server, r.repeat): r.value for r in results if r.job == job and r.value is not None
    }
    return [
        values[(new, n)] / values[(old, n)]
        for n in sorted({r.repeat for r in results})
        if (new, n) in values and (old, n) in values and values[(old, n)] > 0
    ]


def baseline_ratio_rows(
    summaries: Sequence[JobSummary], results: Sequence[RunResult], servers: Sequence[ServerKind]
) -> list[list[str]]:
    """Per job and unit: the medians of both trees, new / old and its verdict against 0.95,
    and the spread of the per-round ratios (how far noise moves one round's ratio)."""
    rows = [["job", "unit", "current", "baseline", "new / old", "minimum", "result", "per round"]]
    for s in summaries:
        for new, old in baseline_pairs(servers):
            ratio = s.ratio(new.key, old.key)
            rounds = round_ratios(results, s.job.key, new.key, old.key)
            rows.append(
                [
                    s.job.label,
                    new.title,
                    _fmt(s.median(new.key), s.job.metric),
                    _fmt(s.median(old.key), s.job.metric),
                    _fmt_ratio(ratio),
                    f"≥ {MIN_RATIO:.2f}",
                    ratio_mark(ratio) if ratio is not None or not s.errors else "error",
                    ", ".join(f"{r:.2f}" for r in rounds) or "-",
                ]
            )
    return rows


def baseline_ratio_report(
    summaries: Sequence[JobSummary], results: Sequence[RunResult], servers: Sequence[ServerKind]
) -> list[dict[str, Any]]:
    return [
        {
            "job": s.job.key,
            "current": new.key,
            "baseline": old.key,
            "ratio": s.ratio(new.key, old.key),
            "per_round": round_ratios(results, s.job.key, new.key, old.key),
            "below_minimum": (r := s.ratio(new.key, old.key)) is not None and r < MIN_RATIO,
        }
        for s in summaries
        for new, old in baseline_pairs(servers)
    ]


def detail_rows(summaries: Sequence[JobSummary], servers: Sequence[ServerKind]) -> list[list[str]]:
    """Every run in the order it ran, and the medians of server CPU and fio's latencies."""
    rows = [["job", "server", "runs", "server CPU", "CPU / request", "mean latency", "p99 latency"]]
    for s in summaries:
        for kind in servers:
            runs = s.runs.get(kind.key, [])
            unit = s.job.metric if s.job.metric == "MiB/s" else "k"
            digits = 0 if s.job.metric == "MiB/s" else 1
            cpu = s.median(kind.key, s.cpu)
            rows.append(
                [
                    s.job.label,
                    kind.title,
                    ", ".join(f"{v:.{digits}f}" for v in runs) + f" {unit}" if runs else "-",
                    "-" if cpu is None else f"{cpu:.2f}",
                    _fmt_us(s.median(kind.key, s.cpu_per_request)),
                    _fmt_us(s.median(kind.key, s.latency)),
                    _fmt_us(s.median(kind.key, s.p99)),
                ]
            )
    return rows


def cost_rows(summaries: Sequence[JobSummary]) -> list[list[str]]:
    """The journal's cost two ways: in throughput, and in server CPU per request.

    On a small machine the scheduler decides how much of a CPU the server gets, and that moves
    the throughput of one run by tens of percent; the CPU each request costs moves much less.
    """
    rows = [["job", "journal cost (throughput)", "journal cost (server CPU per request)"]]
    for s in summaries:
        rows.append([s.job.label, _fmt_pct(s.journal_cost), _fmt_pct(s.journal_cpu_cost)])
    return rows


def format_text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |"]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------


def _choose(
    text: str, known: dict[str, Any], what: str, parser: argparse.ArgumentParser
) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in known]
    if unknown or not keys:
        parser.error(f"unknown {what} {unknown}; choose from {', '.join(known)}")
    return keys


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="fio over NBD: blockmirror's export, with and without its journal, against"
        " nbdkit's file plugin on the same file.",
    )
    parser.add_argument("--size", default="1GiB", help="backing file size (default 1GiB)")
    parser.add_argument(
        "--dir", type=Path, help="where to create the temporary directory (a real disk, not tmpfs)"
    )
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio run (default 5)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per job and server; the median counts"
    )
    parser.add_argument(
        "--jobs",
        help=f"comma-separated subset of: {', '.join(JOBS_BY_KEY)} (default: all)",
    )
    parser.add_argument(
        "--servers",
        help=f"comma-separated subset of: {', '.join(SERVERS_BY_KEY)} (default: all)",
    )
    parser.add_argument(
        "--journal-size",
        default=format_size(DEFAULT_JOURNAL_SIZE),
        help="journal_size of the journaled unit (default 1GiB, the configuration's default)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: --runtime 2 --repeat 1")
    parser.add_argument("--json", type=Path, metavar="OUT", help="save every result here")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument(
        "--details",
        action="store_true",
        help="also print every run, the server's CPU and fio's latencies per job and server",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs, fio output)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="profile the server during every run, into DIR"
        " (perturbs the figures: profile in a separate run)",
    )
    parser.add_argument(
        "--profilers",
        default="py-spy",
        help="with --profile: py-spy (blockmirror units), perf (every server), or both,"
        " comma-separated (default py-spy); two at once perturb each other",
    )
    parser.add_argument(
        "--py-spy",
        metavar="PATH",
        help="the py-spy to use (default: py-spy on PATH)",
    )
    parser.add_argument(
        "--baseline-rev",
        metavar="REV",
        help="also run each blockmirror unit from REV's tree (git archive into the temporary"
        " directory), rotated with the others, and print new/old ratios (minimum"
        f" {MIN_RATIO:.2f})",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.runtime, args.repeat = 2, 1
    try:
        args.size_bytes = parse_size(args.size, key="--size")
        args.journal_size_bytes = parse_size(args.journal_size, key="--journal-size")
    except SizeError as exc:
        parser.error(str(exc))
    if args.size_bytes < MiB or args.size_bytes % MiB:
        parser.error("--size must be a whole number of MiB, at least 1 MiB")
    if args.journal_size_bytes < MiB or args.journal_size_bytes % MiB:
        parser.error("--journal-size must be a whole number of MiB, at least 1 MiB")
    if args.runtime < 1 or args.repeat < 1:
        parser.error("--runtime and --repeat must be at least 1")
    jobs = _choose(args.jobs, JOBS_BY_KEY, "job(s)", parser) if args.jobs else list(JOBS_BY_KEY)
    args.selected = [JOBS_BY_KEY[k] for k in jobs]
    servers = (
        _choose(args.servers, SERVERS_BY_KEY, "server(s)", parser)
        if args.servers
        else list(SERVERS_BY_KEY)
    )
    # Always in the canonical order, whatever order they were listed in.
    chosen = [kind for kind in SERVER_KINDS if kind.key in servers]
    args.baseline_commit = None
    if args.baseline_rev is not None:
        if chosen == [NBDKIT]:
            parser.error("--baseline-rev needs a blockmirror server (nojournal, journal)")
        try:
            args.baseline_commit = resolve_revision(args.baseline_rev)
        except ValueError as exc:
            parser.error(str(exc))
    args.server_kinds = with_baselines(chosen, args.baseline_rev)
    args.profiler = None
    if args.profile is not None:
        tools = _choose(args.profilers, {"py-spy": None, "perf": None}, "profiler(s)", parser)
        py_spy = perf = None
        if "py-spy" in tools:
            py_spy = args.py_spy or shutil.which("py-spy")
            if py_spy is None or not os.access(py_spy, os.X_OK):
                parser.error("py-spy not found: put it on PATH or pass --py-spy PATH")
        if "perf" in tools:
            perf = shutil.which("perf")
            if perf is None:
                parser.error("perf is not installed")
        args.profile.mkdir(parents=True, exist_ok=True)
        args.profiler = Profiler(args.profile, py_spy, perf)
    return args


def check_tools(servers: Sequence[ServerKind]) -> None:
    tools = ["fio"] + (["nbdkit"] if NBDKIT in servers else [])
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run `make bench` (it installs them)")


@contextlib.contextmanager
def work_directory(parent: Path | None, keep: bool) -> Iterator[Path]:
    if parent is None:
        parent = default_parent_dir()
    elif not parent.is_dir():
        raise SystemExit(f"--dir {parent} is not a directory")
    fs_type = filesystem_type(parent)
    if fs_type in MEMORY_FS_TYPES:
        raise SystemExit(f"--dir {parent} is on {fs_type}; the backing file must be on a disk")
    workdir = Path(tempfile.mkdtemp(prefix="blockmirror-bench-", dir=parent))
    try:
        yield workdir
    finally:
        if keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def rotation(servers: Sequence[Server], repeat: int) -> list[Server]:
    """Round ``repeat``'s order: rotated by one each round, so each server goes first in turn."""
    shift = repeat % len(servers)
    return [*servers[shift:], *servers[:shift]]


def start_servers(
    stack: contextlib.ExitStack,
    args: argparse.Namespace,
    workdir: Path,
    backing: Path,
    baseline: SourceTree | None,
) -> list[Server]:
    """Every selected server, canonical order, each stopped (by PID) when ``stack`` closes."""
    servers: list[Server] = []
    current = current_tree()
    for kind in args.server_kinds:
        if kind is NBDKIT:
            server = start_nbdkit(workdir, backing)
        else:
            tree = baseline if kind.baseline else current
            assert tree is not None, "baseline servers come with --baseline-rev"
            server = start_blockmirror(
                kind, workdir, backing, args.size_bytes, args.journal_size_bytes, tree
            )
        stack.callback(server.stop)
        servers.append(server)
        extra = f", journal {server.journal_path}" if server.journal_path else ""
        log(f"{server.title}: pid {server.pid}, {server.uri}{extra}")
        if server.tree is not None:
            log(f"  runs the {server.tree.label} tree: {server.package}")
    return servers


def run_benchmark(
    args: argparse.Namespace, workdir: Path
) -> tuple[list[JobSummary], list[RunResult]]:
    size: int = args.size_bytes
    journal_size: int = args.journal_size_bytes
    backing = workdir / "backing.img"
    needed = size + journal_size * sum(kind.journaled for kind in args.server_kinds)
    available = mem_available()
    if available is not None and available < 2 * needed:
        log(f"warning: only {format_size(available)} of memory available; the files may not stay")
        log("         in the page cache and the runs would measure the disk")
    log(f"backing file {backing}: {format_size(size)} on {filesystem_type(workdir)}")
    seconds = create_backing_file(backing, size)
    log(f"  allocated, written and read back in {seconds:.1f}s")
    baseline = None
    if args.baseline_rev is not None:
        baseline = extract_tree(args.baseline_rev, workdir)
        log(f"baseline tree {baseline.describe()}")

    summaries = [JobSummary(job) for job in args.selected]
    results: list[RunResult] = []
    with contextlib.ExitStack() as stack:
        servers = start_servers(stack, args, workdir, backing, baseline)
        synced = [backing, *(s.journal_path for s in servers if s.journal_path is not None)]
        for server in servers:
            if server.journal_path is not None:
                settle(synced)
                took = warm_journal(server, size=size, journal_size=journal_size, workdir=workdir)
                log(f"  journal written over once ({format_size(journal_size)}) in {took:.1f}s")

        total = len(summaries) * args.repeat * len(servers)
        reported_dead: set[str] = set()
        done = 0
        for summary in summaries:
            job = summary.job
            for repeat in range(args.repeat):
                # Rotate who goes first, so drift (thermal, cache, writeback) hits all alike.
                for order, server in enumerate(rotation(servers, repeat)):
                    done += 1
                    if not server.alive():
                        result = RunResult(
                            server.key, job.key, repeat, None, None, "server is not running"
                        )
                    else:
                        settle(synced)
                        result = run_fio(
                            job,
                            server,
                            size=size,
                            runtime=args.runtime,
                            workdir=workdir,
                            repeat=repeat,
                            profiler=args.profiler,
                        )
                    result.order = order
                    results.append(result)
                    summary.add(result)
                    if result.value is None:
                        log(f"[{done}/{total}] {job.label} {server.title}: FAILED {result.error}")
                        if not server.alive() and server.key not in reported_dead:
                            reported_dead.add(server.key)
                            log(f"{server.title} died:\n{server.log_tail()}")
                        continue
                    cpu = (
                        "" if result.server_cpu is None else f", server CPU {result.server_cpu:.2f}"
                    )
                    log(
                        f"[{done}/{total}] {job.label:<18} {server.title:<20}"
                        f" {_fmt(result.value, job.metric):>12}{cpu}"
                    )
    return summaries, results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_signal)
    check_tools(args.server_kinds)
    info = machine_info()
    settings = {
        "size": args.size_bytes,
        "journal_size": args.journal_size_bytes,
        "runtime": args.runtime,
        "ramp_time": RAMP_SECONDS,
        "repeat": args.repeat,
        "jobs": [job.key for job in args.selected],
        "servers": [kind.key for kind in args.server_kinds],
        "profiled": args.profile is not None,
        "baseline": (
            None
            if args.baseline_rev is None
            else {"rev": args.baseline_rev, "commit": args.baseline_commit}
        ),
    }
    log(
        f"blockmirror {info['blockmirror']} ({info['git']}, sources {info['source_digest']});"
        f" {info['fio']}, {info['nbdkit']}; {info['cpus']} CPUs, kernel {info['kernel']}"
    )
    log(
        f"{format_size(args.size_bytes)} file, {args.runtime}s runs after {RAMP_SECONDS}s ramp,"
        f" {args.repeat} repeat(s), journal_size {format_size(args.journal_size_bytes)};"
        f" servers: {', '.join(settings['servers'])}; jobs: {', '.join(settings['jobs'])}"
    )
    if args.baseline_rev is not None:
        log(f"baseline {args.baseline_rev} = {args.baseline_commit}")
    if args.profile is not None:
        log(f"profiling into {args.profile}: these figures are perturbed by the profilers")
    started = time.monotonic()
    with work_directory(args.dir, args.keep) as workdir:
        summaries, results = run_benchmark(args, workdir)
    fmt = format_markdown_table if args.markdown else format_text_table
    print(fmt(table_rows(summaries, args.server_kinds)))
    if args.baseline_rev is not None:
        print()
        print(f"new / old: the current tree over {args.baseline_rev} ({args.baseline_commit[:12]})")
        if args.markdown:
            print()  # a Markdown table starts a block of its own
        print(fmt(baseline_ratio_rows(summaries, results, args.server_kinds)))
    if args.details:
        print()
        print(fmt(detail_rows(summaries, args.server_kinds)))
        if NOJOURNAL in args.server_kinds and JOURNAL in args.server_kinds:
            print()
            print(fmt(cost_rows(summaries)))
    log(f"finished in {time.monotonic() - started:.0f}s")

    if args.json is not None:
        report = {
            "machine": info,
            "settings": settings,
            "summary": [s.as_dict() for s in summaries],
            "baseline_ratios": baseline_ratio_report(summaries, results, args.server_kinds),
            "runs": [r.summary() | {"fio": r.fio} for r in results],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"results saved to {args.json}")
    failed = sum(s.errors for s in summaries)
    if failed:
        log(f"{failed} run(s) failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
