"""Alerts from real units to real receivers (issue 11): Debian's snmptrapd, an aiosmtpd server
and a webhook server, configured in ``[alerts]`` and changed by a reload.

What must hold: cutting a peer's link sends exactly one ``link-down`` trap, one e-mail and one
webhook call, and one clear of each when it returns; a journal filled past its mark sends one
``journal-high-water``; a tiny ``rpo_seconds`` (set by a reload) and a stalled peer send
``rpo-exceeded`` to the webhook the reload named, not the old one; traps and mails carry the
event name as text and the unit's version. A dead SMTP server does not hold up host writes or
the other targets.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from blockmirror import __version__
from blockmirror.notify.traps import CLEARED, OBJECTS, RAISED
from tests.support.alerting import alerts_table, hooks, receivers, set_alerts, until
from tests.support.pair import (
    MiB,
    fio_args,
    frozen,
    peer_address,
    qemu_write,
    topology,
    wait_caught_up,
)
from tests.support.receivers import (
    free_port,
    webhook_server,
)
from tests.support.unit_process import BLOCKMIRROR

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore:Session.login_data is deprecated"),
]

SIZE = 32 * MiB
NAME, STATE, VERSION = OBJECTS["bmEventName"], OBJECTS["bmEventState"], OBJECTS["bmVersion"]


def test_link_down_high_water_and_rpo_reach_every_target_once(tmp_path: Path) -> None:
    with receivers(tmp_path / "rx") as r, topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary(
            "site-a",
            peers=[peer_address(b)],
            size=SIZE,
            journal_size="16MiB",
            extra={"journal_high_water": 0.5},
        )
        set_alerts(a, alerts_table(tmp_path, r, link_down_seconds=1))
        b.start()
        a.start()
        assert a.unit is not None
        wait_caught_up(a, b)

        b.kill()
        until(lambda: r.trap_events("link-down", "raised"), "a link-down trap")
        until(lambda: r.mails("link-down", "raised"), "a link-down mail")
        until(lambda: hooks(r.hook, "link-down", "raised"), "a link-down webhook")
        qemu_write(a, 0x41, 0, "9M")
        until(lambda: r.trap_events("journal-high-water", "raised"), "a high-water trap")
        qemu_write(a, 0x42, 9 * MiB, "1M")
        time.sleep(3)  # several looks of the watch loop, and time for duplicates to arrive
        assert len(r.trap_events("link-down", "raised")) == 1
        assert len(r.mails("link-down", "raised")) == 1
        assert len(hooks(r.hook, "link-down", "raised")) == 1
        assert len(r.trap_events("journal-high-water", "raised")) == 1
        assert len(r.mails("journal-high-water", "raised")) == 1

        b.start()
        until(lambda: r.trap_events("link-down", "cleared"), "the link-down clear trap")
        until(lambda: r.mails("link-down", "cleared"), "the link-down clear mail")
        wait_caught_up(a, b)
        until(lambda: r.trap_events("journal-high-water", "cleared"), "the high-water clear")
        [down] = r.trap_events("link-down", "raised")
        [up] = r.trap_events("link-down", "cleared")
        assert down.oid == RAISED and up.oid == CLEARED
        assert down.text(VERSION) == __version__
        [mail] = r.mails("link-down", "raised")
        assert "link-down" in mail.message.get_content()
        assert mail.message["To"] == "ops@example.test"

        # A reload changes a threshold and a target: rpo-exceeded goes to the new webhook.
        with webhook_server() as new_hook:
            table = alerts_table(tmp_path, r, link_down_seconds=60, rpo_seconds=1)
            table["webhook"] = new_hook.url
            set_alerts(a, table)
            done = subprocess.run(
                [*BLOCKMIRROR, "reload", "--config", str(a.config)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0 and "alerts" in done.stdout, done.stdout + done.stderr
            before_old = len(r.hook.requests)
            with frozen(b):
                qemu_write(a, 0x43, 0, "64k")
                until(lambda: hooks(new_hook, "rpo-exceeded", "raised"), "rpo on the new hook")
                until(lambda: r.trap_events("rpo-exceeded", "raised"), "an rpo-exceeded trap")
            until(lambda: hooks(new_hook, "rpo-exceeded", "cleared"), "the rpo clear")
            assert len(r.hook.requests) == before_old  # the old webhook is no longer told
            targets = a.status()["alert_targets"]
            assert targets["webhook"]["destination"] == new_hook.url
            assert all(t["failed"] == 0 for t in targets.values()), targets


def test_a_dead_smtp_server_holds_up_neither_writes_nor_other_targets(tmp_path: Path) -> None:
    with webhook_server() as hook, topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE)
        dead = f"127.0.0.1:{free_port()}"  # nothing listens there
        set_alerts(
            a,
            {
                "link_down_seconds": 1,
                "email": {
                    "to": ["ops@example.test"],
                    "from": "bm@example.test",
                    "smtp": dead,
                    "starttls": False,
                },
                "webhook": hook.url,
            },
        )
        b.start()
        a.start()
        assert a.unit is not None
        wait_caught_up(a, b)
        b.kill()
        until(lambda: hooks(hook, "link-down", "raised"), "link-down on the webhook")

        def retrying() -> bool:
            mail = a.status()["alert_targets"]["email"]
            return bool(mail["failed"] >= 1 and mail["queued"] >= 1)

        until(retrying, "the mail to be retried")
        written_before = a.volume_status()["counters"]["bytes_written"]
        started = time.monotonic()
        fio = subprocess.run(
            fio_args(a.unit.export_url("vol"), size="16MiB", iodepth=8),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            check=False,
        )
        seconds = time.monotonic() - started
        assert fio.returncode == 0 and "err= 0" in fio.stdout, fio.stdout + fio.stderr
        mail = a.status()["alert_targets"]["email"]
        # Still failing and still queued: the writes ran while deliveries were being retried.
        assert mail["failed"] >= 1 and mail["queued"] >= 1 and mail["sent"] == 0, mail
        # (fio writes most of the 16 MiB range: its random map is not exact.)
        assert a.volume_status()["counters"]["bytes_written"] >= written_before + 8 * MiB
        print(f"16 MiB of 4 KiB writes with a dead SMTP server: {16 / seconds:.1f} MiB/s")
        b.start()
        until(lambda: hooks(hook, "link-down", "cleared"), "the clear on the webhook")
