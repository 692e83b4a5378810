"""The order of a link's frames (``link.handshake``), on its own: no I/O.

Every frame received at every step of either end is either taken (and moves the link as the
table says) or refused with the code that end has always answered with; the two walks of the
handshake, with and without a key, go through ``state.transition``.
"""

from __future__ import annotations

import pytest

from blockmirror.journal.format import Kind, RecordHeader
from blockmirror.journal.lineage import Lineage
from blockmirror.link.handshake import ACCEPTS, End, HandshakeOrder, OutOfOrder
from blockmirror.link.protocol import (
    PROTOCOL_VERSION,
    Ack,
    AuthClient,
    AuthServer,
    Heartbeat,
    Hello,
    Message,
    Record,
    Records,
    Refuse,
    Regions,
    SyncData,
    SyncDone,
    SyncStart,
    SyncZero,
    Welcome,
)
from blockmirror.state import HandshakeStep, Role, StateTransitionError

LINEAGE_A = Lineage("a", Role.PRIMARY, (("1" * 32, 1, "a"),), 0)
LINEAGE_B = Lineage("b", Role.SECONDARY, (("1" * 32, 1, "a"),), 0)

ONE_OF_EACH: list[Message] = [
    Hello(PROTOCOL_VERSION, "a", "vol", "1" * 32, 4096, "0" * 64, "none", lineage=LINEAGE_A),
    AuthServer("0" * 64, "0" * 64),
    AuthClient("0" * 64),
    Welcome(PROTOCOL_VERSION, "b", 0, 0, True, None, lineage=LINEAGE_B, diverged_frames=1),
    Refuse("busy", "taken"),
    Records((Record(RecordHeader(Kind.FLUSH, 1, 0, 0, 0, 0, 0), memoryview(b"")),)),
    Ack(1, 1, 0),
    Heartbeat(1, 0),
    SyncStart(1, True, 0, 0),
    SyncData(2, 0, 0, memoryview(b"x")),
    SyncDone(3, 0),
    SyncZero(2, 0, 4096, 0),
    Regions(((0, 4096),)),
]

# The step a taken frame leaves the link in.
AFTER: dict[type, HandshakeStep] = {AuthServer: HandshakeStep.AUTH, Welcome: HandshakeStep.WELCOME}


def at(end: End, step: HandshakeStep) -> HandshakeOrder:
    order = HandshakeOrder(end)
    order.step = step
    return order


CASES = [
    (end, step, message)
    for end in End
    for step in HandshakeStep
    for message in ONE_OF_EACH
    if step is not HandshakeStep.CLOSED
]


@pytest.mark.parametrize(("end", "step", "message"), CASES)
def test_every_frame_at_every_step(end: End, step: HandshakeStep, message: Message) -> None:
    order = at(end, step)
    accepts = ACCEPTS[end].get(step)
    if accepts is None:
        # A step at which this end sends: nothing may arrive.
        with pytest.raises(OutOfOrder) as caught:
            order.received(message)
        assert caught.value.code is None
        return
    if isinstance(message, Refuse) and accepts.refusal_ends:
        assert order.received(message) is message
        assert order.step is HandshakeStep.CLOSED
    elif type(message) in accepts.frames:
        assert order.received(message) is None
        assert order.step is AFTER.get(type(message), step)
    else:
        with pytest.raises(OutOfOrder) as caught:
            order.received(message)
        assert caught.value.code == accepts.code
        assert order.step is step  # a refused frame moves nothing


