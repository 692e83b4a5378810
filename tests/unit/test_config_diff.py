"""config_diff: every key is placed in the table, and each kind of change is found."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from blockmirror.addresses import parse_address
from blockmirror.config import Config, ReplicationConfig, UnitConfig, VolumeConfig
from blockmirror.config_alerts import AlertsConfig
from blockmirror.config_diff import TABLE, ChangeKind, Live, diff


def _volume(name: str = "db", **changes: Any) -> VolumeConfig:
    base = VolumeConfig(
        name=name,
        role="primary",
        path=Path(f"/srv/{name}.img"),
        size=1 << 30,
        export=parse_address("127.0.0.1:10809"),
        peers=(parse_address("10.0.0.2:7800"),),
    )
    return dataclasses.replace(base, **changes)


def _config(*volumes: VolumeConfig, **unit: Any) -> Config:
    u = dataclasses.replace(UnitConfig(name="site-a", state_dir=Path("/var/lib/bm")), **unit)
    return Config(unit=u, replication=ReplicationConfig(), volumes=volumes)


@pytest.mark.parametrize(
    ("table", "cls"),
    [("unit", UnitConfig), ("replication", ReplicationConfig), ("volume", VolumeConfig)],
)
def test_every_key_is_in_the_table(table: str, cls: type) -> None:
    keys = {f.name for f in dataclasses.fields(cls)}
    assert keys == set(TABLE[table]), "place the new key in config_diff.TABLE"
    for live, reason in TABLE[table].values():
        assert live is Live.LIVE or len(reason) > 10


def test_config_tables_are_all_covered() -> None:
    tables = {f.name for f in dataclasses.fields(Config)} - {"source", "warnings"}
    assert tables == {"unit", "replication", "volumes", "alerts", "iscsi", "archives"}


def test_nothing_differs() -> None:
    assert diff(_config(_volume()), _config(_volume())).empty


def test_volumes_added_and_removed_by_name() -> None:
    d = diff(_config(_volume("db")), _config(_volume("logs")))
    assert [(c.kind, c.volume) for c in d.changes] == [
        (ChangeKind.VOLUME_REMOVED, "db"),
        (ChangeKind.VOLUME_ADDED, "logs"),
    ]
    assert not d.refused


def test_peers_added_and_removed_by_address() -> None:
    old = _config(_volume())
    new = _config(_volume(peers=(parse_address("10.0.0.3:7800"),)))
    d = diff(old, new)
    assert [(c.kind, c.peer) for c in d.changes] == [
        (ChangeKind.PEER_REMOVED, "10.0.0.2:7800"),
        (ChangeKind.PEER_ADDED, "10.0.0.3:7800"),
    ]
    assert d.changes[0].describe() == "volume db: peer 10.0.0.2:7800 removed"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("journal_high_water", 0.5),
        ("overflow", "block"),
        ("ack_timeout", 5.0),
        ("description", "the database"),
        ("tls_peers", ("site-b",)),
        ("history_size", 64 << 20),
        ("replay_delay", 60.0),
        ("export", parse_address("127.0.0.1:10810")),
        ("psk_file", Path("/etc/bm/db.key")),
    ],
)
def test_live_volume_settings(key: str, value: object) -> None:
    d = diff(_config(_volume()), _config(_volume("db", **{key: value})))
    assert not d.refused
    [change] = d.changes
    assert change.kind is ChangeKind.SETTING and change.key == f"volume[db].{key}"
    assert change.volume == "db" and change.new == value


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("path", Path("/srv/other.img"), "opened at start"),
        ("size", 2 << 30, "fixed while hosts use it"),
        ("offset", 4096, "fixed"),
        ("journal_size", 2 << 30, "journal resize"),
        ("read_only", True, "told at connect"),
        ("journal", False, "opened (or not)"),
        ("ack", "remote", "acknowledgement mode"),
    ],
)
def test_restart_only_volume_settings_are_refused(key: str, value: object, reason: str) -> None:
    d = diff(_config(_volume()), _config(_volume("db", **{key: value})))
    [(refused_key, message)] = d.refused
    assert refused_key == f"volume[db].{key}" and reason in message
    assert "changes only at a restart" in message


def test_history_on_or_off_is_refused_but_longer_is_live() -> None:
    on = diff(_config(_volume()), _config(_volume(history=3600.0)))
    assert on.refused and on.refused[0][0] == "volume[db].history"
    longer = diff(_config(_volume(history=60.0)), _config(_volume(history=3600.0)))
    assert not longer.refused and longer.changes[0].key == "volume[db].history"


def test_a_role_edit_is_a_note_not_a_change() -> None:
    d = diff(_config(_volume()), _config(_volume(role="secondary")))
    assert not d.changes and not d.refused
    assert "promote" in d.notes[0]


def test_unit_and_replication_keys() -> None:
    d = diff(_config(_volume()), _config(_volume(), nbd_max_connections=8, name="site-z"))
    assert [c.key for c in d.changes] == ["unit.nbd_max_connections"]
    assert [k for k, _ in d.refused] == ["unit.name"]
    old = _config(_volume())
    new = dataclasses.replace(
        old,
        replication=ReplicationConfig(
            listen=parse_address("0.0.0.0:7800"), psk_file=Path("/etc/bm/psk")
        ),
    )
    d = diff(old, new)
    assert [c.key for c in d.changes] == ["replication.psk_file"]
    assert [k for k, _ in d.refused] == ["replication.listen"]


def test_alerts_are_live() -> None:
    old = _config(_volume())
    new = dataclasses.replace(old, alerts=AlertsConfig(rpo_seconds=30.0))
    d = diff(old, new)
    assert [(c.kind, c.key) for c in d.changes] == [(ChangeKind.SETTING, "alerts")]
