"""A primary whose volume runs out of space, on a real filesystem (issue 7, point 3).

The primary's sparse volume lives on a tmpfs far smaller than the volume, the way a thin
volume outgrows its pool. What must hold, and is checked:

- the host's writes that do not fit are answered with an error (not a hang, not a dropped
  connection), reads keep working, and status names the failure instead of "serving";
- once space comes back the unit resumes by itself, with no restart;
- nothing acknowledged is lost and nothing differs untracked: afterwards the replica equals the
  volume byte for byte, including the records that failed to apply at first.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support.pair import (
    MiB,
    peer_address,
    qemu_img_compare,
    run_client,
    topology,
    wait_caught_up,
    wait_status,
)
from tests.support.unit_process import require_commands


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_volume_answers_errors_and_recovers_by_itself(tmp_path: Path) -> None:
    require_commands("qemu-io", "qemu-img")
    with small_tmpfs(tmp_path / "pool", "8m") as pool, topology(tmp_path) as topo:
        secondary = topo.add_secondary("b", volumes={"vol": 32 * MiB})
        primary = topo.add_primary(
            "a",
            peers=[peer_address(secondary)],
            size=32 * MiB,
            journal_size="16MiB",
            extra={"path": str(pool / "vol.img")},
        )
        secondary.start()
        unit = primary.start()
        url = unit.export_url("vol")
        ok = run_client(["qemu-io", "-f", "raw", url, "-c", "write -P 0x11 0 4M", "-c", "flush"])
        assert ok.returncode == 0, ok
        # 12 MiB more do not fit in what is left of the 8 MiB pool.
        full = run_client(["qemu-io", "-f", "raw", url, "-c", "write -P 0x22 4M 12M"], timeout=60)
        assert "No space left on device" in full.stdout + full.stderr, full

        def stalled() -> dict[str, object] | None:
            v = primary.volume_status()
            return v if v["state"] == "stalled" else None

        vol = wait_status(stalled, timeout=10, what="status naming the full volume")
        assert "No space left" in str(vol["problem"]), vol
        # Reads still work while writes are refused.
        read = run_client(["qemu-io", "-f", "raw", url, "-c", "read -P 0x11 0 4M"])
        assert read.returncode == 0 and "verification failed" not in read.stdout, read
        refused = run_client(["qemu-io", "-f", "raw", url, "-c", "write -P 0x33 20M 64k"])
        assert "No space left on device" in refused.stdout + refused.stderr, refused
        # Space comes back: the unit resumes on its own.
        subprocess.run(["mount", "-o", "remount,size=64m", str(pool)], check=True)
        wait_status(
            lambda: primary.volume_status()["state"] == "serving",
            timeout=15,
            what="the unit to resume after space came back",
        )
        again = run_client(
            [
                "qemu-io",
                "-f",
                "raw",
                url,
                "-c",
                "write -P 0x44 24M 4M",
                "-c",
                "flush",
                "-c",
                "read -P 0x44 24M 4M",
            ]
        )
        assert again.returncode == 0 and "verification failed" not in again.stdout, again
        wait_caught_up(primary, secondary)
        assert primary.unit is not None and secondary.unit is not None
        assert primary.unit.terminate() == 0
        assert secondary.unit.terminate() == 0
        qemu_img_compare(pool / "vol.img", secondary.images["vol"])
