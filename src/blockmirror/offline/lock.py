"""What the offline journal commands (adopt, resize) share: the unit must be stopped.

A command holds the state directory's lock (the one a running unit holds) for as long as it
works, and refuses while a unit runs: while the lock is held, or while the unit named in
``unit.json`` is still alive (a unit that is starting up or stopping).
"""

from __future__ import annotations

import os
from pathlib import Path

from blockmirror.config import Config, VolumeConfig
from blockmirror.errors import OfflineError
from blockmirror.io.closing import Closing
from blockmirror.journal.checkpoint import CheckpointError, read_checkpoint
from blockmirror.journal.storage import JournalFile
from blockmirror.statedir import read_runtime_file, try_lock

__all__ = ["OfflineError", "StateDirLock", "journal_volume"]


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    # A pid reused by an unrelated process since the unit died does not hold the state.
    return b"blockmirror" in cmdline


class StateDirLock(Closing):
    """The state directory's lock, held from construction until :meth:`close`."""

    def __init__(self, state_dir: Path, what: str) -> None:
        self.state_dir = state_dir
        if not state_dir.is_dir():
            raise OfflineError(
                f"state directory {state_dir} does not exist: there is no journal to {what}"
            )
        fd = try_lock(state_dir)
        if fd is None:
            raise OfflineError(
                f"state directory {state_dir} is in use by a running blockmirror unit: stop it "
                f"first (this command runs offline)"
            ) from None
        self._fd = fd
        info = read_runtime_file(state_dir)
        pid = info.get("pid") if info is not None else None
        if isinstance(pid, int) and _alive(pid):
            self.close()
            raise OfflineError(
                f"the unit of {state_dir} (pid {pid}, in unit.json) is still running: stop it "
                "first (this command runs offline)"
            )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock
            self._fd = -1


def journal_volume(config: Config, name: str, *, to: str = "") -> VolumeConfig:
    """The configured volume ``name``, which must have a journal (``to``: what the command
    does with it, for the message)."""
    for vc in config.volumes:
        if vc.name == name:
            if vc.read_only or not vc.journal:
                what = f"no journal to {to}" if to else "no journal"
                raise OfflineError(
                    f"volume {name} has {what} (read_only = true or journal = false)"
                )
            return vc
    known = ", ".join(vc.name for vc in config.volumes) or "none"
    raise OfflineError(f"no volume named {name!r} in the configuration (volumes: {known})")


def journal_capacity(path: Path) -> int:
    """The ring capacity a journal file's checkpoint records (for the offline commands)."""
    with JournalFile.open_existing(path, read_only=True) as file:
        try:
            found = read_checkpoint(file)
        except CheckpointError as exc:
            raise OfflineError(f"journal {path}: {exc}; run `blockmirror journal recover`") from exc
    if found is None:
        raise OfflineError(
            f"journal {path} has no valid checkpoint; run `blockmirror journal recover` first"
        )
    return found[2].capacity
