"""A unit as a process: run until SIGTERM or SIGINT, and tell systemd how it goes.

``blockmirror run`` calls :func:`run_unit`. Signals: SIGTERM and SIGINT stop gracefully,
SIGUSR2 writes every task's stack to the log. Under a ``Type=notify`` service it sends READY=1
once the unit serves, STOPPING=1 when it begins to stop, and WATCHDOG=1 while its event loop
runs (:mod:`blockmirror.io.sdnotify`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal

from blockmirror.config import Config
from blockmirror.daemon import Unit
from blockmirror.io.sdnotify import Notifier

__all__ = ["dump_tasks", "run_unit"]

log = logging.getLogger("blockmirror.daemon")


async def run_unit(config: Config) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    unit = Unit(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers go in before start(): a signal during start-up must still stop gracefully.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR2, dump_tasks, unit)
    notifier = Notifier()
    watchdog: asyncio.Task[None] | None = None
    try:
        await unit.start()
        log.info("unit %s running (pid %d)", config.unit.name, os.getpid())
        notifier.send(
            ready="1", status=f"unit {config.unit.name} serving", mainpid=str(os.getpid())
        )
        interval = notifier.watchdog_interval()
        if interval is not None:
            watchdog = asyncio.create_task(_watchdog(notifier, interval))
        await stop.wait()
        log.info("unit %s stopping", config.unit.name)
        notifier.send(stopping="1")
        await unit.stop()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
            loop.remove_signal_handler(sig)
    log.info("unit %s stopped cleanly", config.unit.name)
    return 0


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 every ``interval`` seconds while the event loop runs: a loop stuck behind a
    blocking call stops them, and systemd restarts the unit (WatchdogSec)."""
    while True:
        notifier.send(watchdog="1")
        await asyncio.sleep(interval)


def dump_tasks(unit: Unit) -> None:
    """SIGUSR2: write every task's stack to the log, to see where a stuck unit waits."""
    buffer = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(file=buffer)
    for rt in unit.volumes:
        for sender in rt.senders:
            buffer.write(f"sender {sender.host}:{sender.port}: {sender.describe_task()}\n")
    log.warning("task dump on SIGUSR2:\n%s", buffer.getvalue())
