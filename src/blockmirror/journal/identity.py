"""Which volume a journal belongs to, and whether the volume still holds what it should.

A journal records (docs/journal.md, "Identity"):

- ``volume_id``: the volume's identity, random, fixed when its first journal is created. Peers
  bind their replicas to it (it is the HELLO's ``volume_id``); a journal resize keeps it.
- which file or device the volume was (device and inode; a block device's device number);
- a *fingerprint*: the hashes of a few blocks the volume held once every record up to
  ``fp_seq`` was durably in it, taken at every checkpoint from the blocks most recently written.

At start, before anything is replayed, :func:`verify` compares both with the volume found. A
block that a record still in the ring (newer than ``fp_seq``) overwrites legitimately differs and
is not compared; every other one must hash the same. An older copy of the volume restored in
place (same inode), a wrong ``path`` that made a new empty file, or another volume's file differ,
and the volume is not served until ``blockmirror volume adopt`` (:mod:`.adopt`) records the new
identity and sends every peer a full resync.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from blockmirror.errors import BlockmirrorError
from blockmirror.journal.checkpoint import BODY_MAX, Checkpoint, VolumeIdentity, VolumeKind
from blockmirror.journal.format import Kind
from blockmirror.store.base import Store

log = logging.getLogger(__name__)

__all__ = [
    "BLOCK",
    "FINGERPRINT_BLOCKS",
    "IdentityCheck",
    "block_hash",
    "sample",
    "stamp",
    "stat_volume",
    "verify",
]

# How many blocks a fingerprint holds, and their size.
FINGERPRINT_BLOCKS = 8
BLOCK = 4096
_OVERWRITES = (Kind.WRITE, Kind.ZERO, Kind.TRIM)


def block_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def stat_volume(volume: Store) -> tuple[VolumeKind, int, int]:
    """``(kind, dev, ino)`` of the volume's backing store as its path names it now."""
    st = os.stat(volume.path)
    if stat.S_ISBLK(st.st_mode):
        # A device node's inode says nothing (devtmpfs makes new ones at every boot).
        return "block", st.st_rdev, 0
    return "file", st.st_dev, st.st_ino


def _block_at(volume: Store, offset: int) -> tuple[int, int]:
    start = min(offset - offset % BLOCK, max(volume.size - 1, 0))
    start -= start % BLOCK
    return start, min(BLOCK, volume.size - start)


def sample(
    volume: Store,
    *,
    fp_seq: int,
    recent: Iterable[int],
    previous: VolumeIdentity | None,
    fingerprint: bool = True,
) -> VolumeIdentity | None:
    """The volume's identity now: its file, and a fingerprint of blocks it holds.

    ``recent``: volume offsets written most recently, newest first; the blocks of the previous
    fingerprint fill what is left. ``fp_seq``: every record up to it is durably in the volume
    (the caller synced it); a write newer than that may show in a block or not, and recovery
    does not compare a block such a write (still in the ring) overwrites. Blocking: reads the
    volume. ``fingerprint`` false (a volume written outside the journal just now) or a failed
    read records no blocks: nothing is compared at the next start.
    """
    try:
        kind, dev, ino = stat_volume(volume)
    except OSError as exc:
        # The path was removed or replaced under a running unit: keep what was known.
        log.warning("%s: cannot stat the volume for its identity: %s", volume.path, exc)
        if previous is None:
            return None
        kind, dev, ino = previous.kind, previous.dev, previous.ino
    offsets: list[int] = []
    if fingerprint:
        old = [offset for offset, _ in previous.blocks] if previous is not None else []
        for offset in [*recent, *old]:
            start, _ = _block_at(volume, offset)
            if start not in offsets:
                offsets.append(start)
            if len(offsets) == FINGERPRINT_BLOCKS:
                break
    blocks: list[tuple[int, str]] = []
    try:
        for start in offsets:
            _, length = _block_at(volume, start)
            blocks.append((start, block_hash(volume.pread(start, length))))
    except (OSError, BlockmirrorError) as exc:
        log.warning("%s: cannot read the volume for its fingerprint: %s", volume.path, exc)
        blocks = []
    return VolumeIdentity(kind, dev, ino, fp_seq, tuple(blocks))


