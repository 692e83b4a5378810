"""The admin API's access rules and TLS, from the ``[unit]`` configuration."""

from __future__ import annotations

import ssl
from pathlib import Path

from blockmirror.admin.access import (
    AdminAccess,
    ensure_token,
    load_token,
    server_tls_context,
    token_path,
)
from blockmirror.config import UnitConfig


def unit_token_path(unit: UnitConfig) -> Path:
    """Where the unit's admin token is: ``admin_token_file`` or ``STATE_DIR/admin.token``."""
    return token_path(unit.admin_token_file, unit.state_dir)


def admin_access(unit: UnitConfig) -> tuple[AdminAccess, ssl.SSLContext | None]:
    """The rules for the unit's admin API, and its TLS context (None without TLS).

    The token file an operator configured must exist; the default one is created with a random
    token at the first start. Raises AdminTokenError, or OSError/SSLError for the TLS files.
    """
    path = unit_token_path(unit)
    token = load_token(path) if unit.admin_token_file is not None else ensure_token(path)
    tls = None
    if unit.admin_tls_cert is not None and unit.admin_tls_key is not None:
        tls = server_tls_context(unit.admin_tls_cert, unit.admin_tls_key)
    access = AdminAccess(
        token=token,
        public_status=unit.admin_public_status,
        hosts=unit.admin_hosts,
        bind_host=unit.admin.host if unit.admin is not None else None,
        tls=tls is not None,
    )
    return access, tls
