"""compare(): which end of a link follows which, from their generation histories."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from blockmirror.journal.generations import VolumeHistory, new_generation
from blockmirror.journal.lineage import MAX_LINEAGE, Lineage, Relation, compare, lineage_of
from blockmirror.state import Role

G1 = ("1" * 32, 1, "site-a")
G2 = ("2" * 32, 81, "site-b")
G3 = ("3" * 32, 61, "site-a")


def lin(
    unit: str, role: Role, gens: tuple[tuple[str, int, str], ...], end: int, *, lost: bool = False
) -> Lineage:
    return Lineage(unit, role, gens, end, lost)


def test_same_generation_the_primary_ahead_leads() -> None:
    a = lin("site-a", Role.PRIMARY, (G1,), 100)
    b = lin("site-b", Role.SECONDARY, (G1,), 80)
    assert compare(a, b).relation is Relation.LEAD
    assert compare(b, a).relation is Relation.FOLLOW
    caught_up = lin("site-b", Role.SECONDARY, (G1,), 100)
    assert compare(a, caught_up).relation is Relation.EQUAL


def test_a_primary_behind_its_secondary_is_a_split_brain_unless_a_power_cut_lost_its_tail() -> None:
    restored = lin("site-a", Role.PRIMARY, (G1,), 50)
    b = lin("site-b", Role.SECONDARY, (G1,), 100)
    verdict = compare(restored, b)
    assert verdict.relation is Relation.SPLIT_BRAIN and verdict.common_seq == 50
    assert compare(b, restored).relation is Relation.SPLIT_BRAIN
    power_cut = lin("site-a", Role.PRIMARY, (G1,), 50, lost=True)
    verdict = compare(power_cut, b)
    assert verdict.relation is Relation.LEAD and verdict.discard_remote
    assert compare(b, power_cut).relation is Relation.FOLLOW and compare(b, power_cut).discard_local


def test_two_primaries_of_one_generation_are_a_split_brain() -> None:
    a = lin("site-a", Role.PRIMARY, (G1,), 100)
    clone = lin("site-a2", Role.PRIMARY, (G1,), 100)
    assert compare(a, clone).relation is Relation.SPLIT_BRAIN


def test_a_superseded_primary_without_divergent_writes_follows() -> None:
    a = lin("site-a", Role.PRIMARY, (G1,), 80)
    b = lin("site-b", Role.PRIMARY, (G1, G2), 120)
    verdict = compare(a, b)
    assert verdict.relation is Relation.FOLLOW and not verdict.discard_local
    assert verdict.branch_seq == 81
    assert compare(b, a).relation is Relation.LEAD


def test_a_superseded_primary_with_its_own_writes_past_the_branch_is_a_split_brain() -> None:
    a = lin("site-a", Role.PRIMARY, (G1,), 95)
    b = lin("site-b", Role.PRIMARY, (G1, G2), 120)
    verdict = compare(a, b)
    assert verdict.relation is Relation.SPLIT_BRAIN and verdict.common_seq == 80
    assert compare(b, a).relation is Relation.SPLIT_BRAIN


def test_a_secondary_ahead_of_the_promoted_unit_discards_what_it_received() -> None:
    # Chain A -> B -> C: C promoted while B held more of A's records than C.
    b = lin("site-b", Role.SECONDARY, (G1,), 95)
    c = lin("site-c", Role.PRIMARY, (G1, ("4" * 32, 81, "site-c")), 100)
    verdict = compare(b, c)
    assert verdict.relation is Relation.FOLLOW and verdict.discard_local
    assert verdict.branch_seq == 81
    mirrored = compare(c, b)
    assert mirrored.relation is Relation.LEAD and mirrored.discard_remote


def test_both_moved_on_is_a_split_brain() -> None:
    a = lin("site-a", Role.PRIMARY, (G1, G3), 70)
    b = lin("site-b", Role.PRIMARY, (G1, G2), 120)
    verdict = compare(a, b)
    assert verdict.relation is Relation.SPLIT_BRAIN and verdict.common_seq == 60


def test_no_history_and_unrelated_histories() -> None:
    fresh = lin("site-b", Role.SECONDARY, (), 0)
    a = lin("site-a", Role.PRIMARY, (G1,), 10)
    assert compare(a, fresh).relation is Relation.LEAD
    assert compare(fresh, a).relation is Relation.FOLLOW
    assert compare(fresh, fresh).relation is Relation.UNRELATED
    other = lin("site-x", Role.PRIMARY, (("9" * 32, 1, "site-x"),), 10)
    assert compare(a, other).relation is Relation.UNRELATED


def test_histories_cut_to_the_newest_generations_still_meet() -> None:
    gens = tuple((f"{i:032x}", i + 1, "site-a") for i in range(MAX_LINEAGE + 10))
    history = VolumeHistory("vol", Role.PRIMARY)
    for _ in range(3):
        history = history.begin(new_generation(start_seq=1, unit="site-a", reason="promote"))
    wire = lineage_of(history, unit="site-a", end_seq=5)
    assert len(wire.generations) == 3 and wire.end_seq == 5
    long_a = lin("site-a", Role.PRIMARY, gens[-MAX_LINEAGE:], 1000)
    long_b = lin("site-b", Role.SECONDARY, gens[-MAX_LINEAGE - 5 : -5], 900)
    assert compare(long_a, long_b).relation is Relation.LEAD


_gen_ids = st.lists(st.sampled_from([f"{i:032x}" for i in range(6)]), unique=True, max_size=4)


@st.composite
def _lineages(draw: st.DrawFn) -> Lineage:
    ids = draw(_gen_ids)
    starts = sorted(draw(st.lists(st.integers(1, 200), min_size=len(ids), max_size=len(ids))))
    units = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=len(ids), max_size=len(ids)))
    return Lineage(
        draw(st.sampled_from(["a", "b", "c"])),
        draw(st.sampled_from(list(Role))),
        tuple(zip(ids, starts, units, strict=True)),
        draw(st.integers(0, 250)),
        draw(st.booleans()),
    )


@given(_lineages(), _lineages())
def test_both_ends_reach_the_same_verdict(x: Lineage, y: Lineage) -> None:
    """Whatever the histories, the two ends agree: one leads exactly when the other follows,
    and a split brain or no relation is seen from both sides, at the same branch point."""
    here, there = compare(x, y), compare(y, x)
    assert here.mirrored().relation is there.relation
    assert here.branch_seq == there.branch_seq
    assert (here.discard_local, here.discard_remote) == (there.discard_remote, there.discard_local)
