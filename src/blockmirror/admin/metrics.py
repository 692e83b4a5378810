"""``GET /metrics``: the unit's status in Prometheus' text format (issue 11, first part).

Every value is read from the same status document ``GET /api/status`` returns, in the same
request, so the two never disagree. Names follow Prometheus' conventions: the ``blockmirror_``
prefix, base units in the name (``_bytes``, ``_seconds``), ``_total`` on counters; the labels
are ``volume`` and ``peer`` only (``blockmirror_info`` carries ``version``, as ``_info`` metrics
do).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (metric name without prefix, help, key in volumes[].counters)
_VOLUME_COUNTERS = (
    ("reads_total", "Read requests served.", "reads"),
    ("writes_total", "Write requests served.", "writes"),
    ("read_bytes_total", "Bytes read by hosts.", "bytes_read"),
    ("written_bytes_total", "Bytes written by hosts.", "bytes_written"),
    ("flushes_total", "Flush requests served.", "flushes"),
    ("trims_total", "Trim requests served.", "trims"),
    ("request_errors_total", "Requests answered with an error.", "errors"),
    ("connections_total", "Host connections accepted.", "connections_total"),
)
# (name, help, key in volumes[].peers[], kind)
_PEER_VALUES = (
    (
        "peer_lag_bytes",
        "Bytes the peer lacks (journal backlog and dirty regions).",
        "lag_bytes",
        "g",
    ),
    ("peer_lag_records", "Journal records the peer lacks.", "lag_records", "g"),
    ("peer_lag_seconds", "Age of the oldest record the peer lacks.", "lag_seconds", "g"),
    ("peer_dirty_bytes", "Bytes marked in the peer's dirty map.", "dirty_bytes", "g"),
    ("peer_acked_seq", "Newest record the peer holds durably.", "acked_seq", "g"),
    (
        "peer_last_ack_timestamp_seconds",
        "When the peer last acknowledged (Unix time).",
        "last_ack_time",
        "g",
    ),
    (
        "peer_throughput_bytes_per_second",
        "Smoothed rate sent to the peer.",
        "throughput_bytes_per_second",
        "g",
    ),
    ("peer_sent_bytes_total", "Bytes sent to the peer.", "bytes_sent", "c"),
    (
        "peer_wire_sent_bytes_total",
        "Bytes put on the link to the peer (after compression).",
        "wire_bytes_sent",
        "c",
    ),
    ("peer_rtt_seconds", "Round trip to the peer (probes, end to end).", "rtt_seconds", "g"),
    ("peer_eta_seconds", "Seconds to lag 0 at the current rate.", "eta_seconds", "g"),
    ("peer_rate_limit_bits_per_second", "The link's bandwidth limit.", "rate_limit", "g"),
    ("peer_sync_sent_bytes_total", "Resync bytes sent to the peer.", "sync_bytes_sent", "c"),
    (
        "peer_sync_skipped_bytes_total",
        "Bytes a full copy found on the peer already (checksum sync).",
        "sync_bytes_skipped",
        "c",
    ),
    ("peer_records_sent_total", "Records sent to the peer.", "records_sent", "c"),
    ("peer_connects_total", "Sessions the link opened.", "connects", "c"),
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    return None


def _in(section: str, key: str, only_if: str | None = None) -> Callable[[dict[str, Any]], Any]:
    """A volume's ``section[key]`` (None without the section, or unless ``section[only_if]``)."""

    def get(vol: dict[str, Any]) -> Any:
        part = vol.get(section)
        if not isinstance(part, dict) or (only_if is not None and not part.get(only_if)):
            return None
        return part.get(key)

    return get


def _alerts(vol: dict[str, Any]) -> int | None:
    journal = vol.get("journal")
    return len(journal.get("alerts") or []) if isinstance(journal, dict) else None


def _age(iso: Any, now: float) -> float | None:
    if not isinstance(iso, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, now - when.timestamp())


