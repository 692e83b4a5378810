"""Serial number arithmetic of iSCSI's CmdSN, StatSN, DataSN and R2TSN (RFC 1982, 32 bits).

Sequence numbers wrap at 2**32, so "less than" is a matter of distance: ``a < b`` when ``b`` is
ahead of ``a`` by less than half the circle (RFC 7143 section 4.2.2.1 uses this for the CmdSN
window and StatSN acknowledgements).
"""

from __future__ import annotations

SERIAL_MODULUS = 1 << 32
_HALF = 1 << 31


def serial_add(sn: int, n: int) -> int:
    """``sn + n`` modulo 2**32; RFC 1982 defines addition for 0 <= n <= 2**31 - 1 only."""
    if not 0 <= n < _HALF:
        raise ValueError(f"serial addition of {n}: outside 0..2**31-1")
    return (sn + n) % SERIAL_MODULUS


def serial_lt(a: int, b: int) -> bool:
    """``a < b`` in serial arithmetic. When the distance is exactly 2**31 the comparison is
    undefined in RFC 1982; both directions then answer False."""
    return a != b and (b - a) % SERIAL_MODULUS < _HALF


def serial_le(a: int, b: int) -> bool:
    return a == b or serial_lt(a, b)


def serial_gt(a: int, b: int) -> bool:
    return serial_lt(b, a)


def serial_ge(a: int, b: int) -> bool:
    return a == b or serial_lt(b, a)


def in_cmd_window(cmd_sn: int, exp_cmd_sn: int, max_cmd_sn: int) -> bool:
    """Whether a non-immediate command's CmdSN may be taken: ExpCmdSN <= CmdSN <= MaxCmdSN.

    A closed window (MaxCmdSN = ExpCmdSN - 1) takes nothing. A CmdSN outside the window is
    silently ignored by the target (section 4.2.2.1), not rejected.
    """
    return serial_le(exp_cmd_sn, cmd_sn) and serial_le(cmd_sn, max_cmd_sn)


def max_cmd_sn_for(exp_cmd_sn: int, window: int) -> int:
    """The MaxCmdSN that opens a window of ``window`` commands after ExpCmdSN (0: closed)."""
    if not 0 <= window < _HALF:
        raise ValueError(f"command window {window}: outside 0..2**31-1")
    return (exp_cmd_sn + window - 1) % SERIAL_MODULUS
