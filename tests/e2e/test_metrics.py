"""``GET /metrics`` (issue 11, metrics): Prometheus text that parses, named by the conventions,
with the values ``/api/status`` shows."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.alerting import set_alerts
from tests.support.history import logged_workload
from tests.support.pair import MiB, Site, peer_address, topology, wait_caught_up, wait_status
from tests.support.unit_process import fetch_status

pytestmark = pytest.mark.e2e


def scrape(site: Site, token: str | None) -> tuple[int, str, str]:
    assert site.unit is not None
    request = urllib.request.Request(f"http://{site.unit.admin}/metrics")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, "", ""


def test_metrics_parse_follow_the_conventions_and_match_the_status(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": 8 * MiB})
        a = topo.add_primary(
            "site-a", peers=[peer_address(b)], size=8 * MiB, extra={"history": "1h"}
        )
        b.start()
        a.start()
        wait_caught_up(a, b)
        logged_workload(a, size=8 * MiB, count=40)
        wait_caught_up(a, b)
        assert a.unit is not None
        code, _, _ = scrape(a, None)
        assert code == 401  # the admin token, as for /api/status
        code, content_type, text = scrape(a, a.unit.admin_token)
        status = fetch_status(a.unit)
        assert code == 200 and content_type.startswith("text/plain"), content_type
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families, text
        for family in families.values():
            assert family.name.startswith("blockmirror_"), family.name
            for sample in family.samples:
                allowed = {"version"} if family.name == "blockmirror_info" else {"volume", "peer"}
                assert set(sample.labels) <= allowed, sample
                if family.type == "counter" and not sample.name.endswith("_created"):
                    assert sample.name.endswith("_total"), sample.name

        def value(name: str, **labels: str) -> float:
            for sample in families[name].samples:
                if sample.name in (name, f"{name}_total") and sample.labels == labels:
                    return float(sample.value)
            raise AssertionError(f"no {name} {labels} in {families[name].samples}")

        vol = status["volumes"][0]
        peer = vol["peers"][0]
        assert value("blockmirror_info", version=status["version"]) == 1
        assert value("blockmirror_writes", volume="vol") == vol["counters"]["writes"] >= 40
        assert value("blockmirror_written_bytes", volume="vol") == vol["counters"]["bytes_written"]
        assert value("blockmirror_journal_used_bytes", volume="vol") == vol["journal"]["used"]
        assert value("blockmirror_history_bytes", volume="vol") == vol["history"]["bytes"] > 0
        where = {"volume": "vol", "peer": peer["address"]}
        assert value("blockmirror_peer_acked_seq", **where) == peer["acked_seq"]
        assert value("blockmirror_peer_lag_bytes", **where) == peer["lag_bytes"] == 0
        assert value("blockmirror_peer_replicating", **where) == 1
        assert value("blockmirror_peer_sent_bytes", **where) == peer["bytes_sent"]


def test_alert_state_config_version_and_last_ack_are_metrics(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": 8 * MiB})
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=8 * MiB)
        set_alerts(a, {"link_down_seconds": 1})
        b.start()
        a.start()
        wait_caught_up(a, b)
        assert a.unit is not None
        token = a.unit.admin_token

        def families() -> dict[str, Any]:
            code, _, text = scrape(a, token)
            assert code == 200
            return {f.name: f for f in text_string_to_metric_families(text)}

        found = families()
        status = fetch_status(a.unit)
        [version] = found["blockmirror_config_version"].samples
        assert version.value == status["config_version"] == 1
        [ack] = found["blockmirror_peer_last_ack_timestamp_seconds"].samples
        assert abs(ack.value - time.time()) < 60
        assert ack.labels == {"volume": "vol", "peer": peer_address(b)}
        assert not any(name.startswith("blockmirror_event_link_down") for name in found)
        b.kill()
        wait_status(
            lambda: "blockmirror_event_link_down" in families() or None,
            timeout=30,
            what="the link-down metric",
        )
        found = families()
        [down] = found["blockmirror_event_link_down"].samples
        assert down.value == 1 and down.labels == {"volume": "vol", "peer": peer_address(b)}
        assert found["blockmirror_events_open"].samples[0].value >= 1
        open_now = {e["event"] for e in fetch_status(a.unit)["events"]}
        assert "link-down" in open_now
