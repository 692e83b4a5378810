"""skip_unchanged's filter alone: it skips only an equal rewrite, and only when safe."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from blockmirror.blockdev.unchanged import MAX_COMPARE, UnchangedFilter


@dataclass
class FakeVolume:
    data: bytearray
    cached: bool = True

    def read_cached(self, offset: int, buffers: Sequence[bytearray]) -> bool:
        if not self.cached:
            return False
        pos = offset
        for buf in buffers:
            buf[:] = self.data[pos : pos + len(buf)]
            pos += len(buf)
        return True


@dataclass
class FakeApplier:
    idle: bool = True
    remote_ack: object | None = None


@dataclass
class FakeCheckpointer:
    waiting: deque[object] = field(default_factory=deque)


def make(**volume: Any) -> tuple[UnchangedFilter, FakeVolume, FakeApplier, FakeCheckpointer]:
    vol = FakeVolume(bytearray(b"\x07" * 65536), **volume)
    applier, checkpointer = FakeApplier(), FakeCheckpointer()
    filt = UnchangedFilter(cast(Any, vol), cast(Any, applier), cast(Any, checkpointer))
    filt.enabled = True
    return filt, vol, applier, checkpointer


def test_an_equal_rewrite_is_skipped_and_counted() -> None:
    filt, _, _, _ = make()
    parts = [memoryview(b"\x07" * 4096), memoryview(b"\x07" * 8192)]
    assert filt.unchanged(4096, 12288, parts)
    assert filt.skipped_writes == 1 and filt.skipped_bytes == 12288


def test_one_changed_byte_anywhere_is_written() -> None:
    filt, _, _, _ = make()
    for at in (0, 4095, 4096, 12287):
        data = bytearray(b"\x07" * 12288)
        data[at] ^= 1
        assert not filt.unchanged(0, len(data), [memoryview(data)])
    assert filt.skipped_writes == 0


def test_nothing_is_skipped_when_it_would_not_be_safe() -> None:
    same = [memoryview(b"\x07" * 4096)]
    filt, vol, applier, checkpointer = make()
    filt.enabled = False
    assert not filt.unchanged(0, 4096, same)
    filt.enabled = True
    applier.idle = False  # an earlier write is still on its way to the volume
    assert not filt.unchanged(0, 4096, same)
    applier.idle = True
    applier.remote_ack = object()  # ack = "remote"
    assert not filt.unchanged(0, 4096, same)
    applier.remote_ack = None
    checkpointer.waiting.append(object())  # a request waits for journal room
    assert not filt.unchanged(0, 4096, same)
    checkpointer.waiting.clear()
    vol.cached = False  # not in the page cache: never wait for the disk
    assert not filt.unchanged(0, 4096, same)
    vol.cached = True
    assert not filt.unchanged(0, MAX_COMPARE + 4096, [memoryview(bytes(MAX_COMPARE + 4096))])
    assert filt.unchanged(0, 4096, same) and filt.skipped_writes == 1
