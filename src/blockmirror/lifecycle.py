"""A unit as a process: run until SIGTERM or SIGINT, and tell systemd how it goes.

``blockmirror run`` calls :func:`run_unit`. Signals: SIGTERM and SIGINT stop gracefully,
SIGUSR2 writes every task's stack to the log, SIGHUP reloads the configuration
(:mod:`blockmirror.reconfigure`). Under a ``Type=notify`` service it sends READY=1
once the unit serves, STOPPING=1 when it begins to stop, and WATCHDOG=1 while its event loop
runs (:mod:`blockmirror.io.sdnotify`).
"""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
import signal
import time

from blockmirror.config import Config
from blockmirror.daemon import Unit
from blockmirror.errors import BlockmirrorError
from blockmirror.io.sdnotify import Notifier
from blockmirror.reconfigure import ReloadRefused

__all__ = ["dump_tasks", "run_unit"]

log = logging.getLogger("blockmirror.daemon")


async def run_unit(config: Config, *, text: bytes | None = None, lost: str | None = None) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code. ``text``: the configuration
    file's bytes, as parsed (its version is recorded). ``lost``: the file could not be read
    (why); ``config`` is then what the state directory remembers of it, the unit serves nothing
    and raises ``config-lost``, and a reload of a restored file starts it for real."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    notifier = Notifier()
    reloads: set[asyncio.Task[None]] = set()
    unit = Unit(config, text=text, lost=lost)

    def hangup() -> None:
        task = loop.create_task(_reload(unit, notifier))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # Handlers go in before start(): a signal during start-up must still stop gracefully.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR2, lambda: dump_tasks(unit))
    loop.add_signal_handler(signal.SIGHUP, hangup)
    watchdog: asyncio.Task[None] | None = None
    try:
        while True:
            if not unit.started:
                await unit.start()
                # What start-up built (modules, configuration, volumes, journals' indexes)
                # lives as long as the unit: out of the collector's sight, its passes walk
                # only what the data path makes and drops.
                gc.freeze()
            name = unit.config.unit.name
            log.info("unit %s running (pid %d)", name, os.getpid())
            state = "serving nothing: its configuration is lost" if unit.lost else "serving"
            notifier.send(ready="1", status=f"unit {name} {state}", mainpid=str(os.getpid()))
            interval = notifier.watchdog_interval()
            if interval is not None and watchdog is None:
                watchdog = asyncio.create_task(_watchdog(notifier, interval))
            restart = asyncio.ensure_future(unit.restart_requested.wait())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait([restart, stopping], return_when=asyncio.FIRST_COMPLETED)
            restart.cancel()
            stopping.cancel()
            if stop.is_set() or unit.restart_with is None:
                break
            # A unit whose configuration was lost got it back: start it for real. If that
            # fails (a port in use, say), it stays up without it, saying why.
            new_config, new_text = unit.restart_with
            log.info("unit %s: starting with the restored configuration", name)
            lost_config = unit.config
            await unit.stop()
            unit = Unit(new_config, text=new_text)
            try:
                await unit.start()
            except (BlockmirrorError, OSError) as exc:
                log.error("unit %s: the restored configuration did not start: %s", name, exc)
                unit = Unit(
                    lost_config,
                    lost=f"the restored configuration did not start: {exc}",
                )

        log.info("unit %s stopping", unit.config.unit.name)
        notifier.send(stopping="1")
        await unit.stop()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in list(reloads):
            task.cancel()
    log.info("unit %s stopped cleanly", unit.config.unit.name)
    return 0


async def _reload(unit: Unit, notifier: Notifier) -> None:
    """SIGHUP: read the configuration again and apply it. A refused reload is logged with
    every problem and changes nothing; the unit runs on either way."""
    if not unit.started:
        log.warning("SIGHUP during start-up ignored: reload once the unit serves")
        return
    # systemd wants the monotonic clock with RELOADING=1 (sd_notify(3)).
    notifier.send(reloading="1", monotonic_usec=str(time.monotonic_ns() // 1000))
    try:
        result = await unit.reload()
    except ReloadRefused as exc:
        log.error(
            "reload refused; nothing was changed:\n%s",
            "\n".join(f"  {key}: {message}" for key, message in exc.problems),
        )
    except Exception:
        log.exception("reload failed")
    else:
        if result.record is not None:
            log.info("reload: configuration version %d", result.record.version)
    notifier.send(ready="1", status=f"unit {unit.config.unit.name} serving")


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
