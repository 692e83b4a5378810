"""The ``[iscsi]`` table: the unit's iSCSI portal, its target names and CHAP (docs/iscsi.md).

A volume with ``iscsi = true`` is the target ``BASE_IQN:VOLUME``, LUN 0. CHAP secrets are named
by file, never written inline, and read with the same rules as every other secret
(:func:`blockmirror.config_alerts.read_secret`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from blockmirror.addresses import Address, parse_address
from blockmirror.config_alerts import read_secret
from blockmirror.config_table import Problem, Table, type_name
from blockmirror.errors import NotifyError

__all__ = ["DEFAULT_LISTEN", "IscsiConfig", "parse_iscsi", "target_name", "valid_iqn"]

DEFAULT_LISTEN = "0.0.0.0:3260"
_KEYS = (
    "listen", "base_iqn", "chap_user", "chap_secret_file", "mutual_user", "mutual_secret_file",
)  # fmt: skip
# RFC 3720 section 3.2.6.3.1: "iqn." date "." reversed domain name, then optionally ":" and
# anything; lower case (names are compared after stringprep, which folds case); 223 bytes at
# most. Volume names (A-Z a-z 0-9 . _ -) are lowered into it.
_IQN = re.compile(
    r"iqn\.[0-9]{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[a-z0-9.:_-]+)?"
)
MAX_IQN = 223
# RFC 7143 section 12.1.3: CHAP secrets of at least 96 bits; Windows asks 12 to 16 bytes.
MIN_CHAP_SECRET = 12


@dataclass(frozen=True)
class IscsiConfig:
    listen: Address
    base_iqn: str
    chap_user: str | None = None
    chap_secret_file: Path | None = None
    mutual_user: str | None = None
    mutual_secret_file: Path | None = None

    @property
    def chap(self) -> bool:
        return self.chap_user is not None


def valid_iqn(name: str) -> bool:
    return len(name.encode()) <= MAX_IQN and _IQN.fullmatch(name) is not None


def target_name(base_iqn: str, volume: str) -> str:
    """The target a volume is: ``BASE_IQN:volume`` (lower case, as IQNs compare)."""
    return f"{base_iqn}:{volume.lower()}"


def parse_iscsi(
    data: object, problems: list[Problem], base_dir: Path, *, check_paths: bool = True
) -> IscsiConfig | None:
    """The ``[iscsi]`` table, or None when there is none; every problem collected."""
    if data is None:
        return None
    if not isinstance(data, Mapping):
        problems.append(("iscsi", f"expected an [iscsi] table, got {type_name(data)}"))
        return None
    t = Table(data, "iscsi", _KEYS, problems, base_dir)
    listen = t.address("listen", allow_zero=True)
    base = t.text("base_iqn", required=True)
    if base is not None and not valid_iqn(base):
        t.fail(
            "base_iqn",
            f"{base!r} is not a valid IQN: iqn.YYYY-MM.reversed.domain[:name], lower case, "
            f"at most {MAX_IQN} bytes (e.g. 'iqn.2026-12.org.example:site-a')",
        )
    user = t.text("chap_user")
    secret = t.path("chap_secret_file")
    mutual_user = t.text("mutual_user")
    mutual_secret = t.path("mutual_secret_file")
    read: dict[str, str] = {}
    for name, who, path in (
        ("chap", user, secret),
        ("mutual", mutual_user, mutual_secret),
    ):
        key_user = "chap_user" if name == "chap" else "mutual_user"
        key_file = "chap_secret_file" if name == "chap" else "mutual_secret_file"
        if (who is None) != (path is None):
            t.fail(
                key_user if who is None else key_file, f"give {key_user} and {key_file} together"
            )
        elif path is not None and check_paths:
            try:
                read[name] = read_secret(
                    path, f"iSCSI {name} CHAP secret", min_chars=MIN_CHAP_SECRET
                )
            except NotifyError as exc:
                t.fail(key_file, str(exc))
    if "chap" in read and read.get("mutual") == read["chap"]:
        # RFC 7143 12.1.3: the two directions must not share a secret (a reflection of our
        # own challenge would then pass).
        t.fail("mutual_secret_file", "the mutual secret must differ from the CHAP secret")
    if mutual_user is not None and user is None:
        t.fail("mutual_user", "mutual CHAP needs chap_user too: the initiator proves itself first")
    return IscsiConfig(
        listen=listen or parse_address(DEFAULT_LISTEN),
        base_iqn=base or "",
        chap_user=user,
        chap_secret_file=secret,
        mutual_user=mutual_user,
        mutual_secret_file=mutual_secret,
    )
