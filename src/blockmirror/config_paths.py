"""Filesystem checks behind ``check-config``: can this unit really use the paths it names?

Kept apart from the TOML parsing so that ``parse_config(check_paths=False)`` never touches the
disk, and so each check can be tested on its own. Every function returns problem messages
instead of raising: the caller collects all of them for the operator in one pass.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from blockmirror.units import format_size

__all__ = [
    "BLKGETSIZE64",
    "Region",
    "SpaceNeed",
    "block_device_size",
    "check_free_space",
    "check_input_file",
    "check_regions",
    "check_state_dir",
    "check_volume_path",
    "find_overlaps",
]

# _IOR(0x12, 114, size_t) on Linux: the byte size of a block device.
BLKGETSIZE64 = 0x80081272


def block_device_size(path: Path) -> int:
    """Return the size in bytes of the block device at ``path``; raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            raw = fcntl.ioctl(fd, BLKGETSIZE64, bytes(8))
            size: int = struct.unpack("=Q", raw)[0]
            return size
        except OSError:
            # Not every kernel or device type answers the ioctl; seeking to the end does.
            return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _nearest_existing(path: Path) -> Path:
    for candidate in path.parents:
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def _creatable_in(directory: Path) -> str | None:
    """Why a new entry cannot be created in ``directory``, or None if it can."""
    if not directory.exists():
        return f"directory {directory} does not exist"
    if not directory.is_dir():
        return f"{directory} is not a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"directory {directory} is not writable"
    return None


def check_state_dir(path: Path) -> list[str]:
    """Problems with using ``path`` as the unit's state directory (created if missing)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        # The daemon creates missing parents too, so the nearest existing ancestor decides.
        ancestor = _nearest_existing(path)
        why = _creatable_in(ancestor)
        return [] if why is None else [f"{path} does not exist and cannot be created: {why}"]
    except OSError as exc:
        return [f"cannot access {path}: {exc.strerror}"]
    if not stat.S_ISDIR(st.st_mode):
        return [f"{path} exists and is not a directory"]
    if not os.access(path, os.W_OK | os.X_OK):
        return [f"directory {path} is not writable"]
    return []


def _fit_problem(kind: str, path: Path, length: int, offset: int, size: int) -> str | None:
    if offset + size <= length:
        return None
    shown_offset = "0" if offset == 0 else format_size(offset)
    return (
        f"size {format_size(size)} + offset {shown_offset} does not fit {kind} of"
        f" {format_size(length)} ({path}); fix size/offset or grow the {kind}"
    )


def check_volume_path(
    path: Path, *, offset: int | None, size: int | None, read_only: bool
) -> tuple[list[str], list[str]]:
    """Problems with a volume's backing store: ``(path_problems, size_problems)``.

    The two lists are reported under the volume's ``path`` and ``size`` keys respectively,
    because a region that does not fit is usually a wrong size, not a wrong path. With
    ``offset`` or ``size`` unknown (already reported invalid) only the path is checked.
    """
    mode = os.R_OK if read_only else os.R_OK | os.W_OK
    needed = "readable" if read_only else "readable and writable"
    try:
        st = path.stat()
    except FileNotFoundError:
        if read_only:
            return [
                f"{path} does not exist, and read_only = true means it would never be written"
            ], []
        why = _creatable_in(path.parent)
        if why is None:
            return [], []
        return [f"{path} does not exist and cannot be created: {why}"], []
    except OSError as exc:
        return [f"cannot access {path}: {exc.strerror}"], []

    if stat.S_ISDIR(st.st_mode):
        return [f"{path} is a directory; use a file, a block device or a partition"], []
    if stat.S_ISREG(st.st_mode):
        kind, length = "file", st.st_size
    elif stat.S_ISBLK(st.st_mode):
        kind = "block device"
        try:
            length = block_device_size(path)
        except OSError as exc:
            return [f"cannot open block device {path}: {exc.strerror}"], []
    else:
        return [f"{path} is neither a regular file nor a block device"], []

    path_problems = [] if os.access(path, mode) else [f"{path} is not {needed}"]
    if offset is None or size is None:
        return path_problems, []
    fit = _fit_problem(kind, path, length, offset, size)
    return path_problems, [] if fit is None else [fit]


def check_input_file(path: Path, *, must_be_nonempty: bool = False) -> str | None:
    """Why a file the unit only reads (key, certificate) is unusable, or None."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"cannot access {path}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable"
    if must_be_nonempty and st.st_size == 0:
        return f"{path} is empty"
    return None


@dataclass(frozen=True)
class Region:
    """The byte range ``[offset, offset + size)`` of ``path`` that the volume ``label`` claims.

    ``offset`` or ``size`` is None when it was invalid and has been reported already.
    """

    label: str
    path: Path
    offset: int | None
    size: int | None
    read_only: bool = False


