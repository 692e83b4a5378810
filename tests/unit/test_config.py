"""The TOML configuration contract: valid files load exactly, every problem is named at once."""

from __future__ import annotations

import copy
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockmirror import config_paths
from blockmirror.config import (
    Address,
    Config,
    ReplicationConfig,
    UnitConfig,
    VolumeConfig,
    format_problems,
    load_config,
    parse_address,
    parse_config,
)
from blockmirror.errors import BlockmirrorError, ConfigError
from blockmirror.units import GiB, KiB, MiB

Problems = list[tuple[str, str]]
IS_ROOT = os.geteuid() == 0


# --------------------------------------------------------------------------- helpers


def minimal(tmp_path: Path) -> dict[str, Any]:
    """A small valid config as parsed TOML; tests break one thing in it."""
    return {
        "unit": {"name": "site-a", "state_dir": str(tmp_path / "state")},
        "volume": [
            {
                "name": "db",
                "role": "primary",
                "path": str(tmp_path / "db.img"),
                "size": "1MiB",
                "export": "127.0.0.1:0",
            }
        ],
    }


def problems_of(data: dict[str, Any], tmp_path: Path, *, check_paths: bool = True) -> Problems:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=tmp_path, check_paths=check_paths)
    assert info.value.problems, "ConfigError without problems"
    return info.value.problems


def keys_of(problems: Problems) -> list[str]:
    return [key for key, _ in problems]


def message_for(problems: Problems, key: str) -> str:
    found = [message for k, message in problems if k == key]
    assert found, f"no problem for {key!r} in {problems}"
    return found[0]


def with_volume(tmp_path: Path, **changes: object) -> dict[str, Any]:
    data = minimal(tmp_path)
    volume = data["volume"][0]
    for name, value in changes.items():
        if value is None:
            volume.pop(name, None)
        else:
            volume[name] = value
    return data


def make_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def deny_access(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path, int], None]]:
    """Make os.access refuse some modes for some paths: root passes every real permission check."""
    denied: dict[str, int] = {}
    real_access = os.access

    def fake_access(path: Any, mode: int, *args: Any, **kwargs: Any) -> bool:
        refused = denied.get(os.fspath(path), 0)
        if mode & refused:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", fake_access)

    def deny(path: Path, mode: int) -> None:
        denied[os.fspath(path)] = mode

    yield deny


# --------------------------------------------------------------------------- valid configs


FULL_TOML = """
[unit]
name = "site-a"
state_dir = "state/site-a"                 # relative: resolved against this file's directory
admin = "127.0.0.1:7700"

[replication]
listen = "0.0.0.0:7800"
psk_file = "psk"
tls_cert = "tls/cert.pem"
tls_key = "tls/key.pem"
tls_ca = "tls/ca.pem"

[[volume]]
name = "db"
role = "primary"
path = "db.img"
offset = 0
size = "10GiB"
export = "127.0.0.1:10809"
journal_size = "1GiB"
journal_high_water = 0.75
overflow = "block"
ack = "remote"
ack_timeout = 12.5
peers = ["site-b.example:7800", "[2001:db8::7]:7800"]
description = "the database disk"

[[volume]]
name = "logs"
role = "secondary"
path = "shared.img"
offset = "1MiB"
size = 4096
read_only = true
"""


def test_full_config_loads_with_every_field(tmp_path: Path) -> None:
    (tmp_path / "psk").write_text("a-long-enough-secret-key\n")
    (tmp_path / "tls").mkdir()
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / "tls" / name).write_text("pem")
    make_file(tmp_path / "shared.img", 2 * MiB)
    config_file = tmp_path / "unit.toml"
    config_file.write_text(FULL_TOML)

    config = load_config(config_file)

    assert config.source == config_file
    assert config.unit == UnitConfig(
        "site-a", tmp_path / "state" / "site-a", Address("127.0.0.1", 7700)
    )
    assert config.replication == ReplicationConfig(
        listen=Address("0.0.0.0", 7800),
        psk_file=tmp_path / "psk",
        tls_cert=tmp_path / "tls" / "cert.pem",
        tls_key=tmp_path / "tls" / "key.pem",
        tls_ca=tmp_path / "tls" / "ca.pem",
    )
    db, logs = config.volumes
    assert db == VolumeConfig(
        name="db",
        role="primary",
        path=tmp_path / "db.img",
        offset=0,
        size=10 * GiB,
        export=Address("127.0.0.1", 10809),
        read_only=False,
        journal_size=GiB,
        journal_high_water=0.75,
        overflow="block",
        ack="remote",
        ack_timeout=12.5,
        peers=(Address("site-b.example", 7800), Address("2001:db8::7", 7800)),
        description="the database disk",
    )
    assert logs == VolumeConfig(
        name="logs",
        role="secondary",
        path=tmp_path / "shared.img",
        offset=MiB,
        size=4096,
        read_only=True,
    )
    assert config.volume("logs") is logs
    with pytest.raises(KeyError):
        config.volume("nope")
    # The unit's own files were only looked at, never created.
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "db.img").exists()


