"""Group commit of ``fdatasync``: many waiters, one sync, never on the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable


class Syncer:
    """Coalesces durability requests for one file.

    :meth:`sync` returns a future that completes once a sync that *started after the call* has
    finished, so everything written before the call is durable. Callers that arrive while a sync is
    running share the next one: under load, one ``fdatasync`` covers a whole batch of FUA writes
    and FLUSHes, which is what keeps FUA-heavy clients (qemu-io's writethrough mode) fast.
    """

    def __init__(self, sync_fn: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        self._sync_fn = sync_fn
        self._loop = loop
        self._running = False
        self._next: list[asyncio.Future[None]] = []
        self.syncs = 0

    def sync(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self._loop.create_future()
        self._next.append(fut)
        if not self._running:
            self._start()
        return fut

    @property
    def busy(self) -> bool:
        return self._running

    def _start(self) -> None:
        waiters, self._next = self._next, []
        self._running = True
        self.syncs += 1
        done = self._loop.run_in_executor(None, self._sync_fn)
        done.add_done_callback(lambda f: self._finished(f, waiters))

    def _finished(self, f: asyncio.Future[None], waiters: list[asyncio.Future[None]]) -> None:
        self._running = False
        exc = f.exception() if not f.cancelled() else asyncio.CancelledError()
        settle(waiters, exc)
        if self._next:
            self._start()


def settle(waiters: Iterable[asyncio.Future[None]], exc: BaseException | None) -> None:
    """Complete every waiter not done yet: with ``exc``, or successfully when it is None."""
    for waiter in waiters:
        if waiter.done():
            continue
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)
