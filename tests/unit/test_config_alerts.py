"""The ``[alerts]`` table: every key, its default, and every problem named by its key."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmirror.addresses import Address
from blockmirror.config import parse_config
from blockmirror.config_alerts import (
    SNMP_AUTH,
    SNMP_PRIV,
    AlertsConfig,
    EmailTarget,
    SnmpTarget,
    WebhookTarget,
    parse_alerts,
    parse_engine_id,
    read_secret,
    webhook_target,
)
from blockmirror.errors import ConfigError, NotifyError

Problems = list[tuple[str, str]]


def secret(directory: Path, name: str, text: str = "secret-passphrase", mode: int = 0o600) -> str:
    path = directory / name
    path.write_text(text + "\n")
    path.chmod(mode)
    return name


def parse(data: object, base: Path, *, check_paths: bool = True) -> tuple[AlertsConfig, Problems]:
    problems: Problems = []
    return parse_alerts(data, problems, base, check_paths=check_paths), problems


def ok(data: object, base: Path) -> AlertsConfig:
    config, problems = parse(data, base)
    assert problems == []
    return config


def problems(data: object, base: Path, **kwargs: Any) -> dict[str, str]:
    _, found = parse(data, base, **kwargs)
    assert found, "no problem reported"
    return dict(found)


# -- the table and its scalars -----------------------------------------------------------------


def test_no_table_is_the_defaults(tmp_path: Path) -> None:
    assert ok(None, tmp_path) == AlertsConfig() == ok({}, tmp_path)
    assert AlertsConfig().link_down_seconds == 30.0 and AlertsConfig().rpo_seconds is None


def test_durations_take_seconds_or_units(tmp_path: Path) -> None:
    config = ok({"rpo_seconds": "5m", "link_down_seconds": 0}, tmp_path)
    assert (config.rpo_seconds, config.link_down_seconds) == (300.0, 0.0)
    assert ok({"rpo_seconds": 2.5}, tmp_path).rpo_seconds == 2.5


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"rpo_seconds": 0}, "alerts.rpo_seconds", "greater than 0"),
        ({"rpo_seconds": -1}, "alerts.rpo_seconds", "non-negative"),
        ({"rpo_seconds": True}, "alerts.rpo_seconds", "expected a duration"),
        ({"link_down_seconds": "soon"}, "alerts.link_down_seconds", "number and a unit"),
        ({"mail": {}}, "alerts.mail", "unknown key"),
        ({"email": "ops@example.com"}, "alerts.email", "expected a table"),
        ({"snmp": ["127.0.0.1:162"]}, "alerts.snmp", "expected a table"),
        ({"webhook": 5}, "alerts.webhook", "a URL or a table"),
    ],
)
def test_bad_scalars_and_tables(data: dict[str, Any], key: str, words: str, tmp_path: Path) -> None:
    assert words in problems(data, tmp_path)[key]


def test_a_non_table_is_one_problem(tmp_path: Path) -> None:
    assert problems(["x"], tmp_path) == {"alerts": "expected an [alerts] table, got an array"}


# -- e-mail ------------------------------------------------------------------------------------


def email(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    data = {
        "to": ["ops@example.com", "dba@example.org"],
        "from": "blockmirror@site-a.example",
        "smtp": "smtp.example.com:587",
    }
    return {"email": {**data, **extra}}


def test_email_with_every_key(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("PEM")
    name = secret(tmp_path, "smtp.pw")
    config = ok(
        email(tmp_path, username="alerts", password_file=name, tls_ca="ca.pem", starttls=True),
        tmp_path,
    )
    assert config.email == EmailTarget(
        to=("ops@example.com", "dba@example.org"),
        sender="blockmirror@site-a.example",
        smtp=Address("smtp.example.com", 587),
        starttls=True,
        username="alerts",
        password_file=tmp_path / "smtp.pw",
        tls_ca=tmp_path / "ca.pem",
    )


def test_email_defaults_to_starttls_without_login(tmp_path: Path) -> None:
    config = ok(email(tmp_path), tmp_path).email
    assert config is not None and config.starttls and config.username is None
    plain = ok(email(tmp_path, starttls=False, smtp="[::1]:25"), tmp_path).email
    assert plain is not None and not plain.starttls and plain.smtp == Address("::1", 25)


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ({"to": []}, "to", "is empty"),
        ({"to": "ops@example.com"}, "to", "an array of e-mail addresses"),
        ({"to": ["ops"]}, "to[0]", "not an e-mail address"),
        ({"to": ["a@b.c", "x y@b.c"]}, "to[1]", "not an e-mail address"),
        ({"to": ["a@b.c", "a@b.c"]}, "to[1]", "listed twice"),
        ({"to": ["a@b.c\r\nBcc: x@y.z"]}, "to[0]", "not an e-mail address"),
        ({"from": "Ops <ops@x.y>"}, "from", "not an e-mail address"),
        ({"smtp": "smtp.example.com"}, "smtp", "expected HOST:PORT"),
        ({"smtp": "smtp:0"}, "smtp", "out of range"),
        ({"starttls": "yes"}, "starttls", "true or false"),
        ({"username": ""}, "username", "non-empty"),
        ({"username": "alerts"}, "password_file", "go together"),
        ({"password_file": "pw"}, "username", "go together"),
        ({"password": "hunter2"}, "password", "unknown key"),
        ({"tls_ca": "missing.pem"}, "tls_ca", "does not exist"),
    ],
)
def test_email_problems(extra: dict[str, Any], key: str, words: str, tmp_path: Path) -> None:
    secret(tmp_path, "pw")
    found = problems(email(tmp_path, **extra), tmp_path)
    assert words in found[f"alerts.email.{key}"], found


def test_email_required_keys(tmp_path: Path) -> None:
    found = problems({"email": {}}, tmp_path)
    assert set(found) == {"alerts.email.to", "alerts.email.from", "alerts.email.smtp"}
    assert all("missing" in message for message in found.values())


def test_a_password_is_never_sent_without_tls(tmp_path: Path) -> None:
    name = secret(tmp_path, "pw")
    found = problems(
        email(tmp_path, starttls=False, username="u", password_file=name, tls_ca="x"), tmp_path
    )
    assert "in clear" in found["alerts.email.username"]
    assert "no TLS" in found["alerts.email.tls_ca"]


# -- secret files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode", "words"),
    [
        ("pw", 0o644, "accessible to other users"),
        ("pw", 0o660, "accessible to other users"),
        ("", 0o600, "is empty"),
        ("two\nlines", 0o600, "control characters"),
        ("x" * 5000, 0o600, "larger than 4096"),
    ],
)
def test_secret_files_are_checked(text: str, mode: int, words: str, tmp_path: Path) -> None:
    name = secret(tmp_path, "pw", text, mode)
    found = problems(email(tmp_path, username="u", password_file=name), tmp_path)
    assert words in found["alerts.email.password_file"]


def test_a_missing_secret_is_a_problem_unless_paths_are_not_checked(tmp_path: Path) -> None:
    data = email(tmp_path, username="u", password_file="nowhere")
    assert "cannot read" in problems(data, tmp_path)["alerts.email.password_file"]
    _, found = parse(data, tmp_path, check_paths=False)
    assert found == []


def test_read_secret_strips_and_allows_group_read(tmp_path: Path) -> None:
    path = tmp_path / secret(tmp_path, "s", "  spaced out  ", 0o640)
    assert read_secret(path, "x") == "spaced out"
    with pytest.raises(NotifyError, match="at least 20"):
        read_secret(path, "x", min_chars=20)
    with pytest.raises(NotifyError, match="without spaces"):
        read_secret(path, "x", token=True)
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    (tmp_path / "bin").chmod(0o600)
    with pytest.raises(NotifyError, match="not UTF-8"):
        read_secret(tmp_path / "bin", "x")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NotifyError, match="not a regular file"):
        read_secret(tmp_path / "fifo", "x")  # refused at once: no writer is waited for


# -- SNMP --------------------------------------------------------------------------------------


def test_snmp_v2c(tmp_path: Path) -> None:
    config = ok(
        {"snmp": {"targets": ["nms.example:162", "[::1]:1162"], "community": "pub"}}, tmp_path
    )
    assert config.snmp == SnmpTarget(
        targets=(Address("nms.example", 162), Address("::1", 1162)), community="pub"
    )
    assert config.snmp.version == "2c"
    from_file = ok(
        {"snmp": {"targets": ["n:162"], "community_file": secret(tmp_path, "c")}}, tmp_path
    )
    assert from_file.snmp is not None and from_file.snmp.community_file == tmp_path / "c"


@pytest.mark.parametrize("auth", SNMP_AUTH)
@pytest.mark.parametrize("priv", SNMP_PRIV)
def test_snmp_v3_every_protocol(auth: str, priv: str, tmp_path: Path) -> None:
    data: dict[str, Any] = {
        "targets": ["nms:162"],
        "version": "3",
        "user": "bm",
        "auth": auth,
        "auth_key_file": secret(tmp_path, "auth"),
        "priv": priv,
        "engine_id": "0x80007ed904626d",
    }
    if priv != "none":
        data["priv_key_file"] = secret(tmp_path, "priv")
    snmp = ok({"snmp": data}, tmp_path).snmp
    assert snmp is not None and (snmp.version, snmp.auth, snmp.priv) == ("3", auth, priv)
    assert snmp.engine_id == bytes.fromhex("80007ed904626d")
    assert snmp.priv_key_file == (tmp_path / "priv" if priv != "none" else None)


def test_snmp_v3_defaults_to_sha256_and_aes128(tmp_path: Path) -> None:
    data = {
        "targets": ["nms:162"],
        "version": "3",
        "user": "bm",
        "auth_key_file": secret(tmp_path, "a"),
        "priv_key_file": secret(tmp_path, "p"),
    }
    snmp = ok({"snmp": data}, tmp_path).snmp
    assert snmp is not None and (snmp.auth, snmp.priv, snmp.engine_id) == ("SHA256", "AES128", None)


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"community": "p"}, "targets", "missing"),
        ({"targets": [], "community": "p"}, "targets", "is empty"),
        ({"targets": "n:162", "community": "p"}, "targets", "an array"),
        ({"targets": [162], "community": "p"}, "targets[0]", "HOST:PORT string"),
        ({"targets": ["n"], "community": "p"}, "targets[0]", "expected HOST:PORT"),
        ({"targets": ["n:1", "n:1"], "community": "p"}, "targets[1]", "listed twice"),
        ({"targets": ["n:1"]}, "community", "exactly one"),
        ({"targets": ["n:1"], "community": "p", "community_file": "k"}, "community", "exactly one"),
        ({"targets": ["n:1"], "community": ""}, "community", "non-empty"),
        ({"targets": ["n:1"], "community": "p", "version": "1"}, "version", "is not one of"),
        ({"targets": ["n:1"], "community": "p", "user": "bm"}, "user", "is for SNMPv3"),
        ({"targets": ["n:1"], "community": "p", "auth": "SHA"}, "auth", "is for SNMPv3"),
        ({"targets": ["n:1"], "version": "3", "community": "p"}, "community", "by user"),
        ({"targets": ["n:1"], "version": "3"}, "user", "missing"),
        ({"targets": ["n:1"], "version": "3"}, "auth_key_file", "missing"),
        ({"targets": ["n:1"], "version": "3"}, "priv_key_file", "'AES128' needs"),
        ({"targets": ["n:1"], "version": "3", "user": "u" * 33}, "user", "1 to 32"),
        ({"targets": ["n:1"], "version": "3", "auth": "SHA1"}, "auth", "is not one of"),
        ({"targets": ["n:1"], "version": "3", "priv": "AES"}, "priv", "is not one of"),
        ({"targets": ["n:1"], "version": "3", "priv": "none", "priv_key_file": "k"},
         "priv_key_file", "remove one"),
        ({"targets": ["n:1"], "version": "3", "auth_key_file": "short"},
         "auth_key_file", "at least 8"),
        ({"targets": ["n:1"], "version": "3", "engine_id": "0x1234"}, "engine_id", "5 to 32"),
        ({"targets": ["n:1"], "version": "3", "engine_id": "zz"}, "engine_id", "hex digits"),
        ({"targets": ["n:1"], "community": "p", "secret": "x"}, "secret", "unknown key"),
    ],
)  # fmt: skip
def test_snmp_problems(data: dict[str, Any], key: str, words: str, tmp_path: Path) -> None:
    secret(tmp_path, "k")
    secret(tmp_path, "short", "1234567")
    found = problems({"snmp": data}, tmp_path)
    assert words in found.get(f"alerts.snmp.{key}", ""), found


@given(st.binary(min_size=0, max_size=40))
def test_engine_ids_round_trip_within_5_to_32_octets(octets: bytes) -> None:
    for text in (octets.hex(), "0x" + octets.hex().upper()):
        parsed = parse_engine_id(text)
        if 5 <= len(octets) <= 32:
            assert parsed == octets
        else:
            assert isinstance(parsed, str)


# -- webhook -----------------------------------------------------------------------------------


def test_webhook_as_a_string(tmp_path: Path) -> None:
    assert ok({"webhook": "http://hooks.example/blockmirror?k=1"}, tmp_path).webhook == (
        WebhookTarget(
            "http://hooks.example/blockmirror?k=1", False, "hooks.example", 80, "/blockmirror?k=1"
        )
    )


def test_webhook_as_a_table(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("PEM")
    data = {"url": "https://[::1]:8443", "token_file": secret(tmp_path, "t"), "tls_ca": "ca.pem"}
    hook = ok({"webhook": data}, tmp_path).webhook
    assert hook == WebhookTarget(
        "https://[::1]:8443", True, "::1", 8443, "/", tmp_path / "t", tmp_path / "ca.pem"
    )
    assert hook.host_header == "[::1]:8443"
    assert webhook_target("https://h.example/x").host_header == "h.example"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://h/x", "not an http:// or https://"),
        ("http://user:pw@h/x", "credentials in the URL"),
        ("http:///x", "no valid host"),
        ("http://bad_host/x", "no valid host"),
        ("http://[nope]/x", "not an IPv6 address"),
        ("http://[::1/x", "not an IPv6 address"),
        ("http://h:99999/x", "invalid port"),
        ("http://h:0/x", "port 0"),
        ("http://h/a b", "no spaces"),
        ("http://h/é", "non-ASCII"),
    ],
)
def test_webhook_urls_refused(url: str, words: str, tmp_path: Path) -> None:
    assert words in problems({"webhook": url}, tmp_path)["alerts.webhook"]
    assert words in problems({"webhook": {"url": url}}, tmp_path)["alerts.webhook.url"]
    with pytest.raises(ValueError, match=words):
        webhook_target(url)


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({}, "url", "missing"),
        ({"url": "http://h/", "tls_ca": "ca.pem"}, "tls_ca", "no TLS to verify"),
        ({"url": "http://h/", "token_file": "spaced"}, "token_file", "without spaces"),
        ({"url": "http://h/", "token": "abc"}, "token", "unknown key"),
    ],
)
def test_webhook_table_problems(data: dict[str, Any], key: str, words: str, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("PEM")
    secret(tmp_path, "spaced", "two words")
    assert words in problems({"webhook": data}, tmp_path)[f"alerts.webhook.{key}"]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
@given(st.text(max_size=60))
def test_any_url_is_accepted_or_refused_with_a_reason(tmp_path: Path, url: str) -> None:
    config, found = parse({"webhook": url}, tmp_path)
    if found:
        assert config.webhook is None and [k for k, _ in found] == ["alerts.webhook"]
    else:
        hook = config.webhook
        assert hook is not None and hook.target.startswith("/") and 0 < hook.port < 65536
        assert url.isascii() and " " not in url


# -- through parse_config ----------------------------------------------------------------------


def unit_config(tmp_path: Path, **tables: Any) -> dict[str, Any]:
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
        **tables,
    }


def test_parse_config_carries_the_alerts(tmp_path: Path) -> None:
    assert parse_config(unit_config(tmp_path), base_dir=tmp_path).alerts == AlertsConfig()
    data = unit_config(tmp_path, alerts={"rpo_seconds": 60, "webhook": "http://h:8080/x"})
    alerts = parse_config(data, base_dir=tmp_path).alerts
    assert alerts.rpo_seconds == 60 and alerts.webhook == webhook_target("http://h:8080/x")


def test_parse_config_reports_alert_problems_with_the_others(tmp_path: Path) -> None:
    data = unit_config(tmp_path, alerts={"email": {"to": []}, "rpo_seconds": 0})
    data["unit"]["nme"] = "typo"
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=tmp_path)
    keys = {key for key, _ in info.value.problems}
    assert {"unit.nme", "alerts.rpo_seconds", "alerts.email.to", "alerts.email.from"} <= keys


def test_the_documented_example_is_valid(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    section = doc.split("## `[alerts]`", 1)[1].split("\n## ", 1)[0]
    block = section.split("### Example", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    config, found = parse(tomllib.loads(block)["alerts"], tmp_path, check_paths=False)
    assert found == []
    assert config.rpo_seconds == 300 and config.email is not None and config.webhook is not None
    assert config.snmp is not None and len(config.snmp.targets) == 2
