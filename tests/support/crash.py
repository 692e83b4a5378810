"""``crash(wp)``: leave a journaled write path as ``kill -9`` would, in process.

No final checkpoint, no sync, no close of the journal's records: the files hold what the page
cache held (a power cut is the fault-injecting store's job, ``blockmirror.store.faulty``).
"""

from __future__ import annotations

from blockmirror.blockdev.journaled import JournalWritePath


def crash(wp: JournalWritePath) -> None:
    """Drop everything as a kill -9 would: no final checkpoint, no sync."""
    if wp._task is not None:
        wp._task.cancel()
    for consumer in wp.journal.consumers.values():
        consumer.dirty.close(sync=False)
    wp.journal.abandon()
    wp.volume.close()
