"""Shared fixtures: a running unit with one exported primary volume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.faultydisk import FaultyDisk
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
