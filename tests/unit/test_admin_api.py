"""The admin HTTP server: status JSON, the page, and refusals of bad requests."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from blockmirror.admin.api import AdminServer
from blockmirror.admin.table import format_status_table, human_size

STATUS: dict[str, Any] = {
    "unit": "site-a",
    "version": "0.1.0",
    "uptime_seconds": 3.0,
    "volumes": [
        {
            "name": "db",
            "role": "primary",
            "state": "serving",
            "size": 1 << 30,
            "export": "127.0.0.1:10809",
            "counters": {"reads": 3, "writes": 5, "bytes_written": 5 << 20},
        }
    ],
}


async def request(port: int, raw: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_status_page_and_errors() -> None:
    async def main() -> None:
        server = AdminServer(lambda: STATUS)
        _, port = await server.start("127.0.0.1", 0)
        try:
            code, body = await request(port, b"GET /api/status HTTP/1.1\r\nHost: x\r\n\r\n")
            assert code == 200 and json.loads(body) == STATUS
            code, body = await request(port, b"GET / HTTP/1.1\r\n\r\n")
            assert code == 200 and b"site-a" in body and b"<td>db</td>" in body
            assert (await request(port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
            assert (await request(port, b"POST /api/status HTTP/1.1\r\n\r\n"))[0] == 405
            assert (await request(port, b"garbage\r\n\r\n"))[0] == 400
            # A head that never ends within the limit is refused, not buffered forever.
            assert (await request(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 20000))[0] == 400
            code, body = await request(port, b"GET /api/status HTTP/1.1\r\n\r\n")
            assert code == 200  # still serving after the bad requests
        finally:
            await server.close()

    asyncio.run(main())


def test_table_lists_every_volume() -> None:
    table = format_status_table(STATUS)
    assert "site-a" in table
    row = next(line for line in table.splitlines() if line.startswith("db"))
    assert "primary" in row and "1.0 GiB" in row and "127.0.0.1:10809" in row
    assert human_size(512) == "512 B" and human_size(3 << 20) == "3.0 MiB"
