"""Edit a unit's TOML configuration the way an operator would before a reload: read it, change
the parsed document, write it back."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

Document = dict[str, Any]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(value)


def dump(doc: Document) -> str:
    """TOML text of a document of tables (``unit``, ``replication``, ``alerts``) and the
    ``volume`` array of tables; nested tables are written inline."""
    lines: list[str] = []
    for name, table in doc.items():
        if name == "volume":
            continue
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_value(value)}" for key, value in table.items())
        lines.append("")
    for volume in doc.get("volume", []):
        lines.append("[[volume]]")
        lines.extend(f"{key} = {_value(value)}" for key, value in volume.items())
        lines.append("")
    return "\n".join(lines)


def edit_config(path: Path, change: Callable[[Document], None]) -> Document:
    """Apply ``change`` to the parsed file and write it back; returns the new document."""
    doc = tomllib.loads(path.read_text())
    change(doc)
    path.write_text(dump(doc))
    return doc


def volume_entry(doc: Document, name: str = "vol") -> dict[str, Any]:
    for volume in doc["volume"]:
        if volume["name"] == name:
            entry: dict[str, Any] = volume
            return entry
    raise KeyError(name)
