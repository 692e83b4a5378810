"""The admin HTTP server: status JSON, the page, refusals of bad requests, and who may ask."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from blockmirror.admin.access import (
    AdminAccess,
    AdminTokenError,
    SessionStore,
    check_token_file,
    cookie_value,
    ensure_token,
    load_token,
    split_host,
)
from blockmirror.admin.api import AdminServer
from blockmirror.admin.table import format_status_table
from blockmirror.config import parse_config
from blockmirror.errors import ConfigError
from blockmirror.units import human_size

STATUS: dict[str, Any] = {
    "unit": "site-a",
    "version": "0.1.0",
    "uptime_seconds": 3.0,
    "volumes": [
        {
            "name": "db",
            "role": "primary",
            "state": "serving",
            "size": 1 << 30,
            "export": "127.0.0.1:10809",
            "counters": {"reads": 3, "writes": 5, "bytes_written": 5 << 20},
            "journal": {"enqueue_paused": False, "consumers": {}},
        }
    ],
}
TOKEN = "unit-test-admin-token-0123456789"
AUTH = f"Authorization: Bearer {TOKEN}"


async def request(port: int, raw: bytes) -> tuple[int, bytes]:
    code, _, body = await exchange(port, raw)
    return code, body


async def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


def http(
    method: str, path: str, *headers: str, body: bytes = b"", host: str = "127.0.0.1"
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Recorder:
    """A control handler that records what reached it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    async def __call__(self, method: str, path: str, query: str) -> tuple[int, dict[str, Any]]:
        self.calls.append((method, path, query))
        return 200, {"ok": True}


def serve(test: Callable[[int, Recorder, AdminServer], Awaitable[None]], **rules: Any) -> Recorder:
    controls = Recorder()

    async def main() -> None:
        server = AdminServer(lambda: STATUS, controls, access=AdminAccess(TOKEN, **rules))
        _, port = await server.start("127.0.0.1", 0)
        try:
            await test(port, controls, server)
        finally:
            await server.close()

    asyncio.run(main())
    return controls


def test_status_page_and_errors() -> None:
    async def test(port: int, controls: Recorder, server: AdminServer) -> None:
        code, body = await request(port, http("GET", "/api/status", AUTH))
        assert code == 200 and json.loads(body) == STATUS
        code, body = await request(port, http("GET", "/", AUTH))
        assert code == 200 and b"site-a" in body and b"<td>db</td>" in body
        assert (await request(port, http("GET", "/nope", AUTH)))[0] == 404
        assert (await request(port, http("POST", "/api/status", AUTH)))[0] == 405
        assert (await request(port, b"garbage\r\n\r\n"))[0] == 400
        # A head that never ends within the limit is refused, not buffered forever.
        assert (await request(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 20000))[0] == 400
        code, body = await request(port, http("GET", "/api/status", AUTH))
        assert code == 200  # still serving after the bad requests

    serve(test)


def test_table_lists_every_volume() -> None:
    table = format_status_table(STATUS)
    assert "site-a" in table
    row = next(line for line in table.splitlines() if line.startswith("db"))
    assert "primary" in row and "1.0 GiB" in row and "127.0.0.1:10809" in row
    assert human_size(512) == "512 B" and human_size(3 << 20) == "3.0 MiB"


# --- the token ----------------------------------------------------------------------------------


def test_status_and_controls_need_the_token() -> None:
    async def test(port: int, controls: Recorder, server: AdminServer) -> None:
        code, headers, body = await exchange(port, http("GET", "/api/status"))
        assert code == 401 and headers["www-authenticate"].startswith("Bearer")
        assert "unit" not in json.loads(body)
        wrong = "Authorization: Bearer not-the-token-at-all"
        code, headers, _ = await exchange(port, http("GET", "/api/status", wrong))
        assert code == 401 and 'error="invalid_token"' in headers["www-authenticate"]
        basic = "Authorization: Basic dXNlcjpwYXNz"
        assert (await request(port, http("GET", "/api/status", basic)))[0] == 401
        pause = "/api/volumes/db/journal/pause"
        assert (await request(port, http("POST", pause)))[0] == 401
        assert (await request(port, http("POST", pause, wrong)))[0] == 401
        form = "Content-Type: text/plain"
        assert (await request(port, http("POST", pause, form, body=b"x=1")))[0] == 401
        # Without a token the page offers a sign-in form and nothing of the unit.
        code, page = await request(port, http("GET", "/"))
        assert code == 200 and b'id="signin"' in page and b"site-a" not in page
        assert controls.calls == []
        assert (await request(port, http("POST", pause, AUTH)))[0] == 200
        assert controls.calls == [("POST", pause, "")]

    serve(test)


