"""Fixtures for fault tests: a fresh unit per test (they start in ~0.2 s), so one bad input can
never leave state behind for the next test to trip over."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.fault.rawnbd import MiB
from tests.fault.target import Target
from tests.support.unit_process import running_unit

MakeTarget = Callable[..., Target]


@pytest.fixture
def make_target(tmp_path: Path) -> Iterator[MakeTarget]:
    """Start units on demand: ``make_target(size=..., read_only=...)``; all stopped at the end.

    A read-only volume is never created by the unit, so its image is made here, filled with a
    pattern so that reads return something worth comparing.
    """
    with ExitStack() as stack:
        count = 0

        def make(*, size: int = 8 * MiB, read_only: bool = False) -> Target:
            nonlocal count
            count += 1
            directory = tmp_path / f"unit{count}"
            directory.mkdir()
            image = directory / "vol.img"
            volume_keys: dict[str, object] = {}
            if read_only:
                image.write_bytes(random.Random(count).randbytes(size))
                volume_keys["read_only"] = True
            unit = stack.enter_context(running_unit(directory, size=size, **volume_keys))
            target = Target(unit, image, size, read_only, baseline="")
            target.rebase()
            return target

        yield make


@pytest.fixture
def target(make_target: MakeTarget) -> Target:
    """A unit exporting an 8 MiB sparse writable volume."""
    return make_target()
