"""Every state a volume, a link and a journal consumer can be in, and the one table of moves.

Each kind of state is an enum; :data:`TRANSITIONS` lists, for each state, the states it may
move to. Every change of state in blockmirror goes through :func:`transition`, which refuses
any move the table does not list, so a new feature (a role change, a second kind of consumer)
has to say here which moves it adds, and the table's own tests (every allowed move, and every
other move refused) keep it honest. Nothing here does I/O or imports another module of ours.

The enums are string enums: their values are what ``GET /api/status`` shows and what a
checkpoint stores, so these names are part of the user contract.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final, TypeVar

from blockmirror.errors import BlockmirrorError

__all__ = [
    "TRANSITIONS",
    "ArchiveState",
    "Consistency",
    "ConsumerMode",
    "HandshakeStep",
    "LinkPhase",
    "Role",
    "StateTransitionError",
    "VolumeState",
    "allowed",
    "transition",
]


class StateTransitionError(BlockmirrorError):
    """A change of state the transition table does not allow; nothing was changed."""


class Role(enum.StrEnum):
    """Which way a volume's data flows, kept in ``state_dir`` (the config's ``role`` is only
    where a new volume starts)."""

    PRIMARY = "primary"  # takes host writes, sends to every peer
    SECONDARY = "secondary"  # a replica of one source, relays to its other peers
    # A former primary that refuses host writes and waits to follow a new primary (failover).
    DEMOTED = "demoted"


class VolumeState(enum.StrEnum):
    """What a volume is doing, as ``volumes[].state`` shows it."""

    OPENING = "opening"
    SERVING = "serving"  # a primary taking host writes
    REPLICA = "replica"  # a secondary taking its source's records
    # A volume write failed with ENOSPC or EIO: host writes are refused, records retried.
    STALLED = "stalled"
    FAILED = "failed"  # cannot be used until the unit restarts (the reason is shown)
    STOPPED = "stopped"


class ConsumerMode(enum.StrEnum):
    """How a journal consumer (a peer) learns of changes."""

    JOURNAL = "journal"  # from the records after its cursor
    TRACKING = "tracking"  # from its dirty map: the records it lacks were given up


class LinkPhase(enum.StrEnum):
    """Where a link to a peer stands, on the sending side."""

    CONNECTING = "connecting"  # connecting, handshaking, or waiting to retry
    SYNCING = "syncing"  # copying dirty regions (a resync)
    REPLICATING = "replicating"  # streaming journal records
    # The peer is where this volume comes from (our source, or a newer primary): nothing goes
    # to it until the roles change.
    UPSTREAM = "upstream"
    SPLIT_BRAIN = "split-brain"  # both moved on from a common point; nothing is copied
    STOPPED = "stopped"


class ArchiveState(enum.StrEnum):
    """Where the archive consumer of one volume stands (docs/archive.md)."""

    STARTING = "starting"  # claiming the chain, listing what the archive holds
    ARCHIVING = "archiving"  # uploading segments (and bases) as they come due
    # Uploads fail (the store is unreachable, refuses writes, or is full): the journal holds
    # the records, and the reason says which.
    STALLED = "stalled"
    REFUSED = "refused"  # another writer holds this chain; nothing is uploaded
    STOPPED = "stopped"


class HandshakeStep(enum.StrEnum):
    """The order of a link's opening frames (docs/link-protocol.md, "Handshake"): both ends
    walk the same steps, the source sending and the secondary answering."""

    HELLO = "hello"  # the source's HELLO, answered by AUTH_SERVER (or a WELCOME)
    AUTH = "auth"  # the source's AUTH_CLIENT proof
    WELCOME = "welcome"  # the secondary's WELCOME: where it stands
    STREAM = "stream"  # records, resync frames, acknowledgements and heartbeats
    CLOSED = "closed"  # refused, failed or ended; nothing more is read


class Consistency(enum.StrEnum):
    """Whether a replica provably equals a prefix of its source's writes."""

    CONSISTENT = "consistent"
    # A resync is copying regions (or one is owed): the replica mixes old and new data.
    INCONSISTENT = "inconsistent"


_S = TypeVar(
    "_S", Role, VolumeState, ConsumerMode, LinkPhase, ArchiveState, HandshakeStep, Consistency
)


def _table(moves: Mapping[_S, tuple[_S, ...]]) -> dict[_S, frozenset[_S]]:
    return {state: frozenset(targets) for state, targets in moves.items()}


