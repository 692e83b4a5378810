"""The link route: parameters validated before anything changes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from blockmirror.admin.link_controls import handle_link_path
from blockmirror.link.compression import Codec
from blockmirror.link.settings import LinkSettings, Priority

PEER = "10.0.0.2:7800"


@dataclass
class FakeSender:
    consumer_name: str = PEER
    rates: list[int | None] = field(default_factory=list)
    settings: LinkSettings = field(default_factory=LinkSettings)
    calls: list[str] = field(default_factory=list)

    def set_rate(self, bits_per_second: int | None) -> None:
        self.rates.append(bits_per_second)
        self.calls.append("rate")

    def set_compression(self, codec: Codec, level: int) -> None:
        self.settings = LinkSettings(compression=codec, compression_level=level)
        self.calls.append("compression")

    def set_priority(self, priority: Priority) -> None:
        self.calls.append(f"priority={priority}")

    def status(self) -> dict[str, object]:
        return {"address": self.consumer_name, "rate_limit": self.rates[-1] if self.rates else None}


@dataclass
class FakeVolume:
    senders: list[FakeSender]


def call(
    method: str, path: str, query: str, sender: FakeSender
) -> tuple[int, dict[str, Any]] | None:
    volumes = {"db": FakeVolume([sender])}
    return asyncio.run(handle_link_path(volumes.__getitem__, method, path, query))


PATH = "/api/volumes/db/peers/10.0.0.2%3A7800/link"


def test_sets_the_rate_and_answers_the_peer() -> None:
    sender = FakeSender()
    assert call("POST", PATH, "bandwidth=10Mbit", sender) == (
        200,
        {"address": PEER, "rate_limit": 10_000_000},
    )
    assert call("POST", PATH, "bandwidth=none", sender) == (
        200,
        {"address": PEER, "rate_limit": None},
    )


@pytest.mark.parametrize(
    ("method", "path", "query", "code"),
    [
        ("GET", PATH, "bandwidth=1Mbit", 405),
        ("POST", PATH, "", 400),
        ("POST", PATH, "bandwidth=fast", 400),
        ("POST", PATH, "bandwidth=1Mbit&compression=gzip", 400),
        ("POST", PATH, "bandwidth=1Mbit&colour=red", 400),
        ("POST", PATH, "bandwidth=1Mbit&compression_level=0", 400),
        ("POST", PATH, "bandwidth=1Mbit&compression_level=x", 400),
        ("POST", PATH, "bandwidth=1Mbit&priority=low", 400),
        ("POST", PATH, "bandwidth=0", 400),
        ("POST", "/api/volumes/nope/peers/10.0.0.2%3A7800/link", "bandwidth=1Mbit", 404),
        ("POST", "/api/volumes/db/peers/10.0.0.9%3A7800/link", "bandwidth=1Mbit", 404),
    ],
)
def test_refusals_change_nothing(method: str, path: str, query: str, code: int) -> None:
    sender = FakeSender()
    reply = call(method, path, query, sender)
    assert reply is not None and reply[0] == code and "error" in reply[1]
    assert sender.rates == [] and sender.calls == []


def test_compression_and_priority_change_together() -> None:
    sender = FakeSender()
    reply = call("POST", PATH, "compression=zstd&compression_level=1&priority=background", sender)
    assert reply is not None and reply[0] == 200
    assert sender.settings.compression is Codec.ZSTD and sender.settings.compression_level == 1
    assert sender.calls == ["compression", "priority=background"]
    # A level alone keeps the codec.
    assert call("POST", PATH, "compression_level=7", sender) is not None
    assert sender.settings.compression is Codec.ZSTD and sender.settings.compression_level == 7


def test_other_paths_are_not_ours() -> None:
    assert call("POST", "/api/volumes/db/consumers/x/pause", "", FakeSender()) is None
    assert call("POST", "/api/status", "", FakeSender()) is None
