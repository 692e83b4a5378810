"""A replication link that breaks, stalls, crawls or is fed garbage.

What must not be lost: every write the host made. The host keeps being served while the link is
down; the journal holds the backlog and the link resumes by itself, sending only what the
secondary lacks (no resync while the journal still holds it); when the journal overflows, only
the dirty regions are copied; a fan-out peer that is cut off never holds back the others; and a
secondary fed garbage or truncated frames refuses them, applies nothing of them and keeps
serving real sources. Every scenario ends with a byte-for-byte comparison of the replica.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from crc32c import crc32c

from blockmirror.journal.format import Kind, RecordHeader
from blockmirror.journal.lineage import Lineage
from blockmirror.link.auth import new_nonce
from blockmirror.link.protocol import (
    PROTOCOL_VERSION,
    Hello,
    LinkCodec,
    Message,
    Refuse,
    SyncData,
    SyncStart,
    SyncZero,
    Welcome,
    encode,
    encode_records,
)
from blockmirror.state import Role
from tests.support.faultproxy import ThreadedFaultProxy
from tests.support.pair import (
    MiB,
    Site,
    file_hash,
    find_peer,
    fio_args,
    fio_write,
    peer_address,
    qemu_img_compare,
    run_client,
    topology,
    wait_caught_up,
    wait_caught_up_via,
    wait_status,
)
from tests.support.unit_process import admin_request, require_commands

pytestmark = pytest.mark.fault

VOLUME_SIZE = 64 * MiB


@pytest.fixture(autouse=True)
def _clients() -> None:
    require_commands("fio", "qemu-img", "qemu-io")


@contextmanager
def proxy_to(replica: Site) -> Iterator[ThreadedFaultProxy]:
    """A fault proxy in front of the replica's listener; stopped (all sockets closed) on exit."""
    assert replica.listen_port is not None
    proxy = ThreadedFaultProxy(("127.0.0.1", replica.listen_port))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def proxy_address(proxy: ThreadedFaultProxy) -> str:
    return f"127.0.0.1:{proxy.port}"


