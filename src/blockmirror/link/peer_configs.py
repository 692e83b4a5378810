"""The configuration exchange over links: each end hands the other its configuration.

A unit keeps a copy of the configuration of every unit it links with, so that a unit whose file
is lost can get it back from a peer (``blockmirror config fetch``). The exchange rides on links
that already authenticated: once a link streams, each end that the other said takes them
(``configs`` in HELLO and WELCOME) sends a PEER_CONFIG, and again after each reload. What to send
and where to keep what arrives is the unit's business (:class:`ConfigShare`); this module says
when, and checks that a peer sends only its own configuration.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from blockmirror.link.protocol import PeerConfig, encode
from blockmirror.link.receiver_auth import certificate_names
from blockmirror.link.session import LinkSession

__all__ = ["ConfigShare", "credential_of", "offer", "take"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConfigShare:
    """``own()``: this unit's configuration now (None: none to give, e.g. not started from a
    file). ``keep(message, where, credential)``: a peer's, checked to carry the unit name its
    link gave; ``credential`` names what authenticated the link (:func:`credential_of`), to
    which the kept copy is bound. It must not block (the unit writes it in a thread)."""

    own: Callable[[], PeerConfig | None]
    keep: Callable[[PeerConfig, str, str], None]


def credential_of(psk: bytes | None, peercert: Mapping[str, Any] | None) -> str:
    """What authenticated a link, as a kept copy records it: a key (by a digest that says
    nothing of it), a certificate's names, or nothing. Unit names in HELLO and WELCOME are
    only what a peer says; a copy received over one credential is never replaced over another
    (config_store.keep_peer_copy)."""
    if psk is not None:
        return "psk:" + hashlib.sha256(b"blockmirror peer config " + psk).hexdigest()[:32]
    if peercert:
        return "tls:" + ",".join(sorted(certificate_names(peercert)))
    return "none"


def offer(share: ConfigShare | None, link: LinkSession, *, accepted: bool, what: str) -> int:
    """Send our configuration on ``link`` if the peer takes it; the version sent (0: none)."""
    if share is None or not accepted:
        return 0
    message = share.own()
    if message is None:
        return 0
    try:
        frame = encode(message)  # the same checks the peer's decoder makes
    except ValueError as exc:
        log.warning(
            "%s: the configuration (%d characters) does not fit a PEER_CONFIG (%s); the peer "
            "keeps no copy of it",
            what,
            len(message.text),
            exc,
        )
        return 0
    link.order.sent(message)
    link.send_buffers(frame)
    return message.config_version


def take(
    share: ConfigShare | None,
    message: PeerConfig,
    *,
    peer_unit: str,
    where: str,
    credential: str,
) -> None:
    """A PEER_CONFIG arrived on a link whose peer said it is ``peer_unit``. Raises ValueError
    if it names another unit (a peer may only hand over its own)."""
    if message.unit != peer_unit:
        raise ValueError(
            f"a PEER_CONFIG for unit {message.unit!r} from unit {peer_unit!r}: a unit may send "
            "only its own configuration"
        )
    if share is not None:
        share.keep(message, where, credential)
