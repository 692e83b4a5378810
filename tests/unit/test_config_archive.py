"""The ``[[archive]]`` tables and a volume's ``seed_from``, parsed through parse_config: defaults,
every key, every problem named at its key, and a reload that changes an archive refused."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from blockmirror.archive.s3 import ArchiveStoreError, parse_url
from blockmirror.config import Config, parse_config
from blockmirror.config_archive import ARCHIVE_KEYS, ArchiveConfig
from blockmirror.config_diff import diff
from blockmirror.errors import ConfigError
from blockmirror.link.compression import Codec
from blockmirror.units import GiB, KiB, MiB

Problems = list[tuple[str, str]]
URL = "s3://backups/site-a"


def config(tmp_path: Path, *archives: dict[str, Any], **volume: Any) -> dict[str, Any]:
    """A valid unit with a primary ``db``, a secondary ``logs`` and the given archives; ``volume``
    changes the secondary (a value of None removes the key)."""
    logs: dict[str, Any] = {
        "name": "logs",
        "role": "secondary",
        "path": str(tmp_path / "logs.img"),
        "size": "1MiB",
    }
    for key, value in volume.items():
        if value is None:
            logs.pop(key, None)
        else:
            logs[key] = value
    data: dict[str, Any] = {
        "unit": {"name": "site-a", "state_dir": str(tmp_path / "state")},
        "replication": {"listen": "127.0.0.1:0"},
        "volume": [
            {
                "name": "db",
                "role": "primary",
                "path": str(tmp_path / "db.img"),
                "size": "1MiB",
                "export": "127.0.0.1:0",
            },
            logs,
        ],
    }
    if archives:
        data["archive"] = list(archives)
    return data


def archive(**keys: Any) -> dict[str, Any]:
    table: dict[str, Any] = {"name": "offsite", "url": URL}
    table.update(keys)
    return table


def parse(data: dict[str, Any], tmp_path: Path) -> Config:
    return parse_config(data, base_dir=tmp_path, check_paths=False)


def problems_of(data: dict[str, Any], tmp_path: Path) -> Problems:
    with pytest.raises(ConfigError) as info:
        parse(data, tmp_path)
    assert info.value.problems, "ConfigError without problems"
    return info.value.problems


def message_for(problems: Problems, key: str) -> str:
    found = [message for k, message in problems if k == key]
    assert found, f"no problem for {key!r} in {problems}"
    return found[0]


# --------------------------------------------------------------------------- what parses


def test_no_archive_table_means_no_archives(tmp_path: Path) -> None:
    parsed = parse(config(tmp_path), tmp_path)
    assert parsed.archives == ()
    assert parsed.volume("logs").seed_from is None


def test_defaults(tmp_path: Path) -> None:
    (got,) = parse(config(tmp_path, archive()), tmp_path).archives
    assert got == ArchiveConfig(name="offsite", url=URL)
    assert got.endpoint is None
    assert got.region == "us-east-1"
    assert got.credentials_file is None
    assert got.volumes == ()
    assert got.history == 30 * 86400.0
    assert got.base_interval == 86400.0
    assert got.segment_interval == 10.0
    assert got.segment_size == 64 * MiB
    assert got.bandwidth is None
    assert got.compression is Codec.ZSTD
    assert got.compression_level == 3
    assert got.upload is True
    assert got.covers("db") and got.covers("logs")


def test_every_key(tmp_path: Path) -> None:
    table = archive(
        endpoint="http://127.0.0.1:8333",
        region="eu-west-1",
        credentials_file="s3.credentials",
        volumes=["db"],
        history="7d",
        base_interval="12h",
        segment_interval="30s",
        segment_size="16MiB",
        bandwidth="10Mbit",
        compression="none",
        compression_level=9,
        upload=False,
    )
    assert set(table) == set(ARCHIVE_KEYS), "a new key: test it here"
    (got,) = parse(config(tmp_path, table), tmp_path).archives
    assert got == ArchiveConfig(
        name="offsite",
        url=URL,
        endpoint="http://127.0.0.1:8333",
        region="eu-west-1",
        # Relative to the config file's directory, as every path.
        credentials_file=tmp_path.absolute() / "s3.credentials",
        volumes=("db",),
        history=7 * 86400.0,
        base_interval=12 * 3600.0,
        segment_interval=30.0,
        segment_size=16 * MiB,
        bandwidth=10_000_000,
        compression=Codec.NONE,
        compression_level=9,
        upload=False,
    )
    assert got.covers("db") and not got.covers("logs")


def test_numbers_of_seconds_and_bytes(tmp_path: Path) -> None:
    table = archive(history=3600, segment_interval=0.5, segment_size=2 * MiB, bandwidth=8000)
    (got,) = parse(config(tmp_path, table), tmp_path).archives
    assert (got.history, got.segment_interval) == (3600.0, 0.5)
    assert (got.segment_size, got.bandwidth) == (2 * MiB, 8000)


def test_bandwidth_none_is_no_limit(tmp_path: Path) -> None:
    (got,) = parse(config(tmp_path, archive(bandwidth="none")), tmp_path).archives
    assert got.bandwidth is None


@pytest.mark.parametrize("size", ["1MiB", "1GiB", MiB, GiB])
def test_segment_size_bounds_are_allowed(tmp_path: Path, size: object) -> None:
    (got,) = parse(config(tmp_path, archive(segment_size=size)), tmp_path).archives
    assert got.segment_size in (MiB, GiB)


@pytest.mark.parametrize("level", [1, 19])
def test_compression_level_bounds_are_allowed(tmp_path: Path, level: int) -> None:
    (got,) = parse(config(tmp_path, archive(compression_level=level)), tmp_path).archives
    assert got.compression_level == level


def test_several_archives_keep_their_order(tmp_path: Path) -> None:
    data = config(
        tmp_path,
        archive(name="near", url="s3://near-store/a"),
        archive(name="far", url="s3://far-store/a", upload=False),
    )
    assert [a.name for a in parse(data, tmp_path).archives] == ["near", "far"]


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://backups", "backups", ""),
        ("s3://backups/", "backups", ""),
        ("s3://backups/site-a", "backups", "site-a"),
        ("s3://backups/site-a/", "backups", "site-a"),
        ("s3://my.bucket-1/a/b/c", "my.bucket-1", "a/b/c"),
    ],
)
def test_bucket_and_prefix(tmp_path: Path, url: str, bucket: str, prefix: str) -> None:
    (got,) = parse(config(tmp_path, archive(url=url)), tmp_path).archives
    assert (got.bucket, got.prefix) == (bucket, prefix)
    # The same split the unit's S3 client makes.
    assert (parse_url(url).bucket, parse_url(url).prefix) == (bucket, prefix)


def test_covers() -> None:
    every = ArchiveConfig(name="a", url=URL)
    some = ArchiveConfig(name="b", url=URL, volumes=("db", "web"))
    assert every.covers("anything")
    assert some.covers("db") and some.covers("web") and not some.covers("logs")


# --------------------------------------------------------------------------- seed_from


def test_seed_from_on_a_secondary(tmp_path: Path) -> None:
    data = config(tmp_path, archive(upload=False), seed_from="offsite")
    assert parse(data, tmp_path).volume("logs").seed_from == "offsite"


def test_seed_from_an_archive_that_names_the_volume(tmp_path: Path) -> None:
    data = config(tmp_path, archive(volumes=["logs"]), seed_from="offsite")
    assert parse(data, tmp_path).volume("logs").seed_from == "offsite"


def test_seed_from_on_a_primary(tmp_path: Path) -> None:
    data = config(tmp_path, archive())
    data["volume"][0]["seed_from"] = "offsite"
    problems = problems_of(data, tmp_path)
    assert problems == [
        ("volume[db].seed_from", "only a secondary's replica is seeded from an archive")
    ]


def test_seed_from_naming_no_archive(tmp_path: Path) -> None:
    data = config(tmp_path, archive(), seed_from="ofsite")
    assert problems_of(data, tmp_path) == [
        ("volume[logs].seed_from", "no [[archive]] is called 'ofsite' (offsite)")
    ]


def test_seed_from_without_any_archive(tmp_path: Path) -> None:
    data = config(tmp_path, seed_from="offsite")
    assert problems_of(data, tmp_path) == [
        ("volume[logs].seed_from", "no [[archive]] is called 'offsite' (none)")
    ]


def test_seed_from_empty_names_no_archive(tmp_path: Path) -> None:
    data = config(tmp_path, archive(), seed_from="")
    message = message_for(problems_of(data, tmp_path), "volume[logs].seed_from")
    assert message == "no [[archive]] is called '' (offsite)"


def test_seed_from_an_archive_without_the_volume(tmp_path: Path) -> None:
    data = config(tmp_path, archive(volumes=["db"]), seed_from="offsite")
    assert problems_of(data, tmp_path) == [
        ("volume[logs].seed_from", "archive 'offsite' does not hold this volume")
    ]


def test_seed_from_must_be_a_string(tmp_path: Path) -> None:
    data = config(tmp_path, archive(), seed_from=["offsite"])
    message = message_for(problems_of(data, tmp_path), "volume[logs].seed_from")
    assert message.startswith("expected a string, got an array")


# --------------------------------------------------------------------------- problems


@pytest.mark.parametrize(
    "url",
    [
        "backups/site-a",
        "s3:/backups",
        "https://backups/site-a",
        "s3://",
        "s3://ab",  # a bucket of 2
        "s3://" + "b" * 64,
        "s3://Backups/site-a",
        "s3://-backups/site-a",
        "s3://backups-/site-a",
        "s3://back_ups/site-a",
        "s3://backups/site\na",
    ],
)
def test_bad_url(tmp_path: Path, url: str) -> None:
    message = message_for(
        problems_of(config(tmp_path, archive(url=url)), tmp_path), "archive[offsite].url"
    )
    assert message == f"{url!r} is not s3://BUCKET/PREFIX (a bucket of 3 to 63 of a-z 0-9 . -)"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("s3://backups/a//b", "an empty, '.' or '..' segment"),
        ("s3://backups/./a", "an empty, '.' or '..' segment"),
        ("s3://backups/a/..", "an empty, '.' or '..' segment"),
        ("s3://backups/a\x7fb", "a control character"),
    ],
)
def test_url_prefix_the_unit_would_refuse(tmp_path: Path, url: str, why: str) -> None:
    problems = problems_of(config(tmp_path, archive(url=url)), tmp_path)
    assert message_for(problems, "archive[offsite].url") == f"{url!r}: the prefix has {why}"


@pytest.mark.parametrize(
    "url",
    [
        "s3://backups",
        "s3://backups//a",
        "s3://backups/a b",
        "s3://backups/a/b/",
        "s3://backups/a//b",
        "s3://backups/../a",
        "s3://backups/a\x7f",
        "s3://b.-c/a",
        "s3://Backups/a",
    ],
)
def test_check_config_takes_exactly_the_urls_the_unit_takes(tmp_path: Path, url: str) -> None:
    try:
        parse_url(url)
        unit_takes = True
    except ArchiveStoreError:
        unit_takes = False
    try:
        parse(config(tmp_path, archive(url=url)), tmp_path)
        config_takes = True
    except ConfigError:
        config_takes = False
    assert config_takes == unit_takes


@pytest.mark.parametrize(
    "endpoint", ["127.0.0.1:8333", "ftp://store.example", "http://", "https://a b", ""]
)
def test_bad_endpoint(tmp_path: Path, endpoint: str) -> None:
    problems = problems_of(config(tmp_path, archive(endpoint=endpoint)), tmp_path)
    message = message_for(problems, "archive[offsite].endpoint")
    assert message == f"{endpoint!r} is not an http:// or https:// URL"


@pytest.mark.parametrize(
    "endpoint", ["http://127.0.0.1:8333", "https://s3.eu-west-1.amazonaws.com", "https://h/p"]
)
def test_good_endpoint(tmp_path: Path, endpoint: str) -> None:
    (got,) = parse(config(tmp_path, archive(endpoint=endpoint)), tmp_path).archives
    assert got.endpoint == endpoint


@pytest.mark.parametrize("name", ["", "a/b", "a b", "x" * 65, "caf\u00e9"])
def test_bad_name(tmp_path: Path, name: str) -> None:
    problems = problems_of(config(tmp_path, archive(name=name)), tmp_path)
    # Without a usable name the table is known by its position.
    assert problems == [("archive[0].name", f"{name!r}: use 1 to 64 of A-Z a-z 0-9 . _ -")]


def test_missing_name_and_url(tmp_path: Path) -> None:
    problems = problems_of(config(tmp_path, {"region": "eu-west-1"}), tmp_path)
    assert problems == [
        ("archive[0].name", "missing required key"),
        ("archive[0].url", "missing required key"),
    ]


def test_duplicate_name(tmp_path: Path) -> None:
    data = config(tmp_path, archive(), archive(url="s3://other-bucket/x"))
    assert problems_of(data, tmp_path) == [
        ("archive[offsite].name", "a second archive of this name")
    ]


@pytest.mark.parametrize("size", ["512KiB", 1024 * KiB - 1, "1.5GiB", GiB + 512])
def test_segment_size_out_of_range(tmp_path: Path, size: object) -> None:
    problems = problems_of(config(tmp_path, archive(segment_size=size)), tmp_path)
    assert problems == [("archive[offsite].segment_size", "must be between 1MiB and 1GiB")]


def test_segment_size_not_a_size(tmp_path: Path) -> None:
    problems = problems_of(config(tmp_path, archive(segment_size="64MB")), tmp_path)
    assert "MiB" in message_for(problems, "archive[offsite].segment_size")


@pytest.mark.parametrize("key", ["history", "base_interval", "segment_interval"])
@pytest.mark.parametrize("value", [0, "0", "0s", 0.0])
def test_zero_durations(tmp_path: Path, key: str, value: object) -> None:
    problems = problems_of(config(tmp_path, archive(**{key: value})), tmp_path)
    assert problems == [(f"archive[offsite].{key}", "must be more than 0")]


@pytest.mark.parametrize("key", ["history", "base_interval", "segment_interval"])
def test_bad_durations(tmp_path: Path, key: str) -> None:
    for value in (-1, "ten", True):
        problems = problems_of(config(tmp_path, archive(**{key: value})), tmp_path)
        assert [k for k, _ in problems] == [f"archive[offsite].{key}"]


def test_unknown_key_with_a_suggestion(tmp_path: Path) -> None:
    problems = problems_of(config(tmp_path, archive(segment_intervall="5s")), tmp_path)
    assert problems == [
        (
            "archive[offsite].segment_intervall",
            "unknown key (did you mean 'segment_interval'?); allowed keys: "
            + ", ".join(ARCHIVE_KEYS),
        )
    ]


def test_inline_credentials_are_unknown_keys(tmp_path: Path) -> None:
    problems = problems_of(config(tmp_path, archive(aws_secret_access_key="x")), tmp_path)
    assert [k for k, _ in problems] == ["archive[offsite].aws_secret_access_key"]
    assert problems[0][1].startswith("unknown key")


def test_volumes_naming_an_unknown_volume(tmp_path: Path) -> None:
    problems = problems_of(config(tmp_path, archive(volumes=["db", "web"])), tmp_path)
    assert problems == [("archive[offsite].volumes", "no volume is called 'web'")]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("db", "expected an array of volume names, got a string ('db')"),
        (["db", 3], "[1] is an integer, expected a volume name"),
    ],
)
def test_volumes_of_the_wrong_type(tmp_path: Path, value: object, message: str) -> None:
    problems = problems_of(config(tmp_path, archive(volumes=value)), tmp_path)
    assert problems == [("archive[offsite].volumes", message)]


@pytest.mark.parametrize("level", [0, 20, -3])
def test_compression_level_out_of_range(tmp_path: Path, level: int) -> None:
    problems = problems_of(config(tmp_path, archive(compression_level=level)), tmp_path)
    assert problems == [
        ("archive[offsite].compression_level", f"{level} is outside zstd's levels 1..19")
    ]


@pytest.mark.parametrize("level", ["3", 3.0, True])
def test_compression_level_must_be_an_integer(tmp_path: Path, level: object) -> None:
    problems = problems_of(config(tmp_path, archive(compression_level=level)), tmp_path)
    assert [k for k, _ in problems] == ["archive[offsite].compression_level"]
    assert problems[0][1].startswith("expected an integer")


def test_bad_compression(tmp_path: Path) -> None:
    problems = problems_of(config(tmp_path, archive(compression="lz4")), tmp_path)
    assert problems == [("archive[offsite].compression", "'lz4' is not one of 'none', 'zstd'")]


def test_bad_bandwidth(tmp_path: Path) -> None:
    problems = problems_of(config(tmp_path, archive(bandwidth="0")), tmp_path)
    assert [k for k, _ in problems] == ["archive[offsite].bandwidth"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("upload", "yes"), ("region", 1), ("credentials_file", ""), ("name", 7)],
)
def test_wrong_types(tmp_path: Path, key: str, value: object) -> None:
    problems = problems_of(config(tmp_path, archive(**{key: value})), tmp_path)
    assert len(problems) == 1 and problems[0][0].endswith(f".{key}")


def test_archive_must_be_an_array_of_tables(tmp_path: Path) -> None:
    data = config(tmp_path)
    data["archive"] = {"name": "offsite", "url": URL}
    assert problems_of(data, tmp_path) == [("archive", "expected [[archive]] tables, got a table")]
    data["archive"] = ["offsite"]
    assert problems_of(data, tmp_path) == [("archive[0]", "expected a table, got a string")]


def test_every_problem_at_once(tmp_path: Path) -> None:
    table = archive(url="s3://x", segment_size="1KiB", history="0", compression_level=99)
    problems = problems_of(config(tmp_path, table), tmp_path)
    assert [k for k, _ in problems] == [
        "archive[offsite].url",
        "archive[offsite].history",
        "archive[offsite].segment_size",
        "archive[offsite].compression_level",
    ]


# --------------------------------------------------------------------------- one place, one chain


def test_two_archives_uploading_a_volume_to_one_place(tmp_path: Path) -> None:
    data = config(tmp_path, archive(name="a"), archive(name="b", url=URL + "/"))
    assert problems_of(data, tmp_path) == [
        (
            "archive[b].url",
            "archive 'a' uploads volume 'db' to the same place; two archives of one volume "
            "there would mix one chain (use another prefix, or upload = false)",
        )
    ]


@pytest.mark.parametrize(
    "second",
    [
        {"url": URL + "/other"},  # another prefix
        {"url": "s3://elsewhere/site-a"},  # another bucket
        {"endpoint": "http://127.0.0.1:8333"},  # another store
        {"upload": False},  # a reader only
        {"volumes": ["logs"]},  # other volumes
    ],
)
def test_archives_that_do_not_share_a_chain(tmp_path: Path, second: dict[str, Any]) -> None:
    data = config(tmp_path, archive(name="a", volumes=["db"]), archive(name="b", **second))
    assert [a.name for a in parse(data, tmp_path).archives] == ["a", "b"]


# --------------------------------------------------------------------------- reload


def test_a_reload_that_changes_an_archive_is_refused(tmp_path: Path) -> None:
    old = parse(config(tmp_path, archive()), tmp_path)
    for changed in (
        config(tmp_path, archive(segment_interval="30s")),
        config(tmp_path, archive(), archive(name="second", url="s3://another/x")),
        config(tmp_path),
    ):
        d = diff(old, parse(changed, tmp_path))
        assert d.refused == [
            ("archives", "changes only at a restart: the archive consumers are set up at start")
        ]


def test_a_reload_with_the_same_archives_changes_nothing(tmp_path: Path) -> None:
    old = parse(config(tmp_path, archive()), tmp_path)
    assert diff(old, parse(config(tmp_path, archive()), tmp_path)).empty


def test_a_reload_may_change_seed_from(tmp_path: Path) -> None:
    old = parse(config(tmp_path, archive()), tmp_path)
    new = parse(config(tmp_path, archive(), seed_from="offsite"), tmp_path)
    d = diff(old, new)
    assert not d.refused
    assert [c.key for c in d.changes] == ["volume[logs].seed_from"]


# --------------------------------------------------------------------------- the documentation


def test_the_documented_examples_are_valid(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    section = doc.split("\n## Archives\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```toml\n")[1:]]
    assert len(blocks) == 2
    primary, secondary = (tomllib.loads(b) for b in blocks)
    data = config(tmp_path)
    data["archive"] = primary["archive"]
    (offsite,) = parse(data, tmp_path).archives
    assert offsite.volumes == ("db",) and offsite.bandwidth == 100_000_000
    data = config(tmp_path)
    data["volume"] = secondary["volume"]
    data["archive"] = secondary["archive"]
    parsed = parse(data, tmp_path)
    assert parsed.volume("db").seed_from == "seed"
    assert [a.upload for a in parsed.archives] == [False]