def test_public_status_opens_reading_only() -> None:
    async def test(port: int, controls: Recorder, server: AdminServer) -> None:
        code, body = await request(port, http("GET", "/api/status"))
        assert code == 200 and json.loads(body) == STATUS
        code, page = await request(port, http("GET", "/"))
        assert code == 200 and b"<td>db</td>" in page and b'id="signin"' in page
        # A wrong token is still wrong; controls still need the right one.
        wrong = "Authorization: Bearer not-the-token-at-all"
        assert (await request(port, http("GET", "/api/status", wrong)))[0] == 401
        assert (await request(port, http("POST", "/api/volumes/db/journal/pause")))[0] == 401
        assert controls.calls == []

    serve(test, public_status=True)


# --- Host and Origin ----------------------------------------------------------------------------


def test_a_foreign_host_is_refused_even_with_the_token() -> None:
    async def test(port: int, controls: Recorder, server: AdminServer) -> None:
        for host in (f"evil.example:{port}", "evil.example", "127.0.0.1.evil.example", "a@b"):
            code, body = await request(port, http("GET", "/api/status", AUTH, host=host))
            assert code == 421 and "admin_hosts" in json.loads(body)["error"], host
            pause = "/api/volumes/db/journal/pause"
            assert (await request(port, http("POST", pause, AUTH, host=host)))[0] == 421
        for host in (f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST", "mirror-a.example:80"):
            assert (await request(port, http("GET", "/api/status", AUTH, host=host)))[0] == 200
        # No Host, or two of them: refused.
        no_host = f"GET /api/status HTTP/1.1\r\n{AUTH}\r\n\r\n".encode()
        assert (await request(port, no_host))[0] == 400
        two = http("GET", "/api/status", AUTH, "Host: evil.example")
        assert (await request(port, two))[0] == 400
        assert controls.calls == []

    serve(test, hosts=("mirror-a.example",))


def test_a_cross_origin_post_is_refused_even_with_the_token() -> None:
    async def test(port: int, controls: Recorder, server: AdminServer) -> None:
        pause = "/api/volumes/db/journal/pause"
        for origin in ("http://evil.example", f"http://127.0.0.1:{port + 1}", "null",
                       f"https://127.0.0.1:{port}"):  # fmt: skip
            code, body = await request(port, http("POST", pause, AUTH, f"Origin: {origin}"))
            assert code == 403 and "cross-origin" in json.loads(body)["error"], origin
        form = (
            "Origin: http://evil.example",
            "Content-Type: application/x-www-form-urlencoded",
        )
        assert (await request(port, http("POST", pause, *form, body=b"a=b")))[0] == 403
        site = "Sec-Fetch-Site: cross-site"
        assert (await request(port, http("POST", pause, AUTH, site)))[0] == 403
        assert controls.calls == []
        same = f"Origin: http://127.0.0.1:{port}"
        assert (await request(port, http("POST", pause, AUTH, same, host=f"127.0.0.1:{port}")))[
            0
        ] == 200
        # Reading from a foreign origin is harmless (no CORS headers): not refused.
        code, headers, _ = await exchange(
            port, http("GET", "/api/status", AUTH, "Origin: http://evil.example")
        )
        assert code == 200 and "access-control-allow-origin" not in headers

    serve(test)


# --- the page's session -------------------------------------------------------------------------


def test_session_cookie_and_csrf_token() -> None:
    async def test(port: int, controls: Recorder, server: AdminServer) -> None:
        json_type = "Content-Type: application/json"
        wrong = json.dumps({"token": "not-the-token-at-all"}).encode()
        assert (await request(port, http("POST", "/api/session", json_type, body=wrong)))[0] == 401
        # A form (what a foreign page can submit without a preflight) never signs in.
        form = "Content-Type: application/x-www-form-urlencoded"
        code, _ = await request(
            port, http("POST", "/api/session", form, body=f"token={TOKEN}".encode())
        )
        assert code == 401
        right = json.dumps({"token": TOKEN}).encode()
        code, headers, body = await exchange(
            port, http("POST", "/api/session", json_type, body=right)
        )
        assert code == 200
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        name = f"blockmirror_session_{port}"
        sid = cookie_value(cookie.split(";")[0], name)
        assert sid
        csrf = json.loads(body)["csrf_token"]
        with_cookie = f"Cookie: other=1; {name}={sid}"

        # The cookie reads status and the page (which then carries the CSRF token).
        assert (await request(port, http("GET", "/api/status", with_cookie)))[0] == 200
        code, headers, page = await exchange(port, http("GET", "/", with_cookie))
        assert code == 200 and csrf.encode() in page and b"data-path=" in page
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert (await request(port, http("GET", "/admin.js")))[0] == 200

        # An action needs the CSRF header as well; the cookie alone is refused.
        pause = "/api/volumes/db/journal/pause"
        code, body = await request(port, http("POST", pause, with_cookie))
        assert code == 403 and "CSRF" in json.loads(body)["error"]
        bad = "X-CSRF-Token: wrong"
        assert (await request(port, http("POST", pause, with_cookie, bad)))[0] == 403
        text = "Content-Type: text/plain"
        assert (await request(port, http("POST", pause, with_cookie, text, body=b"x")))[0] == 403
        assert controls.calls == []
        good = f"X-CSRF-Token: {csrf}"
        assert (await request(port, http("POST", pause, with_cookie, good)))[0] == 200
        assert len(controls.calls) == 1
        # Another unit's cookie, or a made-up one, is no session.
        assert (await request(port, http("POST", pause, f"Cookie: {name}=forged", good)))[0] == 401

        # Signing out needs the CSRF token too, and ends the session.
        assert (await request(port, http("DELETE", "/api/session", with_cookie)))[0] == 403
        code, headers, _ = await exchange(port, http("DELETE", "/api/session", with_cookie, good))
        assert code == 200 and "Max-Age=0" in headers["set-cookie"]
        assert (await request(port, http("GET", "/api/status", with_cookie)))[0] == 401
        assert (await request(port, http("POST", pause, with_cookie, good)))[0] == 401
        # The bearer token also opens a session (for scripts that drive the page's API).
        code, body = await request(port, http("POST", "/api/session", AUTH))
        assert code == 200 and json.loads(body)["csrf_token"]

    serve(test)


def test_sessions_are_bounded_in_number_and_age() -> None:
    store = SessionStore(limit=3)
    ids = [store.create()[0] for _ in range(5)]
    assert len(store) == 3
    assert store.csrf(ids[0]) is None and store.csrf(ids[-1]) is not None
    assert store.csrf(None) is None and store.csrf("") is None
    old = SessionStore(lifetime=0)
    sid, _ = old.create()
    assert old.csrf(sid) is None


def test_split_host_and_origin() -> None:
    assert split_host("127.0.0.1:7700") == ("127.0.0.1", 7700)
    assert split_host("[::1]:7700") == ("::1", 7700)
    assert split_host("Mirror.Example.") == ("mirror.example", None)
    for bad in ("", "[::1", "[nope]:1", "a:b", "a:", "a:999999", "a/b", "u@h"):
        assert split_host(bad) is None, bad
    access = AdminAccess(TOKEN)
    assert access.origin_matches("http://127.0.0.1:7700", "127.0.0.1:7700")
    assert access.origin_matches("http://localhost", "localhost:80")
    assert not access.origin_matches("http://127.0.0.1:7701", "127.0.0.1:7700")
    assert not access.origin_matches("https://127.0.0.1:7700", "127.0.0.1:7700")
    assert not access.origin_matches("http://127.0.0.1:7700/x", "127.0.0.1:7700")
    assert AdminAccess(TOKEN, tls=True).origin_matches("https://h.example", "h.example:443")
    assert AdminAccess(TOKEN, bind_host="mirror-a").host_allowed("mirror-a")
    assert not access.host_allowed("mirror-a")


# --- the token file -----------------------------------------------------------------------------


def test_generated_token_is_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    token = ensure_token(path)
    assert len(token) >= 40 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_token(path) == token == load_token(path)
    assert [p.name for p in tmp_path.iterdir()] == ["admin.token"]
    os.chmod(path, 0o644)
    with pytest.raises(AdminTokenError, match="chmod 600"):
        ensure_token(path)
    assert load_token(path, check_mode=False) == token


@pytest.mark.parametrize(
    ("content", "mode", "needle"),
    [
        (b"", 0o600, "empty"),
        (b"short\n", 0o600, "at least 16"),
        (b"has a space in the middle!!\n", 0o600, "without spaces"),
        (b"0123456789abcdef0123\n", 0o604, "other users"),
        (b"0123456789abcdef0123\n", 0o620, "other users"),
    ],
)
def test_bad_token_files_are_refused(
    tmp_path: Path, content: bytes, mode: int, needle: str
) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    os.chmod(path, mode)
    why = check_token_file(path)
    assert why is not None and needle in why
    with pytest.raises(AdminTokenError, match=needle):
        ensure_token(path)


def test_a_group_readable_token_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"0123456789abcdef0123\n")
    os.chmod(path, 0o640)
    assert check_token_file(path) is None and load_token(path) == "0123456789abcdef0123"
    assert "cannot read" in (check_token_file(tmp_path / "nope") or "")


