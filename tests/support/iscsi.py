"""iSCSI for tests: libiscsi's tools, Debian's tgtd as the baseline target, and iscsi-test-cu.

Every helper runs a real program with a timeout; tgtd is stopped by its own control commands
(targets first, then the system) and, if that fails, by its PID, and its control sockets are
removed, also on failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.unit_process import free_port, require_commands

TGT_RUN_DIR = Path("/run/tgtd")


def run(args: list[str], *, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )


@dataclass
class Baseline:
    """A tgtd target on a file: ``url`` is ``iscsi://127.0.0.1:PORT/IQN/1``."""

    port: int
    iqn: str
    control: int

    @property
    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{self.iqn}/1"


@contextlib.contextmanager
def tgtd_target(
    image: Path, *, iqn: str = "iqn.2026-12.test.blockmirror:baseline"
) -> Iterator[Baseline]:
    """tgtd serving ``image`` as LUN 1 of one target on 127.0.0.1 (any initiator)."""
    require_commands("tgtd", "tgtadm")
    port = free_port()
    # tgtd's control channel is a Unix socket numbered by -C: one of our own, not the default.
    control = 1000 + os.getpid() % 30000
    log = image.with_suffix(".tgtd.log").open("wb")
    proc = subprocess.Popen(
        ["tgtd", "-f", "-C", str(control), "--iscsi", f"portal=127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    adm = ["tgtadm", "-C", str(control), "--lld", "iscsi"]
    try:
        deadline = time.monotonic() + 10
        while run([*adm, "--op", "show", "--mode", "target"], timeout=5).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"tgtd did not start: {image.with_suffix('.tgtd.log').read_text()}"
                )
            time.sleep(0.05)
        for args in (
            ["--op", "new", "--mode", "target", "--tid", "1", "-T", iqn],
            ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", str(image)],
            ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"],
        ):
            done = run([*adm, *args], timeout=10)
            assert done.returncode == 0, done.stderr
        yield Baseline(port, iqn, control)
    finally:
        sys_adm = ["tgtadm", "-C", str(control)]
        run(
            [*sys_adm, "--op", "update", "--mode", "sys", "--name", "State", "-v", "offline"],
            timeout=10,
        )
        run([*adm, "--op", "delete", "--mode", "target", "--tid", "1", "--force"], timeout=10)
        run([*sys_adm, "--op", "delete", "--mode", "system"], timeout=10)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        for leftover in (f"socket.{control}", f"socket.{control}.lock"):
            with contextlib.suppress(FileNotFoundError):
                (TGT_RUN_DIR / leftover).unlink()


@dataclass
class Conformance:
    """One family's results from ``iscsi-test-cu -v``: each test's outcome by name."""

    outcomes: dict[str, str] = field(default_factory=dict)

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)

    @property
    def failed(self) -> list[str]:
        return sorted(t for t, o in self.outcomes.items() if o == "fail")

    def row(self) -> str:
        counts = ", ".join(f"{self.count(k)} {k}" for k in ("pass", "fail", "skip"))
        return f"{len(self.outcomes)} tests, {counts}"


def parse_conformance(text: str) -> Conformance:
    """CUnit's verbose output: a test's first status word decides (later ``[FAILED]`` text
    can belong to a message), and libiscsi's ``[SKIPPED]`` counts as a skip, not a pass. Tests
    are named ``Suite.Test`` (many suites have a test called ``Simple``)."""
    result = Conformance()
    suites = [(m.start(), m[1]) for m in re.finditer(r"Suite: (\S+)", text)]
    starts = [m.start() for m in re.finditer(r"\n\s+Test: ", text)]
    for n, start in enumerate(starts):
        chunk = text[start : starts[n + 1] if n + 1 < len(starts) else len(text)]
        name = chunk.split("Test: ", 1)[1].split(" ", 1)[0]
        suite = next((s for at, s in reversed(suites) if at < start), "")
        status = re.search(r"(?:\.\.\.|\n)\s*(passed|FAILED)", chunk)
        if status is None:
            continue
        key = f"{suite}.{name}"
        if status[1] == "FAILED":
            result.outcomes[key] = "fail"
        elif "[SKIPPED]" in chunk[: status.start()]:
            result.outcomes[key] = "skip"
        else:
            result.outcomes[key] = "pass"
    return result


def conformance(url: str, family: str, cwd: Path, *, timeout: float = 600) -> Conformance:
    """``iscsi-test-cu -d -v -t FAMILY URL`` (``-d``: destructive tests on a scratch LUN)."""
    require_commands("iscsi-test-cu")
    done = subprocess.run(
        ["iscsi-test-cu", "-d", "-v", "-t", family, url],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    return parse_conformance(done.stdout + done.stderr)