def test_the_refusals_are_those_each_end_always_gave() -> None:
    def misfit(end: End, step: HandshakeStep, message: Message) -> tuple[str | None, str]:
        with pytest.raises(OutOfOrder) as caught:
            at(end, step).received(message)
        return caught.value.code, caught.value.reason

    hello, welcome, ack = ONE_OF_EACH[0], ONE_OF_EACH[3], ONE_OF_EACH[6]
    assert misfit(End.SECONDARY, HandshakeStep.HELLO, ack) == (
        "bad-frame",
        "expected HELLO, got Ack",
    )
    assert misfit(End.SECONDARY, HandshakeStep.AUTH, welcome) == ("auth", "expected AUTH_CLIENT")
    assert misfit(End.SECONDARY, HandshakeStep.STREAM, hello) == ("bad-frame", "unexpected Hello")
    assert misfit(End.SOURCE, HandshakeStep.HELLO, ack) == (None, "expected WELCOME, got Ack")
    assert misfit(End.SOURCE, HandshakeStep.STREAM, welcome) == (
        None,
        "unexpected Welcome from secondary",
    )
    # The secondary answers a REFUSE in its handshake as a frame out of place.
    assert misfit(End.SECONDARY, HandshakeStep.HELLO, Refuse("x", "y"))[0] == "bad-frame"
    assert misfit(End.SECONDARY, HandshakeStep.AUTH, Refuse("x", "y"))[0] == "auth"


def test_regions_reach_only_a_streaming_source() -> None:
    regions = ONE_OF_EACH[-1]
    assert isinstance(regions, Regions)
    # The source takes the REGIONS its WELCOME announced once it streams; they move nothing.
    source = at(End.SOURCE, HandshakeStep.STREAM)
    assert source.received(regions) is None
    assert source.streaming
    # Before it streams (the WELCOME not yet checked), they are out of place.
    for step in (HandshakeStep.HELLO, HandshakeStep.AUTH, HandshakeStep.WELCOME):
        with pytest.raises(OutOfOrder) as caught:
            at(End.SOURCE, step).received(regions)
        assert caught.value.code is None
    # A secondary never receives one: bad-frame, as any frame out of place.
    with pytest.raises(OutOfOrder) as caught:
        at(End.SECONDARY, HandshakeStep.STREAM).received(regions)
    assert (caught.value.code, caught.value.reason) == ("bad-frame", "unexpected Regions")
    # Sending them moves neither end.
    secondary = at(End.SECONDARY, HandshakeStep.WELCOME)
    secondary.sent(regions)
    assert secondary.step is HandshakeStep.WELCOME


def steps(*orders: HandshakeOrder) -> set[HandshakeStep]:
    return {order.step for order in orders}


def test_the_walk_with_a_key() -> None:
    source, secondary = HandshakeOrder(End.SOURCE), HandshakeOrder(End.SECONDARY)
    hello, auth_server, auth_client, welcome = ONE_OF_EACH[:4]
    source.sent(hello)
    secondary.received(hello)
    assert steps(source, secondary) == {HandshakeStep.HELLO}
    secondary.sent(auth_server)
    source.received(auth_server)
    assert steps(source, secondary) == {HandshakeStep.AUTH}
    source.sent(auth_client)
    secondary.received(auth_client)
    secondary.sent(welcome)
    source.received(welcome)
    assert steps(source, secondary) == {HandshakeStep.WELCOME}
    for order in (source, secondary):
        order.enter(HandshakeStep.STREAM)
        assert order.streaming
        order.sent(Refuse("internal", "bye"))
        assert order.closed


def test_the_walk_without_a_key_skips_the_proofs() -> None:
    source, secondary = HandshakeOrder(End.SOURCE), HandshakeOrder(End.SECONDARY)
    secondary.received(ONE_OF_EACH[0])
    secondary.sent(ONE_OF_EACH[3])
    source.received(ONE_OF_EACH[3])
    assert steps(source, secondary) == {HandshakeStep.WELCOME}


def test_moves_the_table_lacks_are_refused() -> None:
    order = at(End.SECONDARY, HandshakeStep.STREAM)
    with pytest.raises(StateTransitionError):
        order.sent(ONE_OF_EACH[1])  # an AUTH_SERVER once streaming: a bug of ours
    order = at(End.SOURCE, HandshakeStep.HELLO)
    with pytest.raises(StateTransitionError):
        order.enter(HandshakeStep.STREAM)  # streaming before any WELCOME
    order.close()
    order.close()  # closing twice is no move
    assert order.closed
    with pytest.raises(StateTransitionError):
        order.enter(HandshakeStep.HELLO)
