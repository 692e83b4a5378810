"""What a link runs with and how fast it may go: the settings side of a sender.

:class:`LinkControl` holds a link's bandwidth limit (the token bucket the outbound stream
charges), its compressor, its in-flight window (:mod:`blockmirror.link.flight`), its priority
(TCP-LP on the socket, or the delay-based controller of :mod:`blockmirror.link.background`) and
its transmit windows. :class:`~blockmirror.link.sender.PeerSender` is one; a reload and
``blockmirror link set`` change a live link through these methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import socket
from typing import TYPE_CHECKING

from blockmirror.link.background import PriorityControl, QuietGate
from blockmirror.link.compression import Codec, Compressor, negotiated
from blockmirror.link.flight import FlightWindow
from blockmirror.link.ratelimit import TokenBucket
from blockmirror.link.sender_stats import SenderStats
from blockmirror.link.settings import ConnectMode, LinkSettings, Priority

if TYPE_CHECKING:
    from blockmirror.link.outbound import OutboundStream
    from blockmirror.link.session import LinkSession

__all__ = ["LinkControl"]


class LinkControl:
    def __init__(self) -> None:
        # The link's bandwidth limit (set_rate), charged by the outbound stream.
        self.bucket = TokenBucket()
        self.rate_limit: int | None = None
        # The rest of the link's settings (apply_settings): compression, priority, windows.
        self.settings = LinkSettings()
        self.compressor: Compressor | None = None
        self.peer_decodes: tuple[str, ...] = ()  # the codecs the connected peer listed
        self.flight = FlightWindow()
        self.priority_control = PriorityControl.NONE
        self.quiet_gate: QuietGate | None = None  # a delay-based background link's
        self._settings_changed = asyncio.Event()
        self.stats = SenderStats()
        # The connected session, if any (the sender sets both).
        self.stream: OutboundStream | None = None
        self._link: LinkSession | None = None

    def set_rate(self, bits_per_second: int | None) -> None:
        """The link's bandwidth limit from now on (None: none); at start and by a reload."""
        self.rate_limit = bits_per_second
        self.bucket.set_rate(bits_per_second / 8 if bits_per_second else None)
        self._settings_changed.set()

    def set_compression(self, codec: Codec, level: int) -> None:
        """Compress from the next frame on (none: send plain)."""
        self.settings = dataclasses.replace(
            self.settings, compression=codec, compression_level=level
        )
        self.compressor = None if codec is Codec.NONE else Compressor(codec, level)
        if self.stream is not None:
            self.stream.compress = negotiated(codec, self.peer_decodes) is not Codec.NONE

    def set_priority(self, priority: Priority) -> None:
        """Normal or background from now on (on the connected socket too)."""
        self.settings = dataclasses.replace(self.settings, priority=priority)
        link = self._link
        self._choose_priority(link.extra("socket") if link is not None else None)

    def _choose_priority(self, sock: socket.socket | None) -> None:
        """TCP-LP on the socket where the kernel has it, else the delay-based gate."""
        background = self.settings.priority is Priority.BACKGROUND
        control = PriorityControl.NONE
        if background:
            control = PriorityControl.DELAY_BASED
            if sock is not None and _set_congestion(sock, b"lp"):
                control = PriorityControl.TCP_LP
        elif sock is not None and self.priority_control is PriorityControl.TCP_LP:
            _set_congestion(sock, _default_congestion())
        self.priority_control = control
        if control is PriorityControl.DELAY_BASED:
            if self.quiet_gate is None:
                self.quiet_gate = QuietGate()
        else:
            self.quiet_gate = None

    def apply_settings(self, settings: LinkSettings) -> None:
        """Run with ``settings`` from now on (at start and after a reload)."""
        self.set_rate(settings.bandwidth)
        self.settings = settings
        self.set_compression(settings.compression, settings.compression_level)
        self.set_priority(settings.priority)
        self._settings_changed.set()

    # --- transmit windows -----------------------------------------------------------------------

    @staticmethod
    def now() -> dt.datetime:
        """Local wall-clock time, as transmit windows are written."""
        return dt.datetime.now()

    def window_opens(self) -> dt.datetime | None:
        """When the link's transmit window opens, if it is closed now (None: open)."""
        schedule = self.settings.schedule
        now = self.now()
        if schedule.is_open(now):
            return None
        return schedule.next_change(now)

    @property
    def dial_up(self) -> bool:
        return self.settings.connect is ConnectMode.WINDOWS

    def _window_status(self) -> tuple[str, str | None]:
        schedule = self.settings.schedule
        now = self.now()
        change = schedule.next_change(now)
        until = change.astimezone().isoformat() if change is not None else None
        return ("open" if schedule.is_open(now) else "closed"), until

    async def _wait_for_window(self) -> None:
        """A dial-up style link outside its windows: wait (status says until when)."""
        while (opens := self.window_opens()) is not None and self.dial_up:
            self.stats.reason = (
                f"outside its transmit windows until {opens.astimezone().isoformat()}"
            )
            self._settings_changed.clear()
            wait = max(0.05, min(60.0, (opens - self.now()).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settings_changed.wait(), wait)

    def _eta(self, lag: int) -> float | None:
        """Seconds to lag 0 at the current rate (0 when caught up; None: not moving)."""
        if lag == 0:
            return 0.0
        rate = self.stats.throughput
        if self.stream is None or rate <= 0 or self.window_opens() is not None:
            return None
        return round(lag / rate, 1)


def _set_congestion(sock: socket.socket, name: bytes) -> bool:
    """Whether the kernel took congestion control ``name`` for ``sock`` (``lp`` is a module
    many kernels lack: ENOENT)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name)
    except OSError:
        return False
    return True


def _default_congestion() -> bytes:
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control", "rb") as f:
            return f.read().strip() or b"cubic"
    except OSError:
        return b"cubic"
