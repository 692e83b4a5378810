"""Shared fixtures: a running unit with one exported primary volume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.faultydisk import FaultyDisk, Machine
from tests.support.unit_process import UnitProcess, running_unit


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[UnitProcess]:
    """A unit serving a 64 MiB sparse primary volume ``vol`` at ``tmp_path/vol.img``."""
    with running_unit(tmp_path) as u:
        yield u


@pytest.fixture
def faulty_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyDisk]:
    """Every file under ``tmp_path`` on a disk that fails on request and loses power."""
    disk = FaultyDisk(tmp_path)
    with disk.installed(monkeypatch):
        yield disk


# The files of the state directory that are stores: the fault-injecting store models them.
STORE_FILES = (".img", ".journal")


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Machine]:
    """Volumes and journals under ``tmp_path`` on fault-injecting stores (open them with
    ``machine.open_volume`` and ``Journal.open(open_ring=machine.open_journal_file)``), the
    other files (dirty maps) on a :class:`FaultyDisk`; one power supply for all of them."""
    disk = FaultyDisk(tmp_path, skip=STORE_FILES)
    with disk.installed(monkeypatch):
        machine = Machine(disk)
        try:
            yield machine
        finally:
            machine.close()
