"""A host whose NBD client reconnects by itself rides out the loss of its primary (issue 9).

The host here is qemu's NBD client with ``reconnect-delay=30``: ``qemu-nbd`` re-exports the unit's
export through qemu's ``nbd`` block driver, and nbdfuse presents qemu-nbd's export as a file that
a writer process writes and fsyncs, one block at a time. While the writer keeps going, the primary
unit is killed with SIGKILL and then either started again on the same export address, or replaced
at that address by its secondary, which is promoted (the address "moves", as a floating IP would).

What must not be lost or seen: the writer gets no I/O error at all (qemu holds the requests made
during the gap and sends them again once it has reconnected); every write whose fsync returned
(an NBD FLUSH acknowledged, by the old unit or the new one) is in the volume file, byte for byte,
after the serving unit is stopped cleanly, and so is a pattern written and flushed before the
crash; reads through the reconnected path return the same data; qemu-nbd and nbdfuse are still
running afterwards. qemu-io is not used: with ``reconnect-delay``, qemu-io 7.2 hangs on flush
even against nbdkit.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import MiB, is_mounted, run, wait_for
from tests.support.failover import role_change
from tests.support.pair import Site, topology
from tests.support.unit_process import free_port, require_commands, write_config

pytestmark = pytest.mark.e2e

BLOCK = 4096
SIZE = 64 * MiB
# Written and flushed before the crash, at the end of the volume, outside the writer's blocks.
PATTERN_OFFSET = SIZE - MiB
WRITER_BLOCKS = PATTERN_OFFSET // BLOCK
RECONNECT_DELAY = 30
# How long the unit stays dead: long enough that no request can be answered meanwhile, so the
# writer is certainly inside a request when the new unit starts.
DOWN_SECONDS = 0.5
# Acknowledged writes to wait for before the crash, and again after it.
PROGRESS = 100
MAGIC = b"RECONN01"
REPO = Path(__file__).resolve().parents[2]


def stamp(run_id: int, index: int) -> bytes:
    """The contents of the writer's write number ``index``: unique to the run and the write."""
    header = struct.pack("<8sQQ", MAGIC, run_id, index)
    return (header * (BLOCK // len(header) + 1))[:BLOCK]


def write_until_stopped(argv: list[str]) -> int:
    """The writer process: write ``index % WRITER_BLOCKS`` with :func:`stamp`, fsync, log, repeat.

    ``argv`` is DISK RUN_ID LOG STOP. Each line of LOG is ``index start end`` (CLOCK_MONOTONIC,
    shared by every process) for a write whose fsync returned; the writer checks for the file
    STOP before each write and exits 0 when it appears, or exits 1 on the first error.
    """
    disk, run_id, log_path, stop = argv[0], int(argv[1]), argv[2], argv[3]
    fd = os.open(disk, os.O_RDWR)
    index = 0
    try:
        with open(log_path, "w") as log:
            while not os.path.exists(stop):
                start = time.monotonic()
                data = stamp(run_id, index)
                written = os.pwrite(fd, data, (index % WRITER_BLOCKS) * BLOCK)
                if written != len(data):
                    print(f"short write of {written} bytes at write {index}", file=sys.stderr)
                    return 1
                os.fsync(fd)
                log.write(f"{index} {start:.6f} {time.monotonic():.6f}\n")
                log.flush()
                index += 1
    except OSError as exc:
        print(f"write {index} failed: {exc!r}", file=sys.stderr)
        return 1
    finally:
        os.close(fd)
    return 0


@dataclass(frozen=True)
class Ack:
    """One write whose fsync returned, with when it was started and when it returned."""

    index: int
    start: float
    end: float


def stop_child(proc: subprocess.Popen[bytes], *, grace: float = 5.0) -> None:
    """SIGTERM a child we started, by its PID; SIGKILL it if it does not go."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill_child(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def release_mount(mnt: Path) -> None:
    """Unmount nbdfuse's mount; lazily if it is busy, so a failed test cannot leave it behind."""
    if is_mounted(mnt) and run(["umount", str(mnt)]).returncode != 0 and is_mounted(mnt):
        run(["umount", "-l", str(mnt)], check=True)


@contextlib.contextmanager
def qemu_reexport(export: tuple[str, int], sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    """qemu-nbd serving ``sock``, as the client of the unit's export with ``reconnect-delay``.

    ``-e 3``: nbdfuse and a reader at once (one connection each); ``-t``: it stays up when a
    client leaves.
    """
    host, port = export
    spec = (
        f"driver=nbd,server.type=inet,server.host={host},server.port={port},export=vol,"
        f"reconnect-delay={RECONNECT_DELAY}"
    )
    log_path = sock.with_suffix(".log")
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        ["qemu-nbd", "-t", "-e", "3", "-x", "vol", "-k", str(sock), "--image-opts", spec],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"qemu-nbd exited {proc.returncode}: {log_path.read_text()}")
            return sock.exists()

        wait_for(listening, 10, "qemu-nbd to listen")
        yield proc
    finally:
        stop_child(proc)


@contextlib.contextmanager
def fuse_disk(url: str, workdir: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """nbdfuse presenting ``url`` as ``workdir/mnt/disk``; unmounted and stopped on exit.

    ``-C 1``: one connection. qemu-nbd advertises multi-conn, and nbdfuse's default of four
    connections would exceed the ``-e`` qemu-nbd allows.
    """
    mnt = workdir / "mnt"
    mnt.mkdir()
    pid_file = workdir / "nbdfuse.pid"
    log = open(workdir / "nbdfuse.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        ["nbdfuse", "-C", "1", "-P", str(pid_file), str(mnt / "disk"), url],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"nbdfuse exited {proc.returncode}")
            # The pid file is written once the mount serves; stat() before that could block.
            return pid_file.exists() and is_mounted(mnt)

        wait_for(ready, 10, "nbdfuse to present the disk")
        yield mnt / "disk", proc
    finally:
        release_mount(mnt)
        # Once its mount is gone nbdfuse exits by itself; stop it by its PID if it does not.
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            stop_child(proc)


@dataclass
class Host:
    """qemu-nbd (the reconnecting NBD client), nbdfuse on it, and the writer on nbdfuse's file."""

    workdir: Path
    run_id: int
    pattern: bytes
    qemu: subprocess.Popen[bytes]
    nbdfuse: subprocess.Popen[bytes]
    writer: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"nbd+unix:///vol?socket={self.workdir / 'qemu.sock'}"

    @property
    def ack_log(self) -> Path:
        return self.workdir / "acks.log"

    def acks(self) -> list[Ack]:
        acks = []
        # The writer may be half-way through a line: only whole lines count.
        for line in self.ack_log.read_text().split("\n")[:-1]:
            index, start, end = line.split()
            acks.append(Ack(int(index), float(start), float(end)))
        return acks

    def wait_acks(self, count: int, timeout: float) -> None:
        def enough() -> bool:
            if self.writer.poll() is not None:
                assert self.writer.stderr is not None
                err = self.writer.stderr.read().decode(errors="replace")
                raise AssertionError(f"the writer exited {self.writer.returncode}: {err}")
            return len(self.acks()) >= count

        wait_for(enough, timeout, f"{count} acknowledged writes")

    def stop_writer(self) -> list[Ack]:
        """Let the writer finish the write it is in and stop; it must have seen no error."""
        (self.workdir / "stop-writer").touch()
        try:
            _, err = self.writer.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError("the writer did not stop") from None
        text = err.decode(errors="replace")
        assert self.writer.returncode == 0 and not text, f"the writer saw an error: {text}"
        assert self.qemu.poll() is None, "qemu-nbd died"
        assert self.nbdfuse.poll() is None, "nbdfuse died"
        acks = self.acks()
        assert [a.index for a in acks] == list(range(len(acks))), "the writer's log has gaps"
        return acks

    def expected_image(self, acks: list[Ack]) -> bytearray:
        image = bytearray(SIZE)
        image[PATTERN_OFFSET : PATTERN_OFFSET + len(self.pattern)] = self.pattern
        for ack in acks:  # in write order: a later write to a block replaces an earlier one
            block = ack.index % WRITER_BLOCKS
            image[block * BLOCK : (block + 1) * BLOCK] = stamp(self.run_id, ack.index)
        return image

    def check_reads(self, expected: bytes | bytearray) -> None:
        """Read the whole disk back through qemu's reconnected connection (a second client of
        qemu-nbd, so nothing comes from nbdfuse's page cache)."""
        readback = self.workdir / "readback.img"
        run(["nbdcopy", "--connections=1", self.url, str(readback)], check=True)
        try:
            actual = readback.read_bytes()
            assert actual == expected, first_difference(expected, actual)
        finally:
            readback.unlink()


@contextlib.contextmanager
def host_writing(export: tuple[str, int], workdir: Path) -> Iterator[Host]:
    """Set up the host on ``export``, write and flush the pattern, start the writer; on exit
    stop the writer, nbdfuse and qemu-nbd (in that order), whatever happened."""
    workdir.mkdir()
    run_id = random.getrandbits(63)
    pattern = random.Random(run_id).randbytes(MiB)
    sock = workdir / "qemu.sock"
    assert len(str(sock)) < 100, f"unix socket path too long: {sock}"
    with contextlib.ExitStack() as stack:
        qemu = stack.enter_context(qemu_reexport(export, sock))
        disk, nbdfuse = stack.enter_context(fuse_disk(f"nbd+unix:///vol?socket={sock}", workdir))
        fd = os.open(disk, os.O_RDWR)
        try:
            assert os.pwrite(fd, pattern, PATTERN_OFFSET) == len(pattern)
            os.fsync(fd)
        finally:
            os.close(fd)
        (workdir / "acks.log").touch()  # the writer may take a moment to open it
        writer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys\n"
                "from tests.e2e.test_reconnect_delay import write_until_stopped\n"
                "sys.exit(write_until_stopped(sys.argv[1:]))",
                str(disk),
                str(run_id),
                str(workdir / "acks.log"),
                str(workdir / "stop-writer"),
            ],
            cwd=REPO,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        # Registered last, so it runs first: a writer waiting inside the FUSE file must be gone
        # before the mount is released.
        stack.callback(kill_child, writer)
        yield Host(workdir, run_id, pattern, qemu, nbdfuse, writer)


def first_difference(expected: bytes | bytearray, actual: bytes) -> str:
    if len(actual) != len(expected):
        return f"size {len(actual)}, expected {len(expected)}"
    for block in range(len(expected) // BLOCK):
        lo, hi = block * BLOCK, (block + 1) * BLOCK
        if actual[lo:hi] != expected[lo:hi]:
            magic, run_id, index = struct.unpack("<8sQQ", actual[lo : lo + 24])
            return f"block {block} differs (holds {magic!r} run {run_id} write {index})"
    return "none"


def check_gap_ridden(acks: list[Ack], killed: float, restarting: float) -> Ack:
    """Writes were acknowledged before the crash and after it, and one write was held by qemu
    through the gap: it began before the new unit started and returned after (nothing can be
    acknowledged while no unit runs). Returns that write."""
    assert any(a.end < killed for a in acks)
    assert any(a.start > restarting for a in acks)
    held = [a for a in acks if a.start < restarting < a.end]
    assert held, "no write was pending while the unit was down"
    assert held[0].end - held[0].start >= DOWN_SECONDS, held[0]
    return held[0]


@pytest.fixture
def host_clients() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting nbdfuse needs root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: nbdfuse cannot present the export as a file")
    require_commands("qemu-nbd", "nbdfuse", "nbdcopy", "umount")


@pytest.mark.usefixtures("host_clients")
def test_qemu_reconnect_delay_rides_out_kill_and_restart_of_the_primary(tmp_path: Path) -> None:
    (tmp_path / "sites").mkdir()
    with topology(tmp_path / "sites") as topo:
        # A fixed export port: qemu reconnects to the address it was given, so the restarted
        # unit must listen where the old one did.
        site = topo.add_primary(
            "a", peers=[], size=SIZE, extra={"export": f"127.0.0.1:{free_port()}"}
        )
        export = site.start().export_address("vol")
        with host_writing(export, tmp_path / "host") as host:
            host.wait_acks(PROGRESS, timeout=30)

            site.kill()  # SIGKILL, and reaped
            killed = time.monotonic()
            time.sleep(DOWN_SECONDS)
            restarting = time.monotonic()
            before_restart = len(host.acks())
            assert site.start().export_address("vol") == export
            host.wait_acks(before_restart + PROGRESS, timeout=RECONNECT_DELAY - 5)

            acks = host.stop_writer()
            held = check_gap_ridden(acks, killed, restarting)
            counters = site.volume_status()["counters"]
            assert counters["errors"] == 0, counters
            assert counters["flushes"] > 0 and counters["writes"] > 0, counters
            # qemu reconnected once, over one connection.
            assert counters["connections_total"] == 1, counters
            expected = host.expected_image(acks)
            host.check_reads(expected)
        # The writer, nbdfuse and qemu-nbd have gone; they flush on their way out.
        assert host.qemu.returncode == 0, host.qemu.returncode
        assert site.unit is not None
        assert site.unit.terminate() == 0, site.unit.log()

    on_disk = site.images["vol"].read_bytes()
    assert on_disk == expected, first_difference(expected, on_disk)
    print(
        f"{len(acks)} flushed writes, {len(acks) - before_restart} after the restart; one "
        f"waited {held.end - held.start:.2f} s for qemu to reconnect"
    )


def _site(
    topo: Any, name: str, role: str, export: str, listen: int, peer: int, *, ack: str
) -> Site:
    directory = topo.root / name
    directory.mkdir()
    image = directory / "vol.img"
    entry: dict[str, Any] = {
        "name": "vol",
        "role": role,
        "path": str(image),
        "size": SIZE,
        "export": export,
        "journal_size": "16MiB",
        "peers": [f"127.0.0.1:{peer}"],
        "ack": ack,
    }
    config = write_config(
        directory, name=name, volumes=[entry], replication={"listen": f"127.0.0.1:{listen}"}
    )
    site = Site(directory, name, config, directory / "state", {"vol": image}, listen)
    topo.sites[name] = site
    return site


@pytest.mark.usefixtures("host_clients")
def test_qemu_follows_its_address_to_the_promoted_secondary(tmp_path: Path) -> None:
    """The primary is lost, its export address moves to the secondary, the secondary is promoted.

    Until the promote, the secondary's export is read-only and qemu refuses it at each
    reconnect attempt (its device was opened read-write), so the writer waits; after the promote
    qemu gets in and the writer goes on. With ``ack = "remote"`` nothing acknowledged is lost.
    """
    service, link_a, link_b = free_port(), free_port(), free_port()
    (tmp_path / "sites").mkdir()
    with topology(tmp_path / "sites") as topo:
        # A answers the host once B holds the write: what a failover without loss needs (with
        # ack = "local" the lag at the crash is lost). B, once promoted, has no peer left to
        # wait for: with ack = "remote" it would hold every host write for ack_timeout (30 s)
        # before acknowledging locally.
        a = _site(topo, "a", "primary", f"127.0.0.1:{service}", link_a, link_b, ack="remote")
        b = _site(topo, "b", "secondary", f"127.0.0.1:{free_port()}", link_b, link_a, ack="local")
        b.start()
        export = a.start().export_address("vol")
        with host_writing(export, tmp_path / "host") as host:
            host.wait_acks(PROGRESS, timeout=30)

            a.kill()
            killed = time.monotonic()
            # The address moves: B is restarted with its export where A's was (a floating IP
            # moved by keepalived, a DNS name changed: for the host it is the same address).
            assert b.unit is not None and b.unit.terminate() == 0, b.unit and b.unit.log()
            b.config.write_text(
                b.config.read_text().replace(
                    b.unit.runtime["exports"]["vol"], f"127.0.0.1:{service}"
                )
            )
            restarting = time.monotonic()
            before_promote = len(host.acks())
            assert b.start().export_address("vol") == export
            vol = b.volume_status()
            assert vol["role"] == "secondary" and vol["read_only"], vol

            def refused_attempts() -> bool:
                return int(b.volume_status()["counters"]["connections_total"]) >= 3

            wait_for(refused_attempts, 10, "qemu to try the read-only export")
            assert len(host.acks()) == before_promote, "a write got through before the promote"
            assert b.volume_status()["counters"]["writes"] == 0

            promoted = role_change(b, "promote")
            assert promoted.returncode == 0, promoted.stdout + promoted.stderr
            host.wait_acks(before_promote + PROGRESS, timeout=RECONNECT_DELAY - 5)

            acks = host.stop_writer()
            check_gap_ridden(acks, killed, restarting)
            assert b.volume_status()["counters"]["errors"] == 0
            expected = host.expected_image(acks)
            host.check_reads(expected)
        assert host.qemu.returncode == 0, host.qemu.returncode
        assert b.unit is not None
        assert b.unit.terminate() == 0, b.unit.log()

    on_disk = b.images["vol"].read_bytes()
    assert on_disk == expected, first_difference(expected, on_disk)
