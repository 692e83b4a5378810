"""What one sender counts and shows: its phase, cursor, bytes, connects and why it waits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from blockmirror.state import LinkPhase

__all__ = ["SenderStats"]


@dataclass(slots=True)
class SenderStats:
    phase: LinkPhase = LinkPhase.CONNECTING
    acked_seq: int = 0
    peer_applied_seq: int = 0
    bytes_sent: int = 0  # what the frames carry, uncompressed (frame headers included)
    wire_bytes_sent: int = 0  # what went on the link: compressed frames as compressed
    records_sent: int = 0
    sync_bytes_sent: int = 0
    sync_bytes_skipped: int = 0  # checksum sync: regions the replica already held
    connects: int = 0
    last_error: str | None = None
    # Why the link is not replicating right now (None while it is): the last session's end.
    reason: str | None = None
    connected_since: float | None = None
    consistent: bool = False
    # The size of the last diverged-only resync's work: both sides' regions, joined.
    diverged_union_bytes: int | None = None
    throughput: float = 0.0  # bytes per second, smoothed
    last_ack_time: float | None = None  # wall clock of the last ACK the peer sent
    _rate_at: float = field(default_factory=time.monotonic)
    _rate_bytes: int = 0

    @property
    def compression_ratio(self) -> float | None:
        """Payload over wire bytes (1.0: nothing saved; None: nothing sent yet)."""
        if not self.wire_bytes_sent:
            return None
        return round(self.bytes_sent / self.wire_bytes_sent, 3)

    def count(self, nbytes: int, wire: int | None = None) -> None:
        """A frame carrying ``nbytes`` went out as ``wire`` bytes (None: the same)."""
        self.bytes_sent += nbytes
        self.wire_bytes_sent += nbytes if wire is None else wire
        self._rate_bytes += nbytes
        now = time.monotonic()
        elapsed = now - self._rate_at
        if elapsed >= 1.0:
            self.throughput = 0.5 * self.throughput + 0.5 * self._rate_bytes / elapsed
            self._rate_at, self._rate_bytes = now, 0
