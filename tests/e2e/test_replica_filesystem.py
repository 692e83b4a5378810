"""A standby server can use the replica: the filesystem the host built is there, clean and whole.

The host side is real: ext4 made and filled through nbdfuse → loop device → the primary's export,
then synced and unmounted (the kernel's own flushes drive the journal). Once the secondary has
caught up, a *copy* of the replica image (the standby's view: it must not touch the live replica)
passes ``e2fsck -fn`` and mounts read-only through a loop device, with every file's SHA-256 equal
to what the host wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import BlockStack, MiB, is_mounted, run
from tests.support.pair import Site, Topology, peer_address, topology, wait_caught_up

pytestmark = pytest.mark.e2e

SIZE = 128 * MiB
FILES = 200


def write_tree(root: Path, seed: int) -> dict[str, tuple[int, str]]:
    """Files of random size (up to 1 MiB, most small) in nested directories.

    Returns name → (size, sha256).
    """
    rng = random.Random(seed)
    sums: dict[str, tuple[int, str]] = {}
    for i in range(FILES):
        parts = [f"d{rng.randint(0, 4)}" for _ in range(rng.randint(0, 3))]
        directory = root.joinpath(*parts)
        directory.mkdir(parents=True, exist_ok=True)
        size = MiB if i % 40 == 0 else int(MiB * rng.random() ** 3)
        data = rng.randbytes(size)
        path = directory / f"f{i:03d}.bin"
        path.write_bytes(data)
        sums[str(path.relative_to(root))] = (size, hashlib.sha256(data).hexdigest())
    return sums


def verify_tree(root: Path, sums: dict[str, tuple[int, str]]) -> None:
    found = {str(p.relative_to(root)) for p in root.rglob("*.bin")}
    assert found == set(sums), (
        f"files missing {sorted(set(sums) - found)[:5]}, unexpected {sorted(found - set(sums))[:5]}"
    )
    bad = [n for n, (_, digest) in sums.items() if sha256_file(root / n) != digest]
    assert not bad, f"{len(bad)} of {len(sums)} files differ on the replica, e.g. {bad[:5]}"


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Topology, Site, Site]]:
    """A primary and a secondary, running; both stopped by PID afterwards."""
    units = tmp_path / "units"
    units.mkdir()
    with topology(units) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE)
        b.start()
        a.start()
        wait_caught_up(a, b)  # the new replica's initial full sync
        yield topo, a, b


@contextlib.contextmanager
def loop_device(image: Path, *, read_only: bool) -> Iterator[str]:
    args = ["losetup", "-f", "--show", *(["-r"] if read_only else []), str(image)]
    loop = run(args, check=True).stdout.strip()
    assert loop.startswith("/dev/loop"), loop
    try:
        yield loop
    finally:
        BlockStack._detach(loop)


@contextlib.contextmanager
def mounted(device: str, target: Path, options: str) -> Iterator[Path]:
    target.mkdir(exist_ok=True)
    run(["mount", "-o", options, device, str(target)], check=True)
    try:
        yield target
    finally:
        if is_mounted(target):
            proc = run(["umount", str(target)])
            if proc.returncode != 0 and is_mounted(target):
                run(["umount", "-l", str(target)], check=True)
                raise AssertionError(f"umount {target} failed: {proc.stderr}")


# Argument order: ``pair`` is set up before ``block_stack``, so the units outlive the host's
# filesystem, loop device and nbdfuse when the fixtures are torn down.
def test_replica_of_ext4_mounts_clean_with_every_file(
    pair: tuple[Topology, Site, Site], block_stack: BlockStack, tmp_path: Path
) -> None:
    _, a, b = pair
    assert a.unit is not None
    host_fs = tmp_path / "host-fs"

    # --- the host: a filesystem on the primary's export ---------------------------------------
    loop = block_stack.attach(a.unit.export_url("vol"))
    run(["mkfs.ext4", "-q", "-F", loop], check=True)
    block_stack.mount(loop, host_fs)
    sums = write_tree(host_fs, seed=7)
    run(["sync"], check=True)
    block_stack.umount(host_fs)
    # Release the loop device and nbdfuse too: whatever they still buffered reaches the export.
    block_stack.close()
    counters = a.volume_status()["counters"]
    # ext4 wrote every byte of file data through the export, and flushed.
    data_bytes = sum(size for size, _ in sums.values())
    assert counters["bytes_written"] >= data_bytes and counters["flushes"] > 0, counters

    # --- the standby: a copy of the caught-up replica -----------------------------------------
    rep = wait_caught_up(a, b)
    assert rep["replica"]["consistent"], rep
    copy = tmp_path / "standby.img"
    # The standby works on a copy: the live replica stays untouched by fsck and mount.
    run(["cp", "--sparse=always", str(b.images["vol"]), str(copy)], check=True)
    assert copy.stat().st_size == SIZE

    fsck = run(["e2fsck", "-fn", str(copy)], timeout=120)
    assert fsck.returncode == 0, f"e2fsck on the replica copy:\n{fsck.stdout}\n{fsck.stderr}"

    with (
        loop_device(copy, read_only=True) as standby,
        mounted(standby, tmp_path / "standby-fs", "ro,noload") as root,
    ):
        verify_tree(root, sums)
