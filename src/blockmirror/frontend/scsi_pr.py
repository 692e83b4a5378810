"""SCSI persistent reservations of one logical unit (SPC-4 5.13, 6.15, 6.16), sans-I/O.

State: the registered I_T nexuses with their keys (in registration order, which READ KEYS
reports), at most one reservation (its type and the I_T nexus that holds it), and PRgeneration.
:meth:`Reservations.check` is the per-command gate of SPC-4 table "commands allowed in the
presence of various reservations" and SBC-3's table for block commands, through three
:class:`Access` classes the executor gives each command:

- ``ANY``: INQUIRY, REPORT LUNS, REQUEST SENSE, TEST UNIT READY, READ CAPACITY, PERSISTENT
  RESERVE IN/OUT (PR OUT is judged by its own rules, below), START STOP UNIT with START=1;
- ``READ`` (allowed through Write Exclusive, refused by Exclusive Access): READ, VERIFY, GET LBA
  STATUS, MODE SENSE;
- ``WRITE``: WRITE, WRITE SAME, UNMAP, SYNCHRONIZE CACHE, START STOP UNIT that stops.

A reservation holder is never in conflict. For Write/Exclusive Access the holder is the one
reserving I_T nexus; for the Registrants Only types every registrant may do anything, and for
the All Registrants types every registrant is a holder. PR OUT service actions other than the
two REGISTERs need a registered nexus whose key matches, else RESERVATION CONFLICT.

Unit attentions the service actions owe other nexuses (RESERVATIONS RELEASED, RESERVATIONS
PREEMPTED, REGISTRATIONS PREEMPTED) and the nexuses whose tasks PREEMPT AND ABORT aborts are
returned as a :class:`PrOutcome`; the executor queues the former, the transport does the latter.

Not supported, and answered as SPC-4 says for a device server without them: APTPL (state lives
in memory only: PTPL_C=0, and APTPL=1 is INVALID FIELD IN PARAMETER LIST), ALL_TG_PT (ATP_C=0),
SPEC_I_PT (SIP_C=0), REGISTER AND MOVE and REPLACE LOST RESERVATION (INVALID FIELD IN CDB), and
RESERVE/RELEASE(6/10) (CRH=0; they are unknown opcodes). The state is lost when the unit stops
and is not replicated: after a restart or a failover, hosts register again.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from blockmirror.frontend.scsi_sense import (
    INSUFFICIENT_REGISTRATION_RESOURCES,
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
    REGISTRATIONS_PREEMPTED,
    RESERVATIONS_PREEMPTED,
    RESERVATIONS_RELEASED,
    ScsiError,
    SenseCode,
    invalid_cdb,
    invalid_parameter,
    reservation_conflict,
)

# Registrations beyond this are refused (INSUFFICIENT REGISTRATION RESOURCES): the table is in
# memory and an initiator may log in with a new ISID each time.
MAX_REGISTRATIONS = 256
ISCSI_PROTOCOL_ID = 0x5
LU_SCOPE = 0x0


class PrInAction(enum.IntEnum):
    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


class PrOutAction(enum.IntEnum):
    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06


class PrType(enum.IntEnum):
    WRITE_EXCLUSIVE = 0x1
    EXCLUSIVE_ACCESS = 0x3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8


_ALL_REGISTRANTS = frozenset(
    {PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS}
)
_REGISTRANTS_ONLY = frozenset(
    {PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY}
)
# Reads are refused to non-holders (or, for the registrants types, to non-registrants).
_EXCLUSIVE_ACCESS = frozenset(
    {
        PrType.EXCLUSIVE_ACCESS,
        PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
        PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
    }
)


# The service actions whose SCOPE and TYPE fields count.
_TYPED = frozenset(
    {PrOutAction.RESERVE, PrOutAction.RELEASE, PrOutAction.PREEMPT, PrOutAction.PREEMPT_AND_ABORT}
)


class Access(enum.Enum):
    ANY = "any"
    READ = "read"
    WRITE = "write"


@dataclass(frozen=True, slots=True)
class Nexus:
    """An I_T nexus: the initiator port and the target port a command came through.

    For iSCSI (RFC 7143 section 4.4.2) the initiator port is ``"<initiator name>,i,0x<ISID>"``
    and the target port ``"<target name>,t,0x<TPGT>"``; ``relative_port`` is the target port's
    relative identifier (VPD page 83h, READ FULL STATUS).
    """

    initiator: str
    target_port: str
    relative_port: int = 1

    def transport_id(self) -> bytes:
        """The iSCSI TransportID of the initiator port (SPC-4 7.6.4.6): format 01b (name and
        ISID) when the name carries ",i,0x", else 00b (the name alone)."""
        name = self.initiator.encode("utf-8", "replace") + b"\0"
        size = max(20, -(-len(name) // 4) * 4)
        fmt = 0x40 if ",i,0x" in self.initiator.lower() else 0x00
        return struct.pack(">BBH", fmt | ISCSI_PROTOCOL_ID, 0, size) + name.ljust(size, b"\0")


@dataclass(frozen=True, slots=True)
class PrOutcome:
    """What a PR OUT command owes others: unit attentions to queue, nexuses to abort."""

    attentions: tuple[tuple[Nexus, SenseCode], ...] = ()
    aborted: tuple[Nexus, ...] = ()


@dataclass(frozen=True, slots=True)
class Reservation:
    holder: Nexus  # for the all registrants types: the nexus that reserved (every one holds)
    type: PrType

    @property
    def all_registrants(self) -> bool:
        return self.type in _ALL_REGISTRANTS


@dataclass(frozen=True, slots=True)
class PrOutParameters:
    """The basic PERSISTENT RESERVE OUT parameter list (SPC-4 6.16.3)."""

    key: int
    service_key: int
    spec_i_pt: bool
    all_tg_pt: bool
    aptpl: bool

    @classmethod
    def decode(cls, data: bytes) -> PrOutParameters:
        key, service_key, _, flags = struct.unpack_from(">QQIB", data)
        return cls(key, service_key, bool(flags & 0x08), bool(flags & 0x04), bool(flags & 0x01))


class Reservations:
    """The persistent reservations of one logical unit."""

    def __init__(self) -> None:
        self.generation = 0
        self.registrations: dict[Nexus, int] = {}
        self.reservation: Reservation | None = None

    # --- the command gate -----------------------------------------------------------------------

    def holds(self, nexus: Nexus) -> bool:
        r = self.reservation
        if r is None:
            return False
        return nexus in self.registrations if r.all_registrants else r.holder == nexus

    def conflicts(self, nexus: Nexus, access: Access) -> bool:
        r = self.reservation
        if r is None or access is Access.ANY or self.holds(nexus):
            return False
        if (r.type in _REGISTRANTS_ONLY or r.all_registrants) and nexus in self.registrations:
            return False
        return access is Access.WRITE or r.type in _EXCLUSIVE_ACCESS

    def check(self, nexus: Nexus, access: Access) -> None:
        """Raise RESERVATION CONFLICT when ``nexus`` may not run a command of ``access``."""
        if self.conflicts(nexus, access):
            r = self.reservation
            assert r is not None
            raise reservation_conflict(f"{r.type.name} reservation held by {r.holder.initiator}")

    # --- PERSISTENT RESERVE IN ------------------------------------------------------------------

    def read(self, action: PrInAction) -> bytes:
        """The whole parameter data of a PR IN command (the caller cuts it to the allocation)."""
        gen = self.generation & 0xFFFFFFFF
        r = self.reservation
        if action is PrInAction.READ_KEYS:
            keys = b"".join(struct.pack(">Q", k) for k in self.registrations.values())
            return struct.pack(">II", gen, len(keys)) + keys
        if action is PrInAction.READ_RESERVATION:
            if r is None:
                return struct.pack(">II", gen, 0)
            # An all registrants reservation has no one key: it reports zero (SPC-4 6.15.3).
            key = 0 if r.all_registrants else self.registrations.get(r.holder, 0)
            return struct.pack(">IIQIBBH", gen, 16, key, 0, 0, LU_SCOPE << 4 | r.type, 0)
        if action is PrInAction.REPORT_CAPABILITIES:
            # TMV=1; ALLOW COMMANDS 011b: TEST UNIT READY passes Write and Exclusive Access
            # reservations, MODE SENSE and the other read-like ones pass Write Exclusive.
            mask = 0xEA01  # WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX | EX_AC_AR
            return struct.pack(">HBBHH", 8, 0x00, 0x80 | 0x3 << 4, mask, 0)
        descriptors = b""
        for nexus, key in self.registrations.items():
            holder = self.holds(nexus)
            scope_type = LU_SCOPE << 4 | r.type if holder and r is not None else 0
            tid = nexus.transport_id()
            descriptors += struct.pack(
                ">QIBBIHI", key, 0, int(holder), scope_type, 0, nexus.relative_port, len(tid)
            )
            descriptors += tid
        return struct.pack(">II", gen, len(descriptors)) + descriptors

    # --- PERSISTENT RESERVE OUT -----------------------------------------------------------------

    def out(
        self, nexus: Nexus, action: PrOutAction, scope: int, type_code: int, data: bytes
    ) -> PrOutcome:
        """Run one PR OUT command from ``nexus``. Raises ScsiError; a refusal changes nothing."""
        registering = action in (
            PrOutAction.REGISTER,
            PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY,
        )
        pr_type: PrType | None = None
        if action in _TYPED:
            if scope != LU_SCOPE:
                raise invalid_cdb(2, 7, f"scope {scope:#x} (only LU_SCOPE)")
            try:
                pr_type = PrType(type_code)
            except ValueError:
                raise invalid_cdb(2, 3, f"reservation type {type_code:#x}") from None
        p = PrOutParameters.decode(data)
        if p.spec_i_pt:
            raise invalid_parameter(20, 3, "SPEC_I_PT is not supported")
        if registering and p.all_tg_pt:
            raise invalid_parameter(20, 2, "ALL_TG_PT is not supported")
        if registering and p.aptpl:
            raise invalid_parameter(20, 0, "APTPL is not supported: reservations are not kept")
        if registering:
            return self._register(nexus, p, ignore=action is not PrOutAction.REGISTER)
        if self.registrations.get(nexus) != p.key:
            raise reservation_conflict("not registered with that reservation key")
        if action is PrOutAction.CLEAR:
            return self._clear(nexus)
        assert pr_type is not None
        if action is PrOutAction.RESERVE:
            return self._reserve(nexus, pr_type)
        if action is PrOutAction.RELEASE:
            return self._release(nexus, pr_type)
        return self._preempt(
            nexus, pr_type, p.service_key, abort=action is PrOutAction.PREEMPT_AND_ABORT
        )

    def _register(self, nexus: Nexus, p: PrOutParameters, *, ignore: bool) -> PrOutcome:
        current = self.registrations.get(nexus)
        if current is None:
            if not ignore and p.key != 0:
                raise reservation_conflict("not registered, and the reservation key is not 0")
            if p.service_key == 0:
                return PrOutcome()  # unregistering what is not registered: nothing to do
            if len(self.registrations) >= MAX_REGISTRATIONS:
                raise ScsiError.check(INSUFFICIENT_REGISTRATION_RESOURCES)
            self.registrations[nexus] = p.service_key
            self.generation += 1
            return PrOutcome()
        if not ignore and p.key != current:
            raise reservation_conflict("the reservation key does not match the registration")
        self.generation += 1
        if p.service_key != 0:
            self.registrations[nexus] = p.service_key
            return PrOutcome()
        del self.registrations[nexus]
        r = self.reservation
        if r is None:
            return PrOutcome()
        if r.all_registrants:
            if not self.registrations:
                self.reservation = None
            return PrOutcome()
        if r.holder != nexus:
            return PrOutcome()
        # The holder went away: its reservation with it. Registrants of a registrants only
        # reservation lose their access through it, so they hear of it (SPC-4 5.13.11.2.2).
        self.reservation = None
        if r.type in _REGISTRANTS_ONLY:
            return PrOutcome(tuple((n, RESERVATIONS_RELEASED) for n in self.registrations))
        return PrOutcome()

    def _reserve(self, nexus: Nexus, pr_type: PrType) -> PrOutcome:
        r = self.reservation
        if r is None:
            self.reservation = Reservation(nexus, pr_type)
            return PrOutcome()
        if self.holds(nexus) and r.type == pr_type:
            return PrOutcome()  # the same reservation again
        raise reservation_conflict(f"a {r.type.name} reservation is held")

    def _release(self, nexus: Nexus, pr_type: PrType) -> PrOutcome:
        r = self.reservation
        if r is None or not self.holds(nexus):
            return PrOutcome()  # nothing of ours to release: GOOD, nothing changes
        if r.type != pr_type:
            raise ScsiError.check(
                INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
                f"the reservation is {r.type.name}, not {pr_type.name}",
            )
        self.reservation = None
        if r.type in _REGISTRANTS_ONLY or r.all_registrants:
            others = (n for n in self.registrations if n != nexus)
            return PrOutcome(tuple((n, RESERVATIONS_RELEASED) for n in others))
        return PrOutcome()

    def _clear(self, nexus: Nexus) -> PrOutcome:
        others = tuple(n for n in self.registrations if n != nexus)
        self.registrations.clear()
        self.reservation = None
        self.generation += 1
        return PrOutcome(tuple((n, RESERVATIONS_PREEMPTED) for n in others))

    def _preempt(self, nexus: Nexus, pr_type: PrType, key: int, *, abort: bool) -> PrOutcome:
        r = self.reservation
        regs = self.registrations
        if r is not None and r.all_registrants and key == 0:
            # Preempting an all registrants reservation: everyone else loses their registration,
            # and the preempting nexus holds a new reservation (SPC-4 5.13.11.4.4).
            removed = tuple(n for n in regs if n != nexus)
            self.reservation = Reservation(nexus, pr_type)
            return self._removed(nexus, removed, (), abort)
        if r is not None and not r.all_registrants and key == regs.get(r.holder):
            # Preempting the holder: its key's registrations go (but ours), we hold instead.
            removed = tuple(n for n, k in regs.items() if k == key and n != nexus)
            self.reservation = Reservation(nexus, pr_type)
            released: tuple[Nexus, ...] = ()
            if r.type != pr_type:
                released = tuple(n for n in regs if n != nexus and n not in removed)
            return self._removed(nexus, removed, released, abort)
        # Only removing registrations; a reservation stays as it is.
        if key == 0:
            raise invalid_parameter(8, None, "a zero service action reservation key")
        removed = tuple(n for n, k in regs.items() if k == key)
        if not removed:
            raise reservation_conflict("no registration has that service action key")
        outcome = self._removed(nexus, removed, (), abort)
        if r is not None and r.all_registrants and not regs:
            self.reservation = None
        return outcome

    def _removed(
        self,
        nexus: Nexus,
        removed: tuple[Nexus, ...],
        released: tuple[Nexus, ...],
        abort: bool,
    ) -> PrOutcome:
        for n in removed:
            del self.registrations[n]
        self.generation += 1
        attentions = [(n, REGISTRATIONS_PREEMPTED) for n in removed if n != nexus]
        attentions += [(n, RESERVATIONS_RELEASED) for n in released]
        aborted = tuple(n for n in removed if n != nexus) if abort else ()
        return PrOutcome(tuple(attentions), aborted)
