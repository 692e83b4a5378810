"""``blockmirror journal recover``: a journal corrupt in the middle, refused by the unit, recovered
offline, served again.

The end-to-end test writes through the real export, crashes the unit, damages one durable record
and makes the volume lack the journal's records (as after a power cut before the volume was
synced: the checkpoint's ``applied_seq`` is put back and the volume file emptied), so that what
ends up in the volume after recovery can only have come from the replay. The in-process test
drives the journal directly to cover what the export cannot reach quickly: a ring that has
wrapped, two damaged stretches (a payload and a header), and blocks written both before and
after a damaged record (replaying only up to the damage would roll those back).
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import pytest

from blockmirror.config import load_config
from blockmirror.journal.checkpoint import SLOT_SIZE, read_checkpoint, write_checkpoint
from blockmirror.journal.dirtymap import DirtyMap
from blockmirror.journal.format import HEADER_SIZE, MAGIC, Kind
from blockmirror.journal.journal import DIRTY_REGION, Journal
from blockmirror.journal.ring import DATA_START, Ring
from blockmirror.journal.scan import JournalCorruptError, scan
from blockmirror.offline.repair import JournalRecovery, NotCorruptError
from blockmirror.statedir import dirty_map_path
from blockmirror.store.volume import Volume
from tests.e2e.conftest import KiB, MiB, api_status, run
from tests.e2e.test_journal_controls import (
    PEER,
    SIZE,
    cli,
    consumer_status,
    journal_status,
    post,
    qemu_io,
    start_caught_up_unit,
    volume_bytes,
    volume_table,
)
from tests.support.unit_process import start_unit, write_config

pytestmark = pytest.mark.e2e

JOURNAL_SIZE = MiB
RING = Ring(JOURNAL_SIZE - DATA_START)
BLOCK = 4 * KiB
MAGIC_BYTES = MAGIC.to_bytes(4, "little")


def aligned_magics(journal: Path) -> list[int]:
    """Physical offsets in the data area where a record header could begin."""
    data = journal.read_bytes()[DATA_START:]
    found = []
    at = data.find(MAGIC_BYTES)
    while at != -1:
        if at % 8 == 0:
            found.append(DATA_START + at)
        at = data.find(MAGIC_BYTES, at + 1)
    return found


def flip(fd: int, pos: int) -> None:
    byte = os.pread(fd, 1, pos)
    os.pwrite(fd, bytes([byte[0] ^ 0xFF]), pos)
    os.fsync(fd)


@pytest.mark.parametrize("damage", ["payload", "header"])
def test_recover_a_journal_corrupt_in_the_middle(tmp_path: Path, damage: str) -> None:
    unit = start_caught_up_unit(tmp_path)
    config, state = unit.config_path, unit.state_dir
    journal = state / "vol.journal"
    try:
        base = journal_status(unit)["newest_seq"]
        # Eight FUA writes, each made durable before the next: a later record vouches for each.
        qemu_io(unit, *(f"write -f -P 0x{0x80 + i:x} {i * 64}k 4k" for i in range(8)))
        j = journal_status(unit)
        assert (j["oldest_seq"], j["newest_seq"], j["records"]) == (base + 1, base + 8, 8)
    finally:
        unit.kill()  # SIGKILL: the records stay in the journal (the consumer never acknowledged)

    fd = os.open(journal, os.O_RDWR)
    try:
        found = read_checkpoint(fd)
        assert found is not None
        _, generation, cp = found
        live = scan(fd, RING, cp.head_lpos, cp.head_seq, cp.next_seq)
        assert not live.corrupt
        assert [r.seq for r in live.records] == list(range(base + 1, base + 9))
        # The volume lacks every one of them: only the replay can bring their data back.
        write_checkpoint(fd, dataclasses.replace(cp, applied_seq=base), generation + 1)
        victim = live.records[2]
        where = HEADER_SIZE + 100 if damage == "payload" else 0
        flip(fd, RING.physical(victim.lpos) + where)
    finally:
        os.close(fd)
    with open(tmp_path / "vol.img", "r+b") as f:
        f.truncate(0)
        f.truncate(SIZE)

    # The unit refuses the volume, says why, and does not export it.
    unit = start_unit(config, state)
    try:
        [vol] = api_status(unit)["volumes"]
        assert vol["state"] == "failed" and vol["export"] is None and vol["journal"] is None
        assert "corrupt" in vol["problem"] and f"seq {victim.seq}" in vol["problem"]
        assert unit.runtime["exports"]["vol"] is None
        code, body = post(unit, "/api/volumes/vol/journal/pause")
        assert code == 409 and "corrupt" in body["error"]
        out = cli("status", "--admin", unit.admin, "--token-file", str(unit.admin_token_file))
        assert "problems:" in out.stdout and "corrupt" in out.stdout
        # Never while a unit holds the state directory.
        out = cli("journal", "recover", str(config), "vol", "--yes")
        assert out.returncode == 1 and "in use by a running blockmirror unit" in out.stderr
    finally:
        assert unit.terminate() == 0

    # Without --yes and without a terminal to ask on: the plan, a refusal, nothing changed.
    before = journal.read_bytes()
    out = cli("journal", "recover", str(config), "vol")
    assert out.returncode == 2 and "--yes" in out.stderr
    assert "will replay 7 records" in out.stdout and f"lost: seq {victim.seq}" in out.stdout
    assert journal.read_bytes() == before

    out = cli("journal", "recover", str(config), "vol", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"replayed 7 records (seq {base + 1}..{base + 8})" in out.stdout
    lost = f"lost: seq {victim.seq}"
    if damage == "payload":  # the header still says what the record was
        lost += f": a write of 4.0 KiB at volume offset {2 * 64 * KiB}"
    assert lost in out.stdout
    assert f"next sequence number {base + 9}" in out.stdout

    # The journal: empty, numbered above everything it held, no record header left in the ring.
    fd = os.open(journal, os.O_RDONLY)
    try:
        found = read_checkpoint(fd)
    finally:
        os.close(fd)
    assert found is not None
    new = found[2]
    assert (new.head_lpos, new.head_seq, new.next_seq) == (0, base + 9, base + 9)
    assert new.needs_full_resync and new.consumers[PEER].mode == "tracking"
    assert aligned_magics(journal) == []
    with DirtyMap.open(
        dirty_map_path(state, "vol", PEER), volume_size=SIZE, region_size=DIRTY_REGION
    ) as dirty:
        assert dirty.dirty_bytes() == SIZE
    # Every record but the damaged one was replayed into the (emptied) volume.
    for i in range(8):
        expected = bytes(BLOCK) if i == 2 else bytes([0x80 + i]) * BLOCK
        assert volume_bytes(tmp_path, i * 64 * KiB, BLOCK) == expected, i

    out = cli("journal", "recover", str(config), "vol", "--yes")
    assert out.returncode == 1 and "not corrupt" in out.stderr

    # Served again: a full resync pending for the consumer, numbering going on above the old.
    unit = start_unit(config, state)
    try:
        [vol] = api_status(unit)["volumes"]
        assert vol["state"] == "serving" and vol["problem"] is None
        assert unit.runtime["exports"]["vol"] is not None
        j = journal_status(unit)
        assert (j["records"], j["newest_seq"]) == (0, base + 8)
        c = consumer_status(unit)
        assert c["mode"] == "tracking" and c["dirty_bytes"] == SIZE
        run(["qemu-io", "-f", "raw", unit.export_url("vol"), "-c", "read -P 0x80 0 4k"], check=True)
        run(
            ["qemu-io", "-f", "raw", unit.export_url("vol"), "-c", "read -P 0x87 448k 4k"],
            check=True,
        )
        qemu_io(unit, "write -f -P 0x99 1M 4k")
        assert journal_status(unit)["newest_seq"] == base + 9
    finally:
        assert unit.terminate() == 0


def test_recover_a_journal_without_a_valid_checkpoint(tmp_path: Path) -> None:
    unit = start_caught_up_unit(tmp_path)
    config, state = unit.config_path, unit.state_dir
    journal = state / "vol.journal"
    try:
        base = journal_status(unit)["newest_seq"]
        qemu_io(unit, *(f"write -f -P 0x{0x40 + i:x} {i * 64}k 4k" for i in range(4)))
    finally:
        unit.kill()
    fd = os.open(journal, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(2 * SLOT_SIZE), 0)  # both checkpoint slots gone
        os.fsync(fd)
    finally:
        os.close(fd)

    unit = start_unit(config, state)
    try:
        [vol] = api_status(unit)["volumes"]
        assert vol["state"] == "failed" and "no valid checkpoint" in vol["problem"]
    finally:
        assert unit.terminate() == 0

    out = cli("journal", "recover", str(config), "vol", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "nothing is replayed" in out.stdout
    assert f"next sequence number {base + 5}" in out.stdout
    assert aligned_magics(journal) == []
    # The volume is kept as it was (the unit had written it before the crash).
    assert volume_bytes(tmp_path, 3 * 64 * KiB, BLOCK) == b"\x43" * BLOCK

    unit = start_unit(config, state)
    try:
        [vol] = api_status(unit)["volumes"]
        assert vol["state"] == "serving"
        assert consumer_status(unit)["dirty_bytes"] == SIZE
        qemu_io(unit, "write -P 0x55 0 4k")
        assert journal_status(unit)["newest_seq"] == base + 5
    finally:
        assert unit.terminate() == 0


def test_recover_refusals(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        volumes=[
            volume_table(tmp_path),
            {
                "name": "plain",
                "role": "primary",
                "path": str(tmp_path / "plain.img"),
                "size": MiB,
                "export": "127.0.0.1:0",
                "journal": False,
            },
        ],
    )
    # Never started: no state directory, then no journal.
    out = cli("journal", "recover", str(config), "vol", "--yes")
    assert out.returncode == 1 and "there is no journal to recover" in out.stderr
    (tmp_path / "state").mkdir()
    out = cli("journal", "recover", str(config), "vol", "--yes")
    assert out.returncode == 1 and "has no journal at" in out.stderr
    out = cli("journal", "recover", str(config), "nope", "--yes")
    assert out.returncode == 1 and "no volume named 'nope'" in out.stderr
    out = cli("journal", "recover", str(config), "plain", "--yes")
    assert out.returncode == 1 and "has no journal to recover" in out.stderr
    out = cli("journal", "recover", str(tmp_path / "missing.toml"), "vol", "--yes")
    assert out.returncode == 2
    # A healthy journal is left to `blockmirror run`.
    unit = start_unit(config, tmp_path / "state")
    qemu_io(unit, "write -P 0x12 0 4k")
    unit.kill()
    before = (tmp_path / "state" / "vol.journal").read_bytes()
    out = cli("journal", "recover", str(config), "vol", "--yes")
    assert out.returncode == 1 and "not corrupt" in out.stderr
    assert (tmp_path / "state" / "vol.journal").read_bytes() == before


# --- in process: a wrapped ring, two damaged stretches, overwritten blocks -----------------------


def stamp(seq: int) -> bytes:
    return seq.to_bytes(8, "little") * (BLOCK // 8)


def test_replay_skips_damage_without_rolling_back_later_writes(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, volumes=[volume_table(tmp_path)])
    config = load_config(config_path)
    state = config.unit.state_dir
    state.mkdir()
    blocks = 7  # few blocks, many records: every block is rewritten again and again
    rng = random.Random(1)
    volume = Volume.open(tmp_path / "vol.img", size=SIZE)
    journal = Journal.open(
        state / "vol.journal",
        volume=volume,
        journal_size=JOURNAL_SIZE,
        consumers=[PEER],
        dirty_dir=state,
        volume_name="vol",
    )
    writes: dict[int, int] = {}  # seq -> block
    try:
        # Enough records for the ring to wrap; the volume gets every record up to a checkpoint.
        for n in range(600):
            if not journal.fits(BLOCK) or n in (150, 460):
                # As the write path would after syncing the volume: records are freed only
                # once the volume holds them durably.
                journal.volume_durable_seq = journal.durable_seq
                cp = journal.checkpoint_state(applied_seq=journal.durable_seq, clean=False)
                journal.write_checkpoint(cp)
                journal.checkpoint_written(cp)
            block = rng.randrange(blocks)
            rec = journal.stage(Kind.WRITE, block * BLOCK, BLOCK, [stamp(journal.next_seq)])
            writes[rec.seq] = block
            journal.write_batch()
            journal.durable_seq = journal.sync()
            if n < 460:
                volume.pwrite(block * BLOCK, stamp(rec.seq))
        live = list(journal.records)
        assert live[0].lpos // RING.capacity != live[-1].lpos // RING.capacity, "did not wrap"
        applied = journal.applied_seq
        highest = journal.next_seq - 1
    finally:
        # A crash: no closing checkpoint.
        for consumer in journal.consumers.values():
            consumer.dirty.close()
        journal.abandon()
        volume.close()

    # Damage one record's payload before the wrap and another's header after it.
    first_bad, second_bad = live[5], live[-8]
    assert first_bad.lpos // RING.capacity != second_bad.lpos // RING.capacity
    fd = os.open(state / "vol.journal", os.O_RDWR)
    try:
        flip(fd, RING.physical(first_bad.lpos) + HEADER_SIZE + 7)
        flip(fd, RING.physical(second_bad.lpos) + 9)  # inside the sequence number: seq mismatch
    finally:
        os.close(fd)
    volume = Volume.open(tmp_path / "vol.img", size=SIZE)
    try:
        with pytest.raises(JournalCorruptError):
            Journal.open(
                state / "vol.journal",
                volume=volume,
                journal_size=JOURNAL_SIZE,
                consumers=[PEER],
                dirty_dir=state,
                volume_name="vol",
            )
    finally:
        volume.close()

    with JournalRecovery(config, "vol") as recovery:
        plan = recovery.plan
        assert [(lost.first_seq, lost.last_seq) for lost in plan.lost] == [
            (first_bad.seq, first_bad.seq),
            (second_bad.seq, second_bad.seq),
        ]
        assert plan.lost[0].header is not None and plan.lost[1].header is None
        skipped = {first_bad.seq, second_bad.seq}
        expected_replay = [r.seq for r in live if r.seq > applied and r.seq not in skipped]
        assert [r.seq for r in plan.replay] == expected_replay
        assert plan.highest_seq == highest
        recovery.run()

    # Each block holds its newest write that survived, never an older one.
    newest: dict[int, int] = {}
    for seq, block in sorted(writes.items()):
        if seq <= applied or seq not in skipped:
            newest[block] = seq
    rolled_back = [
        block
        for block in range(blocks)
        if any(s < first_bad.seq and s > applied for s, b in writes.items() if b == block)
        and any(s > first_bad.seq for s, b in writes.items() if b == block)
    ]
    assert rolled_back, "the test must rewrite blocks across the damage"
    with open(tmp_path / "vol.img", "rb") as f:
        image = f.read(blocks * BLOCK)
    for block in range(blocks):
        got = int.from_bytes(image[block * BLOCK : block * BLOCK + 8], "little")
        assert got == newest.get(block, 0), (block, got, newest.get(block))

    volume = Volume.open(tmp_path / "vol.img", size=SIZE)
    try:
        reopened = Journal.open(
            state / "vol.journal",
            volume=volume,
            journal_size=JOURNAL_SIZE,
            consumers=[PEER],
            dirty_dir=state,
            volume_name="vol",
        )
        try:
            assert not reopened.records and reopened.next_seq == highest + 1
            consumer = reopened.consumers[PEER]
            assert consumer.mode == "tracking" and consumer.dirty.dirty_bytes() == SIZE
        finally:
            reopened.close()
    finally:
        volume.close()
    with pytest.raises(NotCorruptError):
        JournalRecovery(config, "vol")
