"""The iSCSI text codec and the operational key negotiation, key by key (RFC 7143 6 and 13)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.frontend.iscsi_keys import KeyPolicy, Negotiation
from blockmirror.frontend.iscsi_text import (
    TextError,
    decode_text,
    encode_text,
    parse_binary,
    parse_boolean,
    parse_number,
)

KEYS = st.from_regex(r"[A-Z][A-Za-z0-9.+@_#-]{0,62}", fullmatch=True)
VALUES = st.text(st.characters(blacklist_characters="\0", codec="utf-8"), max_size=80).filter(
    lambda v: len(v.encode()) <= 255
)


@given(st.dictionaries(KEYS, VALUES, max_size=12))
def test_text_round_trips(pairs: dict[str, str]) -> None:
    items = list(pairs.items())
    raw = encode_text(items)
    assert raw.count(b"\0") == len(items)
    assert decode_text(raw) == items


def test_text_layout_and_padding_nuls() -> None:
    assert encode_text([("InitiatorName", "iqn.x"), ("SessionType", "Normal")]) == (
        b"InitiatorName=iqn.x\0SessionType=Normal\0"
    )
    assert decode_text(b"A=1\0\0\0B=\0") == [("A", "1"), ("B", "")]
    assert decode_text(b"") == []
    assert decode_text("TargetAlias=caf\u00e9\0".encode()) == [("TargetAlias", "caf\u00e9")]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"A=1", id="no final NUL"),
        pytest.param(b"A1\0", id="no equals sign"),
        pytest.param(b"a=1\0", id="key in lower case"),
        pytest.param(b"=1\0", id="empty key"),
        pytest.param(b"K" * 64 + b"=1\0", id="key of 64"),
        pytest.param(b"A=" + b"v" * 256 + b"\0", id="value of 256"),
        pytest.param(b"CHAP_C=0x" + b"0" * 2049 + b"\0", id="challenge too long"),
        pytest.param(b"A=\xff\xfe\0", id="not UTF-8"),
        pytest.param(b"A=1\0B=2\0A=1\0", id="key twice"),
    ],
)
def test_malformed_text_is_refused(raw: bytes) -> None:
    with pytest.raises(TextError) as info:
        decode_text(raw)
    assert info.value.reject_reason == 0x04


def test_limits_are_inclusive() -> None:
    key = "K" * 63
    assert decode_text(key.encode() + b"=" + b"v" * 255 + b"\0") == [(key, "v" * 255)]
    long = "0x" + "ab" * 1024
    assert decode_text(b"CHAP_R=" + long.encode() + b"\0") == [("CHAP_R", long)]
    with pytest.raises(ValueError):
        encode_text([("A", "v" * 256)])
    with pytest.raises(ValueError):
        encode_text([("a", "1")])


def test_value_encodings() -> None:
    assert parse_number("8192") == 8192 and parse_number("0x2000") == 8192
    assert parse_number("") is None and parse_number("-1") is None and parse_number("1e3") is None
    assert parse_boolean("Yes") is True and parse_boolean("No") is False
    assert parse_boolean("yes") is None
    assert parse_binary("0x0102ff") == b"\x01\x02\xff" and parse_binary("0X102") == b"\x01\x02"
    assert parse_binary("0bAQL/") == b"\x01\x02\xff" and parse_binary("0BAQL/") == b"\x01\x02\xff"
    for bad in ("0x", "0xzz", "0b", "0b!!", "0bAQ", "1234", "ab"):
        assert parse_binary(bad) is None, bad


# --- negotiation --------------------------------------------------------------------------


def answers(pairs: list[tuple[str, str]], *, policy: KeyPolicy | None = None) -> dict[str, str]:
    return dict(Negotiation(policy or KeyPolicy()).answer(pairs))


@pytest.mark.parametrize(
    ("offer", "policy", "answer", "on"),
    [
        ("CRC32C,None", KeyPolicy(), "CRC32C", True),
        ("None,CRC32C", KeyPolicy(), "None", False),
        ("None", KeyPolicy(), "None", False),
        ("CRC32C", KeyPolicy(header_digests=("None",)), "Reject", False),
        ("X-vendor,CRC32C", KeyPolicy(header_digests=("CRC32C",)), "CRC32C", True),
    ],
)
def test_digests_take_the_first_of_the_initiators_list_we_accept(
    offer: str, policy: KeyPolicy, answer: str, on: bool
) -> None:
    n = Negotiation(policy)
    assert n.answer([("HeaderDigest", offer)]) == [("HeaderDigest", answer)]
    assert n.connection_params().header_digest is on
    assert not n.connection_params().data_digest


@pytest.mark.parametrize(
    ("key", "offer", "answer"),
    [
        ("MaxBurstLength", "16776192", "1048576"),  # minimum; ours is 1 MiB
        ("MaxBurstLength", "4096", "4096"),
        ("FirstBurstLength", "262144", "65536"),
        ("MaxOutstandingR2T", "8", "1"),
        ("MaxConnections", "8", "1"),
        ("DefaultTime2Wait", "0", "2"),  # maximum
        ("DefaultTime2Wait", "10", "10"),
        ("DefaultTime2Retain", "0", "0"),  # minimum
        ("ErrorRecoveryLevel", "2", "0"),  # we offer 0
        ("MaxBurstLength", "511", "Reject"),
        ("MaxBurstLength", "16777216", "Reject"),
        ("DefaultTime2Wait", "3601", "Reject"),
        ("MaxConnections", "0", "Reject"),
        ("MaxConnections", "many", "Reject"),
        ("MaxBurstLength", "0x1000", "4096"),
        ("InitialR2T", "No", "Yes"),  # OR with our Yes
        ("ImmediateData", "Yes", "Yes"),  # AND with our Yes
        ("ImmediateData", "No", "No"),
        ("DataPDUInOrder", "No", "Yes"),
        ("DataSequenceInOrder", "No", "Yes"),
        ("InitialR2T", "maybe", "Reject"),
        ("IFMarker", "Yes", "No"),  # obsolete keys, section 13.25
        ("OFMarker", "No", "No"),
        ("IFMarkInt", "2048~65535", "Reject"),
        ("OFMarkInt", "2048", "Reject"),
        ("TaskReporting", "FastAbort,RFC3720", "RFC3720"),
        ("TaskReporting", "ResponseFence", "Reject"),
        ("iSCSIProtocolLevel", "2", "1"),
        ("X-com.example.Feature", "on", "NotUnderstood"),
        ("FancyNewKey", "1", "NotUnderstood"),
    ],
)
def test_each_key_by_its_rule(key: str, offer: str, answer: str) -> None:
    assert answers([(key, offer)]) == {key: answer}


def test_policy_values_are_ours_in_the_rules() -> None:
    strict = KeyPolicy(
        immediate_data=False, initial_r2t=False, max_burst_length=65536, first_burst_length=512
    )
    assert answers([("ImmediateData", "Yes")], policy=strict) == {"ImmediateData": "No"}
    assert answers([("InitialR2T", "No")], policy=strict) == {"InitialR2T": "No"}
    assert answers([("MaxBurstLength", "262144")], policy=strict) == {"MaxBurstLength": "65536"}


def test_irrelevant_keys() -> None:
    discovery = Negotiation(KeyPolicy())
    discovery.discovery = True
    offers = [
        ("MaxBurstLength", "1024"),
        ("ImmediateData", "No"),
        ("MaxConnections", "2"),
        ("DefaultTime2Wait", "5"),
    ]
    got = dict(discovery.answer(offers))
    assert got == {
        "MaxBurstLength": "Irrelevant",
        "ImmediateData": "Irrelevant",
        "MaxConnections": "Irrelevant",
        "DefaultTime2Wait": "5",
    }
    joining = Negotiation(KeyPolicy(), leading=False)
    got = dict(joining.answer([("InitialR2T", "No"), ("HeaderDigest", "CRC32C")]))
    assert got == {"InitialR2T": "Irrelevant", "HeaderDigest": "CRC32C"}
    assert joining.session_params() is None
    no_unsolicited = KeyPolicy(initial_r2t=True, immediate_data=False)
    assert answers([("FirstBurstLength", "4096")], policy=no_unsolicited) == {
        "FirstBurstLength": "Irrelevant"
    }


def test_max_recv_data_segment_length_is_declared_each_way() -> None:
    n = Negotiation(KeyPolicy(max_recv_data_segment_length=131072))
    assert n.answer([("MaxRecvDataSegmentLength", "65536")]) == []  # declarative: no answer
    assert n.connection_params().max_recv_data_segment_length == 8192  # not declared yet
    assert n.declarations() == [("MaxRecvDataSegmentLength", "131072")]
    assert n.declarations() == []  # once
    params = n.connection_params()
    assert params.max_send_data_segment_length == 65536
    assert params.max_recv_data_segment_length == 131072
    assert Negotiation(KeyPolicy()).connection_params().max_send_data_segment_length == 8192
    assert answers([("MaxRecvDataSegmentLength", "100")]) == {"MaxRecvDataSegmentLength": "Reject"}


def test_session_params_and_the_first_burst_bound() -> None:
    n = Negotiation(KeyPolicy())
    n.answer(
        [("MaxBurstLength", "512"), ("FirstBurstLength", "65536"), ("InitialR2T", "No"),
         ("ImmediateData", "Yes"), ("DefaultTime2Retain", "0")]
    )  # fmt: skip
    s = n.session_params()
    assert s is not None
    assert (s.max_burst_length, s.first_burst_length) == (512, 512)
    assert s.initial_r2t and s.immediate_data and s.default_time2retain == 0
    assert s.error_recovery_level == 0 and s.max_connections == 1
    untouched = Negotiation(KeyPolicy()).session_params()
    assert untouched is not None and untouched.max_burst_length == 262144  # the default


@pytest.mark.parametrize(
    "pairs",
    [
        pytest.param([("MaxBurstLength", "512"), ("MaxBurstLength", "1024")], id="twice"),
        pytest.param([("MaxBurstLength", "Reject")], id="reserved answer as an offer"),
        pytest.param([("HeaderDigest", "NotUnderstood")], id="NotUnderstood as an offer"),
        pytest.param([("TargetAlias", "x")], id="a target's key"),
    ],
)
def test_rule_breaking_offers_fail(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(TextError):
        Negotiation(KeyPolicy()).answer(pairs)


def test_a_key_is_negotiated_once_across_requests() -> None:
    n = Negotiation(KeyPolicy())
    n.answer([("MaxBurstLength", "512")])
    with pytest.raises(TextError, match="twice"):
        n.answer([("MaxBurstLength", "512")])


def test_we_offer_what_a_default_would_get_wrong() -> None:
    assert Negotiation(KeyPolicy()).completion_offers() == []
    policy = KeyPolicy(
        header_digests=("CRC32C",), immediate_data=False, max_burst_length=65536,
        first_burst_length=4096,
    )  # fmt: skip
    n = Negotiation(policy)
    offers = dict(n.completion_offers())
    assert offers == {
        "HeaderDigest": "CRC32C",
        "ImmediateData": "No",
        "MaxBurstLength": "65536",
        "FirstBurstLength": "4096",
    }
    assert n.awaiting_answers
    assert n.answer(
        [("HeaderDigest", "CRC32C"), ("ImmediateData", "No"), ("MaxBurstLength", "8192"),
         ("FirstBurstLength", "4096")]
    ) == []  # fmt: skip
    assert not n.awaiting_answers and n.unmet() is None
    s = n.session_params()
    assert s is not None and not s.immediate_data and s.max_burst_length == 8192
    assert n.connection_params().header_digest
    # A discovery session is not asked what it does not use.
    d = Negotiation(policy)
    d.discovery = True
    assert dict(d.completion_offers()) == {"HeaderDigest": "CRC32C"}


@pytest.mark.parametrize(
    ("key", "answer"),
    [
        ("HeaderDigest", "None"),
        ("HeaderDigest", "Reject"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "70000"),
        ("MaxBurstLength", "NotUnderstood"),
    ],
)
def test_answers_to_our_offers_must_follow_the_rule(key: str, answer: str) -> None:
    policy = KeyPolicy(header_digests=("CRC32C",), immediate_data=False, max_burst_length=65536)
    n = Negotiation(policy)
    n.completion_offers()
    with pytest.raises(TextError):
        n.answer([(key, answer)])


def test_a_required_digest_refused_is_unmet() -> None:
    n = Negotiation(KeyPolicy(data_digests=("CRC32C",)))
    assert n.answer([("DataDigest", "None")]) == [("DataDigest", "Reject")]
    assert n.completion_offers() == []  # settled already: not offered again
    assert n.unmet() == "DataDigest None is not acceptable"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"header_digests": ()},
        {"data_digests": ("MD5",)},
        {"header_digests": ("None", "None")},
        {"max_burst_length": 100},
        {"first_burst_length": 2048, "max_burst_length": 1024},
        {"max_recv_data_segment_length": 1 << 24},
        {"max_connections": 0},
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        KeyPolicy(**kwargs)  # type: ignore[arg-type]
