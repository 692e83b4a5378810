"""Shared helpers and fixtures for the end-to-end tests: real clients against a real unit.

Every external program is run with a timeout, so a hung client fails one test instead of the run;
every resource a test creates (processes, FUSE mounts, loop devices, filesystems) is released by a
fixture finalizer, in reverse order of creation, whether the test passed or not.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.unit_process import UnitProcess, fetch_status, require_commands

KiB = 1024
MiB = 1024 * KiB

# Generous: these clients finish in well under a second here, but a loaded CI box is slower.
CLIENT_TIMEOUT = 60.0


def run(
    args: Sequence[str],
    *,
    timeout: float = CLIENT_TIMEOUT,
    check: bool = False,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client, capturing text output; on ``check`` failure the output is in the message.

    Pass ``cwd`` (a tmp_path) for clients that drop files in their working directory.
    """
    proc = subprocess.run(
        list(args),
        check=False,  # checked below, with the output in the message
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def api_status(unit: UnitProcess) -> dict[str, Any]:
    return fetch_status(unit)


def volume_counters(unit: UnitProcess, name: str = "vol") -> dict[str, int]:
    for vol in api_status(unit)["volumes"]:
        if vol["name"] == name:
            counters: dict[str, int] = vol["counters"]
            return counters
    raise AssertionError(f"volume {name!r} missing from /api/status")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


# --- a block device on the export, without the kernel NBD module ---------------------------------


def _unescape_mount_path(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as octal.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def is_mounted(path: Path) -> bool:
    """Read the mount table rather than stat(): a dead FUSE mount makes stat fail."""
    target = str(path)
    with open("/proc/self/mounts") as mounts:
        return any(
            _unescape_mount_path(line.split()[1]) == target for line in mounts if line.strip()
        )


def _umount(path: Path) -> None:
    """Unmount if mounted; fall back to a lazy unmount so one busy mount cannot leak."""
    if not is_mounted(path):
        return
    proc = run(["umount", str(path)])
    if proc.returncode != 0 and is_mounted(path):
        run(["umount", "-l", str(path)], check=True)
        raise AssertionError(f"umount {path} failed (lazily unmounted instead): {proc.stderr}")


def _stop_pid(proc: subprocess.Popen[bytes], pid_file: Path) -> None:
    """Stop nbdfuse by its own PID. Once its mount is gone it exits by itself; wait for that."""
    pid = proc.pid
    with contextlib.suppress(FileNotFoundError, ValueError):
        pid = int(pid_file.read_text().strip())
    # -P writes nbdfuse's own PID, which is our child; anything else would be a bug in this file.
    assert pid == proc.pid, f"nbdfuse pid file says {pid}, we started {proc.pid}"
    try:
        proc.wait(timeout=5)
        return
    except subprocess.TimeoutExpired:
        pass
    os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.kill(pid, signal.SIGKILL)
        proc.wait()


class BlockStack:
    """nbdfuse → loop device → filesystem mounts, each undone by :meth:`close` in reverse order.

    Teardown steps are registered the moment the resource exists, so a failure half-way through
    set-up still releases what was created. ``close`` may be called by a test (to start over on
    fresh caches) and is always called again by the fixture; it is idempotent.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._stack = contextlib.ExitStack()
        self._serial = 0

    def attach(self, url: str) -> str:
        """Present the export as a file through nbdfuse and as a loop device; returns its path."""
        self._serial += 1
        mnt = self.workdir / f"nbdfuse{self._serial}"
        mnt.mkdir()
        pid_file = self.workdir / f"nbdfuse{self._serial}.pid"
        log = open(self.workdir / f"nbdfuse{self._serial}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            ["nbdfuse", "-P", str(pid_file), str(mnt / "disk"), url],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        # Registered first so it runs last: nbdfuse must outlive its mount and the loop device.
        self._stack.callback(_stop_pid, proc, pid_file)
        self._stack.callback(_umount, mnt)

        def disk_ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"nbdfuse exited {proc.returncode}")
            return pid_file.exists() and (mnt / "disk").exists()

        wait_for(disk_ready, 10, "nbdfuse to present the disk")
        loop = run(["losetup", "-f", "--show", str(mnt / "disk")], check=True).stdout.strip()
        assert loop.startswith("/dev/loop"), loop
        self._stack.callback(self._detach, loop)
        return loop

    @staticmethod
    def _detach(loop: str) -> None:
        # The kernel may hold the device for a moment after an unmount; retry briefly.
        for _ in range(50):
            if run(["losetup", "-d", loop]).returncode == 0:
                return
            time.sleep(0.1)
        run(["losetup", "-d", loop], check=True)

    def mount(self, device: str, target: Path) -> None:
        target.mkdir(exist_ok=True)
        run(["mount", device, str(target)], check=True)
        self._stack.callback(_umount, target)

    def umount(self, target: Path) -> None:
        """Unmount now (the finalizer registered by :meth:`mount` then finds nothing to do)."""
        run(["umount", str(target)], check=True)

    def close(self) -> None:
        self._stack.close()


@pytest.fixture
def block_stack(tmp_path: Path) -> Iterator[BlockStack]:
    if os.geteuid() != 0:
        pytest.skip("loop devices and mounting need root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: nbdfuse cannot present the export as a file")
    require_commands("nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount")
    workdir = tmp_path / "block"
    workdir.mkdir()
    stack = BlockStack(workdir)
    try:
        yield stack
    finally:
        stack.close()