def stamp(
    cp: Checkpoint,
    volume: Store,
    *,
    volume_id: str,
    recent: Iterable[int],
    previous: VolumeIdentity | None,
) -> Checkpoint:
    """``cp`` with the volume's identity and a fresh fingerprint (blocking: reads the volume).

    The fingerprint is of the volume once it durably holds every record up to
    ``cp.applied_seq``. None is taken while the volume is written outside the journal
    (enqueueing paused, or a replica in the middle of a resync): nothing would tell, at the
    next start, which of its blocks changed legitimately. The identity is ``.volume`` of the
    result.
    """
    outside = cp.enqueue_paused or (cp.replica is not None and not cp.replica.consistent)
    ident = sample(
        volume, fp_seq=cp.applied_seq, recent=recent, previous=previous, fingerprint=not outside
    )
    stamped = dataclasses.replace(cp, volume_id=volume_id, volume=ident)
    while ident is not None and ident.blocks and len(stamped.to_json()) > BODY_MAX:
        # Many consumers with long names: fewer blocks rather than no checkpoint at all.
        ident = dataclasses.replace(ident, blocks=ident.blocks[: len(ident.blocks) // 2])
        stamped = dataclasses.replace(cp, volume_id=volume_id, volume=ident)
    return stamped


@dataclass(frozen=True, slots=True)
class IdentityCheck:
    """What :func:`verify` found. ``problem`` None: the volume may be served."""

    problem: str | None
    warning: str | None
    compared: int
    matched: int


def verify(
    volume: Store,
    cp: Checkpoint,
    records: Sequence[tuple[int, Kind, int, int]],
    *,
    lenient: bool,
) -> IdentityCheck:
    """Compare the volume with the identity ``cp`` recorded; reads the volume (blocking).

    ``records``: ``(seq, kind, offset, length)`` of every record the ring holds. ``lenient``:
    after a power loss, writes newer than the journal may have reached the volume without their
    records (they were never promised to the host); a block may then differ legitimately, and
    only a volume none of whose compared blocks match is refused.
    """
    recorded = cp.volume
    if recorded is None:
        return IdentityCheck(None, None, 0, 0)  # a journal from before identities
    kind, dev, ino = stat_volume(volume)
    replaced = (kind, dev, ino) != (recorded.kind, recorded.dev, recorded.ino)
    compared = matched = 0
    differ: list[int] = []
    for offset, digest in recorded.blocks:
        _, length = _block_at(volume, offset)
        if offset + length > volume.size:
            continue
        if any(
            seq > recorded.fp_seq
            and k in _OVERWRITES
            and rec_offset < offset + length
            and offset < rec_offset + rec_length
            for seq, k, rec_offset, rec_length in records
        ):
            continue  # a record still in the ring rewrites it: it may differ
        compared += 1
        if block_hash(volume.pread(offset, length)) == digest:
            matched += 1
        else:
            differ.append(offset)
    where = f"{volume.path}"
    what = (
        f"{'device' if recorded.kind == 'block' else 'file'} {where} is not the one this "
        f"journal was written for"
    )
    adopt = (
        "if this volume is the one to serve (an intended restore, say), adopt it offline with "
        "`blockmirror volume adopt CONFIG VOLUME` (every peer then gets a full resync); "
        "otherwise fix `path` or put the right file back"
    )
    # After an unclean OS restart (a power cut) blocks written since the last volume sync may
    # legitimately hold older data, fingerprinted or not, and every peer resyncs fully anyway:
    # differences are then a warning, never a refusal. Only a clean history refuses.
    if differ and not lenient:
        shown = ", ".join(str(o) for o in differ[:4]) + (", ..." if len(differ) > 4 else "")
        return IdentityCheck(
            f"{what}: {len(differ)} of the {compared} recently written blocks it should hold "
            f"differ (at volume offsets {shown}) - an older copy restored, a new empty file, or "
            f"another volume's file? {adopt}",
            None,
            compared,
            matched,
        )
    warning = None
    if differ:
        warning = (
            f"{where}: {len(differ)} of {compared} fingerprint blocks differ after an unclean "
            "restart (writes never promised to the host); a full resync follows"
        )
    if replaced:
        if matched == 0:
            return IdentityCheck(
                f"{what}: it was replaced (was {recorded.kind} {recorded.dev}:{recorded.ino}, "
                f"is {kind} {dev}:{ino}) and no recently written block proves it holds the same "
                f"volume. {adopt}",
                None,
                compared,
                matched,
            )
        warning = (
            f"{where} was replaced (was {recorded.kind} {recorded.dev}:{recorded.ino}, is "
            f"{kind} {dev}:{ino}), but the {matched} blocks compared hold what they should: "
            "accepted as the same volume"
        )
    return IdentityCheck(None, warning, compared, matched)
