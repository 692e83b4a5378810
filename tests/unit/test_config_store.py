"""config_store: config versions, the applied copy, and the copies peers hand over."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from blockmirror import config_store
from blockmirror.config_store import keep_peer_copy, peer_copies, peer_copy, record_applied

KEY = "psk:" + "ab" * 16


def test_versions_grow_with_the_text_and_survive_in_the_state_dir(tmp_path: Path) -> None:
    first = record_applied(tmp_path, b"[unit]\nname = 'a'\n")
    assert first.version == 1
    assert record_applied(tmp_path, b"[unit]\nname = 'a'\n") == first  # same text, same number
    second = record_applied(tmp_path, b"[unit]\nname = 'b'\n")
    assert second.version == 2 and config_store.load_record(tmp_path) == second
    assert config_store.cached_text(tmp_path) == b"[unit]\nname = 'b'\n"
    assert (tmp_path / "config.toml").stat().st_mode & 0o077 == 0


def test_a_copy_is_kept_newest_first_and_bound_to_its_credential(tmp_path: Path) -> None:
    assert keep_peer_copy(tmp_path, "site-a", 2, b"v2", "10.0.0.1", KEY)
    assert not keep_peer_copy(tmp_path, "site-a", 2, b"v2", "10.0.0.1", KEY)  # kept already
    assert not keep_peer_copy(tmp_path, "site-a", 1, b"v1", "10.0.0.1", KEY)  # older
    found = peer_copy(tmp_path, "site-a")
    assert found is not None and found[1] == b"v2" and found[0]["config_version"] == 2
    with pytest.raises(ValueError, match="another credential"):
        keep_peer_copy(tmp_path, "site-a", 9, b"forged", "10.6.6.6", "psk:" + "cd" * 16)
    assert peer_copy(tmp_path, "site-a") == found
    assert keep_peer_copy(tmp_path, "site-a", 3, b"v3", "10.0.0.1", KEY)
    assert [c["unit"] for c in peer_copies(tmp_path)] == ["site-a"]
    assert "credential" in peer_copies(tmp_path)[0]


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "x" * 256, "a\0b"])
def test_names_that_cannot_be_units_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        keep_peer_copy(tmp_path, name, 1, b"x", "here", KEY)
    assert not (tmp_path / "peers").exists() or not any((tmp_path / "peers").iterdir())


def test_a_torn_copy_is_never_handed_out(tmp_path: Path) -> None:
    keep_peer_copy(tmp_path, "site-a", 1, b"good", "here", KEY)
    (tmp_path / "peers" / "site-a.toml").write_bytes(b"goo")
    assert peer_copy(tmp_path, "site-a") is None


def test_concurrent_writers_never_tear_a_copy(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def write(version: int) -> None:
        try:
            for _ in range(20):
                keep_peer_copy(tmp_path, "site-a", version, b"v%d" % version * 500, "x", KEY)
        except BaseException as exc:  # pragma: no cover - the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(v,)) for v in (5, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    found = peer_copy(tmp_path, "site-a")
    assert found is not None and found[0]["config_version"] in (5, 6)
    assert not [p for p in (tmp_path / "peers").iterdir() if p.name.endswith(".tmp")]


def test_the_number_of_units_kept_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_store, "MAX_PEER_COPIES", 3)
    for i in range(3):
        keep_peer_copy(tmp_path, f"u{i}", 1, b"x", "here", KEY)
    with pytest.raises(ValueError, match="kept already"):
        keep_peer_copy(tmp_path, "u9", 1, b"x", "here", KEY)
    assert keep_peer_copy(tmp_path, "u0", 2, b"y", "here", KEY)  # a known unit still updates
