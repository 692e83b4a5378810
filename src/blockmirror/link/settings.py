"""The settings one link runs with: rate, compression, priority and transmit windows.

What the configuration reads (:mod:`blockmirror.config_link`) and ``blockmirror link set``
changes; the sender (:mod:`blockmirror.link.sender`) applies them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from blockmirror.link.compression import DEFAULT_LEVEL, Codec
from blockmirror.link.windows import Schedule, TransmitWindow

__all__ = ["ConnectMode", "LinkSettings", "Priority"]


class Priority(enum.StrEnum):
    NORMAL = "normal"
    # Yield to other traffic on the path (docs/operations.md, "Mirroring over a WAN").
    BACKGROUND = "background"


class ConnectMode(enum.StrEnum):
    ALWAYS = "always"  # connected whenever the peer can be reached
    WINDOWS = "windows"  # dial-up style: connected only inside the transmit windows


@dataclass(frozen=True, slots=True)
class LinkSettings:
    bandwidth: int | None = None  # bits per second; None: no limit
    compression: Codec = Codec.NONE
    compression_level: int = DEFAULT_LEVEL
    priority: Priority = Priority.NORMAL
    transmit_windows: tuple[TransmitWindow, ...] = ()
    connect: ConnectMode = ConnectMode.ALWAYS

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.transmit_windows)
