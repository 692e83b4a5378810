"""Bad iSCSI input (issue 12): each gets the RFC's answer or a clean close, nothing partial is
applied, and the unit keeps serving.

What must not happen, and is checked: a malformed or out-of-sequence PDU changing the volume,
a refused command's data reaching the file, the target answering an out-of-window CmdSN, a
header digest error being read past, or a thousand idle connections denying a real initiator.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blockmirror.frontend import iscsi_pdu as p
from blockmirror.frontend.iscsi_framing import encode_bytes
from tests.e2e.test_iscsi import TARGET, serve_iscsi
from tests.support.failover import role_change
from tests.support.iscsi import run
from tests.support.iscsi_client import Initiator
from tests.support.pair import MiB, Site, peer_address, topology, wait_caught_up, wait_status

pytestmark = pytest.mark.fault

SIZE = 16 * MiB
TUR = b"\x00"  # TEST UNIT READY


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


@contextmanager
def target_unit(tmp_path: Path) -> Iterator[tuple[Site, int]]:
    with topology(tmp_path) as topo:
        a = topo.add_primary("site-a", peers=[], size=SIZE)
        port = serve_iscsi(a)
        a.start()
        yield a, port


def volume_bytes(site: Site, offset: int, length: int) -> bytes:
    with open(site.images["vol"], "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_malformed_and_out_of_sequence_pdus(tmp_path: Path) -> None:
    with target_unit(tmp_path) as (a, port):
        ini = Initiator("127.0.0.1", port, TARGET)
        try:
            ini.login()
            assert ini.status_of(ini.command(TUR))[0] == 0
            # An unknown opcode: Reject (0x05, command not supported), the connection goes on.
            bad = bytearray(encode_bytes(p.NopOut(itt=ini.next_itt(), cmd_sn=ini.cmd_sn)))
            bad[0] = 0x1D
            ini.send_raw(bytes(bad))
            reject = ini.receive()
            assert isinstance(reject, p.Reject), reject
            assert ini.status_of(ini.command(TUR))[0] == 0
            # An ExpStatSN acknowledging status never sent: rejected (protocol error).
            ahead = dataclasses.replace(ini.command(TUR), exp_stat_sn=ini.exp_stat_sn + 1000)
            ini.send(ahead)
            refused = ini.receive()
            assert isinstance(refused, p.Reject) and refused.reason == 0x04, refused
            ini.cmd_sn -= 1  # the rejected command did not take its CmdSN
            assert ini.status_of(ini.command(TUR))[0] == 0
            # A CmdSN far outside the window: dropped, never answered.
            stray = ini.command(write10(0, 1), write=b"x" * 512, cmd_sn=ini.cmd_sn + 100_000)
            ini.send(stray)
            status, _ = ini.status_of(ini.command(TUR))  # the next answer is this one's
            assert status == 0
            assert volume_bytes(a, 0, 512) == bytes(512)
            # Data-Out at the wrong offset: the command is refused and nothing is written.
            cmd = p.ScsiCommand(
                itt=ini.next_itt(),
                cdb=write10(8, 2).ljust(16, b"\0"),
                expected_length=1024,
                cmd_sn=ini.cmd_sn,
                write=True,
                final=True,
            )
            ini.cmd_sn += 1
            ini.send(cmd)
            r2t = ini.receive()
            assert isinstance(r2t, p.R2T), r2t
            ini.send(p.DataOut(itt=cmd.itt, ttt=r2t.ttt, buffer_offset=512, data=(b"y" * 512,)))
            answer = ini.receive()
            assert isinstance(answer, p.ScsiResponse) and answer.status == 2, answer
            assert volume_bytes(a, 8 * 512, 1024) == bytes(1024)
            # A good write and read back, on the same connection.
            assert ini.status_of(ini.command(write10(16, 1), write=b"z" * 512))[0] == 0
            status, data = ini.status_of(ini.command(read10(16, 1), read=512))
            assert status == 0 and data == b"z" * 512
        finally:
            ini.close()
        assert a.volume_status()["state"] == "serving"


def test_a_header_digest_error_closes_the_connection(tmp_path: Path) -> None:
    with target_unit(tmp_path) as (a, port):
        ini = Initiator("127.0.0.1", port, TARGET)
        try:
            ini.login(header_digest=True)
            assert ini.status_of(ini.command(TUR))[0] == 0
            frame = bytearray(
                encode_bytes(ini.command(write10(0, 1), write=b"q" * 512), ini.digests)
            )
            frame[48] ^= 0xFF  # the header digest
            ini.send_raw(bytes(frame))
            assert ini.receive() is None  # closed: nothing after a bad header can be trusted
        finally:
            ini.close()
        assert volume_bytes(a, 0, 512) == bytes(512)
        again = Initiator("127.0.0.1", port, TARGET)
        try:
            again.login()
            # The same initiator port again: it first hears that its nexus was lost (a unit
            # attention, CHECK CONDITION), then the unit answers as usual.
            assert again.status_of(again.command(TUR))[0] == 2
            assert again.status_of(again.command(TUR))[0] == 0
        finally:
            again.close()


def test_a_thousand_connects_leave_the_target_serving(tmp_path: Path) -> None:
    with target_unit(tmp_path) as (a, port):
        idle: list[socket.socket] = []
        try:
            for _ in range(1000):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                if len(idle) < 300:
                    idle.append(s)  # held open, saying nothing
                else:
                    s.sendall(b"\0" * 48)  # half a login, then gone
                    s.close()
            cap = run(["iscsi-readcapacity16", f"iscsi://127.0.0.1:{port}/{TARGET}/0"], timeout=60)
            # Past the connection cap the oldest of those not logged in gives way: a real
            # initiator gets in while 300 idle connections are held.
            assert cap.returncode == 0, cap.stderr
        finally:
            for s in idle:
                s.close()
        cap = run(["iscsi-readcapacity16", f"iscsi://127.0.0.1:{port}/{TARGET}/0"], timeout=60)
        assert cap.returncode == 0 and f"Total size:{SIZE}" in cap.stdout, cap.stderr
        assert a.volume_status()["state"] == "serving"


def test_kill_9_during_fua_writes_keeps_every_acknowledged_one(tmp_path: Path) -> None:
    """Distinct FUA writes, one block each, acknowledged one by one, while another thread
    sends ``kill -9`` to the unit. After a restart (the journal replayed), every acknowledged
    block holds its data; the one in flight may or may not."""
    with target_unit(tmp_path) as (a, port):
        assert a.unit is not None
        ini = Initiator("127.0.0.1", port, TARGET)
        acknowledged: list[int] = []
        killer = threading.Timer(0.5, a.unit.kill)
        try:
            ini.login()
            killer.start()
            for n in range(100_000):
                cdb = bytearray(write10(n * 8 % (SIZE // 512), 1))
                cdb[1] = 0x08  # FUA
                try:
                    status, _ = ini.status_of(
                        ini.command(bytes(cdb), write=struct.pack(">I", n) * 128)
                    )
                except (AssertionError, OSError):
                    break  # the unit is gone
                assert status == 0
                acknowledged.append(n)
        finally:
            killer.cancel()
            killer.join()
            ini.close()
        assert len(acknowledged) > 10, "the kill came before any write"
        a.start()
        # The newest acknowledged write of each block is there.
        newest: dict[int, int] = {}
        for n in acknowledged:
            newest[n * 8 % (SIZE // 512)] = n
        for lba, n in newest.items():
            assert volume_bytes(a, lba * 512, 512) == struct.pack(">I", n) * 128, (lba, n)
        assert a.volume_status()["state"] == "serving"


def test_a_secondary_is_write_protected(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE)
        port = serve_iscsi(b)
        b.start()
        a.start()
        assert a.unit is not None
        run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x44 0 64k", a.unit.export_url("vol")],
            timeout=30,
        )
        wait_caught_up(a, b)
        ini = Initiator("127.0.0.1", port, TARGET)
        try:
            ini.login()
            status, data = ini.status_of(ini.command(read10(0, 1), read=512))
            assert status == 0 and data == b"\x44" * 512  # the replica reads
            status, _ = ini.status_of(ini.command(write10(0, 1), write=b"w" * 512))
            assert status == 2  # CHECK CONDITION: DATA PROTECT, WRITE PROTECTED
            assert volume_bytes(b, 0, 512) == b"\x44" * 512
            # The primary is lost; once B is promoted, the same target takes writes.
            a.kill()
            out = role_change(b, "promote")
            assert out.returncode == 0, out.stdout + out.stderr
            wait_status(
                lambda: b.volume_status()["role"] == "primary" or None,
                timeout=30,
                what="B to be primary",
            )
            status, _ = ini.status_of(ini.command(write10(0, 1), write=b"w" * 512))
            assert status == 0
        finally:
            ini.close()
        assert volume_bytes(b, 0, 512) == b"w" * 512


def test_two_connections_share_one_session_and_its_command_window(tmp_path: Path) -> None:
    with target_unit(tmp_path) as (a, port):
        first = Initiator("127.0.0.1", port, TARGET)
        second = Initiator("127.0.0.1", port, TARGET)
        try:
            keys = first.login(max_connections=2)
            assert keys.get("MaxConnections") == "2", keys
            assert first.status_of(first.command(TUR))[0] == 0
            second.cmd_sn = first.cmd_sn  # one session: one CmdSN sequence
            second.login(tsih=first.tsih, cid=1)
            assert second.tsih == first.tsih
            assert a.volume_status()["iscsi"] == {
                "target": TARGET,
                "sessions": 1,
                "connections": 2,
            }
            assert second.status_of(second.command(write10(0, 1), write=b"m" * 512))[0] == 0
            first.cmd_sn = second.cmd_sn
            status, data = first.status_of(first.command(read10(0, 1), read=512))
            assert status == 0 and data == b"m" * 512
            # A third would exceed the MaxConnections negotiated.
            third = Initiator("127.0.0.1", port, TARGET)
            try:
                with pytest.raises(AssertionError):
                    third.login(tsih=first.tsih, cid=2)
            finally:
                third.close()
        finally:
            first.close()
            second.close()
