"""The journal file as a store: creation, the durable range write, and the opener hook."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from blockmirror.errors import JournalError
from blockmirror.io.fileio import IOV_MAX
from blockmirror.journal.checkpoint import SLOT_SIZE, read_checkpoint
from blockmirror.journal.journal import Journal
from blockmirror.journal.ring import DATA_START
from blockmirror.journal.storage import (
    DurableRangeWriter,
    JournalFile,
    as_store,
    open_journal_file,
    write_durable,
)
from blockmirror.store.base import Buffer, Store
from blockmirror.store.faulty import FaultyStore, Power
from blockmirror.store.volume import Volume

SIZE = DATA_START + 64 * 1024


def test_a_new_journal_file_is_preallocated(tmp_path: Path) -> None:
    path = tmp_path / "vol.journal"
    file = open_journal_file(path, SIZE)
    assert isinstance(file, JournalFile)
    assert file.size == SIZE and not file.read_only
    file.close()
    st = path.stat()
    assert st.st_size == SIZE and st.st_mode & 0o777 == 0o600
    assert st.st_blocks * 512 >= SIZE  # allocated, not sparse
    # An existing file is opened as it is, not recreated.
    file = open_journal_file(path, SIZE)
    file.pwrite(DATA_START, b"kept")
    file.close()
    file = open_journal_file(path, SIZE)
    assert file.pread(DATA_START, 4) == b"kept"
    file.close()


def test_no_space_to_preallocate_is_a_clear_error_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    path = tmp_path / "vol.journal"
    with pytest.raises(JournalError, match=r"cannot preallocate journal .*No space left"):
        JournalFile.create(path, SIZE)
    assert not path.exists()


def test_the_durable_write_syncs_only_its_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags: list[int] = []
    real = os.pwritev

    def spy(fd: int, buffers: list[bytes], offset: int, flag: int = 0) -> int:
        flags.append(flag)
        return real(fd, buffers, offset, flag)

    synced: list[int] = []
    real_sync = os.fdatasync

    def spy_sync(fd: int) -> None:
        synced.append(fd)
        real_sync(fd)

    monkeypatch.setattr(os, "pwritev", spy)
    monkeypatch.setattr(os, "fdatasync", spy_sync)
    with JournalFile.create(tmp_path / "vol.journal", SIZE) as file:
        assert isinstance(file, DurableRangeWriter)
        write_durable(file, SLOT_SIZE, b"x" * SLOT_SIZE)
        assert file.pread(SLOT_SIZE, SLOT_SIZE) == b"x" * SLOT_SIZE
    if getattr(os, "RWF_DSYNC", 0):
        assert flags == [os.RWF_DSYNC] and synced == []
    else:
        assert synced


def test_a_store_without_a_range_sync_is_written_and_flushed(tmp_path: Path) -> None:
    class Plain:
        """Just the Store methods write_durable may use, recording the calls."""

        def __init__(self, inner: Store) -> None:
            self.inner = inner
            self.calls: list[str] = []

        def pwrite(self, offset: int, data: bytes) -> None:
            self.calls.append("pwrite")
            self.inner.pwrite(offset, data)

        def flush(self) -> None:
            self.calls.append("flush")
            self.inner.flush()

    with Volume.open(tmp_path / "f", size=SIZE) as volume:
        plain = Plain(volume)
        write_durable(plain, 0, b"y" * 10)  # type: ignore[arg-type]
        assert plain.calls == ["pwrite", "flush"]
        assert volume.pread(0, 10) == b"y" * 10


def test_a_descriptor_is_borrowed_not_closed(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"z" * 100)
    fd = os.open(path, os.O_RDWR)
    try:
        store = as_store(fd)
        # It spans at least the checkpoint slots; past the file's end it reads zeros.
        assert store.size == DATA_START
        assert store.pread(0, 200) == b"z" * 100 + bytes(100)
        assert read_checkpoint(fd) is None
        assert os.fstat(fd).st_size == 100  # still open, unchanged
    finally:
        os.close(fd)


def test_the_journal_runs_on_the_store_its_opener_gives(tmp_path: Path) -> None:
    power = Power(seed=1)
    opened: list[tuple[Path, int]] = []

    def open_ring(path: Path, size: int) -> Store:
        opened.append((path, size))
        return FaultyStore(open_journal_file(path, size), power=power)

    volume = Volume.open(tmp_path / "vol.img", size=1024 * 1024)

    def journal() -> Journal:
        return Journal.open(
            tmp_path / "vol.journal",
            volume=volume,
            journal_size=SIZE,
            consumers=[],
            dirty_dir=tmp_path,
            volume_name="vol",
            open_ring=open_ring,
        )

    try:
        first = journal()
        assert isinstance(first.file, FaultyStore) and first.fd == -1
        first.close()
        # The checkpoint written at close went through the fault-injecting store: durable.
        assert first.file.unsynced_pages() == 0
        second = journal()
        assert second.recovery is not None and second.generation > 1
        second.close()
        assert opened == [(tmp_path / "vol.journal", SIZE)] * 2
    finally:
        volume.close()
        power.close()


def test_vectored_writes_survive_short_writes_and_many_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwritev

    def short(fd: int, buffers: list[bytes], offset: int, *flags: int) -> int:
        # At most 100 bytes per call, as a kernel interrupted by signals might.
        data = b"".join(bytes(b) for b in buffers)[:100]
        return real(fd, [data], offset, *flags)

    with JournalFile.create(tmp_path / "vol.journal", SIZE) as file:
        parts: list[Buffer] = [bytes([i]) * 37 for i in range(1, 40)]
        parts += [b"", memoryview(b"tail")]
        expected = b"".join(bytes(p) for p in parts)
        monkeypatch.setattr(os, "pwritev", short)
        file.pwritev(DATA_START + 8, parts)
        monkeypatch.undo()
        assert file.pread(DATA_START + 8, len(expected)) == expected
        many = [bytes([i % 251]) for i in range(IOV_MAX + 10)]
        file.pwritev(DATA_START, many)
        assert file.pread(DATA_START, len(many)) == b"".join(many)
        file.pwritev(0, [b"", b""])  # nothing to write
