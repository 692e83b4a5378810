"""The secondary's end of one link: authenticate the source, journal what it sends, ACK it.

A :class:`ReceiverSession` serves one accepted connection (the listener,
:mod:`blockmirror.link.listener`, accepts them and bounds how many may be in their handshake).
It binds the connection to one secondary volume (:class:`ReplicaRuntime`) after the checks of
docs/link-protocol.md, "Handshake", and then feeds records and resync data to that volume's
journaled write path. An ACK goes back once what arrived is durable.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from blockmirror.errors import BlockmirrorError, ProtocolError
from blockmirror.journal.checkpoint import ReplicaState
from blockmirror.journal.lineage import fixed_lineage
from blockmirror.journal.record import Record
from blockmirror.link import auth
from blockmirror.link.compression import DECODABLE
from blockmirror.link.handshake import End
from blockmirror.link.peer_configs import ConfigShare, credential_of, offer, take
from blockmirror.link.protocol import (
    PROTOCOL_VERSION,
    Ack,
    DigestRequest,
    Heartbeat,
    Hello,
    PeerConfig,
    Records,
    Refuse,
    RefuseCode,
    SyncData,
    SyncDone,
    SyncStart,
    SyncZero,
    Welcome,
    regions_frames,
)
from blockmirror.link.receiver_auth import authenticate_source
from blockmirror.link.replica_runtime import ReplicaRuntime
from blockmirror.link.session import DEFAULT_TIMEOUTS, LinkRefused, LinkSession, Timeouts
from blockmirror.link.verify import answer_digests
from blockmirror.state import Consistency, Role, transition

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReceiverSettings:
    """What every link of one unit's listener shares."""

    unit_name: str
    # The secondary volume of a name, None when this unit holds none.
    replicas: Callable[[str], ReplicaRuntime | None]
    psk: bytes | None = None  # the listener's key (a replica may have its own)
    tls: bool = False  # the connections are TLS: keys authenticate but frames are not sealed
    configs: ConfigShare | None = None  # the configuration exchange (peer_configs)


