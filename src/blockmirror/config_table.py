"""Typed reading of one TOML table of the configuration, collecting problems as it goes.

Every accessor returns the value, or records ``(key, message)`` and returns None, so a whole
file is checked in one pass and ``check-config`` can print every problem at once.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path

from blockmirror.addresses import Address, address_or_reason
from blockmirror.errors import SizeError
from blockmirror.units import parse_duration, parse_rate, parse_size

Problem = tuple[str, str]


def type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    names |= {dict: "a table", list: "an array"}
    return names.get(type(value), f"a {type(value).__name__}")


class Table:
    """Typed access to one TOML table; each accessor records a problem and returns None."""

    def __init__(
        self,
        data: Mapping[str, object],
        where: str,
        allowed: Sequence[str],
        problems: list[Problem],
        base_dir: Path,
    ) -> None:
        self.data = data
        self.where = where
        self.problems = problems
        self.base_dir = base_dir
        self.bad: set[str] = set()
        for name in data:
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(
                    (self.key(name), f"unknown key{hint}; allowed keys: {', '.join(allowed)}")
                )

    def key(self, name: str) -> str:
        return f"{self.where}.{name}"

    def fail(self, name: str, message: str) -> None:
        self.problems.append((self.key(name), message))
        self.bad.add(name)

    def typed(self, name: str, kinds: tuple[type, ...], wanted: str, required: bool) -> object:
        if name not in self.data:
            if required:
                self.fail(name, "missing required key")
            return None
        value = self.data[name]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            self.fail(name, f"expected {wanted}, got {type_name(value)} ({value!r})")
            return None
        return value

    def text(self, name: str, *, required: bool = False) -> str | None:
        value = self.typed(name, (str,), "a string", required)
        return value if isinstance(value, str) else None

    def flag(self, name: str) -> bool | None:
        value = self.typed(name, (bool,), "true or false", False)
        return value if isinstance(value, bool) else None

    def number(self, name: str) -> float | None:
        value = self.typed(name, (int, float), "a number", False)
        return float(value) if isinstance(value, (int, float)) else None

    def choice(self, name: str, choices: Sequence[str], *, required: bool = False) -> str | None:
        value = self.text(name, required=required)
        if value is not None and value not in choices:
            self.fail(name, f"{value!r} is not one of {', '.join(map(repr, choices))}")
            return None
        return value

    def size(self, name: str, *, required: bool = False) -> int | None:
        value = self.typed(name, (int, str), "a size such as 10GiB", required)
        if not isinstance(value, (int, str)):
            return None
        try:
            return parse_size(value, key=name)
        except SizeError as exc:
            self.fail(name, str(exc))
            return None

    def rate(self, name: str) -> tuple[bool, int | None]:
        """(present, bits per second): a rate such as ``"10Mbit"``, or ``"none"`` (no limit,
        which a per-peer value uses to undo a default)."""
        value = self.typed(name, (int, str), "a rate such as 10Mbit, or 'none'", False)
        if value is None:
            return False, None
        if isinstance(value, str) and value.strip().lower() == "none":
            return True, None
        if not isinstance(value, (int, str)):
            return True, None
        try:
            return True, parse_rate(value, key=name)
        except SizeError as exc:
            self.fail(name, str(exc))
            return True, None

    def duration(self, name: str) -> float | None:
        value = self.typed(name, (int, float, str), "a duration such as 24h", False)
        if not isinstance(value, (int, float, str)):
            return None
        try:
            return parse_duration(value, key=name)
        except SizeError as exc:
            self.fail(name, str(exc))
            return None

    def address(self, name: str, *, allow_zero: bool) -> Address | None:
        value = self.text(name)
        return None if value is None else self.address_value(name, value, allow_zero=allow_zero)

    def address_value(self, name: str, value: str, *, allow_zero: bool) -> Address | None:
        result = address_or_reason(value.strip(), allow_zero)
        if isinstance(result, str):
            self.fail(name, result)
            return None
        return result

    def path(self, name: str, *, required: bool = False) -> Path | None:
        value = self.text(name, required=required)
        if value is None:
            return None
        if not value or "\0" in value:
            self.fail(name, "must be a non-empty path")
            return None
        # Relative to the config file, so a unit's directory can be moved as a whole.
        return self.base_dir.absolute() / value
