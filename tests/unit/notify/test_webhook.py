"""The webhook's HTTP/1.1 client against servers on 127.0.0.1: the receiver of
tests/support for well-behaved ones, raw asyncio servers for replies that must be refused."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from blockmirror.config_alerts import webhook_target as target
from blockmirror.errors import NotifyError
from blockmirror.events import Event, EventName, EventState, Subject
from blockmirror.notify.webhook import WebhookDeliverer, payload, post
from tests.support.receivers import self_signed_cert, webhook_server

EVENT = Event(
    5,
    EventName.SPLIT_BRAIN,
    EventState.RAISED,
    "site-a",
    Subject("db", "[::1]:7800"),
    "both took writes",
    10.5,
    10.5,
)


def secret(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "token"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_payload_is_the_event_with_summary_and_version() -> None:
    doc = json.loads(payload(EVENT, "1.2.3"))
    assert doc == {
        **EVENT.to_json(),
        "summary": "split-brain db → [::1]:7800: both took writes",
        "version": "1.2.3",
    }


def test_a_post_carries_the_event_and_the_bearer_token(tmp_path: Path) -> None:
    with webhook_server() as hook:
        t = target(hook.url + "?src=bm", token_file=secret(tmp_path, "tok-abc"))
        asyncio.run(WebhookDeliverer(t, "1.2.3").deliver(EVENT))
        [req] = hook.wait(1)
    assert (req.method, req.target) == ("POST", "/hook?src=bm")
    assert req.headers["authorization"] == "Bearer tok-abc"
    assert req.headers["host"] == f"127.0.0.1:{hook.port}"
    assert req.headers["content-type"].startswith("application/json")
    assert req.json()["event"] == "split-brain" and req.json()["version"] == "1.2.3"


@pytest.mark.parametrize("status", [500, 302, 404])
def test_anything_but_2xx_is_a_failure_with_the_reason(status: int) -> None:
    with webhook_server() as hook:
        hook.reply_with(status)
        with pytest.raises(NotifyError, match=f"HTTP {status} Failed: receiver says no"):
            asyncio.run(WebhookDeliverer(target(hook.url), "1").deliver(EVENT))
        assert "authorization" not in hook.wait(1)[0].headers


def test_https_verifies_the_server_against_tls_ca(tmp_path: Path) -> None:
    other, _ = self_signed_cert(tmp_path, "other")
    with webhook_server(tmp_path, tls=True) as hook:
        assert hook.cert is not None
        asyncio.run(WebhookDeliverer(target(hook.url, tls_ca=hook.cert), "1").deliver(EVENT))
        assert len(hook.wait(1)) == 1
        with pytest.raises(ssl.SSLCertVerificationError):
            asyncio.run(WebhookDeliverer(target(hook.url, tls_ca=other), "1").deliver(EVENT))
    assert len(hook.requests) == 1


def test_a_silent_server_times_out() -> None:
    with webhook_server() as hook:
        hook.hang.set()
        t = target(hook.url)
        with pytest.raises(TimeoutError):
            asyncio.run(WebhookDeliverer(t, "1", timeout=0.2).deliver(EVENT))
        assert len(hook.requests) == 1


def test_an_unreadable_token_file_fails_the_delivery(tmp_path: Path) -> None:
    path = secret(tmp_path, "tok")
    path.chmod(0o644)
    t = target("http://127.0.0.1:9/", token_file=path)
    with pytest.raises(NotifyError, match="accessible to other users"):
        asyncio.run(WebhookDeliverer(t, "1").deliver(EVENT))


def raw_server(reply: bytes) -> Callable[[], Coroutine[Any, Any, Any]]:
    """A test body that posts to a server answering ``reply`` (then closing) and returns the
    response (or raises what post raised)."""

    async def main() -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await post(target(f"http://127.0.0.1:{port}/x"), b"{}", version="1")

    return main


def test_interim_replies_are_skipped() -> None:
    reply = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n"
    response = asyncio.run(raw_server(reply)())
    assert (response.status, response.reason, response.headers) == (204, "No Content", {"x-a": "b"})


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (b"", "closed the connection"),
        (b"SMTP ready\r\n", "not HTTP/1.x"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\n" + b"x" * 9000 + b"\r\n\r\n", "line over"),
        (b"HTTP/1.1 200 OK\r\n" + b"A: b\r\n" * 101 + b"\r\n", "more than 100 headers"),
        (b"HTTP/1.1 200 OK\r\n" + (b"A: " + b"b" * 8000 + b"\r\n") * 9 + b"\r\n", "head is over"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 6, "only interim"),
        (b"HTTP/1.1 200 OK\r\nA: b\r\n", "closed the connection"),
    ],
)
def test_bad_replies_are_refused(reply: bytes, why: str) -> None:
    with pytest.raises(NotifyError, match=why):
        asyncio.run(raw_server(reply)())


def test_an_error_body_is_read_only_as_far_as_the_log_needs() -> None:
    body = b"oops  \n  " + b"z" * 100_000
    reply = b"HTTP/1.1 503 Busy\r\nContent-Length: 100009\r\n\r\n" + body
    response = asyncio.run(raw_server(reply)())
    assert response.status == 503 and response.detail.startswith("oops z")
    assert len(response.detail) <= 512
