"""Region digests of a store: what online verify and checksum sync compare across a link."""

from __future__ import annotations

import hashlib

from blockmirror.store.base import Store

__all__ = ["DIGEST_BYTES", "region_digests"]

DIGEST_BYTES = 16  # BLAKE2b-128: a collision by chance is never the answer to "do they differ"
_ZERO_DIGESTS: dict[int, bytes] = {}


def _zero_digest(length: int) -> bytes:
    digest = _ZERO_DIGESTS.get(length)
    if digest is None:
        digest = hashlib.blake2b(bytes(length), digest_size=DIGEST_BYTES).digest()
        _ZERO_DIGESTS[length] = digest
    return digest


def region_digests(store: Store, offset: int, region: int, count: int) -> list[bytes]:
    """BLAKE2b-128 of ``count`` regions of ``region`` bytes from ``offset`` (the last clipped
    at the end of the store; none past it). Holes are hashed without reading them. Blocking:
    call it in a thread. Raises OSError."""
    out: list[bytes] = []
    end = min(store.size, offset + region * count)
    at = offset
    holes: list[tuple[int, int]] = []
    if store.capabilities().extents:
        pos = offset
        while pos < end:
            for extent in store.extents(pos, end - pos):
                if extent.hole or extent.zero:
                    holes.append((pos, pos + extent.length))
                pos += extent.length
    i = 0
    while at < end:
        n = min(region, end - at)
        while i < len(holes) and holes[i][1] <= at:
            i += 1
        if i < len(holes) and holes[i][0] <= at and holes[i][1] >= at + n:
            out.append(_zero_digest(n))
        else:
            out.append(hashlib.blake2b(store.pread(at, n), digest_size=DIGEST_BYTES).digest())
        at += n
    return out
