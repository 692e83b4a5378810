"""Sizes: what operators may write, what they are told when they get it wrong, how we print."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.errors import BlockmirrorError, SizeError
from blockmirror.units import GiB, KiB, MiB, TiB, format_rate, format_size, parse_rate, parse_size

MULTIPLIERS = {
    "": 1,
    "B": 1,
    "K": KiB,
    "KiB": KiB,
    "M": MiB,
    "MiB": MiB,
    "G": GiB,
    "GiB": GiB,
    "T": TiB,
    "TiB": TiB,
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512", 512),
        ("0", 0),
        ("4096B", 4096),
        ("64 KiB", 64 * KiB),
        ("10GiB", 10 * GiB),
        ("1TiB", TiB),
        ("1.5GiB", 3 * GiB // 2),
        ("0.5K", 512),
        (".5KiB", 512),
        ("2.KiB", 2 * KiB),
        ("  8 mib  ", 8 * MiB),
        ("3g", 3 * GiB),
        ("1T", TiB),
        ("+4KiB", 4 * KiB),
        ("-0", 0),
        ("1.25 GIB", 5 * GiB // 4),
    ],
)
def test_parse_size_accepts(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("value", [0, 1, 512, 10 * GiB, 1 << 70])
def test_parse_size_passes_non_negative_ints_through(value: int) -> None:
    assert parse_size(value) == value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (-1, "negative"),
        ("-1", "negative"),
        ("-4KiB", "negative"),
        ("", "empty"),
        ("   ", "empty"),
        ("abc", "expected a number"),
        ("GiB", "expected a number"),
        ("1e3", "expected a number"),
        ("1_000", "expected a number"),
        ("10 GiB extra", "expected a number"),
        ("1..5GiB", "expected a number"),
        ("\u0661\u0662", "expected a number"),  # Arabic-Indic digits are not ASCII digits
        ("10 XiB", "unknown unit 'XiB'"),
        ("10PiB", "unknown unit 'PiB'"),
        ("10GB", "did you mean GiB"),
        ("10 kb", "did you mean KiB"),
        ("1.3B", "not a whole number of bytes"),
        ("0.1KiB", "102.4 bytes"),
        ("1.5", "not a whole number"),
    ],
)
def test_parse_size_rejects_strings_and_ints(value: str | int, fragment: str) -> None:
    with pytest.raises(SizeError) as info:
        parse_size(value)
    assert fragment in str(info.value)


@pytest.mark.parametrize("value", [True, False, 1.5, 1024.0, None, b"1KiB", [512]])
def test_parse_size_rejects_other_types(value: object) -> None:
    with pytest.raises(SizeError) as info:
        parse_size(value)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


def test_parse_size_error_names_key_and_offending_text() -> None:
    with pytest.raises(SizeError) as info:
        parse_size("ten gigs", key="journal_size")
    message = str(info.value)
    assert "journal_size" in message
    assert "'ten gigs'" in message


def test_size_error_is_a_value_error_and_ours() -> None:
    with pytest.raises(ValueError):
        parse_size("x")
    with pytest.raises(BlockmirrorError):
        parse_size("x")


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (3 * MiB // 2, "1.5 MiB"),
        (5 * GiB // 4, "1.25 GiB"),
        (10 * GiB, "10 GiB"),
        (TiB, "1 TiB"),
        (1024 * TiB, "1024 TiB"),
        (1025, "1025 B"),
        (9 * MiB // 8, "1152 KiB"),
        (-2 * KiB, "-2 KiB"),
    ],
)
def test_format_size_examples(n: int, expected: str) -> None:
    assert format_size(n) == expected


@pytest.mark.parametrize("value", [1.5, True, "1"])
def test_format_size_rejects_non_ints(value: object) -> None:
    with pytest.raises(TypeError):
        format_size(value)  # type: ignore[arg-type]


def _any_case(text: str) -> st.SearchStrategy[str]:
    return st.tuples(*(st.sampled_from([c.lower(), c.upper()]) for c in text)).map("".join)


suffixes = st.sampled_from(sorted(MULTIPLIERS)).flatmap(
    lambda s: st.tuples(st.just(MULTIPLIERS[s]), _any_case(s))
)


@given(
    n=st.integers(min_value=0, max_value=1 << 40), suffix=suffixes, space=st.sampled_from(["", " "])
)
def test_parse_of_number_and_suffix_is_n_times_multiplier(
    n: int, suffix: tuple[int, str], space: str
) -> None:
    multiplier, text = suffix
    assert parse_size(f"{n}{space}{text}") == n * multiplier


@given(n=st.integers(min_value=0, max_value=1 << 70))
def test_format_then_parse_round_trips_every_size(n: int) -> None:
    assert parse_size(format_size(n)) == n


@given(
    k=st.integers(min_value=1, max_value=1023),
    unit=st.sampled_from([("KiB", KiB), ("MiB", MiB), ("GiB", GiB), ("TiB", TiB)]),
)
def test_format_of_exact_multiple_is_short(k: int, unit: tuple[str, int]) -> None:
    name, multiplier = unit
    assert format_size(k * multiplier) == f"{k} {name}"


@given(n=st.integers(min_value=0, max_value=1 << 60))
def test_format_size_shape(n: int) -> None:
    assert re.fullmatch(r"[0-9]+(\.[0-9]{1,2})? (B|KiB|MiB|GiB|TiB)", format_size(n))


@given(quarters=st.integers(min_value=4, max_value=4095), unit=st.sampled_from(["MiB", "GiB"]))
def test_quarter_fractions_parse_exactly(quarters: int, unit: str) -> None:
    # Quarters are the fractions whose decimal form ("1.25", "1.5", "1.75") stays at two digits.
    whole, part = divmod(quarters, 4)
    text = f"{whole}.{part * 25:02d}{unit}"
    assert parse_size(text) == quarters * MULTIPLIERS[unit] // 4
    assert (
        format_size(parse_size(text))
        == f"{whole}.{part * 25:02d}".rstrip("0").rstrip(".") + f" {unit}"
    )


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("1544kbit", 1_544_000),
        ("10Mbit", 10_000_000),
        ("1Gbit", 10**9),
        ("1.5 Mbit/s", 1_500_000),
        ("100Mbps", 10**8),
        ("800bit", 800),
        (9600, 9600),
    ],
)
def test_rates(text: str | int, bits: int) -> None:
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["", "fast", "10MB", "0", 0, -5, "1.5bit", "10 Mbit per s", True])
def test_bad_rates(text: object) -> None:
    with pytest.raises(SizeError, match="bandwidth"):
        parse_rate(text)  # type: ignore[arg-type]


def test_format_rate() -> None:
    assert format_rate(1_544_000) == "1.544 Mbit/s" and format_rate(800) == "800 bit/s"
    assert format_rate(10**9) == "1 Gbit/s"
