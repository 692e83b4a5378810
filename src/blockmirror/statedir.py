"""The layout of a unit's state directory: every file name in it is decided here.

```
STATE_DIR/
  unit.lock                 flock held by the running unit (and by the offline commands)
  unit.json                 where the running unit listens; pid; world-readable, no secrets
  admin.token               the admin credential, unless [unit] admin_token_file says otherwise
  VOLUME.journal            the volume's journal (docs/journal.md)
  VOLUME.role               the volume's live role and its generations (journal/generations.py)
  VOLUME.CONSUMER.dirty     one dirty map per consumer of that journal
  VOLUME.diverged           the regions this unit gave up after a split brain or a failover,
                            until its new source has them (a dirty map's format)
  VOLUME.history/           the volume's history: segments of before-images (docs/history.md)
```

Nothing here opens a journal or a map: the modules that own those formats take these paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Final

RUNTIME_FILE: Final = "unit.json"
LOCK_FILE: Final = "unit.lock"
TOKEN_FILE_NAME: Final = "admin.token"
JOURNAL_SUFFIX: Final = ".journal"
DIRTY_SUFFIX: Final = ".dirty"
ROLE_SUFFIX: Final = ".role"
DIVERGED_SUFFIX: Final = ".diverged"
HISTORY_SUFFIX: Final = ".history"


def _safe(name: str) -> str:
    # Consumer names may hold ':' or '/' (an address); a file name must not.
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def journal_path(state_dir: Path, volume: str) -> Path:
    """Where the journal of ``volume`` lives."""
    return state_dir / f"{volume}{JOURNAL_SUFFIX}"


def role_path(state_dir: Path, volume: str) -> Path:
    """Where the live role and the generation history of ``volume`` live."""
    return state_dir / f"{volume}{ROLE_SUFFIX}"


def diverged_path(state_dir: Path, volume: str) -> Path:
    """Where the regions ``volume`` gave up (its divergent writes) wait for its new source."""
    return state_dir / f"{volume}{DIVERGED_SUFFIX}"


def history_path(state_dir: Path, volume: str) -> Path:
    """The directory of ``volume``'s history segments (docs/history.md)."""
    return state_dir / f"{volume}{HISTORY_SUFFIX}"


def dirty_map_path(state_dir: Path, volume: str, consumer: str) -> Path:
    """Where the dirty map of one consumer of ``volume``'s journal lives."""
    return state_dir / f"{volume}.{_safe(consumer)}{DIRTY_SUFFIX}"


def lock_path(state_dir: Path) -> Path:
    return state_dir / LOCK_FILE


def try_lock(state_dir: Path) -> int | None:
    """Take the state directory's lock (``unit.lock``, flock, exclusive, not waiting).

    Returns the descriptor that holds it (closing it releases the lock), or None when another
    process holds it: a running unit, or an offline command.
    """
    fd = os.open(lock_path(state_dir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def runtime_path(state_dir: Path) -> Path:
    return state_dir / RUNTIME_FILE


def write_runtime_file(state_dir: Path, info: dict[str, Any]) -> None:
    """Replace ``unit.json`` atomically (a reader never sees half a file)."""
    path = runtime_path(state_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)


def read_runtime_file(state_dir: Path) -> dict[str, Any] | None:
    """What the running (or last) unit wrote to ``unit.json``, or None."""
    try:
        data = json.loads(runtime_path(state_dir).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def remove_runtime_file(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        runtime_path(state_dir).unlink()
