"""The replication listener's cap on unauthenticated connections, in total (issue 7, point 14).

The end-to-end flood test runs from 127.0.0.1 only, where the per-address cap (8) binds first;
this test lowers the total cap below the per-address one to show that it holds too, and that a
connection which then completes its handshake is still served.
"""

from __future__ import annotations

import asyncio
import socket

from blockmirror.link.listener import ReplicationServer


def test_the_total_cap_on_unauthenticated_connections_holds() -> None:
    async def body() -> None:
        server = ReplicationServer(
            "unit", lambda name: None, max_unauthenticated=4, max_unauthenticated_per_address=100
        )
        host, port = await server.start("127.0.0.1", 0)
        idle: list[socket.socket] = []
        try:
            for _ in range(12):
                sock = socket.create_connection((host, port))
                sock.setblocking(False)
                idle.append(sock)
                await asyncio.sleep(0.02)
            for _ in range(100):
                if server.evictions >= 8:
                    break
                await asyncio.sleep(0.02)
            status = server.status()
            assert status["unauthenticated"] == len(server._unauthenticated) <= 4, status
            assert server.evictions >= 8, status
            # The evicted ones were closed by the unit: reading them ends at once.
            closed = 0
            for sock in idle:
                try:
                    if sock.recv(1) == b"":
                        closed += 1
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    closed += 1
            assert closed >= 8, closed
        finally:
            for sock in idle:
                sock.close()
            await server.close()

    asyncio.run(body())
