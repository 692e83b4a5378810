"""A volume's own link key and allowed certificate names (issue 7, point 13): config and names."""

from __future__ import annotations

from pathlib import Path

from blockmirror.config import parse_config
from blockmirror.link.receiver_auth import certificate_names
from tests.unit.test_config import keys_of, minimal, problems_of


def test_a_volume_key_and_certificate_names_are_read(tmp_path: Path) -> None:
    key = tmp_path / "db.psk"
    key.write_text("a key of at least sixteen bytes\n")
    data = minimal(tmp_path)
    data["volume"][0].update(psk_file=str(key), tls_peers=["site-a.example", "backup-a"])
    (volume,) = parse_config(data, base_dir=tmp_path).volumes
    assert volume.psk_file == key
    assert volume.tls_peers == ("site-a.example", "backup-a")


def test_bad_volume_keys_are_named(tmp_path: Path) -> None:
    short = tmp_path / "short.psk"
    short.write_text("short\n")
    data = minimal(tmp_path)
    data["volume"][0].update(psk_file=str(short), tls_peers=["ok", ""])
    keys = keys_of(problems_of(data, tmp_path))
    assert "volume[db].psk_file" in keys
    assert "volume[db].tls_peers[1]" in keys
    data["volume"][0].update(psk_file=str(tmp_path / "missing.psk"), tls_peers="site-a")
    keys = keys_of(problems_of(data, tmp_path))
    assert "volume[db].psk_file" in keys and "volume[db].tls_peers" in keys


def test_certificate_names_are_the_common_names_and_dns_alt_names() -> None:
    cert = {
        "subject": ((("countryName", "XX"),), (("commonName", "site-a"),)),
        "subjectAltName": (("DNS", "site-a.example"), ("IP Address", "192.0.2.1")),
    }
    assert certificate_names(cert) == {"site-a", "site-a.example"}
    assert certificate_names({}) == set()