def qemu_write(url: str, offset: int, length: int, pattern: int) -> None:
    proc = run_client(
        ["qemu-io", "-f", "raw", url, "-c", f"write -P {pattern:#x} {offset} {length}"],
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@contextmanager
def background(args: list[str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """A client running while the test watches; killed by its PID if still running at exit."""
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def finish(proc: subprocess.Popen[str], timeout: float = 120.0) -> str:
    """Wait for a background fio; fails unless it exits 0 with no I/O error."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0 and "err= 0" in out, out
    return out


def journal_alerts(site: Site) -> list[str]:
    return [a["kind"] for a in site.volume_status()["journal"]["alerts"]]


# --- a cut the journal rides out ------------------------------------------------------------------


def test_cut_link_journal_holds_backlog_and_link_resumes_without_resync(tmp_path: Path) -> None:
    """The host writes 32 MiB while every connection to the secondary is reset. Its writes
    complete; the backlog grows in the journal (big enough for it); after heal() the sender
    reconnects by itself and streams exactly the backlog: no resync, consumer mode "journal"
    throughout, and the replica ends identical."""
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        with proxy_to(b) as proxy:
            via = proxy_address(proxy)
            a = topo.add_primary("site-a", peers=[via], journal_size="256MiB")
            b.start()
            primary = a.start()
            wait_caught_up_via(a, b, via)  # the initial (full) sync of a new replica
            before = find_peer(a, via)
            assert before["mode"] == "journal" and before["lag_bytes"] == 0

            proxy.cut()
            wait_status(
                lambda: find_peer(a, via)["state"] != "replicating",
                timeout=15,
                what="the sender to notice the cut",
            )
            up_during_cut = proxy.bytes_up
            samples: list[dict[str, Any]] = []
            with background(
                fio_args(primary.export_url("vol"), size="32M", seed=11), tmp_path
            ) as fio:
                while fio.poll() is None:
                    samples.append(find_peer(a, via))
                    time.sleep(0.2)
                finish(fio)  # the host was served for the whole workload, link down
            cut_status = find_peer(a, via)
            samples.append(cut_status)

            # Nothing crossed the proxy: the proxy really was cut for the whole workload.
            assert proxy.bytes_up == up_during_cut
            assert proxy.connections_refused > 0, "the sender never even tried to reconnect"
            # The backlog only grew, and sat in the journal for this peer.
            lags = [s["lag_bytes"] for s in samples]
            assert lags == sorted(lags), lags
            assert cut_status["lag_bytes"] >= 32 * MiB, cut_status
            assert cut_status["lag_records"] >= 32 * MiB // 4096, cut_status  # one per write
            assert all(s["state"] != "replicating" for s in samples), samples
            assert all(s["mode"] == "journal" for s in samples), samples
            assert cut_status["dirty_bytes"] == 0, cut_status
            rep_cut = b.volume_status()["replica"]

            proxy.heal()
            wait_status(
                lambda: find_peer(a, via)["connects"] > before["connects"],
                timeout=30,
                what="the link to come back by itself",
            )
            rep = wait_caught_up_via(a, b, via)
            after = find_peer(a, via)
            qemu_img_compare(a.images["vol"], b.images["vol"])

        # No resync: the journal held the backlog, so only records crossed.
        assert after["sync_bytes_sent"] == before["sync_bytes_sent"], (before, after)
        assert after["mode"] == "journal"
        assert "consumer_tracking" not in journal_alerts(a)
        assert rep["replica"]["consistent"] is True
        assert rep["replica"]["received_seq"] > rep_cut["received_seq"]
        resent = after["bytes_sent"] - cut_status["bytes_sent"]
        assert resent <= cut_status["lag_bytes"] * 1.05 + MiB, (resent, cut_status)
        assert resent >= 32 * MiB, (resent, cut_status)


# --- a cut the journal cannot ride out -----------------------------------------------------------


def test_journal_overflow_during_cut_resyncs_only_dirty_regions(tmp_path: Path) -> None:
    """A 4 MiB journal and 16 MiB of host writes (to the first 16 MiB of a 64 MiB volume) while
    the link is cut: the peer is switched to dirty-region tracking with an alert, the host is
    still served, and after heal() the catch-up sends no more than the dirty regions plus what
    the journal still holds for the peer (plus framing), far less than a full copy."""
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        with proxy_to(b) as proxy:
            via = proxy_address(proxy)
            a = topo.add_primary("site-a", peers=[via], journal_size="4MiB")
            b.start()
            primary = a.start()
            wait_caught_up_via(a, b, via)

            proxy.cut()
            wait_status(
                lambda: find_peer(a, via)["state"] != "replicating",
                timeout=15,
                what="the sender to notice the cut",
            )
            fio_write(primary.export_url("vol"), tmp_path, size="16M", seed=12)

            journal = a.volume_status()["journal"]
            peer = find_peer(a, via)
            assert peer["mode"] == "tracking", peer
            assert "consumer_tracking" in [x["kind"] for x in journal["alerts"]], journal
            dirty = peer["dirty_bytes"]
            backlog = journal["consumers"][via]["backlog_bytes"]
            assert 0 < dirty <= 16 * MiB, peer
            sent_before = peer["bytes_sent"]
            sync_before = peer["sync_bytes_sent"]

            proxy.heal()
            rep = wait_caught_up_via(a, b, via)
            after = find_peer(a, via)
            qemu_img_compare(a.images["vol"], b.images["vol"])

        catch_up = after["bytes_sent"] - sent_before
        bound = (dirty + backlog) * 1.05 + MiB
        assert catch_up <= bound, (catch_up, dirty, backlog)
        copied = after["sync_bytes_sent"] - sync_before
        assert 0 < copied <= dirty, (copied, dirty)  # the dirty regions, not the whole volume
        assert after["mode"] == "journal" and after["dirty_bytes"] == 0, after
        assert rep["replica"]["consistent"] is True


# --- a link that misbehaves without breaking for good ---------------------------------------------


@pytest.mark.parametrize("fault", ["stall", "dribble", "reset_after", "bandwidth"])
def test_misbehaving_link_still_ends_identical(tmp_path: Path, fault: str) -> None:
    """Records stream through a link that stalls, delivers in odd slices, resets every
    connection after a few hundred KiB (mid-frame) or crawls. Each fault is shown to have been
    in effect; whatever arrived torn was not applied, and the replica ends identical."""
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        with proxy_to(b) as proxy:
            via = proxy_address(proxy)
            a = topo.add_primary("site-a", peers=[via])
            b.start()
            primary = a.start()
            wait_caught_up_via(a, b, via)
            url = primary.export_url("vol")
            start = find_peer(a, via)
            accepted = proxy.connections_accepted

            if fault == "stall":
                # Shorter than the 10 s idle timeout: the same connection must carry on.
                proxy.stall(True)
                stalled_at = time.monotonic()
                received = b.volume_status()["replica"]["received_seq"]
                fio_write(url, tmp_path, size="8M", bs="16k", seed=21)
                stalled = find_peer(a, via)
                assert stalled["lag_bytes"] >= 8 * MiB, stalled
                assert b.volume_status()["replica"]["received_seq"] == received
                time.sleep(max(0.0, stalled_at + 3.0 - time.monotonic()))
                assert b.volume_status()["replica"]["received_seq"] == received
                proxy.stall(False)
                wait_caught_up_via(a, b, via)
                assert find_peer(a, via)["connects"] == start["connects"]
            elif fault == "dribble":
                # Frames arrive in slices that never line up with frame or record boundaries;
                # ACKs come back a few bytes at a time.
                proxy.dribble(1021, 0.0, "up")
                proxy.dribble(7, 0.0, "down")
                fio_write(url, tmp_path, size="4M", bs="4k", seed=22)
                qemu_write(url, 5 * MiB + 512, 3 * MiB + 1536, 0x3C)  # split into records
                wait_caught_up_via(a, b, via, timeout=60)
                assert find_peer(a, via)["connects"] == start["connects"]
            elif fault == "reset_after":
                # Every connection is reset after 256 KiB towards the secondary: frames are cut
                # in the middle again and again, and the sender resumes from the last ACK.
                proxy.reset_after(256 * 1024, "up")
                fio_write(url, tmp_path, size="8M", bs="64k", seed=23)
                wait_status(
                    lambda: proxy.connections_accepted >= accepted + 3,
                    timeout=30,
                    what="three connections to be reset",
                )
                proxy.reset_after(None)
                wait_caught_up_via(a, b, via, timeout=60)
                assert find_peer(a, via)["connects"] >= start["connects"] + 3
            elif fault == "bandwidth":
                rate = 2 * MiB
                proxy.set_bandwidth(rate, "up")
                began = time.monotonic()
                fio_write(url, tmp_path, size="8M", bs="16k", seed=24, verify=False)
                lagging = find_peer(a, via)
                # The host is not held to the link's pace: the backlog waits in the journal.
                # At most rate * elapsed crossed the link (plus what sits in buffers, < 2 MiB).
                crossed = rate * (time.monotonic() - began) + 2 * MiB
                assert lagging["lag_bytes"] > 0, lagging
                assert lagging["lag_bytes"] >= 8 * MiB - crossed, (lagging, crossed)
                wait_caught_up_via(a, b, via, timeout=60)
                took = time.monotonic() - began
                assert took >= 8 * MiB / rate * 0.8, took  # the limit was really in force
                assert find_peer(a, via)["connects"] == start["connects"]
            else:  # pragma: no cover
                raise AssertionError(fault)
            proxy.clear()
            qemu_img_compare(a.images["vol"], b.images["vol"])
            end = find_peer(a, via)
            assert end["sync_bytes_sent"] == start["sync_bytes_sent"], end  # no resync needed
            assert b.volume_status()["replica"]["consistent"] is True


# --- fan-out: one peer cut off, the other keeps up ------------------------------------------------


def test_fan_out_one_peer_cut_other_keeps_up(tmp_path: Path) -> None:
    """A primary with two secondaries, one behind a proxy that is cut. The other one catches up
    with every write while the first is cut; the cut one catches up after heal(); both end
    identical to the primary."""
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        c = topo.add_secondary("site-c")
        with proxy_to(b) as proxy:
            via = proxy_address(proxy)
            direct = peer_address(c)
            a = topo.add_primary("site-a", peers=[via, direct])
            b.start()
            c.start()
            primary = a.start()
            wait_caught_up_via(a, b, via)
            wait_caught_up(a, c)
            c_before = find_peer(a, direct)

            proxy.cut()
            wait_status(
                lambda: find_peer(a, via)["state"] != "replicating",
                timeout=15,
                what="the sender to notice the cut",
            )
            fio_write(primary.export_url("vol"), tmp_path, size="16M", seed=31)
            rep_c = wait_caught_up(a, c, timeout=60)  # not held back by the cut peer
            newest = a.volume_status()["journal"]["newest_seq"]
            cut_peer = find_peer(a, via)
            assert cut_peer["state"] != "replicating" and cut_peer["lag_bytes"] >= 16 * MiB
            assert b.volume_status()["replica"]["received_seq"] < newest
            assert rep_c["replica"]["applied_seq"] >= newest
            c_during = find_peer(a, direct)
            assert c_during["connects"] == c_before["connects"], c_during  # never disturbed
            assert c_during["mode"] == "journal" and c_during["last_error"] is None, c_during
            qemu_img_compare(a.images["vol"], c.images["vol"])

            proxy.heal()
            wait_caught_up_via(a, b, via, timeout=60)
            qemu_img_compare(a.images["vol"], b.images["vol"])
            qemu_img_compare(a.images["vol"], c.images["vol"])
            assert find_peer(a, via)["mode"] == "journal"


# --- garbage straight to the secondary's listener -------------------------------------------------


def converse(port: int, chunks: list[bytes], *, timeout: float = 5.0) -> tuple[list[Message], str]:
    """Send ``chunks`` to the listener one by one, reading what comes back in between, then
    half-close and read until the secondary closes the connection.

    Returns the messages it sent and how it ended ("closed" or "reset"); a secondary that keeps
    the connection open past ``timeout`` fails the test. Reading between chunks keeps a REFUSE
    that arrives early from being lost to the reset a close with unread data causes.
    """
    codec = LinkCodec()
    messages: list[Message] = []
    how = ""

    def read(until: float, *, to_eof: bool) -> None:
        nonlocal how
        while not how:
            left = until - time.monotonic()
            if left <= 0:
                if to_eof:
                    raise AssertionError(f"the secondary kept the connection open: {messages}")
                return
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                how = "reset"
                return
            except TimeoutError:
                continue
            if not chunk:
                how = "closed"
                return
            codec.feed(chunk)
            messages.extend(codec.events())

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for data in chunks:
            if how:
                break
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                how = "reset"
                break
            read(time.monotonic() + 0.2, to_eof=False)
        if not how:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            read(time.monotonic() + timeout, to_eof=True)
    return messages, how


def hello(
    volume: str,
    volume_id: str,
    size: int = VOLUME_SIZE,
    *,
    line: tuple[tuple[str, int, str], ...] = (),
    end_seq: int = 0,
) -> Hello:
    """A HELLO of "mallory", claiming the line of generations ``line`` up to ``end_seq``."""
    lineage = Lineage("mallory", Role.PRIMARY, line, end_seq)
    return Hello(
        PROTOCOL_VERSION, "mallory", volume, volume_id, size, new_nonce(), "none", lineage=lineage
    )


def frame(message: Message) -> bytes:
    return b"".join(bytes(b) for b in encode(message))


def records_frame(first_seq: int, *, count: int = 4, offset: int = 0) -> bytearray:
    """A RECORDS frame of ``count`` 64 KiB writes of 0xEE at ``offset`` (valid CRCs)."""
    payload = b"\xee" * (64 * 1024)
    records = [
        (
            RecordHeader(
                Kind.WRITE,
                first_seq + i,
                time.time_ns(),
                offset + i * len(payload),
                len(payload),
                0,
                len(payload),
            ),
            [payload],
        )
        for i in range(count)
    ]
    return bytearray(b"".join(bytes(b) for b in encode_records(records)))


def corrupt_record_crc(buf: bytearray, record: int = 2) -> bytearray:
    """Flip one payload byte of the ``record``-th record, then fix the frame CRC so only the
    record CRC can catch it."""
    pos = 16 + record * (64 + 64 * 1024) + 64 + 100
    buf[pos] ^= 0xFF
    body = bytes(buf[:12]) + bytes(buf[16:])
    buf[12:16] = crc32c(body).to_bytes(4, "little")
    return buf


@dataclass
class Attack:
    """A secondary whose replica holds data from a primary that has gone away: free for any
    source, with the identity (volume_id) and position a forged stream needs."""

    a: Site
    b: Site
    port: int
    volume_id: str
    received: int
    baseline: str
    # The replica's line of generations: what a source that wants to write it claims.
    line: tuple[tuple[str, int, str], ...] = ()
    pattern: int = 0x20

    def hello(self) -> bytes:
        return frame(hello("vol", self.volume_id, line=self.line, end_seq=self.received))

    def refused(self, chunks: list[bytes], code: str | None = "bad-frame") -> list[Message]:
        """Nothing but a WELCOME (first) and REFUSEs came back, the last REFUSE has ``code``
        (None: a plain close is the answer too), and nothing changed on the secondary."""
        messages, how = converse(self.port, chunks)
        welcomed = bool(messages) and isinstance(messages[0], Welcome)
        rest = messages[1:] if welcomed else messages
        assert all(isinstance(m, Refuse) for m in rest), messages
        if code is not None:
            assert rest and isinstance(rest[-1], Refuse) and rest[-1].code == code, (
                messages,
                how,
            )
        self.unchanged()
        return messages

    def unchanged(self) -> None:
        assert file_hash(self.b.images["vol"], VOLUME_SIZE) == self.baseline
        replica = self.b.volume_status()["replica"]
        assert replica["received_seq"] == self.received, replica

    def real_primary_replicates(self, timeout: float = 60.0) -> None:
        """The daemon is alive and a real primary still replicates through it."""
        assert self.b.unit is not None and self.b.unit.proc.poll() is None
        primary = self.a.unit
        if primary is None or primary.proc.poll() is not None:
            primary = self.a.start()
        self.pattern += 1
        qemu_write(primary.export_url("vol"), 2 * MiB, MiB, self.pattern)
        rep = wait_caught_up(self.a, self.b, timeout=timeout)
        assert rep["replica"]["consistent"] is True
        qemu_img_compare(self.a.images["vol"], self.b.images["vol"])


@contextmanager
def attack(tmp_path: Path) -> Iterator[Attack]:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        a = topo.add_primary("site-a", peers=[peer_address(b)])
        b.start()
        primary = a.start()
        wait_caught_up(a, b)
        qemu_write(primary.export_url("vol"), 0, MiB, 0x11)
        wait_caught_up(a, b)
        status = b.volume_status()
        replica = status["replica"]
        assert replica["volume_id"]
        line = tuple((g["id"], g["start_seq"], g["unit"]) for g in status["generations"])
        a.kill()  # the replica is free for another source now (no "busy")
        wait_status(
            lambda: not b.volume_status()["replica"]["connected"],
            timeout=15,
            what="the secondary to notice the primary is gone",
        )
        assert b.listen_port is not None
        yield Attack(
            a,
            b,
            b.listen_port,
            replica["volume_id"],
            replica["received_seq"],
            file_hash(b.images["vol"], VOLUME_SIZE),
            line,
        )


def test_garbage_and_truncated_frames_are_refused_and_nothing_is_applied(
    tmp_path: Path,
) -> None:
    """Raw sockets send the secondary random bytes, a HELLO with a bad frame CRC, a HELLO then a
    RECORDS frame cut in the middle, and RECORDS with a bad record CRC (for an unknown and for
    the real volume). Each is refused (REFUSE or a closed connection), the replica's bytes do
    not change, the daemon keeps running, and a real primary replicates through it afterwards."""
    with attack(tmp_path) as x:
        good_hello = x.hello()
        # 1. Random bytes: a bad magic (and everything else).
        x.refused([os.urandom(4096)])
        # 2. A valid HELLO whose frame CRC is wrong.
        bad = bytearray(good_hello)
        bad[12] ^= 0x01
        assert not isinstance(x.refused([bytes(bad)])[0], Welcome)
        # 3. A valid HELLO (welcomed), then a RECORDS frame cut in the middle, then EOF: the
        # secondary just sees its source go away; none of the frame is applied.
        whole = bytes(records_frame(x.received + 1))
        messages = x.refused([good_hello, whole[: len(whole) // 2]], None)
        assert isinstance(messages[0], Welcome), messages
        # ... and cut right after the frame header.
        x.refused([good_hello, whole[:16]], None)
        # 4. A bad record CRC after a handshake for a volume the secondary does not hold.
        broken = bytes(corrupt_record_crc(records_frame(x.received + 1)))
        x.refused([frame(hello("nope", x.volume_id)), broken], "unknown-volume")
        # 5. The same for the real volume: welcomed, then the frame is refused whole (its two
        # good records before the bad one are not applied either).
        messages = x.refused([good_hello, broken])
        assert isinstance(messages[0], Welcome), messages
        refusal = messages[-1]
        assert isinstance(refusal, Refuse) and "record 2" in refusal.message, refusal
        # 6. RECORDS before any HELLO, and a second HELLO in the middle of a stream.
        x.refused([whole])
        x.refused([good_hello, good_hello])
        # 7. A SYNC_START with its 'full' flag out of range (the frame CRC is right).
        sync = bytearray(frame(SyncStart(1, True, 0, x.received)))
        sync[16 + 8] = 2
        sync[12:16] = crc32c(bytes(sync[:12]) + bytes(sync[16:])).to_bytes(4, "little")
        x.refused([good_hello, bytes(sync)])
        # 8. A record that does not follow the replica's last one (a gap in the numbering).
        x.refused([good_hello, bytes(records_frame(x.received + 5, count=1))], None)
        # Every one of those connections is over: the replica has no source bound to it.
        assert not x.b.volume_status()["replica"]["connected"]
        x.real_primary_replicates()


# Frames that are well formed (right CRCs) but that no correct source sends. The secondary must
# refuse them without harm, as it does malformed ones (DESIGN.md invariant 7).
OUT_OF_PROTOCOL: dict[str, Callable[[Attack], bytes | bytearray]] = {
    # A write record that ends past the end of the volume. Found: it is journaled first, then
    # its apply raises OutOfRangeError out of JournalWritePath._drain (only OSError is caught),
    # leaving the write path wedged (next_seq already advanced), so every later source is refused
    # "record seq N arrived, N+1 was expected"; the journal cannot be closed at stop, and the
    # unit no longer starts at all (recovery replays the record: "cannot start: ... outside the
    # volume").
    "record-past-the-end": lambda x: records_frame(x.received + 1, count=1, offset=VOLUME_SIZE),
    # A SYNC_ZERO past the end: its apply raises in _drain the same way and stays at the head of
    # the queue; the replica is wedged until restart.
    "sync-zero-past-the-end": lambda x: frame(SyncZero(1, VOLUME_SIZE - 4096, 8192, x.received)),
    # SYNC_DATA with no SYNC_START before it: written into the replica, which status still
    # calls consistent.
    "sync-data-without-sync-start": lambda x: frame(
        SyncData(1, 0, x.received, memoryview(b"\xab" * 4096))
    ),
}


@pytest.mark.parametrize("case", list(OUT_OF_PROTOCOL))
def test_well_formed_frames_outside_the_protocol_are_refused_without_harm(
    tmp_path: Path, case: str
) -> None:
    with attack(tmp_path) as x:
        x.refused([x.hello(), bytes(OUT_OF_PROTOCOL[case](x))], code=None)
        x.real_primary_replicates(timeout=6)
        # And the unit restarts: nothing it journaled from the forged frame stops recovery.
        assert x.b.unit is not None
        assert x.b.unit.terminate() == 0, x.b.unit.log()
        x.b.start()
        x.real_primary_replicates(timeout=6)


# --- resync of regions only the dirty map knows about ---------------------------------------------


def admin_post(site: Site, path: str) -> dict[str, Any]:
    assert site.unit is not None
    code, body = admin_request(site.unit, "POST", path, timeout=5)
    assert code == 200, (code, body)
    return body


def host_writes_only_to_dirty_maps(site: Site, url: str, cwd: Path) -> None:
    """16 MiB of host writes (at 16 MiB) while enqueueing is paused: no journal records, only
    bits in every consumer's dirty map, which a resync must copy."""
    assert admin_post(site, "/api/volumes/vol/journal/pause")["enqueue_paused"] is True
    fio_write(url, cwd, size="16M", offset="16M", bs="64k", seed=41, verify=False)
    assert admin_post(site, "/api/volumes/vol/journal/resume")["enqueue_paused"] is False


def test_dirty_regions_set_while_connected_are_copied(tmp_path: Path) -> None:
    """Writes made while enqueueing is paused exist only as dirty bits; a sender that stays
    connected in journal mode must still copy them, without waiting for a reconnect."""
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        a = topo.add_primary("site-a", peers=[peer_address(b)])
        b.start()
        primary = a.start()
        wait_caught_up(a, b)
        host_writes_only_to_dirty_maps(a, primary.export_url("vol"), tmp_path)
        wait_caught_up(a, b, timeout=5)
        qemu_img_compare(a.images["vol"], b.images["vol"])


def test_resync_after_primary_restart_is_not_acknowledged_by_a_stale_ack(tmp_path: Path) -> None:
    """The replica's last full sync acknowledged SYNC lsn 66. The primary restarts with regions
    to copy and a slow link (3 s one way): the secondary's periodic ACK, sent before the new
    SYNC_START reaches it, still says sync_lsn 66. The link is cut before the copy arrives.
    After it heals, the copy must still be made."""
    delay = 3.0
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        with proxy_to(b) as proxy:
            via = proxy_address(proxy)
            a = topo.add_primary("site-a", peers=[via])
            b.start()
            primary = a.start()
            wait_caught_up_via(a, b, via)  # full sync of 64 MiB: SYNC lsn 1..66
            proxy.cut()
            wait_status(
                lambda: find_peer(a, via)["state"] != "replicating",
                timeout=15,
                what="the sender to notice the cut",
            )
            host_writes_only_to_dirty_maps(a, primary.export_url("vol"), tmp_path)
            assert a.unit is not None and a.unit.terminate() == 0
            a.start()  # a new sender: its SYNC lsn starts at 1 again
            assert find_peer(a, via)["dirty_bytes"] == 16 * MiB
            accepted = proxy.connections_accepted
            proxy.set_delay(delay, direction="up")
            proxy.heal()
            wait_status(
                lambda: proxy.connections_accepted > accepted and proxy.active_connections > 0,
                timeout=30,
                what="the primary to reconnect",
            )
            # Cut while the copy is still in the proxy's delay line: once the sender thinks it
            # was acknowledged, or just before it could arrive.
            connected = time.monotonic()
            wait_status(
                lambda: (
                    find_peer(a, via)["dirty_bytes"] == 0
                    or time.monotonic() > connected + delay + 1.8
                ),
                timeout=delay + 5,
                what="the resync to be acknowledged or the cut deadline",
            )
            proxy.cut()
            assert not b.volume_status()["replica"]["syncing"]  # SYNC_START never arrived
            proxy.clear()
            wait_caught_up_via(a, b, via, timeout=30)
            qemu_img_compare(a.images["vol"], b.images["vol"])
