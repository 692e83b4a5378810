"""An alert's e-mail as built, before any SMTP: headers, subject and body.
(Delivery through aiosmtpd with STARTTLS and AUTH: tests/e2e/test_alert_targets.py.)"""

from __future__ import annotations

from blockmirror.addresses import Address
from blockmirror.config_alerts import EmailTarget
from blockmirror.events import Event, EventName, EventState, Subject
from blockmirror.notify.mail import build_message
from blockmirror.notify.render import iso_time, mail_subject

TARGET = EmailTarget(
    ("ops@example.com", "dba@example.org"), "bm@alerts.example.net", Address("smtp", 587)
)
RAISED = Event(
    9,
    EventName.LINK_DOWN,
    EventState.RAISED,
    "site-a",
    Subject("db", "site-b:7800"),
    "no connection for 30 s",
    1_700_000_000.5,
    1_699_999_970.0,
)


def test_the_subject_names_unit_event_state_and_subject() -> None:
    assert mail_subject(RAISED) == "[blockmirror site-a] link-down raised: db → site-b:7800"
    unit_wide = Event(1, EventName.CONFIG_LOST, EventState.CLEARED, "u", Subject(), "", 0, 0)
    assert mail_subject(unit_wide) == "[blockmirror u] config-lost cleared: unit"


def test_the_message_has_its_headers_and_every_field_in_the_body() -> None:
    msg = build_message(TARGET, RAISED, "1.2.3")
    assert msg["From"] == "bm@alerts.example.net"
    assert msg["To"] == "ops@example.com, dba@example.org"
    assert msg["Subject"] == "[blockmirror site-a] link-down raised: db → site-b:7800"
    assert msg["Message-ID"].endswith("@alerts.example.net>")
    assert msg["X-Blockmirror-Event"] == "link-down" and msg["X-Blockmirror-State"] == "raised"
    body = msg.get_content()
    for line in (
        "event:    link-down",
        "state:    raised",
        "unit:     site-a",
        "volume:   db",
        "peer:     site-b:7800",
        "message:  no connection for 30 s",
        "time:     2023-11-14T22:13:20.500Z",
        "since:    2023-11-14T22:12:50.000Z",
        "event id: 9",
        "version:  blockmirror 1.2.3",
    ):
        assert line in body.splitlines()


def test_iso_time_is_utc_with_milliseconds() -> None:
    assert iso_time(0) == "1970-01-01T00:00:00.000Z"
    assert iso_time(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"
