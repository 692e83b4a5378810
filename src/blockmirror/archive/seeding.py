"""Seeding a new replica from an archive (docs/archive.md, "Seeding").

A secondary volume with ``seed_from = "ARCHIVE"`` whose replica is new (its journal holds no
replica state and has numbered nothing) is first restored from the archive's newest point: the
chunks of a base and the records after it, written into the volume through the same checks as
a restore. The replica then stands where the archive stands: its journal continues after that
record, with that record's origin time, and it is consistent with the archived volume's
identity. When its source connects, the source sees a replica of its own volume that holds
every record up to that point (docs/link-protocol.md, "Resume") and sends only what came after.

Runs before the unit accepts links, so nothing else writes the replica meanwhile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from blockmirror.archive import objects as fmt
from blockmirror.archive.catalog import Catalog, Point, Target
from blockmirror.archive.restore_image import RestoreResult, restore_into
from blockmirror.archive.s3 import ObjectStore
from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.errors import ArchiveError
from blockmirror.journal.checkpoint import ReplicaState

__all__ = ["SeedResult", "needs_seed", "seed_replica"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeedResult:
    point: Point
    restored: RestoreResult
    volume_id: str
    source_unit: str


def needs_seed(wp: JournalWritePath) -> bool:
    """A replica that has never received anything: no replica state, nothing numbered."""
    journal = wp.journal
    return journal.replica is None and journal.next_seq == 1 and not journal.records


async def seed_replica(
    store: ObjectStore, root: str, wp: JournalWritePath, *, volume: str
) -> SeedResult:
    """Restore the archive's newest point into ``wp``'s volume and stand the replica there."""
    catalog = await Catalog.load(store, root)
    claim = fmt.decode_volume_claim(await store.get(root + fmt.VOLUME_CLAIM_KEY))
    gens = catalog.generations()
    point: Point | None = None
    for gen in reversed(gens):
        chain = catalog.chains[gen]
        if chain.restorable:
            seq = chain.restorable[-1][1]
            point = await catalog.resolve(Target(seq=seq, generation=gen))
            break
    if point is None or point.seq == 0:
        raise ArchiveError(f"the archive holds no restorable point of {volume} under {root}")
    if not point.time_ns:
        raise ArchiveError(f"the archive does not say when record {point.seq} was written")
    log.info(
        "volume %s: seeding the replica from the archive: seq %d of generation %s",
        volume,
        point.seq,
        point.generation[:8],
    )
    restored = await restore_into(store, root, catalog, point, wp.volume, fresh=False)
    # The replica now holds the volume at that record: number on from it, with its stamp, so
    # that the source recognises its own record there (link/resume.py).
    await wp.replica.rebase(point.seq + 1)
    journal = wp.journal
    journal.last_stamp = (point.seq, point.time_ns)
    holder = catalog.claims.get(point.generation)
    source = holder.unit if holder is not None else claim.unit
    journal.replica = ReplicaState(volume_id=claim.volume_id, source_unit=source, consistent=True)
    await wp.checkpoint()
    return SeedResult(point, restored, claim.volume_id, source)