class _StatusCollector(Collector):
    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status
        now = time.time()
        info = GaugeMetricFamily(
            "blockmirror_info", "The unit's version (always 1).", labels=["version"]
        )
        info.add_metric([str(status.get("version", ""))], 1.0)
        yield info
        uptime = _number(status.get("uptime_seconds"))
        if uptime is not None:
            yield GaugeMetricFamily("blockmirror_uptime_seconds", "Seconds since start.", uptime)
        version = _number(status.get("config_version"))
        if version is not None:
            yield GaugeMetricFamily(
                "blockmirror_config_version", "The applied configuration's version.", version
            )
        volumes = list(status.get("volumes") or [])
        yield from self._volumes(volumes, now)
        yield from self._peers(volumes)
        yield from _archives(volumes)
        yield from _events(status)

    def _gauge(
        self, volumes: list[dict[str, Any]], name: str, help_text: str, get: Callable[..., Any]
    ) -> GaugeMetricFamily:
        family = GaugeMetricFamily(f"blockmirror_{name}", help_text, labels=["volume"])
        for vol in volumes:
            value = _number(get(vol))
            if value is not None:
                family.add_metric([str(vol.get("name"))], value)
        return family

    def _volumes(self, volumes: list[dict[str, Any]], now: float) -> Iterator[Metric]:
        g = self._gauge
        yield g(volumes, "volume_size_bytes", "The volume's size.", lambda v: v.get("size"))
        yield g(
            volumes,
            "volume_up",
            "1 while the volume serves (primary) or replicates (secondary), else 0.",
            lambda v: v.get("state") in ("serving", "replica"),
        )
        yield g(
            volumes,
            "volume_primary",
            "1 while the volume's live role is primary.",
            lambda v: v.get("role") == "primary",
        )
        for name, help_text, key in _VOLUME_COUNTERS:
            family = CounterMetricFamily(
                f"blockmirror_{name.removesuffix('_total')}", help_text, labels=["volume"]
            )
            for vol in volumes:
                value = _number((vol.get("counters") or {}).get(key))
                if value is not None:
                    family.add_metric([str(vol.get("name"))], value)
            yield family

        yield g(
            volumes, "journal_capacity_bytes", "The journal's ring.", _in("journal", "capacity")
        )
        yield g(volumes, "journal_used_bytes", "Bytes of the ring in use.", _in("journal", "used"))
        yield g(volumes, "journal_records", "Records in the journal.", _in("journal", "records"))
        yield g(
            volumes,
            "journal_oldest_age_seconds",
            "Age of the journal's oldest record.",
            _in("journal", "oldest_age_seconds"),
        )
        yield g(
            volumes,
            "journal_newest_seq",
            "The newest record's number.",
            _in("journal", "newest_seq"),
        )
        yield g(
            volumes,
            "journal_alerts",
            "Alerts in the journal's recent list.",
            lambda v: (
                len((v.get("journal") or {}).get("alerts") or []) if v.get("journal") else None
            ),
        )
        yield g(
            volumes,
            "history_bytes",
            "Space the history's segments take.",
            lambda v: (
                (v.get("history") or {}).get("bytes")
                if (v.get("history") or {}).get("enabled")
                else None
            ),
        )
        yield g(
            volumes,
            "history_oldest_age_seconds",
            "Age of the oldest point the history keeps.",
            lambda v: (
                _age((v.get("history") or {}).get("oldest_time"), now)
                if (v.get("history") or {}).get("enabled")
                else None
            ),
        )
        yield g(
            volumes,
            "replica_consistent",
            "On a replica: 1 while it equals a prefix of its source's writes.",
            _in("replica", "consistent"),
        )
        yield g(
            volumes,
            "replica_applied_seq",
            "On a replica: the newest record applied.",
            _in("replica", "applied_seq"),
        )
        yield g(
            volumes,
            "replica_delayed_records",
            "On a lagged replica: records held back by replay_delay.",
            _in("replica", "delayed_records"),
        )

    def _peers(self, volumes: list[dict[str, Any]]) -> Iterator[Metric]:
        peers = [(str(v.get("name")), p) for v in volumes for p in v.get("peers") or []]
        labels = ["volume", "peer"]
        yield from _families(
            _PEER_VALUES, labels, [(v, str(p.get("address")), p) for v, p in peers]
        )
        up = GaugeMetricFamily(
            "blockmirror_peer_replicating", "1 while the link replicates.", labels=labels
        )
        consistent = GaugeMetricFamily(
            "blockmirror_peer_consistent",
            "1 while the peer's replica is consistent.",
            labels=labels,
        )
        for volume, peer in peers:
            address = str(peer.get("address"))
            up.add_metric([volume, address], 1.0 if peer.get("state") == "replicating" else 0.0)
            consistent.add_metric([volume, address], 1.0 if peer.get("consistent") else 0.0)
        yield up
        yield consistent


