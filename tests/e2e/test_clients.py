"""The export as real NBD clients see it: nbdinfo, qemu-io, qemu-img, nbdcopy, fio; and the CLI.

Each test checks what the client reports and, where data moved, the volume file itself, so a
client that silently tolerates a wrong answer cannot make a test pass.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockmirror import __version__
from blockmirror.frontend.nbd_client import NbdClient, NbdRequestError
from tests.e2e.conftest import KiB, MiB, api_status, run, volume_counters
from tests.support.unit_process import UnitProcess, require_commands, running_unit

pytestmark = pytest.mark.e2e

EPERM = 1
PATTERN_FAILED = "Pattern verification failed"


@pytest.fixture(autouse=True)
def _clients() -> None:
    require_commands("nbdinfo", "nbdcopy", "qemu-io", "qemu-img", "fio", "cmp")


def vol_file(unit: UnitProcess) -> Path:
    return unit.state_dir.parent / "vol.img"


def server_url(unit: UnitProcess) -> str:
    """The export's server with the empty export name (``nbd://HOST:PORT/``)."""
    host, port = unit.export_address("vol")
    return f"nbd://{host}:{port}/"


def nbdinfo_json(url: str) -> dict[str, Any]:
    out = json.loads(run(["nbdinfo", "--json", url], check=True).stdout)
    assert isinstance(out, dict)
    [export] = out["exports"]
    assert isinstance(export, dict)
    return export


def qemu_io(url: str, commands: list[str], *options: str) -> tuple[int, str]:
    args = ["qemu-io", "-f", "raw", *options, url]
    for command in commands:
        args += ["-c", command]
    proc = run(args)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def prefilled_unit(tmp_path: Path) -> Iterator[UnitProcess]:
    """A 16 MiB volume whose file starts out full of 0xEE, so zeroing has to do real work."""
    (tmp_path / "vol.img").write_bytes(b"\xee" * (16 * MiB))
    with running_unit(tmp_path, size="16MiB") as unit:
        yield unit


# --- 1. what nbdinfo reports -----------------------------------------------------------------


def test_nbdinfo_reports_size_flags_and_block_sizes(tmp_path: Path) -> None:
    # A 64 MiB journal takes NBD's usual 32 MiB requests (smaller ones advertise less).
    with running_unit(
        tmp_path, size="48MiB", description="e2e test disk", journal_size="64MiB"
    ) as unit:
        info = nbdinfo_json(unit.export_url("vol"))
    assert info["export-name"] == "vol"
    assert info["export-size"] == 48 * MiB
    for flag in (
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_cache",
        "can_df",
    ):
        assert info[flag] is True, f"{flag} is {info[flag]!r}"
    assert info["is_read_only"] is False
    assert info["is_rotational"] is False
    assert (
        info["block_size_minimum"],
        info["block_size_preferred"],
        info["block_size_maximum"],
    ) == (1, 4096, 32 * MiB)
    assert "base:allocation" in info["contexts"]
    assert info["description"] == "e2e test disk"


def test_nbdinfo_list_shows_name_and_description(tmp_path: Path) -> None:
    with running_unit(tmp_path, description="listed disk") as unit:
        out = run(["nbdinfo", "--list", server_url(unit)], check=True).stdout
    assert 'export="vol"' in out
    assert "description: listed disk" in out
    assert "export-size: 67108864" in out


def test_empty_export_name_resolves_to_the_only_export(tmp_path: Path) -> None:
    with running_unit(tmp_path) as unit:
        url = server_url(unit)
        info = nbdinfo_json(url)
        assert info["export-name"] == "vol"  # the server names the export it chose
        assert info["export-size"] == 64 * MiB
        code, out = qemu_io(url, ["write -P 0x77 8k 4k"])
        assert code == 0, out
        # A name that is not exported is refused, not mapped to the default.
        refused = run(["nbdinfo", url + "nope"])
        assert refused.returncode != 0
        assert "nope" in refused.stderr
        host, port = unit.export_address("vol")
        data = asyncio.run(_read_with_empty_name(host, port, 8 * KiB, 4 * KiB))
    assert data == b"\x77" * (4 * KiB)
    assert vol_file(unit).read_bytes()[8 * KiB : 12 * KiB] == b"\x77" * (4 * KiB)


async def _read_with_empty_name(host: str, port: int, offset: int, length: int) -> bytes:
    async with await NbdClient.connect(host, port, "") as client:
        assert client.export is not None and client.export.size == 64 * MiB
        return await client.read(offset, length)


