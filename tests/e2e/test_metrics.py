"""``GET /metrics`` (issue 11, metrics): Prometheus text that parses, named by the conventions,
with the values ``/api/status`` shows."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.history import logged_workload
from tests.support.pair import MiB, Site, peer_address, topology, wait_caught_up
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
