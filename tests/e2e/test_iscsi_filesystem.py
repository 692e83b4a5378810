"""A real ext4 filesystem over iSCSI (issue 12): the target bridged to NBD by qemu-nbd's iSCSI
driver (libiscsi), then nbdfuse and a loop device, as a host without an iSCSI initiator module
would use it. mkfs, checksummed files, fsck clean, verified again from a fresh stack, and the
volume file itself is a clean filesystem."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.conftest import BlockStack, run, volume_counters
from tests.e2e.test_filesystem import verify_tree, write_tree
from tests.e2e.test_iscsi import TARGET, serve_iscsi
from tests.support.pair import MiB, topology
from tests.support.unit_process import free_port, require_commands

pytestmark = pytest.mark.e2e


@contextmanager
def qemu_nbd_bridge(iscsi_url: str, workdir: Path) -> Iterator[str]:
    """qemu-nbd serving the iSCSI LUN as an NBD export on 127.0.0.1; stopped by its PID."""
    require_commands("qemu-nbd")
    port = free_port()
    log = open(workdir / "qemu-nbd.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-t", "-x", "disk", "-b", "127.0.0.1", "-p", str(port),
         "--cache=writeback", iscsi_url],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    log.close()
    url = f"nbd://127.0.0.1:{port}/disk"
    try:
        deadline = time.monotonic() + 20
        while run(["nbdinfo", "--size", url]).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((workdir / "qemu-nbd.log").read_text())
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_ext4_over_iscsi(block_stack: BlockStack, tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        a = topo.add_primary("site-a", peers=[], size=256 * MiB)
        port = serve_iscsi(a)
        a.start()
        assert a.unit is not None
        iscsi_url = f"iscsi://127.0.0.1:{port}/{TARGET}/0"
        fs_dir = tmp_path / "fs"
        with qemu_nbd_bridge(iscsi_url, tmp_path) as url:
            loop = block_stack.attach(url)
            run(["mkfs.ext4", "-q", "-F", loop], check=True)
            block_stack.mount(loop, fs_dir)
            sums = write_tree(fs_dir, seed=7)
            run(["sync"], check=True)
            block_stack.umount(fs_dir)
            fsck = run(["e2fsck", "-fn", loop])
            assert fsck.returncode == 0, f"e2fsck:\n{fsck.stdout}\n{fsck.stderr}"
            block_stack.close()
            # A fresh stack: what is read now came back through iSCSI, not a page cache.
            loop = block_stack.attach(url)
            block_stack.mount(loop, fs_dir)
            verify_tree(fs_dir, sums)
            block_stack.umount(fs_dir)
            block_stack.close()
        fsck = run(["e2fsck", "-fn", str(a.images["vol"])])
        assert fsck.returncode == 0, f"e2fsck on the volume file:\n{fsck.stdout}\n{fsck.stderr}"
        counters = volume_counters(a.unit)
        assert counters["bytes_written"] >= sum(size for size, _ in sums.values()), counters
        assert counters["errors"] == 0, counters
