"""E-mail delivery: one message per event over SMTP (aiosmtplib), STARTTLS and AUTH.

The server's certificate is verified (against ``tls_ca``, or the system's CAs), and a password
is never sent without TLS: the configuration refuses ``username`` with ``starttls = false``, and
aiosmtplib's ``start_tls=True`` fails rather than carrying on in clear when the server does not
offer STARTTLS.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import socket
import ssl
from email.message import EmailMessage

import aiosmtplib

from blockmirror.config_alerts import EmailTarget, read_secret
from blockmirror.events import Event
from blockmirror.notify.render import mail_body, mail_subject

__all__ = ["MailDeliverer", "build_message"]

log = logging.getLogger(__name__)

# Per SMTP step (connect, each command): a server that accepts and then says nothing must not
# hold the target's queue longer than this per attempt.
TIMEOUT = 30.0

_local_name: str | None = None


async def local_hostname() -> str:
    """This host's name for EHLO: looked up once, in a thread (getfqdn may ask the DNS)."""
    global _local_name
    if _local_name is None:
        _local_name = await asyncio.to_thread(socket.getfqdn) or "localhost"
    return _local_name


def build_message(target: EmailTarget, event: Event, version: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = target.sender
    msg["To"] = ", ".join(target.to)
    msg["Subject"] = mail_subject(event)
    msg["Date"] = email.utils.formatdate(event.time, usegmt=True)
    # The sender's domain, not make_msgid's default, which would look the host up (blocking).
    domain = target.sender.rpartition("@")[2]
    msg["Message-ID"] = email.utils.make_msgid("blockmirror", domain=domain)
    msg["X-Blockmirror-Event"] = str(event.name)
    msg["X-Blockmirror-State"] = str(event.state)
    msg.set_content(mail_body(event, version))
    return msg


class MailDeliverer:
    """Sends each event to one :class:`EmailTarget`; a connection per message (alerts are
    rare, and a connection held open would only time out between them)."""

    def __init__(self, target: EmailTarget, version: str, *, timeout: float = TIMEOUT) -> None:
        self.target = target
        self.version = version
        self.timeout = timeout
        # Made once: loading the system's CAs takes tens of milliseconds of the event loop.
        self._tls: ssl.SSLContext | None = None

    async def deliver(self, event: Event) -> None:
        t = self.target
        password = None
        if t.password_file is not None:
            # Read per message: a rotated password is used without a reload.
            password = read_secret(t.password_file, "SMTP password")
        if t.starttls and self._tls is None:
            self._tls = ssl.create_default_context(
                cafile=None if t.tls_ca is None else str(t.tls_ca)
            )
        refused, _ = await aiosmtplib.send(
            build_message(t, event, self.version),
            hostname=t.smtp.host,
            port=t.smtp.port,
            local_hostname=await local_hostname(),
            start_tls=t.starttls,
            tls_context=self._tls if t.starttls else None,
            username=t.username,
            password=password,
            timeout=self.timeout,
        )
        if refused:
            # The others have the message: sending it again would duplicate it for them.
            log.warning(
                "alert mail %s: the server refused %s", event.id, ", ".join(sorted(refused))
            )

    async def aclose(self) -> None:
        """Nothing is kept open between messages."""
