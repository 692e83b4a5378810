"""Which of two units holding a volume follows which: their generation histories compared.

Every unit that holds a volume can say what it holds as a :class:`Lineage`: its live role, its
generations (id, first sequence number, the unit that began it), the last record it holds, and
whether its own tail may have been lost in a power cut. A link carries the lineage of each end
(protocol version 2), and :func:`compare` tells, from one end's point of view, what the two
hold (docs/operations.md, "Split brain"):

- **the same line**: one holds a prefix of what the other holds; the one further ahead sends;
- **a descendant**: one began a generation the other never saw (a promote). The other, the
  ancestor, follows it. Records the ancestor holds past the descendant's branch point were
  either received from the old primary (a secondary further ahead than the promoted unit: they
  are discarded and their regions copied back) or its own writes (a split brain);
- **a split brain**: both moved on from a common point, or both are primaries of the same
  generation, or a primary finds a secondary holding records of the primary's own generation
  that the primary does not have (it was restored from an older copy). Nothing is copied.

Sans-I/O: nothing here reads or writes; callers build lineages from the role file
(:mod:`.generations`) and the journal.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from blockmirror.journal.generations import VolumeHistory
from blockmirror.state import Role

__all__ = [
    "MAX_LINEAGE",
    "Lineage",
    "Relation",
    "Verdict",
    "compare",
    "fixed_lineage",
    "lineage_of",
]

# A link carries the newest generations only: a common point further back than this many
# promotes is not looked for (the ends are then unrelated, and an operator decides).
MAX_LINEAGE: Final = 256


class Relation(enum.StrEnum):
    """What the local end of a link should do, as :func:`compare` finds it."""

    LEAD = "lead"  # the remote end follows us: we send to it
    FOLLOW = "follow"  # we follow the remote end: it sends to us
    EQUAL = "equal"  # the same line and the same last record: neither has anything to send
    SPLIT_BRAIN = "split-brain"  # both moved on from a common point; nothing is copied
    UNRELATED = "unrelated"  # no generation in common


@dataclass(frozen=True, slots=True)
class Lineage:
    """What one unit holds of a volume, as a link compares it."""

    unit: str
    role: Role
    # (id, start_seq, unit that began it), oldest first; at most MAX_LINEAGE on the wire.
    generations: tuple[tuple[str, int, str], ...]
    # The last record it holds (0: none).
    end_seq: int
    # Its last start followed a power cut that may have lost records it had already sent.
    lost_tail: bool = False
    # The origin time (ns) of record end_seq, 0 if not known: two lines with the same numbers
    # but different stamps at one number are not the same line (a primary restored from a
    # backup that wrote again).
    end_stamp: int = 0

    @property
    def current(self) -> tuple[str, int, str] | None:
        return self.generations[-1] if self.generations else None


def lineage_of(
    history: VolumeHistory,
    *,
    unit: str,
    end_seq: int,
    lost_tail: bool = False,
    end_stamp: int = 0,
) -> Lineage:
    """The lineage of a volume whose role file holds ``history``."""
    gens = tuple((g.id, g.start_seq, g.unit) for g in history.generations[-MAX_LINEAGE:])
    return Lineage(unit, history.role, gens, end_seq, lost_tail, end_stamp)


def fixed_lineage(unit: str, role: Role, end_seq: int) -> Lineage:
    """The lineage of an end whose role never changes and that keeps no generations (a link
    built without :class:`~blockmirror.link.direction.LinkRoles`, as embedded links are)."""
    return Lineage(unit, role, (), end_seq)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of :func:`compare`, from the local end's point of view.

    ``branch_seq``: the first sequence number the two lines do not share (None when one holds
    a prefix of the other). ``discard_local`` / ``discard_remote``: that end holds records from
    ``branch_seq`` on, received from an old primary, that it must give up (their regions are
    copied back from the other end) before it follows. ``reason`` says it in words.
    """

    relation: Relation
    reason: str
    branch_seq: int | None = None
    discard_local: bool = False
    discard_remote: bool = False

    @property
    def common_seq(self) -> int | None:
        """The last sequence number both lines share, when they branched."""
        return None if self.branch_seq is None else self.branch_seq - 1

    def mirrored(self) -> Verdict:
        """The same verdict from the other end's point of view."""
        relation = {Relation.LEAD: Relation.FOLLOW, Relation.FOLLOW: Relation.LEAD}.get(
            self.relation, self.relation
        )
        return Verdict(
            relation, self.reason, self.branch_seq, self.discard_remote, self.discard_local
        )


def _shared(a: Lineage, b: Lineage) -> tuple[int, int] | None:
    """How far the two histories agree: ``(i, j)`` with ``a.generations[:i]`` and
    ``b.generations[:j]`` ending in the same shared generations, or None if they share none.

    Histories on the wire are the newest MAX_LINEAGE only, so one may reach further back than
    the other. The generations both list must be one run, in the same order in both, starting
    at the first entry of at least one of them; anything else (generations shared out of
    order, or both listing different older ones before them) is not a history this code
    writes, and counts as sharing nothing.
    """
    in_b = {g[0] for g in b.generations}
    in_a = {g[0] for g in a.generations}
    run_a = [i for i, g in enumerate(a.generations) if g[0] in in_b]
    run_b = [j for j, g in enumerate(b.generations) if g[0] in in_a]
    if not run_a:
        return None
    contiguous = run_a == list(range(run_a[0], run_a[-1] + 1)) and run_b == list(
        range(run_b[0], run_b[-1] + 1)
    )
    same_order = [a.generations[i][0] for i in run_a] == [b.generations[j][0] for j in run_b]
    if not contiguous or not same_order or (run_a[0] != 0 and run_b[0] != 0):
        return None
    return run_a[-1] + 1, run_b[-1] + 1


