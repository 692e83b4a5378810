"""What an archive holds of one volume, from its listing alone (docs/archive.md, "Listing").

A volume's keys are grouped by generation into chains (:mod:`.chain`); the claims say which
unit wrote each and when it began. A point to restore is named by a sequence number, an origin
time or a bookmark, and :meth:`Catalog.resolve` turns it into one generation's sequence number,
refusing one that no chain can restore (a gap, before the oldest base, after the newest record).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from blockmirror.archive import objects as fmt
from blockmirror.archive.chain import Chain, NotRestorable
from blockmirror.archive.s3 import ObjectInfo, ObjectMissing, ObjectStore

__all__ = ["Catalog", "Point", "Target", "iso"]


def iso(time_ns: int) -> str:
    if not time_ns:
        return ""
    when = dt.datetime.fromtimestamp(time_ns / 1e9, dt.UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Target:
    """One of ``seq``, ``time_ns`` or ``bookmark``; ``generation`` narrows the search."""

    seq: int | None = None
    time_ns: int | None = None
    bookmark: str | None = None
    generation: str | None = None

    def describe(self) -> str:
        if self.seq is not None:
            return f"seq {self.seq}"
        if self.time_ns is not None:
            return f"time {iso(self.time_ns)}"
        return f"bookmark {self.bookmark!r}"


@dataclass(frozen=True)
class Point:
    generation: str
    seq: int
    time_ns: int


@dataclass
class Catalog:
    """Every chain of one volume in one archive."""

    root: str
    store: ObjectStore
    chains: dict[str, Chain] = field(default_factory=dict)
    claims: dict[str, fmt.Claim] = field(default_factory=dict)
    objects: list[ObjectInfo] = field(default_factory=list)
    strays: list[str] = field(default_factory=list)
    malformed: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    async def load(cls, store: ObjectStore, root: str) -> Catalog:
        catalog = cls(root, store)
        keys: dict[str, list[fmt.ArchiveKey]] = {}
        catalog.objects = await store.list(root)
        for info in catalog.objects:
            rel = info.key[len(root) :]
            try:
                parsed = fmt.parse_key(rel)
            except fmt.ArchiveFormatError as exc:
                catalog.malformed.append((rel, str(exc)))
                continue
            if parsed is None:
                if rel not in (fmt.VOLUME_CLAIM_KEY, fmt.PROBE_KEY):
                    catalog.strays.append(rel)
                continue
            keys.setdefault(parsed.gen, []).append(parsed)
        for gen, found in keys.items():
            catalog.chains[gen] = Chain(found)
        claims = [g for g, found in keys.items() if any(isinstance(k, fmt.ClaimKey) for k in found)]
        docs = await asyncio.gather(
            *(store.get(root + fmt.ClaimKey(g).key) for g in claims), return_exceptions=True
        )
        for gen, doc in zip(claims, docs, strict=True):
            if isinstance(doc, bytes):
                try:
                    catalog.claims[gen] = fmt.decode_claim(doc)
                except fmt.ArchiveFormatError as exc:
                    catalog.malformed.append((fmt.ClaimKey(gen).key, str(exc)))
            elif isinstance(doc, ObjectMissing):
                continue
            elif isinstance(doc, BaseException):
                raise doc
        return catalog

    def generations(self) -> list[str]:
        """Oldest first: by when each chain was claimed (unclaimed ones last)."""
        return sorted(
            self.chains,
            key=lambda g: (
                g not in self.claims,
                self.claims[g].created_ns if g in self.claims else 0,
            ),
        )

    async def resolve(self, target: Target) -> Point:
        """The point ``target`` names, in the newest generation that can restore it."""
        if not self.chains:
            raise NotRestorable(f"the archive holds nothing under {self.root}")
        gens = self.generations()
        if target.generation is not None:
            gens = [g for g in gens if g.startswith(target.generation)]
            if not gens:
                raise NotRestorable(f"no generation {target.generation} in the archive")
        reasons: list[str] = []
        for gen in reversed(gens):
            chain = self.chains[gen]
            try:
                seq, time_ns = await self._seq_in(chain, gen, target)
                chain.plan(seq)
                return Point(gen, seq, time_ns)
            except NotRestorable as exc:
                reasons.append(f"generation {gen[:8]}: {exc}")
        raise NotRestorable(f"{target.describe()} cannot be restored: " + "; ".join(reasons))

    async def _seq_in(self, chain: Chain, gen: str, target: Target) -> tuple[int, int]:
        if target.seq is not None:
            return target.seq, self._time_of(chain, target.seq)
        if target.bookmark is not None:
            mark = chain.bookmark(target.bookmark)
            return mark.seq, mark.ts
        assert target.time_ns is not None
        return await self._seq_at(chain, target.time_ns)

    def _time_of(self, chain: Chain, seq: int) -> int:
        for seg in chain.segments:
            if seg.last == seq:
                return seg.last_ts
        for base in chain.bases:
            if base.end == seq:
                return base.end_ts
        return 0

    async def _seq_at(self, chain: Chain, time_ns: int) -> tuple[int, int]:
        """The newest record at or before ``time_ns``: the listing narrows it to one segment
        (the first whose last record is newer), whose records say exactly."""
        best: tuple[int, int] | None = None
        for base in chain.bases:
            if base.end_ts <= time_ns and (best is None or base.end > best[0]):
                best = (base.end, base.end_ts)
        for seg in chain.segments:
            if seg.last_ts <= time_ns:
                if best is None or seg.last > best[0]:
                    best = (seg.last, seg.last_ts)
                continue
            obj = await self.store.get(self.root + seg.key)
            segment = await asyncio.to_thread(fmt.decode_segment, obj)
            for rec in segment.records:
                if rec.timestamp_ns <= time_ns and (best is None or rec.seq > best[0]):
                    best = (rec.seq, rec.timestamp_ns)
            break
        if best is None:
            raise NotRestorable(f"nothing archived is as old as {iso(time_ns)}")
        return best

    def describe(self) -> dict[str, Any]:
        """The listing as JSON: per generation, its bases, segments, gaps, restorable ranges
        and bookmarks."""
        gens = []
        for gen in self.generations():
            chain = self.chains[gen]
            claim = self.claims.get(gen)
            gens.append(
                {
                    "generation": gen,
                    "unit": claim.unit if claim else None,
                    "claimed": iso(claim.created_ns) if claim else None,
                    "bases": [
                        {"start": b.start, "end": b.end, "time": iso(b.end_ts), "key": b.key}
                        for b in chain.bases
                    ],
                    "segments": len(chain.segments),
                    "first_seq": chain.segments[0].first if chain.segments else None,
                    "last_seq": chain.segments[-1].last if chain.segments else None,
                    "last_time": iso(chain.segments[-1].last_ts) if chain.segments else None,
                    "gaps": [list(g) for g in chain.gaps],
                    "overlaps": [list(o) for o in chain.overlaps],
                    "restorable": [list(r) for r in chain.restorable],
                    "bookmarks": [
                        {"name": m.name, "seq": m.seq, "time": iso(m.ts)} for m in chain.bookmarks
                    ],
                }
            )
        return {
            "root": self.root,
            "objects": len(self.objects),
            "bytes": sum(o.size for o in self.objects),
            "generations": gens,
            "strays": self.strays,
            "malformed": [{"key": k, "problem": p} for k, p in self.malformed],
        }
