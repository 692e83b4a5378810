"""Fixtures for fault tests: live units to attack.

``target`` is one unit per test module, shared by its tests (a unit takes ~0.3 s to start and
stop, and these modules have dozens of cases). Sharing is safe because every test starts from a
fresh baseline hash and ends with ``assert_healthy``; a test that did break the unit fails itself,
and the next one fails at once in the fixture, naming the unit as already dead.
``make_target`` starts private units with other settings (size, read-only).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.fault.rawnbd import MiB
from tests.fault.target import Target
from tests.support.unit_process import running_unit

MakeTarget = Callable[..., Target]


class _Units:
    """Starts units under one directory and stops them all on close."""

    def __init__(self, directory: Path, stack: ExitStack) -> None:
        self.directory = directory
        self.stack = stack
        self.count = 0

    def make(self, *, size: int = 8 * MiB, read_only: bool = False) -> Target:
        # A read-only volume is never created by the unit, so its image is made here, filled
        # with a pattern so that reads return something worth comparing.
        self.count += 1
        directory = self.directory / f"unit{self.count}"
        directory.mkdir()
        image = directory / "vol.img"
        volume_keys: dict[str, Any] = {}
        if read_only:
            image.write_bytes(random.Random(self.count).randbytes(size))
            volume_keys["read_only"] = True
        unit = self.stack.enter_context(running_unit(directory, size=size, **volume_keys))
        target = Target(unit, image, size, read_only, baseline="")
        target.rebase()
        return target


@pytest.fixture
def make_target(tmp_path: Path) -> Iterator[MakeTarget]:
    """``make_target(size=..., read_only=...)`` starts a private unit, stopped after the test."""
    with ExitStack() as stack:
        yield _Units(tmp_path, stack).make


@pytest.fixture(scope="module")
def _module_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with ExitStack() as stack:
        yield _Units(tmp_path_factory.mktemp("fault"), stack).make()


@pytest.fixture
def target(_module_target: Target) -> Target:
    """The module's unit (8 MiB sparse writable volume), idle, with a fresh baseline hash."""
    assert _module_target.alive(), "an earlier test in this module killed the unit"
    _module_target.wait_idle()
    _module_target.rebase()
    return _module_target
