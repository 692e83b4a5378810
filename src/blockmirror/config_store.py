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
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockmirror.config import Config, UnitConfig, config_from_bytes
from blockmirror.errors import ConfigError
from blockmirror.io.fileio import sync_directory

__all__ = [
    "ConfigRecord",
    "cached_text",
    "keep_peer_copy",
    "load_record",
    "peer_copies",
    "peer_copy",
    "rebind_copies",
    "record_applied",
]

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


def lost_config(path: Path, state_dir: Path) -> Config:
    """What a unit whose file ``path`` is lost runs with: its last applied configuration's
    ``[unit]`` and ``[alerts]`` (so its admin API and alert targets are where they were), with
    no volume and no link, in ``state_dir``. Without a usable copy, a unit named after the file
    with no admin API: the log (and the exit of nothing) is then all that says so."""
    cached = cached_text(state_dir)
    remembered: Config | None = None
    if cached is not None:
        try:
            remembered = config_from_bytes(cached, path, check_paths=False)
        except ConfigError:
            remembered = None
    if remembered is None:
        return Config(unit=UnitConfig(name=path.stem or "unit", state_dir=state_dir), source=path)
    return Config(
        unit=dataclasses.replace(remembered.unit, state_dir=state_dir),
        alerts=remembered.alerts,
        source=path,
    )


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
    # A name of its own per write: two writers never share (and tear) a temporary file.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
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


# --- the copies peers hand over (PEER_CONFIG) -------------------------------------------------

PEERS_DIR = "peers"
# The most units whose copies one unit keeps: peers are a handful; this bounds the disk a
# claimant of many names could fill.
MAX_PEER_COPIES = 1024
_PEER_WRITES = threading.Lock()
# Unit names are file names here: the same rule the config applies to names.
_UNIT_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}", re.ASCII)


def _peer_paths(state_dir: Path, unit: str) -> tuple[Path, Path]:
    if not _UNIT_NAME.fullmatch(unit) or unit in (".", ".."):
        raise ValueError(f"{unit!r} is not a unit name")
    directory = state_dir / PEERS_DIR
    return directory / f"{unit}.toml", directory / f"{unit}.json"


def keep_peer_copy(
    state_dir: Path, unit: str, version: int, text: bytes, source: str, credential: str
) -> bool:
    """Keep what unit ``unit`` says is its configuration, received over ``credential`` (what
    authenticated the link); False when nothing changed: the same copy, or an older version.

    Raises ValueError for a name that cannot be a unit's, for a copy that came over another
    credential than the kept one (a peer cannot replace another unit's copy by claiming its
    name), and when :data:`MAX_PEER_COPIES` units are kept already; OSError when it cannot be
    written."""
    text_path, meta_path = _peer_paths(state_dir, unit)
    with _PEER_WRITES:  # the text and its record change together, one copy at a time
        return _keep(state_dir, unit, version, text, source, credential, text_path, meta_path)


def _keep(
    state_dir: Path,
    unit: str,
    version: int,
    text: bytes,
    source: str,
    credential: str,
    text_path: Path,
    meta_path: Path,
) -> bool:
    digest = hashlib.sha256(text).hexdigest()
    old = peer_copy_meta(state_dir, unit)
    if old is not None:
        if old.get("credential") != credential:
            raise ValueError(
                f"the copy of unit {unit} was received over another credential; a copy over "
                f"{credential.split(':', maxsplit=1)[0]} does not replace it (remove "
                f"{text_path.parent}/{unit}.* to accept the new one)"
            )
        kept = old.get("config_version")
        same = kept == version and old.get("sha256") == digest
        if isinstance(kept, int) and (kept > version or same):
            return False
    elif len(peer_copies(state_dir)) >= MAX_PEER_COPIES:
        raise ValueError(f"{MAX_PEER_COPIES} units' copies are kept already")
    text_path.parent.mkdir(mode=0o700, exist_ok=True)
    meta = {
        "unit": unit,
        "config_version": version,
        "sha256": digest,
        "received": time.time(),
        "from": source,
        "credential": credential,
    }
    _replace(text_path, text)
    _replace(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    sync_directory(text_path.parent)
    return True


def peer_copy_meta(state_dir: Path, unit: str) -> dict[str, Any] | None:
    try:
        _, meta_path = _peer_paths(state_dir, unit)
        doc = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def peer_copy(state_dir: Path, unit: str) -> tuple[dict[str, Any], bytes] | None:
    """The kept configuration of ``unit`` and what is known of it; None if none is kept."""
    meta = peer_copy_meta(state_dir, unit)
    if meta is None:
        return None
    text_path, _ = _peer_paths(state_dir, unit)
    try:
        text = text_path.read_bytes()
    except OSError:
        return None
    if hashlib.sha256(text).hexdigest() != meta.get("sha256"):
        return None  # torn or tampered: never hand out a copy that is not what was received
    return meta, text


def peer_copies(state_dir: Path) -> list[dict[str, Any]]:
    """What is known of every kept copy, by unit name."""
    directory = state_dir / PEERS_DIR
    try:
        names = sorted(p.stem for p in directory.glob("*.json"))
    except OSError:
        return []
    return [meta for name in names if (meta := peer_copy_meta(state_dir, name)) is not None]


def rebind_copies(state_dir: Path, old: str, new: str) -> int:
    """The copies received over credential ``old`` are bound to ``new`` from now on (a reload
    rotated that key: the peers' next copies come over the new one). Returns how many."""
    count = 0
    with _PEER_WRITES:
        for meta in peer_copies(state_dir):
            if meta.get("credential") != old:
                continue
            _, meta_path = _peer_paths(state_dir, str(meta["unit"]))
            meta["credential"] = new
            _replace(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
            count += 1
    if count:
        sync_directory(state_dir / PEERS_DIR)
    return count
