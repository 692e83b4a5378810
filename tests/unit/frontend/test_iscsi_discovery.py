"""Text Requests in full feature phase: SendTargets, and answers split over PDUs (F and C)."""

from __future__ import annotations

import pytest

from blockmirror.errors import IscsiPduError
from blockmirror.frontend.iscsi_discovery import Portal, TextExchange, send_targets
from blockmirror.frontend.iscsi_pdu import RESERVED_TAG, TextRequest, payload
from blockmirror.frontend.iscsi_text import decode_text, encode_text

PORTALS = [Portal("192.0.2.1", 3260, 1), Portal("2001:db8::1", 3261, 2)]
TARGETS = ["iqn.2026-12.org.example:a", "iqn.2026-12.org.example:b"]


def exchange(*, session_target: str | None = None, max_send: int = 8192) -> TextExchange:
    return TextExchange(
        session_target=session_target,
        targets=lambda: TARGETS,
        portals=PORTALS,
        max_send_data_segment_length=max_send,
    )


def test_send_targets_all_in_a_discovery_session() -> None:
    assert send_targets("All", session_target=None, targets=TARGETS, portals=PORTALS) == [
        ("TargetName", TARGETS[0]),
        ("TargetAddress", "192.0.2.1:3260,1"),
        ("TargetAddress", "[2001:db8::1]:3261,2"),
        ("TargetName", TARGETS[1]),
        ("TargetAddress", "192.0.2.1:3260,1"),
        ("TargetAddress", "[2001:db8::1]:3261,2"),
    ]


@pytest.mark.parametrize(
    ("value", "session_target", "names"),
    [
        ("All", TARGETS[1], [TARGETS[1]]),  # a normal session: only its own target
        ("", TARGETS[1], [TARGETS[1]]),
        ("", None, []),
        (TARGETS[0].upper(), None, [TARGETS[0]]),
        ("iqn.2026-12.org.example:nope", None, []),
    ],
)
def test_send_targets_values(value: str, session_target: str | None, names: list[str]) -> None:
    got = send_targets(value, session_target=session_target, targets=TARGETS, portals=PORTALS)
    assert [v for k, v in got if k == "TargetName"] == names


def test_a_short_answer_is_one_final_response() -> None:
    ex = exchange()
    req = TextRequest(itt=7, lun=0, data=(encode_text([("SendTargets", "All")]),))
    resp = ex.handle(req)
    assert resp.final and not resp.cont and resp.ttt == RESERVED_TAG and resp.itt == 7
    names = [v for k, v in decode_text(payload(resp.data), unique=False) if k == "TargetName"]
    assert names == TARGETS


def test_a_long_answer_is_split_at_the_initiators_limit() -> None:
    many = [f"iqn.2026-12.org.example:volume-{i:03d}" for i in range(40)]
    ex = TextExchange(
        session_target=None, targets=lambda: many, portals=PORTALS, max_send_data_segment_length=512
    )
    resp = ex.handle(TextRequest(itt=3, data=(encode_text([("SendTargets", "All")]),)))
    parts = []
    while not resp.final:
        assert resp.cont and resp.ttt != RESERVED_TAG
        assert len(payload(resp.data)) == 512
        parts.append(payload(resp.data))
        resp = ex.handle(TextRequest(itt=3, ttt=resp.ttt))  # empty: "go on"
    assert not resp.cont and resp.ttt == RESERVED_TAG
    parts.append(payload(resp.data))
    assert len(parts) > 3
    got = [v for k, v in decode_text(b"".join(parts), unique=False) if k == "TargetName"]
    assert got == many


def test_a_request_split_by_the_initiator_is_gathered() -> None:
    ex = exchange()
    text = encode_text([("X-a", "1"), ("SendTargets", "All")])
    first = ex.handle(TextRequest(itt=9, final=False, cont=True, data=(text[:5],)))
    assert not first.final and not first.cont and not first.data and first.ttt != RESERVED_TAG
    last = ex.handle(TextRequest(itt=9, ttt=first.ttt, data=(text[5:],)))
    assert last.final and last.ttt == RESERVED_TAG
    pairs = decode_text(payload(last.data), unique=False)
    assert pairs[0] == ("X-a", "NotUnderstood") and ("TargetName", TARGETS[0]) in pairs


def test_a_request_without_f_keeps_the_exchange_open() -> None:
    resp = exchange().handle(TextRequest(itt=1, final=False, data=(b"X-a=1\0",)))
    assert not resp.final and resp.ttt != RESERVED_TAG


def test_a_new_request_abandons_the_old_one() -> None:
    many = [f"iqn.2026-12.org.example:v{i}" for i in range(40)]
    ex = TextExchange(
        session_target=None, targets=lambda: many, portals=PORTALS, max_send_data_segment_length=512
    )
    resp = ex.handle(TextRequest(itt=1, data=(b"SendTargets=All\0",)))
    assert resp.cont
    fresh = ex.handle(TextRequest(itt=2, data=(b"X-b=1\0",)))
    assert fresh.final and decode_text(payload(fresh.data)) == [("X-b", "NotUnderstood")]
    with pytest.raises(IscsiPduError) as info:
        ex.handle(TextRequest(itt=1, ttt=resp.ttt))
    assert info.value.reject_reason == 0x09


def test_data_while_fetching_an_answer_is_a_protocol_error() -> None:
    many = [f"iqn.2026-12.org.example:v{i}" for i in range(40)]
    ex = TextExchange(
        session_target=None, targets=lambda: many, portals=PORTALS, max_send_data_segment_length=512
    )
    resp = ex.handle(TextRequest(itt=1, data=(b"SendTargets=All\0",)))
    with pytest.raises(IscsiPduError) as info:
        ex.handle(TextRequest(itt=1, ttt=resp.ttt, data=(b"X-c=1\0",)))
    assert info.value.reject_reason == 0x04


def test_keys_in_full_feature_phase() -> None:
    ex = exchange()
    text = encode_text(
        [
            ("HeaderDigest", "CRC32C"),
            ("MaxBurstLength", "512"),
            ("MaxRecvDataSegmentLength", "65536"),
            ("InitiatorAlias", "host"),
            ("X-y", "1"),
        ]
    )
    resp = ex.handle(TextRequest(itt=1, data=(text,)))
    assert decode_text(payload(resp.data), unique=False) == [
        ("HeaderDigest", "Reject"),  # login-only keys cannot change now
        ("MaxBurstLength", "Reject"),
        ("X-y", "NotUnderstood"),
    ]
    assert ex.max_send_data_segment_length == 65536


def test_malformed_text_is_refused() -> None:
    with pytest.raises(IscsiPduError) as info:
        exchange().handle(TextRequest(itt=1, data=(b"SendTargets=All",)))
    assert info.value.reject_reason == 0x04
    with pytest.raises(IscsiPduError):
        exchange().handle(TextRequest(itt=1, data=(b"SendTargets=Reject\0",)))
