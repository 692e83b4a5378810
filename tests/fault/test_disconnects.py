"""Clients that go away at the worst moment, stop reading, or come and go by the thousand.

What must hold: a WRITE whose payload never fully arrived is never applied, not even in part; the
daemon drops a vanished client's work without disturbing anyone else; and after it all, its file
descriptors, memory and connection count are back where they started.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.fault.conftest import MakeTarget
from tests.fault.rawnbd import (
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    INFO_BLOCK_SIZE,
    OPT_GO,
    OPT_INFO,
    KiB,
    MiB,
    RawNbd,
    SimpleReply,
    info_request,
    option,
    request,
)
from tests.fault.target import Target, open_fds, rss_bytes

pytestmark = pytest.mark.fault


def junk(n: int) -> bytes:
    return (b"\xde\xad\xbe\xef" * (n // 4 + 1))[:n]


# --- a WRITE cut short ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [4 * KiB, 8 * MiB], ids=["4KiB", "8MiB"])
@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("sent", ["half", "all-but-one"])
def test_write_cut_short_by_a_disconnect_is_not_applied(
    target: Target, size: int, how: str, sent: str
) -> None:
    """The payload stops short (by half, or by its very last byte) and the client goes away.
    Nothing of it may reach the volume: a partial write would be a torn block the host never
    asked for."""
    cut = size // 2 if sent == "half" else size - 1
    with target.session() as conn:
        # A valid request first, so the connection is demonstrably in transmission and serving.
        assert conn.read(0, 4096, cookie=1) == bytes(4096)
        conn.send(request(CMD_WRITE, 0, size, cookie=2) + junk(cut))
        if how == "fin":
            conn.half_close()
            # The server must hang up on its own: the client will send nothing more.
            assert conn.expect_closed() == b""
        else:
            conn.abort()
    target.assert_healthy()


# --- a client that vanishes with work in flight ---------------------------------------------------


def test_client_vanishing_with_many_requests_in_flight(target: Target) -> None:
    """Several clients pipeline reads, writes, flushes, trims and zeroings without reading a
    single reply, then reset their connections. The daemon must drop their replies quietly and
    keep serving; it must not wait on a dead socket or leave the connections counted."""
    # Someone else's connection, open all along, reading a region the others never touch.
    bystander = target.session()
    quiet = 6 * MiB
    expected = bystander.read(quiet, 4096)
    conns = [target.session() for _ in range(4)]
    for n, conn in enumerate(conns):
        batch = []
        for i in range(200):
            offset = (i * 37 % 1000) * 4096
            batch.append(request(CMD_READ, offset, 64 * KiB, cookie=i))
            batch.append(request(CMD_WRITE, offset, 4096, cookie=i, data=junk(4096)))
            if i % 50 == n:
                batch.append(request(CMD_FLUSH, cookie=i))
                batch.append(request(CMD_TRIM, offset, 64 * KiB, cookie=i))
                batch.append(request(CMD_WRITE_ZEROES, offset, 64 * KiB, cookie=i))
        conn.send(b"".join(batch))
    for conn in conns:
        conn.abort()
    assert bystander.read(quiet, 4096, cookie=2) == expected
    bystander.close()
    # The writes were valid, so the volume may have changed; everything else must hold.
    target.assert_healthy(unchanged=False)


def test_pipelined_requests_then_fin_are_all_answered(make_target: MakeTarget) -> None:
    """A client that half-closes after pipelining still gets every reply, in full, then EOF:
    requests already received are served (here more than fit in the socket buffers, so the
    server has to wait for the client to read)."""
    target = make_target(size=64 * MiB)
    count, length = 16, 4 * MiB
    with target.session() as conn:
        conn.send(b"".join(request(CMD_READ, i * length, length, cookie=i) for i in range(count)))
        conn.half_close()
        for i in range(count):
            assert conn.read_simple_reply() == SimpleReply(0, i)
            assert conn.recv_exact(length) == bytes(length)
        assert conn.expect_closed() == b""
    target.assert_healthy()


def test_pipelined_big_reads_from_a_client_that_does_not_read_are_bounded(
    make_target: MakeTarget,
) -> None:
    """64 READs of 32 MiB in one 1792-byte segment, and the client reads nothing. A server that
    answered them all at once would hold 2 GiB of replies (a few KiB more of requests would
    exhaust any machine); it must stop taking requests while the client is not reading."""
    target = make_target(size=64 * MiB)
    count, length = 64, 32 * MiB
    rss_before = rss_bytes(target.unit.pid)
    with target.session() as conn:
        conn.send(b"".join(request(CMD_READ, 0, length, cookie=i) for i in range(count)))
        peak = rss_before
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            peak = max(peak, rss_bytes(target.unit.pid))
            time.sleep(0.05)
        growth = peak - rss_before
        assert growth < 256 * MiB, f"RSS grew by {growth / MiB:.0f} MiB"
        # Reading resumes the server, which then answers in order.
        for i in range(3):
            assert conn.read_simple_reply() == SimpleReply(0, i)
            conn.recv_exact(length)
        conn.abort()
    target.assert_healthy()


# --- a thousand connections -----------------------------------------------------------------------


def close_at_once(conn: RawNbd) -> None:
    pass


def after_greeting(conn: RawNbd) -> None:
    conn.read_greeting()


def mid_options(conn: RawNbd) -> None:
    conn.handshake()
    conn.ask(OPT_INFO, info_request("vol", INFO_BLOCK_SIZE))
    conn.send(option(OPT_GO, info_request("vol"))[:11])  # part of a header


def mid_transmission(conn: RawNbd) -> None:
    conn.session()
    assert conn.read(0, 4096) == bytes(4096)
    conn.send(request(CMD_READ, 0, 1 * MiB, cookie=2))  # a reply left unread
    conn.send(request(CMD_WRITE, 0, 4096, cookie=3) + junk(100))  # a payload cut short


CHURN: list[Callable[[RawNbd], None]] = [
    close_at_once,
    after_greeting,
    mid_options,
    mid_transmission,
]


def churn(target: Target, n: int) -> None:
    """Connection ``n`` does one of the CHURN steps, then closes (odd rounds with RST)."""
    with target.connect() as conn:
        CHURN[n % len(CHURN)](conn)
        if (n // len(CHURN)) % 2:
            conn.abort()


def settled_fds(pid: int, ceiling: int, timeout: float = 5.0) -> int:
    """The unit's fd count once it is at or under ``ceiling`` (closes finish asynchronously)."""
    deadline = time.monotonic() + timeout
    while (fds := open_fds(pid)) > ceiling and time.monotonic() < deadline:
        time.sleep(0.05)
    return fds


def test_a_thousand_connects_and_disconnects_leak_nothing(make_target: MakeTarget) -> None:
    target = make_target()
    pid = target.unit.pid
    for n in range(len(CHURN) * 2):  # warm up every path once, FIN and RST
        churn(target, n)
    target.wait_idle()
    time.sleep(0.2)
    fds_before = open_fds(pid)
    rss_before = rss_bytes(pid)
    total_before = target.counters()["connections_total"]

    rounds = 1000
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: churn(target, n), range(rounds)))

    target.wait_idle()
    counters = target.counters()
    # Exactly the mid_transmission rounds reached an export; every one of them was let go.
    assert counters["connections_total"] - total_before == rounds // len(CHURN)
    assert counters["connections"] == 0
    fds_after = settled_fds(pid, fds_before + 2)
    assert fds_after <= fds_before + 2, f"fds {fds_before} -> {fds_after}"
    growth = rss_bytes(pid) - rss_before
    assert growth < 30 * MiB, f"RSS grew by {growth / MiB:.1f} MiB"
    target.assert_healthy(unchanged=True)
