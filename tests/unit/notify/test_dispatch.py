"""The alert dispatcher alone, on fake deliverers and a fake clock: queues, order, backoff,
the queue bound, live reconfiguration and status. (The real transports: tests/e2e.)"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.addresses import Address
from blockmirror.config_alerts import AlertsConfig, EmailTarget, SnmpTarget, WebhookTarget
from blockmirror.errors import NotifyError
from blockmirror.events import Event, EventName, EventState, Subject
from blockmirror.notify import dispatch
from blockmirror.notify.dispatch import AlertDispatcher, Target, retry_delay, targets_of

EMAIL = EmailTarget(("ops@example.com",), "bm@example.com", Address("127.0.0.1", 25))
WEBHOOK = WebhookTarget("http://127.0.0.1:9/hook", False, "127.0.0.1", 9, "/hook")
SNMP = SnmpTarget((Address("127.0.0.1", 162), Address("127.0.0.2", 162)), community="public")


def event(n: int) -> Event:
    return Event(
        n, EventName.LINK_DOWN, EventState.RAISED, "site-a", Subject("db", "b:1"), "m", n, n
    )


class Fake:
    """A deliverer: fails while its hub says so, blocks while the hub's gate is closed."""

    def __init__(self, hub: Hub, target: Target) -> None:
        self.hub = hub
        self.target = target
        self.closed = False

    async def deliver(self, ev: Event) -> None:
        name = self.target.name
        self.hub.attempts.setdefault(name, []).append(ev.id)
        await self.hub.gates.setdefault(name, asyncio.Event()).wait()
        if self.hub.failures.get(name, 0) > 0:
            self.hub.failures[name] -= 1
            raise NotifyError(f"{name} refused {ev.id}")
        self.hub.delivered.setdefault(name, []).append((ev.id, self.target.settings))

    async def aclose(self) -> None:
        self.closed = True


class Hub:
    """What the fakes did, per target name; every gate starts open."""

    def __init__(self) -> None:
        self.made: list[Fake] = []
        self.attempts: dict[str, list[int]] = {}
        self.delivered: dict[str, list[tuple[int, object]]] = {}
        self.failures: dict[str, int] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.delays: list[float] = []

    def connect(self, target: Target, unit: str, version: str) -> Fake:
        assert (unit, version) == ("site-a", "9.9")
        fake = Fake(self, target)
        self.made.append(fake)
        return fake

    def open(self, name: str) -> None:
        self.gates.setdefault(name, asyncio.Event()).set()

    def close(self, name: str) -> None:
        self.gates[name] = asyncio.Event()

    def ids(self, name: str) -> list[int]:
        return [i for i, _ in self.delivered.get(name, [])]

    async def quick_sleep(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)

    async def endless_sleep(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.Event().wait()


def make(
    hub: Hub,
    config: AlertsConfig,
    *,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    **kwargs: Any,
) -> AlertDispatcher:
    for t in targets_of(config):
        hub.open(t.name)
    return AlertDispatcher(
        "site-a",
        config,
        version="9.9",
        connect=hub.connect,
        sleep=sleep or hub.quick_sleep,
        clock=lambda: 1000.0,
        rng=lambda: 0.0,
        **kwargs,
    )


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    # Polling: the fakes' progress is plain state, with no event to wait on.
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.001)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


def test_events_queued_before_start_are_delivered_in_order_to_every_target() -> None:
    async def main() -> None:
        hub = Hub()
        d = make(hub, AlertsConfig(email=EMAIL, webhook=WEBHOOK))
        for n in (1, 2, 3):
            d.submit(event(n))
        assert d.status()["email"]["queued"] == 3 and not hub.made
        d.start()
        await until(lambda: len(hub.ids("webhook")) == 3 and len(hub.ids("email")) == 3)
        assert hub.ids("email") == hub.ids("webhook") == [1, 2, 3]
        status = d.status()
        assert status["email"] | {"last_sent_time": 0} == {
            "kind": "email",
            "destination": "127.0.0.1:25",
            "sent": 3,
            "failed": 0,
            "dropped": 0,
            "queued": 0,
            "last_error": None,
            "last_error_time": None,
            "last_sent_time": 0,
            "retrying": False,
            "next_attempt_time": None,
        }
        assert status["email"]["last_sent_time"] == 1000.0
        await d.close()

    run(main)


def test_a_failing_target_backs_off_exponentially_and_delivers_once_in_order() -> None:
    async def main() -> None:
        hub = Hub()
        d = make(hub, AlertsConfig(webhook=WEBHOOK))
        hub.failures["webhook"] = 11
        d.start()
        for n in (1, 2, 3):
            d.submit(event(n))
        await until(lambda: len(hub.ids("webhook")) == 3)
        assert hub.ids("webhook") == [1, 2, 3]
        # The first event took every failure; the others went through once each.
        assert hub.attempts["webhook"] == [1] * 12 + [2, 3]
        assert hub.delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
        s = d.status()["webhook"]
        assert (s["sent"], s["failed"], s["queued"]) == (3, 11, 0)
        assert s["last_error"] == "webhook refused 1" and s["last_error_time"] == 1000.0
        assert not s["retrying"] and s["next_attempt_time"] is None
        await d.close()

    run(main)


