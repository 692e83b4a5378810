"""``journal resize`` in-process: what is kept, what is copied, what becomes dirty bits (issue 7,
point 11). The end-to-end test with two real units is tests/e2e/test_journal_resize.py."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.config import Config, load_config
from blockmirror.journal.format import Kind
from blockmirror.journal.journal import DIRTY_REGION, Journal
from blockmirror.offline.lock import OfflineError, StateDirLock
from blockmirror.offline.resize import resize_journal
from blockmirror.state import ConsumerMode
from blockmirror.store.volume import Volume
from tests.support.unit_process import write_config

MiB = 1024 * 1024
SIZE = 16 * MiB
BLOCK = 4096
AHEAD = "127.0.0.1:7801"  # a peer that acknowledged almost everything
BEHIND = "127.0.0.1:7802"  # a peer that acknowledged little


def config_for(tmp: Path, journal_size: str = "4MiB") -> Config:
    path = write_config(
        tmp,
        volumes=[
            {
                "name": "vol",
                "role": "primary",
                "path": str(tmp / "vol.img"),
                "size": SIZE,
                "export": "127.0.0.1:0",
                "journal_size": journal_size,
                "peers": [AHEAD, BEHIND],
            }
        ],
        admin=False,
    )
    return load_config(path)


def open_journal(config: Config) -> Journal:
    vc = config.volumes[0]
    config.unit.state_dir.mkdir(exist_ok=True)
    volume = Volume.open(vc.path, size=vc.size)
    return Journal.open(
        config.unit.state_dir / "vol.journal",
        volume=volume,
        journal_size=vc.journal_size,
        consumers=[AHEAD, BEHIND],
        dirty_dir=config.unit.state_dir,
        volume_name="vol",
    )


def close(journal: Journal) -> None:
    journal.close()
    journal.volume.close()


Kept = tuple[Kind, int, bytes, int, int]  # kind, offset, data, origin time and unit


def payloads(journal: Journal) -> dict[int, Kept]:
    out = {}
    for rec in journal.records:
        data = b""
        if rec.kind == Kind.WRITE:
            data = journal.read_payload(rec)
        out[rec.seq] = (rec.kind, rec.offset, data, rec.timestamp_ns, rec.origin)
    return out


def fill(config: Config, *, writes: int, behind_at: int) -> tuple[dict[int, Kept], str, bytes]:
    """Write ``writes`` blocks; AHEAD acknowledges all but the last 5, BEHIND up to
    ``behind_at``. Returns the records kept, the volume id and the volume's content."""
    rng = random.Random(writes)

    async def body() -> None:
        journal = open_journal(config)
        journal.origin = 0x5EED
        wp = JournalWritePath(journal, journal.volume, asyncio.get_running_loop())
        wp.start()
        for peer in journal.consumers.values():
            peer.dirty.clear_all()
            peer.dirty.sync()
            peer.set_mode(ConsumerMode.JOURNAL)
            peer.acked_seq = journal.next_seq - 1
        for _ in range(writes):
            off = rng.randrange(SIZE // BLOCK) * BLOCK
            done = wp.write(off, [rng.randbytes(BLOCK)], fua=False)
            gate = wp.commit()
            for fut in (gate, done):
                if fut is not None:
                    await fut
        journal.consumers[AHEAD].acked_seq = journal.next_seq - 6
        journal.consumers[BEHIND].acked_seq = behind_at
        await wp.close()
        journal.volume.close()

    asyncio.run(body())
    journal = open_journal(config)
    try:
        return payloads(journal), journal.volume_id, journal.volume.pread(0, SIZE)
    finally:
        close(journal)


def test_a_bigger_journal_keeps_every_record_cursor_and_the_volume_id(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    before, volume_id, content = fill(config, writes=300, behind_at=100)
    report = resize_journal(config, "vol", 8 * MiB)
    assert report.copied == len(before) and report.tracked == {}
    assert any("set journal_size" in line for line in report.lines)
    config = config_for(tmp_path, "8MiB")
    journal = open_journal(config)
    try:
        assert journal.volume_id == volume_id
        # The same records: numbers, payloads, origin times and units.
        assert payloads(journal) == before
        assert journal.consumers[BEHIND].mode == "journal"
        assert journal.consumers[BEHIND].acked_seq == 100
        assert journal.consumers[AHEAD].mode == "journal"
        assert journal.volume.pread(0, SIZE) == content
    finally:
        close(journal)


def test_a_smaller_journal_turns_what_does_not_fit_into_dirty_bits(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    before, volume_id, content = fill(config, writes=600, behind_at=10)
    report = resize_journal(config, "vol", 1 * MiB)
    assert 0 < report.copied < len(before)
    assert set(report.tracked) == {BEHIND}
    config = config_for(tmp_path, "1MiB")
    journal = open_journal(config)
    try:
        assert journal.volume_id == volume_id
        after = payloads(journal)
        assert after == {seq: before[seq] for seq in after}  # the newest, unchanged
        # The peer that was ahead keeps streaming from its cursor.
        ahead = journal.consumers[AHEAD]
        assert ahead.mode == "journal" and ahead.acked_seq + 1 >= journal.head_seq
        # The other resyncs the regions of every record it lacked: nothing differs untracked.
        behind = journal.consumers[BEHIND]
        assert behind.mode == "tracking" and behind.acked_seq == 10
        dirty = {
            start // DIRTY_REGION
            for off, n in behind.dirty.dirty_regions()
            for start in range(off, off + n, DIRTY_REGION)
        }
        assert {o // DIRTY_REGION for seq, (_, o, *_) in before.items() if seq > 10} <= dirty
        assert journal.volume.pread(0, SIZE) == content
    finally:
        close(journal)


def test_resize_refuses_while_the_state_directory_is_locked(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    close(open_journal(config))
    with StateDirLock(config.unit.state_dir, "test"), pytest.raises(OfflineError, match="stop it"):
        resize_journal(config, "vol", 8 * MiB)
    assert (config.unit.state_dir / "vol.journal").stat().st_size == 4 * MiB
    assert not (config.unit.state_dir / "vol.journal.resize").exists()