# Keyed by the enum class; each row maps a state to the states it may move to.
TRANSITIONS: Final[Mapping[type[enum.Enum], Mapping[Any, frozenset[Any]]]] = {
    Role: _table(
        {
            Role.PRIMARY: (Role.DEMOTED,),
            Role.SECONDARY: (Role.PRIMARY,),  # promote
            Role.DEMOTED: (Role.SECONDARY, Role.PRIMARY),  # follow the new primary, or undo
        }
    ),
    VolumeState: _table(
        {
            VolumeState.OPENING: (
                VolumeState.SERVING,
                VolumeState.REPLICA,
                VolumeState.FAILED,
                VolumeState.STOPPED,
            ),
            VolumeState.SERVING: (
                VolumeState.STALLED,
                VolumeState.FAILED,
                VolumeState.STOPPED,
                VolumeState.REPLICA,  # demoted, following a new primary
            ),
            VolumeState.REPLICA: (
                VolumeState.STALLED,
                VolumeState.FAILED,
                VolumeState.STOPPED,
                VolumeState.SERVING,  # promoted
            ),
            VolumeState.STALLED: (
                VolumeState.SERVING,
                VolumeState.REPLICA,
                VolumeState.FAILED,
                VolumeState.STOPPED,
            ),
            VolumeState.FAILED: (VolumeState.STOPPED,),
            VolumeState.STOPPED: (),
        }
    ),
    ConsumerMode: _table(
        {
            # Overflow, a discard, a lost ring, a renumbering: the records become dirty bits.
            ConsumerMode.JOURNAL: (ConsumerMode.TRACKING,),
            # A resync starts streaming again; more regions may become dirty meanwhile.
            ConsumerMode.TRACKING: (ConsumerMode.JOURNAL, ConsumerMode.TRACKING),
        }
    ),
    LinkPhase: _table(
        {
            LinkPhase.CONNECTING: (
                LinkPhase.SYNCING,
                LinkPhase.REPLICATING,
                LinkPhase.CONNECTING,  # the next attempt
                LinkPhase.UPSTREAM,  # the peer sends to us, or superseded us
                LinkPhase.SPLIT_BRAIN,
                LinkPhase.STOPPED,
            ),
            LinkPhase.UPSTREAM: (LinkPhase.CONNECTING, LinkPhase.STOPPED),
            LinkPhase.SPLIT_BRAIN: (LinkPhase.CONNECTING, LinkPhase.STOPPED),
            LinkPhase.SYNCING: (LinkPhase.REPLICATING, LinkPhase.CONNECTING, LinkPhase.STOPPED),
            LinkPhase.REPLICATING: (LinkPhase.SYNCING, LinkPhase.CONNECTING, LinkPhase.STOPPED),
            LinkPhase.STOPPED: (),
        }
    ),
    ArchiveState: _table(
        {
            ArchiveState.STARTING: (
                ArchiveState.ARCHIVING,
                ArchiveState.STALLED,
                ArchiveState.REFUSED,
                ArchiveState.STOPPED,
            ),
            ArchiveState.ARCHIVING: (
                ArchiveState.STALLED,
                ArchiveState.STARTING,  # a new generation, or the session starts over
                ArchiveState.REFUSED,
                ArchiveState.STOPPED,
            ),
            ArchiveState.STALLED: (
                ArchiveState.ARCHIVING,
                ArchiveState.STARTING,
                ArchiveState.REFUSED,
                ArchiveState.STOPPED,
            ),
            ArchiveState.REFUSED: (ArchiveState.STARTING, ArchiveState.STOPPED),
            ArchiveState.STOPPED: (),
        }
    ),
    HandshakeStep: _table(
        {
            # Without a key to prove, the secondary answers HELLO with its WELCOME at once.
            HandshakeStep.HELLO: (HandshakeStep.AUTH, HandshakeStep.WELCOME, HandshakeStep.CLOSED),
            HandshakeStep.AUTH: (HandshakeStep.WELCOME, HandshakeStep.CLOSED),
            HandshakeStep.WELCOME: (HandshakeStep.STREAM, HandshakeStep.CLOSED),
            HandshakeStep.STREAM: (HandshakeStep.CLOSED,),
            HandshakeStep.CLOSED: (),
        }
    ),
    Consistency: _table(
        {
            Consistency.CONSISTENT: (Consistency.INCONSISTENT,),  # a resync starts
            # A resync completes, or starts again before the last one finished.
            Consistency.INCONSISTENT: (Consistency.CONSISTENT, Consistency.INCONSISTENT),
        }
    ),
}


def allowed(old: _S, new: _S) -> bool:
    """Whether the table lets a state of this kind move from ``old`` to ``new``."""
    if type(old) is not type(new):
        return False
    return new in TRANSITIONS[type(old)][old]


def transition(old: _S, new: _S, *, what: str = "") -> _S:
    """``new``, if the move from ``old`` is allowed; otherwise :class:`StateTransitionError`.

    ``what`` names the thing changing state (a volume, a peer) for the error message.
    """
    if not allowed(old, new):
        kind = type(old).__name__
        subject = f"{what}: " if what else ""
        raise StateTransitionError(f"{subject}{kind} cannot change from {old!s} to {new!s}")
    return new
