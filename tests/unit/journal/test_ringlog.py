"""The journal's log: the write limit, staging, and the runs the link reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockmirror.journal import ringlog
from blockmirror.journal.format import HEADER_SIZE, Kind, verify_record
from blockmirror.journal.ring import DATA_START, Ring
from blockmirror.journal.ringlog import RecordsGone, RingLog
from blockmirror.journal.storage import JournalFile
from blockmirror.store import base

MiB = 1024 * 1024


def test_the_write_limit_is_the_write_paths() -> None:
    # One limit, defined by the store interface, for the journal and every write path.
    assert ringlog.MAX_WRITE is base.MAX_WRITE


@pytest.mark.parametrize(
    ("journal_size", "largest"),
    [(MiB, 256 * 1024), (16 * MiB, 8 * MiB), (64 * MiB, 32 * MiB), (1024 * MiB, 32 * MiB)],
)
def test_the_largest_write_is_the_documented_one(journal_size: int, largest: int) -> None:
    # docs/journal.md, "Appending": the largest power of two, at most 32 MiB, that fits.
    assert Ring(journal_size - DATA_START).max_write(ringlog.MAX_WRITE) == largest


@pytest.fixture
def log(tmp_path: Path) -> RingLog:
    ring = Ring(64 * 1024)
    return RingLog(
        tmp_path / "j", JournalFile.create(tmp_path / "j", DATA_START + ring.capacity), ring
    )


def test_staged_records_are_placed_and_read_back_as_journal_bytes(log: RingLog) -> None:
    log.origin = 5
    first = log.stage(Kind.WRITE, 0, 4096, [b"a" * 4096], timestamp_ns=1)
    second = log.stage(Kind.FLUSH, 0, 0)
    assert (first.seq, first.lpos, first.size, first.origin, first.data) == (1, 0, 4160, 5, ())
    assert (second.seq, second.lpos) == (2, 4160) and log.next_seq == 3
    assert log.batch_pending
    log.write_batch()
    assert log.written_seq == 2 and not log.batch_pending
    assert log.sync() == 2
    run, data = log.read_run(1, 2, 1 << 20)
    assert run == [first, second] and len(data) == 4160 + 64
    assert verify_record(data[:HEADER_SIZE], data[HEADER_SIZE:4160]).origin == 5
    assert log.read_payload(first) == b"a" * 4096
    # max_bytes bounds the run past its first record; last_seq bounds it too.
    assert log.read_run(1, 2, 100)[0] == [first]
    assert log.read_run(2, 1, 1 << 20) == ([], b"")
    assert log.read_run(3, 9, 1 << 20) == ([], b"")
    log.records.popleft()
    with pytest.raises(RecordsGone):
        log.read_run(1, 2, 1 << 20)
    log.abandon()
    assert log.fd == -1


def test_a_run_stops_at_the_wrap(log: RingLog) -> None:
    big = 20_000  # a record of 20064 bytes: three fill the ring up to 5344 bytes before its end
    placed = [log.stage(Kind.WRITE, 0, big, [bytes(big)]) for _ in range(3)]
    assert not log.fits(8192)
    log.records.popleft()  # freed by a durable checkpoint
    log.checkpoint_head_lpos = placed[1].lpos
    assert log.fits(8192)
    placed.append(log.stage(Kind.WRITE, 0, 8192, [b"w" * 8192]))
    log.write_batch()
    # The last did not fit before the end: a padding fills it and the record starts the lap.
    assert [r.lpos for r in placed] == [0, 20064, 40128, log.ring.capacity]
    run, data = log.read_run(2, 4, 1 << 20)
    assert [r.seq for r in run] == [2, 3] and len(data) == 2 * 20064
    run, data = log.read_run(4, 4, 1 << 20)
    assert [r.seq for r in run] == [4] and data[HEADER_SIZE:] == b"w" * 8192
    log.abandon()