def test_defaults_of_a_minimal_volume(tmp_path: Path) -> None:
    config = parse_config(minimal(tmp_path), base_dir=tmp_path)
    assert config.source is None
    assert config.unit.admin is None
    assert config.replication == ReplicationConfig()
    (volume,) = config.volumes
    assert volume.offset == 0
    assert volume.read_only is False
    assert volume.journal_size == GiB
    assert volume.journal_high_water == 0.8
    assert volume.overflow == "track"
    assert volume.ack == "local"
    assert volume.ack_timeout == 30.0
    assert volume.peers == ()
    assert volume.description == ""
    assert volume.export == Address("127.0.0.1", 0)


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "u.toml").write_text(
        '[unit]\nname = "u"\nstate_dir = "st"\n'
        '[[volume]]\nname = "v"\nrole = "primary"\npath = "v.img"\nsize = "1MiB"\n'
        'export = "localhost:0"\n'
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/u.toml"))
    assert config.unit.state_dir == conf_dir / "st"
    assert config.volumes[0].path == conf_dir / "v.img"
    assert config.volumes[0].path.is_absolute()


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    config = parse_config(minimal(tmp_path), base_dir=Path("/somewhere/else"))
    assert config.volumes[0].path == tmp_path / "db.img"


def test_ephemeral_ports_allowed_for_listeners(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["unit"]["admin"] = "127.0.0.1:0"
    data["replication"] = {"listen": "127.0.0.1:0"}
    data["volume"].append(
        {"name": "v2", "role": "primary", "path": str(tmp_path / "v2.img"), "size": 512}
        | {"export": "127.0.0.1:0"}
    )
    config = parse_config(data, base_dir=tmp_path)
    # Port 0 never counts as a clash: each listener gets its own ephemeral port.
    assert [v.export for v in config.volumes] == [Address("127.0.0.1", 0)] * 2


def test_secondary_needs_no_export(tmp_path: Path) -> None:
    data = with_volume(tmp_path, role="secondary", export=None)
    data["replication"] = {"listen": "127.0.0.1:0"}
    assert parse_config(data, base_dir=tmp_path).volumes[0].export is None


def test_dataclasses_are_frozen(tmp_path: Path) -> None:
    config = parse_config(minimal(tmp_path), base_dir=tmp_path)
    with pytest.raises(AttributeError):
        config.unit.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.volumes[0].size = 1  # type: ignore[misc]


def test_config_object_can_be_built_directly(tmp_path: Path) -> None:
    volume = VolumeConfig(name="v", role="secondary", path=tmp_path / "v", size=512)
    config = Config(UnitConfig("u", tmp_path), volumes=(volume,))
    assert config.replication == ReplicationConfig()
    assert config.volume("v").journal_size == GiB


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("127.0.0.1:10809", "127.0.0.1", 10809, "127.0.0.1:10809"),
        ("localhost:1", "localhost", 1, "localhost:1"),
        ("site-b.example:65535", "site-b.example", 65535, "site-b.example:65535"),
        ("[::1]:7800", "::1", 7800, "[::1]:7800"),
        ("[2001:db8::1]:80", "2001:db8::1", 80, "[2001:db8::1]:80"),
        (" 0.0.0.0:7800 ", "0.0.0.0", 7800, "0.0.0.0:7800"),
    ],
)
def test_parse_address_accepts(text: str, host: str, port: int, shown: str) -> None:
    address = parse_address(text, "k")
    assert address == Address(host, port)
    assert str(address) == shown
    assert parse_address(str(address), "k") == address


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("localhost", "expected HOST:PORT"),
        ("", "expected HOST:PORT"),
        (":7800", "missing host"),
        ("::1:7800", "needs brackets"),
        ("[zz]:7800", "not an IPv6 address"),
        ("[::1]", "expected [IPV6]:PORT"),
        ("[::1:80", "expected [IPV6]:PORT"),
        ("[::1]80", "expected [IPV6]:PORT"),
        ("[]:80", "not an IPv6 address"),
        ("[127.0.0.1]:80", "not an IPv6 address"),
        ("[::1]:http", "not a number"),
        ("host:http", "not a number"),
        ("host:", "not a number"),
        ("host:-1", "not a number"),
        ("host:70000", "out of range 1..65535"),
        ("host:0", "out of range 1..65535"),
        ("host:" + "9" * 5000, "out of range"),
        ("bad host:80", "not a valid host name"),
        ("-bad.example:80", "not a valid host name"),
        ("a..b:80", "not a valid host name"),
        ("999.1.1.1:80", "not a valid host name"),
        ("h\u00e9:80", "not a valid host name"),
    ],
)
def test_parse_address_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(text, "volume[db].export")
    ((key, message),) = info.value.problems
    assert key == "volume[db].export"
    assert fragment in message


def test_parse_address_port_zero_only_when_allowed() -> None:
    assert parse_address("127.0.0.1:0", "k", allow_zero=True) == Address("127.0.0.1", 0)
    with pytest.raises(ConfigError, match="0 picks an ephemeral port"):
        parse_address("127.0.0.1:65536", "k", allow_zero=True)


# --------------------------------------------------------------------------- file-level problems


def test_toml_syntax_error_is_reported_on_file(tmp_path: Path) -> None:
    config_file = tmp_path / "bad.toml"
    config_file.write_text('[unit]\nname = "a\n')
    with pytest.raises(ConfigError) as info:
        load_config(config_file)
    ((key, message),) = info.value.problems
    assert key == "file"
    assert "invalid TOML" in message
    assert str(config_file) in message
    assert "line 2" in message


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml")
    ((key, message),) = info.value.problems
    assert key == "file"
    assert "cannot read" in message
    assert "absent.toml" in message


