"""Byte sizes as operators write them ("10GiB", "64 KiB") and as we print them back."""

from __future__ import annotations

import re
from fractions import Fraction

from blockmirror.errors import SizeError

__all__ = ["format_rate", "format_size", "parse_duration", "parse_rate", "parse_size"]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

# Only binary multiples: a storage tool that silently read "GB" as 10**9 or 2**30 would be wrong
# for half its users, so decimal units are refused with a hint instead of guessed.
_MULTIPLIERS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "m": MiB,
    "mib": MiB,
    "g": GiB,
    "gib": GiB,
    "t": TiB,
    "tib": TiB,
}
_DECIMAL_LOOKALIKES = {"kb": "KiB", "mb": "MiB", "gb": "GiB", "tb": "TiB"}
_UNITS_HELP = "B, KiB, MiB, GiB or TiB"
_SIZE_RE = re.compile(r"([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)", re.ASCII)

# Largest first, so format_size prefers the biggest unit that still reads exactly.
_FORMAT_UNITS: tuple[tuple[int, str], ...] = (
    (TiB, "TiB"),
    (GiB, "GiB"),
    (MiB, "MiB"),
    (KiB, "KiB"),
)


def parse_size(value: str | int, *, key: str = "size") -> int:
    """Return the number of bytes ``value`` denotes.

    ``value`` is a non-negative int or a string such as ``"512"``, ``"4096B"``, ``"64 KiB"``,
    ``"1.5GiB"``; ``K``/``M``/``G``/``T`` are binary aliases. ``key`` names the setting in
    error messages. Raises :class:`SizeError` for anything else.
    """
    # bool is an int subclass; True bytes is never what an operator meant.
    if isinstance(value, bool):
        raise SizeError(f"invalid {key} {value!r}: expected a number of bytes, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise SizeError(f"invalid {key} {value}: must not be negative")
        return value
    if not isinstance(value, str):
        raise SizeError(
            f"invalid {key} {value!r}: expected a whole number of bytes or a string like"
            f" '10GiB', not {type(value).__name__}"
        )
    text = value.strip()
    if not text:
        raise SizeError(f"invalid {key} {value!r}: empty")
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise SizeError(
            f"invalid {key} {value!r}: expected a number and an optional unit"
            f" ({_UNITS_HELP}), like '10GiB'"
        )
    sign, number, unit = match.groups()
    multiplier = _MULTIPLIERS.get(unit.lower())
    if multiplier is None:
        hint = _DECIMAL_LOOKALIKES.get(unit.lower())
        advice = f"; did you mean {hint}? (units are binary)" if hint else f"; use {_UNITS_HELP}"
        raise SizeError(f"invalid {key} {value!r}: unknown unit {unit!r}{advice}")
    # Fraction keeps "1.5GiB" exact where float arithmetic could round a huge size.
    amount = Fraction(number) * multiplier
    if sign == "-" and amount != 0:
        raise SizeError(f"invalid {key} {value!r}: must not be negative")
    if amount.denominator != 1:
        raise SizeError(
            f"invalid {key} {value!r}: is {float(amount):g} bytes, not a whole number of bytes"
        )
    return int(amount)


def format_size(n: int) -> str:
    """Return a short form of ``n`` bytes, such as ``"10 GiB"``, ``"1.5 MiB"`` or ``"512 B"``.

    The result is always exact, so ``parse_size(format_size(n)) == n``: the largest unit that
    shows ``n`` with at most two decimals is used, falling back to plain bytes. An approximate
    "4 GiB" for a file one byte short of it would make "does not fit" messages look absurd.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"format_size expects an int, not {type(n).__name__}")
    if n < 0:
        return "-" + format_size(-n)
    for multiplier, name in _FORMAT_UNITS:
        if n < multiplier:
            continue
        hundredths, remainder = divmod(n * 100, multiplier)
        if remainder == 0:
            whole, frac = divmod(hundredths, 100)
            digits = f"{whole}.{frac:02d}".rstrip("0").rstrip(".") if frac else str(whole)
            return f"{digits} {name}"
    return f"{n} B"


def human_size(n: int) -> str:
    """An approximate, readable size for tables and progress lines ("733.2 MiB")."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# Durations: "90s", "30m", "24h", "7d", "2w", "1h30m", or a plain number of seconds.
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?)\s*([smhdw])", re.ASCII)


def parse_duration(value: str | int | float, *, key: str = "duration") -> float:
    """Seconds that ``value`` denotes: a non-negative number of seconds, or a string of
    number-and-unit parts (s, m, h, d, w) such as ``"24h"`` or ``"1h30m"``; ``"0"`` is zero.
    Raises :class:`SizeError` (the units' error) for anything else."""
    if isinstance(value, bool):
        raise SizeError(f"invalid {key} {value!r}: expected a duration like '24h'")
    if isinstance(value, int | float):
        if not value >= 0 or value == float("inf"):
            raise SizeError(f"invalid {key} {value!r}: must be a non-negative number of seconds")
        return float(value)
    if not isinstance(value, str):
        raise SizeError(f"invalid {key} {value!r}: expected a duration like '24h'")
    text = value.strip().lower()
    if re.fullmatch(r"[0-9]+(?:\.[0-9]*)?", text):
        return float(text)
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
        while pos < len(text) and text[pos] == " ":
            pos += 1
    if not text or pos != len(text):
        raise SizeError(
            f"invalid {key} {value!r}: expected a number and a unit (s, m, h, d, w), like "
            "'24h', '30m' or '1h30m'"
        )
    return total


# Rates: link bandwidths in bits per second, decimal prefixes as networks count them
# ("1544kbit" is a T1, "10Mbit" ten million bits a second).
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_RATE_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]+)(?:/s)?", re.ASCII)


def parse_rate(value: str | int, *, key: str = "bandwidth") -> int:
    """Bits per second that ``value`` denotes: a positive whole number of bits per second, or a
    string such as ``"1544kbit"``, ``"10Mbit"``, ``"1Gbit"`` (also ``"10Mbit/s"``, ``"10Mbps"``).
    Raises :class:`SizeError` for anything else, including zero (say ``"none"`` for no limit)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SizeError(f"invalid {key} {value!r}: expected a rate like '10Mbit'")
    if isinstance(value, int):
        bits = Fraction(value)
    else:
        match = _RATE_RE.fullmatch(value.strip())
        name = match.group(2).lower() if match else ""
        if name.endswith("bps"):  # "10Mbps" is "10Mbit/s"
            name = name[:-3] + "bit"
        unit = _RATE_UNITS.get(name)
        if match is None or unit is None:
            raise SizeError(
                f"invalid {key} {value!r}: expected a number and bit, kbit, Mbit or Gbit (per "
                "second), like '1544kbit' or '10Mbit'"
            )
        bits = Fraction(match.group(1)) * unit
    if bits < 1 or bits.denominator != 1:
        raise SizeError(f"invalid {key} {value!r}: must be a whole number of bits per second > 0")
    return int(bits)


def format_rate(bits_per_second: int) -> str:
    """``"10 Mbit/s"``, ``"1.544 Mbit/s"``, ``"800 bit/s"``."""
    for unit, name in ((10**9, "Gbit"), (10**6, "Mbit"), (10**3, "kbit")):
        if bits_per_second >= unit:
            return f"{bits_per_second / unit:g} {name}/s"
    return f"{bits_per_second} bit/s"
