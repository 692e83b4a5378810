"""Operational key negotiation of one login (RFC 7143 sections 6.2 and 13), target side.

The initiator offers; we answer each key by its rule: list keys (HeaderDigest, DataDigest,
TaskReporting) take the first value of the initiator's list we accept; numbers take the minimum
(MaxBurstLength, FirstBurstLength, MaxOutstandingR2T, MaxConnections, DefaultTime2Retain,
ErrorRecoveryLevel) or the maximum (DefaultTime2Wait) of theirs and ours; booleans take AND
(ImmediateData) or OR (InitialR2T, DataPDUInOrder, DataSequenceInOrder). MaxRecvDataSegmentLength
is declarative: each side states what it receives. A key we do not know is answered
NotUnderstood, a value out of range Reject, a session-wide key on a connection joining an
existing session, or a key that a discovery session does not use, Irrelevant. The obsolete
marker keys get No and Reject (section 13.25).

A key nobody offers keeps its default, whatever we would prefer. So when our policy is stricter
than a default (a smaller MaxBurstLength, ImmediateData=No, digests required), we offer the key
ourselves before the login may complete (:meth:`Negotiation.completion_offers`), and check the
initiator's answer against the rule. The result is :class:`ConnectionParams` and
:class:`SessionParams`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from blockmirror.frontend.iscsi_pdu import LOGIN_SEGMENT, MAX_SEGMENT
from blockmirror.frontend.iscsi_text import (
    IRRELEVANT,
    NO,
    NOT_UNDERSTOOD,
    REJECT,
    RESERVED_ANSWERS,
    Pairs,
    TextError,
    format_boolean,
    parse_boolean,
    parse_list,
    parse_number,
)

NONE = "None"
CRC32C = "CRC32C"
DIGESTS = frozenset({NONE, CRC32C})
MRDSL = "MaxRecvDataSegmentLength"
TASK_REPORTING = "TaskReporting"
PROTOCOL_LEVEL = 1  # iSCSIProtocolLevel of RFC 7143


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """What this target accepts. Digest tuples list the values we accept, in our order of
    preference (used when we offer the key ourselves)."""

    header_digests: tuple[str, ...] = (NONE, CRC32C)
    data_digests: tuple[str, ...] = (NONE, CRC32C)
    max_recv_data_segment_length: int = 256 * 1024
    max_burst_length: int = 1024 * 1024
    first_burst_length: int = 64 * 1024
    immediate_data: bool = True
    initial_r2t: bool = True
    max_outstanding_r2t: int = 1
    max_connections: int = 1
    default_time2wait: int = 2
    default_time2retain: int = 20

    def __post_init__(self) -> None:
        for name in ("header_digests", "data_digests"):
            values = getattr(self, name)
            if not values or not set(values) <= DIGESTS or len(set(values)) != len(values):
                raise ValueError(f"{name}: {values!r}, expected None and/or CRC32C")
        for key, (low, high, _default, _rule, attr) in _NUMERIC.items():
            value = getattr(self, attr) if attr else low
            if not low <= value <= high:
                raise ValueError(f"{key} {value}: outside {low}..{high}")
        if not 512 <= self.max_recv_data_segment_length <= MAX_SEGMENT:
            raise ValueError("MaxRecvDataSegmentLength outside 512..2**24-1")
        if self.first_burst_length > self.max_burst_length:
            raise ValueError("FirstBurstLength must not exceed MaxBurstLength")


@dataclass(frozen=True, slots=True)
class ConnectionParams:
    """What one connection negotiated (scope CO)."""

    header_digest: bool = False
    data_digest: bool = False
    # The largest data segment we may send (the initiator's declaration, 8192 by default).
    max_send_data_segment_length: int = LOGIN_SEGMENT
    # The largest data segment the initiator may send us (what we declared).
    max_recv_data_segment_length: int = LOGIN_SEGMENT


@dataclass(frozen=True, slots=True)
class SessionParams:
    """What the leading connection negotiated for the whole session (scope SW)."""

    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0


_Rule = Callable[[int, int], int]
# key: (low, high, default, result function, KeyPolicy attribute; None for ERL, always 0)
_NUMERIC: dict[str, tuple[int, int, int, _Rule, str | None]] = {
    "MaxBurstLength": (512, MAX_SEGMENT, 262144, min, "max_burst_length"),
    "FirstBurstLength": (512, MAX_SEGMENT, 65536, min, "first_burst_length"),
    "MaxOutstandingR2T": (1, 65535, 1, min, "max_outstanding_r2t"),
    "MaxConnections": (1, 65535, 1, min, "max_connections"),
    "DefaultTime2Wait": (0, 3600, 2, max, "default_time2wait"),
    "DefaultTime2Retain": (0, 3600, 20, min, "default_time2retain"),
    "ErrorRecoveryLevel": (0, 2, 0, min, None),  # we offer 0: no recovery within a session
}
# key: (default, True for OR (False for AND), KeyPolicy attribute; None: we require Yes)
_BOOLEAN: dict[str, tuple[bool, bool, str | None]] = {
    "InitialR2T": (True, True, "initial_r2t"),
    "ImmediateData": (True, False, "immediate_data"),
    "DataPDUInOrder": (True, True, None),
    "DataSequenceInOrder": (True, True, None),
}
_DIGEST_KEYS = {"HeaderDigest": "header_digests", "DataDigest": "data_digests"}
# Session-wide keys: Irrelevant on a connection that joins a session (they are the leading
# connection's business).
SESSION_KEYS = frozenset({*_NUMERIC, *_BOOLEAN, TASK_REPORTING})
# Keys a discovery session does not use (section 13: "Irrelevant when: SessionType=Discovery").
_NOT_FOR_DISCOVERY = frozenset(
    {
        "MaxConnections",
        "InitialR2T",
        "ImmediateData",
        "MaxBurstLength",
        "FirstBurstLength",
        "MaxOutstandingR2T",
        "DataPDUInOrder",
        "DataSequenceInOrder",
    }
)
TARGET_ONLY_KEYS = frozenset({"TargetAlias", "TargetAddress", "TargetPortalGroupTag"})


class Negotiation:
    """The operational keys of one connection's login.

    ``leading``: the connection starts a session (TSIH 0); otherwise session-wide keys are
    Irrelevant and :meth:`session_params` is None. ``discovery`` may be set once SessionType
    is known (before the operational keys are answered).
    """

    def __init__(self, policy: KeyPolicy, *, leading: bool = True) -> None:
        self.policy = policy
        self.leading = leading
        self.discovery = False
        self._values: dict[str, int | bool | str] = {}
        self._offered: dict[str, str] = {}  # our own offers, awaiting the initiator's answer
        self._answered: set[str] = set()  # every key settled, whatever the outcome
        self._declared = False
        self._initiator_mrdsl = LOGIN_SEGMENT

    @property
    def awaiting_answers(self) -> bool:
        return bool(self._offered)

    def answer(self, pairs: Pairs) -> Pairs:
        """Our answers to the initiator's operational keys (and its answers to our offers,
        which need none). Raises :class:`TextError` on what breaks the rules outright."""
        out: Pairs = []
        for key, value in pairs:
            if key in self._offered:
                self._take_answer(key, self._offered.pop(key), value)
                continue
            if value in RESERVED_ANSWERS:
                raise TextError(f"{key}={value}: a reserved answer offered as a value")
            if key in self._answered:
                raise TextError(f"{key} negotiated twice")
            self._answered.add(key)
            reply = self._answer_one(key, value)
            if reply is not None:
                out.append((key, reply))
        return out

    def _answer_one(self, key: str, value: str) -> str | None:
        if key in TARGET_ONLY_KEYS:
            raise TextError(f"{key} is sent by targets only")
        if key == MRDSL:
            number = parse_number(value)
            if number is None or not 512 <= number <= MAX_SEGMENT:
                return REJECT
            self._initiator_mrdsl = number
            return None  # declarative: no answer
        if key in ("IFMarker", "OFMarker"):
            # Obsolete (section 13.25): "No" rather than the recommended Reject, since an
            # RFC 3720 initiator reads No as the AND result it expects.
            return NO
        if key in ("IFMarkInt", "OFMarkInt"):
            return REJECT
        if key == "iSCSIProtocolLevel":
            number = parse_number(value)
            return REJECT if number is None or number > 31 else str(min(number, PROTOCOL_LEVEL))
        if key in SESSION_KEYS and not self.leading:
            return IRRELEVANT
        if key in _NOT_FOR_DISCOVERY and self.discovery:
            return IRRELEVANT
        if key == "FirstBurstLength" and self.policy.initial_r2t and not self.policy.immediate_data:
            return IRRELEVANT  # no unsolicited data at all (section 13.14)
        if key in _DIGEST_KEYS:
            ours = getattr(self.policy, _DIGEST_KEYS[key])
            choice = next((v for v in parse_list(value) if v in ours), None)
            if choice is None:
                return REJECT
            self._values[key] = choice
            return choice
        if key == TASK_REPORTING:
            return "RFC3720" if "RFC3720" in parse_list(value) else REJECT
        if key in _NUMERIC:
            low, high, _default, rule, _attr = _NUMERIC[key]
            number = parse_number(value)
            if number is None or not low <= number <= high:
                return REJECT
            result = rule(number, self._ours_numeric(key))
            self._values[key] = result
            return str(result)
        if key in _BOOLEAN:
            offered = parse_boolean(value)
            if offered is None:
                return REJECT
            _default, is_or, _attr = _BOOLEAN[key]
            ours = self._ours_boolean(key)
            result = (offered or ours) if is_or else (offered and ours)
            self._values[key] = result
            return format_boolean(result)
        return NOT_UNDERSTOOD

    def _ours_numeric(self, key: str) -> int:
        attr = _NUMERIC[key][4]
        return int(getattr(self.policy, attr)) if attr else 0

    def _ours_boolean(self, key: str) -> bool:
        attr = _BOOLEAN[key][2]
        return bool(getattr(self.policy, attr)) if attr else True

    def declarations(self) -> Pairs:
        """What we declare, once: our MaxRecvDataSegmentLength (sent with the first answer of
        the operational stage)."""
        if self._declared:
            return []
        self._declared = True
        return [(MRDSL, str(self.policy.max_recv_data_segment_length))]

    def completion_offers(self) -> Pairs:
        """Our own offers for keys whose default we do not accept and that nobody offered yet;
        the login must wait for their answers before it completes."""
        offers: Pairs = []
        for key, attr in _DIGEST_KEYS.items():
            ours = getattr(self.policy, attr)
            if key not in self._answered and NONE not in ours:
                offers.append((key, ",".join(ours)))
        if self.leading:
            relevant = [k for k in SESSION_KEYS if not (self.discovery and k in _NOT_FOR_DISCOVERY)]
            for key in sorted(relevant):
                if key in self._answered:
                    continue
                if key in _NUMERIC:
                    default, ours_n = _NUMERIC[key][2], self._ours_numeric(key)
                    if _NUMERIC[key][3](default, ours_n) != default:
                        offers.append((key, str(ours_n)))
                elif key in _BOOLEAN:
                    default_b, is_or, _ = _BOOLEAN[key]
                    ours_b = self._ours_boolean(key)
                    if ((default_b or ours_b) if is_or else (default_b and ours_b)) != default_b:
                        offers.append((key, format_boolean(ours_b)))
        self._offered.update(offers)
        self._answered.update(key for key, _ in offers)
        return offers

    def _take_answer(self, key: str, offered: str, value: str) -> None:
        """The initiator's answer to our offer: it must follow the key's rule."""
        if key in _DIGEST_KEYS:
            if value not in parse_list(offered):
                raise TextError(f"{key}={value}: not one of our {offered}")
            self._values[key] = value
        elif key in _NUMERIC:
            number = parse_number(value)
            low, high, _default, rule, _attr = _NUMERIC[key]
            ours = int(offered)
            if number is None or not low <= number <= high or rule(number, ours) != number:
                raise TextError(f"{key}={value}: not a valid answer to our {ours}")
            self._values[key] = number
        else:
            answer = parse_boolean(value)
            ours_b = offered == format_boolean(True)
            is_or = _BOOLEAN[key][1]
            if answer is None or ((answer or ours_b) if is_or else (answer and ours_b)) != answer:
                raise TextError(f"{key}={value}: not a valid answer to our {offered}")
            self._values[key] = answer

    def connection_params(self) -> ConnectionParams:
        return ConnectionParams(
            header_digest=self._values.get("HeaderDigest", NONE) == CRC32C,
            data_digest=self._values.get("DataDigest", NONE) == CRC32C,
            max_send_data_segment_length=self._initiator_mrdsl,
            max_recv_data_segment_length=(
                self.policy.max_recv_data_segment_length if self._declared else LOGIN_SEGMENT
            ),
        )

    def session_params(self) -> SessionParams | None:
        if not self.leading:
            return None
        v = self._values

        def num(key: str) -> int:
            return int(v.get(key, _NUMERIC[key][2]))

        def flag(key: str) -> bool:
            return bool(v.get(key, _BOOLEAN[key][0]))

        max_burst = num("MaxBurstLength")
        return SessionParams(
            max_connections=num("MaxConnections"),
            initial_r2t=flag("InitialR2T"),
            immediate_data=flag("ImmediateData"),
            max_burst_length=max_burst,
            # FirstBurstLength must not exceed MaxBurstLength (section 13.14).
            first_burst_length=min(num("FirstBurstLength"), max_burst),
            default_time2wait=num("DefaultTime2Wait"),
            default_time2retain=num("DefaultTime2Retain"),
            max_outstanding_r2t=num("MaxOutstandingR2T"),
            data_pdu_in_order=flag("DataPDUInOrder"),
            data_sequence_in_order=flag("DataSequenceInOrder"),
            error_recovery_level=num("ErrorRecoveryLevel"),
        )

    def unmet(self) -> str | None:
        """Why the login cannot complete with what was negotiated (a required digest the
        initiator refused), or None."""
        for key, attr in _DIGEST_KEYS.items():
            if self._values.get(key, NONE) not in getattr(self.policy, attr):
                return f"{key} {self._values.get(key, NONE)} is not acceptable"
        return None