def test_directory_as_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert keys_of(info.value.problems) == ["file"]


@pytest.mark.skipif(IS_ROOT, reason="root can read any file")
def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    config_file = tmp_path / "secret.toml"
    config_file.write_text("")
    config_file.chmod(0)
    with pytest.raises(ConfigError) as info:
        load_config(config_file)
    assert keys_of(info.value.problems) == ["file"]


def test_non_utf8_file_is_reported(tmp_path: Path) -> None:
    config_file = tmp_path / "latin1.toml"
    config_file.write_bytes(b'[unit]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(config_file)
    ((key, message),) = info.value.problems
    assert key == "file"
    assert "UTF-8" in message


def test_config_error_is_ours_and_readable(tmp_path: Path) -> None:
    problems = problems_of(with_volume(tmp_path, size=0), tmp_path)
    error = ConfigError(problems)
    assert isinstance(error, BlockmirrorError)
    assert "volume[db].size: must be greater than 0" in str(error)


def test_format_problems_one_line_each() -> None:
    text = format_problems([("unit.name", "missing required key"), ("volume[0].size", "bad")])
    assert text == "unit.name: missing required key\nvolume[0].size: bad"


# --------------------------------------------------------------------------- keys and types


def test_unknown_keys_in_every_table(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["unit"]["nmae"] = "x"
    data["replication"] = {"listne": "0.0.0.0:7800"}
    data["volume"][0]["sise"] = "1GiB"
    data["volumes"] = []
    problems = problems_of(data, tmp_path)
    assert set(keys_of(problems)) == {
        "unit.nmae",
        "replication.listne",
        "volume[db].sise",
        "volumes",
    }
    assert "did you mean 'name'?" in message_for(problems, "unit.nmae")
    assert "allowed keys: name, state_dir, admin" in message_for(problems, "unit.nmae")
    assert "did you mean 'listen'?" in message_for(problems, "replication.listne")
    sise = message_for(problems, "volume[db].sise")
    assert "did you mean 'size'?" in sise
    assert "journal_high_water" in sise  # every allowed key is listed
    assert "unit, replication, volume" in message_for(problems, "volumes")


@pytest.mark.parametrize(
    ("table", "key", "value", "expected"),
    [
        ("unit", "name", 5, "expected a string, got an integer"),
        ("unit", "state_dir", ["a"], "expected a string, got an array"),
        ("unit", "admin", 7700, "expected a string"),
        ("volume", "read_only", "yes", "expected true or false, got a string"),
        ("volume", "size", True, "got a boolean"),
        ("volume", "size", 1.5, "got a float"),
        ("volume", "offset", 0.0, "got a float"),
        ("volume", "journal_high_water", "0.5", "expected a number, got a string"),
        ("volume", "journal_high_water", True, "got a boolean"),
        ("volume", "ack_timeout", "30s", "expected a number"),
        ("volume", "peers", "site-b:7800", "expected an array"),
        ("volume", "description", 3, "expected a string"),
        ("volume", "role", 1, "expected a string"),
        ("volume", "export", {"host": "x"}, "got a table"),
    ],
)
def test_wrong_types(tmp_path: Path, table: str, key: str, value: object, expected: str) -> None:
    data = minimal(tmp_path)
    if table == "unit":
        data["unit"][key] = value
        full_key = f"unit.{key}"
    else:
        data["volume"][0][key] = value
        full_key = f"volume[db].{key}"
    problems = problems_of(data, tmp_path)
    assert expected in message_for(problems, full_key)


def test_wrong_type_for_peer_entry(tmp_path: Path) -> None:
    problems = problems_of(with_volume(tmp_path, peers=["a:1", 7800]), tmp_path)
    assert "got an integer" in message_for(problems, "volume[db].peers[1]")


@pytest.mark.parametrize("table", ["unit", "replication"])
def test_table_of_wrong_type(tmp_path: Path, table: str) -> None:
    data = minimal(tmp_path)
    data[table] = "oops"
    problems = problems_of(data, tmp_path)
    assert f"expected a [{table}] table" in message_for(problems, table)


def test_volume_must_be_an_array_of_tables(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["volume"] = {"name": "db"}
    assert "expected [[volume]] tables" in message_for(problems_of(data, tmp_path), "volume")
    data["volume"] = ["db"]
    assert "expected a table" in message_for(problems_of(data, tmp_path), "volume[0]")


@pytest.mark.parametrize("volumes", [None, []])
def test_at_least_one_volume(tmp_path: Path, volumes: list[object] | None) -> None:
    data = minimal(tmp_path)
    if volumes is None:
        del data["volume"]
    else:
        data["volume"] = volumes
    problems = problems_of(data, tmp_path)
    assert keys_of(problems) == ["volume"]
    assert "at least one" in problems[0][1]


@pytest.mark.parametrize("key", ["name", "state_dir"])
def test_missing_unit_keys(tmp_path: Path, key: str) -> None:
    data = minimal(tmp_path)
    del data["unit"][key]
    problems = problems_of(data, tmp_path)
    assert problems == [(f"unit.{key}", "missing required key")]


def test_missing_unit_table_reports_its_required_keys(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    del data["unit"]
    assert keys_of(problems_of(data, tmp_path)) == ["unit.name", "unit.state_dir"]


@pytest.mark.parametrize("key", ["role", "path", "size"])
def test_missing_volume_keys(tmp_path: Path, key: str) -> None:
    problems = problems_of(with_volume(tmp_path, **{key: None}), tmp_path)
    assert (f"volume[db].{key}", "missing required key") in problems


def test_missing_volume_name_uses_the_index(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    first = copy.deepcopy(data["volume"][0]) | {"name": "first", "path": str(tmp_path / "1.img")}
    data["volume"].insert(0, first)
    data["volume"][0]["export"] = "127.0.0.1:0"
    del data["volume"][1]["name"]
    problems = problems_of(data, tmp_path)
    assert problems == [("volume[1].name", "missing required key")]


@pytest.mark.parametrize("path", ["", "a\0b"])
def test_empty_path(tmp_path: Path, path: str) -> None:
    problems = problems_of(with_volume(tmp_path, path=path), tmp_path)
    assert "non-empty path" in message_for(problems, "volume[db].path")


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("size", "10 GB", "did you mean GiB"),
        ("size", "ten", "'ten'"),
        ("size", "", "empty"),
        ("offset", "1.1KiB", "not a whole number"),
        ("journal_size", "1 XB", "unknown unit"),
    ],
)
def test_malformed_sizes(tmp_path: Path, key: str, value: str, fragment: str) -> None:
    problems = problems_of(with_volume(tmp_path, **{key: value}), tmp_path)
    message = message_for(problems, f"volume[db].{key}")
    assert fragment in message
    assert key in message


def test_size_zero(tmp_path: Path) -> None:
    problems = problems_of(with_volume(tmp_path, size="0GiB"), tmp_path)
    assert problems == [("volume[db].size", "must be greater than 0")]


@pytest.mark.parametrize("offset", [-512, "-1KiB"])
def test_negative_offset(tmp_path: Path, offset: object) -> None:
    problems = problems_of(with_volume(tmp_path, offset=offset), tmp_path)
    assert keys_of(problems) == ["volume[db].offset"]
    assert "negative" in problems[0][1]


@pytest.mark.parametrize(("key", "value"), [("size", 1000), ("size", "0.75KiB"), ("offset", 100)])
def test_unaligned_size_and_offset(tmp_path: Path, key: str, value: object) -> None:
    problems = problems_of(with_volume(tmp_path, **{key: value}), tmp_path)
    assert keys_of(problems) == [f"volume[db].{key}"]
    assert "multiple of 512" in problems[0][1]


def test_region_beyond_largest_offset(tmp_path: Path) -> None:
    problems = problems_of(with_volume(tmp_path, offset="8388608TiB"), tmp_path, check_paths=False)
    assert "largest possible file offset" in message_for(problems, "volume[db].size")


@pytest.mark.parametrize("value", ["1023KiB", "512KiB", 0])
def test_journal_too_small(tmp_path: Path, value: object) -> None:
    problems = problems_of(with_volume(tmp_path, journal_size=value), tmp_path)
    assert keys_of(problems) == ["volume[db].journal_size"]
    assert "minimum of 1 MiB" in problems[0][1]


def test_journal_of_exactly_one_mib(tmp_path: Path) -> None:
    config = parse_config(with_volume(tmp_path, journal_size="1MiB"), base_dir=tmp_path)
    assert config.volumes[0].journal_size == MiB


@pytest.mark.parametrize("value", [0, 1, 0.0, 1.0, 1.5, -0.1, float("nan"), float("inf")])
def test_journal_high_water_out_of_range(tmp_path: Path, value: float) -> None:
    problems = problems_of(with_volume(tmp_path, journal_high_water=value), tmp_path)
    assert keys_of(problems) == ["volume[db].journal_high_water"]
    assert "between 0 and 1" in problems[0][1]


@pytest.mark.parametrize("value", [0, -1, 0.0, float("inf"), float("nan")])
def test_ack_timeout_must_be_positive(tmp_path: Path, value: float) -> None:
    problems = problems_of(with_volume(tmp_path, ack_timeout=value), tmp_path)
    assert keys_of(problems) == ["volume[db].ack_timeout"]


def test_integer_ack_timeout_becomes_float(tmp_path: Path) -> None:
    config = parse_config(with_volume(tmp_path, ack_timeout=5), base_dir=tmp_path)
    assert config.volumes[0].ack_timeout == 5.0
    assert isinstance(config.volumes[0].ack_timeout, float)


@pytest.mark.parametrize(
    ("key", "value"),
    [("role", "Primary"), ("role", "replica"), ("ack", "sync"), ("overflow", "drop"), ("ack", "")],
)
def test_invalid_choices(tmp_path: Path, key: str, value: str) -> None:
    problems = problems_of(with_volume(tmp_path, **{key: value}), tmp_path)
    assert keys_of(problems) == [f"volume[db].{key}"]
    assert f"{value!r} is not one of" in problems[0][1]


def test_ack_remote_needs_peers(tmp_path: Path) -> None:
    problems = problems_of(with_volume(tmp_path, ack="remote"), tmp_path)
    assert keys_of(problems) == ["volume[db].ack"]
    data = with_volume(tmp_path, ack="remote", peers=["site-b:7800"])
    assert parse_config(data, base_dir=tmp_path).volumes[0].ack == "remote"


@pytest.mark.parametrize(
    "name", ["", "a/b", "a b", "x" * 256, ".", "..", "caf\u00e9", "db\n", "name:1"]
)
def test_invalid_volume_names(tmp_path: Path, name: str) -> None:
    problems = problems_of(with_volume(tmp_path, name=name), tmp_path)
    # An unusable name cannot label the volume, so its position does.
    assert keys_of(problems) == ["volume[0].name"]
    assert "not a valid volume name" in problems[0][1]


@pytest.mark.parametrize("name", ["db", "x" * 255, "a.b_c-D9", "..x", "-"])
def test_valid_volume_names(tmp_path: Path, name: str) -> None:
    config = parse_config(with_volume(tmp_path, name=name), base_dir=tmp_path)
    assert config.volumes[0].name == name


def test_invalid_unit_name(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["unit"]["name"] = "site a"
    assert keys_of(problems_of(data, tmp_path)) == ["unit.name"]


def test_primary_without_export(tmp_path: Path) -> None:
    problems = problems_of(with_volume(tmp_path, export=None), tmp_path)
    assert keys_of(problems) == ["volume[db].export"]
    assert "primary" in problems[0][1]


def test_secondary_needs_replication_listen(tmp_path: Path) -> None:
    problems = problems_of(with_volume(tmp_path, role="secondary"), tmp_path)
    assert keys_of(problems) == ["replication.listen"]
    assert "volume[db] is a secondary" in problems[0][1]


@pytest.mark.parametrize(
    ("where", "value", "fragment"),
    [
        ("export", "127.0.0.1:70000", "out of range 0..65535"),
        ("export", "127.0.0.1:-5", "not a number"),
        ("export", "127.0.0.1", "expected HOST:PORT"),
        ("admin", "localhost:65536", "out of range"),
        ("listen", "[::]:99999", "out of range"),
        ("peer", "site-b:0", "out of range 1..65535"),
        ("peer", "site-b", "expected HOST:PORT"),
        ("peer", "::1:7800", "brackets"),
    ],
)
def test_bad_addresses_in_config(tmp_path: Path, where: str, value: str, fragment: str) -> None:
    data = minimal(tmp_path)
    key = {
        "export": "volume[db].export",
        "admin": "unit.admin",
        "listen": "replication.listen",
        "peer": "volume[db].peers[0]",
    }[where]
    if where == "export":
        data["volume"][0]["export"] = value
    elif where == "admin":
        data["unit"]["admin"] = value
    elif where == "listen":
        data["replication"] = {"listen": value}
    else:
        data["volume"][0]["peers"] = [value]
    problems = problems_of(data, tmp_path)
    assert keys_of(problems) == [key]
    assert fragment in problems[0][1]


def test_duplicate_peer(tmp_path: Path) -> None:
    problems = problems_of(with_volume(tmp_path, peers=["b:7800", "c:7800", "b:7800"]), tmp_path)
    assert keys_of(problems) == ["volume[db].peers[2]"]
    assert "listed twice" in problems[0][1]


def test_tls_cert_and_key_go_together(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["replication"] = {"tls_key": "key.pem"}
    problems = problems_of(data, tmp_path, check_paths=False)
    assert sorted(keys_of(problems)) == ["replication.tls_ca", "replication.tls_cert"]


# --------------------------------------------------------------------------- volume sets


def second_volume(tmp_path: Path, **fields: object) -> dict[str, Any]:
    volume: dict[str, Any] = {
        "name": "logs",
        "role": "primary",
        "path": str(tmp_path / "logs.img"),
        "size": "1MiB",
        "export": "127.0.0.1:0",
    }
    volume.update(fields)
    return volume


def test_duplicate_volume_names(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["volume"].append(second_volume(tmp_path, name="db"))
    problems = problems_of(data, tmp_path)
    assert keys_of(problems) == ["volume[db].name"]
    assert "duplicate volume name 'db'" in problems[0][1]
    assert "volume[1] repeats volume[0]" in problems[0][1]


def test_duplicate_exports_between_volumes(tmp_path: Path) -> None:
    data = with_volume(tmp_path, export="127.0.0.1:10809")
    data["volume"].append(second_volume(tmp_path, export="127.0.0.1:10809"))
    problems = problems_of(data, tmp_path)
    assert keys_of(problems) == ["volume[logs].export"]
    assert "already used by volume[db].export" in problems[0][1]


@pytest.mark.parametrize(
    ("unit_admin", "listen"),
    [("127.0.0.1:10809", None), (None, "127.0.0.1:10809"), (None, "0.0.0.0:10809")],
)
def test_export_clashing_with_admin_or_listen(
    tmp_path: Path, unit_admin: str | None, listen: str | None
) -> None:
    data = with_volume(tmp_path, export="127.0.0.1:10809")
    if unit_admin:
        data["unit"]["admin"] = unit_admin
    if listen:
        data["replication"] = {"listen": listen}
    problems = problems_of(data, tmp_path)
    assert keys_of(problems) == ["volume[db].export"]
    assert "already used by" in problems[0][1]


def test_admin_and_listen_clash(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["unit"]["admin"] = "[::]:7800"
    data["replication"] = {"listen": "10.0.0.1:7800"}
    assert keys_of(problems_of(data, tmp_path)) == ["replication.listen"]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:10809", "127.0.0.1:10810"),
        ("127.0.0.1:10809", "127.0.0.2:10809"),
        ("0.0.0.0:10809", "[::1]:10809"),
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("0.0.0.0:0", "[::]:0"),
    ],
)
def test_listeners_that_do_not_clash(tmp_path: Path, first: str, second: str) -> None:
    data = with_volume(tmp_path, export=first)
    data["volume"].append(second_volume(tmp_path, export=second))
    config = parse_config(data, base_dir=tmp_path)
    assert len(config.volumes) == 2


def test_same_address_spelled_differently_clashes(tmp_path: Path) -> None:
    data = with_volume(tmp_path, export="[::1]:10809")
    data["volume"].append(second_volume(tmp_path, export="[0:0::1]:10809"))
    assert keys_of(problems_of(data, tmp_path)) == ["volume[logs].export"]


def test_overlapping_regions_of_one_file(tmp_path: Path) -> None:
    shared = str(tmp_path / "disk.img")
    data = with_volume(tmp_path, path=shared, offset=0, size="2MiB")
    data["volume"].append(second_volume(tmp_path, path=shared, offset="1MiB", size="2MiB"))
    problems = problems_of(data, tmp_path)
    assert keys_of(problems) == ["volume[logs].path"]
    assert "region [1 MiB, 3 MiB)" in problems[0][1]
    assert "overlaps region [0, 2 MiB) of volume[db]" in problems[0][1]


def test_overlap_is_found_without_touching_the_disk(tmp_path: Path) -> None:
    data = with_volume(tmp_path, path="disk.img")
    data["volume"].append(second_volume(tmp_path, path="./disk.img"))
    problems = problems_of(data, tmp_path, check_paths=False)
    assert keys_of(problems) == ["volume[logs].path"]


def test_adjacent_regions_do_not_overlap(tmp_path: Path) -> None:
    shared = str(tmp_path / "disk.img")
    data = with_volume(tmp_path, path=shared, offset=0, size="1MiB")
    data["volume"].append(second_volume(tmp_path, path=shared, offset="1MiB", size="1MiB"))
    assert len(parse_config(data, base_dir=tmp_path).volumes) == 2


def test_overlap_through_a_symlink_and_a_hard_link(tmp_path: Path) -> None:
    real = make_file(tmp_path / "disk.img", 4 * MiB)
    (tmp_path / "alias.img").symlink_to(real)
    os.link(real, tmp_path / "hard.img")
    data = with_volume(tmp_path, path=str(real))
    data["volume"].append(second_volume(tmp_path, path="alias.img"))
    data["volume"].append(second_volume(tmp_path, name="third", path="hard.img", offset="512KiB"))
    problems = problems_of(data, tmp_path)
    assert keys_of(problems) == ["volume[logs].path", "volume[third].path", "volume[third].path"]


# --------------------------------------------------------------------------- paths on disk


def test_existing_file_too_short(tmp_path: Path) -> None:
    make_file(tmp_path / "db.img", 4 * GiB)
    problems = problems_of(with_volume(tmp_path, size="10GiB"), tmp_path)
    assert keys_of(problems) == ["volume[db].size"]
    assert "size 10 GiB + offset 0 does not fit file of 4 GiB" in problems[0][1]


def test_existing_file_too_short_for_offset(tmp_path: Path) -> None:
    make_file(tmp_path / "db.img", 2 * MiB)
    problems = problems_of(with_volume(tmp_path, offset="1536KiB", size="1MiB"), tmp_path)
    assert "size 1 MiB + offset 1.5 MiB does not fit file of 2 MiB" in problems[0][1]


def test_existing_file_that_fits_exactly(tmp_path: Path) -> None:
    make_file(tmp_path / "db.img", 2 * MiB)
    config = parse_config(with_volume(tmp_path, offset="1MiB", size="1MiB"), base_dir=tmp_path)
    assert config.volumes[0].offset == MiB


def test_check_paths_false_skips_the_filesystem(tmp_path: Path) -> None:
    make_file(tmp_path / "db.img", 512)
    data = with_volume(tmp_path, path=str(tmp_path / "db.img"))
    data["unit"]["state_dir"] = str(tmp_path / "db.img" / "state")
    data["replication"] = {"psk_file": "/nonexistent/psk"}
    config = parse_config(data, base_dir=tmp_path, check_paths=False)
    assert config.volumes[0].size == MiB
    config_file = tmp_path / "u.toml"
    config_file.write_text(
        f'[unit]\nname = "u"\nstate_dir = "{tmp_path}/db.img/x"\n'
        f'[[volume]]\nname = "v"\nrole = "primary"\npath = "db.img"\nsize = "1MiB"\n'
        'export = "localhost:0"\n'
    )
    assert load_config(config_file, check_paths=False).volumes[0].path == tmp_path / "db.img"
    with pytest.raises(ConfigError):
        load_config(config_file)


def test_path_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    problems = problems_of(with_volume(tmp_path, path="dir"), tmp_path)
    assert keys_of(problems) == ["volume[db].path"]
    assert "is a directory" in problems[0][1]


def test_path_is_a_character_device(tmp_path: Path) -> None:
    problems = problems_of(with_volume(tmp_path, path="/dev/null"), tmp_path)
    assert "neither a regular file nor a block device" in message_for(problems, "volume[db].path")


def test_missing_file_in_missing_directory(tmp_path: Path) -> None:
    problems = problems_of(with_volume(tmp_path, path="no/such/db.img"), tmp_path)
    assert keys_of(problems) == ["volume[db].path"]
    assert f"directory {tmp_path / 'no' / 'such'} does not exist" in problems[0][1]


def test_missing_file_under_a_file(tmp_path: Path) -> None:
    make_file(tmp_path / "plain", 0)
    problems = problems_of(with_volume(tmp_path, path="plain/db.img"), tmp_path)
    assert keys_of(problems) == ["volume[db].path"]


def test_missing_file_in_unwritable_directory(
    tmp_path: Path, deny_access: Callable[[Path, int], None]
) -> None:
    deny_access(tmp_path, os.W_OK)
    problems = problems_of(minimal(tmp_path), tmp_path)
    assert "volume[db].path" in keys_of(problems)
    assert f"directory {tmp_path} is not writable" in message_for(problems, "volume[db].path")


def test_missing_read_only_file(tmp_path: Path) -> None:
    problems = problems_of(with_volume(tmp_path, read_only=True), tmp_path)
    assert keys_of(problems) == ["volume[db].path"]
    assert "read_only" in problems[0][1]


def test_existing_file_not_writable(
    tmp_path: Path, deny_access: Callable[[Path, int], None]
) -> None:
    image = make_file(tmp_path / "db.img", MiB)
    deny_access(image, os.W_OK)
    problems = problems_of(minimal(tmp_path), tmp_path)
    assert problems == [("volume[db].path", f"{image} is not readable and writable")]
    # A read-only volume only needs to read.
    assert (
        parse_config(with_volume(tmp_path, read_only=True), base_dir=tmp_path).volumes[0].read_only
    )


def test_existing_file_not_readable(
    tmp_path: Path, deny_access: Callable[[Path, int], None]
) -> None:
    image = make_file(tmp_path / "db.img", MiB)
    deny_access(image, os.R_OK)
    problems = problems_of(with_volume(tmp_path, read_only=True), tmp_path)
    assert problems == [("volume[db].path", f"{image} is not readable")]


@pytest.mark.skipif(IS_ROOT, reason="root bypasses file permissions")
def test_real_permissions(tmp_path: Path) -> None:
    image = make_file(tmp_path / "db.img", MiB)
    image.chmod(stat.S_IRUSR)
    assert keys_of(problems_of(minimal(tmp_path), tmp_path)) == ["volume[db].path"]


def _find_block_device() -> tuple[Path, int] | None:
    for entry in sorted(os.scandir("/dev"), key=lambda e: e.name):
        try:
            if stat.S_ISBLK(entry.stat().st_mode):
                return Path(entry.path), config_paths.block_device_size(Path(entry.path))
        except OSError:
            continue
    return None


def test_real_block_device_too_small(tmp_path: Path) -> None:
    found = _find_block_device()
    if found is None:
        pytest.skip("no readable block device")
    device, length = found
    too_big = length + 512
    problems = problems_of(with_volume(tmp_path, path=str(device), size=too_big), tmp_path)
    assert "does not fit block device" in message_for(problems, "volume[db].size")


def test_block_device_size_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    device = make_file(tmp_path / "fake-sdb", 0)
    real_stat = os.stat

    def fake_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        result = real_stat(path, *args, **kwargs)
        if os.fspath(path) == str(device):
            fields = list(result)
            fields[0] = stat.S_IFBLK | 0o660
            return os.stat_result(fields)
        return result

    monkeypatch.setattr(os, "stat", fake_stat)
    monkeypatch.setattr(config_paths, "block_device_size", lambda path: 4 * GiB)
    problems = problems_of(with_volume(tmp_path, path=str(device), size="10GiB"), tmp_path)
    assert problems == [
        (
            "volume[db].size",
            f"size 10 GiB + offset 0 does not fit block device of 4 GiB ({device});"
            " fix size/offset or grow the block device",
        )
    ]
    config = parse_config(with_volume(tmp_path, path=str(device), size="4GiB"), base_dir=tmp_path)
    assert config.volumes[0].size == 4 * GiB


def test_block_device_size_falls_back_to_seeking(tmp_path: Path) -> None:
    # A regular file refuses the ioctl, which exercises the lseek path.
    assert config_paths.block_device_size(make_file(tmp_path / "f", 3 * KiB)) == 3 * KiB


def test_state_dir_missing_but_creatable(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["unit"]["state_dir"] = str(tmp_path / "a" / "b" / "c")
    assert parse_config(data, base_dir=tmp_path).unit.state_dir == tmp_path / "a" / "b" / "c"


def test_state_dir_is_a_file(tmp_path: Path) -> None:
    make_file(tmp_path / "state", 0)
    problems = problems_of(minimal(tmp_path), tmp_path)
    assert problems == [("unit.state_dir", f"{tmp_path / 'state'} exists and is not a directory")]


def test_state_dir_under_a_file(tmp_path: Path) -> None:
    make_file(tmp_path / "plain", 0)
    data = minimal(tmp_path)
    data["unit"]["state_dir"] = "plain/state"
    problems = problems_of(data, tmp_path)
    assert keys_of(problems) == ["unit.state_dir"]


def test_state_dir_not_writable(tmp_path: Path, deny_access: Callable[[Path, int], None]) -> None:
    (tmp_path / "state").mkdir()
    deny_access(tmp_path / "state", os.W_OK)
    problems = problems_of(minimal(tmp_path), tmp_path)
    assert problems == [("unit.state_dir", f"directory {tmp_path / 'state'} is not writable")]


def test_state_dir_parent_not_writable(
    tmp_path: Path, deny_access: Callable[[Path, int], None]
) -> None:
    (tmp_path / "ro").mkdir()
    deny_access(tmp_path / "ro", os.W_OK)
    data = minimal(tmp_path)
    data["unit"]["state_dir"] = "ro/state/deeper"
    problems = problems_of(data, tmp_path)
    assert keys_of(problems) == ["unit.state_dir"]
    assert "cannot be created" in problems[0][1]


@pytest.mark.parametrize(
    ("key", "setup", "fragment"),
    [
        ("psk_file", None, "does not exist"),
        ("psk_file", b"", "is empty"),
        ("psk_file", b"short\n", "need at least 16"),
        ("tls_ca", "dir", "not a regular file"),
    ],
)
def test_replication_files(
    tmp_path: Path, key: str, setup: bytes | str | None, fragment: str
) -> None:
    target = tmp_path / "input"
    if isinstance(setup, bytes):
        target.write_bytes(setup)
    elif setup == "dir":
        target.mkdir()
    data = minimal(tmp_path)
    data["replication"] = {key: "input"}
    problems = dict(problems_of(data, tmp_path))
    assert fragment in problems[f"replication.{key}"]


def test_tls_keys_go_together(tmp_path: Path) -> None:
    for name in ("cert", "key"):
        (tmp_path / name).write_text("-----BEGIN-----\n")
    data = minimal(tmp_path)
    data["replication"] = {"tls_cert": "cert", "tls_key": "key"}
    problems = dict(problems_of(data, tmp_path))
    assert "go together" in problems["replication.tls_ca"]


def test_unreadable_psk(tmp_path: Path, deny_access: Callable[[Path, int], None]) -> None:
    (tmp_path / "psk").write_text("k")
    deny_access(tmp_path / "psk", os.R_OK)
    data = minimal(tmp_path)
    data["replication"] = {"psk_file": "psk"}
    assert keys_of(problems_of(data, tmp_path)) == ["replication.psk_file"]


# --------------------------------------------------------------------------- all at once


def test_many_problems_are_all_reported(tmp_path: Path) -> None:
    make_file(tmp_path / "small.img", MiB)
    make_file(tmp_path / "state", 0)
    config_file = tmp_path / "broken.toml"
    config_file.write_text(
        f"""
colour = "blue"

[unit]
state_dir = "state"
admin = "127.0.0.1:10809"

[replication]
listen = "0.0.0.0:99999"
psk_file = "missing-psk"

[[volume]]
name = "db"
role = "primary"
path = "small.img"
size = "10GiB"
export = "127.0.0.1:10809"
journal_size = "64KiB"
journal_high_water = 1.2
overflow = "drop"
ack = "sometimes"
ack_timeout = -1
peers = ["nohost", "b:7800", "b:7800"]
speed = 9

[[volume]]
name = "db"
role = "secondary"
path = "{tmp_path}/small.img"
offset = 100
size = 0

[[volume]]
name = "bad/name"
role = "mirror"
path = "nowhere/x.img"
size = "12 GB"
read_only = "no"

[[volume]]
name = "web"
role = "primary"
path = "small.img"
offset = "512KiB"
size = "1MiB"
"""
    )
    with pytest.raises(ConfigError) as info:
        load_config(config_file)
    problems = info.value.problems
    expected = {
        "colour",
        "unit.name",
        "unit.state_dir",
        "replication.listen",
        "replication.psk_file",
        "volume[db].speed",
        "volume[db].journal_size",
        "volume[db].journal_high_water",
        "volume[db].overflow",
        "volume[db].ack",
        "volume[db].ack_timeout",
        "volume[db].peers[0]",
        "volume[db].peers[2]",
        "volume[db].export",
        "volume[db].offset",
        "volume[db].size",
        "volume[db].name",
        "volume[2].name",
        "volume[2].role",
        "volume[2].size",
        "volume[2].read_only",
        "volume[2].path",
        "volume[web].export",
        "volume[web].path",
        "volume[web].size",
    }
    assert set(keys_of(problems)) == expected, format_problems(problems)
    text = format_problems(problems)
    assert len(text.splitlines()) == len(problems)
    assert "size 10 GiB + offset 0 does not fit file of 1 MiB" in text
    assert "offset 512 KiB does not fit" in message_for(problems, "volume[web].size")
    assert "overlaps region [0, 10 GiB) of volume[db]" in message_for(problems, "volume[web].path")


def test_problem_order_follows_the_file(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["unit"]["name"] = 1
    data["volume"][0]["size"] = 0
    keys = keys_of(problems_of(data, tmp_path))
    assert keys.index("unit.name") < keys.index("volume[db].size")


def test_journal_can_be_turned_off_but_not_with_peers(tmp_path: Path) -> None:
    base = {
        "unit": {"name": "u", "state_dir": str(tmp_path / "state")},
        "volume": [
            {
                "name": "v",
                "role": "primary",
                "path": str(tmp_path / "v.img"),
                "size": "1MiB",
                "export": "127.0.0.1:0",
                "journal": False,
            }
        ],
    }
    assert parse_config(base, base_dir=tmp_path).volumes[0].journal is False
    base["volume"][0]["peers"] = ["127.0.0.1:7800"]  # type: ignore[index]
    with pytest.raises(ConfigError) as info:
        parse_config(base, base_dir=tmp_path)
    assert any(key == "volume[v].journal" for key, _ in info.value.problems)
