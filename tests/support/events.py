"""Read a unit's events: ``GET /api/events`` as JSON, or its server-sent event stream."""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import socket
import threading
import time
from typing import Any

from tests.support.unit_process import UnitProcess, admin_request


class EventStream:
    """A live ``text/event-stream`` of a unit, read in a thread into a queue of events."""

    def __init__(self, unit: UnitProcess, *, last_id: int | None = None) -> None:
        host, port = unit.admin.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        headers = {"Accept": "text/event-stream", **unit.admin_headers()}
        if last_id is not None:
            headers["Last-Event-ID"] = str(last_id)
        self.conn.request("GET", "/api/events", headers=headers)
        # The connection hands its socket to a response it will close: keep it, to shut down.
        self.sock = self.conn.sock
        self.response = self.conn.getresponse()
        assert self.response.status == 200, self.response.read()
        assert self.response.getheader("Content-Type", "").startswith("text/event-stream")
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.ids: list[int] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        data: list[str] = []
        event_id: int | None = None
        try:
            for raw in self.response:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    data.append(line[6:])
                elif line.startswith("id: "):
                    event_id = int(line[4:])
                elif not line and data:
                    event = json.loads("\n".join(data))
                    assert event_id == event["id"], (event_id, event)
                    self.ids.append(event["id"])
                    self.events.put(event)
                    data, event_id = [], None
        except (OSError, ValueError, http.client.HTTPException):
            return

    @staticmethod
    def refused(unit: UnitProcess) -> int:
        """The status a stream request gets when it is not a stream (503 when all are taken)."""
        host, port = unit.admin.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request(
                "GET",
                "/api/events",
                headers={"Accept": "text/event-stream", **unit.admin_headers()},
            )
            return conn.getresponse().status
        finally:
            conn.close()

    def next(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.events.get(timeout=timeout)

    def wait_for(
        self, name: str, state: str, *, timeout: float = 30.0
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The first ``name``/``state`` event, and every event read before it."""
        deadline = time.monotonic() + timeout
        before: list[dict[str, Any]] = []
        while True:
            event = self.next(max(0.01, deadline - time.monotonic()))
            if event["event"] == name and event["state"] == state:
                return event, before
            before.append(event)

    def drain(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        # shutdown, not just close: the reading thread's file object keeps the socket open.
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        self._thread.join(5)


def recent_events(unit: UnitProcess, **params: str) -> dict[str, Any]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    code, doc = admin_request(unit, "GET", "/api/events" + (f"?{query}" if query else ""))
    assert code == 200, doc
    return doc
