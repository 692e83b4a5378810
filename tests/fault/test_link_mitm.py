"""A man in the middle of a pre-shared-key link without TLS (issue 7, point 15).

What must not be lost: the replica and the meaning of ``ack = "remote"``. A proxy between the
units that understands the link protocol rewrites a byte of a record on its way to the secondary
(fixing the record and frame CRCs, as any attacker would), or swallows a write's records and
forges the ACK for them. The link must refuse the session, say so in status, never let forged
bytes reach the replica, never release an ``ack = "remote"`` write the secondary does not hold,
and, once the proxy is honest again, heal to a replica equal to the source byte for byte.

The proxy parses what it can: plain frames (16-byte header) and sealed records (12-byte header),
whose length field sits at the same offset. On a sealed session it can only flip ciphertext or
inject frames of its own; on the old, unsealed protocol it rewrites records undetectably.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest

from blockmirror.journal.format import HEADER_SIZE, Kind, decode_header, encode_header, record_size
from blockmirror.journal.lineage import fixed_lineage
from blockmirror.link.protocol import Ack, FrameType, encode, encode_raw_records
from blockmirror.state import Role
from tests.support.pair import (
    MiB,
    Site,
    file_hash,
    find_peer,
    qemu_img_compare,
    run_client,
    topology,
    wait_caught_up_via,
    wait_status,
)
from tests.support.unit_process import require_commands

pytestmark = pytest.mark.fault

VOLUME_SIZE = 64 * MiB
SEALED = 13
BIG = 64 * 1024  # frames at least this large carry the host's write (heartbeats, ACKs do not)
Mode = Literal["honest", "flip", "forge-ack", "replay-ack"]


class MitmProxy:
    """A frame-aware TCP proxy on 127.0.0.1 in a thread of its own."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode: Mode = "honest"
        self.flipped = 0
        self.forged = 0
        self.replayed = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10)

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            ureader, uwriter = await asyncio.open_connection(*self.upstream)
        except OSError:
            cwriter.transport.abort()
            return
        self._writers |= {cwriter, uwriter}
        state = {"swallow": False}
        try:
            await asyncio.gather(
                self._pump(creader, uwriter, cwriter, "up", state),
                self._pump(ureader, cwriter, uwriter, "down", state),
            )
        except (OSError, asyncio.IncompleteReadError, EOFError):
            pass
        finally:
            for w in (cwriter, uwriter):
                w.transport.abort()
                self._writers.discard(w)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        back: asyncio.StreamWriter,
        way: str,
        state: dict[str, bool],
    ) -> None:
        while True:
            head = await reader.readexactly(12)
            sealed = head[4] == SEALED
            length = struct.unpack_from("<I", head, 8)[0]
            rest = await reader.readexactly(length + (0 if sealed else 4))
            frame = head + rest
            out = self._up(frame, sealed, back, state) if way == "up" else frame
            if out is None:
                continue
            writer.write(out)
            if (
                way == "down"
                and self.mode == "replay-ack"
                and (sealed or frame[4] == FrameType.ACK)
            ):
                # What the secondary sent (an ACK, or a sealed record that may hold one), twice.
                writer.write(out)
                self.replayed += 1
            await writer.drain()

    def _up(
        self, frame: bytes, sealed: bool, back: asyncio.StreamWriter, state: dict[str, bool]
    ) -> bytes | None:
        if state["swallow"]:
            return None
        mode = self.mode
        if mode not in ("flip", "forge-ack") or len(frame) < BIG:
            return frame
        if mode == "flip":
            if sealed:
                forged = bytearray(frame)
                forged[len(frame) // 2] ^= 0x01
                self.flipped += 1
                return bytes(forged)
            if frame[4] == FrameType.RECORDS:
                self.flipped += 1
                return rewrite_records(frame[16:])
            return frame
        # forge-ack: the write's records never reach the secondary; its "ACK" comes from us.
        state["swallow"] = True
        durable = last_seq(frame[16:]) if not sealed and frame[4] == FrameType.RECORDS else 1 << 20
        back.write(b"".join(bytes(b) for b in encode(Ack(durable, durable, 0))))
        self.forged += 1
        return None


def rewrite_records(raw: bytes) -> bytes:
    """The RECORDS payload with the first byte of every write payload flipped, the record CRCs
    and the frame CRC recomputed: what the old protocol cannot tell from the real thing."""
    out = bytearray()
    pos = 0
    while pos < len(raw):
        h = decode_header(raw[pos : pos + HEADER_SIZE])
        size = record_size(h.payload_len)
        payload = bytearray(raw[pos + HEADER_SIZE : pos + HEADER_SIZE + h.payload_len])
        if h.kind == Kind.WRITE and payload:
            payload[0] ^= 0x01
        out += encode_header(h, [bytes(payload)]) + payload
        out += bytes(size - HEADER_SIZE - h.payload_len)
        pos += size
    return b"".join(bytes(b) for b in encode_raw_records(bytes(out)))


def last_seq(raw: bytes) -> int:
    pos, seq = 0, 0
    while pos < len(raw):
        h = decode_header(raw[pos : pos + HEADER_SIZE])
        seq = h.seq
        pos += record_size(h.payload_len)
    return seq


@contextlib.contextmanager
def mitm(replica: Site) -> Iterator[MitmProxy]:
    assert replica.listen_port is not None
    proxy = MitmProxy(("127.0.0.1", replica.listen_port))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def write_key(path: Path) -> str:
    path.write_text("correct horse battery staple 42\n")
    path.chmod(0o600)
    return str(path)


def host_write(site: Site, offset: int, pattern: int, length: str, *, fua: bool = False) -> float:
    assert site.unit is not None
    flags = "-f " if fua else ""
    began = time.monotonic()
    proc = run_client(
        [
            "qemu-io", "-f", "raw", site.unit.export_url("vol"),
            "-c", f"write {flags}-P {pattern:#x} {offset} {length}",
        ],
        timeout=90,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return time.monotonic() - began


def read_image(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.fixture(autouse=True)
def _clients() -> None:
    require_commands("qemu-io", "qemu-img")


def test_rewritten_record_is_refused_and_never_reaches_the_replica(tmp_path: Path) -> None:
    key = write_key(tmp_path / "psk")
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", replication={"psk_file": key})
        with mitm(b) as proxy:
            via = f"127.0.0.1:{proxy.port}"
            a = topo.add_primary("site-a", peers=[via], replication={"psk_file": key})
            b.start()
            a.start()
            host_write(a, 0, 0x11, "1M")
            wait_caught_up_via(a, b, via)

            proxy.mode = "flip"
            offset = 4 * MiB
            host_write(a, offset, 0x5A, "1M")
            forged = bytes([0x5A ^ 0x01]) + bytes([0x5A]) * (64 * 1024 - 1)

            def refusal() -> str:
                return str(b.volume_status()["replica"]["last_refusal"] or "")

            def holds_forgery() -> bool:
                return read_image(b.images["vol"], offset, len(forged)) == forged

            # Until the secondary refuses, or (the old, unsealed protocol) takes the forgery.
            wait_status(
                lambda: (
                    proxy.flipped >= 1 and (refusal().startswith("integrity") or holds_forgery())
                ),
                timeout=20,
                what="the tampered frame to be refused or applied",
            )
            assert not holds_forgery(), "the replica holds the forged bytes"
            # Both ends say why, clearly: the secondary in the replica's status, the primary
            # in the peer's.
            assert refusal().startswith("integrity"), refusal()
            assert "failed authentication" in refusal(), refusal()
            wait_status(
                lambda: "integrity" in (find_peer(a, via)["last_error"] or ""),
                timeout=20,
                what="the primary to report the integrity refusal",
            )
            assert proxy.flipped >= 1
            # Tampered with on every attempt: the replica never holds a forged byte.
            time.sleep(1.0)
            assert read_image(b.images["vol"], offset, len(forged)) != forged
            assert (
                b.volume_status()["replica"]["received_seq"]
                < (a.volume_status()["journal"]["newest_seq"])
            )

            proxy.mode = "honest"
            wait_caught_up_via(a, b, via)
            qemu_img_compare(a.images["vol"], b.images["vol"])
            assert file_hash(a.images["vol"], VOLUME_SIZE) == file_hash(
                b.images["vol"], VOLUME_SIZE
            )
            assert read_image(b.images["vol"], offset, 2) == b"\x5a\x5a"


def test_forged_ack_does_not_release_a_remote_ack_write(tmp_path: Path) -> None:
    key = write_key(tmp_path / "psk")
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", replication={"psk_file": key})
        with mitm(b) as proxy:
            via = f"127.0.0.1:{proxy.port}"
            a = topo.add_primary(
                "site-a",
                peers=[via],
                replication={"psk_file": key},
                extra={"ack": "remote", "ack_timeout": 60.0},
            )
            b.start()
            a.start()
            host_write(a, 0, 0x11, "1M")
            wait_caught_up_via(a, b, via)

            proxy.mode = "forge-ack"
            result: dict[str, object] = {}

            def write() -> None:
                try:
                    result["took"] = host_write(a, 8 * MiB, 0x77, "256k", fua=True)
                    # The moment the host hears "done", the secondary must hold the write.
                    result["received"] = b.volume_status()["replica"]["received_seq"]
                    result["newest"] = a.volume_status()["journal"]["newest_seq"]
                except BaseException as exc:
                    result["error"] = exc

            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            # Until the primary refuses the forgery, or (the old protocol) the write returns.
            wait_status(
                lambda: (
                    proxy.forged >= 1
                    and (
                        "integrity" in (find_peer(a, via)["last_error"] or "")
                        or not writer.is_alive()
                    )
                ),
                timeout=20,
                what="the forged ACK to be refused or taken",
            )
            if not writer.is_alive():
                peer = find_peer(a, via)
                raise AssertionError(
                    f"the forged ACK released the write: {result}; forged {proxy.forged}; "
                    f"ack {a.volume_status()['journal']['ack']}; peer acked "
                    f"{peer['acked_seq']}, state {peer['state']}, error {peer['last_error']}"
                )
            # Forged on every attempt: the write is still waiting for the secondary.
            time.sleep(1.0)
            assert writer.is_alive(), result
            assert (
                b.volume_status()["replica"]["received_seq"]
                < (a.volume_status()["journal"]["newest_seq"])
            )

            proxy.mode = "honest"
            writer.join(60)
            assert not writer.is_alive() and "error" not in result, result
            received, newest = result["received"], result["newest"]
            assert isinstance(received, int) and isinstance(newest, int)
            assert received >= newest, result
            assert a.volume_status()["journal"]["ack"]["mode"] == "remote"
            wait_caught_up_via(a, b, via)
            qemu_img_compare(a.images["vol"], b.images["vol"])


def test_psk_secondary_refuses_a_source_that_does_not_seal(tmp_path: Path) -> None:
    """Secure by default: with a key and no TLS, a HELLO without the sealed-session offer (an
    older unit, or an offer stripped on the way) is refused with a clear code."""
    key = write_key(tmp_path / "psk")
    from blockmirror.link.auth import new_nonce
    from blockmirror.link.protocol import PROTOCOL_VERSION, Hello, LinkCodec, Refuse

    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", replication={"psk_file": key})
        b.start()
        assert b.listen_port is not None
        lineage = fixed_lineage("old", Role.PRIMARY, 0)
        hello = Hello(
            PROTOCOL_VERSION,
            "old",
            "vol",
            "j",
            VOLUME_SIZE,
            new_nonce(),
            "psk",
            None,
            lineage=lineage,
        )
        codec = LinkCodec()
        with socket.create_connection(("127.0.0.1", b.listen_port), timeout=5) as sock:
            sock.sendall(b"".join(bytes(x) for x in encode(hello)))
            while (event := codec.next_event()) is None:
                data = sock.recv(65536)
                assert data, "closed without a REFUSE"
                codec.feed(data)
        assert isinstance(event, Refuse) and event.code == "crypto-required", event
        refusal = b.volume_status()["replica"]["last_refusal"]
        assert refusal is not None and refusal.startswith("crypto-required"), refusal


def test_replayed_record_towards_the_primary_is_refused(tmp_path: Path) -> None:
    """A record of the secondary's (an ACK, a heartbeat) delivered twice ends the session; the
    link heals once the network behaves."""
    key = write_key(tmp_path / "psk")
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", replication={"psk_file": key})
        with mitm(b) as proxy:
            via = f"127.0.0.1:{proxy.port}"
            a = topo.add_primary("site-a", peers=[via], replication={"psk_file": key})
            b.start()
            a.start()
            wait_caught_up_via(a, b, via)
            proxy.mode = "replay-ack"
            host_write(a, 0, 0x33, "256k")
            wait_status(
                lambda: "integrity" in (find_peer(a, via)["last_error"] or ""),
                timeout=20,
                what="the primary to refuse a replayed record: integrity",
            )
            assert proxy.replayed >= 1, (proxy.replayed, find_peer(a, via)["last_error"])
            proxy.mode = "honest"
            wait_caught_up_via(a, b, via)
            qemu_img_compare(a.images["vol"], b.images["vol"])