def test_after_a_success_the_backoff_starts_again_at_one_second() -> None:
    async def main() -> None:
        hub = Hub()
        d = make(hub, AlertsConfig(webhook=WEBHOOK))
        d.start()
        hub.failures["webhook"] = 3
        d.submit(event(1))
        await until(lambda: hub.ids("webhook") == [1])
        hub.failures["webhook"] = 2
        d.submit(event(2))
        await until(lambda: hub.ids("webhook") == [1, 2])
        assert hub.delays == [1, 2, 4, 1, 2]
        await d.close()

    run(main)


@given(st.integers(1, 200), st.floats(0, 1))
def test_retry_delays_double_from_one_second_to_five_minutes_with_jitter(
    failures: int, r: float
) -> None:
    base = min(300.0, 2.0 ** (failures - 1))
    delay = retry_delay(failures, lambda: r)
    assert base * (1 - dispatch.JITTER) <= delay <= base
    assert retry_delay(failures + 1, lambda: 0.0) >= retry_delay(failures, lambda: 0.0)


def test_status_shows_a_target_that_is_retrying() -> None:
    async def main() -> None:
        hub = Hub()
        d = make(hub, AlertsConfig(email=EMAIL), sleep=hub.endless_sleep)
        hub.failures["email"] = 1
        d.start()
        d.submit(event(7))
        await until(lambda: bool(hub.delays))
        s = d.status()["email"]
        assert s["retrying"] and s["queued"] == 1 and s["failed"] == 1 and s["sent"] == 0
        assert s["next_attempt_time"] == 1001.0 and s["last_error"] == "email refused 7"
        await d.close()
        assert hub.made[0].closed

    run(main)


def test_a_full_queue_drops_the_oldest_waiting_events_and_counts_them() -> None:
    async def main() -> None:
        hub = Hub()
        d = make(hub, AlertsConfig(email=EMAIL, webhook=WEBHOOK), queue_limit=3)
        hub.close("email")
        d.start()
        d.submit(event(1))
        await until(lambda: hub.attempts.get("email") == [1])  # 1 is in delivery
        for n in range(2, 11):
            d.submit(event(n))
            # The webhook's worker keeps up: its queue is its own, it loses nothing.
            await until(lambda n=n: hub.ids("webhook")[-1:] == [n])  # type: ignore[misc]
        s = d.status()["email"]
        assert (s["queued"], s["dropped"]) == (4, 6)
        assert d.status()["webhook"]["dropped"] == 0
        hub.open("email")
        await until(lambda: len(hub.ids("email")) == 4)
        assert hub.ids("email") == [1, 8, 9, 10]
        await d.close()

    run(main)


def test_a_stuck_target_delays_neither_submit_nor_the_other_targets() -> None:
    async def main() -> None:
        hub = Hub()
        d = make(hub, AlertsConfig(email=EMAIL, webhook=WEBHOOK), sleep=hub.endless_sleep)
        hub.failures["email"] = 1_000_000
        d.start()
        for n in range(1, 6):
            d.submit(event(n))  # synchronous: returns without awaiting anything
        await until(lambda: len(hub.ids("webhook")) == 5)
        s = d.status()["email"]
        assert s["sent"] == 0 and s["queued"] == 5 and s["retrying"]
        await d.close()

    run(main)


def test_a_hung_delivery_times_out_and_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "ATTEMPT_TIMEOUT", 0.05)

    async def main() -> None:
        hub = Hub()
        d = make(hub, AlertsConfig(webhook=WEBHOOK))
        hub.close("webhook")
        d.start()
        d.submit(event(1))
        await until(lambda: len(hub.attempts.get("webhook", [])) >= 2)
        hub.open("webhook")
        await until(lambda: hub.ids("webhook") == [1])
        assert "timed out" in str(d.status()["webhook"]["last_error"])
        await d.close()

    run(main)


def test_reconfigure_adds_removes_and_changes_targets() -> None:
    async def main() -> None:
        hub = Hub()
        d = make(hub, AlertsConfig(email=EMAIL, snmp=SNMP), sleep=hub.endless_sleep)
        d.start()
        hub.failures["email"] = 1
        d.submit(event(1))
        await until(lambda: bool(hub.delays) and len(hub.ids("snmp 127.0.0.1:162")) == 1)
        assert d.status()["email"]["retrying"]
        d.submit(event(2))

        # email changes (a fixed recipient list), the second trap receiver goes away, a
        # webhook appears; the first trap receiver is unchanged.
        fixed = dataclasses.replace(EMAIL, to=("oncall@example.com",))
        one_receiver = dataclasses.replace(SNMP, targets=SNMP.targets[:1])
        hub.open("webhook")
        d.reconfigure(AlertsConfig(email=fixed, snmp=one_receiver, webhook=WEBHOOK))
        assert list(d.status()) == ["email", "snmp 127.0.0.1:162", "webhook"]

        # The changed target retries at once (its endless backoff cut short), with the new
        # settings, and keeps its queue and counters.
        await until(lambda: hub.ids("email") == [1, 2])
        assert [settings for _, settings in hub.delivered["email"]] == [fixed, fixed]
        assert d.status()["email"]["failed"] == 1 and d.status()["email"]["sent"] == 2
        # The removed receiver's deliverer was closed; the unchanged one kept its deliverer.
        await until(lambda: sum(f.closed for f in hub.made) == 2)
        closed = {f.target.name for f in hub.made if f.closed}
        assert closed == {"snmp 127.0.0.2:162", "email"}
        made = [f.target.name for f in hub.made]
        assert made.count("snmp 127.0.0.1:162") == 1
        # The new target gets what is submitted from now on, not what came before.
        d.submit(event(3))
        await until(lambda: hub.ids("webhook") == [3] and hub.ids("email") == [1, 2, 3])
        assert hub.ids("snmp 127.0.0.1:162") == [1, 2, 3]
        await d.close()

    run(main)


