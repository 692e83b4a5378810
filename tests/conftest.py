"""Shared fixtures: a running unit with one exported primary volume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.unit_process import UnitProcess, running_unit


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[UnitProcess]:
    """A unit serving a 64 MiB sparse primary volume ``vol`` at ``tmp_path/vol.img``."""
    with running_unit(tmp_path) as u:
        yield u
