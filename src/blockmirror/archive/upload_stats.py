"""What an archive consumer counts and shows (docs/operations.md, "Archives": the status
table), kept apart from the consumer's logic as the link's sender_stats is."""

from __future__ import annotations

from dataclasses import dataclass, field

from blockmirror.state import ArchiveState

__all__ = ["ArchiveStats"]


@dataclass
class ArchiveStats:
    """What status shows of one archive of one volume."""

    state: ArchiveState = ArchiveState.STARTING
    reason: str = ""
    last_seq: int = 0  # the newest record the archive holds durably
    last_time: float = 0.0  # when it got it (freshness)
    last_record_ns: int = 0  # that record's origin timestamp
    segments: int = 0
    bases: int = 0
    bytes_uploaded: int = 0
    raw_bytes: int = 0  # journal bytes those segments held
    objects: int = 0
    errors: int = 0
    last_error: str = ""
    base_running: bool = False
    base_progress: float = 0.0
    gaps: list[tuple[int, int]] = field(default_factory=list)
    tracking_since: float = 0.0
    deleted: int = 0  # objects retention removed

    def to_json(
        self,
        *,
        newest_base: tuple[int, int] | None,
        archive: str,
        url: str,
        generation: str,
        mode: str,
        lag_seconds: float,
        backlog: tuple[int, int],
        rate_limit: int | None,
    ) -> dict[str, object]:
        return {
            "archive": archive,
            "url": url,
            "state": str(self.state),
            "reason": self.reason,
            "generation": generation,
            "mode": mode,
            "last_seq": self.last_seq,
            "last_time": self.last_time,
            "last_record_time": self.last_record_ns / 1e9 if self.last_record_ns else 0.0,
            "lag_seconds": round(lag_seconds, 3),
            "backlog_bytes": backlog[0],
            "backlog_records": backlog[1],
            "bytes_uploaded": self.bytes_uploaded,
            "raw_bytes": self.raw_bytes,
            "compression_ratio": (
                round(self.raw_bytes / self.bytes_uploaded, 3) if self.bytes_uploaded else 1.0
            ),
            "objects": self.objects,
            "segments": self.segments,
            "bases": self.bases,
            # The newest base: the volume at ``end``, copied after ``start`` (docs/archive.md).
            "base_start": newest_base[0] if newest_base else None,
            "base_end": newest_base[1] if newest_base else None,
            "base_running": self.base_running,
            "base_progress": round(self.base_progress, 3),
            "gaps": [list(g) for g in self.gaps],
            "deleted": self.deleted,
            "errors": self.errors,
            "last_error": self.last_error,
            "rate_limit": rate_limit,
        }