def test_nbdinfo_map_shows_holes_and_data(tmp_path: Path) -> None:
    written = [(1 * MiB, 64 * KiB), (10 * MiB, 4 * KiB), (20 * MiB, 1 * MiB)]
    with running_unit(tmp_path, size="32MiB") as unit:
        url = unit.export_url("vol")
        code, out = qemu_io(url, [f"write -P 0x5c {off} {length}" for off, length in written])
        assert code == 0, out
        extents = json.loads(run(["nbdinfo", "--map", "--json", url], check=True).stdout)
        text_map = run(["nbdinfo", "--map", url], check=True).stdout
        # qemu asks with REQ_ONE (one extent per reply) and checks the context id.
        qemu_map = json.loads(
            run(["qemu-img", "map", "--output=json", "-f", "raw", url], check=True).stdout
        )

    # The map tiles the whole disk with no gaps or overlaps.
    position = 0
    for extent in extents:
        assert extent["offset"] == position, extents
        position += extent["length"]
    assert position == 32 * MiB

    def kind(offset: int) -> str:
        for extent in extents:
            if extent["offset"] <= offset < extent["offset"] + extent["length"]:
                return str(extent["description"])
        raise AssertionError(f"{offset} not mapped")

    for offset, length in written:
        assert kind(offset) == "data", (offset, extents)
        assert kind(offset + length - 1) == "data", (offset, extents)
    # Well away from any write (a filesystem may allocate a little around one, never MiBs).
    for offset in (0, 5 * MiB, 15 * MiB, 25 * MiB, 32 * MiB - 1):
        assert kind(offset) == "hole,zero", (offset, extents)
    data_bytes = sum(e["length"] for e in extents if e["description"] == "data")
    assert sum(length for _, length in written) <= data_bytes <= 4 * MiB, extents
    assert "hole,zero" in text_map and "data" in text_map
    qemu_data = [(e["start"], e["length"]) for e in qemu_map if e["data"]]
    for offset, length in written:
        assert any(s <= offset and offset + length <= s + n for s, n in qemu_data), qemu_map
    assert qemu_map[0]["start"] == 0 and qemu_map[0]["zero"] and not qemu_map[0]["data"]


def test_read_only_volume_refuses_writes(tmp_path: Path) -> None:
    original = bytes(range(256)) * (4 * KiB)  # 1 MiB
    (tmp_path / "vol.img").write_bytes(original)
    with running_unit(tmp_path, size="1MiB", read_only=True) as unit:
        url = unit.export_url("vol")
        info = nbdinfo_json(url)
        assert info["is_read_only"] is True
        assert info["can_trim"] is False and info["can_zero"] is False and info["can_fua"] is False
        # qemu notices the read-only flag and refuses to open the disk for writing...
        code, out = qemu_io(url, ["write -P 0xab 0 4k"])
        assert code != 0, out
        # ...while reading it works and sees the file's bytes.
        code, out = qemu_io(url, ["read -P 0x00 0 1", "read -P 0xff 255 1"], "-r")
        assert code == 0 and PATTERN_FAILED not in out, out
        # A client that writes anyway must get EPERM from the server, for every kind of change.
        host, port = unit.export_address("vol")
        errors = asyncio.run(_attempt_writes(host, port))
        assert errors == [EPERM, EPERM, EPERM], errors
        assert volume_counters(unit)["writes"] == 0
    assert vol_file(unit).read_bytes() == original


async def _attempt_writes(host: str, port: int) -> list[int]:
    errors = []
    async with await NbdClient.connect(host, port, "vol") as client:
        for attempt in (
            client.write(0, b"\xab" * 4096),
            client.write_zeroes(4096, 4096),
            client.trim(8192, 4096),
        ):
            try:
                await attempt
            except NbdRequestError as exc:
                errors.append(exc.error)
            else:
                errors.append(0)
    return errors


# --- 2. qemu-io ------------------------------------------------------------------------------

# (offset, length, byte the region must hold afterwards); None = 0xEE or zero (discarded).
EXPECTED_AFTER_SCRIPT: list[tuple[int, int, int | None]] = [
    (0, 1 * MiB, 0xAB),
    (1 * MiB, 1 * MiB, 0x00),  # write -z
    (2 * MiB, 512 * KiB, 0x00),  # write -z -u over 0xCD
    (2 * MiB + 512 * KiB, 512 * KiB, 0xCD),
    (3 * MiB, 1 * MiB, 0x11),
    (4 * MiB, 1 * MiB, None),  # discard: contents unspecified, but never garbage
    (5 * MiB, 1 * MiB, 0x22),
    (6 * MiB, 64 * KiB, 0x33),  # FUA write
    (6 * MiB + 64 * KiB, 1 * MiB - 64 * KiB, 0xEE),
    (7 * MiB, 100, 0xEE),
    (7 * MiB + 100, 333, 0x44),  # unaligned: the export's minimum block is 1 byte
    (7 * MiB + 433, 9 * MiB - 433, 0xEE),  # untouched up to the end
]

