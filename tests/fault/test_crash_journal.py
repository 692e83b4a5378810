"""kill -9 of a real primary unit mid-workload: the journal must bring back what was promised.

Every test drives a real ``blockmirror run`` process (64 MiB file volume, 8 MiB journal, so the
ring wraps many times and runtime checkpoints free space while the workload runs), SIGKILLs it at
a random moment (seeded: the seed is in every assertion message; set BLOCKMIRROR_CRASH_SEED to
replay one), and restarts it on the same state directory and volume. Around each restart:

- *Before* the restart the journal file is parsed offline with the project's own code
  (``read_checkpoint`` + ``scan``): it must not be corrupt, and it yields the WRITE records the
  recovery has to replay (those after the checkpoint's ``applied_seq``). On every other
  iteration those regions of the volume file are overwritten with garbage first, as a power loss
  could leave them (the volume is only known durable up to ``applied_seq``): only a real replay
  brings them back.
- *After* the restart (the export opens only after recovery): the volume file must equal the
  file before the restart with exactly those records applied in sequence order, and the newest
  scanned record of every region must be what the volume holds ("the journal's records and the
  volume agree", invariant 1). ``/api/status`` must show the volume serving, no problem,
  ``applied_seq == newest_seq``, and ``newest_seq`` where the scan says the log ends.
- The data the workload promised must be there (invariant 2): a stamped-block ledger for the
  project's NbdClient (several connections, many writes in flight, some FUA, periodic FLUSH);
  qemu-io in writethrough mode (FUA on every write) for a client we do not control. Reading the
  whole volume through the export must give the same bytes as the file.

A kill now and then lands inside the journal's ``pwritev`` and leaves a torn record at the end
of the log; the loop checks it held no acknowledged write, and a separate test tears a tail on
purpose to prove the cut and the erasing of stale records after it (recovery step 3).

What kill -9 cannot show: the kernel keeps the page cache, so a missing ``fdatasync`` goes
unnoticed; losing un-synced data needs a simulated power cut (docs/journal.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from blockmirror.errors import BlockmirrorError
from blockmirror.frontend.nbd_client import NbdClient, NbdRequestError
from blockmirror.journal.checkpoint import Checkpoint, read_checkpoint
from blockmirror.journal.format import HEADER_SIZE, Kind, RecordHeader, decode_header, record_size
from blockmirror.journal.ring import DATA_START, Ring
from blockmirror.journal.scan import BadRecord, scan
from tests.support.stamps import BLOCK, Buffer, Ledger, read_stamp, stamp, stamps
from tests.support.unit_process import (
    UnitProcess,
    fetch_status,
    require_commands,
    start_unit,
    write_config,
)

pytestmark = pytest.mark.fault

MiB = 1024 * 1024
VOLUME_SIZE = 64 * MiB
JOURNAL_SIZE = 8 * MiB
CAPACITY = JOURNAL_SIZE - DATA_START
VOLUME_BLOCKS = VOLUME_SIZE // BLOCK
# The stamped workload's region: a quarter of the volume, so blocks are rewritten many times per
# iteration; the rest must stay zero.
STAMP_BLOCKS = 4096
READ_CHUNK = 1 * MiB
READ_WINDOW = 8
ZERO_MIB = bytes(MiB)
CLIENT_TIMEOUT = 30.0

SEED = int(os.environ.get("BLOCKMIRROR_CRASH_SEED") or random.SystemRandom().randrange(2**32))


@contextlib.contextmanager
def context(what: str) -> Iterator[None]:
    """Prefix any assertion failure inside with ``what`` (seed, iteration, ...)."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from exc


# --- the unit under test, restarted on the same state -------------------------------------------


