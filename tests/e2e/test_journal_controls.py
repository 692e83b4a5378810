"""Operator controls of a real unit: journal and consumer pause/resume and discard, by the admin
API and by the CLI, each checked in ``/api/status`` and, where data moved, in the volume file.

The volume lists one peer, ``127.0.0.1:1``: nothing listens there, so its consumer never
acknowledges anything. A consumer new to a journal starts in tracking mode with every region
dirty; for the tests that need to see dirty bits appear (and records to discard), the fixture
turns it into a caught-up journal-mode consumer with a clean dirty map between two runs of the
unit, which is what a finished resync will leave behind.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockmirror.journal.checkpoint import ConsumerState, read_checkpoint, write_checkpoint
from blockmirror.journal.dirtymap import DirtyMap
from blockmirror.journal.journal import DIRTY_REGION
from blockmirror.state import ConsumerMode
from blockmirror.statedir import dirty_map_path
from tests.e2e.conftest import KiB, MiB, api_status, run
from tests.support.unit_process import (
    BLOCKMIRROR,
    UnitProcess,
    admin_request,
    require_commands,
    start_unit,
    write_config,
)

pytestmark = pytest.mark.e2e

PEER = "127.0.0.1:1"
PEER_URL = "127.0.0.1%3A1"
SIZE = 16 * MiB


@pytest.fixture(autouse=True)
def _clients() -> None:
    require_commands("qemu-io")


# --- helpers shared with test_journal_recover.py --------------------------------------------------


def volume_table(directory: Path, **extra: Any) -> dict[str, Any]:
    vol: dict[str, Any] = {
        "name": "vol",
        "role": "primary",
        "path": str(directory / "vol.img"),
        "size": SIZE,
        "export": "127.0.0.1:0",
        "journal_size": "1MiB",
        "peers": [PEER],
    }
    vol.update(extra)
    return vol


def make_consumer_caught_up(state_dir: Path, volume: str = "vol", consumer: str = PEER) -> None:
    """With the unit stopped: the consumer in journal mode, acknowledged to the end, map clean."""
    fd = os.open(state_dir / f"{volume}.journal", os.O_RDWR)
    try:
        found = read_checkpoint(fd)
        assert found is not None
        _, generation, cp = found
        consumers = dict(cp.consumers)
        consumers[consumer] = ConsumerState(cp.next_seq - 1, ConsumerMode.JOURNAL, False)
        write_checkpoint(fd, dataclasses.replace(cp, consumers=consumers), generation + 1)
    finally:
        os.close(fd)
    path = dirty_map_path(state_dir, volume, consumer)
    DirtyMap.create(path, volume_size=SIZE, region_size=DIRTY_REGION).close()


def start_caught_up_unit(directory: Path, **extra: Any) -> UnitProcess:
    """Start a unit, stop it, make its consumer caught up, start it again."""
    config = write_config(directory, volumes=[volume_table(directory, **extra)])
    state = directory / "state"
    first = start_unit(config, state)
    assert first.terminate() == 0
    make_consumer_caught_up(state)
    return start_unit(config, state)


def post(unit: UnitProcess, path: str) -> tuple[int, dict[str, Any]]:
    return admin_request(unit, "POST", path)


def journal_status(unit: UnitProcess, volume: str = "vol") -> dict[str, Any]:
    for vol in api_status(unit)["volumes"]:
        if vol["name"] == volume:
            journal = vol["journal"]
            assert isinstance(journal, dict), vol
            return journal
    raise AssertionError(f"no volume {volume}")


def consumer_status(unit: UnitProcess, consumer: str = PEER) -> dict[str, Any]:
    entry = journal_status(unit)["consumers"][consumer]
    assert isinstance(entry, dict)
    return entry


def qemu_io(unit: UnitProcess, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw", unit.export_url("vol")]
    for command in commands:
        args += ["-c", command]
    proc = run(args, check=True)
    assert "failed" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc.stdout


def volume_bytes(directory: Path, offset: int, length: int) -> bytes:
    with open(directory / "vol.img", "rb") as f:
        f.seek(offset)
        return f.read(length)


def cli(*args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BLOCKMIRROR, *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=stdin,
        check=False,
    )


@pytest.fixture
def caught_up(tmp_path: Path) -> Iterator[UnitProcess]:
    unit = start_caught_up_unit(tmp_path)
    try:
        yield unit
    finally:
        unit.kill()


# --- journal pause / resume -----------------------------------------------------------------------


def test_journal_pause_tracks_writes_in_dirty_maps_and_resume_journals_again(
    tmp_path: Path, caught_up: UnitProcess
) -> None:
    unit = caught_up
    c = consumer_status(unit)
    assert (c["mode"], c["dirty_bytes"], c["paused"]) == ("journal", 0, False)
    start_seq = journal_status(unit)["newest_seq"]

    qemu_io(unit, "write -P 0x11 0 64k")
    j = journal_status(unit)
    assert j["newest_seq"] == start_seq + 1 and not j["enqueue_paused"]
    assert consumer_status(unit)["backlog_records"] == 1

    code, body = post(unit, "/api/volumes/vol/journal/pause")
    assert code == 200, body
    assert body["enqueue_paused"] is True and body["changed"] is True
    assert journal_status(unit)["enqueue_paused"] is True

    # Paused: served and applied, not journaled; the consumer learns of it by its dirty map.
    qemu_io(unit, "write -P 0x22 1M 64k", "write -f -P 0x23 3M 4k")
    j = journal_status(unit)
    assert j["newest_seq"] == start_seq + 1
    assert volume_bytes(tmp_path, MiB, 64 * KiB) == b"\x22" * (64 * KiB)
    assert volume_bytes(tmp_path, 3 * MiB, 4 * KiB) == b"\x23" * (4 * KiB)
    c = consumer_status(unit)
    assert c["dirty_bytes"] == 2 * DIRTY_REGION  # the region at 1 MiB and the one at 3 MiB
    assert c["backlog_records"] == 1  # the record from before the pause is still held
    assert run(["qemu-io", "-f", "raw", unit.export_url("vol"), "-c", "read -P 0x22 1M 64k"])

    code, body = post(unit, "/api/volumes/vol/journal/resume")
    assert code == 200 and body["enqueue_paused"] is False and body["changed"] is True
    qemu_io(unit, "write -P 0x33 2M 4k")
    j = journal_status(unit)
    assert j["newest_seq"] == start_seq + 2 and not j["enqueue_paused"]
    assert consumer_status(unit)["backlog_records"] == 2
    assert consumer_status(unit)["dirty_bytes"] == 2 * DIRTY_REGION  # journaled, not tracked

    # The setting is in the checkpoint: a restart keeps it.
    post(unit, "/api/volumes/vol/journal/pause")
    assert unit.terminate() == 0
    again = start_unit(unit.config_path, unit.state_dir)
    try:
        assert journal_status(again)["enqueue_paused"] is True
        assert consumer_status(again)["dirty_bytes"] == 2 * DIRTY_REGION
    finally:
        again.kill()


def test_journal_pause_with_a_tracking_consumer(tmp_path: Path) -> None:
    """The default: a new consumer is fully dirty, in tracking mode."""
    config = write_config(tmp_path, volumes=[volume_table(tmp_path)])
    unit = start_unit(config, tmp_path / "state")
    try:
        c = consumer_status(unit)
        assert c["mode"] == "tracking" and c["dirty_bytes"] == SIZE
        before = journal_status(unit)["newest_seq"]
        assert post(unit, "/api/volumes/vol/journal/pause")[0] == 200
        qemu_io(unit, "write -P 0x44 4M 128k")
        assert journal_status(unit)["newest_seq"] == before
        assert volume_bytes(tmp_path, 4 * MiB, 128 * KiB) == b"\x44" * (128 * KiB)
        assert consumer_status(unit)["dirty_bytes"] == SIZE
        assert post(unit, "/api/volumes/vol/journal/resume")[0] == 200
        qemu_io(unit, "write -P 0x45 5M 4k")
        assert journal_status(unit)["newest_seq"] == before + 1
        assert volume_bytes(tmp_path, 5 * MiB, 4 * KiB) == b"\x45" * (4 * KiB)
    finally:
        unit.kill()


# --- consumers: pause / resume, discard -----------------------------------------------------------


def test_consumer_pause_resume_and_discard(caught_up: UnitProcess) -> None:
    unit = caught_up
    base = consumer_status(unit)["acked_seq"]
    assert base == journal_status(unit)["newest_seq"]
    # Five records, each in its own 64 KiB region.
    qemu_io(unit, *(f"write -P 0x{0x50 + i:x} {i * 64}k 4k" for i in range(5)))
    assert consumer_status(unit)["backlog_records"] == 5

    code, body = post(unit, f"/api/volumes/vol/consumers/{PEER_URL}/pause")
    assert code == 200 and body["paused"] is True and body["consumer"] == PEER
    assert consumer_status(unit)["paused"] is True
    code, body = post(unit, f"/api/volumes/vol/consumers/{PEER}/resume")  # the raw name works too
    assert code == 200 and body["paused"] is False
    assert consumer_status(unit)["paused"] is False

    code, body = post(
        unit, f"/api/volumes/vol/consumers/{PEER_URL}/discard?from={base + 1}&to={base + 3}"
    )
    assert code == 200, body
    assert body["discarded"] == 3
    c = consumer_status(unit)
    assert c["acked_seq"] == base + 3
    assert c["backlog_records"] == 2
    assert c["dirty_bytes"] == 3 * DIRTY_REGION
    assert body["dirty_bytes"] == c["dirty_bytes"] and body["acked_seq"] == base + 3

    # A range with nothing left in it discards nothing.
    code, body = post(unit, f"/api/volumes/vol/consumers/{PEER_URL}/discard?from=1&to={base + 3}")
    assert code == 200 and body["discarded"] == 0
    # The rest, with a range reaching past the newest record.
    code, body = post(
        unit, f"/api/volumes/vol/consumers/{PEER_URL}/discard?from={base + 4}&to={base + 1000}"
    )
    assert code == 200 and body["discarded"] == 2
    c = consumer_status(unit)
    assert c["backlog_records"] == 0 and c["dirty_bytes"] == 5 * DIRTY_REGION
    assert c["acked_seq"] == journal_status(unit)["newest_seq"]


def test_bad_requests_leave_the_unit_running(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        volumes=[
            volume_table(tmp_path),
            {
                "name": "ro",
                "role": "primary",
                "path": str(tmp_path / "ro.img"),
                "size": MiB,
                "export": "127.0.0.1:0",
                "journal": False,
            },
        ],
    )
    (tmp_path / "ro.img").write_bytes(bytes(MiB))
    unit = start_unit(config, tmp_path / "state")
    try:
        cases = [
            ("/api/volumes/nope/journal/pause", 404, "no volume named 'nope'"),
            ("/api/volumes/vol/consumers/10.9.9.9%3A7800/pause", 404, "no consumer"),
            (f"/api/volumes/vol/consumers/{PEER_URL}/discard?from=9&to=3", 400, "empty range"),
            (f"/api/volumes/vol/consumers/{PEER_URL}/discard?from=x&to=3", 400, "sequence"),
            (f"/api/volumes/vol/consumers/{PEER_URL}/discard?from=1", 400, "'to' is required"),
            ("/api/volumes/vol/journal/pause?now=1", 400, "unknown parameter"),
            ("/api/volumes/vol/journal/halt", 404, "no such control"),
            ("/api/volumes/ro/journal/pause", 409, "has no journal"),
        ]
        for path, expected, needle in cases:
            code, body = post(unit, path)
            assert code == expected and needle in body["error"], (path, code, body)
        code, body = admin_request(unit, "GET", "/api/volumes/vol/journal/pause")
        assert code == 405, body
        assert unit.proc.poll() is None
        status = api_status(unit)
        assert status["pid"] == unit.pid
        j = journal_status(unit)
        assert not j["enqueue_paused"] and not j["consumers"][PEER]["paused"]
        qemu_io(unit, "write -P 0x66 0 4k")  # still serving
        assert volume_bytes(tmp_path, 0, 4 * KiB) == b"\x66" * (4 * KiB)
    finally:
        unit.kill()


# --- the same through the command line ------------------------------------------------------------


def test_cli_controls(caught_up: UnitProcess) -> None:
    unit = caught_up
    admin = ["--admin", unit.admin, "--token-file", str(unit.admin_token_file)]
    by_config = ["--config", str(unit.config_path)]

    out = cli("journal", "pause", "vol", *admin)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and "journal enqueueing paused" in out.stdout
    assert journal_status(unit)["enqueue_paused"] is True
    out = cli("journal", "resume", "vol", *by_config)
    assert out.returncode == 0, out.stderr
    assert "resumed" in out.stdout and journal_status(unit)["enqueue_paused"] is False

    out = cli("consumer", "pause", "vol", PEER, *by_config)
    assert out.returncode == 0, out.stderr
    assert f"consumer {PEER} paused" in out.stdout and "mode journal" in out.stdout
    assert consumer_status(unit)["paused"] is True
    out = cli("consumer", "resume", "vol", PEER, *admin)
    assert out.returncode == 0 and consumer_status(unit)["paused"] is False

    base = consumer_status(unit)["acked_seq"]
    qemu_io(unit, "write -P 0x71 0 4k", "write -P 0x72 64k 4k", "write -P 0x73 128k 4k")
    out = cli(
        "consumer", "discard", "vol", PEER, "--from", str(base + 1), "--to", str(base + 2), *admin
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and ": 2 records" in out.stdout
    c = consumer_status(unit)
    assert c["acked_seq"] == base + 2 and c["backlog_records"] == 1
    assert c["dirty_bytes"] == 2 * DIRTY_REGION

    # The status table: the volume, its journal and its consumer.
    out = cli("status", *by_config)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("journal") and "fill" in line for line in lines)
    row = next(line for line in lines if line.startswith(PEER))
    assert "journal" in row and "128.0 KiB" in row

    # Refusals: a message and exit 1; nothing changed, the unit still runs.
    for args, needle in [
        (("journal", "pause", "nope", *admin), "no volume named 'nope'"),
        (("consumer", "pause", "vol", "10.1.1.1:9", *admin), "no consumer"),
        (("consumer", "discard", "vol", PEER, "--from", "9", "--to", "2", *admin), "empty range"),
    ]:
        out = cli(*args)
        assert out.returncode == 1 and needle in out.stderr, (args, out)
        assert out.stdout == ""
    out = cli("consumer", "discard", "vol", PEER, "--from", "0", "--to", "2", *admin)
    assert out.returncode == 2 and "sequence number" in out.stderr  # argparse usage error
    out = cli("journal", "pause", "vol", "--admin", "127.0.0.1:1")
    assert out.returncode == 1 and "cannot reach" in out.stderr
    assert unit.proc.poll() is None
    assert consumer_status(unit)["backlog_records"] == 1
