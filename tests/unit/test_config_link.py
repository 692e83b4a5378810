"""Link settings in the configuration: [replication] defaults, per-peer overrides, problems."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from blockmirror.config import parse_config
from blockmirror.errors import ConfigError
from blockmirror.link.compression import Codec
from blockmirror.link.settings import ConnectMode, LinkSettings, Priority


def config(tmp_path: Path, replication: dict[str, Any], peers: list[Any]) -> dict[str, Any]:
    return {
        "unit": {"name": "site-a", "state_dir": str(tmp_path / "state")},
        "replication": replication,
        "volume": [
            {
                "name": "db",
                "role": "primary",
                "path": str(tmp_path / "db.img"),
                "size": "1MiB",
                "export": "127.0.0.1:0",
                "peers": peers,
                "skip_unchanged": True,
            }
        ],
    }


def problems(data: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=tmp_path, check_paths=False)
    return dict(info.value.problems)


def test_defaults_and_overrides_merge_key_by_key(tmp_path: Path) -> None:
    data = config(
        tmp_path,
        {
            "compression": "zstd",
            "compression_level": 1,
            "bandwidth": "1544kbit",
            "transmit_windows": ["22:00-06:00", "Sat 00:00-Mon 06:00"],
        },
        [
            "10.0.0.2:7800",
            {"address": "10.0.0.3:7800", "bandwidth": "none", "priority": "background"},
            {"address": "10.0.0.4:7800", "connect": "windows", "compression": "none"},
        ],
    )
    cfg = parse_config(data, base_dir=tmp_path, check_paths=False)
    base = cfg.replication.link
    assert base.compression is Codec.ZSTD and base.compression_level == 1
    assert base.bandwidth == 1_544_000 and cfg.replication.bandwidth == 1_544_000
    assert [str(w) for w in base.transmit_windows] == ["22:00-06:00", "Sat 00:00-Mon 06:00"]
    vol = cfg.volume("db")
    assert vol.skip_unchanged
    assert vol.link_of("10.0.0.2:7800", base) == base
    b = vol.link_of("10.0.0.3:7800", base)
    assert b.bandwidth is None and b.priority is Priority.BACKGROUND and b.compression is Codec.ZSTD
    c = vol.link_of("10.0.0.4:7800", base)
    assert c.connect is ConnectMode.WINDOWS and c.compression is Codec.NONE
    assert c.transmit_windows == base.transmit_windows and c.bandwidth == 1_544_000


def test_nothing_set_means_the_plain_link(tmp_path: Path) -> None:
    cfg = parse_config(
        config(tmp_path, {}, ["10.0.0.2:7800"]), base_dir=tmp_path, check_paths=False
    )
    assert cfg.replication.link == LinkSettings()


@pytest.mark.parametrize(
    ("replication", "peer", "key", "reason"),
    [
        ({"compression": "gzip"}, None, "replication.compression", "not one of"),
        ({"compression_level": 0}, None, "replication.compression_level", "outside"),
        ({"compression_level": "3"}, None, "replication.compression_level", "an integer"),
        ({"priority": "low"}, None, "replication.priority", "not one of"),
        ({"transmit_windows": "22:00-06:00"}, None, "replication.transmit_windows", "an array"),
        ({"transmit_windows": ["22:00-6"]}, None, "replication.transmit_windows", "not a window"),
        ({"transmit_windows": [22]}, None, "replication.transmit_windows", "expected a string"),
        ({"connect": "windows"}, None, "replication.connect", "needs transmit_windows"),
        ({}, {"connect": "windows"}, "volume[db].peers", "needs transmit_windows"),
        ({}, {"compression_level": 99}, "volume[db].peers[0].compression_level", "outside"),
        ({}, {"colour": "red"}, "volume[db].peers[0].colour", "unknown key"),
    ],
)
def test_bad_link_settings_are_named(
    tmp_path: Path, replication: dict[str, Any], peer: dict[str, Any] | None, key: str, reason: str
) -> None:
    peers: list[Any] = [{"address": "10.0.0.2:7800", **peer}] if peer else ["10.0.0.2:7800"]
    found = problems(config(tmp_path, replication, peers), tmp_path)
    assert key in found and reason in found[key], found
