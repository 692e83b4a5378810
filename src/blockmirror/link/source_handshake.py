"""The source's side of a link's handshake: HELLO, the pre-shared-key proofs both ways when a
key is set (and sealing, without TLS), the WELCOME, and the REGIONS that follow it.

The order is :mod:`blockmirror.link.handshake`'s: whatever else arrives is refused there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blockmirror.errors import BlockmirrorError, ProtocolError
from blockmirror.journal.lineage import fixed_lineage
from blockmirror.link import auth
from blockmirror.link.compression import DECODABLE
from blockmirror.link.protocol import (
    PROTOCOL_VERSION,
    AuthClient,
    AuthServer,
    Hello,
    Regions,
    Welcome,
)
from blockmirror.link.session import LinkRefused, LinkSession
from blockmirror.link.session_crypto import CHACHA20_POLY1305, Opener, Sealer, derive_keys
from blockmirror.state import Role

if TYPE_CHECKING:
    from blockmirror.link.sender import PeerSender

__all__ = ["source_handshake"]


async def source_handshake(
    sender: PeerSender, link: LinkSession
) -> tuple[Welcome, list[tuple[int, int]]]:
    """HELLO, the proofs both ways when a key is set, and the WELCOME; the link streams
    after it. The order is :mod:`blockmirror.link.handshake`'s: whatever else arrives is
    refused there."""
    identity = sender._volume_id()
    if identity is None:
        # A relay with nothing received yet has no data to pass on.
        raise BlockmirrorError("this replica has no source data yet; nothing to relay")
    sender.volume_id = identity
    nonce = auth.new_nonce()
    # A key without TLS: every frame after the handshake is sealed (session_crypto).
    # With TLS, TLS already protects the stream and frames go as they are.
    offer = CHACHA20_POLY1305 if sender.psk is not None and sender.ssl_context is None else None
    hello = Hello(
        PROTOCOL_VERSION,
        sender.unit_name,
        sender.volume_name,
        sender.volume_id,
        sender.wp.volume.size,
        nonce,
        "psk" if sender.psk else "none",
        sender.wp.journal.max_payload(),
        offer,
        lineage=(
            sender.roles.lineage()
            if sender.roles is not None
            else fixed_lineage(sender.unit_name, Role.PRIMARY, sender.wp.journal.next_seq - 1)
        ),
        source=sender.roles.source() if sender.roles is not None else None,
        configs=sender.configs is not None,
        compression=DECODABLE,
    )
    link.send(hello)
    reply = await link.receive()  # AUTH_SERVER or WELCOME
    if isinstance(reply, AuthServer):
        if sender.psk is None:
            raise LinkRefused("auth", "the secondary requires a pre-shared key; none set")
        expected = auth.server_proof(sender.psk, nonce, reply.nonce, sender.volume_name)
        if not auth.verify(expected, reply.proof):
            link.refuse_quietly("auth", "the secondary does not know the pre-shared key")
            raise LinkRefused("auth", "the secondary failed to prove the pre-shared key")
        if reply.crypto != offer:
            if offer is None:
                raise ProtocolError(f"the secondary seals with {reply.crypto!r}, not offered")
            raise link.refuse(
                "crypto-required",
                f"a pre-shared key without TLS needs sealed frames ({offer}); the secondary "
                "does not seal (an older unit, or the offer was stripped on the way)",
            )
        link.send(AuthClient(auth.client_proof(sender.psk, reply.nonce, nonce, sender.volume_name)))
        if offer is not None:
            keys = derive_keys(sender.psk, nonce, reply.nonce, hello)
            link.seal(Sealer(keys.source), Opener(keys.secondary))
        reply = await link.receive()  # the WELCOME
    elif sender.psk is not None:
        link.refuse_quietly("auth", "a pre-shared key is configured here; prove it")
        raise LinkRefused("auth", "the secondary did not ask for the pre-shared key")
    if not isinstance(reply, Welcome):  # pragma: no cover - the handshake order says so
        raise ProtocolError(f"expected WELCOME, got {type(reply).__name__}")
    ours = sender.wp.journal.max_payload()
    if reply.max_record is not None and reply.max_record < ours:
        # An older secondary that did not check the HELLO's max_record itsender.
        raise link.refuse(
            "journal-too-small",
            f"the secondary's journal holds records of at most {reply.max_record} bytes, "
            f"this volume's records may carry {ours}; give it a larger journal_size",
        )
    link.stream()
    # The regions the secondary gave up to follow us (its writes past the branch point).
    regions: list[tuple[int, int]] = []
    for _ in range(reply.diverged_frames):
        frame = await link.receive()
        if not isinstance(frame, Regions):
            raise ProtocolError(f"expected REGIONS, got {type(frame).__name__}")
        for offset, length in frame.extents:
            if offset + length > sender.wp.volume.size:
                raise link.refuse(
                    "bad-frame", f"diverged region {offset}+{length} is past the volume's end"
                )
        regions.extend(frame.extents)
    return reply, regions
