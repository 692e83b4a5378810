"""The alert dispatcher: a bounded queue and a worker task per target, retries with backoff.

:meth:`AlertDispatcher.submit` is an :class:`~blockmirror.events.EventLog` listener: it only
appends to queues, so raising an event never waits for a network. Each target (the mail
server, each trap receiver, the webhook) has its own worker that delivers its queue in order,
one event at a time; a failed delivery is retried, the same event again, after a delay that
doubles from 1 s to 5 min (with jitter, so that units that lost the same server do not come
back in step), and is taken off the queue only once delivered. So an event reaches each
target once and in order, unless the queue overflowed meanwhile: then the oldest waiting event
is dropped and counted (a day of a flapping link must not grow memory without bound).

A failed delivery cannot be told from a delivered one whose answer was lost (a timeout after the
server took the message): then the retry sends it twice. That is the side to err on for alerts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from blockmirror.addresses import Address
from blockmirror.config_alerts import AlertsConfig, EmailTarget, SnmpTarget, WebhookTarget
from blockmirror.errors import NotifyError
from blockmirror.events import Event

__all__ = [
    "MAX_DELAY",
    "QUEUE_LIMIT",
    "AlertDispatcher",
    "Deliverer",
    "Target",
    "connect",
    "retry_delay",
    "targets_of",
]

log = logging.getLogger(__name__)

# Events waiting per target (besides the one being delivered).
QUEUE_LIMIT = 1000
FIRST_DELAY = 1.0
MAX_DELAY = 300.0
# A delay is shortened by up to this fraction, at random.
JITTER = 0.25
# A backstop over the transports' own timeouts: a worker never waits longer on one attempt.
ATTEMPT_TIMEOUT = 120.0

Kind = Literal["email", "snmp", "webhook"]
Settings = EmailTarget | SnmpTarget | WebhookTarget


@dataclass(frozen=True)
class Target:
    """One destination: ``name`` is its key in :meth:`AlertDispatcher.status` and across
    reconfigurations; ``settings`` is its configuration (for SNMP, with ``targets`` narrowed to
    this ``receiver``, so that adding a receiver leaves the others unchanged)."""

    name: str
    kind: Kind
    destination: str
    settings: Settings
    receiver: Address | None = None


class Deliverer(Protocol):
    """Sends events to one target. ``deliver`` raises on any failure; it may keep state (an
    SNMP engine) until ``aclose``."""

    async def deliver(self, event: Event) -> None: ...

    async def aclose(self) -> None: ...


Connect = Callable[[Target, str, str], Deliverer]


def connect(target: Target, unit: str, version: str) -> Deliverer:
    """The real deliverer of ``target`` (the default of AlertDispatcher's ``connect``)."""
    # Imported here: a dispatcher under test with fake deliverers needs none of the transports.
    if isinstance(target.settings, EmailTarget):
        from blockmirror.notify.mail import MailDeliverer

        return MailDeliverer(target.settings, version)
    if isinstance(target.settings, WebhookTarget):
        from blockmirror.notify.webhook import WebhookDeliverer

        return WebhookDeliverer(target.settings, version)
    from blockmirror.notify.traps import TrapDeliverer

    assert target.receiver is not None
    return TrapDeliverer(target.settings, target.receiver, unit, version)


def targets_of(config: AlertsConfig) -> list[Target]:
    """The destinations of ``config``, in a stable order: e-mail, trap receivers, webhook."""
    found: list[Target] = []
    if config.email is not None:
        found.append(Target("email", "email", str(config.email.smtp), config.email))
    if config.snmp is not None:
        for receiver in config.snmp.targets:
            one = dataclasses.replace(config.snmp, targets=(receiver,))
            found.append(Target(f"snmp {receiver}", "snmp", str(receiver), one, receiver))
    if config.webhook is not None:
        found.append(Target("webhook", "webhook", config.webhook.url, config.webhook))
    return found


def retry_delay(failures: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt after ``failures`` failed ones in a row (>= 1)."""
    base = min(MAX_DELAY, FIRST_DELAY * 2.0 ** min(max(failures, 1) - 1, 30))
    return base * (1 - JITTER * rng())


@dataclass(eq=False)
class _Channel:
    """A target's queue, its worker and its counters."""

    target: Target
    queue: deque[Event] = dataclasses.field(default_factory=deque)
    in_flight: Event | None = None
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # Set by reconfigure: the worker drops its deliverer and retries at once.
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    sent: int = 0
    failed: int = 0
    dropped: int = 0
    failures_in_row: int = 0
    last_error: str | None = None
    last_error_time: float | None = None
    last_sent_time: float | None = None
    retry_at: float | None = None

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def queued(self) -> int:
        return len(self.queue) + (self.in_flight is not None)

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.target.kind,
            "destination": self.target.destination,
            "sent": self.sent,
            "failed": self.failed,
            "dropped": self.dropped,
            "queued": self.queued,
            "last_error": self.last_error,
            "last_error_time": self.last_error_time,
            "last_sent_time": self.last_sent_time,
            "retrying": self.failures_in_row > 0 and self.in_flight is not None,
            "next_attempt_time": self.retry_at,
        }


class AlertDispatcher:
    """Delivers the events of unit ``unit`` to the targets of ``config``.

    ``submit`` may be called before ``start`` (events wait) and must be called on the event
    loop's thread, as EventLog's listeners are. ``sleep``, ``clock`` (wall-clock seconds, for
    the times in status), ``rng`` and ``connect`` are for tests.
    """

    def __init__(
        self,
        unit: str,
        config: AlertsConfig,
        *,
        version: str,
        queue_limit: int = QUEUE_LIMIT,
        connect: Connect = connect,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.unit = unit
        self.version = version
        self.config = config
        self.queue_limit = queue_limit
        self._connect = connect
        self._sleep = sleep
        self._clock = clock
        self._rng = rng
        self._channels: dict[str, _Channel] = {t.name: _Channel(t) for t in targets_of(config)}
        # Workers of removed targets, cancelled, awaited by close().
        self._retired: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False

    # -- the listener -------------------------------------------------------------------------

    def submit(self, event: Event) -> None:
        """Queue ``event`` for every target; never blocks, never raises."""
        try:
            if self._closed:
                return
            for channel in self._channels.values():
                if len(channel.queue) >= self.queue_limit:
                    lost = channel.queue.popleft()
                    channel.dropped += 1
                    log.warning(
                        "alert target %s: queue full (%d), dropped event %d (%s)",
                        channel.target.name,
                        self.queue_limit,
                        lost.id,
                        lost.name,
                    )
                channel.queue.append(event)
                channel.idle.clear()
                channel.wake.set()
        except Exception:
            log.exception("queueing event %s for its alert targets failed", event.id)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start a worker per target; call it inside the running event loop."""
        if self._started or self._closed:
            return
        self._started = True
        for channel in self._channels.values():
            self._spawn(channel)

    def _spawn(self, channel: _Channel) -> None:
        channel.task = asyncio.get_running_loop().create_task(
            self._work(channel), name=f"alerts {channel.target.name}"
        )

    def reconfigure(self, config: AlertsConfig) -> None:
        """Adopt a reloaded ``[alerts]``: new targets start empty, removed ones stop (their
        queued events are gone with them), a target whose settings changed keeps its queue and
        counters and retries at once with the new settings."""
        self.config = config
        wanted = {t.name: t for t in targets_of(config)}
        for name in [n for n in self._channels if n not in wanted]:
            channel = self._channels.pop(name)
            if channel.queued:
                log.warning(
                    "alert target %s removed with %d events undelivered", name, channel.queued
                )
            if channel.task is not None:
                channel.task.cancel()
                self._retired.add(channel.task)
        for name, target in wanted.items():
            kept = self._channels.get(name)
            if kept is None:
                added = self._channels[name] = _Channel(target)
                if self._started and not self._closed:
                    self._spawn(added)
            elif kept.target != target:
                kept.target = target
                kept.failures_in_row = 0
                kept.changed.set()

    async def close(self, *, drain: float = 0.0) -> None:
        """Stop every worker. With ``drain`` > 0, first wait up to that many seconds for the
        queues to empty (the events of a stopping unit); what is left is dropped."""
        if drain > 0 and self._started and not self._closed:
            waits = [asyncio.ensure_future(c.idle.wait()) for c in self._channels.values()]
            if waits:
                _, pending = await asyncio.wait(waits, timeout=drain)
                for waiter in pending:
                    waiter.cancel()
        self._closed = True
        tasks = [c.task for c in self._channels.values() if c.task is not None]
        tasks += self._retired
        self._retired.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- what status shows --------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        """Per target name: ``kind``, ``destination``, ``sent``, ``failed`` (attempts),
        ``dropped`` (queue overflow), ``queued`` (waiting and in delivery), ``last_error``,
        ``last_error_time``, ``last_sent_time`` (wall-clock seconds), ``retrying`` and
        ``next_attempt_time`` (when a retry is due)."""
        return {name: channel.status() for name, channel in self._channels.items()}

    # -- the worker ---------------------------------------------------------------------------

    async def _work(self, channel: _Channel) -> None:
        deliverer: Deliverer | None = None
        made_for: Target | None = None
        try:
            while True:
                if channel.in_flight is None:
                    while not channel.queue:
                        channel.idle.set()
                        channel.wake.clear()
                        await channel.wake.wait()
                    channel.in_flight = channel.queue.popleft()
                channel.changed.clear()
                channel.retry_at = None
                if deliverer is None or made_for != channel.target:
                    if deliverer is not None:
                        await _close_quietly(deliverer)
                    deliverer = None
                    made_for = channel.target
                    try:
                        deliverer = self._connect(made_for, self.unit, self.version)
                    except Exception as exc:
                        self._failed(channel, exc)
                if deliverer is not None and await self._attempt(
                    channel, deliverer, channel.in_flight
                ):
                    channel.in_flight = None
                    continue
                delay = retry_delay(channel.failures_in_row, self._rng)
                channel.retry_at = self._clock() + delay
                log.warning(
                    "alert target %s: delivering event %d failed (%s); retry in %.0f s",
                    channel.target.name,
                    channel.in_flight.id,
                    channel.last_error,
                    delay,
                )
                await self._pause(channel, delay)
        finally:
            if deliverer is not None:
                await _close_quietly(deliverer)

    async def _attempt(self, channel: _Channel, deliverer: Deliverer, event: Event) -> bool:
        try:
            async with asyncio.timeout(ATTEMPT_TIMEOUT):
                await deliverer.deliver(event)
        except Exception as exc:
            self._failed(channel, exc)
            return False
        channel.sent += 1
        channel.failures_in_row = 0
        channel.retry_at = None
        channel.last_sent_time = self._clock()
        return True

    def _failed(self, channel: _Channel, exc: Exception) -> None:
        channel.failed += 1
        channel.failures_in_row += 1
        channel.last_error = _describe(exc)
        channel.last_error_time = self._clock()

    async def _pause(self, channel: _Channel, delay: float) -> None:
        """Sleep ``delay``, or less if the target's settings change meanwhile."""
        sleeper = asyncio.ensure_future(self._sleep(delay))
        changed = asyncio.ensure_future(channel.changed.wait())
        try:
            await asyncio.wait((sleeper, changed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (sleeper, changed):
                waiter.cancel()
            await asyncio.gather(sleeper, changed, return_exceptions=True)


async def _close_quietly(deliverer: Deliverer) -> None:
    try:
        async with asyncio.timeout(5.0):
            await deliverer.aclose()
    except Exception:
        log.exception("closing an alert deliverer failed")


def _describe(exc: BaseException) -> str:
    """One line for status: our own errors say it all; others are named by their type."""
    if isinstance(exc, NotifyError):
        text = str(exc)
    elif isinstance(exc, TimeoutError) and not str(exc):
        text = f"timed out after {ATTEMPT_TIMEOUT:.0f} s or the transport's own timeout"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split())[:300]
