"""The kernel's view of one TCP connection (``TCP_INFO``): its smoothed round trip.

Measured from a segment's transmission to its acknowledgement, it is the path's round trip with
its queues, without what waits in our own socket buffer (which the probes' echoes count). Shown
as a peer's ``rtt_seconds``. Linux only; elsewhere (or on a socket that is not TCP) there is
nothing to read.
"""

from __future__ import annotations

import socket
import struct
from typing import Final

__all__ = ["tcp_rtt"]

# struct tcp_info (linux/tcp.h), stable since Linux 2.6: eight u8 fields, then u32s; the 16th
# is tcpi_rtt (microseconds).
_RTT_OFFSET: Final = 68
_INFO_SIZE: Final = 104
_U32: Final = struct.Struct("<I")


def tcp_rtt(sock: socket.socket | None) -> float | None:
    """The connection's smoothed round trip in seconds (None: unknown). Never raises."""
    option = getattr(socket, "TCP_INFO", None)
    if sock is None or option is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, _INFO_SIZE)
    except OSError:
        return None
    if len(info) < _RTT_OFFSET + _U32.size:
        return None
    (micros,) = _U32.unpack_from(info, _RTT_OFFSET)
    return micros / 1e6 if micros else None
