"""The iSCSI target: the asyncio adapter between the iSCSI codecs and the SCSI logical units.

One :class:`IscsiServer` listens on the unit's portal and serves one target per volume
(``BASE_IQN:VOLUME``, LUN 0), each a :class:`~blockmirror.frontend.scsi_target.ScsiLogicalUnit`
over the volume's :class:`~blockmirror.blockdev.service.BlockDevice`. A connection logs in with
:mod:`iscsi_login` (and CHAP), then reads PDUs with :mod:`iscsi_framing`: every PDU of one socket
read is handled, the commands among them submitted to their unit in order, and then the block
device's commit gate is asked once (as the NBD server does): responses that claim a change go
out only once the write path holds it, and become CHECK CONDITION if its commit fails.

What this target does and does not do is docs/iscsi.md's: ErrorRecoveryLevel 0, one connection
per session, one LUN per target, DataPDUInOrder/DataSequenceInOrder Yes.

Why one module: a connection's login, its command window, its tasks waiting for data, its
StatSN and its commit-gated response queue are one state machine over one socket; split, each
part would reach into the others' counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from blockmirror.blockdev.service import BlockDevice, ReplyGate, RequestError
from blockmirror.errors import IscsiPduError
from blockmirror.frontend import iscsi_pdu as p
from blockmirror.frontend.iscsi_discovery import Portal, TextExchange
from blockmirror.frontend.iscsi_framing import Digests, PduReader, encode, header_of
from blockmirror.frontend.iscsi_keys import ConnectionParams, SessionParams
from blockmirror.frontend.iscsi_login import (
    LoginConfig,
    LoginFailure,
    LoginIdentity,
    LoginMachine,
    LoginStatus,
    LoginSuccess,
    Target,
)
from blockmirror.frontend.iscsi_serial import in_cmd_window, serial_add, serial_gt
from blockmirror.frontend.iscsi_tasks import DataOutError, DataOutTask
from blockmirror.frontend.scsi_pr import Nexus
from blockmirror.frontend.scsi_sense import Status
from blockmirror.frontend.scsi_target import ScsiLogicalUnit, answer_unknown_lun, residual

__all__ = ["IscsiServer", "IscsiTarget"]

log = logging.getLogger(__name__)

LOGIN_TIMEOUT = 15.0
CHECK = int(Status.CHECK_CONDITION)
# The PDUs numbered by CmdSN (the window applies to them unless immediate).
_NUMBERED = (p.ScsiCommand, p.TaskRequest, p.TextRequest, p.NopOut, p.LogoutRequest)
_RESETS = (
    p.TaskFunction.LOGICAL_UNIT_RESET,
    p.TaskFunction.TARGET_WARM_RESET,
    p.TaskFunction.TARGET_COLD_RESET,
)
READ_SIZE = 256 * 1024
MAX_CONNECTIONS = 256
_SENSE_INVALID_DATA_OUT = bytes(  # ILLEGAL REQUEST, INVALID FIELD IN COMMAND INFORMATION UNIT
    (0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x0E, 0x03, 0, 0, 0, 0)
)


@dataclass
class IscsiTarget:
    """One target: a logical unit over a volume's block device."""

    name: str
    lu: ScsiLogicalUnit
    device: BlockDevice
    alias: str | None = None
    sessions: int = 0
    connections: int = 0


@dataclass
class _Session:
    tsih: int
    identity: LoginIdentity
    target: IscsiTarget | None
    params: SessionParams
    nexus: Nexus | None
    exp_cmd_sn: int
    window: int
    connections: set[_Connection] = field(default_factory=set)
    # CmdSNs taken beyond ExpCmdSN (another connection's command may fill the gap first):
    # ExpCmdSN advances over them only once the gap is filled (RFC 7143 3.2.2.1).
    ahead: set[int] = field(default_factory=set)

    @property
    def max_cmd_sn(self) -> int:
        return serial_add(self.exp_cmd_sn, self.window - 1)

    def take(self, cmd_sn: int) -> bool:
        """Whether a non-immediate command numbered ``cmd_sn`` is taken: in the window and
        not a duplicate. ExpCmdSN then moves past every CmdSN taken without a gap."""
        if not in_cmd_window(cmd_sn, self.exp_cmd_sn, self.max_cmd_sn) or cmd_sn in self.ahead:
            return False
        self.ahead.add(cmd_sn)
        while self.exp_cmd_sn in self.ahead:
            self.ahead.discard(self.exp_cmd_sn)
            self.exp_cmd_sn = serial_add(self.exp_cmd_sn, 1)
        return True


