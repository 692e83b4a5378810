"""A client of a unit's admin API, for the command line: the token, TLS, and JSON calls.

The unit side is :mod:`blockmirror.admin.api`; this side never imports the daemon, so the CLI
talks to a running unit only over HTTP(S) with the admin token.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockmirror.admin.access import AdminTokenError, client_tls_context, load_token
from blockmirror.admin.setup import unit_token_path
from blockmirror.config import Config, parse_address
from blockmirror.errors import AdminError, BlockmirrorError, ConfigError

# The admin token itself, for scripts that keep it elsewhere than in a file.
TOKEN_ENV = "BLOCKMIRROR_ADMIN_TOKEN"


@dataclass(frozen=True)
class AdminToken:
    """The admin token the CLI sends: the token and where it came from, or why there is none."""

    token: str | None = None
    source: str | None = None
    problem: str | None = None


class AdminClient:
    """How the CLI talks to one unit's admin API: its address, the admin token, and TLS."""

    def __init__(
        self,
        address: str,
        token: AdminToken | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        credential = token or AdminToken()
        self.token = credential.token
        self.token_source = credential.source
        # Why no token could be read: shown if the unit then asks for one.
        self.token_problem = credential.problem
        self.tls = tls

    def url(self, path: str) -> str:
        parsed = parse_address(self.address, "--admin")
        # A unit listening on every interface is reached on loopback.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(parsed.host, parsed.host)
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{parsed.port}{path}"

    def open(self, method: str, path: str, timeout: float) -> dict[str, Any]:
        """The JSON object the API answers; HTTPError, URLError or OSError otherwise."""
        url = self.url(path)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        request = urllib.request.Request(
            url, data=b"" if method == "POST" else None, method=method, headers=headers
        )
        # No proxies: the token is for the unit, not for whatever http_proxy names.
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self.tls)
        )
        with opener.open(request, timeout=timeout) as response:
            data = json.loads(response.read())
        if not isinstance(data, dict):
            raise BlockmirrorError(f"{url} did not return a JSON object")
        return data

    def refusal(self, exc: urllib.error.HTTPError) -> str:
        """What to tell the operator when the API answered with an error status."""
        try:
            doc = json.loads(exc.read())
            message = str(doc["error"])
            # A refused reload names each problem: one line per key.
            for problem in doc.get("problems") or []:
                message += f"\n  {problem.get('key')}: {problem.get('message')}"
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            message = exc.reason if isinstance(exc.reason, str) else str(exc)
        if exc.code != 401:
            return f"the unit refused ({exc.code}): {message}"
        if self.token is None:
            how = (
                self.token_problem
                or "no admin token was given: use --config CONFIG.toml (reads the unit's token "
                "file), --token-file PATH, or set BLOCKMIRROR_ADMIN_TOKEN"
            )
            return f"the unit's admin API needs the admin token (401: {message}); {how}"
        return (
            f"the unit refused the admin token from {self.token_source} (401: {message}); "
            "if the token was rotated, use the unit's current admin_token_file"
        )


def token_for(token_file: str | None, config: Config | None) -> AdminToken:
    """The admin token from --token-file, the environment, or the configuration's token
    file, in that order."""
    if token_file:
        try:
            token = load_token(Path(token_file), check_mode=False)
        except AdminTokenError as exc:
            raise ConfigError([("--token-file", str(exc))]) from None
        return AdminToken(token, f"--token-file {token_file}")
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return AdminToken(env, f"${TOKEN_ENV}")
    if config is not None:
        path = unit_token_path(config.unit)
        try:
            return AdminToken(load_token(path, check_mode=False), str(path))
        except AdminTokenError as exc:
            # Not fatal here: a unit with admin_public_status answers status without it.
            problem = (
                f"{exc} (run as a user who can read it, or pass --token-file; "
                "the unit writes STATE_DIR/admin.token at its first start)"
            )
            return AdminToken(problem=problem)
    return AdminToken()


def tls_for(ca: str | None, config: Config | None, https: bool) -> ssl.SSLContext | None:
    """The TLS context to reach the unit with: --admin-ca, the configured CA or certificate,
    or the system's CAs for an https:// address; None for plain HTTP."""
    if ca:
        return client_tls_context([Path(ca)])
    if config is not None and config.unit.admin_tls_cert is not None:
        # The configured CA, or else the unit's own certificate (self-signed) is what to trust.
        return client_tls_context([config.unit.admin_tls_ca or config.unit.admin_tls_cert])
    return client_tls_context() if https else None


def fetch_status(client: AdminClient, timeout: float = 5.0) -> dict[str, Any]:
    return client.open("GET", "/api/status", timeout)


class ControlFailed(AdminError):
    """The admin API refused a control, or could not be reached."""


def call_control(
    client: AdminClient,
    path: str,
    params: dict[str, str | int] | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """POST one control (``path`` already percent-encoded); its JSON answer, or ControlFailed."""
    if params:
        path += "?" + urllib.parse.urlencode(params)
    try:
        return client.open("POST", path, timeout)
    except urllib.error.HTTPError as exc:
        raise ControlFailed(client.refusal(exc)) from None
    except (OSError, urllib.error.URLError) as exc:
        raise ControlFailed(
            f"cannot reach the unit's admin API at {client.address}: {exc}"
        ) from None
    except ValueError as exc:
        raise ControlFailed(f"{client.url(path)} did not answer JSON: {exc}") from None
