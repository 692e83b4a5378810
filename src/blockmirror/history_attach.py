"""Giving a volume its point-in-time history: opened before the journal, attached after it.

The history is opened first because the journal's start-up replay keeps before-images too
(``history/capture.replay_capturing``); once the journal is open it says which role the volume
has, and so whether before-images are synced before each apply (docs/history.md).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from blockmirror import statedir
from blockmirror.alerts import AlertLog
from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.config import VolumeConfig
from blockmirror.history.log import HistoryLog, HistorySettings

__all__ = ["attach_history", "open_history"]


def open_history(state_dir: Path, vc: VolumeConfig) -> HistoryLog:
    """Blocking: open the history of ``vc`` in ``state_dir``. Raises OSError."""
    return HistoryLog.open(
        statedir.history_path(state_dir, vc.name),
        HistorySettings(vc.history, vc.history_cap),
        AlertLog(vc.name),
        barrier=lambda: False,  # until the journal says which role it has
    )


async def attach_history(history_log: HistoryLog, journal_wp: JournalWritePath) -> None:
    """Hand the opened history to the volume's write path. Raises OSError."""
    journal = journal_wp.journal
    # A secondary syncs before-images before it applies (its host is not waiting).
    history_log.set_barrier(lambda: journal.replica is not None)
    # Alerts raised while opening go where the volume's alerts go.
    journal_wp.alerts.events.extend(history_log.alerts.events)
    history_log.alerts = journal_wp.alerts
    stamp = journal.last_stamp[1] if journal.last_stamp else 0
    history_log.start(journal.applied_seq, stamp)
    if journal.unclean_os_restart and journal.replica is None and history_log.enabled:
        # A primary does not sync before-images before each write: after a power loss the
        # volume may hold changes whose undo records never reached the disk.
        await asyncio.to_thread(
            history_log.drop_all,
            "the unit restarted after a power loss or an OS crash, and a primary's newest "
            "before-images may not have reached the disk",
        )
    journal_wp.history = history_log