QEMU_IO_SCRIPT = [
    "write -P 0xab 0 1M",
    "read -P 0xab 0 1M",
    "write -z 1M 1M",
    "read -P 0 1M 1M",
    "write -P 0xcd 2M 1M",
    "write -z -u 2M 512k",
    "read -P 0 2M 512k",
    "read -P 0xcd 2560k 512k",
    "write -P 0x11 3M 1M",
    "write -P 0x22 5M 1M",
    "discard 4M 1M",
    "read -P 0x11 3M 1M",
    "read -P 0x22 5M 1M",
    "flush",
    "write -f -P 0x33 6M 64k",
    "read -P 0x33 6M 64k",
    f"write -P 0x44 {7 * MiB + 100} 333",
    f"read -P 0x44 {7 * MiB + 100} 333",
    f"read -P 0xee {7 * MiB + 433} {MiB}",
    "flush",
]


@pytest.mark.parametrize(
    "cache_options",
    [
        pytest.param([], id="writethrough"),  # qemu-io's default: FUA on every write
        pytest.param(["-t", "writeback"], id="writeback"),
        pytest.param(["-t", "none"], id="none"),
    ],
)
def test_qemu_io_script(prefilled_unit: UnitProcess, cache_options: list[str]) -> None:
    url = prefilled_unit.export_url("vol")
    code, out = qemu_io(url, QEMU_IO_SCRIPT, *cache_options)
    assert code == 0, out
    assert PATTERN_FAILED not in out, out
    assert out.count("wrote ") == 8, out  # every write, zero and FUA write ran

    # A new connection, read-only, sees the same data.
    reads = [c for c in QEMU_IO_SCRIPT if c.startswith("read ") and "-P 0x11" not in c]
    code, out = qemu_io(url, reads, "-r")
    assert code == 0 and PATTERN_FAILED not in out, out

    image = vol_file(prefilled_unit).read_bytes()
    assert len(image) == 16 * MiB
    for offset, length, byte in EXPECTED_AFTER_SCRIPT:
        region = image[offset : offset + length]
        if byte is None:
            assert set(region) <= {0x00, 0xEE}, f"discarded region at {offset} holds other bytes"
        else:
            assert region == bytes([byte]) * length, f"region {offset}+{length} is not {byte:#x}"
    counters = volume_counters(prefilled_unit)
    assert counters["zeroes"] >= 2 and counters["trims"] >= 1 and counters["flushes"] >= 2
    assert counters["errors"] == 0, counters


def test_qemu_io_pattern_check_can_fail(prefilled_unit: UnitProcess) -> None:
    """The negative control: the script's pattern checks really detect wrong data."""
    code, out = qemu_io(prefilled_unit.export_url("vol"), ["read -P 0xab 0 4k"], "-r")
    assert code != 0
    assert PATTERN_FAILED in out


# --- 3. qemu-img and nbdcopy -----------------------------------------------------------------


def random_image(path: Path, size: int) -> bytes:
    """Random data with zero holes (at the start, in the middle, unaligned, at the end)."""
    data = bytearray(os.urandom(size))
    for offset, length in ((0, 64 * KiB), (3 * MiB, 2 * MiB), (9 * MiB + 123, 77_777)):
        data[offset : offset + length] = bytes(length)
    data[size - MiB :] = bytes(MiB)
    path.write_bytes(data)
    return bytes(data)


def test_qemu_img_convert_and_compare(tmp_path: Path) -> None:
    size = 32 * MiB
    src = tmp_path / "random.img"
    random_image(src, size)
    # Garbage where the source has holes: convert -n must zero them, not skip them.
    (tmp_path / "vol.img").write_bytes(b"\xee" * size)
    with running_unit(tmp_path, size="32MiB") as unit:
        url = unit.export_url("vol")
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), url], check=True)
        for target in (str(vol_file(unit)), url):
            proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), target])
            assert proc.returncode == 0, f"{target}: {proc.stdout}{proc.stderr}"
            assert "Images are identical" in proc.stdout
        # The negative control: one changed byte is found.
        changed = bytearray(src.read_bytes())
        changed[size // 2] ^= 0xFF
        (tmp_path / "changed.img").write_bytes(changed)
        proc = run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "changed.img"), url]
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert volume_counters(unit)["errors"] == 0
    assert vol_file(unit).read_bytes() == src.read_bytes()