def check_regions(regions: Sequence[Region], *, touch_disk: bool) -> list[tuple[str, str]]:
    """``(key, message)`` problems of each volume's store, then of regions that overlap."""
    problems: list[tuple[str, str]] = []
    if touch_disk:
        for r in regions:
            on_path, on_size = check_volume_path(
                r.path, offset=r.offset, size=r.size, read_only=r.read_only
            )
            problems += [(f"{r.label}.path", msg) for msg in on_path]
            problems += [(f"{r.label}.size", msg) for msg in on_size]
    return problems + find_overlaps(regions, touch_disk=touch_disk)


def _identity(path: Path, *, touch_disk: bool) -> object:
    if not touch_disk:
        return os.path.normpath(path)
    try:
        st = path.stat()
    except OSError:
        return os.path.realpath(path)
    # Device and inode catch hard links and device aliases (/dev/disk/by-id/…) alike.
    return (st.st_dev, st.st_ino)


def _bounds(region: Region) -> tuple[int, int] | None:
    if region.offset is None or region.size is None:
        return None
    return region.offset, region.offset + region.size


def find_overlaps(regions: Sequence[Region], *, touch_disk: bool) -> list[tuple[str, str]]:
    """One ``(key, message)`` per region that overlaps an earlier region of the same store."""
    problems: list[tuple[str, str]] = []
    seen: list[tuple[object, tuple[int, int], Region]] = []
    for region in regions:
        bounds = _bounds(region)
        if bounds is None:
            continue
        ident = _identity(region.path, touch_disk=touch_disk)
        start, end = bounds
        for other_ident, (other_start, other_end), other in seen:
            if other_ident == ident and start < other_end and other_start < end:
                problems.append(
                    (
                        f"{region.label}.path",
                        f"region {_span(start, end)} of {region.path} overlaps region"
                        f" {_span(other_start, other_end)} of {other.label}",
                    )
                )
        seen.append((ident, bounds, region))
    return problems


def _span(start: int, end: int) -> str:
    return f"[{'0' if start == 0 else format_size(start)}, {format_size(end)})"


@dataclass(frozen=True)
class SpaceNeed:
    """A file that will take ``size`` bytes of its filesystem: a journal (preallocated at
    start) or a sparse volume (allocated as the host writes). Reported under ``key``."""

    key: str
    path: Path
    size: int
    kind: str  # "journal", "history" (a directory of segments) or "volume"


def _allocated(path: Path) -> int | None:
    """Bytes allocated to the regular file at ``path`` (0 if missing); None if not a file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    except OSError:
        return None
    return st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else None


def _allocated_dir(path: Path) -> int:
    """Bytes allocated to the regular files in the directory ``path`` (0 if missing)."""
    try:
        return sum(p.stat().st_blocks * 512 for p in path.iterdir() if p.is_file())
    except OSError:
        return 0


def check_free_space(needs: Sequence[SpaceNeed]) -> list[tuple[str, str]]:
    """Warnings for files that will not fit in the free space of their filesystem.

    Journals are counted first (they are preallocated at start, so one that does not fit
    stops its volume from being served), then sparse volumes on top of them. Files sharing a
    filesystem share its free space. Nothing is changed on disk.
    """
    claimed: dict[int, int] = {}  # st_dev -> bytes still to be allocated there
    warnings: list[tuple[str, str]] = []
    order = {"journal": 0, "history": 1}
    for need in sorted(needs, key=lambda n: order.get(n.kind, 2)):
        allocated = _allocated_dir(need.path) if need.kind == "history" else _allocated(need.path)
        if allocated is None:
            continue  # a block device or something else check_volume_path reports on
        missing = max(0, need.size - allocated)
        if missing == 0:
            continue
        anchor = need.path if need.path.exists() else _nearest_existing(need.path)
        try:
            dev = anchor.stat().st_dev
            vfs = os.statvfs(anchor)
        except OSError:
            continue
        free = vfs.f_bavail * vfs.f_frsize
        before = claimed.get(dev, 0)
        claimed[dev] = before + missing
        if before + missing <= free:
            continue
        shared = f" (after {format_size(before)} for other files there)" if before else ""
        if need.kind == "history":
            message = (
                f"history_size lets {need.path} grow by {format_size(missing)}, but its"
                f" filesystem has {format_size(free)} free{shared}; once it is full the history"
                " is given up (host writes go on): lower history_size or free space"
            )
        elif need.kind == "journal":
            message = (
                f"the journal {need.path} needs {format_size(missing)} more, but its filesystem"
                f" has {format_size(free)} free{shared}; preallocating it will fail with ENOSPC"
                " and the volume will not be served: free space or lower journal_size"
            )
        else:
            message = (
                f"{need.path} is sparse: {format_size(missing)} of it is not allocated yet, and"
                f" its filesystem has {format_size(free)} free{shared}; host writes may fail"
                " with ENOSPC once it fills"
            )
        warnings.append((need.key, message))
    return warnings
