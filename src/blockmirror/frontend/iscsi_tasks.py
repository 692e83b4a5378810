"""One SCSI command's data-out on an iSCSI connection: immediate data, unsolicited Data-Out,
then R2Ts until the command has all it takes (RFC 7143 sections 4.2.5 and 11.7-11.8).

Sans-I/O: a :class:`DataOutTask` is told what arrived and says what to send next (an R2T, or
nothing) and when the command is complete. The connection owns the PDUs and the clock.
DataPDUInOrder and DataSequenceInOrder are Yes (what the target negotiates), so data arrives at
the offset the task expects next, or the task is refused: nothing it gathered is applied.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from blockmirror.frontend.iscsi_keys import SessionParams
from blockmirror.frontend.iscsi_pdu import RESERVED_TAG, Buffer, DataOut, ScsiCommand

__all__ = ["DataOutError", "DataOutTask", "R2TRequest"]


class DataOutError(Exception):
    """Data-Out that breaks the task's sequence: the command ends with a CHECK CONDITION."""


@dataclass(frozen=True, slots=True)
class R2TRequest:
    ttt: int
    r2t_sn: int
    offset: int
    length: int


@dataclass
class DataOutTask:
    """``wanted``: the bytes the command takes (at most its Expected Data Transfer Length)."""

    command: ScsiCommand
    wanted: int
    params: SessionParams
    need: int = 0  # what the CDB asks for, whatever the initiator expects to send
    buffers: list[Buffer] = field(default_factory=list)
    received: int = 0
    # Unsolicited data may still come (the command's F bit was clear).
    unsolicited: bool = False
    r2t: R2TRequest | None = None
    r2t_sn: int = 0
    data_sn: int = 0

    @classmethod
    def start(
        cls, command: ScsiCommand, wanted: int, params: SessionParams, *, need: int = 0
    ) -> DataOutTask:
        task = cls(command, wanted, params, need)
        for buf in command.data:
            task._take(memoryview(buf).cast("B"))
        if task.received > params.first_burst_length:
            raise DataOutError("immediate data beyond FirstBurstLength")
        task.unsolicited = not command.final
        return task

    @property
    def complete(self) -> bool:
        return self.received >= self.wanted and not self.unsolicited and self.r2t is None

    def _take(self, view: memoryview) -> None:
        room = self.command.expected_length - self.received
        if view.nbytes > room:
            raise DataOutError("more data than the Expected Data Transfer Length")
        if view.nbytes:
            self.buffers.append(view)
            self.received += view.nbytes

    def data_out(self, pdu: DataOut) -> None:
        """One Data-Out PDU for this task; raises DataOutError when it is out of sequence."""
        solicited = pdu.ttt != RESERVED_TAG
        if solicited:
            if self.r2t is None or pdu.ttt != self.r2t.ttt:
                raise DataOutError(f"Data-Out for unknown Target Transfer Tag {pdu.ttt:#x}")
        elif not self.unsolicited:
            raise DataOutError("unsolicited Data-Out after the unsolicited burst ended")
        if pdu.buffer_offset != self.received:
            raise DataOutError(
                f"Data-Out at offset {pdu.buffer_offset}, expected {self.received} "
                "(DataPDUInOrder=Yes)"
            )
        if pdu.data_sn != self.data_sn:
            raise DataOutError(f"DataSN {pdu.data_sn}, expected {self.data_sn}")
        self.data_sn += 1
        for buf in pdu.data:
            self._take(memoryview(buf).cast("B"))
        if solicited:
            assert self.r2t is not None
            end = self.r2t.offset + self.r2t.length
            if self.received > end:
                raise DataOutError("Data-Out past the R2T's Desired Data Transfer Length")
            if pdu.final:
                if self.received != end:
                    raise DataOutError("the R2T's burst ended short")
                self.r2t = None
                self.data_sn = 0
        else:
            if self.received > self.params.first_burst_length:
                raise DataOutError("unsolicited data beyond FirstBurstLength")
            if pdu.final:
                self.unsolicited = False
                self.data_sn = 0

    def next_r2t(self, ttt: int) -> R2TRequest | None:
        """The R2T to send now (tagged ``ttt``), if the task needs one (one at a time:
        MaxOutstandingR2T is 1)."""
        if self.unsolicited or self.r2t is not None or self.received >= self.wanted:
            return None
        length = min(self.params.max_burst_length, self.wanted - self.received)
        self.r2t = R2TRequest(ttt, self.r2t_sn, self.received, length)
        self.r2t_sn += 1
        return self.r2t

    def segments(self) -> Iterator[Buffer]:
        return iter(self.buffers)
