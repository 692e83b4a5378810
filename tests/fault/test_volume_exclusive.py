"""Issue 7 point 9: a block device a unit holds cannot be mounted behind its back, and back.

A loop device over a file stands in for a disk. While a unit holds it (as a primary's volume or a
secondary's replica), ``mount`` and a second unit are refused with EBUSY; a device that is mounted
already is refused by the unit, with an error that names it. Loop devices and mounts are undone
whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault.rawnbd import CMD_FLUSH, CMD_WRITE, MiB, RawNbd
from tests.support.unit_process import BLOCKMIRROR, UnitProcess, start_unit, write_config

DEVICE_SIZE = 64 * MiB
TIMEOUT = 60


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, check=False)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """A loop device over a file holding an ext4 filesystem; detached afterwards."""
    for tool in ("losetup", "mount", "umount", "mkfs.ext4"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    if os.geteuid() != 0:
        pytest.skip("needs root for loop devices and mount")
    backing = tmp_path / "disk.img"
    with backing.open("wb") as f:
        f.truncate(DEVICE_SIZE)
    made = run(["mkfs.ext4", "-q", "-F", str(backing)])
    assert made.returncode == 0, made.stderr
    attached = run(["losetup", "-f", "--show", str(backing)])
    if attached.returncode != 0:
        pytest.skip(f"no loop device: {attached.stderr.strip()}")
    device = Path(attached.stdout.strip())
    try:
        yield device
    finally:
        run(["umount", str(device)])  # in case a mount got through
        run(["losetup", "-d", str(device)])


@contextlib.contextmanager
def mounted(device: Path, where: Path) -> Iterator[subprocess.CompletedProcess[str]]:
    """Try to mount ``device``; yields the result and unmounts whatever happened."""
    where.mkdir(exist_ok=True)
    result = run(["mount", "-t", "ext4", str(device), str(where)])
    try:
        yield result
    finally:
        if result.returncode == 0:
            run(["umount", str(where)])


def unit_config(directory: Path, device: Path, role: str = "primary") -> Path:
    directory.mkdir(exist_ok=True)
    vol: dict[str, object] = {
        "name": "vol",
        "role": role,
        "path": str(device),
        "size": DEVICE_SIZE,
        "export": "127.0.0.1:0",
    }
    replication = {"listen": "127.0.0.1:0"} if role == "secondary" else None
    return write_config(directory, volumes=[vol], replication=replication)


def start(directory: Path, device: Path, role: str = "primary") -> UnitProcess:
    return start_unit(unit_config(directory, device, role), directory / "state")


def refused_start(directory: Path, device: Path) -> str:
    """Start a unit that must refuse to run; returns its log."""
    config = unit_config(directory, device)
    proc = run([*BLOCKMIRROR, "run", str(config)])
    assert proc.returncode != 0, f"unit ran on a device in use:\n{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_held_device_cannot_be_mounted_or_taken_by_a_second_unit(
    tmp_path: Path, loop_device: Path, role: str
) -> None:
    unit = start(tmp_path / "a", loop_device, role)
    try:
        with mounted(loop_device, tmp_path / "mnt") as mount:
            assert mount.returncode != 0, "the device was mounted while a unit held it"
            assert "busy" in mount.stderr or "in use" in mount.stderr, mount.stderr
        log = refused_start(tmp_path / "b", loop_device)
        assert f"{loop_device}: the block device is in use" in log, log
        if role == "primary":
            # Meanwhile the unit serves its volume as usual.
            with RawNbd(unit.export_address("vol")) as client:
                client.session()
                assert client.call(CMD_WRITE, 0, 4096, data=b"\xab" * 4096) == 0
                assert client.call(CMD_FLUSH) == 0
        assert unit.terminate() == 0, unit.log()
    finally:
        unit.kill()
    # Released with the unit: now it can be mounted (the filesystem was overwritten at 0 by
    # the primary, so only check that the claim is gone).
    claim = os.open(loop_device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    os.close(claim)


def test_mounted_device_is_refused_by_the_unit(tmp_path: Path, loop_device: Path) -> None:
    with mounted(loop_device, tmp_path / "mnt") as mount:
        assert mount.returncode == 0, mount.stderr
        log = refused_start(tmp_path / "a", loop_device)
        assert f"{loop_device}: the block device is in use (mounted" in log, log
        # Nothing was written: the filesystem still mounts and reads after the refusal.
        assert (tmp_path / "mnt" / "lost+found").is_dir()
