"""systemd's notify protocol (``Type=notify``): READY, STOPPING, STATUS and the watchdog.

When ``NOTIFY_SOCKET`` is set (systemd sets it for a ``Type=notify`` service), a datagram of
``KEY=VALUE`` lines goes to that AF_UNIX socket (a leading ``@`` is Linux's abstract
namespace). ``WATCHDOG_USEC`` (with ``WATCHDOG_PID`` naming this process, if set) asks for a
``WATCHDOG=1`` at least that often; :meth:`Notifier.watchdog_interval` is half of it, as
sd_watchdog_enabled(3) advises. Without the variables every call does nothing. A send that
fails is logged once and never raised: supervision must not stop a unit.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        self._warned = False
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self._watchdog_usec = (
            int(usec) if usec.isdigit() and (not pid or pid == str(os.getpid())) else 0
        )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 messages, or None when no watchdog is asked for."""
        if not self.enabled or not self._watchdog_usec:
            return None
        return self._watchdog_usec / 2e6

    def send(self, **fields: str) -> None:
        """Send ``KEY=VALUE`` lines (``ready="1"`` becomes ``READY=1``). Never raises."""
        if self.address is None:
            return
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message, target)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
