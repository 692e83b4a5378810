"""Units with alert targets, for tests: real receivers (snmptrapd, an SMTP server, a webhook
server), the ``[alerts]`` table that names them, and waiting for what they got."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockmirror.notify.traps import OBJECTS
from tests.support.config_file import Document, edit_config
from tests.support.pair import Site, wait_status
from tests.support.receivers import (
    SmtpReceiver,
    TrapReceiver,
    WebhookReceiver,
    smtp_server,
    snmptrapd,
    webhook_server,
)

NAME, STATE = OBJECTS["bmEventName"], OBJECTS["bmEventState"]


@dataclass
class Receivers:
    traps: TrapReceiver
    mail: SmtpReceiver
    hook: WebhookReceiver

    def trap_events(self, name: str, state: str) -> list[Any]:
        return [t for t in self.traps.traps() if t.text(NAME) == name and t.text(STATE) == state]

    def mails(self, name: str, state: str) -> list[Any]:
        verb = "cleared" if state == "cleared" else "raised"
        return [m for m in self.mail.messages if f"{name} {verb}" in str(m.message["Subject"])]


def hooks(hook: WebhookReceiver, name: str, state: str) -> list[dict[str, Any]]:
    docs = [r.json() for r in list(hook.requests)]
    return [d for d in docs if d["event"] == name and d["state"] == state]


@contextmanager
def receivers(directory: Path) -> Iterator[Receivers]:
    with ExitStack() as stack:
        traps = stack.enter_context(snmptrapd(directory / "snmp"))
        mail = stack.enter_context(smtp_server(directory / "smtp"))
        hook = stack.enter_context(webhook_server())
        yield Receivers(traps, mail, hook)


def alerts_table(directory: Path, r: Receivers | None, **extra: Any) -> dict[str, Any]:
    table: dict[str, Any] = dict(extra)
    if r is not None:
        password = directory / "smtp.password"
        password.write_text("s3cret\n")
        password.chmod(0o600)
        assert r.mail.cert is not None
        table["email"] = {
            "to": ["ops@example.test"],
            "from": "blockmirror@example.test",
            "smtp": r.mail.address,
            "starttls": True,
            "username": "alerts",
            "password_file": str(password),
            "tls_ca": str(r.mail.cert),
        }
        table["snmp"] = {"targets": [r.traps.address], "community": "public"}
        table["webhook"] = r.hook.url
    return table


def set_alerts(site: Site, table: dict[str, Any]) -> None:
    def change(doc: Document) -> None:
        doc["alerts"] = table

    edit_config(site.config, change)


def until(check: Any, what: str, timeout: float = 30) -> Any:
    """Poll ``check`` until it answers something true (a non-empty list, say)."""
    return wait_status(lambda: check() or None, timeout=timeout, what=what)