@pytest.mark.parametrize(
    "connections",
    [pytest.param([], id="default"), pytest.param(["--connections=4", "--threads=4"], id="multi")],
)
def test_nbdcopy_in_and_out(tmp_path: Path, connections: list[str]) -> None:
    src = tmp_path / "src.img"
    data = random_image(src, 32 * MiB)
    out = tmp_path / "out.img"
    with running_unit(tmp_path, size="32MiB") as unit:
        url = unit.export_url("vol")
        before = volume_counters(unit)["connections_total"]
        run(["nbdcopy", *connections, "--flush", str(src), url], check=True)
        used = volume_counters(unit)["connections_total"] - before
        if connections:
            # Multi-conn: nbdcopy trusts CAN_MULTI_CONN and spreads the copy over 4 connections.
            assert used >= 4, f"nbdcopy used {used} connections"
        assert vol_file(unit).read_bytes() == data
        run(["nbdcopy", *connections, url, str(out)], check=True)
        run(["cmp", str(src), str(out)], check=True)
        counters = volume_counters(unit)
    assert counters["flushes"] >= 1 and counters["errors"] == 0, counters


# --- 4. fio ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rw", ["randwrite", "randrw"])
def test_fio_verified_random_io(unit: UnitProcess, rw: str, tmp_path: Path) -> None:
    proc = run(
        [
            "fio",
            "--name=e2e",
            "--ioengine=nbd",
            f"--uri={unit.export_url('vol')}",
            f"--rw={rw}",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randseed=1234",
            # fio saves verify state files to its working directory: keep them out of the repo.
            "--verify_state_save=0",
        ],
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert re.search(r"err=\s*0\b", output), output
    assert "verify:" not in output and "verify failed" not in output, output
    counters = volume_counters(unit)
    assert counters["writes"] > 0 and counters["reads"] > 0, counters
    if rw == "randwrite":
        # 32 MiB in 4 KiB blocks, every one written and read back for verification.
        assert counters["writes"] == 8192 and counters["reads"] >= 8192, counters
    assert counters["errors"] == 0, counters


# --- 7. the command line ---------------------------------------------------------------------


def blockmirror(*args: str) -> tuple[int, str, str]:
    proc = run([sys.executable, "-m", "blockmirror.cli", *args])
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_status_table_and_json(tmp_path: Path) -> None:
    with running_unit(tmp_path, name="site-a", size="8MiB") as unit:
        code, out = qemu_io(unit.export_url("vol"), ["write -P 1 0 64k", "write -P 2 64k 64k"])
        assert code == 0, out
        token = ["--token-file", str(unit.admin_token_file)]
        code, table, err = blockmirror("status", "--admin", unit.admin, *token)
        assert code == 0, err
        code, raw, err = blockmirror("status", "--admin", unit.admin, "--json", *token)
        assert code == 0, err
        expected = api_status(unit)

    assert "unit site-a" in table and __version__ in table
    header, row = table.splitlines()[1:3]
    assert header.split()[:2] == ["volume", "role"]
    assert row.split()[:3] == ["vol", "primary", "serving"]
    assert unit.runtime["exports"]["vol"] in row

    status = json.loads(raw)
    assert status["unit"] == "site-a"
    assert status["version"] == __version__
    [vol] = status["volumes"]
    assert vol["name"] == "vol"
    assert vol["size"] == 8 * MiB
    assert vol["export"] == unit.runtime["exports"]["vol"]
    assert vol["counters"]["writes"] == 2
    assert vol["counters"]["bytes_written"] == 128 * KiB
    assert vol["counters"] == expected["volumes"][0]["counters"]


def test_cli_status_unreachable_admin_fails_clearly() -> None:
    # A port held by a bound but not listening socket: connecting is refused, and no other
    # process can take the port while the test runs.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        admin = f"127.0.0.1:{held.getsockname()[1]}"
        code, out, err = blockmirror("status", "--admin", admin)
    assert code == 1
    assert "cannot reach" in err and admin in err
    assert out == ""


def test_cli_version() -> None:
    code, out, _ = blockmirror("version")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"blockmirror {__version__}"
    assert any(line.startswith("Copyright") for line in lines[1:]), out
