"""The exception hierarchy: one root, and one base per layer, so callers catch by layer.

```
BlockmirrorError
├── ConfigError, SizeError                    the configuration and its values
├── VolumeError                               a backing store (store/)
│   ├── OutOfRangeError                       a range outside the volume; nothing done
│   └── ReadOnlyError                         a change asked of a read-only volume
├── JournalError                              the journal and its files (journal/)
│   ├── RecordError, CheckpointError, DirtyMapError, JournalCorruptError, ...
├── WritePathError                            the write path refuses a request (blockdev/)
├── CommandError                              a host's command answered with an error (SCSI sense)
├── ProtocolError                             bytes that break a wire protocol
│   └── IscsiPduError                         an iSCSI PDU refused: a Reject reason, or close
├── LinkError                                 a link cannot be used: refused, bad key (link/)
├── StateTransitionError                      a change of state the table does not allow
├── AdminError                                the admin API and its token (admin/)
├── OfflineError                              an offline command cannot run (offline/)
├── ArchiveError                              the archive on object storage (archive/)
│   └── ArchiveFormatError, NotRestorable     bytes or keys refused; a point it cannot restore
└── NotifyError                               an alert target refused or failed (notify/)
```

I/O failures are not wrapped: they stay :class:`OSError` with the kernel's errno, because the
front ends map ENOSPC, EIO, ... onto their protocols' error codes.
"""

from __future__ import annotations


class BlockmirrorError(Exception):
    """Root of every error blockmirror raises on purpose."""


class ConfigError(BlockmirrorError):
    """The configuration is invalid. ``problems`` lists each one as ``(key, message)``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in problems))


class SizeError(BlockmirrorError, ValueError):
    """A size string such as ``"10GiB"`` could not be parsed."""


class VolumeError(BlockmirrorError):
    """The backing store of a volume could not be opened or used."""


class OutOfRangeError(VolumeError):
    """An access would touch bytes outside the volume's bounds; nothing was done."""


class ReadOnlyError(VolumeError):
    """A write, trim or zeroing was asked of a volume opened read-only; nothing was done."""


class JournalError(BlockmirrorError):
    """The journal cannot be opened or used as configured, or its bytes are not valid."""


class WritePathError(BlockmirrorError):
    """The write path refused an operator's request (a bad range, a journal it cannot empty)."""


class CommandError(BlockmirrorError):
    """A front end answers a host's command with an error its protocol defines (a SCSI status
    and sense data, frontend/scsi_sense.ScsiError); the connection goes on. Raised before the
    command changed anything, or after its change failed below (the sense says which)."""


class ProtocolError(BlockmirrorError):
    """A peer sent bytes that break a wire protocol. The connection must be closed."""


class IscsiPduError(ProtocolError):
    """An iSCSI PDU the target refuses (frontend/iscsi_*).

    ``reject_reason`` is the reason code of the Reject PDU to answer with (RFC 7143 section
    11.17.1); the byte stream is still in step and the connection may go on. None means the
    connection must be closed: a header digest error, or framing that cannot be trusted.
    ``header`` is the refused PDU's 48-byte basic header segment, which a Reject carries back
    (empty when the error is not about one PDU).
    """

    def __init__(self, message: str, *, reject_reason: int | None, header: bytes = b"") -> None:
        super().__init__(message)
        self.reject_reason = reject_reason
        self.header = header

    @property
    def close(self) -> bool:
        return self.reject_reason is None


class LinkError(BlockmirrorError):
    """A link cannot be used: the peer refused it, or a key cannot be loaded."""


class AdminError(BlockmirrorError):
    """The admin API cannot do what was asked, or its credential cannot be used."""


class OfflineError(BlockmirrorError):
    """An offline command (repair, resize, adopt) cannot run; nothing was changed."""


class ArchiveError(BlockmirrorError):
    """The archive on object storage: its formats, the store, restores."""


class NotifyError(BlockmirrorError):
    """An alert could not be delivered to a target (a refusal, a bad reply) or its secret file
    cannot be used. Delivery retries; the unit goes on."""


class RoleError(BlockmirrorError):
    """A role change (promote, demote, resolve) that cannot be made now; the message says why
    and what to do. Nothing changed."""
