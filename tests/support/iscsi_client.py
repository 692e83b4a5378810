"""A minimal iSCSI initiator for fault tests: it logs in (no CHAP) and then sends whatever PDU
a test builds, well-formed or not, built with the target's own codec and read back with it."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from blockmirror.frontend import iscsi_pdu as p
from blockmirror.frontend.iscsi_framing import NO_DIGESTS, Digests, PduReader, encode_bytes
from blockmirror.frontend.iscsi_text import decode_text, encode_text

ISID = 0x400001370000


@dataclass
class Initiator:
    host: str
    port: int
    target: str
    name: str = "iqn.2026-12.test.blockmirror:initiator"
    sock: socket.socket = field(init=False)
    reader: PduReader = field(init=False)
    digests: Digests = NO_DIGESTS
    cmd_sn: int = 1
    itt: int = 1
    exp_stat_sn: int = 0
    tsih: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), timeout=10)
        self.reader = PduReader(from_initiator=False)

    def close(self) -> None:
        self.sock.close()

    def send(self, pdu: Any) -> None:
        self.sock.sendall(encode_bytes(pdu, self.digests))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self, timeout: float = 10.0) -> Any:
        """The next PDU, or None when the target closed the connection."""
        self.sock.settimeout(timeout)
        while True:
            pdu = self.reader.next_pdu()
            if pdu is not None:
                stat_sn = getattr(pdu, "stat_sn", None)
                if stat_sn is not None and not isinstance(pdu, p.R2T):
                    self.exp_stat_sn = (stat_sn + 1) & 0xFFFFFFFF
                return pdu
            data = self.sock.recv(65536)
            if not data:
                return None
            self.reader.feed(data)

    def login(
        self,
        *,
        header_digest: bool = False,
        data_digest: bool = False,
        tsih: int = 0,
        cid: int = 0,
        max_connections: int = 1,
    ) -> Any:
        keys = [
            ("InitiatorName", self.name),
            ("TargetName", self.target),
            ("SessionType", "Normal"),
            ("HeaderDigest", "CRC32C" if header_digest else "None"),
            ("DataDigest", "CRC32C" if data_digest else "None"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "Yes"),
        ]
        if tsih == 0:
            keys.append(("MaxConnections", str(max_connections)))
        self.send(
            p.LoginRequest(
                isid=ISID,
                tsih=tsih,
                cid=cid,
                itt=self.next_itt(),
                csg=p.Stage.OPERATIONAL,
                nsg=p.Stage.FULL_FEATURE,
                transit=True,
                cmd_sn=self.cmd_sn,
                data=(encode_text(keys),),
            )
        )
        answer = self.receive()
        assert isinstance(answer, p.LoginResponse), answer
        assert answer.status_class == 0, (answer.status_class, answer.status_detail)
        self.tsih = answer.tsih
        if answer.transit and answer.nsg == p.Stage.FULL_FEATURE:
            self.digests = Digests(header_digest, data_digest)
            self.reader.digests = self.digests
            self.reader.max_data_segment = 1 << 24
        return dict(decode_text(p.payload(answer.data), unique=False))

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    def command(
        self, cdb: bytes, *, read: int = 0, write: bytes = b"", cmd_sn: int | None = None
    ) -> p.ScsiCommand:
        """A SCSI Command with its write data as immediate data."""
        cmd = p.ScsiCommand(
            itt=self.next_itt(),
            cdb=cdb.ljust(16, b"\0"),
            expected_length=read or len(write),
            cmd_sn=self.cmd_sn if cmd_sn is None else cmd_sn,
            exp_stat_sn=self.exp_stat_sn,
            read=bool(read),
            write=bool(write),
            data=(write,) if write else (),
        )
        if cmd_sn is None:
            self.cmd_sn += 1
        return cmd

    def status_of(self, cmd: p.ScsiCommand) -> tuple[int, bytes]:
        """Send ``cmd`` and gather its answer: (SCSI status, data-in)."""
        self.send(cmd)
        data = b""
        while True:
            pdu = self.receive()
            assert pdu is not None, "the target closed the connection"
            if isinstance(pdu, p.DataIn) and pdu.itt == cmd.itt:
                data += p.payload(pdu.data)
                if pdu.status is not None:
                    return pdu.status, data
            elif isinstance(pdu, p.ScsiResponse) and pdu.itt == cmd.itt:
                return pdu.status, data