def _families(
    values: Sequence[tuple[str, str, str, str]],
    labels: list[str],
    rows: Sequence[tuple[str, str, dict[str, Any]]],
) -> Iterator[Metric]:
    """One family per ``(name, help, key, "c" or "g")`` of ``values``, a sample per row
    ``(volume, second label, record)`` whose record has a number (a list counts its items)."""
    for name, help_text, key, kind in values:
        family: Metric
        if kind == "c":
            family = CounterMetricFamily(
                f"blockmirror_{name.removesuffix('_total')}", help_text, labels=labels
            )
        else:
            family = GaugeMetricFamily(f"blockmirror_{name}", help_text, labels=labels)
        for volume, second, record in rows:
            raw = record.get(key)
            value = float(len(raw)) if isinstance(raw, list) else _number(raw)
            if value is not None:
                family.add_metric([volume, second], value)
        yield family


_ARCHIVE_VALUES: Final = (
    ("archive_lag_seconds", "Age of the oldest record not yet archived.", "lag_seconds", "g"),
    ("archive_last_seq", "The newest record the archive holds.", "last_seq", "g"),
    ("archive_last_upload_time", "When a segment was last stored (Unix time).", "last_time", "g"),
    ("archive_uploaded_bytes_total", "Bytes put to the object store.", "bytes_uploaded", "c"),
    ("archive_objects_total", "Objects put to the object store.", "objects", "c"),
    ("archive_errors_total", "Failed uploads (each is retried).", "errors", "c"),
    ("archive_deleted_objects_total", "Objects retention deleted.", "deleted", "c"),
    ("archive_gaps", "Gaps in the archived chain (records never archived).", "gaps", "g"),
)


def _archives(volumes: list[dict[str, Any]]) -> Iterator[Metric]:
    """Per volume and archive (docs/archive.md): freshness, volume of uploads, health."""
    rows = [(str(v.get("name")), a) for v in volumes for a in v.get("archives") or []]
    labels = ["volume", "archive"]
    yield from _families(_ARCHIVE_VALUES, labels, [(v, str(a.get("archive")), a) for v, a in rows])
    up = GaugeMetricFamily(
        "blockmirror_archive_archiving", "1 while the archive takes uploads.", labels=labels
    )
    for volume, archive in rows:
        up.add_metric(
            [volume, str(archive.get("archive"))], float(archive.get("state") == "archiving")
        )
    yield up


def _events(status: dict[str, Any]) -> Iterator[Metric]:
    """Alert state: one gauge per event name, 1 for each open episode (a rule fires on it
    without parsing messages), and the delivery counters summed over the targets."""
    events = list(status.get("events") or [])
    for name in sorted({str(e.get("event")) for e in events}):
        family = GaugeMetricFamily(
            f"blockmirror_event_{name.replace('-', '_')}",
            f"1 while a {name} episode is open.",
            labels=["volume", "peer"],
        )
        for event in events:
            if event.get("event") == name:
                family.add_metric([str(event.get("volume") or ""), str(event.get("peer") or "")], 1)
        yield family
    yield GaugeMetricFamily("blockmirror_events_open", "Open event episodes.", len(events))
    targets = list((status.get("alert_targets") or {}).values())
    for name, help_text, key in (
        ("alerts_sent", "Alerts delivered to their targets.", "sent"),
        ("alert_delivery_failures", "Failed alert deliveries (each is retried).", "failed"),
        ("alerts_dropped", "Alerts dropped from a full target queue.", "dropped"),
    ):
        total = sum(_number(t.get(key)) or 0 for t in targets)
        yield CounterMetricFamily(f"blockmirror_{name}", help_text, total)
    queued = sum(_number(t.get("queued")) or 0 for t in targets)
    yield GaugeMetricFamily("blockmirror_alerts_queued", "Alerts waiting for a target.", queued)


def render_metrics(status: dict[str, Any]) -> bytes:
    """The exposition text of ``status`` (a ``GET /api/status`` document)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(status))
    return generate_latest(registry)
