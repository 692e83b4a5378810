"""Persistent reservations with two (or three) initiators: registration, each type's access
rules, conflicts, release, clear, preempt, PRgeneration and the unit attentions owed."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.frontend import scsi_sense as s
from blockmirror.frontend.scsi_pr import (
    Access,
    Nexus,
    PrInAction,
    PrOutAction,
    PrOutcome,
    PrType,
    Reservations,
)

A = Nexus("iqn.2026-01.org.example:a,i,0x000000000001", "iqn.t:vol,t,0x0001")
B = Nexus("iqn.2026-01.org.example:b,i,0x000000000002", "iqn.t:vol,t,0x0001", 2)
C = Nexus("iqn.2026-01.org.example:c", "iqn.t:vol,t,0x0001")
KA, KB, KC = 0xA1, 0xB2, 0xC3

R, T = PrOutAction, PrType


def params(key: int = 0, service_key: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">QQIBBH", key, service_key, 0, flags, 0, 0)


def out(
    prs: Reservations,
    nexus: Nexus,
    action: PrOutAction,
    key: int = 0,
    service_key: int = 0,
    pr_type: int = 0,
    *,
    scope: int = 0,
    flags: int = 0,
) -> PrOutcome:
    return prs.out(nexus, action, scope, pr_type, params(key, service_key, flags))


def register(prs: Reservations, nexus: Nexus, key: int) -> None:
    out(prs, nexus, R.REGISTER_AND_IGNORE_EXISTING_KEY, service_key=key)


def keys(prs: Reservations) -> tuple[int, list[int]]:
    data = prs.read(PrInAction.READ_KEYS)
    gen, length = struct.unpack_from(">II", data)
    return gen, [int.from_bytes(data[8 + i : 16 + i], "big") for i in range(0, length, 8)]


def reservation(prs: Reservations) -> tuple[int, int] | None:
    data = prs.read(PrInAction.READ_RESERVATION)
    if struct.unpack_from(">I", data, 4)[0] == 0:
        return None
    key, _, _, scope_type = struct.unpack_from(">QIBB", data, 8)
    return key, scope_type & 0x0F


def refused(status: int, asc: int | None = None) -> pytest.RaisesExc[s.ScsiError]:
    return pytest.raises(s.ScsiError, check=lambda e: _matches(e, status, asc))


def _matches(exc: s.ScsiError, status: int, asc: int | None) -> bool:
    if exc.status != status:
        return False
    return asc is None or (exc.sense is not None and exc.sense.code.asc == asc)


CONFLICT = s.Status.RESERVATION_CONFLICT
CHECK = s.Status.CHECK_CONDITION


def test_register_reregister_unregister() -> None:
    prs = Reservations()
    out(prs, A, R.REGISTER, service_key=KA)
    assert keys(prs) == (1, [KA])
    with refused(CONFLICT):  # registered: the reservation key must be ours, not 0
        out(prs, A, R.REGISTER, service_key=KA + 1)
    with refused(CONFLICT):  # not registered: the reservation key must be 0
        out(prs, B, R.REGISTER, key=5, service_key=KB)
    out(prs, A, R.REGISTER, key=KA, service_key=KA + 1)  # change the key
    out(prs, A, R.REGISTER, key=KA + 1, service_key=0)  # unregister
    assert keys(prs) == (3, [])
    out(prs, A, R.REGISTER, service_key=0)  # unregistering what is not: a no-op
    assert keys(prs) == (3, [])


def test_register_and_ignore_replaces_whatever_key() -> None:
    prs = Reservations()
    register(prs, A, KA)
    out(prs, A, R.REGISTER_AND_IGNORE_EXISTING_KEY, key=999, service_key=KC)
    assert keys(prs)[1] == [KC]


# (type, registered B reads, registered B writes, unregistered B reads, unregistered B writes),
# as in SPC-4 5.13.1 and libiscsi's test_prout_reserve_access.
ACCESS = [
    (T.EXCLUSIVE_ACCESS, False, False, False, False),
    (T.WRITE_EXCLUSIVE, True, False, True, False),
    (T.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, True, True, False, False),
    (T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, True, True, True, False),
    (T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, True, True, False, False),
    (T.WRITE_EXCLUSIVE_ALL_REGISTRANTS, True, True, True, False),
]


@pytest.mark.parametrize(("pr_type", "reg_r", "reg_w", "unreg_r", "unreg_w"), ACCESS)
def test_access_of_each_type(
    pr_type: PrType, reg_r: bool, reg_w: bool, unreg_r: bool, unreg_w: bool
) -> None:
    prs = Reservations()
    register(prs, A, KA)
    register(prs, B, KB)
    out(prs, A, R.RESERVE, KA, pr_type=pr_type)
    all_registrants = pr_type in (
        T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
        T.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
    )
    assert reservation(prs) == (0 if all_registrants else KA, pr_type)
    for access in Access:
        assert not prs.conflicts(A, access)
        assert not prs.conflicts(B, Access.ANY)
    assert prs.conflicts(B, Access.READ) is not reg_r
    assert prs.conflicts(B, Access.WRITE) is not reg_w
    out(prs, B, R.REGISTER, KB, 0)
    assert prs.conflicts(B, Access.READ) is not unreg_r
    assert prs.conflicts(B, Access.WRITE) is not unreg_w
    with refused(CONFLICT):
        prs.check(B, Access.WRITE)
    prs.check(B, Access.ANY)
    out(prs, A, R.RELEASE, KA, pr_type=pr_type)
    assert reservation(prs) is None
    assert not prs.conflicts(B, Access.WRITE)


def test_reserve_rules() -> None:
    prs = Reservations()
    with refused(CONFLICT):  # not registered
        out(prs, A, R.RESERVE, 0, pr_type=T.WRITE_EXCLUSIVE)
    register(prs, A, KA)
    register(prs, B, KB)
    with refused(CONFLICT):  # the wrong key
        out(prs, A, R.RESERVE, KB, pr_type=T.WRITE_EXCLUSIVE)
    gen = keys(prs)[0]
    out(prs, A, R.RESERVE, KA, pr_type=T.WRITE_EXCLUSIVE)
    out(prs, A, R.RESERVE, KA, pr_type=T.WRITE_EXCLUSIVE)  # the same again: GOOD
    with refused(CONFLICT):  # the holder, another type
        out(prs, A, R.RESERVE, KA, pr_type=T.EXCLUSIVE_ACCESS)
    with refused(CONFLICT):  # another nexus
        out(prs, B, R.RESERVE, KB, pr_type=T.WRITE_EXCLUSIVE)
    assert keys(prs)[0] == gen  # RESERVE does not count
    with refused(CHECK, 0x24):  # scope other than LU_SCOPE
        out(prs, A, R.RESERVE, KA, pr_type=T.WRITE_EXCLUSIVE, scope=1)
    with refused(CHECK, 0x24):  # an undefined type
        out(prs, A, R.RESERVE, KA, pr_type=2)


def test_release_rules() -> None:
    prs = Reservations()
    register(prs, A, KA)
    register(prs, B, KB)
    register(prs, C, KC)
    out(prs, A, R.RESERVE, KA, pr_type=T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    assert out(prs, B, R.RELEASE, KB, pr_type=T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY) == PrOutcome()
    assert reservation(prs) == (KA, T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)  # not B's to release
    with refused(CHECK, 0x26):  # INVALID RELEASE OF PERSISTENT RESERVATION
        out(prs, A, R.RELEASE, KA, pr_type=T.WRITE_EXCLUSIVE)
    gen = keys(prs)[0]
    outcome = out(prs, A, R.RELEASE, KA, pr_type=T.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    assert set(outcome.attentions) == {(B, s.RESERVATIONS_RELEASED), (C, s.RESERVATIONS_RELEASED)}
    assert keys(prs)[0] == gen  # RELEASE does not count
    # Releasing a Write Exclusive reservation tells no one.
    out(prs, A, R.RESERVE, KA, pr_type=T.WRITE_EXCLUSIVE)
    assert out(prs, A, R.RELEASE, KA, pr_type=T.WRITE_EXCLUSIVE) == PrOutcome()


def test_clear() -> None:
    prs = Reservations()
    register(prs, A, KA)
    register(prs, B, KB)
    out(prs, A, R.RESERVE, KA, pr_type=T.EXCLUSIVE_ACCESS)
    gen = keys(prs)[0]
    with refused(CONFLICT):
        out(prs, C, R.CLEAR, 0)
    outcome = out(prs, B, R.CLEAR, KB)
    assert outcome.attentions == ((A, s.RESERVATIONS_PREEMPTED),)
    assert keys(prs) == (gen + 1, [])
    assert reservation(prs) is None


def test_preempt_registrations_without_a_reservation() -> None:
    # libiscsi's test_prout_preempt_rm_reg: B removes A's registration.
    prs = Reservations()
    register(prs, A, KA)
    register(prs, B, KB)
    gen = keys(prs)[0]
    outcome = out(prs, B, R.PREEMPT, KB, KA, T.EXCLUSIVE_ACCESS)
    assert outcome.attentions == ((A, s.REGISTRATIONS_PREEMPTED),)
    assert keys(prs) == (gen + 1, [KB])
    assert reservation(prs) is None  # removing registrations reserves nothing
    with refused(CONFLICT):  # no registration has that key
        out(prs, B, R.PREEMPT, KB, 0x999, T.EXCLUSIVE_ACCESS)
    with refused(CHECK, 0x26):  # a zero key preempts nothing
        out(prs, B, R.PREEMPT, KB, 0, T.EXCLUSIVE_ACCESS)


def test_preempt_the_holder_and_abort() -> None:
    prs = Reservations()
    register(prs, A, KA)
    register(prs, B, KB)
    register(prs, C, KC)
    out(prs, A, R.RESERVE, KA, pr_type=T.WRITE_EXCLUSIVE)
    outcome = out(prs, B, R.PREEMPT_AND_ABORT, KB, KA, T.EXCLUSIVE_ACCESS)
    assert reservation(prs) == (KB, T.EXCLUSIVE_ACCESS)
    assert keys(prs)[1] == [KB, KC]
    assert outcome.aborted == (A,)
    # A lost its registration; C's access changed with the type, so it hears of a release.
    assert set(outcome.attentions) == {(A, s.REGISTRATIONS_PREEMPTED), (C, s.RESERVATIONS_RELEASED)}
    assert prs.conflicts(C, Access.READ) and prs.conflicts(A, Access.WRITE)
    # PREEMPT (not AND ABORT) of a non-holder key only removes that registration.
    outcome = out(prs, B, R.PREEMPT, KB, KC, T.EXCLUSIVE_ACCESS)
    assert outcome.aborted == () and outcome.attentions == ((C, s.REGISTRATIONS_PREEMPTED),)
    assert reservation(prs) == (KB, T.EXCLUSIVE_ACCESS)


def test_preempt_an_all_registrants_reservation() -> None:
    prs = Reservations()
    for nexus, key in ((A, KA), (B, KB), (C, KC)):
        register(prs, nexus, key)
    out(prs, A, R.RESERVE, KA, pr_type=T.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    outcome = out(prs, C, R.PREEMPT, KC, 0, T.EXCLUSIVE_ACCESS)
    assert reservation(prs) == (KC, T.EXCLUSIVE_ACCESS)
    assert keys(prs)[1] == [KC]
    assert {n for n, _ in outcome.attentions} == {A, B}


def test_the_holder_unregistering() -> None:
    prs = Reservations()
    register(prs, A, KA)
    register(prs, B, KB)
    out(prs, A, R.RESERVE, KA, pr_type=T.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
    outcome = out(prs, A, R.REGISTER, KA, 0)
    assert reservation(prs) is None
    assert outcome.attentions == ((B, s.RESERVATIONS_RELEASED),)
    # An all registrants reservation lasts while anyone is registered.
    register(prs, A, KA)
    out(prs, A, R.RESERVE, KA, pr_type=T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    out(prs, A, R.REGISTER, KA, 0)
    assert reservation(prs) == (0, T.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    assert prs.holds(B) and not prs.holds(A)
    out(prs, B, R.REGISTER, KB, 0)
    assert reservation(prs) is None


@pytest.mark.parametrize(
    ("flags", "bit"),
    [(0x01, 0), (0x04, 2), (0x08, 3)],  # APTPL, ALL_TG_PT, SPEC_I_PT
)
def test_unsupported_options_are_invalid_fields(flags: int, bit: int) -> None:
    prs = Reservations()
    with pytest.raises(s.ScsiError) as info:
        out(prs, A, R.REGISTER, service_key=KA, flags=flags)
    sense = info.value.sense
    assert sense is not None and sense.code == s.INVALID_FIELD_IN_PARAMETER_LIST
    assert sense.field == s.FieldPointer(False, 20, bit)
    assert keys(prs) == (0, [])


def test_report_capabilities() -> None:
    data = Reservations().read(PrInAction.REPORT_CAPABILITIES)
    length, b2, b3, mask = struct.unpack_from(">HBBH", data)
    assert length == 8 == len(data)
    assert b2 & 0x0D == 0  # SIP_C, ATP_C, PTPL_C: none
    assert b3 >> 7 == 1 and (b3 >> 4) & 7 <= 5 and not b3 & 1  # TMV, ALLOW COMMANDS, PTPL_A
    supported = {t for t in PrType if (t == 8 and mask & 1) or (t < 8 and mask >> (8 + t) & 1)}
    assert supported == set(PrType)


def test_read_full_status() -> None:
    prs = Reservations()
    register(prs, A, KA)
    register(prs, B, KB)
    out(prs, B, R.RESERVE, KB, pr_type=T.WRITE_EXCLUSIVE)
    data = prs.read(PrInAction.READ_FULL_STATUS)
    _, length = struct.unpack_from(">II", data)
    assert length == len(data) - 8
    found = []
    at = 8
    while at < len(data):
        key, _, flags, scope_type, _, rel, tid_len = struct.unpack_from(">QIBBIHI", data, at)
        tid = data[at + 24 : at + 24 + tid_len]
        assert tid[0] & 0x0F == 5 and tid_len % 4 == 0 and tid_len >= 24
        assert int.from_bytes(tid[2:4], "big") == tid_len - 4
        found.append((key, flags & 1, scope_type, rel, tid[0] >> 6, tid[4:].rstrip(b"\0")))
        at += 24 + tid_len
    assert found == [
        (KA, 0, 0, 1, 1, A.initiator.encode()),
        (KB, 1, T.WRITE_EXCLUSIVE, 2, 1, B.initiator.encode()),
    ]
    assert C.transport_id()[0] >> 6 == 0  # a name without an ISID: format 00b


# --- any sequence of PR OUT commands keeps the state consistent -------------------------------

nexuses = st.sampled_from((A, B, C))
pr_out = st.tuples(
    nexuses,
    st.sampled_from(PrOutAction),
    st.sampled_from((0, KA, KB, KC)),
    st.sampled_from((0, KA, KB, KC)),
    st.sampled_from((*PrType, 0, 2)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(pr_out, max_size=30))
def test_any_sequence_keeps_the_invariants(
    steps: list[tuple[Nexus, PrOutAction, int, int, int]],
) -> None:
    prs = Reservations()
    last_gen = 0
    for nexus, action, key, service_key, pr_type in steps:
        before = (dict(prs.registrations), prs.reservation, prs.generation)
        try:
            out(prs, nexus, action, key, service_key, pr_type)
        except s.ScsiError as exc:
            assert exc.status in (CHECK, CONFLICT)
            assert (dict(prs.registrations), prs.reservation, prs.generation) == before
        assert prs.generation >= last_gen
        last_gen = prs.generation
        r = prs.reservation
        if r is not None:
            # A reservation always has a registered holder.
            assert any(prs.holds(n) for n in (A, B, C))
            assert r.all_registrants or r.holder in prs.registrations
        assert all(k != 0 for k in prs.registrations.values())
