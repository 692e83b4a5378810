"""Per-volume I/O counters, reported by the admin API."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class VolumeCounters:
    """Monotonic counts of what the export has served; mutated on the event loop only."""

    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flushes: int = 0
    trims: int = 0
    zeroes: int = 0
    errors: int = 0
    connections: int = 0
    connections_total: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
