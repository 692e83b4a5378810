"""Issue 7 point 18: a full filesystem at start is named, and check-config sees it coming.

Small tmpfs mounts, made and removed by each test, stand in for full disks: one too small for the
journal the configuration asks for, one without a free inode for the volume file. The error names
the file it failed on (today's "[Errno 28] No space left on device" said nothing of where), and
check-config warns about a journal or a sparse volume that will not fit the free space.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault.rawnbd import CMD_FLUSH, CMD_WRITE, RawNbd
from tests.support.unit_process import (
    BLOCKMIRROR,
    fetch_status,
    require_commands,
    start_unit,
    write_config,
)

TIMEOUT = 60


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, check=False)


@contextlib.contextmanager
def small_tmpfs(where: Path, options: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    where.mkdir()
    mounted = run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)])
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        run(["umount", "-l", str(where)])


def config(
    directory: Path, *, state: Path, image: Path, journal_size: str = "16MiB", size: str = "4MiB"
) -> Path:
    vol = {
        "name": "vol",
        "role": "primary",
        "path": str(image),
        "size": size,
        "export": "127.0.0.1:0",
        "journal_size": journal_size,
    }
    return write_config(directory, volumes=[vol], state_dir=state)


def test_journal_that_does_not_fit_is_named_and_foreseen(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "size=8m") as small:
        state = small / "state"
        path = config(tmp_path, state=state, image=tmp_path / "vol.img")
        journal = state / "vol.journal"

        check = run([*BLOCKMIRROR, "check-config", str(path)])
        assert check.returncode == 0, check.stderr  # a warning, not an error
        assert f"warning: volume[vol].journal_size: the journal {journal} needs 16 MiB" in (
            check.stderr
        ), check.stderr
        assert "free" in check.stderr

        unit = start_unit(path, state)
        try:
            vol = fetch_status(unit)["volumes"][0]
            assert vol["state"] == "failed"
            problem = str(vol["problem"])
            assert str(journal) in problem and "No space left on device" in problem, problem
            assert str(journal) in unit.log() and "No space left on device" in unit.log()
            assert unit.terminate() == 0, unit.log()
        finally:
            unit.kill()

        # With a journal that fits, the same state directory serves again: nothing was left
        # behind that blocks the next start.
        path = config(tmp_path, state=state, image=tmp_path / "vol.img", journal_size="2MiB")
        check = run([*BLOCKMIRROR, "check-config", str(path)])
        assert check.returncode == 0 and "warning" not in check.stderr, check.stderr
        unit = start_unit(path, state)
        try:
            assert fetch_status(unit)["volumes"][0]["state"] == "serving"
            with RawNbd(unit.export_address("vol")) as client:
                client.session()
                assert client.call(CMD_WRITE, 0, 4096, data=b"\x01" * 4096) == 0
                assert client.call(CMD_FLUSH) == 0
            assert unit.terminate() == 0, unit.log()
        finally:
            unit.kill()


def test_volume_that_cannot_be_created_is_named(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "noinodes", "size=8m,nr_inodes=1") as full:
        image = full / "vol.img"
        path = config(tmp_path, state=tmp_path / "state", image=image, journal_size="1MiB")
        started = run([*BLOCKMIRROR, "run", str(path)])
        assert started.returncode != 0
        assert f"{image}: cannot create: No space left on device" in started.stderr, started


def test_check_config_warns_about_a_sparse_volume_larger_than_the_free_space(
    tmp_path: Path,
) -> None:
    with small_tmpfs(tmp_path / "small", "size=8m") as small:
        image = small / "vol.img"
        path = config(tmp_path, state=tmp_path / "state", image=image, size="64MiB")
        check = run([*BLOCKMIRROR, "check-config", str(path)])
        assert check.returncode == 0, check.stderr
        assert f"warning: volume[vol].path: {image} is sparse: 64 MiB of it" in check.stderr
        # An allocated file of the same size fits, whatever the free space: no warning.
        with image.open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, 4 * 1024 * 1024)
        path = config(tmp_path, state=tmp_path / "state", image=image, size="4MiB")
        check = run([*BLOCKMIRROR, "check-config", str(path)])
        assert check.returncode == 0 and "warning" not in check.stderr, check.stderr


def test_history_that_fills_its_state_dir_is_given_up_never_the_host(tmp_path: Path) -> None:
    """The state directory (a 10 MiB tmpfs) fills with before-images: the history is given up
    with an alert and ``history.failed`` in status, and every host write is still served,
    flushed and read back intact. check-config said it would not fit."""
    require_commands("qemu-io")
    with small_tmpfs(tmp_path / "small", "size=10m") as small:
        state = small / "state"
        image = tmp_path / "vol.img"
        vol = {
            "name": "vol",
            "role": "primary",
            "path": str(image),
            "size": "16MiB",
            "export": "127.0.0.1:0",
            "journal_size": "2MiB",
            "history": "1h",
            "history_size": "64MiB",
        }
        path = write_config(tmp_path, volumes=[vol], state_dir=state)
        check = run([*BLOCKMIRROR, "check-config", str(path)])
        assert check.returncode == 0, check.stderr
        assert "warning: volume[vol].history_size: history_size lets" in check.stderr, check.stderr

        unit = start_unit(path, state)
        try:
            url = unit.export_url("vol")
            for pattern in (0x11, 0x22, 0x33):  # 48 MiB of writes, 32 MiB of before-images
                proc = run(
                    ["qemu-io", "-f", "raw", url, "-c", f"write -P {pattern} 0 16M", "-c", "flush"]
                )
                assert proc.returncode == 0 and "failed" not in proc.stdout, (
                    proc.stdout + proc.stderr
                )
            vol_status = fetch_status(unit)["volumes"][0]
            history = vol_status["history"]
            assert history["failed"] and "No space left" in history["failed"], history
            assert vol_status["state"] == "serving", vol_status
            # (The alert itself may have scrolled out of status behind the small journal's
            # high-water alerts: the log keeps it.)
            assert "history given up" in unit.log(), unit.log()
            proc = run(["qemu-io", "-f", "raw", url, "-c", "read -P 0x33 0 16M"])
            assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout
            assert unit.terminate() == 0, unit.log()
        finally:
            unit.kill()
        assert image.read_bytes() == b"\x33" * (16 << 20)
