"""The unit's applied configurations: their version numbers, and a copy of the last one.

Every configuration a unit applies (at start or by a reload) gets a ``config_version``, one more
than the last, unless its text is byte for byte the one applied last (a restart with the same
file keeps its number). ``STATE_DIR/config.json`` records the number, the text's SHA-256 and when
it was applied; ``STATE_DIR/config.toml`` keeps the text itself. That copy is what a unit whose
config file was lost starts from (it raises ``config-lost``, serves nothing, and knows its
alert targets and admin address), and what peers keep of each other (``config fetch``).

Both files are replaced atomically and durably (written, synced, renamed, directory synced):
blocking, so callers run these in a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockmirror.io.fileio import sync_directory

__all__ = ["ConfigRecord", "cached_text", "load_record", "record_applied"]

RECORD_FILE = "config.json"
COPY_FILE = "config.toml"


@dataclass(frozen=True, slots=True)
class ConfigRecord:
    version: int
    sha256: str
    applied: float  # wall-clock seconds

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "sha256": self.sha256, "applied": self.applied}


def load_record(state_dir: Path) -> ConfigRecord | None:
    """The last applied configuration's record; None if there is none (or it is unreadable:
    numbering then starts again at 1, which says so rather than guessing)."""
    try:
        doc = json.loads((state_dir / RECORD_FILE).read_text())
        return ConfigRecord(int(doc["version"]), str(doc["sha256"]), float(doc["applied"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached_text(state_dir: Path) -> bytes | None:
    """The text of the last applied configuration, if the state directory keeps it."""
    try:
        return (state_dir / COPY_FILE).read_bytes()
    except OSError:
        return None


def record_applied(state_dir: Path, text: bytes) -> ConfigRecord:
    """Record ``text`` as applied now and return its record; the same text as last time keeps
    its version (and record)."""
    digest = hashlib.sha256(text).hexdigest()
    last = load_record(state_dir)
    if last is not None and last.sha256 == digest:
        return last
    record = ConfigRecord((last.version if last is not None else 0) + 1, digest, time.time())
    _replace(state_dir / COPY_FILE, text)
    _replace(state_dir / RECORD_FILE, (json.dumps(record.to_json(), indent=2) + "\n").encode())
    sync_directory(state_dir)
    return record


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