class ReceiverSession:
    """One accepted connection, from its first byte to its close.

    ``on_frame()`` is told of every whole frame before the link is bound to a replica (a
    stranger that sends whole frames is not the first to be closed for room), ``on_bound()``
    once it is (it no longer counts as unauthenticated).
    """

    def __init__(
        self,
        settings: ReceiverSettings,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        where: str,
        *,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        handshake_deadline: float | None = None,
        on_frame: Callable[[], None] | None = None,
        on_bound: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.where = where
        self.replica: ReplicaRuntime | None = None
        self._target: ReplicaRuntime | None = None
        self._owns_replica = False
        self._ack_scheduled = False
        self._hello: Hello | None = None  # once streaming
        self.credential = "none"  # what authenticated the source (peer_configs.credential_of)
        self._on_frame = on_frame
        self._on_bound = on_bound
        self.link = LinkSession(
            reader,
            writer,
            end=End.SECONDARY,
            timeouts=timeouts,
            what=f"link from {where}",
            handshake_deadline=handshake_deadline,
            on_read=self._count,
            on_frame=self._frame,
            on_refuse=self._record_refusal,
        )

    async def serve(self) -> bool:
        """Run the session to its end and close it; whether it ended in a refusal."""
        refused = False
        try:
            await self.run()
        except LinkRefused as exc:
            refused = True
            log.warning("link from %s refused: %s", self.where, exc)
        except (ProtocolError, auth.AuthError) as exc:
            refused = True
            log.warning("link from %s dropped: %s", self.where, exc)
            self.link.refuse_quietly("bad-frame", str(exc))
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.info("link from %s closed: %s", self.where, exc or type(exc).__name__)
        except asyncio.CancelledError:
            pass  # evicted for room, or the listener closes
        finally:
            self.release()
            await self.link.close()
        return refused

    # --- the link's hooks -----------------------------------------------------------------------

    def _count(self, nbytes: int) -> None:
        if self.replica is not None:
            self.replica.bytes_received += nbytes

    def _frame(self) -> None:
        if self.replica is None and self._on_frame is not None:
            self._on_frame()

    def _record_refusal(self, code: str, message: str) -> None:
        # Shown on the replica the source asked for, bound or not (an auth failure, say).
        target = self.replica or self._target
        if target is not None:
            target.last_refusal = f"{code}: {message} (from {self.where})"

    def refuse(self, code: str, message: str, *, frame: Refuse | None = None) -> LinkRefused:
        return self.link.refuse(code, message, frame=frame)

    def share_config(self) -> None:
        """Send our configuration to the source, if it takes it (once streaming, and after a
        reload)."""
        hello = self._hello
        if hello is None:
            return
        try:
            offer(self.settings.configs, self.link, accepted=hello.configs, what=self.where)
        except (OSError, ValueError) as exc:
            log.warning("link from %s: cannot send the configuration: %s", self.where, exc)

    def release(self) -> None:
        if self.replica is not None and self._owns_replica:
            self.replica.source = None
            self.replica.session = None
            self.replica.source_role = None
            self.replica.connected_since = None

    # --- handshake ------------------------------------------------------------------------------

    async def run(self) -> None:
        hello = await self.link.expect(Hello)
        if hello.protocol != PROTOCOL_VERSION:
            raise self.refuse("version", f"protocol {hello.protocol} is not {PROTOCOL_VERSION}")
        self._target = self.settings.replicas(hello.volume)
        await self._authenticate(hello)
        replica = self.settings.replicas(hello.volume)
        if replica is None:
            raise self.refuse("unknown-volume", f"no secondary volume named {hello.volume!r}")
        if replica.size != hello.size:
            raise self.refuse(
                "size-mismatch", f"replica {hello.volume} is {replica.size} bytes, not {hello.size}"
            )
        # Before the roles are asked: their answer may already change this volume's role.
        max_record = replica.write_path.journal.max_payload()
        if hello.max_record is not None and hello.max_record > max_record:
            raise self.refuse(
                "journal-too-small",
                f"replica {hello.volume}: records of up to {hello.max_record} bytes may come, "
                f"this unit's journal holds records of at most {max_record} bytes; give it a "
                "larger journal_size",
            )
        admission = await replica.admit_source(hello)
        if replica.closed:
            raise self.refuse("unknown-volume", f"volume {hello.volume!r} is being removed")
        if not admission.accept:
            assert admission.code is not None
            raise self.refuse(admission.code, admission.message, frame=admission.refusal())
        regions = admission.regions
        state = replica.replica
        lineage = hello.lineage
        self.replica = replica
        if self._on_bound is not None:
            self._on_bound()  # no longer counted against the listener's caps
        self._owns_replica = True
        replica.source = self.where
        replica.session = self
        replica.source_role = lineage.role if lineage is not None else None
        replica.source_unit = hello.unit
        replica.connected_since = time.time()
        replica.last_refusal = None
        # Resync progress belongs to one session: the source numbers its frames afresh.
        replica.sync_lsn = 0
        replica.sync_done = None
        wp = replica.write_path
        replica.source_holds_everything()
        if replica.roles is not None:
            replica.roles.source_changed()
        frames = regions_frames(regions)
        self.link.send(
            Welcome(
                PROTOCOL_VERSION,
                self.settings.unit_name,
                wp.journal.durable_seq,
                wp.applied_seq,
                bool(state and state.consistent),
                state.volume_id if state else None,
                max_record,
                lineage=(
                    replica.roles.lineage()
                    if replica.roles is not None
                    else fixed_lineage(
                        self.settings.unit_name, Role.SECONDARY, wp.journal.durable_seq
                    )
                ),
                diverged_frames=len(frames),
                configs=self.settings.configs is not None,
                compression=DECODABLE,
            )
        )
        for frame in frames:
            self.link.send(frame)
        self.link.stream()
        log.info("link from %s (%s) carries volume %s", self.where, hello.unit, hello.volume)
        self._hello = hello
        self.share_config()
        try:
            await self._stream(hello)
        except LinkRefused as exc:
            if exc.refusal is not None and exc.code == RefuseCode.SPLIT_BRAIN and replica.roles:
                # The source found our history is not its own (its WELCOME check).
                await replica.roles.refused(None, exc.refusal)
            raise

    async def _authenticate(self, hello: Hello) -> None:
        key = await authenticate_source(self, hello, self._target)
        self.credential = credential_of(key, self.link.extra("peercert"))

    # --- streaming ------------------------------------------------------------------------------

    async def _stream(self, hello: Hello) -> None:
        replica = self.replica
        assert replica is not None
        wp = replica.write_path
        # Heartbeats while idle; and an ACK every half interval tells the source how far the
        # replica has applied.
        heartbeat = asyncio.create_task(self.link.heartbeats(self._schedule_ack))
        syncing = False  # resync frames are only accepted between SYNC_START and SYNC_DONE
        try:
            while True:
                # Only stream frames get through; a REFUSE raises LinkRefused.
                message = await self.link.receive()
                if isinstance(message, Records):
                    self._check_records(message)
                    batch = [Record.from_header(r.header, r.payload) for r in message.records]
                    try:
                        done = await wp.append_replicated(batch)
                    except BlockmirrorError as exc:
                        raise self.refuse("internal", str(exc)) from exc
                    replica.records_received += len(batch)
                    done.add_done_callback(self._durable)
                elif isinstance(message, SyncStart):
                    await self._sync_start(hello, message)
                    syncing = True
                elif isinstance(message, SyncData | SyncZero):
                    if not syncing:
                        raise self.refuse("bad-frame", "resync data without SYNC_START")
                    data = message.data if isinstance(message, SyncData) else None
                    length = len(message.data) if isinstance(message, SyncData) else message.length
                    self._check_range(message.offset, length, f"resync lsn {message.lsn}")
                    done = wp.apply_resync(message.offset, length, data)
                    done.add_done_callback(functools.partial(self._sync_applied, message.lsn))
                elif isinstance(message, SyncDone):
                    if not syncing:
                        raise self.refuse("bad-frame", "SYNC_DONE without SYNC_START")
                    syncing = False
                    replica.sync_done = (message.lsn, message.as_of_seq)
                    self._check_consistent()
                elif isinstance(message, DigestRequest):
                    await self._digests(message)
                elif isinstance(message, Heartbeat):
                    self.link.send(Heartbeat(time.time_ns(), message.sent_ns))
                elif isinstance(message, PeerConfig):
                    try:
                        take(
                            self.settings.configs,
                            message,
                            peer_unit=hello.unit,
                            where=self.where,
                            credential=self.credential,
                        )
                    except ValueError as exc:
                        raise self.refuse("bad-frame", str(exc)) from None
                else:  # pragma: no cover - handshake.ACCEPTS lets nothing else through
                    raise self.refuse("bad-frame", f"unexpected {type(message).__name__}")
        finally:
            heartbeat.cancel()

    async def _digests(self, message: DigestRequest) -> None:
        replica = self.replica
        assert replica is not None
        self._check_range(message.offset, 1, f"digest request {message.request_id}")
        try:
            self.link.send(await answer_digests(replica.write_path, message))
        except BlockmirrorError as exc:
            raise self.refuse("internal", str(exc)) from exc

    def _check_range(self, offset: int, length: int, what: str) -> None:
        replica = self.replica
        assert replica is not None
        if offset + length > replica.size:
            raise self.refuse(
                "bad-frame",
                f"{what}: {offset}+{length} is past the end of the {replica.size}-byte replica",
            )

    def _check_records(self, message: Records) -> None:
        """Refuse, before anything is journaled, records that cannot be applied in order."""
        replica = self.replica
        assert replica is not None
        journal = replica.write_path.journal
        expected = journal.next_seq
        max_record = journal.max_payload()
        for record in message.records:
            h = record.header
            if h.seq != expected:
                raise self.refuse("bad-frame", f"record seq {h.seq} arrived, {expected} expected")
            if h.payload_len > max_record:
                raise self.refuse(
                    "journal-too-small",
                    f"record seq {h.seq} carries {h.payload_len} bytes, this unit's journal "
                    f"holds records of at most {max_record} bytes; give it a larger journal_size",
                )
            self._check_range(h.offset, h.length, f"record seq {h.seq}")
            expected += 1

    async def _sync_start(self, hello: Hello, message: SyncStart) -> None:
        replica = self.replica
        assert replica is not None
        wp = replica.write_path
        journal = wp.journal
        # The point before the resync stays restorable until it ends (docs/history.md).
        try:
            wp.replica.begin_resync(whole=_consistency(journal.replica) == Consistency.CONSISTENT)
        except OSError as exc:
            if wp.history is not None:
                wp.history.give_up(exc)
        # Inconsistent from now on, durably, before any copied region lands on the replica.
        transition(
            _consistency(journal.replica), Consistency.INCONSISTENT, what=f"replica {replica.name}"
        )
        journal.replica = ReplicaState(
            volume_id=hello.volume_id,
            source_unit=hello.unit,
            consistent=False,
            sync_lsn=message.lsn,
            sync_as_of=message.as_of_seq,
        )
        replica.sync_done = None
        replica.sync_lsn = message.lsn
        if journal.next_seq != message.as_of_seq + 1:
            await wp.rebase(message.as_of_seq + 1)
        else:
            await wp.checkpoint()
        replica.source_holds_everything()
        if replica.roles is not None:
            replica.roles.source_changed()
        if replica.roles is not None:
            # The source's dirty map holds the regions we gave up now, durably (it writes
            # them before it starts the resync): our own record of them has done its job.
            await replica.roles.taken()
        log.info(
            "replica %s: %s resync from %s starts (records follow from %d)",
            replica.name,
            "full" if message.full else "dirty-region",
            hello.unit,
            message.as_of_seq + 1,
        )
        self._schedule_ack()

    def _durable(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.link.abort()
            return
        if self.replica is not None:
            self.replica.source_holds_everything()
        self._check_consistent()
        self._schedule_ack()

    def _sync_applied(self, lsn: int, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.link.abort()
            return
        replica = self.replica
        assert replica is not None
        replica.sync_lsn = max(replica.sync_lsn, lsn)
        self._check_consistent()
        self._schedule_ack()

    def _check_consistent(self) -> None:
        replica = self.replica
        if replica is None or replica.sync_done is None:
            return
        lsn, as_of = replica.sync_done
        wp = replica.write_path
        # SYNC_DONE carries the number after the last region's: every region before it is in.
        if replica.sync_lsn >= lsn - 1 and wp.applied_seq >= as_of:
            replica.sync_lsn = lsn
            replica.sync_done = None
            state = wp.journal.replica
            if state is not None:
                transition(
                    _consistency(state), Consistency.CONSISTENT, what=f"replica {replica.name}"
                )
                wp.journal.replica = ReplicaState(
                    volume_id=state.volume_id,
                    source_unit=state.source_unit,
                    consistent=True,
                    sync_lsn=replica.sync_lsn,
                    sync_as_of=as_of,
                    sync_done=True,
                )
            try:
                wp.replica.end_resync()
            except OSError as exc:
                if wp.history is not None:
                    wp.history.give_up(exc)
            asyncio.get_running_loop().create_task(self._persist_consistent())

    async def _persist_consistent(self) -> None:
        replica = self.replica
        assert replica is not None
        await replica.write_path.checkpoint()
        log.info("replica %s is consistent", replica.name)

    def _schedule_ack(self) -> None:
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_ack)

    def _send_ack(self) -> None:
        self._ack_scheduled = False
        replica = self.replica
        if replica is None or self.link.is_closing:
            return
        wp = replica.write_path
        self.link.send(Ack(wp.journal.durable_seq, wp.applied_seq, replica.sync_lsn))


def _consistency(state: ReplicaState | None) -> Consistency:
    """The replica's consistency as the transition table names it (no state yet: a replica
    that never received, which is not consistent)."""
    if state is not None and state.consistent:
        return Consistency.CONSISTENT
    return Consistency.INCONSISTENT
