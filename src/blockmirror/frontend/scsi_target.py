"""The SCSI block command executor: one logical unit over the block-device service (SBC-3).

:class:`ScsiLogicalUnit` turns a CDB, the command's data-out bytes and the I_T nexus it came
through into a :class:`ScsiResult` (status, data-in, sense data). It sits on a :class:`Disk`, the
subset of :class:`~blockmirror.blockdev.service.BlockDevice` it needs, so every rule the service
keeps (ranges, read-only, the largest write, commit gating, errno-style errors) holds for SCSI as
for NBD. The iSCSI transport owns PDUs, sessions, R2T and task management; this module owns what
a command means. How the transport calls it:

- **Sizing.** :meth:`ScsiLogicalUnit.transfer` says, from the CDB alone, how many data-out bytes
  the command takes and the most data-in it returns, so the transport solicits exactly that (an
  invalid CDB takes none: :meth:`submit` then answers its error). :func:`residual` compares with
  the initiator's Expected Data Transfer Length for the SCSI Response's residual counts.
- **Data.** ``data_out`` may be one buffer or several (a write's PDU segments are handed to the
  write path without a copy). Bytes past what the command takes are ignored (an underflow); too
  few end the command with ILLEGAL REQUEST, INVALID FIELD IN COMMAND INFORMATION UNIT before
  anything changes (an overflow: SPC-4 4.5.6, option b). ``data_in`` is cut to the CDB's
  allocation length, not to the Expected Data Transfer Length: the transport sends at most that
  and reports the rest as overflow.
- **Submitting.** :meth:`submit` does all validation and hands every change to the disk before it
  returns, so changes staged during one socket read are committed by that read's
  :meth:`~blockmirror.blockdev.service.ReplyGate.commit`. It returns a result, or a future of one
  for a command that waits (a FUA write, SYNCHRONIZE CACHE, a change the write path answers
  later). :meth:`execute` is the same as a coroutine. A result with ``gated`` set claims a change
  the write path has only accepted: the transport must :meth:`ReplyGate.ack
  <blockmirror.blockdev.service.ReplyGate.ack>` its response and send it only after the next
  commit allows, replacing it with :meth:`commit_failed` when that commit fails (as NBD does).
- **Tasks.** Nothing here can be cancelled: a change handed to the write path happens. To abort a
  task or reset the unit, the transport stops waiting for (and drops) its response; cancelling a
  returned future does not cancel the write path's. PREEMPT AND ABORT returns the nexuses whose
  tasks must be aborted in ``ScsiResult.aborted``. The transport must also enforce ORDERED and
  HEAD OF QUEUE task attributes; SIMPLE commands complete in any order (the control mode page
  says so).
- **Unit attentions are ours.** The unit keeps one queue per I_T nexus: reported (and cleared) by
  the next command but INQUIRY, REPORT LUNS and REQUEST SENSE (which returns it as its data).
  The transport calls :meth:`reset` for a LOGICAL UNIT RESET or target reset (every other nexus
  then hears BUS DEVICE RESET FUNCTION OCCURRED), :meth:`nexus_lost` when a session ends without
  logout, and :meth:`notify` for anything else (CAPACITY DATA HAS CHANGED...). A new nexus starts
  with no unit attention, as Linux's target does: initiators need none to start.

What each block command does to the disk, and how the disk's errors become sense data, is
:mod:`~blockmirror.frontend.scsi_block`.

Block size: 512 bytes by default. ``block_size=4096`` is accepted as is (every limit and page is
derived from it); it must stay fixed for a volume's life, since hosts address the disk, and
store their partition tables, in logical blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from blockmirror.blockdev.service import RequestError
from blockmirror.frontend import scsi_cdb as c
from blockmirror.frontend import scsi_pages as pages
from blockmirror.frontend.scsi_block import (
    GOOD,
    BlockCommands,
    Buffer,
    DataOut,
    Disk,
    ScsiResult,
    change_sense,
    check_condition,
    error_result,
    geometry,
    joined,
)
from blockmirror.frontend.scsi_pr import Access, Nexus, Reservations
from blockmirror.frontend.scsi_sense import (
    BUS_DEVICE_RESET_OCCURRED,
    I_T_NEXUS_LOSS_OCCURRED,
    INTERNAL_TARGET_FAILURE,
    LOGICAL_UNIT_NOT_SUPPORTED,
    NO_SENSE,
    ScsiError,
    Sense,
    SenseCode,
    Status,
)

__all__ = [
    "Disk",
    "Nexus",
    "Residual",
    "ScsiLogicalUnit",
    "ScsiResult",
    "Transfer",
    "answer_unknown_lun",
    "residual",
]

log = logging.getLogger(__name__)

MAX_ATTENTIONS = 8  # per nexus; older ones are dropped
MAX_NEXUSES = 1024  # nexuses remembered for their unit attentions

# These run without reporting a pending unit attention (SAM-5 5.14).
_NO_UNIT_ATTENTION = frozenset({c.Opcode.INQUIRY, c.Opcode.REPORT_LUNS, c.Opcode.REQUEST_SENSE})
# Media access, refused while the unit is not ready.
_MEDIUM = (
    c.TestUnitReady,
    c.ReadCapacity10,
    c.ReadCapacity16,
    c.GetLbaStatus,
    c.Read,
    c.Write,
    c.WriteSame,
    c.Unmap,
    c.SynchronizeCache,
    c.Verify,
)


class Transfer(NamedTuple):
    data_out: int
    data_in: int


class Residual(NamedTuple):
    underflow: int
    overflow: int


def residual(expected: int, wanted: int) -> Residual:
    """The residual of a command that wanted to move ``wanted`` bytes when the initiator
    expected ``expected`` (RFC 7143 11.4.5): underflow when it moved less, overflow when more."""
    return Residual(max(0, expected - wanted), max(0, wanted - expected))


def answer_unknown_lun(cdb: Buffer, luns: Sequence[int]) -> ScsiResult:
    """The answer for a LUN the target does not have (SPC-4 4.6.4): INQUIRY reports peripheral
    qualifier 011b, REPORT LUNS works, REQUEST SENSE returns the reason, the rest fail."""
    try:
        command = c.decode(cdb)
    except ScsiError as exc:
        return error_result(exc)
    if isinstance(command, c.Inquiry):
        # Peripheral qualifier 011b, device type 1Fh: no logical unit here, nor can there be.
        if command.evpd:
            data = bytes((0x7F, command.page, 0, 0))
        else:
            data = bytes((0x7F, 0, pages.SPC4_VERSION, 0x02, 31)) + bytes(31)
        return ScsiResult(Status.GOOD, data[: command.allocation])
    if isinstance(command, c.ReportLuns):
        data = pages.report_luns(luns, command.select)
        return ScsiResult(Status.GOOD, data[: command.allocation])
    if isinstance(command, c.RequestSense):
        data = Sense(LOGICAL_UNIT_NOT_SUPPORTED).fixed()
        return ScsiResult(Status.GOOD, data[: command.allocation])
    return check_condition(LOGICAL_UNIT_NOT_SUPPORTED)


class ScsiLogicalUnit:
    """One logical unit: a :class:`Disk` with its identity, reservations and unit attentions.

    ``lbprz``: set only when the volume reads zeros where it was trimmed (a file volume with
    hole punching), since UNMAP goes to the disk as a trim, whose content is otherwise
    unspecified. ``luns`` is what REPORT LUNS lists (the target's, not only this unit's).
    """

    def __init__(
        self,
        disk: Disk,
        identity: pages.Identity,
        *,
        block_size: int = 512,
        physical_exponent: int = 0,
        lbprz: bool = False,
        luns: Sequence[int] = (0,),
    ) -> None:
        self.disk = disk
        self.identity = identity
        self.block_size = block_size
        self.geometry = geometry(disk, block_size, physical_exponent=physical_exponent, lbprz=lbprz)
        self.block = BlockCommands(disk, self.geometry)
        self.luns = tuple(luns)
        self.reservations = Reservations()
        # When set, media access is refused with this NOT READY code (the daemon's hook, e.g.
        # while a volume changes role); INQUIRY, MODE SENSE and the reservations still work.
        self.not_ready: SenseCode | None = None
        self._attentions: OrderedDict[Nexus, list[SenseCode]] = OrderedDict()

    # --- the transport's calls ------------------------------------------------------------------

    def transfer(self, cdb: Buffer) -> Transfer:
        """The data-out bytes the command takes and the most data-in it returns."""
        try:
            command = c.decode(cdb)
        except ScsiError:
            return Transfer(0, 0)
        bs = self.block_size
        return Transfer(c.data_out_length(command, bs), c.data_in_length(command, bs))

    async def execute(self, nexus: Nexus, cdb: Buffer, data_out: DataOut = b"") -> ScsiResult:
        """:meth:`submit` as a coroutine."""
        result = self.submit(nexus, cdb, data_out)
        return result if isinstance(result, ScsiResult) else await result

    def submit(
        self, nexus: Nexus, cdb: Buffer, data_out: DataOut = b""
    ) -> ScsiResult | asyncio.Future[ScsiResult]:
        """Run one command; never raises (a bug below becomes HARDWARE ERROR)."""
        queue = self._queue(nexus)
        try:
            if queue and cdb and cdb[0] not in _NO_UNIT_ATTENTION:
                return check_condition(queue.pop(0))
            return self._run(nexus, c.decode(cdb), data_out)
        except ScsiError as exc:
            self.disk.answered_error()
            return error_result(exc)
        except Exception:
            log.exception("SCSI command %s failed unexpectedly", bytes(cdb[:16]).hex())
            self.disk.answered_error()
            return check_condition(INTERNAL_TARGET_FAILURE)

    def commit_failed(self, error: RequestError) -> ScsiResult:
        """The response a gated success becomes when the write path's commit fails."""
        return check_condition(change_sense(error))

    def reset(self, by: Nexus | None = None) -> None:
        """A LOGICAL UNIT RESET (or target reset) from ``by``: persistent reservations stay
        (SPC-4 5.13.1); every other nexus's attentions give way to the reset's."""
        for nexus, queue in self._attentions.items():
            if nexus != by:
                queue[:] = [BUS_DEVICE_RESET_OCCURRED]

    def nexus_lost(self, nexus: Nexus) -> None:
        """The nexus is gone; if it comes back (same initiator and target port) it hears so."""
        self._queue(nexus)[:] = [I_T_NEXUS_LOSS_OCCURRED]

    def notify(self, code: SenseCode, *, but: Nexus | None = None) -> None:
        """Queue a unit attention for every known nexus except ``but``."""
        for nexus in list(self._attentions):
            if nexus != but:
                self._attend(nexus, code)

    # --- dispatch -------------------------------------------------------------------------------

    def _run(
        self, nexus: Nexus, command: c.Command, data_out: DataOut
    ) -> ScsiResult | asyncio.Future[ScsiResult]:
        self.reservations.check(nexus, _access(command))
        if self.not_ready is not None and isinstance(command, _MEDIUM):
            raise ScsiError.check(self.not_ready)
        g = self.geometry
        match command:
            case c.TestUnitReady():
                return GOOD
            case c.RequestSense():
                return self._request_sense(nexus, command)
            case c.Inquiry():
                if command.evpd:
                    data = pages.vpd_page(command.page, self.identity, g, nexus)
                else:
                    data = pages.standard_inquiry(self.identity)
                return ScsiResult(Status.GOOD, data[: command.allocation])
            case c.ReportLuns():
                data = pages.report_luns(self.luns, command.select)
                return ScsiResult(Status.GOOD, data[: command.allocation])
            case c.ReadCapacity10():
                return ScsiResult(Status.GOOD, pages.read_capacity_10(g))
            case c.ReadCapacity16():
                return ScsiResult(Status.GOOD, pages.read_capacity_16(g)[: command.allocation])
            case c.ModeSense():
                data = pages.mode_sense(command, g, read_only=self.disk.read_only)
                return ScsiResult(Status.GOOD, data[: command.allocation])
            case c.GetLbaStatus():
                return self.block.lba_status(command)
            case c.Read():
                return self.block.read(command)
            case c.Verify():
                return self.block.verify(command, data_out)
            case c.Write():
                return self.block.write(command, data_out)
            case c.WriteSame():
                return self.block.write_same(command, data_out)
            case c.Unmap():
                return self.block.unmap(command, data_out)
            case c.SynchronizeCache():
                return self.block.synchronize_cache(command)
            case c.StartStopUnit():
                return self.block.start_stop(command)
            case c.PersistentReserveIn():
                data = self.reservations.read(command.action)
                return ScsiResult(Status.GOOD, data[: command.allocation])
            case c.PersistentReserveOut():
                params = joined(data_out, command.parameter_length)
                outcome = self.reservations.out(
                    nexus, command.action, command.scope, command.type, params
                )
                for other, code in outcome.attentions:
                    self._attend(other, code)
                return ScsiResult(Status.GOOD, aborted=outcome.aborted)
        raise AssertionError(f"no handler for {command!r}")  # pragma: no cover

    # --- commands of the unit -------------------------------------------------------------------

    def _request_sense(self, nexus: Nexus, command: c.RequestSense) -> ScsiResult:
        queue = self._queue(nexus)
        code = queue.pop(0) if queue else self.not_ready or NO_SENSE
        sense = Sense(code)
        data = sense.descriptor() if command.descriptor else sense.fixed()
        return ScsiResult(Status.GOOD, data[: command.allocation])

    # --- unit attentions ------------------------------------------------------------------------

    def _queue(self, nexus: Nexus) -> list[SenseCode]:
        queue = self._attentions.get(nexus)
        if queue is None:
            queue = self._attentions[nexus] = []
            if len(self._attentions) > MAX_NEXUSES:
                self._attentions.popitem(last=False)
        return queue

    def _attend(self, nexus: Nexus, code: SenseCode) -> None:
        queue = self._queue(nexus)
        if code not in queue:
            queue.append(code)
            del queue[:-MAX_ATTENTIONS]


# --- helpers ------------------------------------------------------------------------------------


def _access(command: c.Command) -> Access:
    if isinstance(command, c.Read | c.Verify | c.GetLbaStatus | c.ModeSense):
        return Access.READ
    if isinstance(command, c.Write | c.WriteSame | c.Unmap | c.SynchronizeCache):
        return Access.WRITE
    if isinstance(command, c.StartStopUnit):
        return Access.ANY if command.start and not command.power_condition else Access.WRITE
    return Access.ANY
