"""Alert delivery to real receivers: Debian's snmptrapd (SNMPv2c and SNMPv3 USM), aiosmtpd with
STARTTLS and AUTH, and an HTTP(S) webhook server, through the AlertDispatcher an EventLog feeds.

Receivers run outside the test's event loop (a process, threads), so waiting for them is done in
a thread (``asyncio.to_thread(receiver.wait, n)``) while the dispatcher's workers go on.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from blockmirror import __version__
from blockmirror.config_alerts import AlertsConfig, parse_alerts
from blockmirror.events import EventLog, EventName, Subject
from blockmirror.notify import AlertDispatcher
from blockmirror.notify.traps import CLEARED, OBJECTS, RAISED, default_engine_id
from tests.support.receivers import (
    SnmpUser,
    free_port,
    self_signed_cert,
    smtp_server,
    snmptrapd,
    webhook_server,
)

pytestmark = [
    pytest.mark.e2e,
    # aiosmtpd itself sets the attribute it deprecates when a login succeeds.
    pytest.mark.filterwarnings("ignore:Session.login_data is deprecated"),
]

UNIT = "site-a"
LINK = Subject("db", "site-b:7800")
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def config(base: Path, data: dict[str, Any]) -> AlertsConfig:
    problems: list[tuple[str, str]] = []
    parsed = parse_alerts(data, problems, base)
    assert problems == []
    return parsed


def secret(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


async def fast_sleep(delay: float) -> None:
    """The real backoff, a hundred times faster: retries happen, the test does not wait."""
    await asyncio.sleep(delay / 100)


async def until(predicate: Callable[[], bool], timeout: float = 30) -> None:
    # Polling: a target's progress is a counter in status, with no event to wait on.
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


async def sent(d: AlertDispatcher, name: str, count: int) -> dict[str, Any]:
    """The status of target ``name`` once it has delivered ``count`` events."""
    await until(lambda: d.status()[name]["sent"] >= count)
    return d.status()[name]


def run(
    alerts: AlertsConfig, body: Callable[[EventLog, AlertDispatcher], Coroutine[Any, Any, None]]
) -> None:
    """Run ``body`` with an EventLog whose listener is a started dispatcher for ``alerts``."""

    async def main() -> None:
        d = AlertDispatcher(UNIT, alerts, version=__version__, sleep=fast_sleep)
        log = EventLog(UNIT)
        log.listeners.append(d.submit)
        d.start()
        try:
            await body(log, d)
        finally:
            await d.close()

    asyncio.run(main())


# -- SNMP --------------------------------------------------------------------------------------


def test_v2c_traps_carry_every_field_as_text(tmp_path: Path) -> None:
    with snmptrapd(tmp_path / "trapd", community="alerts-ro") as trapd:
        alerts = config(tmp_path, {"snmp": {"targets": [trapd.address], "community": "alerts-ro"}})

        async def body(log: EventLog, d: AlertDispatcher) -> None:
            log.raise_event(EventName.LINK_DOWN, LINK, "no connection for 30 s")
            log.clear(EventName.LINK_DOWN, LINK)
            log.raise_event(EventName.SPLIT_BRAIN, Subject("db"), "débit → 0 " + "x" * 300)
            await sent(d, f"snmp {trapd.address}", 3)

        run(alerts, body)
        raised, cleared, long = trapd.wait(3)
    # pysnmp ran on a thread of its own (off the unit's event loop), stopped by close().
    assert not [t for t in threading.enumerate() if t.name.startswith("snmp ")]

    def text(trap: Any, name: str) -> str:
        return str(trap.text(OBJECTS[name]))

    assert (raised.oid, cleared.oid, long.oid) == (RAISED, CLEARED, RAISED)
    assert text(raised, "bmEventName") == "link-down" == text(cleared, "bmEventName")
    assert (text(raised, "bmEventState"), text(cleared, "bmEventState")) == ("raised", "cleared")
    assert text(raised, "bmEventUnit") == UNIT
    assert (text(raised, "bmEventVolume"), text(raised, "bmEventPeer")) == ("db", "site-b:7800")
    assert text(raised, "bmEventMessage") == "no connection for 30 s"
    assert text(cleared, "bmEventMessage") == "was: no connection for 30 s"
    assert ISO.fullmatch(text(raised, "bmEventTime")) and ISO.fullmatch(
        text(raised, "bmEventSince")
    )
    assert text(cleared, "bmEventSince") == text(raised, "bmEventTime")
    assert [t.varbinds[OBJECTS["bmEventId"]] for t in (raised, cleared, long)] == ["1", "2", "3"]
    assert text(raised, "bmVersion") == __version__
    # UTF-8 arrives intact, cut to 255 octets; a unit-wide subject has an empty peer.
    message = text(long, "bmEventMessage")
    assert message.startswith("débit → 0 xxx") and len(message.encode()) == 255
    assert text(long, "bmEventPeer") == ""


V3 = [
    # ours: auth, priv; Net-SNMP's: auth, priv
    ("SHA256", "AES128", "SHA-256", "AES"),
    ("SHA224", "AES128", "SHA-224", "AES"),
    # SHA's 20 octets are shorter than AES-256's key: the key extensions differ here.
    ("SHA", "AES256", "SHA", "AES-256"),
    ("SHA", "AES256C", "SHA", "AES-256-C"),
    ("MD5", "AES192", "MD5", "AES-192"),
    ("MD5", "AES192C", "MD5", "AES-192-C"),
    ("SHA512", "DES", "SHA-512", "DES"),
    ("SHA384", "none", "SHA-384", None),
]


@pytest.mark.parametrize(("auth", "priv", "net_auth", "net_priv"), V3)
def test_v3_traps_reach_snmptrapd(
    tmp_path: Path, auth: str, priv: str, net_auth: str, net_priv: str | None
) -> None:
    user = SnmpUser(
        "bm-alerts", default_engine_id(UNIT), net_auth, "auth-pass-1", net_priv, "priv-pass-2"
    )
    with snmptrapd(tmp_path / "trapd", community=None, users=[user]) as trapd:
        snmp: dict[str, Any] = {
            "targets": [trapd.address],
            "version": "3",
            "user": "bm-alerts",
            "auth": auth,
            "auth_key_file": secret(tmp_path, "auth", "auth-pass-1"),
            "priv": priv,
        }
        if priv != "none":
            snmp["priv_key_file"] = secret(tmp_path, "priv", "priv-pass-2")

        async def body(log: EventLog, d: AlertDispatcher) -> None:
            log.raise_event(EventName.JOURNAL_FULL, Subject("db"), "journal full")
            await sent(d, f"snmp {trapd.address}", 1)

        run(config(tmp_path, {"snmp": snmp}), body)
        [trap] = trapd.wait(1)
    assert trap.oid == RAISED and trap.text(OBJECTS["bmEventName"]) == "journal-full"


def test_v3_with_a_configured_engine_id_and_wrong_keys(tmp_path: Path) -> None:
    engine = bytes.fromhex("80007ed905") + b"nms-known"
    user = SnmpUser("bm", engine, "SHA-256", "auth-pass-1", "AES", "priv-pass-2")
    with snmptrapd(tmp_path / "trapd", community="public", users=[user]) as trapd:
        snmp = {
            "targets": [trapd.address],
            "version": "3",
            "user": "bm",
            "auth_key_file": secret(tmp_path, "auth", "auth-pass-1"),
            "priv_key_file": secret(tmp_path, "priv", "wrong-priv-key"),
            "engine_id": "0x" + engine.hex(),
        }
        wrong = config(tmp_path, {"snmp": snmp})
        snmp["priv_key_file"] = secret(tmp_path, "p2", "priv-pass-2")
        right = config(tmp_path, {"snmp": snmp})
        v2c = config(tmp_path, {"snmp": {"targets": [trapd.address], "community": "public"}})

        async def body(log: EventLog, d: AlertDispatcher) -> None:
            name = f"snmp {trapd.address}"
            log.raise_event(EventName.VOLUME_FAILED, Subject("db"), "wrong key")
            await sent(d, name, 1)  # sent: a trap is not acknowledged
            d.reconfigure(right)
            log.raise_event(EventName.VOLUME_FAILED, Subject("db2"), "right key")
            await sent(d, name, 2)
            d.reconfigure(v2c)
            log.raise_event(EventName.VOLUME_FAILED, Subject("db3"), "v2c")
            await sent(d, name, 3)

        run(wrong, body)
        # snmptrapd handles traps in order: once the last is in, the first was dropped.
        traps = trapd.wait(2)
    assert [t.text(OBJECTS["bmEventMessage"]) for t in traps] == ["right key", "v2c"]


# -- e-mail ------------------------------------------------------------------------------------


def email_config(tmp_path: Path, address: str, cert: Path | None, **extra: Any) -> AlertsConfig:
    table: dict[str, Any] = {
        "to": ["ops@example.com", "dba@example.com"],
        "from": "blockmirror@site-a.example",
        "smtp": address,
        **extra,
    }
    if cert is not None:
        table["tls_ca"] = str(cert)
    return config(tmp_path, {"email": table})


def test_mail_over_starttls_with_auth(tmp_path: Path) -> None:
    with smtp_server(tmp_path / "smtp", username="alerts", password="s3cret") as smtp:
        alerts = email_config(
            tmp_path,
            smtp.address,
            smtp.cert,
            username="alerts",
            password_file=secret(tmp_path, "pw", "s3cret"),
        )

        async def body(log: EventLog, d: AlertDispatcher) -> None:
            log.raise_event(EventName.LINK_DOWN, LINK, "no connection for 30 s")
            log.clear(EventName.LINK_DOWN, LINK)
            await sent(d, "email", 2)

        run(alerts, body)
        raised, cleared = smtp.wait(2)
    assert smtp.logins == [("alerts", "s3cret")] * 2
    assert raised.rcpt_tos == ["ops@example.com", "dba@example.com"]
    assert raised.mail_from == "blockmirror@site-a.example"
    msg = raised.message
    assert msg["Subject"] == "[blockmirror site-a] link-down raised: db → site-b:7800"
    assert cleared.message["Subject"] == "[blockmirror site-a] link-down cleared: db → site-b:7800"
    body_lines = msg.get_content().splitlines()
    for line in ("event:    link-down", "state:    raised", "unit:     site-a", "volume:   db",
                 "peer:     site-b:7800", "message:  no connection for 30 s",
                 f"version:  blockmirror {__version__}"):  # fmt: skip
        assert line in body_lines


def test_a_refused_login_is_retried_and_a_rotated_password_used(tmp_path: Path) -> None:
    with smtp_server(tmp_path / "smtp", username="alerts", password="s3cret") as smtp:
        pw = secret(tmp_path, "pw", "old-password")
        alerts = email_config(
            tmp_path, smtp.address, smtp.cert, username="alerts", password_file=pw
        )

        async def body(log: EventLog, d: AlertDispatcher) -> None:
            log.raise_event(EventName.RPO_EXCEEDED, LINK, "lag 120 s over 60 s")
            await until(lambda: d.status()["email"]["failed"] >= 2)
            assert "535" in str(d.status()["email"]["last_error"])
            secret(tmp_path, "pw", "s3cret")  # the operator fixes the file; no reload
            status = await sent(d, "email", 1)
            assert status["queued"] == 0

        run(alerts, body)
        [mail] = smtp.wait(1)
    assert mail.message["X-Blockmirror-Event"] == "rpo-exceeded"
    assert ("alerts", "s3cret") in smtp.logins and len(smtp.messages) == 1


def test_no_mail_goes_out_without_tls_or_to_an_unverified_server(tmp_path: Path) -> None:
    other, _ = self_signed_cert(tmp_path, "other")
    with (
        smtp_server(tmp_path / "plain", username=None, starttls=False) as plain,
        smtp_server(tmp_path / "tls", username=None) as tls,
    ):
        no_starttls = email_config(tmp_path, plain.address, None)  # starttls defaults to true
        wrong_ca = email_config(tmp_path, tls.address, other)

        async def body(log: EventLog, d: AlertDispatcher) -> None:
            log.raise_event(EventName.CONFIG_LOST, Subject(), "gone")
            await until(lambda: d.status()["email"]["failed"] >= 2)
            assert "STARTTLS" in str(d.status()["email"]["last_error"])
            d.reconfigure(wrong_ca)
            await until(lambda: "certificate" in str(d.status()["email"]["last_error"]))

        run(no_starttls, body)
    assert plain.messages == [] and tls.messages == []


# -- webhook -----------------------------------------------------------------------------------


def test_webhook_over_https_with_a_bearer_token(tmp_path: Path) -> None:
    with webhook_server(tmp_path / "hook", tls=True) as hook:
        alerts = config(
            tmp_path,
            {"webhook": {"url": hook.url, "tls_ca": str(hook.cert),
                         "token_file": secret(tmp_path, "token", "hook-token-1")}},
        )  # fmt: skip

        async def body(log: EventLog, d: AlertDispatcher) -> None:
            log.raise_event(EventName.PEER_TRACKING, LINK, "journal overflowed")
            await sent(d, "webhook", 1)

        run(alerts, body)
        [request] = hook.wait(1)
    assert request.headers["authorization"] == "Bearer hook-token-1"
    doc = request.json()
    assert doc["event"] == "peer-tracking" and doc["state"] == "raised"
    assert (doc["unit"], doc["volume"], doc["peer"]) == (UNIT, "db", "site-b:7800")
    assert doc["version"] == __version__ and doc["id"] == 1


def test_webhook_failures_are_retried_and_each_event_delivered_once_in_order(
    tmp_path: Path,
) -> None:
    with webhook_server() as hook:
        hook.reply_with(500, 503, 500)

        async def body(log: EventLog, d: AlertDispatcher) -> None:
            log.raise_event(EventName.LINK_DOWN, LINK, "down")
            log.clear(EventName.LINK_DOWN, LINK)
            status = await sent(d, "webhook", 2)
            assert (status["failed"], status["queued"]) == (3, 0)
            assert "HTTP 500" in str(status["last_error"])

        run(config(tmp_path, {"webhook": hook.url}), body)
    ids = [(r.json()["id"], r.json()["state"]) for r in hook.requests]
    assert ids == [(1, "raised")] * 4 + [(2, "cleared")]


# -- one dead target ----------------------------------------------------------------------------


def test_a_dead_mail_server_delays_neither_submit_nor_the_other_targets(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: connections are refused
    with snmptrapd(tmp_path / "trapd") as trapd, webhook_server() as hook:
        alerts = config(
            tmp_path,
            {
                "email": {"to": ["ops@example.com"], "from": "bm@x.example", "smtp": dead},
                "snmp": {"targets": [trapd.address], "community": "public"},
                "webhook": hook.url,
            },
        )

        async def body(log: EventLog, d: AlertDispatcher) -> None:
            for n in range(3):
                log.raise_event(EventName.LINK_DOWN, Subject("db", f"peer-{n}:1"), "down")
            # raise_event ran every listener without awaiting: nothing was sent yet.
            assert hook.requests == [] and d.status()["webhook"]["queued"] == 3
            await sent(d, "webhook", 3)
            await sent(d, f"snmp {trapd.address}", 3)
            await asyncio.to_thread(trapd.wait, 3)
            email = d.status()["email"]
            assert email["sent"] == 0 and email["queued"] == 3 and email["failed"] >= 1
            assert (
                "refused" in str(email["last_error"]).lower()
                or "connect" in str(email["last_error"]).lower()
            )

        run(alerts, body)
    assert [r.json()["peer"] for r in hook.requests] == ["peer-0:1", "peer-1:1", "peer-2:1"]
