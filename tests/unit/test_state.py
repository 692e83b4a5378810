"""The transition table on its own: every move it lists is allowed, every other is refused."""

from __future__ import annotations

import enum
import itertools

import pytest

from blockmirror import state
from blockmirror.state import (
    TRANSITIONS,
    ConsumerMode,
    Role,
    StateTransitionError,
    VolumeState,
    allowed,
    transition,
)

KINDS = list(TRANSITIONS)
ALL_PAIRS = [(old, new) for kind in KINDS for old, new in itertools.product(list(kind), list(kind))]


def test_every_state_has_a_row_and_every_target_is_a_state() -> None:
    for kind, table in TRANSITIONS.items():
        assert set(table) == set(kind), f"{kind.__name__}: a state without a row"
        for targets in table.values():
            assert all(isinstance(t, kind) for t in targets)


@pytest.mark.parametrize(("old", "new"), ALL_PAIRS, ids=lambda s: f"{type(s).__name__}.{s}")
def test_each_pair_is_allowed_exactly_when_listed(old: enum.Enum, new: enum.Enum) -> None:
    listed = new in TRANSITIONS[type(old)][old]
    assert allowed(old, new) is listed  # type: ignore[type-var]
    if listed:
        assert transition(old, new) is new  # type: ignore[type-var]
    else:
        with pytest.raises(StateTransitionError, match=f"from {old} to {new}"):
            transition(old, new, what="vol")  # type: ignore[type-var]


def test_states_of_different_kinds_never_mix() -> None:
    for a, b in itertools.permutations(KINDS, 2):
        old, new = next(iter(a)), next(iter(b))
        assert not allowed(old, new)  # type: ignore[type-var]
        with pytest.raises(StateTransitionError):
            transition(old, new)  # type: ignore[type-var]


def test_values_are_the_strings_status_and_checkpoints_use() -> None:
    # These spellings are in GET /api/status and in every journal's checkpoint.
    assert [m.value for m in ConsumerMode] == ["journal", "tracking"]
    assert {"serving", "replica", "failed", "stalled", "stopped", "opening"} == {
        s.value for s in VolumeState
    }
    assert Role("primary") is Role.PRIMARY and Role("secondary") is Role.SECONDARY


def test_the_error_names_the_subject() -> None:
    with pytest.raises(StateTransitionError, match=r"^db: VolumeState cannot change"):
        transition(VolumeState.STOPPED, VolumeState.SERVING, what="db")


def test_module_is_self_contained() -> None:
    # The table is the lowest layer: it must import nothing of ours but the errors.
    imported = {
        name
        for name, value in vars(state).items()
        if getattr(value, "__module__", "").startswith("blockmirror.")
        and not getattr(value, "__module__", "").startswith("blockmirror.state")
    }
    assert imported <= {"BlockmirrorError"}
