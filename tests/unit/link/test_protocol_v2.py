"""Link protocol version 2 (issue 9): lineages in HELLO, WELCOME and REFUSE, the refusals of
direction, and the REGIONS frame. The layout is pinned to docs/link-protocol.md.

As in test_protocol.py, frames the codec must refuse are built with ``json``, ``struct`` and
``crc32c`` directly, never with the encoders under test.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.errors import ProtocolError
from blockmirror.journal.lineage import MAX_LINEAGE, Lineage
from blockmirror.link.protocol import (
    AUTH_NONE,
    HANDSHAKE_FRAMES,
    MAX_DIVERGED_FRAMES,
    MAX_JSON,
    MAX_REGIONS,
    MAX_UNIT_NAME,
    PROTOCOL_VERSION,
    FrameType,
    Hello,
    LinkCodec,
    Message,
    Refuse,
    RefuseCode,
    Regions,
    VersionError,
    Welcome,
    encode,
    regions_frames,
)
from blockmirror.state import Role
from tests.unit.link.test_protocol import (
    GEN_A,
    HELLO,
    LINEAGE,
    WELCOME,
    assert_refused,
    decode,
    frame,
    header_only,
    hellos,
    join,
    json_frame,
    json_values,
    lineage,
    lineages,
    refused,
    refuses,
    regions_messages,
    welcomes,
    with_,
    without,
)

U64_MAX = 2**64 - 1
GEN_B = "b2" * 16
GEN_C = "c3" * 16

REFUSE = {
    "code": "split-brain",
    "message": "both took writes",
    "unit": "site-c",
    "lineage": LINEAGE,
    "common_seq": 7,
    "diverged_bytes": 1 << 20,
}


def regions_payload(*pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack("<QQ", offset, length) for offset, length in pairs)


def round_trip(message: Message) -> Message:
    [decoded] = decode(join(encode(message)))
    return decoded


# --- the version ----------------------------------------------------------------------------------


def test_this_is_version_2() -> None:
    assert PROTOCOL_VERSION == 2


V1_HELLO = without(with_(HELLO, protocol=1), "lineage")
V1_WELCOME = without(with_(WELCOME, protocol=1), "lineage")


@pytest.mark.parametrize(
    ("frame_type", "obj"), [(FrameType.HELLO, V1_HELLO), (FrameType.WELCOME, V1_WELCOME)]
)
def test_a_version_1_peer_is_a_version_mismatch(frame_type: int, obj: dict[str, object]) -> None:
    # A version-1 peer sends every version-1 key but no lineage: a VersionError (so the
    # receiver answers REFUSE "version"), not a bad frame.
    err = refused(json_frame(frame_type, obj))
    assert isinstance(err, VersionError) and err.version == 1
    assert "version 1, this unit speaks 2" in str(err)
    assert "missing key 'lineage'" in str(err)


@pytest.mark.parametrize(
    ("frame_type", "obj"), [(FrameType.HELLO, HELLO), (FrameType.WELCOME, WELCOME)]
)
def test_lineage_is_required_in_version_2(frame_type: int, obj: dict[str, object]) -> None:
    err = refused(json_frame(frame_type, without(obj, "lineage")))
    assert "missing key 'lineage'" in str(err)
    assert not isinstance(err, VersionError)
    err = refused(json_frame(frame_type, with_(obj, lineage=None)))
    assert "'lineage' must be an object, not NoneType" in str(err)


def test_a_version_2_hello_or_welcome_cannot_be_encoded_without_a_lineage() -> None:
    with pytest.raises(ValueError, match="missing key 'lineage'"):
        encode(Hello(2, "a", "v", "id", 1, "00" * 32, AUTH_NONE))
    with pytest.raises(ValueError, match="missing key 'lineage'"):
        encode(Welcome(2, "b", 0, 0, True, None))


# --- HELLO and WELCOME ----------------------------------------------------------------------------


def test_hello_carries_the_lineage_and_the_source() -> None:
    hello = Hello(
        2, "site-b", "db", "j-1", 4096, "ab" * 32, AUTH_NONE, lineage=lineage("site-b"),
        source="site-a",
    )  # fmt: skip
    wire = json.loads(join(encode(hello))[16:])
    # The lineage's unit is not inside it: it is the frame's own unit.
    assert wire["lineage"] == LINEAGE
    assert wire["unit"] == "site-b"
    assert wire["source"] == "site-a"
    assert round_trip(hello) == hello
    # Without a source the key is absent, and absent or null decodes as None.
    plain = Hello(2, "site-b", "db", "j-1", 4096, "ab" * 32, AUTH_NONE, lineage=lineage("site-b"))
    assert "source" not in json.loads(join(encode(plain))[16:])
    [decoded] = decode(json_frame(FrameType.HELLO, with_(HELLO, source=None)))
    assert isinstance(decoded, Hello) and decoded.source is None
    assert_refused(
        json_frame(FrameType.HELLO, with_(HELLO, source=7)), "'source' must be a string, not int"
    )


def test_the_decoded_lineage_belongs_to_the_frames_unit() -> None:
    [hello] = decode(json_frame(FrameType.HELLO, with_(HELLO, unit="elsewhere")))
    assert isinstance(hello, Hello) and hello.lineage is not None
    assert hello.lineage.unit == "elsewhere"
    [welcome] = decode(json_frame(FrameType.WELCOME, WELCOME))
    assert isinstance(welcome, Welcome) and welcome.lineage == lineage("site-b")


def test_a_lineage_of_another_unit_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="its lineage is unit 'x', the frame's unit is 'a'"):
        encode(Hello(2, "a", "v", "id", 1, "00" * 32, AUTH_NONE, lineage=lineage("x")))
    with pytest.raises(ValueError, match="its lineage is unit 'x'"):
        encode(Welcome(2, "b", 0, 0, True, None, lineage=lineage("x")))


def test_welcome_announces_its_regions_frames() -> None:
    welcome = Welcome(2, "site-b", 9, 9, True, "j-1", None, lineage("site-b"), 3)
    assert json.loads(join(encode(welcome))[16:])["diverged_frames"] == 3
    assert round_trip(welcome) == welcome
    # 0 is the default: not sent, and an absent or null key reads as 0.
    none = Welcome(2, "site-b", 9, 9, True, "j-1", None, lineage("site-b"))
    assert "diverged_frames" not in json.loads(join(encode(none))[16:])
    for obj in (WELCOME, with_(WELCOME, diverged_frames=None)):
        [decoded] = decode(json_frame(FrameType.WELCOME, obj))
        assert isinstance(decoded, Welcome) and decoded.diverged_frames == 0
    [most] = decode(json_frame(FrameType.WELCOME, with_(WELCOME, diverged_frames=1_000_000)))
    assert isinstance(most, Welcome) and most.diverged_frames == MAX_DIVERGED_FRAMES == 1_000_000


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (MAX_DIVERGED_FRAMES + 1, "'diverged_frames' = 1000001 is more than 1000000"),
        (U64_MAX, "is more than 1000000"),
        (-1, "'diverged_frames' = -1 is outside"),
        (True, "'diverged_frames' must be an integer, not bool"),
        (1.0, "'diverged_frames' must be an integer, not float"),
        ("2", "'diverged_frames' must be an integer, not str"),
    ],
)
def test_welcome_diverged_frames_is_checked(value: object, reason: str) -> None:
    assert_refused(json_frame(FrameType.WELCOME, with_(WELCOME, diverged_frames=value)), reason)


@pytest.mark.parametrize("value", [MAX_DIVERGED_FRAMES + 1, -1, True])
def test_welcome_diverged_frames_is_checked_on_encode(value: int) -> None:
    with pytest.raises(ValueError, match="diverged_frames"):
        encode(Welcome(2, "b", 0, 0, True, None, None, lineage("b"), value))


@given(hellos())
def test_hello_round_trip(hello: Hello) -> None:
    assert round_trip(hello) == hello


@given(welcomes())
def test_welcome_round_trip(welcome: Welcome) -> None:
    assert round_trip(welcome) == welcome


# --- lineage validation ---------------------------------------------------------------------------


def lineage_with(**changes: object) -> dict[str, object]:
    return with_(LINEAGE, **changes)


def gens(*entries: object) -> dict[str, object]:
    return lineage_with(generations=list(entries))


BAD_LINEAGES = [
    (lineage_with(role="boss"), "'role' is 'boss', expected one of 'primary', 'secondary'"),
    (lineage_with(role="PRIMARY"), "'role' is 'PRIMARY'"),
    (lineage_with(role=1), "'role' must be a string, not int"),
    (without(LINEAGE, "role"), "missing key 'role'"),
    (without(LINEAGE, "generations"), "missing key 'generations'"),
    (lineage_with(generations={}), "'generations' must be a list, not dict"),
    (lineage_with(generations=None), "'generations' must be a list, not NoneType"),
    (
        lineage_with(generations=[[f"{i:032x}", i + 1, "u"] for i in range(MAX_LINEAGE + 1)]),
        f"'generations' holds {MAX_LINEAGE + 1} entries, at most {MAX_LINEAGE}",
    ),
    (gens(GEN_A), r"generation 0 must be \[id, start_seq, unit\], not str"),
    (gens({"id": GEN_A}), r"generation 0 must be \[id, start_seq, unit\], not dict"),
    (gens([GEN_A, 1]), "generation 0 must be .*, not a list of 2"),
    (gens([GEN_A, 1, "u", 0]), "generation 0 must be .*, not a list of 4"),
    (gens([GEN_A.upper(), 1, "u"]), "generation 0 id must be 32 lowercase hex"),
    (gens([GEN_A[:-2], 1, "u"]), "generation 0 id must be 32 lowercase hex"),
    (gens([GEN_A + "00", 1, "u"]), "generation 0 id must be 32 lowercase hex"),
    (gens(["zz" * 16, 1, "u"]), "generation 0 id must be 32 lowercase hex"),
    (gens(["\u0661" * 32, 1, "u"]), "generation 0 id must be 32 lowercase hex"),
    (gens([7, 1, "u"]), "generation 0 id must be a string, not int"),
    (gens([GEN_A, True, "u"]), "generation 0 start_seq must be an integer, not bool"),
    (gens([GEN_A, 1.0, "u"]), "generation 0 start_seq must be an integer, not float"),
    (gens([GEN_A, "1", "u"]), "generation 0 start_seq must be an integer, not str"),
    (gens([GEN_A, 0, "u"]), r"generation 0 start_seq = 0 is outside 1\.\.2\*\*64-1"),
    (gens([GEN_A, -1, "u"]), "generation 0 start_seq = -1 is outside"),
    (gens([GEN_A, 2**64, "u"]), "generation 0 start_seq = 18446744073709551616 is outside"),
    (gens([GEN_A, 1, ""]), "generation 0 unit is 0 characters long, expected 1..255"),
    (gens([GEN_A, 1, "u" * 256]), "generation 0 unit is 256 characters long, expected 1..255"),
    (gens([GEN_A, 1, None]), "generation 0 unit must be a string, not NoneType"),
    (gens([GEN_A, 1, "\ud800"]), "generation 0 unit holds a lone surrogate"),
    (
        gens([GEN_A, 5, "u"], [GEN_B, 4, "u"]),
        r"generation 1 starts at seq 4, before generation 0 \(seq 5\)",
    ),
    (gens([GEN_A, 1, "u"], [GEN_B, 2, "u"], [GEN_A, 3, "u"]), f"generation 2 repeats id {GEN_A}"),
    (gens([GEN_A, 1, "u"], [GEN_B, 2, "u"], [GEN_B, 3, "v"]), f"generation 2 repeats id {GEN_B}"),
    (without(LINEAGE, "end_seq"), "missing key 'end_seq'"),
    (lineage_with(end_seq=True), "'end_seq' must be an integer, not bool"),
    (lineage_with(end_seq=-1), "'end_seq' = -1 is outside 0..2"),
    (lineage_with(end_seq=2**64), "'end_seq' = 18446744073709551616 is outside"),
    (without(LINEAGE, "lost_tail"), "missing key 'lost_tail'"),
    (lineage_with(lost_tail=0), "'lost_tail' must be a boolean, not int"),
    (lineage_with(lost_tail="false"), "'lost_tail' must be a boolean, not str"),
    (lineage_with(lost_tail=None), "'lost_tail' must be a boolean, not NoneType"),
]

FRAMES: dict[int, dict[str, object]] = {
    FrameType.HELLO: HELLO,
    FrameType.WELCOME: WELCOME,
    FrameType.REFUSE: REFUSE,
}


@pytest.mark.parametrize("frame_type", list(FRAMES))
@pytest.mark.parametrize(("bad", "reason"), BAD_LINEAGES)
def test_a_bad_lineage_is_refused(frame_type: int, bad: dict[str, object], reason: str) -> None:
    payload = json.dumps(with_(FRAMES[frame_type], lineage=bad)).encode()
    assert len(payload) <= MAX_JSON
    err = assert_refused(frame(frame_type, payload), f"'lineage': {reason}")
    assert not isinstance(err, VersionError)
    assert str(err).startswith(f"{FrameType(frame_type).name} frame: ")


def test_what_a_lineage_may_hold() -> None:
    edge = lineage_with(
        role="demoted",
        generations=[
            [GEN_A, 1, "u" * MAX_UNIT_NAME],
            [GEN_B, 1, "é"],  # two promotes with no write between them start at one seq
            [GEN_C, U64_MAX, "site-c"],
        ],
        end_seq=U64_MAX,
        lost_tail=True,
        future_key=[1, 2],  # unknown keys are ignored, inside the lineage too
    )
    [hello] = decode(json_frame(FrameType.HELLO, with_(HELLO, lineage=edge)))
    assert isinstance(hello, Hello)
    assert hello.lineage == Lineage(
        "site-a",
        Role.DEMOTED,
        ((GEN_A, 1, "u" * 255), (GEN_B, 1, "é"), (GEN_C, U64_MAX, "site-c")),
        U64_MAX,
        True,
    )
    empty = lineage_with(role="secondary", generations=[], end_seq=0)
    [welcome] = decode(json_frame(FrameType.WELCOME, with_(WELCOME, lineage=empty)))
    assert isinstance(welcome, Welcome)
    assert welcome.lineage == Lineage("site-b", Role.SECONDARY, (), 0, False)


def test_a_whole_lineage_fits_a_frame_with_ordinary_unit_names() -> None:
    long = Lineage(
        "site-a",
        Role.PRIMARY,
        tuple((f"{i:032x}", 2**63 + i, f"unit-{i % 7:0>58}") for i in range(MAX_LINEAGE)),
        U64_MAX,
    )
    hello = Hello(2, "site-a", "db", "j-1", 4096, "ab" * 32, AUTH_NONE, lineage=long)
    assert round_trip(hello) == hello


def test_a_lineage_too_big_for_a_frame_is_refused_on_encode() -> None:
    # 256 generations begun by units of 255 characters do not fit 64 KiB of JSON: encode
    # refuses rather than sending a frame the peer cannot take.
    huge = Lineage(
        "a",
        Role.PRIMARY,
        tuple((f"{i:032x}", i + 1, "u" * MAX_UNIT_NAME) for i in range(MAX_LINEAGE)),
        0,
    )
    with pytest.raises(ValueError, match=f"at most {MAX_JSON}"):
        encode(Hello(2, "a", "v", "id", 1, "00" * 32, AUTH_NONE, lineage=huge))


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (Lineage("a", "boss", (), 0), "'role' is 'boss'"),  # type: ignore[arg-type]
        (Lineage("a", Role.PRIMARY, (("A" * 32, 1, "a"),), 0), "id must be 32 lowercase"),
        (Lineage("a", Role.PRIMARY, ((GEN_A, True, "a"),), 0), "not bool"),
        (Lineage("a", Role.PRIMARY, ((GEN_A, 0, "a"),), 0), "start_seq = 0 is outside"),
        (Lineage("a", Role.PRIMARY, ((GEN_A, 1, ""),), 0), "unit is 0 characters"),
        (Lineage("a", Role.PRIMARY, ((GEN_A, 2, "a"), (GEN_B, 1, "a")), 0), "starts at seq 1"),
        (Lineage("a", Role.PRIMARY, ((GEN_A, 1, "a"), (GEN_A, 2, "a")), 0), "repeats id"),
        (Lineage("a", Role.PRIMARY, (), -1), "'end_seq' = -1"),
        (Lineage("a", Role.PRIMARY, (), 0, 1), "'lost_tail' must be a boolean"),  # type: ignore[arg-type]
    ],
)
def test_encode_refuses_a_lineage_the_decoder_would(bad: Lineage, reason: str) -> None:
    for message in (
        Hello(2, "a", "v", "id", 1, "00" * 32, AUTH_NONE, lineage=bad),
        Refuse("split-brain", "m", bad),
    ):
        with pytest.raises(ValueError, match=reason):
            encode(message)


LINEAGE_KEYS = ["role", "generations", "end_seq", "lost_tail"]


@given(
    st.sampled_from(list(FRAMES)),
    st.sampled_from(LINEAGE_KEYS),
    json_values,
    st.lists(json_values, max_size=4),
)
def test_lineage_fuzz_raises_only_protocol_error(
    frame_type: int, key: str, value: object, entry: list[object]
) -> None:
    # A valid frame whose lineage has one field replaced, or one generation entry replaced.
    for bad in (lineage_with(**{key: value}), gens([GEN_A, 1, "u"], entry)):
        codec = LinkCodec()
        codec.feed(json_frame(frame_type, with_(FRAMES[frame_type], lineage=bad)))
        with contextlib.suppress(ProtocolError):
            list(codec.events())


@given(lineages(max_generations=MAX_LINEAGE))
def test_lineage_round_trip_in_every_frame(line: Lineage) -> None:
    hello = Hello(2, line.unit, "v", "id", 1, "00" * 32, AUTH_NONE, lineage=line)
    welcome = Welcome(2, line.unit, 0, 0, True, None, lineage=line)
    refuse = Refuse("superseded", "follow", line)
    for message in (hello, welcome, refuse):
        assert round_trip(message) == message


# --- REFUSE ---------------------------------------------------------------------------------------


def test_the_refusals_of_direction() -> None:
    assert str(RefuseCode.SPLIT_BRAIN) == "split-brain"
    assert str(RefuseCode.SUPERSEDED) == "superseded"
    assert str(RefuseCode.UPSTREAM) == "upstream"
    assert str(RefuseCode.UNRELATED) == "unrelated"


def test_refuse_with_extras_round_trips() -> None:
    refuse = Refuse("split-brain", "both took writes", lineage("site-c"), 7, 1 << 20)
    assert json.loads(join(encode(refuse))[16:]) == REFUSE
    assert round_trip(refuse) == refuse
    [decoded] = decode(json_frame(FrameType.REFUSE, REFUSE))
    assert decoded == refuse


def test_refuse_from_an_older_peer_has_no_extras() -> None:
    refuse = Refuse("busy", "taken")  # positional, as version 1 built it
    assert json.loads(join(encode(refuse))[16:]) == {"code": "busy", "message": "taken"}
    [decoded] = decode(json_frame(FrameType.REFUSE, {"code": "busy", "message": "taken"}))
    assert decoded == refuse
    assert isinstance(decoded, Refuse)
    assert (decoded.lineage, decoded.common_seq, decoded.diverged_bytes) == (None, None, None)
    # Null extras are absent ones; a unit without a lineage is ignored.
    nulls = {"code": "busy", "message": "taken", "lineage": None, "common_seq": None, "unit": "x"}
    assert decode(json_frame(FrameType.REFUSE, nulls)) == [refuse]


def test_refuse_extras_may_come_alone() -> None:
    refuse = Refuse("upstream", "I send to you", lineage("site-b"))
    assert round_trip(refuse) == refuse
    counts = Refuse("split-brain", "m", None, 0, 0)
    assert json.loads(join(encode(counts))[16:]) == {
        "code": "split-brain",
        "message": "m",
        "common_seq": 0,
        "diverged_bytes": 0,
    }
    assert round_trip(counts) == counts


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (without(REFUSE, "unit"), "missing key 'unit'"),
        (with_(REFUSE, unit=3), "'unit' must be a string, not int"),
        (with_(REFUSE, lineage=[]), "'lineage' must be an object, not list"),
        (with_(REFUSE, common_seq=True), "'common_seq' must be an integer, not bool"),
        (with_(REFUSE, common_seq=-1), "'common_seq' = -1 is outside"),
        (with_(REFUSE, diverged_bytes="1"), "'diverged_bytes' must be an integer, not str"),
        (with_(REFUSE, diverged_bytes=2**64), "'diverged_bytes' = 18446744073709551616"),
    ],
)
def test_refuse_extras_are_checked(obj: dict[str, object], reason: str) -> None:
    assert_refused(json_frame(FrameType.REFUSE, obj), reason)


@given(refuses())
def test_refuse_round_trip(refuse: Refuse) -> None:
    assert round_trip(refuse) == refuse


# --- REGIONS --------------------------------------------------------------------------------------


def test_regions_layout_matches_the_doc() -> None:
    assert int(FrameType.REGIONS) == 14
    message = Regions(((0, 4096), (4096, 512), (1 << 40, 1 << 20)))
    payload = regions_payload((0, 4096), (4096, 512), (1 << 40, 1 << 20))
    assert len(payload) == 48
    assert join(encode(message)) == frame(14, payload)
    assert decode(frame(14, payload)) == [message]


def test_frame_type_13_is_still_no_frame() -> None:
    # 13 is the sealed record's envelope; a frame of that type is unknown.
    assert 13 not in set(FrameType)
    assert_refused(frame(13, b""), "unknown frame type 13")


@given(regions_messages())
def test_regions_round_trip(message: Regions) -> None:
    assert round_trip(message) == message


@pytest.mark.parametrize(
    ("pairs", "reason"),
    [
        (((0, 0),), "region 0 at offset 0 is empty"),
        (((0, 4096), (8192, 0)), "region 1 at offset 8192 is empty"),
        (((0, 4096), (4095, 10)), r"region 1 at offset 4095 starts before the end of region 0"),
        (((4096, 4096), (0, 10)), "region 1 at offset 0 starts before the end of region 0"),
        (((0, 10), (0, 10)), "region 1 at offset 0 starts before"),
        (((100, 10), (200, 10), (150, 10)), "region 2 at offset 150 starts before"),
        (((1, U64_MAX),), r"region 0 \(1 \+ 18446744073709551615 bytes\) ends past 2\*\*64-1"),
        (((U64_MAX, 1),), "region 0 .* ends past 2\\*\\*64-1"),
        (((U64_MAX, U64_MAX),), "ends past"),
    ],
)
def test_bad_regions_are_refused(pairs: tuple[tuple[int, int], ...], reason: str) -> None:
    err = assert_refused(frame(FrameType.REGIONS, regions_payload(*pairs)), reason)
    assert str(err).startswith("REGIONS frame: ")
    with pytest.raises(ValueError, match=reason):
        encode(Regions(pairs))


def test_regions_at_the_edges_are_accepted() -> None:
    # Touching regions, and one that ends exactly at 2**64-1.
    message = Regions(((0, 1), (1, 1), (2, U64_MAX - 2)))
    assert decode(frame(FrameType.REGIONS, regions_payload(*message.extents))) == [message]
    assert round_trip(message) == message


@pytest.mark.parametrize("length", [0, 1, 8, 15, 17, 40, MAX_REGIONS * 16 + 16])
def test_regions_lengths_are_checked_on_the_header(length: int) -> None:
    codec = LinkCodec()
    codec.feed(header_only(FrameType.REGIONS, length))
    with pytest.raises(ProtocolError, match=f"REGIONS frame .*{length}"):
        codec.next_event()


def test_the_largest_regions_frame() -> None:
    pairs = tuple((2 * i, 1) for i in range(MAX_REGIONS))
    data = join(encode(Regions(pairs)))
    assert len(data) == 16 + 1024 * 1024
    assert decode(data) == [Regions(pairs)]
    with pytest.raises(ValueError, match=f"1..{MAX_REGIONS} regions, not {MAX_REGIONS + 1}"):
        encode(Regions((*pairs, (2 * MAX_REGIONS, 1))))
    with pytest.raises(ValueError, match="not 0"):
        encode(Regions(()))


@pytest.mark.parametrize("pair", [(-1, 1), (0, -1), (2**64, 1)])
def test_regions_out_of_range_are_refused_on_encode(pair: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="out of range"):
        encode(Regions((pair,)))


def test_regions_are_not_a_handshake_frame() -> None:
    assert int(FrameType.REGIONS) not in HANDSHAKE_FRAMES
    codec = LinkCodec()
    codec.restrict(HANDSHAKE_FRAMES, MAX_JSON)
    codec.feed(join(encode(Regions(((0, 1),)))))
    with pytest.raises(ProtocolError, match="REGIONS frame is not allowed here"):
        codec.next_event()


def test_regions_follow_a_welcome_on_one_stream() -> None:
    frames = regions_frames([(0, 4096), (1 << 30, 4096)])
    welcome = Welcome(2, "b", 5, 5, True, "j", None, lineage("b"), len(frames))
    data = join(encode(welcome)) + b"".join(join(encode(f)) for f in frames)
    codec = LinkCodec()
    codec.restrict(HANDSHAKE_FRAMES, MAX_JSON)
    codec.feed(data)
    assert codec.next_event() == welcome
    codec.restrict(None)  # the source streams once it has checked the WELCOME
    assert list(codec.events()) == frames


# --- regions_frames -------------------------------------------------------------------------------


def test_regions_frames_merges_and_splits() -> None:
    assert regions_frames([]) == []
    assert regions_frames([(0, 0)]) == []
    assert regions_frames([(8192, 10), (0, 4096), (4096, 100), (5, 0), (8195, 2)]) == [
        Regions(((0, 4196), (8192, 10)))
    ]
    many = [(3 * i, 1) for i in range(2 * MAX_REGIONS + 5)]
    frames = regions_frames(many)
    assert [len(f.extents) for f in frames] == [MAX_REGIONS, MAX_REGIONS, 5]
    assert [e for f in frames for e in f.extents] == many


@pytest.mark.parametrize("pair", [(-1, 1), (0, -1), (1, U64_MAX)])
def test_regions_frames_refuses_regions_out_of_range(pair: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        regions_frames([pair])


@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 1 << 12)), max_size=40))
def test_regions_frames_carry_the_union(extents: list[tuple[int, int]]) -> None:
    frames = regions_frames(extents)
    covered: set[int] = set()
    for offset, length in extents:
        covered.update(range(offset, offset + length))
    carried: set[int] = set()
    for message in frames:
        assert round_trip(message) == message  # every frame is one the decoder takes
        for offset, length in message.extents:
            carried.update(range(offset, offset + length))
    assert carried == covered
    pairs = [e for f in frames for e in f.extents]
    # Merged: no two carried regions touch.
    assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(pairs))


# --- every v2 frame at once -----------------------------------------------------------------------


@given(st.lists(hellos() | welcomes() | refuses() | regions_messages(), min_size=1, max_size=3))
def test_v2_frames_back_to_back(batch: list[Message]) -> None:
    data = b"".join(join(encode(m)) for m in batch)
    assert decode(data, cuts=[len(data) // 3, len(data) // 2]) == batch


def test_every_v2_reason_names_its_frame() -> None:
    # A decoding error says which frame it was in (as every other frame's does).
    bad = json_frame(FrameType.WELCOME, with_(WELCOME, lineage=lineage_with(role="x")))
    assert re.match(r"WELCOME frame: 'lineage': 'role' is 'x'", str(refused(bad)))
