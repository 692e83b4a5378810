"""The ``[iscsi]`` table and a volume's ``iscsi`` key: every problem named by its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.config import parse_config
from blockmirror.config_iscsi import parse_iscsi, target_name, valid_iqn
from blockmirror.errors import ConfigError


def secret(directory: Path, name: str, text: str = "twelve-chars-or-more") -> str:
    path = directory / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return name


def unit(
    tmp_path: Path, iscsi: dict[str, Any] | None, *, volume_iscsi: bool = True
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "unit": {"name": "site-a", "state_dir": str(tmp_path / "state")},
        "volume": [
            {
                "name": "db",
                "role": "primary",
                "path": str(tmp_path / "db.img"),
                "size": "1MiB",
                "export": "127.0.0.1:10809",
                "iscsi": volume_iscsi,
            }
        ],
    }
    if iscsi is not None:
        doc["iscsi"] = iscsi
    return doc


def problems_of(doc: dict[str, Any], base: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base_dir=base, check_paths=False)
    return info.value.problems


@pytest.mark.parametrize(
    "name",
    [
        "iqn.2026-12.org.example:site-a",
        "iqn.2026-12.org.example",
        "iqn.1992-01.com.example:storage.disk2.sys1.xyz",
        "iqn.2026-12.com.x-y:a_b.c-d:e",
    ],
)
def test_valid_iqns(name: str) -> None:
    assert valid_iqn(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "iqn.2026-13.org.example",
        "iqn.26-12.org.example",
        "IQN.2026-12.org.example",
        "iqn.2026-12.Org.Example",
        "iqn.2026-12.-org.example",
        "iqn.2026-12.org..example",
        "eui.0123456789abcdef",
        "iqn.2026-12.org.example:" + "x" * 300,
        "iqn.2026-12.org.example:a b",
    ],
)
def test_invalid_iqns(name: str) -> None:
    assert not valid_iqn(name)


@given(st.text(max_size=80))
def test_valid_iqn_never_raises(name: str) -> None:
    assert valid_iqn(name) in (True, False)


def test_a_volume_is_a_target_with_chap(tmp_path: Path) -> None:
    doc = unit(
        tmp_path,
        {
            "listen": "127.0.0.1:3260",
            "base_iqn": "iqn.2026-12.org.example:site-a",
            "chap_user": "host1",
            "chap_secret_file": secret(tmp_path, "chap"),
            "mutual_user": "site-a",
            "mutual_secret_file": secret(tmp_path, "mutual"),
        },
    )
    config = parse_config(doc, base_dir=tmp_path, check_paths=False)
    assert config.iscsi is not None and config.iscsi.chap
    assert str(config.iscsi.listen) == "127.0.0.1:3260"
    assert config.iscsi.chap_secret_file == tmp_path / "chap"
    assert config.volumes[0].iscsi
    assert target_name(config.iscsi.base_iqn, "DB") == "iqn.2026-12.org.example:site-a:db"


def test_defaults_and_no_table(tmp_path: Path) -> None:
    problems: list[tuple[str, str]] = []
    parsed = parse_iscsi({"base_iqn": "iqn.2026-12.org.example"}, problems, tmp_path)
    assert problems == [] and parsed is not None and str(parsed.listen) == "0.0.0.0:3260"
    assert parse_iscsi(None, problems, tmp_path) is None
    config = parse_config(
        unit(tmp_path, None, volume_iscsi=False), base_dir=tmp_path, check_paths=False
    )
    assert config.iscsi is None and not config.volumes[0].iscsi


def test_every_problem_is_named(tmp_path: Path) -> None:
    short = secret(tmp_path, "short", "tooshort")
    found = dict(
        problems_of(
            unit(
                tmp_path,
                {
                    "base_iqn": "iqn.2026-12.Example",
                    "listen": "nowhere",
                    "chap_user": "host1",
                    "mutual_secret_file": "missing",
                    "bogus": 1,
                },
            ),
            tmp_path,
        )
    )
    assert "not a valid IQN" in found["iscsi.base_iqn"]
    assert "iscsi.listen" in found and "iscsi.bogus" in found
    assert "together" in found["iscsi.chap_secret_file"]
    assert "together" in found["iscsi.mutual_user"]
    problems: list[tuple[str, str]] = []
    parse_iscsi(
        {"base_iqn": "iqn.2026-12.org.example", "chap_user": "u", "chap_secret_file": short},
        problems,
        tmp_path,
    )
    assert problems and problems[0][0] == "iscsi.chap_secret_file"
    assert "shorter" in problems[0][1] or "12" in problems[0][1]


def test_a_volume_asking_for_iscsi_needs_the_table(tmp_path: Path) -> None:
    found = dict(problems_of(unit(tmp_path, None), tmp_path))
    assert "no [iscsi] table" in found["volume[db].iscsi"]


def test_the_portal_must_not_clash(tmp_path: Path) -> None:
    doc = unit(tmp_path, {"base_iqn": "iqn.2026-12.org.example", "listen": "127.0.0.1:10809"})
    found = dict(problems_of(doc, tmp_path))
    assert "iscsi.listen" in found


def test_the_mutual_secret_must_differ(tmp_path: Path) -> None:
    problems: list[tuple[str, str]] = []
    same = "the-very-same-secret"
    parse_iscsi(
        {
            "base_iqn": "iqn.2026-12.org.example",
            "chap_user": "host1",
            "chap_secret_file": secret(tmp_path, "a", same),
            "mutual_user": "site-a",
            "mutual_secret_file": secret(tmp_path, "b", same),
        },
        problems,
        tmp_path,
    )
    assert problems == [
        ("iscsi.mutual_secret_file", "the mutual secret must differ from the CHAP secret")
    ]