def compare(local: Lineage, remote: Lineage) -> Verdict:
    """What ``local`` should do about ``remote``."""
    if not remote.generations and not local.generations:
        # Two replicas that never received: nothing to give each other.
        return Verdict(Relation.UNRELATED, "neither end has any history of this volume")
    if not remote.generations:
        return Verdict(Relation.LEAD, f"{remote.unit} has never received this volume")
    if not local.generations:
        return Verdict(Relation.FOLLOW, f"{local.unit} has never received this volume")
    shared = _shared(local, remote)
    if shared is None:
        return Verdict(
            Relation.UNRELATED,
            f"{local.unit} and {remote.unit} share no generation of this volume (of the newest "
            f"{MAX_LINEAGE} each sends)",
        )
    k, k_remote = shared
    local_more = len(local.generations) > k
    remote_more = len(remote.generations) > k_remote
    if local_more and remote_more:
        mine = local.generations[k]
        theirs = remote.generations[k_remote]
        branch = min(mine[1], theirs[1])
        return Verdict(
            Relation.SPLIT_BRAIN,
            f"both moved on from generation {local.generations[k - 1][0]}: {mine[2]} began "
            f"{mine[0]} at seq {mine[1]}, {theirs[2]} began {theirs[0]} at seq {theirs[1]}",
            branch,
        )
    if remote_more:
        return _descendant(ancestor=local, descendant=remote, shared=k, branch=k_remote)
    if local_more:
        return _descendant(ancestor=remote, descendant=local, shared=k_remote, branch=k).mirrored()
    return _same_generation(local, remote)


def _descendant(*, ancestor: Lineage, descendant: Lineage, shared: int, branch: int) -> Verdict:
    """``descendant`` began a generation after the last one ``ancestor`` knows; the verdict is
    the ancestor's."""
    _, start, began_by = descendant.generations[branch]
    last_shared = ancestor.generations[shared - 1]
    if ancestor.end_seq < start:
        return Verdict(
            Relation.FOLLOW,
            f"{descendant.unit} holds a newer generation ({began_by} began it at seq {start}); "
            f"{ancestor.unit} holds nothing after seq {ancestor.end_seq} and follows",
            start,
        )
    extra = f"records {start}..{ancestor.end_seq} of generation {last_shared[0]}"
    if last_shared[2] == ancestor.unit:
        # Its own writes, made after the other end was promoted: both sides took writes.
        return Verdict(
            Relation.SPLIT_BRAIN,
            f"{ancestor.unit} wrote {extra} after {began_by} began generation "
            f"{descendant.generations[branch][0]} at seq {start}",
            start,
        )
    # Received from the old primary, never acknowledged by the promoted unit: given up, and
    # their regions copied back from the new line.
    return Verdict(
        Relation.FOLLOW,
        f"{ancestor.unit} holds {extra} (from {last_shared[2]}) that {descendant.unit} never "
        f"received before {began_by} began a new generation at seq {start}; they are discarded",
        start,
        discard_local=True,
    )


def _same_generation(local: Lineage, remote: Lineage) -> Verdict:
    generation = local.generations[-1][0]
    if local.role is Role.PRIMARY and remote.role is Role.PRIMARY:
        branch = min(local.end_seq, remote.end_seq) + 1
        return Verdict(
            Relation.SPLIT_BRAIN,
            f"{local.unit} and {remote.unit} are both primary of generation {generation}",
            branch,
        )
    if local.end_seq == remote.end_seq:
        return Verdict(
            Relation.EQUAL, f"both hold generation {generation} up to seq {local.end_seq}"
        )
    ahead, behind = (local, remote) if local.end_seq > remote.end_seq else (remote, local)
    if behind.role is Role.PRIMARY:
        # A primary behind its own secondary in its own generation lost what it had sent.
        if behind.lost_tail:
            # A power cut took records it had not made durable (never promised to a host):
            # the secondary's copies of them are given up, and the primary stays primary.
            verdict = Verdict(
                Relation.LEAD,
                f"{behind.unit} lost records {behind.end_seq + 1}..{ahead.end_seq} in a power "
                f"cut before they were durable; {ahead.unit}'s copies of them are discarded",
                behind.end_seq + 1,
                discard_remote=True,
            )
            return verdict if behind is local else verdict.mirrored()
        # Otherwise it was restored from an older copy: its new writes would reuse numbers
        # the secondary holds other data for.
        return Verdict(
            Relation.SPLIT_BRAIN,
            f"{ahead.unit} holds records {behind.end_seq + 1}..{ahead.end_seq} of generation "
            f"{generation} that its primary {behind.unit} does not (restored from an older copy?)",
            behind.end_seq + 1,
        )
    reason = (
        f"{ahead.unit} holds generation {generation} up to seq {ahead.end_seq}, "
        f"{behind.unit} up to {behind.end_seq}"
    )
    return Verdict(Relation.LEAD if ahead is local else Relation.FOLLOW, reason)
