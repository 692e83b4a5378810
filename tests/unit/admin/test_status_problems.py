"""``blockmirror status -x``: problems only, and none for a healthy unit."""

from __future__ import annotations

import subprocess
import sys

from blockmirror import __version__
from blockmirror.admin.table import status_problems


def test_a_healthy_unit_has_no_problem_and_each_kind_is_named() -> None:
    healthy = {
        "volumes": [
            {
                "name": "db",
                "state": "serving",
                "peers": [{"address": "b:7800", "state": "replicating", "consistent": True}],
                "history": {"enabled": True, "failed": None},
            },
            {"name": "rep", "state": "replica", "replica": {"consistent": True}, "peers": []},
        ]
    }
    assert status_problems(healthy) == []
    sick = {
        "volumes": [
            {"name": "a", "state": "failed", "problem": "journal corrupt"},
            {"name": "b", "state": "stalled"},
            {
                "name": "c",
                "state": "serving",
                "peers": [{"address": "x:1", "state": "connecting", "consistent": False,
                           "last_error": "refused"}],
                "split_brain": [{"peer": "y", "common_seq": 9}],
                "history": {"enabled": True, "failed": "No space left on device"},
            },
            {"name": "d", "state": "replica", "replica": {"consistent": False}},
        ]
    }  # fmt: skip
    problems = status_problems(sick)
    assert problems[0] == "a: journal corrupt"
    assert "b: stalled" in problems
    assert any(
        p.startswith("c -> x:1: connecting, replica not consistent (refused)") for p in problems
    )
    assert any("split brain with y since seq 9" in p for p in problems)
    assert any("history given up" in p for p in problems)
    assert any(p.startswith("d: replica not consistent") for p in problems)
    # The table keeps listing only what is not served and split brains.
    assert (
        status_problems(sick, degraded=False) == [problems[0], problems[2]]
        or len(status_problems(sick, degraded=False)) == 2
    )


def test_version_option() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "blockmirror.cli", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"blockmirror {__version__}"


def test_an_archive_not_archiving_or_with_gaps_is_a_problem_and_has_its_table() -> None:
    from blockmirror.admin.table import format_status_table

    def vol(**archive: object) -> dict[str, object]:
        entry = {"archive": "s3", "state": "archiving", "reason": "", "gaps": [], **archive}
        return {"name": "db", "state": "serving", "peers": [], "archives": [entry]}

    assert status_problems({"volumes": [vol(last_seq=7, lag_seconds=0.4)]}) == []
    stalled = vol(state="stalled", reason="the store cannot be reached: timeout")
    assert status_problems({"volumes": [stalled]}) == [
        "db -> archive s3: stalled (the store cannot be reached: timeout)"
    ]
    gapped = vol(gaps=[[10, 20]])
    assert status_problems({"volumes": [gapped]}) == ["db -> archive s3: archiving, 1 gaps"]
    table = format_status_table({"unit": "u", "volumes": [vol(last_seq=7, bytes_uploaded=2048)]})
    row = next(line for line in table.splitlines() if line.startswith("s3 "))
    assert row.split()[:5] == ["s3", "db", "archiving", "7", "0.0"], row