def test_an_unchanged_target_keeps_its_queue_across_a_reload() -> None:
    async def main() -> None:
        hub = Hub()
        d = make(hub, AlertsConfig(email=EMAIL))
        hub.close("email")
        d.start()
        for n in (1, 2, 3):
            d.submit(event(n))
        await until(lambda: hub.attempts.get("email") == [1])
        d.reconfigure(AlertsConfig(email=EMAIL, rpo_seconds=60))
        assert d.config.rpo_seconds == 60 and d.status()["email"]["queued"] == 3
        hub.open("email")
        await until(lambda: hub.ids("email") == [1, 2, 3])
        assert len(hub.made) == 1
        await d.close()

    run(main)


def test_close_can_drain_the_queues_first_and_stops_the_workers() -> None:
    async def main() -> None:
        hub = Hub()
        d = make(hub, AlertsConfig(email=EMAIL, webhook=WEBHOOK))
        d.start()
        for n in (1, 2):
            d.submit(event(n))
        await d.close(drain=10)
        assert hub.ids("email") == hub.ids("webhook") == [1, 2]
        assert all(f.closed for f in hub.made)
        d.submit(event(3))  # after close: ignored, not raised
        assert d.status()["email"]["queued"] == 0

    run(main)


def test_close_without_drain_abandons_a_blocked_delivery() -> None:
    async def main() -> None:
        hub = Hub()
        d = make(hub, AlertsConfig(email=EMAIL))
        hub.close("email")
        d.start()
        d.submit(event(1))
        await until(lambda: hub.attempts.get("email") == [1])
        await d.close(drain=0.05)  # cannot drain: gives up after the time given
        assert hub.ids("email") == [] and hub.made[0].closed

    run(main)


def test_targets_of_names_each_destination_and_narrows_snmp_to_its_receiver() -> None:
    targets = targets_of(AlertsConfig(email=EMAIL, snmp=SNMP, webhook=WEBHOOK))
    assert [(t.name, t.kind, t.destination) for t in targets] == [
        ("email", "email", "127.0.0.1:25"),
        ("snmp 127.0.0.1:162", "snmp", "127.0.0.1:162"),
        ("snmp 127.0.0.2:162", "snmp", "127.0.0.2:162"),
        ("webhook", "webhook", "http://127.0.0.1:9/hook"),
    ]
    alone = targets_of(AlertsConfig(snmp=dataclasses.replace(SNMP, targets=SNMP.targets[1:])))
    assert alone == [targets[2]]
    assert targets_of(AlertsConfig()) == []


def test_the_real_connect_builds_each_transport(tmp_path: Path) -> None:
    from blockmirror.notify.mail import MailDeliverer
    from blockmirror.notify.traps import TrapDeliverer
    from blockmirror.notify.webhook import WebhookDeliverer

    kinds = [
        type(dispatch.connect(t, "site-a", "1.0"))
        for t in targets_of(AlertsConfig(email=EMAIL, snmp=SNMP, webhook=WEBHOOK))
    ]
    assert kinds == [MailDeliverer, TrapDeliverer, TrapDeliverer, WebhookDeliverer]


def test_a_deliverer_that_cannot_be_made_is_retried_like_a_failed_delivery() -> None:
    async def main() -> None:
        hub = Hub()
        broken = [True]

        def connect(target: Target, unit: str, version: str) -> Fake:
            if broken.pop() if broken else False:
                raise OSError("no SNMP engine today")
            return hub.connect(target, unit, version)

        hub.open("webhook")
        d = AlertDispatcher(
            "site-a", AlertsConfig(webhook=WEBHOOK), version="9.9", connect=connect,
            sleep=hub.quick_sleep, rng=lambda: 0.0,
        )  # fmt: skip
        d.start()
        d.submit(event(1))
        await until(lambda: hub.ids("webhook") == [1])
        s = d.status()["webhook"]
        assert (s["failed"], s["sent"]) == (1, 1) and hub.delays == [1.0]
        assert s["last_error"] == "OSError: no SNMP engine today"
        await d.close()

    run(main)
