"""The admin door (issue 7, point 16) against a real ``blockmirror run``: no token, a wrong token,
a cross-origin form, a ``text/plain`` POST, a foreign Host (DNS rebinding), the page's session
and CSRF token, public status, the token file's life cycle, and TLS with the CLI.

Every refused request is checked to have changed nothing: the journal's enqueueing stays as it
was, as the unit's own status (read with the token) says.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.unit_process import (
    BLOCKMIRROR,
    UnitProcess,
    admin_request,
    fetch_status,
    require_commands,
    start_unit,
    write_config,
)

pytestmark = pytest.mark.fault

PAUSE = "/api/volumes/vol/journal/pause"
RESUME = "/api/volumes/vol/journal/resume"


def unit_config(directory: Path, **unit_keys: Any) -> Path:
    """One journaled primary volume; ``unit_keys`` are added to ``[unit]``."""
    directory.mkdir(parents=True, exist_ok=True)
    volume = {
        "name": "vol",
        "role": "primary",
        "path": str(directory / "vol.img"),
        "size": "8MiB",
        "export": "127.0.0.1:0",
    }
    path = write_config(directory, volumes=[volume])
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in unit_keys.items())
    text = path.read_text().replace('admin = "127.0.0.1:0"\n', 'admin = "127.0.0.1:0"\n' + extra)
    path.write_text(text)
    return path


def start(directory: Path, **unit_keys: Any) -> UnitProcess:
    return start_unit(unit_config(directory, **unit_keys), directory / "state")


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UnitProcess]:
    u = start(tmp_path_factory.mktemp("admin"))
    try:
        yield u
    finally:
        u.kill()


def raw(unit: UnitProcess, method: str, path: str, *headers: str, body: bytes = b"",
        host: str | None = None) -> tuple[int, dict[str, str], dict[str, Any]]:  # fmt: skip
    """Exactly these bytes, as a browser or an attacker would send them (no token added)."""
    address, port = unit.admin.rsplit(":", 1)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or unit.admin}", *headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    with socket.create_connection((address, int(port)), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    doc = json.loads(payload) if payload.startswith(b"{") else {}
    return int(status_line.split(" ")[1]), fields, doc


def paused(unit: UnitProcess) -> bool:
    [vol] = fetch_status(unit)["volumes"]
    return bool(vol["journal"]["enqueue_paused"])


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BLOCKMIRROR, *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "BLOCKMIRROR_ADMIN_TOKEN"} | (env or {}),
        check=False,
    )


# --- the token ----------------------------------------------------------------------------------


def test_no_token_is_refused_for_status_and_controls(unit: UnitProcess) -> None:
    code, headers, body = raw(unit, "GET", "/api/status")
    assert code == 401 and headers["www-authenticate"].startswith("Bearer"), (code, body)
    assert "volumes" not in body
    code, headers, body = raw(unit, "POST", PAUSE)
    assert code == 401 and headers["www-authenticate"].startswith("Bearer"), (code, body)
    assert paused(unit) is False
    page = raw_page(unit)
    assert page.startswith("HTTP/1.1 200") and 'id="signin"' in page and "vol.img" not in page


def raw_page(unit: UnitProcess) -> str:
    address, port = unit.admin.rsplit(":", 1)
    with socket.create_connection((address, int(port)), timeout=10) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {unit.admin}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


def test_a_wrong_token_is_refused(unit: UnitProcess) -> None:
    wrong = "0" * 43
    assert admin_request(unit, "GET", "/api/status", token=wrong)[0] == 401
    code, body = admin_request(unit, "POST", PAUSE, token=wrong)
    assert code == 401 and "wrong" in body["error"]
    assert paused(unit) is False
    # The right one works (and is put back).
    assert admin_request(unit, "POST", PAUSE)[0] == 200 and paused(unit) is True
    assert admin_request(unit, "POST", RESUME)[0] == 200 and paused(unit) is False


# --- what a web page in the operator's browser can send -----------------------------------------


def test_a_cross_origin_form_post_is_refused(unit: UnitProcess) -> None:
    form = ("Origin: http://evil.example", "Content-Type: application/x-www-form-urlencoded")
    code, _, body = raw(unit, "POST", PAUSE, *form, body=b"x=1")
    assert code == 403 and "cross-origin" in body["error"], (code, body)
    # Even a request that has the token is refused from a foreign origin.
    code, _, _ = raw(unit, "POST", PAUSE, *form, f"Authorization: Bearer {unit.admin_token}")
    assert code == 403
    assert paused(unit) is False


def test_a_text_plain_post_is_refused(unit: UnitProcess) -> None:
    code, _, body = raw(unit, "POST", PAUSE, "Content-Type: text/plain", body=b"pause")
    assert code == 401, (code, body)
    assert paused(unit) is False


def test_a_foreign_host_is_refused_even_with_the_token(unit: UnitProcess) -> None:
    port = unit.admin.rsplit(":", 1)[1]
    auth = f"Authorization: Bearer {unit.admin_token}"
    for host in (f"evil.example:{port}", "evil.example"):
        code, _, body = raw(unit, "GET", "/api/status", auth, host=host)
        assert code == 421 and "volumes" not in body, (host, code, body)
        code, _, _ = raw(unit, "POST", PAUSE, auth, host=host)
        assert code == 421
    assert paused(unit) is False
    assert raw(unit, "GET", "/api/status", auth, host=f"localhost:{port}")[0] == 200


def test_the_page_session_needs_its_csrf_token(unit: UnitProcess) -> None:
    origin = f"Origin: http://{unit.admin}"
    wrong = json.dumps({"token": "0" * 43}).encode()
    code, _, _ = raw(unit, "POST", "/api/session", origin, "Content-Type: application/json",
                     body=wrong)  # fmt: skip
    assert code == 401
    right = json.dumps({"token": unit.admin_token}).encode()
    code, headers, body = raw(unit, "POST", "/api/session", origin,
                              "Content-Type: application/json", body=right)  # fmt: skip
    assert code == 200, body
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session = "Cookie: " + cookie.split(";")[0]
    csrf = body["csrf_token"]

    # The cookie alone (what a cross-site request could at most carry) changes nothing.
    code, _, body = raw(unit, "POST", PAUSE, session, origin)
    assert code == 403 and "CSRF" in body["error"]
    code, _, _ = raw(unit, "POST", PAUSE, session, "Content-Type: text/plain", body=b"x")
    assert code == 403
    assert paused(unit) is False
    # The page sends the CSRF token: that works, from the page's own origin.
    code, _, body = raw(unit, "POST", PAUSE, session, origin, f"X-CSRF-Token: {csrf}")
    assert code == 200 and body["enqueue_paused"] is True
    assert paused(unit) is True
    code, _, _ = raw(unit, "POST", RESUME, session, origin, f"X-CSRF-Token: {csrf}")
    assert code == 200 and paused(unit) is False
    assert raw(unit, "GET", "/api/status", session)[0] == 200
    # Signed out, the cookie is worth nothing.
    assert raw(unit, "DELETE", "/api/session", session, origin, f"X-CSRF-Token: {csrf}")[0] == 200
    assert raw(unit, "GET", "/api/status", session)[0] == 401


# --- public status ------------------------------------------------------------------------------


def test_public_status_lets_status_through_but_not_controls(tmp_path: Path) -> None:
    u = start(tmp_path, admin_public_status=True)
    try:
        code, _, body = raw(u, "GET", "/api/status")
        assert code == 200 and body["volumes"][0]["name"] == "vol"
        out = cli("status", "--admin", u.admin)
        assert out.returncode == 0 and "vol" in out.stdout, out.stderr
        assert raw(u, "POST", PAUSE)[0] == 401
        out = cli("journal", "pause", "vol", "--admin", u.admin)
        assert out.returncode == 1 and "needs the admin token" in out.stderr, out.stderr
        assert paused(u) is False
    finally:
        u.kill()


# --- the token file -----------------------------------------------------------------------------


def test_the_generated_token_is_private_and_kept_across_restarts(tmp_path: Path) -> None:
    u = start(tmp_path)
    token_file = tmp_path / "state" / "admin.token"
    try:
        assert u.admin_token_file == token_file
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = u.admin_token
        assert len(token) >= 40 and token not in (tmp_path / "state" / "unit.json").read_text()
        assert u.terminate() == 0
        u = start_unit(u.config_path, tmp_path / "state")
        assert u.admin_token == token and fetch_status(u)["pid"] == u.pid
        # The CLI finds the token through --config.
        out = cli("status", "--config", str(u.config_path))
        assert out.returncode == 0 and "vol" in out.stdout, out.stderr
    finally:
        u.kill()


def test_a_configured_token_file_the_cli_and_rotation(tmp_path: Path) -> None:
    token_file = tmp_path / "secrets" / "admin.token"
    token_file.parent.mkdir()
    token_file.write_text("first-token-0123456789abcdef\n")
    token_file.chmod(0o600)
    u = start(tmp_path / "unit", admin_token_file=str(token_file))
    try:
        assert not (tmp_path / "unit" / "state" / "admin.token").exists()
        config = str(u.config_path)
        out = cli("journal", "pause", "vol", "--config", config)
        assert out.returncode == 0, out.stderr
        assert paused(u) is True
        # --admin alone has no token: a clear refusal, nothing changed.
        out = cli("journal", "resume", "vol", "--admin", u.admin)
        assert out.returncode == 1 and "needs the admin token" in out.stderr
        assert "--token-file" in out.stderr and paused(u) is True
        out = cli("status", "--admin", u.admin)
        assert out.returncode == 1 and "needs the admin token" in out.stderr
        out = cli("journal", "resume", "vol", "--admin", u.admin, "--token-file", str(token_file))
        assert out.returncode == 0 and paused(u) is False, out.stderr
        env = {"BLOCKMIRROR_ADMIN_TOKEN": "first-token-0123456789abcdef"}
        assert cli("status", "--admin", u.admin, env=env).returncode == 0
        out = cli("status", "--admin", u.admin, env={"BLOCKMIRROR_ADMIN_TOKEN": "x" * 30})
        assert out.returncode == 1 and "refused the admin token" in out.stderr

        # Rotation: replace the file, restart; the old token is dead, the new one works.
        old = u.admin_token
        assert u.terminate() == 0
        token_file.write_text("second-token-0123456789abcdef\n")
        u = start_unit(u.config_path, tmp_path / "unit" / "state")
        assert admin_request(u, "GET", "/api/status", token=old)[0] == 401
        assert cli("status", "--config", config).returncode == 0
    finally:
        u.kill()


def test_check_config_refuses_a_token_file_others_can_read(tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text("a-token-0123456789abcdef\n")
    token_file.chmod(0o644)
    config = unit_config(tmp_path, admin_token_file=str(token_file))
    out = cli("check-config", str(config))
    assert out.returncode == 2 and "unit.admin_token_file" in out.stderr, out
    assert "other users" in out.stderr
    # A unit with such a file does not start (rather than serve a leaked credential).
    proc = subprocess.run([*BLOCKMIRROR, "run", str(config)], capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip
    assert proc.returncode != 0 and "admin_token_file" in proc.stderr
    token_file.chmod(0o600)
    assert cli("check-config", str(config)).returncode == 0


# --- TLS ------------------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    require_commands("openssl")
    cert, key = directory / "admin.pem", directory / "admin.key"
    proc = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=admin",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    key.chmod(0o600)
    return cert, key


def test_tls_admin_api_with_the_cli(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    u = start(tmp_path / "unit", admin_tls_cert=str(cert), admin_tls_key=str(key))
    try:
        assert u.runtime["admin_scheme"] == "https"
        # Through --config: https, trusting the unit's own certificate.
        out = cli("status", "--config", str(u.config_path), "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["pid"] == u.pid
        token = ["--token-file", str(u.admin_token_file)]
        out = cli("journal", "pause", "vol", "--admin", u.admin, "--admin-ca", str(cert), *token)
        assert out.returncode == 0, out.stderr
        out = cli("journal", "resume", "vol", "--admin", u.admin, "--admin-ca", str(cert), *token)
        assert out.returncode == 0, out.stderr
        # A client that does not trust the certificate is refused by TLS, not served.
        out = cli("status", "--admin", f"https://{u.admin}", *token)
        assert out.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in out.stderr, out.stderr
        # Plain HTTP to the TLS port gets nothing.
        with pytest.raises((ConnectionError, OSError, AssertionError, ValueError, IndexError)):
            raw(u, "GET", "/api/status", f"Authorization: Bearer {u.admin_token}")
        # And over TLS the same rules hold: no token, no status.
        ctx = ssl.create_default_context(cafile=str(cert))
        address, port = u.admin.rsplit(":", 1)
        with (
            socket.create_connection((address, int(port)), timeout=10) as plain,
            ctx.wrap_socket(plain, server_hostname=address) as sock,
        ):
            sock.sendall(f"GET /api/status HTTP/1.1\r\nHost: {u.admin}\r\n\r\n".encode())
            assert sock.recv(100).startswith(b"HTTP/1.1 401")
        assert u.proc.poll() is None
    finally:
        u.kill()
