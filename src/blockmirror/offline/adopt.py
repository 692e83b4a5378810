"""``blockmirror volume adopt CONFIG VOLUME``: serve a volume its journal does not recognise.

At start, a journal checks that the volume found is the one it was written for (docs/journal.md,
"Identity"); a volume restored from an older copy, a wrong ``path`` or another volume's file is
not served. When the volume found *is* the one to serve (a restore the operator intends), this
command, run while the unit is stopped:

1. drops every record the journal holds, unreplayed: they belong to the volume's previous
   content, and replaying newer writes over an older copy would make a volume that never was;
2. marks every consumer's dirty map fully dirty and puts it in tracking mode: a full resync, so
   every peer ends up with the adopted content (its replica is inconsistent until then);
3. on a secondary, forgets which source the replica came from: the source sends it all again;
4. records the volume's identity anew (its file, and a fingerprint of its blocks), keeping the
   volume's ``volume_id``, so peers keep accepting it;
5. on a primary, begins a generation (``unproven-start``): nothing proves the adopted content
   continues the old line, so peers are told it does not.
"""

from __future__ import annotations

import logging
from pathlib import Path

from blockmirror import statedir
from blockmirror.config import Config
from blockmirror.errors import BlockmirrorError, JournalError
from blockmirror.journal import generations, identity
from blockmirror.journal.checkpoint import CheckpointError, read_checkpoint
from blockmirror.journal.generations import new_generation
from blockmirror.journal.journal import Journal
from blockmirror.journal.ring import DATA_START, Ring
from blockmirror.journal.scan import JournalCorruptError, scan
from blockmirror.journal.storage import JournalFile
from blockmirror.offline.lock import (
    OfflineError,
    StateDirLock,
    journal_capacity,
    journal_volume,
)
from blockmirror.state import Role
from blockmirror.store.volume import Volume

__all__ = ["adopt_volume"]

log = logging.getLogger(__name__)


def adopt_volume(config: Config, volume_name: str) -> list[str]:
    """Adopt the volume as it is; returns what was done, one line each.

    Raises :class:`OfflineError` (nothing changed) when the unit runs, the volume or its journal
    is missing, or the journal cannot be read.
    """
    vc = journal_volume(config, volume_name)
    state_dir = config.unit.state_dir
    path = statedir.journal_path(state_dir, vc.name)
    done: list[str] = []
    with StateDirLock(state_dir, "adopt"):
        if not path.exists():
            raise OfflineError(
                f"volume {vc.name} has no journal at {path}: nothing to adopt (the unit records "
                "the volume's identity when it creates the journal)"
            )
        try:
            volume = Volume.open(vc.path, size=vc.size, offset=vc.offset, create=False)
        except BlockmirrorError as exc:
            raise OfflineError(f"cannot open volume {vc.name}: {exc}") from exc
        try:
            capacity = journal_capacity(path)
            before = _check(path, volume, capacity)
            if before is not None:
                done.append(f"volume {vc.name}: {before}")
            try:
                journal = Journal.open(
                    path,
                    volume=volume,
                    journal_size=DATA_START + capacity,
                    consumers=[str(peer) for peer in vc.peers],
                    dirty_dir=state_dir,
                    volume_name=vc.name,
                    adopt=True,
                )
            except JournalCorruptError as exc:
                raise OfflineError(
                    f"{exc}; run `blockmirror journal recover` first, then adopt"
                ) from exc
            except (JournalError, CheckpointError) as exc:
                raise OfflineError(str(exc)) from exc
            consumers = sorted(journal.consumers)
            next_seq = journal.next_seq
            journal.close(clean=True)
        finally:
            volume.close()
        role_path = statedir.role_path(state_dir, vc.name)
        history = generations.load(role_path)
        role = history.role if history is not None else Role(vc.role)
        if history is not None and role is Role.PRIMARY:
            # Nothing proves the adopted content continues the old line: a new generation
            # begins, so a peer holding records of the old one past this point gives them up
            # (or, holding its own writes there, reports a split brain) instead of keeping them.
            generation = new_generation(
                start_seq=next_seq, unit=config.unit.name, reason="unproven-start"
            )
            generations.store(role_path, history.begin(generation))
            done.append(
                f"generation {generation.id} (unproven-start) begins at seq {next_seq}: peers "
                "follow the adopted content from there"
            )
    done.append(
        f"volume {vc.name}: {vc.path} adopted as it is (volume id {journal.volume_id} kept); "
        "the journal's records were dropped, not replayed"
    )
    if consumers:
        done.append(f"every region marked dirty for {', '.join(consumers)} (full resync)")
    else:
        done.append("the volume has no consumers (no peers): no resync is needed")
    if role is not Role.PRIMARY:
        done.append("the replica's source is forgotten: its source sends all of it again")
    done.append(f"`blockmirror run` serves volume {vc.name} again")
    return done


def _check(path: Path, volume: Volume, capacity: int) -> str | None:
    """What the identity check says of the volume now (for the report), or None."""
    try:
        with JournalFile.open_existing(path, read_only=True) as file:
            found = read_checkpoint(file)
            if found is None:
                return None
            cp = found[2]
            if cp.volume_size != volume.size:
                return None  # Journal.open says so
            result = scan(file, Ring(capacity), cp.head_lpos, cp.head_seq, cp.next_seq)
        records = [(r.seq, r.kind, r.offset, r.length) for r in result.records]
        check = identity.verify(volume, cp, records, lenient=False)
    except (OSError, BlockmirrorError, ValueError) as exc:
        log.debug("identity check before adopting: %s", exc)
        return None
    if check.problem is not None:
        return f"was refused: {check.problem.split(' - ')[0]}"
    return "matched its journal already; adopting it anyway"