class CrashRig:
    """One primary volume with a journal; started, killed and restarted on the same files.

    Every process it starts (the unit, fio, qemu-io) is stopped by its PID in :meth:`close`.
    """

    def __init__(self, directory: Path) -> None:
        self.volume_path = directory / "vol.img"
        self.state_dir = directory / "state"
        self.journal_path = self.state_dir / "vol.journal"
        self.config = write_config(
            directory,
            name="crash",
            volumes=[
                {
                    "name": "vol",
                    "role": "primary",
                    "path": str(self.volume_path),
                    "size": VOLUME_SIZE,
                    "export": "127.0.0.1:0",
                    "journal_size": JOURNAL_SIZE,
                }
            ],
        )
        # Whole-volume buffers, allocated once: a fresh 64 MiB allocation costs more than the
        # read on a small VM.
        self.pre = bytearray(VOLUME_SIZE)
        self.post = bytearray(VOLUME_SIZE)
        self.unit: UnitProcess | None = None
        self.clients: list[subprocess.Popen[bytes]] = []

    def start(self) -> UnitProcess:
        assert self.unit is None or self.unit.proc.poll() is not None, "unit already running"
        # start_unit returns once the runtime file is written: after recovery and the export.
        self.unit = start_unit(self.config, self.state_dir)
        return self.unit

    def read_volume(self, into: bytearray) -> bytearray:
        with open(self.volume_path, "rb", buffering=0) as f:
            assert f.readinto(into) == VOLUME_SIZE and f.read(1) == b"", "volume size changed"
        return into

    @property
    def running(self) -> UnitProcess:
        assert self.unit is not None and self.unit.proc.poll() is None, "unit is not running"
        return self.unit

    def kill(self) -> None:
        """SIGKILL the unit by its PID and reap it."""
        unit = self.running
        os.kill(unit.pid, signal.SIGKILL)
        unit.proc.wait()
        assert unit.proc.returncode == -signal.SIGKILL, unit.proc.returncode

    def spawn(
        self, args: Sequence[str], log: Path, *, stdin: Path | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a client whose output goes to ``log`` (a file: a full pipe would stall it)."""
        with open(log, "wb") as out, open(stdin or os.devnull, "rb") as inp:
            proc = subprocess.Popen(
                list(args), cwd=cwd, stdin=inp, stdout=out, stderr=subprocess.STDOUT
            )
        self.clients.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.clients:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if self.unit is not None:
            self.unit.kill()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[CrashRig]:
    rig = CrashRig(tmp_path)
    try:
        yield rig
    finally:
        rig.close()


def api_status(unit: UnitProcess) -> dict[str, Any]:
    return fetch_status(unit)


def volume_status(unit: UnitProcess) -> dict[str, Any]:
    [vol] = api_status(unit)["volumes"]
    assert isinstance(vol, dict)
    return vol


def wait_for_writes(unit: UnitProcess, client: subprocess.Popen[bytes], timeout: float) -> None:
    """Until the unit has served a write (the client is connected and writing)."""
    deadline = time.monotonic() + timeout
    while volume_status(unit)["counters"]["writes"] == 0:
        assert client.poll() is None, f"client exited {client.returncode} before writing"
        assert time.monotonic() < deadline, f"no write reached the unit in {timeout}s"
        time.sleep(0.01)


def wait_for_bytes(
    unit: UnitProcess, client: subprocess.Popen[bytes], nbytes: int, timeout: float
) -> None:
    """Until the unit has taken ``nbytes`` of writes since it started."""
    deadline = time.monotonic() + timeout
    while volume_status(unit)["counters"]["bytes_written"] < nbytes:
        assert client.poll() is None, f"client exited {client.returncode} early"
        assert time.monotonic() < deadline, f"fewer than {nbytes} bytes written in {timeout}s"
        time.sleep(0.02)


# --- the journal, read offline -------------------------------------------------------------------


class Rec(NamedTuple):
    """A WRITE record as the scan found it, with its payload read from the ring."""

    seq: int
    offset: int  # in the volume
    data: bytes
    lpos: int = 0  # in the ring
    durable_seq: int = 0


@dataclass(frozen=True)
class JournalView:
    """What the journal file says, read with the project's own checkpoint and scan code."""

    generation: int
    checkpoint: Checkpoint
    tail_lpos: int
    scan_next_seq: int
    stop: BadRecord | None
    # Every WRITE record the scan found, in sequence order.
    writes: list[Rec]
    # Where the scan stopped at a torn record (the one being written at the kill): its header
    # and what of its payload is in the ring.
    torn: tuple[RecordHeader, bytes] | None = None

    @property
    def next_seq(self) -> int:
        """The number the recovered journal gives its next record (numbers are never reused)."""
        return max(self.scan_next_seq, self.checkpoint.next_seq)

    @property
    def unapplied(self) -> list[Rec]:
        """The records recovery must replay: those the volume is not known to hold durably."""
        return [w for w in self.writes if w.seq > self.checkpoint.applied_seq]

    def describe(self) -> str:
        cp = self.checkpoint
        return (
            f"checkpoint gen {self.generation} head {cp.head_lpos}/seq {cp.head_seq} applied "
            f"{cp.applied_seq} next {cp.next_seq}; scan found {len(self.writes)} writes up to "
            f"seq {self.scan_next_seq - 1}, tail {self.tail_lpos}, stop {self.stop}"
        )


def read_journal(path: Path) -> JournalView:
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == JOURNAL_SIZE, "journal file changed size"
        found = read_checkpoint(fd)
        assert found is not None, f"{path}: no valid checkpoint slot after kill -9"
        _, generation, cp = found
        assert cp.capacity == CAPACITY and cp.volume_size == VOLUME_SIZE, cp
        ring = Ring(cp.capacity)
        result = scan(fd, ring, cp.head_lpos, cp.head_seq, cp.next_seq)
        assert not result.corrupt, (
            f"{path}: journal corrupt after a process crash: {result.stop}, "
            f"witness {result.corruption_witness}"
        )
        writes: list[Rec] = []
        for rec in result.records:
            if rec.kind == Kind.WRITE:
                pos = ring.physical(rec.lpos)
                header = decode_header(os.pread(fd, HEADER_SIZE, pos))
                data = os.pread(fd, rec.length, pos + HEADER_SIZE)
                assert len(data) == rec.length, f"short payload of record {rec}"
                # Every workload here writes whole, aligned 4 KiB blocks.
                assert rec.offset % BLOCK == 0 and rec.length % BLOCK == 0, rec
                writes.append(Rec(rec.seq, rec.offset, data, rec.lpos, header.durable_seq))
            else:
                # The workloads here only write (and flush): nothing else may be in the log.
                assert rec.kind == Kind.FLUSH, f"unexpected record {rec}"
        torn = None
        if result.stop is not None and result.stop.torn:
            pos = ring.physical(result.stop.lpos)
            header = decode_header(os.pread(fd, HEADER_SIZE, pos))
            room = ring.space_to_end(result.stop.lpos) - HEADER_SIZE
            torn = (header, os.pread(fd, min(header.payload_len, room), pos + HEADER_SIZE))
    finally:
        os.close(fd)
    return JournalView(generation, cp, result.tail_lpos, result.next_seq, result.stop, writes, torn)


def scramble_unapplied(volume: Path, view: JournalView, rng: random.Random) -> int:
    """Overwrite what recovery must replay with garbage, as a power loss may leave the volume.

    Returns the bytes overwritten. Only regions of records after ``applied_seq`` are touched: the
    checkpoint promises nothing about them in the volume, only in the journal.
    """
    touched = 0
    with open(volume, "r+b") as f:
        for rec in view.unapplied:
            f.seek(rec.offset)
            f.write(rng.randbytes(len(rec.data)))
            touched += len(rec.data)
    return touched


def differing_blocks(a: Buffer, b: Buffer) -> Iterator[int]:
    """Offsets of the blocks where ``a`` and ``b`` differ (compared a MiB at a time, no copies)."""
    va, vb = memoryview(a), memoryview(b)
    assert va.nbytes == vb.nbytes, f"sizes differ: {va.nbytes} != {vb.nbytes}"
    for start in range(0, va.nbytes, MiB):
        end = min(start + MiB, va.nbytes)
        if va[start:end] != vb[start:end]:
            for off in range(start, end, BLOCK):
                if va[off : off + BLOCK] != vb[off : off + BLOCK]:
                    yield off


def all_zero(image: Buffer) -> bool:
    view = memoryview(image)
    return all(
        view[start : start + MiB] == ZERO_MIB[: min(MiB, view.nbytes - start)]
        for start in range(0, view.nbytes, MiB)
    )


def check_recovery(pre: Buffer, post: Buffer, view: JournalView) -> int:
    """The volume after recovery is the volume before it with the journal's tail replayed.

    ``pre``: the volume file after the kill (and any scrambling), before the restart. Checks that
    every region's newest journal record is what the volume holds now (replayed when it came
    after ``applied_seq``, already there when not) and that recovery changed nothing else.
    Returns how many blocks the replay had to change.
    """
    applied = view.checkpoint.applied_seq
    newest: dict[int, tuple[int, bytes]] = {}  # block offset -> (seq, data) of its newest record
    for rec in view.writes:
        for at in range(0, len(rec.data), BLOCK):
            newest[rec.offset + at] = (rec.seq, rec.data[at : at + BLOCK])
    vpost = memoryview(post)
    for off, (seq, data) in sorted(newest.items()):
        if vpost[off : off + BLOCK] != data:
            if seq > applied:
                why = f"record seq {seq} (after applied_seq) was not replayed"
            else:
                why = f"the volume lost record seq {seq}, which the checkpoint calls applied"
            raise AssertionError(f"volume offset {off}: {why}; {view.describe()}")
    replayed = {off for off, (seq, _) in newest.items() if seq > applied}
    changed = 0
    for off in differing_blocks(pre, post):
        if off not in replayed:
            raise AssertionError(
                f"volume offset {off}: recovery changed a region no unapplied record covers "
                f"(newest record: seq {newest[off][0] if off in newest else None}); "
                f"{view.describe()}"
            )
        changed += 1
    return changed


def check_status_after_recovery(unit: UnitProcess, view: JournalView) -> dict[str, Any]:
    vol = volume_status(unit)
    assert vol["state"] == "serving" and vol["problem"] is None, (vol, unit.log()[-3000:])
    journal = vol["journal"]
    assert isinstance(journal, dict), vol
    assert journal["failed"] is None, journal
    assert journal["applied_seq"] == journal["newest_seq"], f"not everything replayed: {journal}"
    assert journal["newest_seq"] == view.next_seq - 1, (
        f"the unit's log ends at seq {journal['newest_seq']}, the offline scan says "
        f"{view.next_seq - 1}; {view.describe()}"
    )
    return journal


async def check_export_equals(unit: UnitProcess, image: Buffer) -> None:
    """Read the whole volume through the export; it must equal ``image`` (the file)."""
    host, port = unit.export_address("vol")
    expected = memoryview(image)
    mismatches: list[int] = []
    async with await NbdClient.connect(host, port, "vol") as client:
        assert client.export is not None and client.export.size == VOLUME_SIZE
        window = asyncio.Semaphore(READ_WINDOW)

        async def compare(off: int) -> None:
            async with window:
                data = await client.read(off, READ_CHUNK)
            if data != expected[off : off + READ_CHUNK]:
                mismatches.extend(
                    off + at for at in differing_blocks(data, expected[off : off + READ_CHUNK])
                )

        await asyncio.gather(*(compare(off) for off in range(0, VOLUME_SIZE, READ_CHUNK)))
    assert not mismatches, f"the export and the volume file differ at {sorted(mismatches)[:10]}"


@dataclass
class Totals:
    """What a kill loop exercised, so a test can prove it did what it claims."""

    kills: int = 0
    unapplied_records: int = 0
    scrambled_bytes: int = 0
    replay_changed_blocks: int = 0
    max_tail_lpos: int = 0
    max_generation: int = 0
    torn_tails: int = 0

    def add(self, view: JournalView) -> None:
        self.kills += 1
        self.unapplied_records += len(view.unapplied)
        self.max_tail_lpos = max(self.max_tail_lpos, view.tail_lpos)
        self.max_generation = max(self.max_generation, view.generation)
        self.torn_tails += view.stop is not None and view.stop.torn


def crash_and_recover(
    rig: CrashRig, rng: random.Random, totals: Totals, *, scramble: bool
) -> tuple[JournalView, bytearray]:
    """After the kill: read the journal, maybe scramble, restart, check recovery and status.

    Returns the journal as read before the restart and the volume file as recovered (a buffer
    the next call reuses).
    """
    view = read_journal(rig.journal_path)
    totals.add(view)
    if scramble:
        totals.scrambled_bytes += scramble_unapplied(rig.volume_path, view, rng)
    post, changed = restart_and_check(rig, view)
    totals.replay_changed_blocks += changed
    return view, post


def restart_and_check(rig: CrashRig, view: JournalView) -> tuple[bytearray, int]:
    """Restart on the same files; recovery did exactly what ``view`` says, the export agrees.

    Returns the recovered volume file and how many blocks the replay changed.
    """
    pre = rig.read_volume(rig.pre)
    unit = rig.start()
    post = rig.read_volume(rig.post)
    replayed = check_recovery(pre, post, view)
    check_status_after_recovery(unit, view)
    asyncio.run(check_export_equals(unit, post))
    return post, replayed


def check_totals(totals: Totals, kills: int, *, laps: int, runtime_checkpoints: bool) -> None:
    """The loop really crashed mid-log: after ``laps`` wraps of the ring, with checkpoints
    written while the workload ran (when asked), and left records to replay."""
    assert totals.kills == kills
    assert totals.max_tail_lpos >= laps * CAPACITY, f"the journal wrapped < {laps} times: {totals}"
    if runtime_checkpoints:
        # Each start writes one checkpoint (creation one more): by the last kill, kills + 1 of
        # them. More means checkpoints ran under the workload, freeing ring space for reuse.
        assert totals.max_generation > kills + 1, f"no checkpoint under load: {totals}"
    assert totals.unapplied_records > 0 and totals.scrambled_bytes > 0, (
        f"no kill left records to replay: {totals}"
    )
    assert totals.replay_changed_blocks > 0, f"replay never had to change anything: {totals}"


# --- 1. the stamped-block workload through the project's NbdClient ------------------------------


@dataclass
class Round:
    """One iteration's workload counts."""

    writes_acked: int = 0
    fua_acked: int = 0
    flushes_acked: int = 0
    inflight_at_kill: int = 0
    server_errors: list[str] = field(default_factory=list)


def promise(durable: dict[int, int], blocks: dict[int, int]) -> None:
    for block, seq in blocks.items():
        if seq > durable.get(block, 0):
            durable[block] = seq


async def stamped_writer(
    client: NbdClient,
    ledger: Ledger,
    rng: random.Random,
    fua_share: float,
    max_blocks: int,
    counts: Round,
) -> None:
    while True:
        first, count, seq = ledger.next_extent(rng, max_blocks)
        fua = rng.random() < fua_share
        try:
            await client.write(first * BLOCK, stamps(ledger.run_id, seq, first, count), fua=fua)
        except NbdRequestError as exc:
            counts.server_errors.append(f"write {first}+{count}: {exc}")
            return
        except (BlockmirrorError, OSError):
            return  # the unit is gone: this write was never acknowledged
        finally:
            ledger.finished(first, count)
        ledger.acknowledged(first, count, seq)
        counts.writes_acked += 1
        if fua:
            # A FUA write is durable before its reply (invariant 2).
            promise(ledger.durable, {b: seq for b in range(first, first + count)})
            counts.fua_acked += 1


async def flusher(
    clients: list[NbdClient], ledger: Ledger, rng: random.Random, counts: Round
) -> None:
    """FLUSH now and then, rotating over the connections: the export advertises CAN_MULTI_CONN,
    so a FLUSH on one covers the writes acknowledged on all of them before it was sent."""
    for turn in itertools.count():
        await asyncio.sleep(rng.uniform(0.005, 0.04))
        covered = dict(ledger.acked)
        try:
            await clients[turn % len(clients)].flush()
        except NbdRequestError as exc:
            counts.server_errors.append(f"flush: {exc}")
            return
        except (BlockmirrorError, OSError):
            return
        promise(ledger.durable, covered)
        counts.flushes_acked += 1


async def stamped_round_then_kill(
    rig: CrashRig,
    ledger: Ledger,
    rng: random.Random,
    *,
    connections: int,
    depth: int,
    fua_share: float,
    max_blocks: int,
    duration: float,
) -> Round:
    host, port = rig.running.export_address("vol")
    counts = Round()
    clients = [await NbdClient.connect(host, port, "vol") for _ in range(connections)]
    tasks = [
        asyncio.create_task(
            stamped_writer(
                client, ledger, random.Random(rng.getrandbits(64)), fua_share, max_blocks, counts
            )
        )
        for client in clients
        for _ in range(depth)
    ]
    tasks.append(asyncio.create_task(flusher(clients, ledger, random.Random(rng.random()), counts)))
    try:
        await asyncio.sleep(duration)
        counts.inflight_at_kill = len(ledger.inflight)
        rig.kill()
        # The writers see their connections die and stop by themselves.
        _, pending = await asyncio.wait(tasks, timeout=10)
        assert not pending, "writers still running 10 s after the kill"
        for task in tasks:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            with contextlib.suppress(BlockmirrorError, OSError):
                await client.close()
    return counts


def check_torn_record_unacknowledged(payload: bytes, ledger: Ledger) -> None:
    """A record the kill tore was being appended: the write it holds was never acknowledged
    (replies follow the append). Its stamps, where intact, name the write."""
    for at in range(0, len(payload) - BLOCK + 1, BLOCK):
        with contextlib.suppress(AssertionError):  # the torn part is not a stamp
            found = read_stamp(payload[at : at + BLOCK])
            if found is not None and found[0] == ledger.run_id:
                assert found[1] not in ledger.acked_seqs, (
                    f"the torn record at the end of the log holds write {found[1]}, which was "
                    "acknowledged: a reply went out before its journal append completed"
                )


def test_stamp_checker_and_recovery_checker_can_fail() -> None:
    """Self-test: each checker rejects a hand-made bad state and accepts the matching good one."""
    ledger = Ledger(run_id=5, blocks=8)
    rng = random.Random(1)
    first, count, seq = ledger.next_extent(rng, 3)
    assert 1 <= count <= 3 and ledger.inflight == set(range(first, first + count))
    ledger.finished(first, count)
    ledger.acknowledged(first, count, seq)
    image = bytearray(8 * BLOCK)
    with pytest.raises(AssertionError, match="lost"):
        ledger.check(bytes(image), ledger.acked, "acknowledged")
    image[first * BLOCK : (first + count) * BLOCK] = stamps(5, seq, first, count)
    ledger.check(bytes(image), ledger.acked, "acknowledged")
    image[first * BLOCK + 100] ^= 1  # a torn block
    with pytest.raises(AssertionError, match=rf"block {first}: .*torn"):
        ledger.check(bytes(image), ledger.acked, "acknowledged")

    cp = Checkpoint(
        journal_id="00",
        volume_size=4 * BLOCK,
        capacity=CAPACITY,
        head_lpos=0,
        head_seq=1,
        next_seq=3,
        applied_seq=1,
        boot_id="",
        clean=False,
        enqueue_paused=False,
        needs_full_resync=False,
        consumers={},
    )
    a, b, c = stamp(1, 1, 0), stamp(1, 2, 1), stamp(1, 3, 1)
    # seq 1 (block 0) is applied; seqs 2 and 3 (block 1) must be replayed, 3 wins.
    view = JournalView(1, cp, 0, 4, None, [Rec(1, 0, a), Rec(2, BLOCK, b), Rec(3, BLOCK, c)])
    garbage = bytes([0xA5]) * BLOCK
    pre = a + garbage + bytes(2 * BLOCK)
    assert check_recovery(pre, a + c + bytes(2 * BLOCK), view) == 1
    with pytest.raises(AssertionError, match=r"seq 3 .* not replayed"):
        check_recovery(pre, a + b + bytes(2 * BLOCK), view)
    with pytest.raises(AssertionError, match="no unapplied record covers"):
        check_recovery(pre, a + c + garbage + bytes(BLOCK), view)
    with pytest.raises(
        AssertionError, match="lost record seq 1, which the checkpoint calls applied"
    ):
        check_recovery(
            bytes(BLOCK) + garbage + bytes(2 * BLOCK), bytes(BLOCK) + c + bytes(2 * BLOCK), view
        )


@pytest.mark.parametrize(
    ("connections", "depth", "fua_share", "max_blocks", "threads"),
    [
        pytest.param(3, 16, 0.05, 4, False, id="flush-epochs"),
        pytest.param(2, 16, 0.5, 2, False, id="fua-heavy"),
        # Every write reaches the volume from a worker thread (applier.THREAD_APPLY_MIN 0).
        pytest.param(3, 16, 0.2, 4, True, id="volume-writes-in-threads"),
    ],
)
def test_kill_9_mid_stamped_workload_keeps_promised_writes(
    rig: CrashRig,
    monkeypatch: pytest.MonkeyPatch,
    connections: int,
    depth: int,
    fua_share: float,
    max_blocks: int,
    threads: bool,
) -> None:
    """11 kills per variant (33 in all): FUA and flushed writes survive, nothing else appears."""
    if threads:
        monkeypatch.setenv("BLOCKMIRROR_THREAD_APPLY_MIN", "0")  # the unit inherits it
    kills = 11
    seed = SEED ^ (connections * 1000 + max_blocks + (500 if threads else 0))
    rng = random.Random(seed)
    ledger = Ledger(run_id=rng.getrandbits(63), blocks=STAMP_BLOCKS)
    totals = Totals()
    rounds: list[Round] = []
    rig.start()
    for i in range(kills):
        where = f"seed {SEED} (variant seed {seed}), iteration {i}"
        duration = rng.uniform(0.3, 1.5)
        with context(where):
            counts = asyncio.run(
                stamped_round_then_kill(
                    rig,
                    ledger,
                    rng,
                    connections=connections,
                    depth=depth,
                    fua_share=fua_share,
                    max_blocks=max_blocks,
                    duration=duration,
                )
            )
            rounds.append(counts)
            assert not counts.server_errors, counts.server_errors
            # The kill landed mid-workload, with writes in flight and history behind it.
            assert counts.inflight_at_kill > 0 and counts.writes_acked > 0, counts
            view, image = crash_and_recover(rig, rng, totals, scramble=i % 2 == 1)
            if view.torn is not None:
                check_torn_record_unacknowledged(view.torn[1], ledger)
            ledger.check(image, ledger.durable, "promised (FUA or flushed)")
            # kill -9 is a process crash: the kernel keeps what the process wrote, and every
            # reply follows the journal append and the volume write. So nothing acknowledged
            # may go, flushed or not (docs/journal.md, "Process crash versus power loss").
            ledger.check(image, ledger.acked, "acknowledged")
            assert all_zero(memoryview(image)[STAMP_BLOCKS * BLOCK :]), "data outside the region"
            # What recovery made durable is the floor for the next crash.
            promise(ledger.durable, ledger.observed(image))
    with context(f"seed {SEED}"):
        check_totals(totals, kills, laps=3, runtime_checkpoints=True)
        assert sum(r.fua_acked for r in rounds) > 0 and sum(r.flushes_acked for r in rounds) > 0
    if threads:
        # The unit that recovered last writes from a thread too (the variant is not vacuous).
        asyncio.run(burst(rig, ledger, rng, 8))
        runs = volume_status(rig.running)["journal"]["thread_apply_runs"]
        assert runs > 0, runs
    print(
        f"stamped crash loop, seed {SEED}: {kills} kills, "
        f"{sum(r.writes_acked for r in rounds)} writes acknowledged "
        f"({sum(r.fua_acked for r in rounds)} FUA), {sum(r.flushes_acked for r in rounds)} "
        f"flushes; {totals}"
    )


# --- 2b. a torn tail: cut, and its stale successors never replay --------------------------------


async def burst(rig: CrashRig, ledger: Ledger, rng: random.Random, count: int) -> None:
    """``count`` one-block writes, 8 in flight, without FUA or FLUSH."""
    host, port = rig.running.export_address("vol")
    async with await NbdClient.connect(host, port, "vol") as client:

        async def one() -> None:
            first, n, seq = ledger.next_extent(rng, 1)
            await client.write(first * BLOCK, stamps(ledger.run_id, seq, first, n))
            ledger.finished(first, n)
            ledger.acknowledged(first, n, seq)

        for _ in range(count // 8):
            await asyncio.gather(*(one() for _ in range(8)))


async def fua_write(rig: CrashRig, ledger: Ledger, block: int) -> None:
    host, port = rig.running.export_address("vol")
    async with await NbdClient.connect(host, port, "vol") as client:
        seq = ledger.submit(block, 1)
        await client.write(block * BLOCK, stamp(ledger.run_id, seq, block), fua=True)
        ledger.finished(block, 1)
        ledger.acknowledged(block, 1, seq)
        promise(ledger.durable, {block: seq})


def test_torn_tail_is_cut_and_its_stale_successors_never_replay(rig: CrashRig) -> None:
    """The kill above once in a while lands inside the journal's ``pwritev`` and leaves a torn
    record at the end of the log (a power cut can even keep later pages of a batch and lose
    earlier ones). Made deterministic here: the tail of an unsynced burst is torn offline, with
    valid records behind it. Recovery must cut the log at the torn record, erase the valid-looking
    records after it, and a new write that is given the torn record's number must not be undone
    by its stale successor at the next recovery (docs/journal.md, "Recovery", step 3)."""
    rng = random.Random(SEED ^ 0x7042)
    ledger = Ledger(run_id=rng.getrandbits(63), blocks=STAMP_BLOCKS)
    ring = Ring(CAPACITY)
    with context(f"seed {SEED}"):
        rig.start()
        size = record_size(BLOCK)
        for attempt in itertools.count():
            # One-block writes make same-size records: a number given again lands exactly where
            # its stale namesake lies. No FUA, no FLUSH, killed well before the first checkpoint
            # (1 s): nothing of the burst is known durable, so a bad record in it is a torn tail.
            asyncio.run(burst(rig, ledger, rng, 64))
            rig.kill()
            view = read_journal(rig.journal_path)
            tail = [r for r in view.writes if r.seq >= view.checkpoint.next_seq]
            if len(tail) >= 3:
                torn, stale = tail[-3], tail[-2:]
                unsynced = all(r.durable_seq < torn.seq for r in stale)
                contiguous = [r.lpos - torn.lpos for r in stale] == [size, 2 * size]
                if unsynced and contiguous:
                    break
            # A checkpoint made the burst durable, or padding at the ring's end split it.
            assert attempt < 3, f"no unsynced, contiguous tail after 4 bursts: {view.describe()}"
            restart_and_check(rig, view)
        # The last 512 bytes of its payload never reached the file.
        with open(rig.journal_path, "r+b") as f:
            f.seek(ring.physical(torn.lpos) + HEADER_SIZE + BLOCK - 512)
            f.write(bytes(512))
        cut = read_journal(rig.journal_path)
        assert cut.stop is not None and cut.stop.torn and cut.stop.expected_seq == torn.seq, (
            cut.describe()
        )
        image, _ = restart_and_check(rig, cut)  # newest_seq is torn.seq - 1: the log was cut
        assert "torn tail" in rig.running.log(), rig.running.log()
        ledger.check(image, ledger.acked, "acknowledged")
        with open(rig.journal_path, "rb") as f:
            for r in stale:
                f.seek(ring.physical(r.lpos))
                assert f.read(HEADER_SIZE) == bytes(HEADER_SIZE), f"stale record {r.seq} kept"

        # The next write is given the torn record's number, at its place. Aim it at the block
        # of the first stale record: were that record still there, with the next number and a
        # valid CRC, the next recovery would replay it over this newer, FUA-acknowledged write.
        target = stale[0].offset // BLOCK
        asyncio.run(fua_write(rig, ledger, target))
        rig.kill()
        after = read_journal(rig.journal_path)
        reused = [(r.seq, r.lpos, r.offset) for r in after.writes if r.seq >= torn.seq]
        assert reused == [(torn.seq, torn.lpos, target * BLOCK)], after.describe()
        image, _ = restart_and_check(rig, after)
        ledger.check(image, ledger.durable, "promised (FUA)")
        ledger.check(image, ledger.acked, "acknowledged")


# --- 3. real clients: fio with FLUSH every 32 writes, qemu-io writethrough ----------------------


def finish(proc: subprocess.Popen[bytes], log: Path) -> str:
    """Wait for a client (it is killed by PID in the rig's finalizer if this times out)."""
    proc.wait(timeout=CLIENT_TIMEOUT)
    return log.read_text(errors="replace")


def probe_with_qemu_io(rig: CrashRig, offset: int, pattern: int, log: Path) -> None:
    """After a restart a real client can write (writethrough, FUA) and read back a pattern."""
    commands = [f"write -P {pattern} {offset} 4k", f"read -P {pattern} {offset} 4k"]
    args = ["qemu-io", "-f", "raw", rig.running.export_url("vol")]
    proc = rig.spawn([*args, *itertools.chain(*(("-c", c) for c in commands))], log)
    out = finish(proc, log)
    assert proc.returncode == 0, out
    assert f"wrote 4096/4096 bytes at offset {offset}" in out, out
    assert f"read 4096/4096 bytes at offset {offset}" in out, out
    assert "Pattern verification failed" not in out, out


# Each of the fio test's kills comes after this much was written in its run: 5 of them are
# 3.75 laps of the ring's 8 MiB, with records (4 KiB of data each) and their headers.
FIO_BYTES_PER_KILL = 6 * MiB


def test_kill_9_under_fio_recovers(rig: CrashRig, tmp_path: Path) -> None:
    """fio randwrite 4k at depth 16, a FLUSH every 32 writes, killed 5 times mid-run."""
    require_commands("fio", "qemu-io")
    kills = 5
    rng = random.Random(SEED ^ 0xF10)
    totals = Totals()
    rig.start()
    for i in range(kills):
        with context(f"seed {SEED}, fio iteration {i}"):
            unit = rig.running
            log = tmp_path / f"fio-{i}.log"
            fio = rig.spawn(
                [
                    "fio",
                    "--name=crash",
                    "--ioengine=nbd",
                    f"--uri={unit.export_url('vol')}",
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=16",
                    f"--size={VOLUME_SIZE}",
                    "--time_based",
                    "--runtime=60",
                    "--fsync=32",
                    "--verify=crc32c",
                    "--do_verify=0",
                    # fio saves verify state files to its working directory: keep them in tmp.
                    "--verify_state_save=0",
                    f"--randseed={rng.getrandbits(32)}",
                ],
                log,
                cwd=tmp_path,
            )
            wait_for_writes(unit, fio, timeout=CLIENT_TIMEOUT)
            # Enough written that the kills together wrap the ring (check_totals), however
            # fast this machine is; then a random moment, so each kill lands somewhere else.
            wait_for_bytes(unit, fio, FIO_BYTES_PER_KILL, timeout=CLIENT_TIMEOUT * 2)
            time.sleep(rng.uniform(0.0, 0.5))
            assert fio.poll() is None, "fio finished before the kill"
            rig.kill()
            out = finish(fio, log)
            assert fio.returncode != 0, f"fio did not notice the unit die:\n{out}"
            crash_and_recover(rig, rng, totals, scramble=i % 2 == 1)
            probe = rng.randrange(VOLUME_BLOCKS) * BLOCK
            pattern = rng.randrange(1, 256)
            probe_with_qemu_io(rig, probe, pattern, tmp_path / f"probe-{i}.log")
            with open(rig.volume_path, "rb") as f:
                f.seek(probe)
                assert f.read(BLOCK) == bytes([pattern]) * BLOCK, "probe write not in the file"
    with context(f"seed {SEED}"):
        check_totals(totals, kills, laps=3, runtime_checkpoints=True)
    print(f"fio crash loop, seed {SEED}: {totals}")


WROTE = re.compile(r"wrote 4096/4096 bytes at offset (\d+)$", re.MULTILINE)
PROBES = 8


def test_kill_9_under_qemu_io_writethrough_keeps_every_acknowledged_write(
    rig: CrashRig, tmp_path: Path
) -> None:
    """qemu-io's default cache mode is writethrough: every write is durable before qemu-io says
    "wrote". 5 times, a script of pattern writes to every block of the volume (random order,
    random patterns) is cut by a kill -9: every write it reported must be in the file, then and
    after every later crash; every other block holds a pattern that was written to it."""
    require_commands("qemu-io")
    kills = 5
    rng = random.Random(SEED ^ 0x0E10)
    blocks = [n * BLOCK for n in range(VOLUME_BLOCKS)]
    rng.shuffle(blocks)
    probes, scripted = blocks[:PROBES], blocks[PROBES:]
    # offset -> the patterns it may hold (0: zeros). An acknowledged write narrows it to its own
    # pattern; a submitted one adds its pattern; a checked restart narrows it to what it found.
    allowed: dict[int, set[int]] = {off: {0} for off in blocks}
    acknowledged = 0
    totals = Totals()
    rig.start()
    for i in range(kills):
        with context(f"seed {SEED}, qemu-io iteration {i}"):
            unit = rig.running
            rng.shuffle(scripted)
            patterns = {off: rng.randrange(1, 256) for off in scripted}
            script = tmp_path / f"qemu-io-{i}.txt"
            script.write_text("".join(f"write -P {patterns[o]} {o} 4k\n" for o in scripted))
            for off, pattern in patterns.items():
                allowed[off].add(pattern)
            log = tmp_path / f"qemu-io-{i}.log"
            proc = rig.spawn(["qemu-io", "-f", "raw", unit.export_url("vol")], log, stdin=script)
            wait_for_writes(unit, proc, timeout=CLIENT_TIMEOUT)
            time.sleep(rng.uniform(0.1, 0.6))
            assert proc.poll() is None, "qemu-io finished its script before the kill"
            rig.kill()
            out = finish(proc, log)
            reported = [int(m) for m in WROTE.findall(out)]
            # qemu-io runs its commands in order: what it reported is a prefix of the script.
            assert 0 < len(reported) < len(scripted), out[-2000:]
            assert reported == scripted[: len(reported)], "qemu-io output out of script order"
            assert "write failed" in out, out[-2000:]
            for off in reported:
                allowed[off] = {patterns[off]}
            acknowledged += len(reported)
            image = memoryview(crash_and_recover(rig, rng, totals, scramble=i % 2 == 1)[1])
            for off, may in allowed.items():
                found = image[off : off + BLOCK]
                value = found[0]
                assert found == bytes([value]) * BLOCK and value in may, (
                    f"offset {off}: holds {bytes(found[:8]).hex()}..., allowed patterns "
                    f"{sorted(may)}" + (" (an acknowledged write lost)" if len(may) == 1 else "")
                )
                allowed[off] = {value}
            # A real client works on the recovered unit; its write then counts as acknowledged.
            probe, pattern = probes[i], 0xC0 + i
            probe_with_qemu_io(rig, probe, pattern, tmp_path / f"probe-{i}.log")
            allowed[probe] = {pattern}
    with context(f"seed {SEED}"):
        # Too few writes to wrap the ring for sure, or to outlast the checkpoint interval.
        check_totals(totals, kills, laps=0, runtime_checkpoints=False)
    print(f"qemu-io crash loop, seed {SEED}: {acknowledged} acknowledged writes kept; {totals}")
