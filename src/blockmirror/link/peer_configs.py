"""The configuration exchange over links: each end hands the other its configuration.

A unit keeps a copy of the configuration of every unit it links with, so that a unit whose file
is lost can get it back from a peer (``blockmirror config fetch``). The exchange rides on links
that already authenticated: once a link streams, each end that the other said takes them
(``configs`` in HELLO and WELCOME) sends a PEER_CONFIG, and again after each reload. What to send
and where to keep what arrives is the unit's business (:class:`ConfigShare`); this module says
when, and checks that a peer sends only its own configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from blockmirror.link.protocol import MAX_CONFIG_TEXT, PeerConfig
from blockmirror.link.session import LinkSession

__all__ = ["ConfigShare", "offer", "take"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConfigShare:
    """``own()``: this unit's configuration now (None: none to give, e.g. not started from a
    file). ``keep(message, where)``: a peer's, already checked to be its own; it must not block
    (the unit writes it in a thread)."""

    own: Callable[[], PeerConfig | None]
    keep: Callable[[PeerConfig, str], None]


def offer(share: ConfigShare | None, link: LinkSession, *, accepted: bool, what: str) -> int:
    """Send our configuration on ``link`` if the peer takes it; the version sent (0: none)."""
    if share is None or not accepted:
        return 0
    message = share.own()
    if message is None:
        return 0
    if len(message.text) > MAX_CONFIG_TEXT:
        log.warning(
            "%s: the configuration (%d characters) is over the %d a PEER_CONFIG carries; "
            "the peer keeps no copy of it",
            what,
            len(message.text),
            MAX_CONFIG_TEXT,
        )
        return 0
    link.send(message)
    return message.config_version


def take(share: ConfigShare | None, message: PeerConfig, *, peer_unit: str, where: str) -> None:
    """A PEER_CONFIG arrived from the unit that authenticated as ``peer_unit``. Raises
    ValueError if it names another unit (a peer may only hand over its own)."""
    if message.unit != peer_unit:
        raise ValueError(
            f"a PEER_CONFIG for unit {message.unit!r} from unit {peer_unit!r}: a unit may send "
            "only its own configuration"
        )
    if share is not None:
        share.keep(message, where)
