"""A volume's role at run time: promote, demote, follow a newer line, split brain, resolve.

:class:`VolumeRoles` owns one volume's live role and generations (``STATE_DIR/VOLUME.role``,
:mod:`blockmirror.journal.generations`) and is what the volume's links ask about direction
(:class:`blockmirror.link.direction.LinkRoles`). Every change of role goes through the
transition table, is written durably before anything acts on it, and is an event in the log
and in status (docs/operations.md, "Failing over", "Failing back", "Split brain"):

- **promote**: a secondary (or demoted) volume becomes primary. Its journal keeps numbering
  where the old primary's records ended, a new generation begins at that number, and its
  export becomes writable. Refused while the replica is not consistent, or while a source is
  connected, unless forced; a forced promote is a ``forced-promote`` generation.
- **demote**: host writes are refused from that moment (EPERM), every peer is drained to lag
  0 (as far as ``timeout`` allows), and the volume waits for a new source.
- **follow**: a link finds a newer line (:func:`blockmirror.journal.lineage.compare`): a
  superseded primary with no writes of its own past the branch demotes itself; a secondary
  holding records the promoted unit never received gives them up (their regions go to the new
  source, which copies them back with its own).
- **split brain**: both ends moved on. Nothing is copied; both keep serving what they served;
  status names the peer, the common point and both sides' divergence. ``resolve
  --discard-local`` on the unit that gives its writes up makes it the survivor's secondary,
  with a resync of the union of both sides' diverged regions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockmirror import statedir
from blockmirror.alerts import AlertLog
from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.blockdev.rollback import can_roll_back, roll_back_resync, settle_delayed
from blockmirror.blockdev.service import BlockDevice
from blockmirror.errors import RoleError
from blockmirror.journal import generations
from blockmirror.journal.checkpoint import ReplicaState
from blockmirror.journal.divergence import (
    add_diverged_file,
    diverged,
    peer_consumer,
    read_diverged_file,
    remove_diverged_file,
)
from blockmirror.journal.generations import Generation, VolumeHistory, new_generation
from blockmirror.journal.lineage import Lineage, Relation, compare, lineage_of
from blockmirror.link.direction import Admission
from blockmirror.link.protocol import Refuse, RefuseCode
from blockmirror.link.replica_runtime import ReplicaRuntime
from blockmirror.split_brain import SplitBrains
from blockmirror.state import ConsumerMode, Role, VolumeState, transition

__all__ = ["RoleError", "VolumeRoles"]

log = logging.getLogger(__name__)

# How long a demote waits for its peers to take every record, by default.
DRAIN_TIMEOUT = 60.0


class VolumeRoles:
    """The live role of one volume and everything that changes it."""

    def __init__(
        self,
        *,
        unit: str,
        volume: str,
        state_dir: Path,
        history: VolumeHistory,
        write_path: JournalWritePath,
        export: BlockDevice,
        replica: ReplicaRuntime,
        read_only: bool,
        set_state: Callable[[VolumeState], None],
        on_alert: Callable[[str, str], None] | None = None,
    ) -> None:
        self.unit = unit
        self.volume = volume
        self.state_dir = state_dir
        self.history = history
        self.wp = write_path
        self.export = export
        self.replica = replica
        self._read_only = read_only
        self._set_state = set_state
        self.events = AlertLog(f"volume {volume}", on_alert)
        self.split_brains = SplitBrains(volume, self.events)
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        replica.roles = self

    # --- what links ask -------------------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self.history.role

    def lineage(self) -> Lineage:
        journal = self.wp.journal
        end = journal.next_seq - 1
        return lineage_of(
            self.history,
            unit=self.unit,
            end_seq=end,
            lost_tail=journal.unclean_os_restart,
            end_stamp=journal.stamp_of(end),
        )

    def source(self) -> str | None:
        if self.role is Role.PRIMARY:
            return None
        state = self.wp.journal.replica
        return self.replica.source_unit or (state.source_unit if state else None) or None

    async def wait_changed(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def source_changed(self) -> None:
        self._notify()

    def _notify(self) -> None:
        # Wake every waiter once; later waiters wait for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    def linked(self, consumer: str, peer: Lineage | None) -> None:
        if peer is not None:
            self.split_brains.clear(peer.unit)

    def status(self) -> dict[str, Any]:
        return {
            **self.history.status(),
            "split_brain": self.split_brains.status(),
            "events": list(self.events.events),
        }

    # --- the listener: a peer offers to send ------------------------------------------------------

    async def admit(self, peer: Lineage, peer_source: str | None) -> Admission:
        async with self._lock:
            ours = self.lineage()
            if peer_source == self.unit:
                return self._refusal(
                    RefuseCode.UPSTREAM, f"{peer.unit} receives this volume from {self.unit}"
                )
            known = self.split_brains.get(peer.unit)
            if (
                known is not None
                and known.peer_lineage is not None
                and peer.role is Role.PRIMARY
                and peer.current == known.peer_lineage.current
            ):
                # The same episode: the peer is still the primary of the line that split from
                # ours (whichever end found it). Only an operator's resolve ends it.
                return Admission(
                    False,
                    ours,
                    RefuseCode.SPLIT_BRAIN,
                    f"split brain: {known.reason}",
                    known.common_seq,
                    known.local_diverged_bytes,
                )
            verdict = compare(ours, peer)
            relation = verdict.relation
            if relation is Relation.SPLIT_BRAIN:
                div = diverged(self.wp.journal, peer.unit, verdict.branch_seq or 1)
                self.split_brains.record(
                    peer.unit, verdict.common_seq, div.nbytes, None, verdict.reason, peer
                )
                return Admission(
                    False,
                    ours,
                    RefuseCode.SPLIT_BRAIN,
                    f"split brain: {verdict.reason}",
                    verdict.common_seq,
                    div.nbytes,
                )
            if relation is Relation.UNRELATED:
                return self._refusal(RefuseCode.UNRELATED, verdict.reason)
            if relation is Relation.LEAD:
                code = RefuseCode.SUPERSEDED if peer.role is Role.PRIMARY else RefuseCode.UPSTREAM
                return self._refusal(code, verdict.reason)
            if relation is Relation.EQUAL and self.role is Role.PRIMARY:
                return self._refusal(
                    RefuseCode.UPSTREAM, f"{self.unit} is the primary: {verdict.reason}"
                )
            # We follow the peer (or hold exactly what it holds, as a secondary).
            if self.role is Role.PRIMARY:
                await self._demote(f"superseded by {peer.unit}: {verdict.reason}", drain=None)
            if verdict.discard_local:
                assert verdict.branch_seq is not None
                await self._discard(verdict.branch_seq, peer.unit, verdict.reason)
            await self._follow(peer)
            return Admission(True, self.lineage(), regions=await self._diverged_regions())

    def _refusal(self, code: str, message: str) -> Admission:
        return Admission(False, self.lineage(), code, message)

    # --- the sender: a peer refused us -----------------------------------------------------------

    async def refused(self, consumer: str | None, refusal: Refuse) -> None:
        peer = refusal.lineage
        if refusal.code == RefuseCode.SPLIT_BRAIN and peer is not None:
            verdict = compare(self.lineage(), peer)
            branch = verdict.branch_seq or (refusal.common_seq or 0) + 1
            div = diverged(self.wp.journal, peer.unit, branch)
            self.split_brains.record(
                peer.unit,
                refusal.common_seq if refusal.common_seq is not None else verdict.common_seq,
                div.nbytes,
                refusal.diverged_bytes,
                refusal.message,
                peer,
            )
            return
        if refusal.code != RefuseCode.SUPERSEDED or peer is None:
            return
        async with self._lock:
            verdict = compare(self.lineage(), peer)
            if verdict.relation is Relation.SPLIT_BRAIN:
                div = diverged(self.wp.journal, peer.unit, verdict.branch_seq or 1)
                self.split_brains.record(
                    peer.unit, verdict.common_seq, div.nbytes, None, verdict.reason, peer
                )
            elif verdict.relation is Relation.FOLLOW and self.role is Role.PRIMARY:
                # Host writes stop here now; the newer primary's sender connects to us.
                await self._demote(f"superseded by {peer.unit}: {verdict.reason}", drain=None)

    # --- operator actions ----------------------------------------------------------------------

    async def promote(self, *, force: bool, delayed: str = "") -> dict[str, Any]:
        async with self._lock:
            if self.role is Role.PRIMARY:
                raise RoleError(f"volume {self.volume} is already primary")
            self._consistent_or_forced(force)  # refused at once, before any wait
            if self.replica.source is not None and not force:
                # A source that was just demoted (or died) lets go within moments.
                await _gone(self.replica, 3.0)
            if self.replica.source is not None:
                if not force:
                    raise RoleError(
                        f"volume {self.volume} is receiving from {self.replica.source_unit} "
                        f"({self.replica.source}); demote that unit first (its writes then "
                        "drain here), or promote --force (a split brain with it follows)"
                    )
                await self.replica.disconnect()
                if self.replica.source is not None:
                    # Its records would be numbered into the new generation.
                    raise RoleError(
                        f"volume {self.volume}: its source {self.replica.source_unit} did not "
                        "let go; nothing changed, try again"
                    )
            # A resync cut short: back to the point before it (docs/history.md); records held
            # by replay_delay applied or given up, as the operator said.
            rolled = await roll_back_resync(self.wp)
            settled = await settle_delayed(self.wp, delayed)
            # What the replica is now: the source may have begun a resync while we waited.
            journal = self.wp.journal
            state = journal.replica
            consistent = self._consistent_or_forced(force)
            if state is not None and state.volume_id:
                # The volume's identity carries over: peers keep recognising their replicas.
                journal.volume_id = state.volume_id
            start = journal.next_seq
            journal.replica = None
            self.replica.source_unit = None
            for consumer in journal.consumers.values():
                if consumer.mode == ConsumerMode.JOURNAL:
                    consumer.acked_seq = min(consumer.acked_seq, journal.next_seq - 1)
            # The identity durable before the role: a crash in between leaves a secondary that
            # has no source yet (a full copy later), never a primary with another identity.
            await self.wp.checkpoint()
            # Generations learned from a source whose records never arrived are not ours.
            kept = tuple(g for g in self.history.generations if g.start_seq <= start)
            reason = "promote" if consistent else "forced-promote"
            history = VolumeHistory(self.volume, self.history.role, kept).begin(
                new_generation(start_seq=start, unit=self.unit, reason=reason)
            )
            await self._store(self._with_role(history, Role.PRIMARY))
            self.export.read_only = self._read_only
            self._set_state(VolumeState.SERVING)
            current = self.history.current
            assert current is not None
            message = f"promoted to primary: generation {current.id} begins at seq {start}" + (
                "" if consistent else " (forced: the replica was not consistent)"
            )
            self.events.alert("forced_promote" if not consistent else "promoted", message)
            self._notify()
            body: dict[str, Any] = {
                "role": str(self.role),
                "generation": current.id,
                "start_seq": start,
            }
            if rolled is not None:
                body["rolled_back_to"] = {"seq": rolled.seq, "time_ns": rolled.time_ns}
            return body | (settled or {})

    def _consistent_or_forced(self, force: bool) -> bool:
        """Whether the replica is consistent now; RoleError if it is not and not forced."""
        state = self.wp.journal.replica
        consistent = state is not None and state.consistent
        if not consistent and can_roll_back(self.wp):
            return True  # promote rolls the resync back first
        if not consistent and not force:
            why = (
                "it has never received from a source"
                if state is None
                else "a resync is in progress (its data is a mix of old and new regions)"
            )
            raise RoleError(
                f"volume {self.volume} is not consistent: {why}; wait for the resync to "
                "finish, or promote --force to serve it as it is"
            )
        return consistent

    async def demote(self, *, timeout: float = DRAIN_TIMEOUT) -> dict[str, Any]:
        async with self._lock:
            if self.role is not Role.PRIMARY:
                raise RoleError(f"volume {self.volume} is {self.role}, not primary")
            drained = await self._demote("demoted by the operator", drain=timeout)
            return {"role": str(self.role), "newest_seq": self.wp.journal.next_seq - 1, **drained}

    async def resolve(self, *, discard_local: bool) -> dict[str, Any]:
        if not discard_local:
            raise RoleError(
                "resolve needs --discard-local: run it on the unit that gives up its writes "
                "since the common point"
            )
        async with self._lock:
            if not self.split_brains.peers():
                raise RoleError(f"volume {self.volume} has no split brain to resolve")
            if len(self.split_brains.peers()) > 1:
                names = ", ".join(self.split_brains.peers())
                raise RoleError(f"volume {self.volume} is in split brain with {names}: resolve one")
            split = self.split_brains.only()
            peer = split.peer_lineage
            if peer is None or split.common_seq is None:
                raise RoleError(
                    f"the split brain with {split.peer} is not known in full yet (its lineage "
                    "has not arrived); try again in a few seconds"
                )
            branch = split.common_seq + 1
            if self.role is Role.PRIMARY:
                await self._demote(f"giving up its writes to {split.peer}", drain=None)
            regions = await self._discard(branch, split.peer, "resolve --discard-local")
            # Our own history after the common point is given up: we will follow the peer's.
            shared = tuple(g for g in self.history.generations if g.start_seq < branch)
            await self._store(VolumeHistory(self.volume, self.role, shared))
            if self.role is Role.DEMOTED:
                await self._store(self._with_role(self.history, Role.SECONDARY))
            self.split_brains.forget(split.peer)
            self.events.alert(
                "split_brain_resolved",
                f"split brain with {split.peer} resolved here: writes since seq {branch} given "
                f"up ({sum(n for _, n in regions)} bytes in {len(regions)} regions); "
                f"{split.peer}'s data is copied back",
            )
            self._notify()
            return {
                "role": str(self.role),
                "peer": split.peer,
                "common_seq": split.common_seq,
                "discarded_bytes": sum(n for _, n in regions),
            }

    # --- the steps -------------------------------------------------------------------------------

    async def _demote(self, reason: str, *, drain: float | None) -> dict[str, Any]:
        """Stop host writes, optionally drain every peer, and become DEMOTED durably."""
        self.export.read_only = True
        journal = self.wp.journal
        # Every write accepted so far durable (as a host's FLUSH makes them): a secondary's
        # WELCOME says what it holds durably, and the new primary numbers on from there.
        flushed = self.wp.flush()
        if flushed is not None:
            await flushed
        await self.wp.checkpoint()  # every staged write committed and applied first
        result: dict[str, Any] = {}
        if drain is not None:
            result = await self._drain(drain)
        journal.replica = ReplicaState(volume_id=journal.volume_id, consistent=True)
        await self._store(self._with_role(self.history, Role.DEMOTED))
        await self.wp.checkpoint()
        self._set_state(VolumeState.REPLICA)
        self.events.alert(
            "demoted",
            f"demoted ({reason}): host writes are refused; newest seq {journal.next_seq - 1}",
        )
        self._notify()
        return result

    async def _drain(self, timeout: float) -> dict[str, Any]:
        """Wait until every peer acknowledged the newest record, or ``timeout`` passed."""
        journal = self.wp.journal
        newest = journal.next_seq - 1
        deadline = time.monotonic() + timeout
        while True:
            behind = {
                c.name: c.acked_seq
                for c in journal.consumers.values()
                if not c.detached and (c.mode != ConsumerMode.JOURNAL or c.acked_seq < newest)
            }
            if not behind or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        if behind:
            log.warning(
                "volume %s: demoted with peers behind after %.0f s: %s",
                self.volume,
                timeout,
                ", ".join(f"{name} at {seq} of {newest}" for name, seq in behind.items()),
            )
        return {"drained": not behind, "behind": behind}

    async def _discard(self, branch: int, peer: str, reason: str) -> tuple[tuple[int, int], ...]:
        """Give up what this volume holds from ``branch`` on: its regions are kept durably for
        the new source, the journal continues at ``branch``, and the replica is inconsistent
        until the source has copied them back."""
        journal = self.wp.journal
        div = diverged(journal, peer, branch)
        regions = div.regions()
        path = statedir.diverged_path(self.state_dir, self.volume)
        await asyncio.to_thread(add_diverged_file, path, journal.volume.size, regions)
        self.export.read_only = True
        journal.replica = ReplicaState(
            volume_id=journal.volume_id, source_unit=peer, consistent=False, sync_as_of=branch - 1
        )
        await self.wp.rebase(branch)
        consumer = peer_consumer(journal, peer)
        if consumer is not None:
            # The peer is our source now: it holds everything it will send us.
            consumer.generation += 1
            consumer.dirty.clear_all()
            consumer.paused = False
            if consumer.mode != ConsumerMode.JOURNAL:
                consumer.set_mode(ConsumerMode.JOURNAL)
            consumer.acked_seq = branch - 1
        await self.wp.checkpoint()
        self.events.alert(
            "diverged_discarded",
            f"gave up seq {branch} and later ({div.nbytes} bytes"
            f"{'' if div.extents is not None else ', the whole volume: nothing proves less'}) "
            f"to follow {peer}: {reason}",
        )
        return regions

    async def _diverged_regions(self) -> tuple[tuple[int, int], ...]:
        path = statedir.diverged_path(self.state_dir, self.volume)
        return await asyncio.to_thread(read_diverged_file, path, self.wp.journal.volume.size)

    async def taken(self) -> None:
        """The source started the resync that covers our diverged regions (its map holds them
        durably now): the file has done its job."""
        path = statedir.diverged_path(self.state_dir, self.volume)
        await asyncio.to_thread(remove_diverged_file, path)

    async def _follow(self, peer: Lineage) -> None:
        """Take the peer's generations as ours (it is our source from now on)."""
        ours = self.history.generations
        first = peer.generations[0][0] if peer.generations else None
        known = {g.id: g for g in ours}
        cut = next((i for i, g in enumerate(ours) if g.id == first), len(ours))
        adopted = tuple(
            known.get(gid) or Generation(gid, start, unit, 0, "received")
            for gid, start, unit in peer.generations
        )
        history = VolumeHistory(self.volume, self.role, (*ours[:cut], *adopted))
        if self.role is Role.DEMOTED:
            history = self._with_role(history, Role.SECONDARY)
            self.events.alert("following", f"following {peer.unit} as its secondary")
        if history != self.history:
            await self._store(history)
        self.split_brains.clear(peer.unit)
        self._notify()

    def _with_role(self, history: VolumeHistory, role: Role) -> VolumeHistory:
        if role is not history.role:
            transition(history.role, role, what=f"volume {self.volume}")
        return VolumeHistory(history.volume, role, history.generations)

    async def _store(self, history: VolumeHistory) -> None:
        path = statedir.role_path(self.state_dir, self.volume)
        await asyncio.to_thread(generations.store, path, history)
        self.history = history


async def _gone(replica: ReplicaRuntime, timeout: float) -> None:
    """Wait until the replica's source has let go, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if replica.source is None or time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.02)
