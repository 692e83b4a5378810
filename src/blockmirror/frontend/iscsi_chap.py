"""CHAP authentication of an iSCSI login, target side (RFC 1994; RFC 7143 section 12.1.3).

After AuthMethod=CHAP the initiator offers algorithms (CHAP_A); we pick MD5 (5, the only one
RFC 7143 requires) and send an identifier (CHAP_I) and a random challenge of 16 bytes (CHAP_C).
The initiator answers with its name (CHAP_N) and MD5(identifier || secret || challenge)
(CHAP_R). For mutual CHAP it adds its own CHAP_I and CHAP_C, which we answer, only once it
has proved itself, with our name and the response computed from the mutual secret. A
challenge equal to ours is refused: it would let an initiator reflect our challenge and have
us compute the answer it needs.

Secrets come in as bytes; where they are kept is the caller's business. Randomness is injected
(``random_bytes``) so that tests can pin a challenge. Every failure is :class:`ChapFailure`,
which the login answers with status 0x0201 (authentication failure).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from blockmirror.errors import ProtocolError
from blockmirror.frontend.iscsi_text import (
    Pairs,
    format_binary,
    parse_binary,
    parse_list,
    parse_number,
)

CHAP_MD5 = 5
# 128 random bits: a challenge must never repeat, or a recorded answer could be replayed.
CHALLENGE_LENGTH = 16
MAX_CHALLENGE = 1024  # the largest initiator challenge we answer
CHAP_KEYS = frozenset({"CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"})
MAX_NAME = 255


class ChapFailure(ProtocolError):
    """The CHAP exchange failed: the login ends with "authentication failure"."""


@dataclass(frozen=True, slots=True)
class ChapSecrets:
    """The credentials of a target: the name and secret initiators must prove, and for
    mutual CHAP the name and secret we prove ourselves with."""

    user: str
    secret: bytes
    mutual_user: str | None = None
    mutual_secret: bytes | None = None

    def __post_init__(self) -> None:
        if not self.user or not self.secret:
            raise ValueError("CHAP needs a user name and a secret")
        if (self.mutual_user is None) != (self.mutual_secret is None):
            raise ValueError("mutual CHAP needs both a user name and a secret")
        if self.mutual_secret is not None and (
            not self.mutual_secret or hmac.compare_digest(self.mutual_secret, self.secret)
        ):
            # Section 12.1.3: a secret is never used for both directions, or a target's
            # answers would authenticate anyone who can replay them.
            raise ValueError("the mutual CHAP secret must differ from the initiator's secret")

    @property
    def mutual(self) -> bool:
        return self.mutual_secret is not None


def chap_response(identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """MD5 of the identifier octet, the secret and the challenge (RFC 1994 section 4.1)."""
    # MD5 is what CHAP is defined with; usedforsecurity=False keeps it available where a
    # FIPS policy blocks MD5 for new designs.
    md5 = hashlib.md5(usedforsecurity=False)
    md5.update(bytes([identifier]) + secret + challenge)
    return md5.digest()


class ChapExchange:
    """One CHAP exchange: :meth:`step` takes the CHAP keys of each login text and returns the
    answers; :attr:`done` once the initiator proved itself (and we answered a mutual
    challenge). :attr:`user` is the CHAP_N it proved."""

    def __init__(
        self, secrets_: ChapSecrets, *, random_bytes: Callable[[int], bytes] = secrets.token_bytes
    ) -> None:
        self._secrets = secrets_
        self._random = random_bytes
        self._identifier = -1
        self._challenge = b""
        self.done = False
        self.user: str | None = None

    @property
    def started(self) -> bool:
        return self._identifier >= 0

    def step(self, keys: Mapping[str, str]) -> Pairs:
        if not keys:
            return []
        if self.done:
            raise ChapFailure("CHAP keys after the exchange ended")
        if not self.started:
            return self._choose_algorithm(keys)
        return self._check_response(keys)

    def _choose_algorithm(self, keys: Mapping[str, str]) -> Pairs:
        if set(keys) != {"CHAP_A"}:
            raise ChapFailure(f"expected CHAP_A, got {', '.join(sorted(keys))}")
        if str(CHAP_MD5) not in parse_list(keys["CHAP_A"]):
            raise ChapFailure(f"no CHAP algorithm we support in {keys['CHAP_A']!r}")
        self._identifier = self._random(1)[0]
        self._challenge = self._random(CHALLENGE_LENGTH)
        return [
            ("CHAP_A", str(CHAP_MD5)),
            ("CHAP_I", str(self._identifier)),
            ("CHAP_C", format_binary(self._challenge)),
        ]

    def _check_response(self, keys: Mapping[str, str]) -> Pairs:
        allowed = {"CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"}
        if not {"CHAP_N", "CHAP_R"} <= set(keys) <= allowed:
            raise ChapFailure(f"expected CHAP_N and CHAP_R, got {', '.join(sorted(keys))}")
        name, response = keys["CHAP_N"], parse_binary(keys["CHAP_R"])
        expected = chap_response(self._identifier, self._secrets.secret, self._challenge)
        # Both comparisons run whatever the name, so that timing tells nothing about which
        # part was wrong.
        name_ok = hmac.compare_digest(name.encode(), self._secrets.user.encode())
        response_ok = response is not None and hmac.compare_digest(response, expected)
        if not (name_ok and response_ok):
            raise ChapFailure(f"CHAP response of {name[:MAX_NAME]!r} does not verify")
        self.user = name
        mutual = "CHAP_I" in keys or "CHAP_C" in keys
        if not mutual:
            self.done = True
            return []
        return self._answer_mutual(keys)

    def _answer_mutual(self, keys: Mapping[str, str]) -> Pairs:
        if "CHAP_I" not in keys or "CHAP_C" not in keys:
            raise ChapFailure("mutual CHAP needs both CHAP_I and CHAP_C")
        if self._secrets.mutual_secret is None or self._secrets.mutual_user is None:
            raise ChapFailure("the initiator asks mutual CHAP and we have no mutual secret")
        identifier = parse_number(keys["CHAP_I"])
        challenge = parse_binary(keys["CHAP_C"])
        if identifier is None or not 0 <= identifier <= 255:
            raise ChapFailure(f"bad CHAP_I {keys['CHAP_I'][:16]!r}")
        if challenge is None or not 0 < len(challenge) <= MAX_CHALLENGE:
            raise ChapFailure("bad mutual CHAP_C")
        if challenge == self._challenge:
            raise ChapFailure("the initiator reflected our own challenge")
        self.done = True
        answer = chap_response(identifier, self._secrets.mutual_secret, challenge)
        return [("CHAP_N", self._secrets.mutual_user), ("CHAP_R", format_binary(answer))]
