"""`blockmirror demo` runs to completion and reports a verified replica."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_demo_reports_a_verified_replica(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockmirror.cli",
            "demo",
            "--dir",
            str(tmp_path / "demo"),
            "--duration",
            "2",
            "--size",
            "32MiB",
        ],
        check=False,  # the return code is asserted below, with the output
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    out = proc.stdout.replace("\r", "\n")
    assert proc.returncode == 0, out + proc.stderr
    assert "demo PASSED: the replica is identical to the volume" in out
    # The demo compared real files, and said which and where.
    assert (tmp_path / "demo" / "primary.img").exists()
    assert (tmp_path / "demo" / "secondary.img").exists()
    lines = [line for line in out.splitlines() if "sha256" in line]
    assert len(lines) == 3 and all(line.endswith("ok") for line in lines[1:]), lines
    assert "replicating" in out and "consistent" in out