class IscsiServer:
    def __init__(
        self,
        targets: Mapping[str, IscsiTarget],
        login: LoginConfig,
        *,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.targets = dict(targets)
        self.login = login
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._sessions: dict[int, _Session] = {}
        self._tsih = itertools.cycle(range(1, 0x10000))
        self.refused_connections = 0
        self.evicted_connections = 0

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None and self._server.sockets
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(
            self._accept, host, port, reuse_address=True, limit=READ_SIZE
        )
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.close()
        for conn in list(self._connections):
            await conn.finished()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def status(self, name: str) -> dict[str, Any]:
        target = self.targets[name]
        return {"target": name, "sessions": target.sessions, "connections": target.connections}

    # --- connections and sessions -------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.max_connections:
            # Full: the oldest connection that has not logged in yet gives way (a flood of
            # idle connects cannot lock a real initiator out); with none, the new one goes.
            waiting = [c for c in self._connections if not c.logged_in]
            if not waiting:
                self.refused_connections += 1
                writer.close()
                return
            min(waiting, key=lambda c: c.opened).close()
            self.evicted_connections += 1
        conn = _Connection(self, reader, writer)
        self._connections.add(conn)
        try:
            await conn.run()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.debug("iSCSI connection from %s ended: %s", conn.peer, exc)
        except Exception:
            log.exception("iSCSI connection from %s failed", conn.peer)
        finally:
            self._connections.discard(conn)
            conn.ended()
            with contextlib.suppress(ConnectionError, OSError):
                writer.close()

    def find_target(self, name: str) -> Target | None:
        target = self.targets.get(name)
        return Target(name, target.alias) if target is not None else None

    def admit(self, identity: LoginIdentity, connection: _Connection) -> int | LoginStatus:
        if identity.tsih != 0:
            # A connection joining a session (MC/S): the same initiator port and target, and
            # room under the session's MaxConnections.
            session = self._sessions.get(identity.tsih)
            if session is None:
                return LoginStatus.SESSION_DOES_NOT_EXIST
            same = session.identity
            if (
                same.initiator_name != identity.initiator_name
                or same.isid != identity.isid
                or (same.target.name if same.target else None)
                != (identity.target.name if identity.target else None)
            ):
                return LoginStatus.CANT_INCLUDE_IN_SESSION
            if len(session.connections) >= session.params.max_connections:
                return LoginStatus.TOO_MANY_CONNECTIONS
            for other in list(session.connections):
                if other.cid == identity.cid:
                    other.close()  # connection reinstatement: the old one with this CID goes
            return identity.tsih
        # Session reinstatement (RFC 7143 6.3.5): the same initiator, ISID and target end the
        # old session.
        for old in list(self._sessions.values()):
            same = old.identity
            if (
                same.initiator_name == identity.initiator_name
                and same.isid == identity.isid
                and (same.target.name if same.target else None)
                == (identity.target.name if identity.target else None)
            ):
                for conn in list(old.connections):
                    conn.close()
                self.end_session(old, lost=True)
        tsih = next(self._tsih)
        while tsih in self._sessions:
            tsih = next(self._tsih)
        return tsih

    def open_session(self, success: LoginSuccess, connection: _Connection) -> _Session:
        joined = self._sessions.get(success.tsih) if success.session is None else None
        if joined is not None:
            joined.connections.add(connection)
            return joined
        identity = success.identity
        target = self.targets.get(identity.target.name) if identity.target else None
        nexus = None
        if target is not None:
            nexus = Nexus(
                f"{identity.initiator_name},i,0x{identity.isid:012x}",
                f"{target.name},t,0x{self.login.portal_group_tag:04x}",
            )
            target.sessions += 1
        session = _Session(
            success.tsih,
            identity,
            target,
            success.session or SessionParams(),
            nexus,
            success.exp_cmd_sn,
            self.login.command_window,
            {connection},
        )
        self._sessions[success.tsih] = session
        return session

    def leave(self, session: _Session, connection: _Connection, *, lost: bool) -> None:
        """A connection of ``session`` ended: the session ends with its last one."""
        session.connections.discard(connection)
        if not session.connections:
            self.end_session(session, lost=lost)

    def end_session(self, session: _Session, *, lost: bool) -> None:
        if self._sessions.pop(session.tsih, None) is None:
            return
        session.connections.clear()
        if session.target is not None:
            session.target.sessions -= 1
            if lost and session.nexus is not None:
                session.target.lu.nexus_lost(session.nexus)

    def visible_targets(self) -> list[str]:
        return sorted(self.targets)


@dataclass
class _Reply:
    """The PDUs answering one command (or other request), sent in order, StatSN stamped last."""

    pdus: list[p.Pdu]
    itt: int = p.RESERVED_TAG
    # For a gated change: the SCSI response to send instead if the commit fails.
    on_failure: Callable[[RequestError], list[p.Pdu]] | None = None


@dataclass
class _Out:
    queue: list[_Reply] = field(default_factory=list)


class _Connection:
    def __init__(
        self, server: IscsiServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.pdus = PduReader()
        self.digests = Digests()
        self.params = ConnectionParams()
        self.session: _Session | None = None
        self.stat_sn = 0
        self.tasks: dict[int, DataOutTask] = {}
        self.text: TextExchange | None = None
        self.gate: ReplyGate | None = None
        self._out = _Out()
        self._held = 0  # commits whose replies wait
        self._ttt = itertools.count(1)
        # Commands handed to their unit and not yet answered, and those of them aborted: an
        # aborted task's response is never sent (RFC 7143 4.2.3.3), though its change happens.
        self._inflight: set[int] = set()
        self._aborted: set[int] = set()
        self._closing = False
        self.logged_in = False
        self.cid = 0
        self.opened = asyncio.get_running_loop().time()
        self._done = asyncio.Event()
        self._logout = False

    # --- life cycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    async def finished(self) -> None:
        await self._done.wait()

    def ended(self) -> None:
        if self.session is not None:
            target = self.session.target
            if target is not None:
                target.connections -= 1
            self.server.leave(self.session, self, lost=not self._logout)
        self._done.set()

    async def run(self) -> None:
        if not await asyncio.wait_for(self._login(), LOGIN_TIMEOUT):
            return
        while not self._closing:
            data = await self.reader.read(READ_SIZE)
            if not data:
                return
            self.pdus.feed(data)
            while not self._closing:
                try:
                    pdu = self.pdus.next_pdu()
                except IscsiPduError as exc:
                    if exc.close:
                        log.warning("iSCSI %s: %s; closing", self.peer, exc)
                        return
                    self._reject(exc.reject_reason or p.RejectReason.PROTOCOL_ERROR, exc.header)
                    continue
                if pdu is None:
                    break
                self._handle(pdu)
            self._release()
            await self.writer.drain()
            if self._logout and not self._held:
                return

    # --- login --------------------------------------------------------------------------------

    async def _login(self) -> bool:
        machine = LoginMachine(
            self.server.login,
            find_target=self.server.find_target,
            admit=lambda identity: self.server.admit(identity, self),
        )
        while True:
            data = await self.reader.read(READ_SIZE)
            if not data:
                return False
            self.pdus.feed(data)
            while True:
                try:
                    pdu = self.pdus.next_pdu()
                except IscsiPduError as exc:
                    step = machine.abort(LoginStatus.INITIATOR_ERROR, str(exc))
                    self._write_now(list(step.responses))
                    return False
                if pdu is None:
                    break
                if not isinstance(pdu, p.LoginRequest):
                    step = machine.abort(
                        LoginStatus.INITIATOR_ERROR, f"{type(pdu).__name__} during login"
                    )
                    self._write_now(list(step.responses))
                    return False
                step = machine.handle(pdu)
                self._write_now(list(step.responses))
                outcome = step.outcome
                if isinstance(outcome, LoginFailure):
                    log.warning("iSCSI login from %s refused: %s", self.peer, outcome.reason)
                    await self.writer.drain()
                    return False
                if isinstance(outcome, LoginSuccess):
                    await self.writer.drain()
                    self._full_feature(outcome)
                    return True

    def _full_feature(self, success: LoginSuccess) -> None:
        self.logged_in = True
        self.cid = success.identity.cid
        self.params = success.connection
        self.digests = Digests(self.params.header_digest, self.params.data_digest)
        self.pdus.digests = self.digests
        self.pdus.max_data_segment = self.params.max_recv_data_segment_length
        self.stat_sn = success.stat_sn
        self.session = self.server.open_session(success, self)
        target = self.session.target
        if target is not None:
            target.connections += 1
            self.gate = ReplyGate(target.device)
        self.text = TextExchange(
            session_target=target.name if target is not None else None,
            targets=self.server.visible_targets,
            portals=[self._portal()],
            max_send_data_segment_length=self.params.max_send_data_segment_length,
        )
        who = success.identity
        log.info(
            "iSCSI %s: %s logged in to %s",
            self.peer,
            who.initiator_name,
            target.name if target else "discovery",
        )

    def _portal(self) -> Portal:
        sock = self.writer.get_extra_info("sockname")
        host, port = (str(sock[0]), int(sock[1])) if sock else ("127.0.0.1", 3260)
        return Portal(host, port, self.server.login.portal_group_tag)

    # --- full feature phase ---------------------------------------------------------------------

    def _handle(self, pdu: p.Pdu) -> None:
        session = self.session
        assert session is not None
        if isinstance(pdu, _NUMBERED) and not self._window(session, pdu):
            return
        if session.target is None and not isinstance(
            pdu, p.TextRequest | p.NopOut | p.LogoutRequest
        ):
            self._reject(p.RejectReason.PROTOCOL_ERROR, header_of(pdu))
            return
        match pdu:
            case p.ScsiCommand():
                self._command(session, pdu)
            case p.DataOut():
                self._data_out(session, pdu)
            case p.NopOut():
                if pdu.itt != p.RESERVED_TAG:
                    self._queue(_Reply([p.NopIn(itt=pdu.itt, lun=pdu.lun, data=pdu.data)]))
            case p.TextRequest():
                assert self.text is not None
                try:
                    self._queue(_Reply([self.text.handle(pdu)]))
                except IscsiPduError as exc:
                    self._reject(exc.reject_reason or p.RejectReason.PROTOCOL_ERROR, header_of(pdu))
            case p.TaskRequest():
                self._task_management(session, pdu)
            case p.LogoutRequest():
                self._logout = True
                self._queue(_Reply([p.LogoutResponse(itt=pdu.itt)]))
            case p.Snack():
                self._reject(p.RejectReason.PROTOCOL_ERROR, header_of(pdu))
            case _:
                self._reject(p.RejectReason.PROTOCOL_ERROR, header_of(pdu))

    def _window(self, session: _Session, pdu: Any) -> bool:
        """CmdSN ordering: immediate PDUs pass; others must be in the window and new (else
        dropped, RFC 7143 3.2.2.1), and advance ExpCmdSN. ExpStatSN acknowledges the status
        received: one beyond what this connection sent is a protocol error, rejected. (One
        past the next StatSN is let through: libiscsi counts an R2T's StatSN as a status.)"""
        if serial_gt(pdu.exp_stat_sn, serial_add(self.stat_sn, 1)):
            self._reject(p.RejectReason.PROTOCOL_ERROR, header_of(pdu))
            return False
        if pdu.immediate:
            return True
        if not session.take(pdu.cmd_sn):
            log.debug("iSCSI %s: CmdSN %d outside the window; dropped", self.peer, pdu.cmd_sn)
            return False
        return True

    def _command(self, session: _Session, cmd: p.ScsiCommand) -> None:
        target = session.target
        assert target is not None and session.nexus is not None
        if cmd.itt in self.tasks:
            self._reject(p.RejectReason.TASK_IN_PROGRESS, header_of(cmd))
            return
        if cmd.lun != 0:
            self._respond(cmd, answer_unknown_lun(cmd.cdb, [0]))
            return
        transfer = target.lu.transfer(cmd.cdb)
        wanted = min(cmd.expected_length, transfer.data_out) if cmd.write else 0
        try:
            task = DataOutTask.start(cmd, wanted, session.params, need=transfer.data_out)
        except DataOutError as exc:
            self._data_out_failed(cmd, str(exc))
            return
        if not task.complete:
            self.tasks[cmd.itt] = task
            self._solicit(task)
            return
        self._submit(session, task)

    def _data_out(self, session: _Session, pdu: p.DataOut) -> None:
        task = self.tasks.get(pdu.itt)
        if task is None:
            self._reject(p.RejectReason.INVALID_PDU_FIELD, header_of(pdu))
            return
        try:
            task.data_out(pdu)
        except DataOutError as exc:
            del self.tasks[pdu.itt]
            self._data_out_failed(task.command, str(exc))
            return
        if task.complete:
            del self.tasks[pdu.itt]
            self._submit(session, task)
        else:
            self._solicit(task)

    def _solicit(self, task: DataOutTask) -> None:
        r2t = task.next_r2t(next(self._ttt) & 0xFFFFFFFE)
        if r2t is not None:
            cmd = task.command
            self._queue(
                _Reply(
                    [
                        p.R2T(
                            itt=cmd.itt,
                            ttt=r2t.ttt,
                            r2t_sn=r2t.r2t_sn,
                            buffer_offset=r2t.offset,
                            desired_length=r2t.length,
                            lun=cmd.lun,
                        )
                    ]
                )
            )

    def _submit(self, session: _Session, task: DataOutTask) -> None:
        target = session.target
        assert target is not None and session.nexus is not None
        cmd = task.command
        self._inflight.add(cmd.itt)
        outcome = target.lu.submit(session.nexus, cmd.cdb, tuple(task.segments()))
        if isinstance(outcome, asyncio.Future):
            self._held += 1

            def done(future: asyncio.Future[Any]) -> None:
                self._held -= 1
                if self._closing or future.cancelled():
                    return
                self._respond(cmd, future.result(), task.need)
                self._release()

            outcome.add_done_callback(done)
            return
        self._respond(cmd, outcome, task.need)

    def _respond(self, cmd: p.ScsiCommand, result: Any, need_out: int = 0) -> None:
        """The Data-In PDUs and status of a finished command; ``need_out``: the data-out
        bytes its CDB asked for (a write's residual is against it)."""
        lu_sense = bytes(result.sense)
        if lu_sense:
            log.debug(
                "iSCSI %s: %s answered %s, sense %s",
                self.peer,
                bytes(cmd.cdb[:1]).hex(),
                result.status,
                lu_sense[:18].hex(),
            )
        data = memoryview(result.data_in).cast("B") if cmd.read else memoryview(b"")
        sent = min(len(data), cmd.expected_length)
        moved = need_out if cmd.write and not cmd.read else len(data) if cmd.read else 0
        under, over = residual(cmd.expected_length, moved)
        pdus: list[p.Pdu] = []
        step = self.params.max_send_data_segment_length
        collapse = result.status == Status.GOOD and not lu_sense and sent > 0
        for n, offset in enumerate(range(0, sent, step)):
            last = offset + step >= sent
            pdus.append(
                p.DataIn(
                    itt=cmd.itt,
                    lun=cmd.lun,
                    data_sn=n,
                    buffer_offset=offset,
                    final=last,
                    status=int(result.status) if last and collapse else None,
                    overflow=bool(over) if last and collapse else False,
                    underflow=bool(under) if last and collapse else False,
                    residual_count=(over or under) if last and collapse else 0,
                    data=(data[offset : min(sent, offset + step)],),
                )
            )
        if not collapse:
            pdus.append(self._scsi_response(cmd, int(result.status), lu_sense, under, over))
        reply = _Reply(pdus, cmd.itt)
        if result.gated and self.gate is not None:
            target = self.session.target if self.session else None
            assert target is not None

            def failed(error: RequestError) -> list[p.Pdu]:
                bad = target.lu.commit_failed(error)
                return [self._scsi_response(cmd, int(bad.status), bytes(bad.sense), 0, 0)]

            reply.on_failure = failed
            self.gate.ack(reply, cmd.itt)
        self._queue(reply)

    @staticmethod
    def _scsi_response(
        cmd: p.ScsiCommand, status: int, sense: bytes, under: int, over: int
    ) -> p.ScsiResponse:
        return p.ScsiResponse(
            itt=cmd.itt,
            status=status,
            overflow=bool(over),
            underflow=bool(under) and not over,
            residual_count=over or under,
            data=(p.sense_segment(sense),) if sense else (),
        )

    def _data_out_failed(self, cmd: p.ScsiCommand, why: str) -> None:
        log.warning("iSCSI %s: command %#x refused: %s", self.peer, cmd.itt, why)
        self._queue(
            _Reply(
                [
                    self._scsi_response(
                        cmd, int(Status.CHECK_CONDITION), _SENSE_INVALID_DATA_OUT, 0, 0
                    )
                ]
            )
        )

    def _task_management(self, session: _Session, req: p.TaskRequest) -> None:
        fn = req.function & 0x7F
        code = p.TaskResponseCode.COMPLETE
        target = session.target
        if fn == p.TaskFunction.ABORT_TASK:
            # Not yet submitted: dropped; submitted: it happens (nothing below can be undone),
            # but its response is not sent: either way the task no longer exists.
            self.tasks.pop(req.referenced_task_tag, None)
            self._abort({req.referenced_task_tag})
        elif fn in (p.TaskFunction.ABORT_TASK_SET, p.TaskFunction.CLEAR_TASK_SET):
            self.tasks.clear()
            self._abort(set(self._inflight))
        elif fn in _RESETS:
            self.tasks.clear()
            self._abort(set(self._inflight))
            if target is not None:
                target.lu.reset(by=session.nexus)
        else:
            code = p.TaskResponseCode.NOT_SUPPORTED
        self._queue(_Reply([p.TaskResponse(itt=req.itt, response=code)]))

    def _abort(self, itts: set[int]) -> None:
        known = itts & self._inflight
        self._aborted |= known
        # Responses queued in this batch and not yet released go too.
        self._out.queue = [r for r in self._out.queue if r.itt not in known]

    def _reject(self, reason: int, header: bytes) -> None:
        self._queue(_Reply([p.Reject(reason=reason, header=header or bytes(48))]))

    # --- sending ------------------------------------------------------------------------------

    def _queue(self, reply: _Reply) -> None:
        self._out.queue.append(reply)

    def _release(self) -> None:
        """Commit this batch's changes, then send what the commit gate allows, in order."""
        queue, self._out.queue = self._out.queue, []
        gate = self.gate
        if gate is None or not gate.waiting:
            self._send(queue)
            return
        commit = gate.commit()
        if commit.pending is None:
            if commit.error is not None:
                self._fail(queue, commit.acks, commit.error)
            self._send(queue)
            return
        self._held += 1

        def released(_: asyncio.Future[None]) -> None:
            self._held -= 1
            error = gate.outcome(commit)
            if error is not None:
                self._fail(queue, commit.acks, error)
            if not self._closing:
                self._send(queue)

        commit.pending.add_done_callback(released)

    @staticmethod
    def _fail(queue: list[_Reply], acks: dict[int, int], error: RequestError) -> None:
        for reply in queue:
            if id(reply) in acks and reply.on_failure is not None:
                reply.pdus = reply.on_failure(error)

    def _send(self, replies: Sequence[_Reply]) -> None:
        session = self.session
        out: list[p.Buffer] = []
        for reply in replies:
            if reply.itt != p.RESERVED_TAG and reply.itt in self._inflight:
                self._inflight.discard(reply.itt)
                if reply.itt in self._aborted:
                    self._aborted.discard(reply.itt)
                    continue
            for pdu in reply.pdus:
                out.extend(encode(self._stamp(pdu, session), self.digests))
        if out and not self.writer.is_closing():
            self.writer.writelines(out)

    def _stamp(self, pdu: p.Pdu, session: _Session | None) -> p.Pdu:
        exp = session.exp_cmd_sn if session else 0
        top = session.max_cmd_sn if session else 0
        if isinstance(pdu, p.R2T):
            return dataclasses.replace(pdu, stat_sn=self.stat_sn, exp_cmd_sn=exp, max_cmd_sn=top)
        if isinstance(pdu, p.DataIn) and pdu.status is None:
            return dataclasses.replace(pdu, exp_cmd_sn=exp, max_cmd_sn=top)
        if isinstance(pdu, p.NopIn) and pdu.itt == p.RESERVED_TAG:
            return dataclasses.replace(pdu, stat_sn=self.stat_sn, exp_cmd_sn=exp, max_cmd_sn=top)
        stamped: p.Pdu = dataclasses.replace(
            cast(Any, pdu), stat_sn=self.stat_sn, exp_cmd_sn=exp, max_cmd_sn=top
        )
        self.stat_sn = serial_add(self.stat_sn, 1)
        return stamped

    def _write_now(self, pdus: list[p.LoginResponse]) -> None:
        for pdu in pdus:
            self.writer.writelines(encode(pdu))
