"""The order of a link's frames, for both ends at once (docs/link-protocol.md, "Handshake").

A link walks the steps of :class:`~blockmirror.state.HandshakeStep` through
:func:`~blockmirror.state.transition`: HELLO (the source's HELLO and the secondary's answer),
AUTH (the source's AUTH_CLIENT proof, only with a pre-shared key), WELCOME, STREAM, and CLOSED
from anywhere. The frames that cross a step move the link on: an AUTH_SERVER enters AUTH, a
WELCOME enters WELCOME, a REFUSE closes it, whichever end sends or receives them; each end
enters STREAM itself once it has checked the WELCOME. The REGIONS frames a WELCOME announces
(protocol version 2) reach the source at its STREAM step, before any ACK.

:data:`ACCEPTS` says, for each end and step, which frames it may receive and how it answers
anything else: the secondary with a REFUSE (and the code it always used), the source by
dropping the link. Both ends' handshake code reads frames through :class:`HandshakeOrder`, so
the order is written down once, here and in ``state.TRANSITIONS``.

Sans-I/O: nothing here reads or writes; :mod:`blockmirror.link.session` does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from blockmirror.errors import ProtocolError
from blockmirror.link.protocol import (
    Ack,
    AuthClient,
    AuthServer,
    DigestRequest,
    Digests,
    Heartbeat,
    Hello,
    Message,
    PeerConfig,
    Records,
    Refuse,
    Regions,
    SyncData,
    SyncDone,
    SyncStart,
    SyncZero,
    Welcome,
)
from blockmirror.state import HandshakeStep, transition

__all__ = ["ACCEPTS", "Accepts", "End", "HandshakeOrder", "OutOfOrder"]


class End(enum.StrEnum):
    """Which end of a link a session is."""

    SOURCE = "source"  # the TCP client: sends HELLO, records and resync frames
    SECONDARY = "secondary"  # the listener: answers, acknowledges

    @property
    def peer(self) -> str:
        """The other end, as messages name it."""
        return "secondary" if self is End.SOURCE else "source"


class OutOfOrder(ProtocolError):
    """A frame the link's step does not allow. ``code`` is the REFUSE code this end answers
    with (None: it closes without one); ``reason`` is the refusal's message."""

    def __init__(self, code: str | None, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Accepts:
    """What one end may receive at one step."""

    frames: frozenset[type[Message]]
    # A REFUSE from the peer ends the link as the peer's refusal (LinkRefused); when False, a
    # REFUSE is just another frame out of place.
    refusal_ends: bool
    # How anything else is answered: the REFUSE code (None: a ProtocolError, no REFUSE) and the
    # message, given the frame's class name.
    code: str | None
    reason: str

    def misfit(self, message: Message) -> OutOfOrder:
        return OutOfOrder(self.code, self.reason.format(name=type(message).__name__))


_STREAM_IN: Final = frozenset(
    {Records, SyncStart, SyncData, SyncZero, SyncDone, Heartbeat, DigestRequest, PeerConfig}
)

ACCEPTS: Final[dict[End, dict[HandshakeStep, Accepts]]] = {
    End.SECONDARY: {
        HandshakeStep.HELLO: Accepts(
            frozenset({Hello}), False, "bad-frame", "expected HELLO, got {name}"
        ),
        HandshakeStep.AUTH: Accepts(frozenset({AuthClient}), False, "auth", "expected AUTH_CLIENT"),
        HandshakeStep.STREAM: Accepts(_STREAM_IN, True, "bad-frame", "unexpected {name}"),
    },
    End.SOURCE: {
        HandshakeStep.HELLO: Accepts(
            frozenset({AuthServer, Welcome}), True, None, "expected WELCOME, got {name}"
        ),
        HandshakeStep.AUTH: Accepts(
            frozenset({Welcome}), True, None, "expected WELCOME, got {name}"
        ),
        # REGIONS come only right after a WELCOME that announces them (diverged_frames), once
        # the source streams; the sender counts them. The secondary never takes one: its
        # STREAM step answers it bad-frame like any other frame out of place.
        HandshakeStep.STREAM: Accepts(
            frozenset({Ack, Heartbeat, Regions, Digests, PeerConfig}),
            True,
            None,
            "unexpected {name} from secondary",
        ),
    },
}
"""Per end and step, the frames it may receive (a step missing here receives nothing: the end
is sending at that step)."""

# The step a handshake frame moves the link to, on either end, sent or received.
_ENTERS: Final[dict[type[Message], HandshakeStep]] = {
    AuthServer: HandshakeStep.AUTH,
    Welcome: HandshakeStep.WELCOME,
    Refuse: HandshakeStep.CLOSED,
}


class HandshakeOrder:
    """Where one end of a link stands, moved by the frames that cross it."""

    __slots__ = ("end", "step", "what")

    def __init__(self, end: End, what: str = "link") -> None:
        self.end = end
        self.step = HandshakeStep.HELLO
        self.what = what  # for a StateTransitionError's message

    @property
    def streaming(self) -> bool:
        return self.step is HandshakeStep.STREAM

    @property
    def closed(self) -> bool:
        return self.step is HandshakeStep.CLOSED

    def enter(self, step: HandshakeStep) -> None:
        """Move to ``step``; :class:`~blockmirror.state.StateTransitionError` if the table does
        not allow it (a bug of ours, never of the peer: received frames are checked first)."""
        self.step = transition(self.step, step, what=self.what)

    def close(self) -> None:
        if self.step is not HandshakeStep.CLOSED:
            self.enter(HandshakeStep.CLOSED)

    def sent(self, message: Message) -> None:
        """Account for a frame this end sends."""
        step = _ENTERS.get(type(message))
        if step is HandshakeStep.CLOSED:
            self.close()
        elif step is not None:
            self.enter(step)

    def received(self, message: Message) -> Refuse | None:
        """Check a frame this end received against the step, and move on.

        Returns the peer's REFUSE when it ends the link (the caller raises it as a refusal);
        raises :class:`OutOfOrder` for a frame the step does not take.
        """
        accepts = ACCEPTS[self.end].get(self.step)
        if accepts is None:
            raise OutOfOrder(None, f"no frame expected from the {self.end.peer} at {self.step}")
        if isinstance(message, Refuse) and accepts.refusal_ends:
            self.close()
            return message
        if type(message) not in accepts.frames:
            raise accepts.misfit(message)
        step = _ENTERS.get(type(message))
        if step is not None:
            self.enter(step)
        return None
