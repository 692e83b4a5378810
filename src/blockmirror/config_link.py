"""The settings of one link (docs/configuration.md, "Link settings"): what ``[replication]``
sets for every peer and an inline peer table overrides for its own.

``bandwidth``, ``compression``, ``compression_level``, ``priority``, ``transmit_windows`` and
``connect``. Read here, once, for both places, into the
:class:`~blockmirror.link.settings.LinkSettings` a sender runs with.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from blockmirror.config_table import Table, type_name
from blockmirror.link.compression import LEVELS, Codec
from blockmirror.link.settings import ConnectMode, LinkSettings, Priority
from blockmirror.link.windows import TransmitWindow, WindowError, parse_window

__all__ = ["LINK_KEYS", "parse_link"]


LINK_KEYS: Final = tuple(f.name for f in dataclasses.fields(LinkSettings))


def parse_link(t: Table, base: LinkSettings, *, whole: bool = True) -> LinkSettings:
    """The settings ``t`` gives, over ``base`` for the keys it leaves out. Problems are
    recorded on ``t`` (the key keeps its ``base`` value). ``whole``: these are the settings a
    link runs with (not overrides still to be merged), and are checked together."""
    found: dict[str, object] = {}
    present, bits = t.rate("bandwidth")
    if present and "bandwidth" not in t.bad:
        found["bandwidth"] = bits
    codec = t.choice("compression", [c.value for c in Codec])
    if codec is not None:
        found["compression"] = Codec(codec)
    level = t.typed("compression_level", (int,), "an integer", False)
    if isinstance(level, int) and not isinstance(level, bool):
        if level in LEVELS:
            found["compression_level"] = level
        else:
            t.fail(
                "compression_level",
                f"{level} is outside zstd's levels {LEVELS.start}..{LEVELS.stop - 1}",
            )
    priority = t.choice("priority", [p.value for p in Priority])
    if priority is not None:
        found["priority"] = Priority(priority)
    connect = t.choice("connect", [c.value for c in ConnectMode])
    if connect is not None:
        found["connect"] = ConnectMode(connect)
    windows = _windows(t)
    if windows is not None:
        found["transmit_windows"] = windows
    settings = dataclasses.replace(base, **found)  # type: ignore[arg-type]
    if whole and settings.connect is ConnectMode.WINDOWS and settings.schedule.always:
        t.fail("connect", "'windows' needs transmit_windows that leave some time closed")
    return settings


def _windows(t: Table) -> tuple[TransmitWindow, ...] | None:
    value = t.typed("transmit_windows", (list,), "an array of windows such as '22:00-06:00'", False)
    if not isinstance(value, list):
        return None
    windows: list[TransmitWindow] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            t.fail("transmit_windows", f"[{i}] is {type_name(item)}, expected a string")
            return None
        try:
            windows.append(parse_window(item))
        except WindowError as exc:
            t.fail("transmit_windows", f"[{i}] {exc}")
            return None
    return tuple(windows)
