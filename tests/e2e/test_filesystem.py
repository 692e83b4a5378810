"""A real ext4 filesystem on the export, through nbdfuse and a loop device (no kernel NBD here).

This is the closest the tests get to a host using the disk: the kernel's block layer and ext4
drive the export with their own mix of reads, writes, flushes, discards and zeroing.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import BlockStack, MiB, run, volume_counters
from tests.support.unit_process import UnitProcess, running_unit

pytestmark = pytest.mark.e2e

FILES = 300


@pytest.fixture
def fs_unit(tmp_path: Path) -> Iterator[UnitProcess]:
    with running_unit(tmp_path, size="256MiB") as unit:
        yield unit


def write_tree(root: Path, seed: int) -> dict[str, tuple[int, str]]:
    """A few hundred files of random size (up to 1 MiB) in nested directories.

    Returns name → (size, sha256).
    """
    rng = random.Random(seed)
    sums: dict[str, tuple[int, str]] = {}
    for i in range(FILES):
        depth = rng.randint(0, 3)
        parts = [f"d{rng.randint(0, 4)}" for _ in range(depth)]
        directory = root.joinpath(*parts)
        directory.mkdir(parents=True, exist_ok=True)
        # Cubed, so most files are small (as on real disks) but some reach the full 1 MiB.
        size = int(MiB * rng.random() ** 3)
        if i % 50 == 0:
            size = MiB
        data = rng.randbytes(size)
        path = directory / f"f{i:03d}.bin"
        path.write_bytes(data)
        sums[str(path.relative_to(root))] = (size, hashlib.sha256(data).hexdigest())
    return sums


def verify_tree(root: Path, sums: dict[str, tuple[int, str]]) -> None:
    found = {str(p.relative_to(root)) for p in root.rglob("*.bin")}
    assert found == set(sums), "the set of files changed"
    bad = [
        name
        for name, (_, digest) in sums.items()
        if hashlib.sha256((root / name).read_bytes()).hexdigest() != digest
    ]
    assert not bad, f"{len(bad)} files have the wrong contents, e.g. {bad[:5]}"


# Argument order matters: fs_unit is set up before block_stack, so it is torn down after it and the
# server is still there while the filesystem, the loop device and nbdfuse are released.
def test_ext4_on_the_export_survives_umount_fsck_and_remount(
    fs_unit: UnitProcess, block_stack: BlockStack, tmp_path: Path
) -> None:
    url = fs_unit.export_url("vol")
    fs_dir = tmp_path / "fs"

    loop = block_stack.attach(url)
    run(["mkfs.ext4", "-q", "-F", loop], check=True)
    block_stack.mount(loop, fs_dir)
    sums = write_tree(fs_dir, seed=1)
    run(["sync"], check=True)
    block_stack.umount(fs_dir)
    fsck = run(["e2fsck", "-fn", loop])
    assert fsck.returncode == 0, f"e2fsck found problems:\n{fsck.stdout}\n{fsck.stderr}"

    block_stack.mount(loop, fs_dir)
    verify_tree(fs_dir, sums)
    block_stack.umount(fs_dir)

    # Start over with a fresh nbdfuse and loop device, so no page cache of the first stack can
    # answer the reads: what is verified now came back from the export.
    block_stack.close()
    loop = block_stack.attach(url)
    fsck = run(["e2fsck", "-fn", loop])
    assert fsck.returncode == 0, f"e2fsck after reattach:\n{fsck.stdout}\n{fsck.stderr}"
    block_stack.mount(loop, fs_dir)
    verify_tree(fs_dir, sums)
    block_stack.umount(fs_dir)
    block_stack.close()

    # The volume file itself holds a consistent filesystem, not just the server's view of it.
    fsck = run(["e2fsck", "-fn", str(tmp_path / "vol.img")])
    assert fsck.returncode == 0, f"e2fsck on the volume file:\n{fsck.stdout}\n{fsck.stderr}"

    counters = volume_counters(fs_unit)
    assert counters["writes"] > 0, counters
    # ext4 had to write every byte of file data through the export at least once.
    assert counters["bytes_written"] >= sum(size for size, _ in sums.values()), counters
    assert counters["errors"] == 0, counters
