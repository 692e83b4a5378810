"""The write journal: record codec, ring arithmetic and checkpoints (docs/journal.md).

Everything here is sans-I/O except the two small fd helpers of :mod:`.checkpoint`; the journal
manager that appends, scans and recovers builds on these.
"""

from __future__ import annotations

from blockmirror.journal.checkpoint import (
    Checkpoint,
    CheckpointError,
    ConsumerState,
    choose,
    decode_slot,
    encode_slot,
    read_checkpoint,
    slot_offset,
    write_checkpoint,
)
from blockmirror.journal.format import (
    HEADER_SIZE,
    MAGIC,
    RECORD_ALIGN,
    VERSION,
    Kind,
    RecordError,
    RecordHeader,
    decode_header,
    encode_header,
    padding_bytes,
    record_iov,
    record_size,
    verify_record,
)
from blockmirror.journal.ring import DATA_START, MIN_CAPACITY, Placement, Ring

__all__ = [
    "DATA_START",
    "HEADER_SIZE",
    "MAGIC",
    "MIN_CAPACITY",
    "RECORD_ALIGN",
    "VERSION",
    "Checkpoint",
    "CheckpointError",
    "ConsumerState",
    "Kind",
    "Placement",
    "RecordError",
    "RecordHeader",
    "Ring",
    "choose",
    "decode_header",
    "decode_slot",
    "encode_header",
    "encode_slot",
    "padding_bytes",
    "read_checkpoint",
    "record_iov",
    "record_size",
    "slot_offset",
    "verify_record",
    "write_checkpoint",
]
