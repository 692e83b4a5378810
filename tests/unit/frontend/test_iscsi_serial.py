"""Serial number arithmetic of CmdSN and StatSN (RFC 1982, 32 bits)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.frontend.iscsi_serial import (
    in_cmd_window,
    max_cmd_sn_for,
    serial_add,
    serial_gt,
    serial_lt,
)

U32 = st.integers(0, 0xFFFFFFFF)


def test_serial_arithmetic_wraps() -> None:
    assert serial_lt(0xFFFFFFFF, 0) and serial_gt(0, 0xFFFFFFFF)
    assert serial_add(0xFFFFFFFF, 2) == 1
    assert not serial_lt(0, 1 << 31) and not serial_gt(0, 1 << 31)  # undefined: neither
    with pytest.raises(ValueError):
        serial_add(0, 1 << 31)
    assert in_cmd_window(0xFFFFFFFE, 0xFFFFFFFE, 3) and in_cmd_window(3, 0xFFFFFFFE, 3)
    assert not in_cmd_window(4, 0xFFFFFFFE, 3) and not in_cmd_window(0xFFFFFFFD, 0xFFFFFFFE, 3)
    closed = max_cmd_sn_for(10, 0)
    assert closed == 9 and not in_cmd_window(10, 10, closed) and not in_cmd_window(9, 10, closed)
    assert max_cmd_sn_for(0xFFFFFFFF, 2) == 0


@given(a=U32, n=st.integers(1, (1 << 31) - 1))
def test_serial_less_than_is_distance_under_half_the_circle(a: int, n: int) -> None:
    b = serial_add(a, n)
    assert serial_lt(a, b) and serial_gt(b, a) and not serial_lt(b, a)
