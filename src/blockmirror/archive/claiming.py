"""Who may write a volume's chains (docs/archive.md, "One writer per chain").

Two claims, each put only if absent (``If-None-Match: *``) and read back when present: the
volume root's (``volume``: which volume, by identity, the name holds) and the generation's
(``gGEN/claim``: which unit and journal write its chain). Every other object is put the same
way by :func:`put_once`: a key that exists with the same bytes is a retry whose answer was
lost, with other bytes a second writer, refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from blockmirror.archive import objects as fmt
from blockmirror.archive.s3 import ArchiveStoreError, ObjectExists, ObjectStore

__all__ = ["ChainRefused", "Writer", "claim", "put_once"]


class ChainRefused(ArchiveStoreError):
    """The root or the chain belongs to another writer: nothing is uploaded."""


@dataclass(frozen=True)
class Writer:
    """One archive consumer as its claims name it."""

    url: str
    root: str  # the volume's keys start with this
    volume: str
    volume_id: str
    unit: str
    writer: str  # the journal's id: a copied state directory is another writer


async def put_once(store: ObjectStore, key: str, data: bytes) -> bool:
    """Put ``key`` unless it exists; True when this call stored it."""
    try:
        await store.put(key, data, if_none_match=True)
        return True
    except ObjectExists:
        held = await store.get(key)
        if held != data:
            raise ChainRefused(f"{key} exists with other content: another writer?") from None
        return False


async def claim(store: ObjectStore, who: Writer, generation: str) -> int:
    """Claim the root and ``generation``'s chain for ``who``; how many objects were put.
    Raises :class:`ChainRefused` naming the other writer."""
    put = 0
    mine = fmt.VolumeClaim(who.volume, who.volume_id, who.unit, time.time_ns())
    key = who.root + fmt.VOLUME_CLAIM_KEY
    try:
        await store.put(key, fmt.encode_volume_claim(mine), if_none_match=True)
        put += 1
    except ObjectExists:
        held = fmt.decode_volume_claim(await store.get(key))
        if held.volume_id != who.volume_id:
            raise ChainRefused(
                f"{who.url} already holds another volume called {who.volume} (archived by "
                f"unit {held.unit}, identity {held.volume_id[:8]}); give this archive another "
                "url or prefix"
            ) from None
    chain = fmt.Claim(
        volume=who.volume,
        generation=generation,
        unit=who.unit,
        writer=who.writer,
        created_ns=time.time_ns(),
    )
    key = who.root + fmt.ClaimKey(generation).key
    try:
        await store.put(key, fmt.encode_claim(chain), if_none_match=True)
        put += 1
    except ObjectExists:
        held_chain = fmt.decode_claim(await store.get(key))
        if held_chain.unit != who.unit or held_chain.writer != who.writer:
            raise ChainRefused(
                f"unit {held_chain.unit} already archives generation {generation[:8]} of "
                f"{who.volume} to {who.url}; two writers would mix one chain"
            ) from None
    return put
