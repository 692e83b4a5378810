"""Issue 7 point 17: unit-wide bounds on NBD memory and connections.

Greedy clients pipeline 32 MiB READs and never read the replies. Without a bound each held a whole
reply in the unit's memory (40 of them held 1.3 GiB). Now READ data is read piece by piece as the
client takes it, within a unit-wide budget of reply bytes in flight, and connections beyond
``[unit] nbd_max_connections`` are refused during the handshake with the reason. Throughout, a
well-behaved client (this file's raw client, nbdinfo and qemu-io) is served.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fault.rawnbd import (
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    OPT_GO,
    REP_ERR_POLICY,
    Closed,
    MiB,
    RawNbd,
    info_request,
)
from tests.support.unit_process import (
    UnitProcess,
    fetch_status,
    require_commands,
    start_unit,
    write_config,
)

GREEDY = 40
READS_EACH = 8
READ_SIZE = 32 * MiB
# Seconds before a client command counts as hung: a liveness bound, not a performance one.
HANG = 30.0


def vm_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


@contextlib.contextmanager
def unit_with(tmp_path: Path, size: str = "64MiB", **unit_keys: Any) -> Iterator[UnitProcess]:
    vol = {
        "name": "vol",
        "role": "primary",
        "path": str(tmp_path / "vol.img"),
        "size": size,
        "export": "127.0.0.1:0",
    }
    config = write_config(tmp_path, volumes=[vol])
    if unit_keys:
        extra = "".join(f"{key} = {value!r}\n" for key, value in unit_keys.items())
        text = config.read_text().replace("[unit]\n", f"[unit]\n{extra}", 1)
        config.write_text(text.replace("'", '"'))
    unit = start_unit(config, tmp_path / "state")
    try:
        yield unit
    finally:
        unit.kill()


def greedy_client(address: tuple[str, int], cookie_base: int) -> RawNbd:
    """Negotiates, pipelines READS_EACH 32 MiB READs, and never reads a reply."""
    # A small receive buffer, so the kernel soaks up little and the unit has to hold the rest.
    client = RawNbd(address, timeout=HANG, rcvbuf=64 * 1024)
    client.session()
    for i in range(READS_EACH):
        client.send_request(CMD_READ, 0, READ_SIZE, cookie=cookie_base + i)
    return client


def well_behaved_round(address: tuple[str, int], round_no: int) -> None:
    """Write, read back and flush through a fresh connection; every step must be answered."""
    data = bytes([round_no % 251 + 1]) * 65536
    offset = (round_no % 16) * 65536
    with RawNbd(address, timeout=HANG) as client:
        client.session()
        assert client.call(CMD_WRITE, offset, len(data), cookie=1, data=data) == 0
        assert client.read(offset, len(data), cookie=2) == data
        assert client.call(CMD_FLUSH, cookie=3) == 0


def run_client(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=HANG, check=False)


def test_greedy_readers_hold_bounded_memory_and_others_are_served(tmp_path: Path) -> None:
    require_commands("nbdinfo", "qemu-io")
    with unit_with(tmp_path) as unit:
        address = unit.export_address("vol")
        url = unit.export_url("vol")
        well_behaved_round(address, 0)
        baseline = vm_kib(unit.pid, "VmRSS")
        greedy: list[RawNbd] = []
        try:
            for n in range(GREEDY):
                greedy.append(greedy_client(address, n * READS_EACH))
                if n % 8 == 7:
                    well_behaved_round(address, n)
            # Give the unit time to do the worst it would: read every reply it is asked for.
            deadline = time.monotonic() + 5
            rounds = 1
            while time.monotonic() < deadline:
                well_behaved_round(address, rounds)
                rounds += 1
                time.sleep(0.2)
            nbd = fetch_status(unit)["nbd"]
            assert nbd["connections"] == GREEDY
            assert nbd["max_connections"] == 256
            assert nbd["reply_budget"] == 256 * MiB
            assert 0 < nbd["reply_bytes_in_flight"] <= nbd["reply_budget"]

            info = run_client(["nbdinfo", url])
            assert info.returncode == 0, info.stderr
            assert "67108864" in info.stdout
            io = run_client(
                [
                    "qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 256k",
                    "-c", "read -P 0x5a 1M 256k", "-c", "flush", url,
                ]
            )  # fmt: skip
            assert io.returncode == 0 and "Pattern verification failed" not in io.stdout, io

            peak = vm_kib(unit.pid, "VmHWM")
            grown_mib = (peak - baseline) / 1024
            # 40 clients asked for 10 GiB of replies; a whole reply each would be 1.3 GiB. The
            # unit holds at most about one piece per connection, well within the budget.
            assert grown_mib < 256, f"RSS grew by {grown_mib:.0f} MiB under greedy readers"
        finally:
            for client in greedy:
                client.abort()
        # Everything held for them comes back once they are gone.
        deadline = time.monotonic() + HANG
        while True:
            nbd = fetch_status(unit)["nbd"]
            if nbd["connections"] == 0 and nbd["reply_bytes_in_flight"] == 0:
                break
            assert time.monotonic() < deadline, nbd
            time.sleep(0.1)
        well_behaved_round(address, 99)
        assert unit.terminate() == 0, unit.log()


def test_connections_over_the_limit_are_refused_in_the_handshake(tmp_path: Path) -> None:
    require_commands("nbdinfo")
    with unit_with(tmp_path, nbd_max_connections=4) as unit:
        address = unit.export_address("vol")
        held = [RawNbd(address) for _ in range(4)]
        try:
            for client in held:
                client.session()
            # The fifth gets the greeting, then its GO is refused with the reason, then closed.
            with RawNbd(address) as extra:
                extra.handshake()
                replies = extra.ask(OPT_GO, info_request("vol"))
                assert replies[-1].reply == REP_ERR_POLICY, replies
                assert b"too many NBD connections (limit 4)" in replies[-1].data
                extra.expect_closed()
            # libnbd shows only the error code; the unit's log says why.
            refused = run_client(["nbdinfo", unit.export_url("vol")])
            assert refused.returncode != 0, refused.stdout
            assert "refusing NBD connection" in unit.log()
            nbd = fetch_status(unit)["nbd"]
            assert nbd["connections"] == 4 and nbd["max_connections"] == 4
            assert nbd["refused_connections"] >= 2
            # The connections inside the limit are served as usual.
            for i, client in enumerate(held):
                assert client.call(CMD_WRITE, i * 4096, 4096, cookie=i + 1, data=b"x" * 4096) == 0
            # A connection that leaves makes room for the next one.
            held.pop().close()
            deadline = time.monotonic() + HANG
            while fetch_status(unit)["nbd"]["connections"] != 3:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            well_behaved_round(address, 1)
        finally:
            for client in held:
                client.close()
        assert unit.terminate() == 0, unit.log()


def test_an_over_limit_client_that_says_nothing_is_closed_soon(tmp_path: Path) -> None:
    with unit_with(tmp_path, nbd_max_connections=1) as unit:
        address = unit.export_address("vol")
        with RawNbd(address) as inside, RawNbd(address) as silent:
            inside.session()
            silent.read_greeting()
            # Refused connections get a short deadline, not the 30 s of a negotiation.
            silent.expect_closed(timeout=15)
            assert inside.call(CMD_FLUSH) == 0


def test_status_table_shows_the_nbd_limits(tmp_path: Path) -> None:
    from blockmirror.admin.table import format_status_table

    with unit_with(tmp_path, nbd_max_connections=8, nbd_reply_budget="64MiB") as unit:
        with RawNbd(unit.export_address("vol")) as client:
            client.session()
            status = fetch_status(unit)
        table = format_status_table(status)
        assert status["nbd"]["connections"] == 1
        assert "nbd: 1/8 connections" in table, table
        assert "0 B/64.0 MiB reply bytes in flight" in table, table


# --- the budget's rules, without a unit -----------------------------------------------------------


class _Conn:
    """What NbdLimits needs of a connection."""

    def __init__(self) -> None:
        self.reserved = 0
        self.woken = 0

    def settle_budget(self) -> None:
        pass  # nothing is ever buffered in a transport here

    def budget_available(self) -> None:
        self.woken += 1


def test_limits_budget_rules() -> None:
    from blockmirror.frontend.nbd_limits import MAX_PIECE, MIN_PIECE, NbdLimits

    limits = NbdLimits(reply_budget=4 * MiB, max_connections=4)
    assert limits.piece == MAX_PIECE
    assert NbdLimits(reply_budget=MiB, max_connections=256).piece == MIN_PIECE
    a, b, c = _Conn(), _Conn(), _Conn()
    for _ in range(3):
        assert limits.take(a, MAX_PIECE)
    assert limits.take(b, MAX_PIECE)
    assert limits.reply_bytes_in_flight == 4 * MiB
    # Full: a connection holding bytes waits for them to come back...
    assert not limits.take(a, MAX_PIECE)
    # ...but one holding nothing may always take a piece, so no client starves another.
    assert limits.take(c, MAX_PIECE)
    assert limits.budget_waits == 1
    limits.give_back(b, MAX_PIECE)
    assert a.woken == 1 and b.reserved == 0
    assert limits.reply_bytes_in_flight == 4 * MiB
    assert limits.status()["reply_budget"] == 4 * MiB
    with pytest.raises(ValueError):
        NbdLimits(reply_budget=0)


def test_greedy_client_that_reads_at_last_gets_whole_replies(tmp_path: Path) -> None:
    """Back-pressure, not errors: a client that stalls, then reads, gets every byte in order."""
    with unit_with(tmp_path, size="64MiB") as unit:
        address = unit.export_address("vol")
        pattern = bytes(range(256)) * 4096  # 1 MiB
        with RawNbd(address, timeout=HANG) as writer:
            writer.session()
            for i in range(32):
                assert writer.call(CMD_WRITE, i * MiB, MiB, cookie=i + 1, data=pattern) == 0
        client = greedy_client(address, 100)
        try:
            time.sleep(1)  # replies pile up against a client that does not read
            for i in range(READS_EACH):
                reply = client.read_simple_reply()
                assert (reply.error, reply.cookie) == (0, 100 + i)
                data = client.recv_exact(READ_SIZE)
                assert data == pattern * 32
        except Closed as exc:
            raise AssertionError(f"unit closed a slow reader: {exc}\n{unit.log()}") from None
        finally:
            client.close()


def test_config_keys_for_the_limits(tmp_path: Path) -> None:
    from blockmirror.config import parse_config
    from blockmirror.errors import ConfigError

    def unit(**keys: object) -> dict[str, object]:
        return {
            "unit": {"name": "u", "state_dir": "state", **keys},
            "volume": [
                {"name": "v", "role": "primary", "path": "v.img", "size": "1MiB",
                 "export": "127.0.0.1:0"},
            ],
        }  # fmt: skip

    default = parse_config(unit(), base_dir=tmp_path, check_paths=False).unit
    assert (default.nbd_reply_budget, default.nbd_max_connections) == (256 * MiB, 256)
    given = parse_config(
        unit(nbd_reply_budget="64MiB", nbd_max_connections=8), base_dir=tmp_path, check_paths=False
    ).unit
    assert (given.nbd_reply_budget, given.nbd_max_connections) == (64 * MiB, 8)
    with pytest.raises(ConfigError) as bad:
        parse_config(
            unit(nbd_reply_budget="64KiB", nbd_max_connections=0),
            base_dir=tmp_path,
            check_paths=False,
        )
    keys = dict(bad.value.problems)
    assert "below the minimum of 1 MiB" in keys["unit.nbd_reply_budget"]
    assert "not between 1 and 65536" in keys["unit.nbd_max_connections"]
    with pytest.raises(ConfigError) as typed:
        parse_config(unit(nbd_max_connections="many"), base_dir=tmp_path, check_paths=False)
    assert "expected an integer" in dict(typed.value.problems)["unit.nbd_max_connections"]


def test_readers_under_a_small_budget_all_finish_and_the_budget_returns_to_zero(
    tmp_path: Path,
) -> None:
    """Many connections that all wait for reply budget at once must not wait for each other
    for ever: bytes the kernel took below a transport's high-water mark are counted back."""
    reads, length = 24, 256 * 1024
    with unit_with(tmp_path, nbd_reply_budget="1MiB", nbd_max_connections=32) as unit:
        address = unit.export_address("vol")
        errors: list[BaseException] = []

        def reader(n: int) -> None:
            try:
                # Little kernel buffering, so replies queue in the unit and use the budget.
                with RawNbd(address, timeout=HANG, rcvbuf=64 * 1024) as client:
                    client.session()
                    for i in range(reads):
                        client.send_request(CMD_READ, i * length, length, cookie=n * 100 + i)
                    time.sleep(0.3)  # everyone has asked before anyone reads
                    for _ in range(reads):
                        reply = client.read_simple_reply()
                        assert reply.error == 0, reply
                        client.recv_exact(length)
            except BaseException as exc:
                errors.append(exc)

        # Each paused connection holds about a transport's high-water mark (64 KiB) of the
        # budget, so 24 of them need more than the 1 MiB there is: the budget must bind.
        threads = [threading.Thread(target=reader, args=(n,)) for n in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HANG * 2)
        assert not any(t.is_alive() for t in threads), "a reader is stuck waiting for budget"
        assert not errors, errors
        deadline = time.monotonic() + 5
        while fetch_status(unit)["nbd"]["reply_bytes_in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        nbd = fetch_status(unit)["nbd"]
        assert nbd["reply_bytes_in_flight"] == 0, nbd
        assert nbd["budget_waits"] > 0, nbd  # the budget really was the limit
