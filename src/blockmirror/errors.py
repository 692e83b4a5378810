"""The exception hierarchy: one root so callers can catch everything of ours at once."""

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


class ProtocolError(BlockmirrorError):
    """A peer sent bytes that break a wire protocol. The connection must be closed."""
