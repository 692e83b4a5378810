"""A write larger than the journal can hold is refused at once, never left waiting (point 6).

A 1 MiB journal cannot hold a 32 MiB write at all. Before, such a write waited for room that
could never come and the volume hung, checkpoints spinning. Now the export advertises the largest
request the journal takes (NBD_INFO_BLOCK_SIZE), clients that honour it split their requests,
and a client that does not gets EINVAL for the oversized write, with nothing changed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from tests.fault.rawnbd import CMD_READ, CMD_WRITE, EINVAL, RawNbd
from tests.support.unit_process import fetch_status, require_commands, running_unit

MiB = 1024 * 1024


def test_an_oversized_write_is_refused_and_a_splitting_client_is_served(tmp_path: Path) -> None:
    require_commands("nbdinfo", "qemu-io")
    with running_unit(tmp_path, size="64MiB", journal_size="1MiB") as unit:
        url = unit.export_url("vol")
        info = json.loads(
            subprocess.run(
                ["nbdinfo", "--json", url], check=True, capture_output=True, text=True
            ).stdout
        )
        export = info["exports"][0]
        maximum = int(export["block_size_maximum"])
        assert 4096 <= maximum < MiB, export
        # A raw client that ignores the limit: each oversized write is answered EINVAL at once.
        with RawNbd(unit.export_address("vol"), timeout=10) as conn:
            conn.session("vol")
            for length in (4 * MiB, 8 * MiB, maximum * 2):
                error = conn.call(CMD_WRITE, 0, length, cookie=7, data=b"\xee" * length)
                assert error == EINVAL, (length, error)
            # Nothing was written, and the connection still works.
            assert conn.read(0, 4096) == bytes(4096)
            assert conn.call(CMD_WRITE, 0, maximum, cookie=8, data=b"\x01" * maximum) == 0
            assert conn.call(CMD_READ, 0, 4096, cookie=9) == 0
        # qemu-io honours the advertised maximum: an 8 MiB write is split and fully applied,
        # many times over a ring that holds one eighth of it.
        for i in range(4):
            out = subprocess.run(  # noqa: PLW1510 - the return code is asserted
                [
                    "qemu-io",
                    "-f",
                    "raw",
                    url,
                    "-c",
                    f"write -P {0x40 + i} {i * 8}M 8M",
                    "-c",
                    f"read -P {0x40 + i} {i * 8}M 8M",
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0 and "verification failed" not in out.stdout, out
        status = fetch_status(unit)
        vol = status["volumes"][0]
        assert vol["state"] == "serving", vol
        unit.terminate()
    image = (tmp_path / "vol.img").read_bytes()
    for i in range(4):
        chunk = image[i * 8 * MiB : (i + 1) * 8 * MiB]
        assert (
            hashlib.sha256(chunk).digest() == hashlib.sha256(bytes([0x40 + i]) * 8 * MiB).digest()
        )
