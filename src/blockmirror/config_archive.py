"""The ``[[archive]]`` tables (docs/archive.md, docs/configuration.md "Archives"): where a unit
streams its volumes' history on S3-compatible object storage, and how often.

Credentials are never in the configuration: ``credentials_file`` names a file in the AWS shared
credentials format, or the standard ``AWS_*`` environment variables of the unit's process are
used. Parsed here into :class:`ArchiveConfig`; the cross-checks against the volumes (a name in
``volumes`` that no volume has, two archives uploading one volume to one place, a ``seed_from``
naming no archive) are done by :func:`check_archive_names`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from blockmirror.config_table import Problem, Table, type_name
from blockmirror.link.compression import LEVELS, Codec
from blockmirror.units import MiB

__all__ = ["ARCHIVE_KEYS", "ArchiveConfig", "check_archive_names", "parse_archives"]

ARCHIVE_KEYS: Final = (
    "name", "url", "endpoint", "region", "credentials_file", "volumes", "history",
    "base_interval", "segment_interval", "segment_size", "bandwidth", "compression",
    "compression_level", "upload",
)  # fmt: skip
# A segment is one object put in one request (multipart above the store's threshold): below
# 1 MiB the per-object cost dominates, above 1 GiB a failed upload costs too much to redo.
MIN_SEGMENT: Final = MiB
MAX_SEGMENT: Final = 1024 * MiB
_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
_URL_RE: Final = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/[^\x00-\x1f]*)?")


@dataclass(frozen=True)
class ArchiveConfig:
    """One ``[[archive]]``: an S3 bucket and prefix this unit archives volumes into."""

    name: str
    url: str
    endpoint: str | None = None
    region: str = "us-east-1"
    credentials_file: Path | None = None
    # Empty: every volume of the unit.
    volumes: tuple[str, ...] = ()
    history: float = 30 * 86400.0
    base_interval: float = 86400.0
    segment_interval: float = 10.0
    segment_size: int = 64 * MiB
    bandwidth: int | None = None
    compression: Codec = Codec.ZSTD
    compression_level: int = 3
    # False: this unit only reads the archive (to seed a replica, say) and uploads nothing.
    upload: bool = True

    @property
    def bucket(self) -> str:
        return self.url[len("s3://") :].split("/", 1)[0]

    @property
    def prefix(self) -> str:
        rest = self.url[len("s3://") :].split("/", 1)
        return rest[1].strip("/") if len(rest) > 1 else ""

    def covers(self, volume: str) -> bool:
        return not self.volumes or volume in self.volumes


def parse_archives(value: object, problems: list[Problem], base_dir: Path) -> list[ArchiveConfig]:
    """The ``[[archive]]`` tables of a configuration (problems recorded, bad ones left out)."""
    if value is None:
        return []
    if not isinstance(value, list):
        problems.append(("archive", f"expected [[archive]] tables, got {type_name(value)}"))
        return []
    archives: list[ArchiveConfig] = []
    seen: set[str] = set()
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            problems.append((f"archive[{index}]", f"expected a table, got {type_name(item)}"))
            continue
        archive = _parse_one(item, index, problems, base_dir)
        if archive is None:
            continue
        if archive.name in seen:
            problems.append((f"archive[{archive.name}].name", "a second archive of this name"))
            continue
        seen.add(archive.name)
        archives.append(archive)
    return archives


def _parse_one(
    data: dict[str, object], index: int, problems: list[Problem], base_dir: Path
) -> ArchiveConfig | None:
    raw_name = data.get("name")
    label = (
        f"archive[{raw_name}]"
        if isinstance(raw_name, str) and _NAME_RE.fullmatch(raw_name)
        else f"archive[{index}]"
    )
    before = len(problems)
    t = Table(data, label, ARCHIVE_KEYS, problems, base_dir)
    name = t.text("name", required=True)
    if name is not None and not _NAME_RE.fullmatch(name):
        t.fail("name", f"{name!r}: use 1 to 64 of A-Z a-z 0-9 . _ -")
    url = t.text("url", required=True)
    if url is not None and not _URL_RE.fullmatch(url):
        t.fail(
            "url",
            f"{url!r} is not s3://BUCKET/PREFIX (a bucket of 3 to 63 of a-z 0-9 . -)",
        )
    elif url is not None and (why := _prefix_problem(url)) is not None:
        t.fail("url", f"{url!r}: the prefix has {why}")
    endpoint = t.text("endpoint")
    if endpoint is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", endpoint):
        t.fail("endpoint", f"{endpoint!r} is not an http:// or https:// URL")
    region = t.text("region")
    credentials = t.path("credentials_file")
    volumes = _names(t, "volumes")
    history = _positive(t, "history")
    base_interval = _positive(t, "base_interval")
    segment_interval = _positive(t, "segment_interval")
    segment_size = t.size("segment_size")
    if segment_size is not None and not MIN_SEGMENT <= segment_size <= MAX_SEGMENT:
        t.fail("segment_size", "must be between 1MiB and 1GiB")
    present, bandwidth = t.rate("bandwidth")
    codec = t.choice("compression", [c.value for c in Codec])
    level = t.typed("compression_level", (int,), "an integer", False)
    if isinstance(level, int) and level not in LEVELS:
        t.fail("compression_level", f"{level} is outside zstd's levels 1..{LEVELS.stop - 1}")
    upload = t.flag("upload")
    if len(problems) > before or name is None or url is None:
        return None
    defaults = ArchiveConfig(name=name, url=url)
    return ArchiveConfig(
        name=name,
        url=url,
        endpoint=endpoint,
        region=region or defaults.region,
        credentials_file=credentials,
        volumes=volumes,
        history=defaults.history if history is None else history,
        base_interval=defaults.base_interval if base_interval is None else base_interval,
        segment_interval=(
            defaults.segment_interval if segment_interval is None else segment_interval
        ),
        segment_size=defaults.segment_size if segment_size is None else segment_size,
        bandwidth=bandwidth if present else None,
        compression=Codec(codec) if codec is not None else defaults.compression,
        compression_level=level if isinstance(level, int) else defaults.compression_level,
        upload=True if upload is None else upload,
    )


def _prefix_problem(url: str) -> str | None:
    """What the unit's own URL check (``archive.s3.parse_url``) refuses in a prefix that the
    pattern lets through: check-config must not pass a URL the unit then cannot use."""
    prefix = url[len("s3://") :].partition("/")[2].strip("/")
    if not prefix:
        return None
    if any(part in ("", ".", "..") for part in prefix.split("/")):
        return "an empty, '.' or '..' segment"
    if "\x7f" in prefix:
        return "a control character"
    return None


def _positive(t: Table, key: str) -> float | None:
    value = t.duration(key)
    if value is not None and value <= 0:
        t.fail(key, "must be more than 0")
        return None
    return value


def _names(t: Table, key: str) -> tuple[str, ...]:
    value = t.typed(key, (list,), "an array of volume names", False)
    if not isinstance(value, list):
        return ()
    names: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            t.fail(key, f"[{i}] is {type_name(item)}, expected a volume name")
            return ()
        names.append(item)
    return tuple(names)


def check_archive_names(
    archives: Sequence[ArchiveConfig],
    volume_names: Sequence[str],
    seeds: Sequence[tuple[str, str, str]],
    problems: list[Problem],
) -> None:
    """Every volume an archive names exists; no two uploading archives put one volume in one
    place; every ``seed_from`` (label, volume, archive) names an archive that covers that
    volume."""
    known = set(volume_names)
    for archive in archives:
        for name in archive.volumes:
            if name not in known:
                problems.append(
                    (f"archive[{archive.name}].volumes", f"no volume is called {name!r}")
                )
    # Two archives that upload one volume to one place would both extend one chain (the same
    # unit and journal pass its claim): their segments would overlap.
    places: dict[tuple[str, str, str], list[ArchiveConfig]] = {}
    for archive in archives:
        if not archive.upload:
            continue
        place = ((archive.endpoint or "").rstrip("/"), archive.bucket, archive.prefix)
        earlier = places.setdefault(place, [])
        for other in earlier:
            shared = [v for v in volume_names if other.covers(v) and archive.covers(v)]
            if shared:
                problems.append(
                    (
                        f"archive[{archive.name}].url",
                        f"archive {other.name!r} uploads volume {shared[0]!r} to the same "
                        "place; two archives of one volume there would mix one chain (use "
                        "another prefix, or upload = false)",
                    )
                )
                break
        earlier.append(archive)
    by_name = {a.name: a for a in archives}
    for label, volume, archive_name in seeds:
        found = by_name.get(archive_name)
        if found is None:
            names = ", ".join(sorted(by_name)) or "none"
            problems.append(
                (f"{label}.seed_from", f"no [[archive]] is called {archive_name!r} ({names})")
            )
        elif not found.covers(volume):
            problems.append(
                (f"{label}.seed_from", f"archive {archive_name!r} does not hold this volume")
            )