def test_config_keys_of_the_admin_door(tmp_path: Path) -> None:
    token = tmp_path / "admin.token"
    token.write_text("0123456789abcdef0123\n")
    os.chmod(token, 0o600)
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    volume = {"name": "v", "role": "primary", "path": "v.img", "size": "1MiB",
              "export": "127.0.0.1:0", "journal": False}  # fmt: skip

    def unit(**keys: object) -> dict[str, object]:
        return {"unit": {"name": "u", "state_dir": "state", **keys}, "volume": [volume]}

    config = parse_config(
        unit(
            admin="127.0.0.1:0",
            admin_token_file="admin.token",
            admin_public_status=True,
            admin_hosts=["Mirror-A.example."],
            admin_tls_cert="cert.pem",
            admin_tls_key="key.pem",
        ),
        base_dir=tmp_path,
        check_paths=False,
    )
    assert config.unit.admin_token_file == tmp_path / "admin.token"
    assert config.unit.admin_public_status is True
    assert config.unit.admin_hosts == ("mirror-a.example",)
    assert config.unit.admin_tls_cert == tmp_path / "cert.pem"
    assert parse_config(unit(), base_dir=tmp_path, check_paths=False).unit.admin_token_file is None

    def problems(**keys: object) -> str:
        with pytest.raises(ConfigError) as err:
            parse_config(unit(**keys), base_dir=tmp_path, check_paths=True)
        return "\n".join(f"{k}: {m}" for k, m in err.value.problems)

    assert "unit.admin_token_file" in problems(admin_token_file="missing.token")
    os.chmod(token, 0o644)
    assert "other users" in problems(admin_token_file="admin.token")
    assert "unit.admin_tls_key: missing" in problems(admin_tls_cert="cert.pem")
    assert "unit.admin_tls_ca" in problems(admin_tls_ca="cert.pem")
    assert "admin_hosts[0]" in problems(admin_hosts=["bad host!"])
    assert "unit.admin_public_status" in problems(admin_public_status="yes")
