"""The unit-wide bounds on NBD connections and on reply bytes in flight.

Shared by every NBD server of a unit. A READ's data is read when its reply is sent, one piece
(:attr:`NbdLimits.piece`) at a time, each piece taken from the budget and given back as the
socket drains it; a connection that cannot get budget waits (back-pressure, never an error).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any, Protocol

from blockmirror.frontend.nbd_buffers import ReceiveArenas

# Unit-wide defaults of [unit] nbd_reply_budget and nbd_max_connections.
DEFAULT_REPLY_BUDGET = 256 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 256
# Bounds of the piece in which READ data is read and sent (see NbdLimits.piece).
MIN_PIECE = 64 * 1024
MAX_PIECE = 1024 * 1024
# While connections wait for reply budget, how often their drained bytes are counted back.
BUDGET_POLL = 0.05


class BudgetHolder(Protocol):
    """A connection as the limits see it."""

    reserved: int  # reply bytes it holds of the budget

    def settle_budget(self) -> None:
        """Give back what the kernel has taken from its transport's buffer."""

    def budget_available(self) -> None:
        """Budget came back: try again (and queue up again if there is still no room)."""


class NbdLimits:
    """The unit-wide bounds on NBD connections and on reply bytes in flight.

    ``reply_bytes_in_flight`` counts READ data read from the volume and not yet taken by the
    kernel: queued in a connection or in its transport's buffer. A connection may take a piece
    when the total stays within the budget, or when it holds nothing itself, so a connection
    whose client reads is never starved by others that do not. The piece is the budget's share
    per connection (capped to [64 KiB, 1 MiB]), so with ``max_connections`` connections each
    holding one piece the budget holds too.
    """

    def __init__(
        self,
        reply_budget: int = DEFAULT_REPLY_BUDGET,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if reply_budget <= 0 or max_connections <= 0:
            raise ValueError("the reply budget and the connection limit must be positive")
        self.resize(reply_budget, max_connections)
        # The receive arenas every connection of the unit reads requests into.
        self.arenas = ReceiveArenas()
        self.connections = 0
        self.reply_bytes_in_flight = 0
        self.refused_connections = 0
        self.budget_waits = 0
        self._waiters: deque[BudgetHolder] = deque()
        self._poll: asyncio.TimerHandle | None = None

    def resize(self, reply_budget: int, max_connections: int) -> None:
        """New bounds (at start, or by a reload): connections over a lowered limit stay, and
        no new one is admitted until they are under it."""
        self.reply_budget = reply_budget
        self.max_connections = max_connections
        self.piece = max(MIN_PIECE, min(MAX_PIECE, reply_budget // max_connections))

    def admit(self) -> bool:
        """Count a new connection, or say it is one too many."""
        if self.connections >= self.max_connections:
            self.refused_connections += 1
            return False
        self.connections += 1
        return True

    def leave(self) -> None:
        self.connections -= 1

    def take(self, conn: BudgetHolder, n: int) -> bool:
        """Reserve ``n`` reply bytes for ``conn``; False (and ``conn`` is woken later) if not."""
        if self.reply_bytes_in_flight + n <= self.reply_budget or conn.reserved == 0:
            self.reply_bytes_in_flight += n
            conn.reserved += n
            return True
        self.budget_waits += 1
        if conn not in self._waiters:
            self._waiters.append(conn)
        if self._poll is None:
            # Bytes the kernel took from a transport below its high-water mark come back only
            # when that connection next settles: without a poll, connections that each hold
            # such a residue could all wait for each other for ever.
            with contextlib.suppress(RuntimeError):  # no loop: a unit test of the rules
                loop = asyncio.get_running_loop()
                self._poll = loop.call_later(BUDGET_POLL, self._settle_waiters)
        return False

    def _settle_waiters(self) -> None:
        self._poll = None
        for conn in list(self._waiters):
            conn.settle_budget()
        # Everyone still waiting tries again (and queues up again if there is still no room).
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.budget_available()

    def give_back(self, conn: BudgetHolder, n: int) -> None:
        if n <= 0:
            return
        conn.reserved -= n
        self.reply_bytes_in_flight -= n
        # Wake everyone waiting: each tries again and queues up again if there is still no room.
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.budget_available()

    def forget(self, conn: BudgetHolder) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(conn)

    def status(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "max_connections": self.max_connections,
            "refused_connections": self.refused_connections,
            "reply_bytes_in_flight": self.reply_bytes_in_flight,
            "reply_budget": self.reply_budget,
            "budget_waits": self.budget_waits,
        }
