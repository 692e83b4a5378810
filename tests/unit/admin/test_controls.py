"""Operator controls: routing, validation and refusals, against a fake unit; and the HTTP server."""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import pytest

from blockmirror.admin.access import AdminAccess
from blockmirror.admin.api import MAX_REQUEST_BODY, AdminServer
from blockmirror.admin.controls import ControlError, ControlRequest, handle, parse
from blockmirror.admin.table import format_status_table
from blockmirror.errors import RoleError
from blockmirror.state import VolumeState

PEER = "127.0.0.1:7800"
V6_PEER = "[::1]:7800"


# --- a fake unit ---------------------------------------------------------------------------------


class FakeControls:
    """A write path's operator controls (``controls.OperatorControls``), recording each call."""

    def __init__(self, consumers: tuple[str, ...] = (PEER, V6_PEER)) -> None:
        self.enqueue_paused = False
        self.newest_seq = 10
        self.failed: BaseException | None = None
        self.paused = dict.fromkeys(consumers, False)
        self.calls: list[tuple[Any, ...]] = []
        self.error: BaseException | None = None

    def consumer_names(self) -> list[str]:
        return list(self.paused)

    def consumer_status(self, name: str) -> dict[str, object]:
        return {
            "mode": "journal",
            "paused": self.paused[name],
            "acked_seq": 4,
            "backlog_bytes": 6 * 4160,
            "backlog_records": 6,
            "dirty_bytes": 0,
        }

    async def pause_enqueue(self, paused: bool) -> None:
        self.calls.append(("pause_enqueue", paused))
        if self.error is not None:
            raise self.error
        self.enqueue_paused = paused

    async def pause_consumer(self, name: str, paused: bool) -> None:
        self.calls.append(("pause_consumer", name, paused))
        self.paused[name] = paused

    async def discard(self, name: str, first_seq: int, last_seq: int) -> int:
        self.calls.append(("discard", name, first_seq, last_seq))
        return min(last_seq, 10) - first_seq + 1 if first_seq <= 10 else 0


@dataclass
class FakeWritePath:
    """All the controls reach of a write path: its ``controls``."""

    controls: FakeControls = field(default_factory=FakeControls)


@dataclass
class FakeRoles:
    """The role changes a volume offers; ``refuse`` makes the next one a RoleError."""

    calls: list[tuple[str, object]] = field(default_factory=list)
    refuse: str | None = None

    def _answer(self, action: str, arg: object) -> dict[str, Any]:
        self.calls.append((action, arg))
        if self.refuse is not None:
            raise RoleError(self.refuse)
        return {"role": "primary" if action == "promote" else "secondary"}

    async def promote(self, *, force: bool, delayed: str = "") -> dict[str, Any]:
        return self._answer("promote", force)

    async def demote(self, *, timeout: float) -> dict[str, Any]:
        return self._answer("demote", timeout)

    async def resolve(self, *, discard_local: bool) -> dict[str, Any]:
        return self._answer("resolve", discard_local)


@dataclass
class FakeConfig:
    role: str = "primary"


@dataclass
class FakeVolume:
    journal: FakeWritePath | None
    problem: str | None = None
    state: VolumeState = VolumeState.SERVING
    config: FakeConfig = field(default_factory=FakeConfig)
    roles: FakeRoles | None = None  # None: no live role to change (the actions answer 409)

    @property
    def role(self) -> str:
        return self.config.role


@dataclass
class FakeUnit:
    volumes: dict[str, FakeVolume] = field(default_factory=dict)

    def runtime(self, name: str) -> FakeVolume:
        return self.volumes[name]


def make_unit() -> tuple[FakeUnit, FakeControls]:
    wp = FakeControls()
    unit = FakeUnit(
        {
            "db": FakeVolume(FakeWritePath(wp)),
            "replica": FakeVolume(None, state=VolumeState.REPLICA, config=FakeConfig("secondary")),
            "relay": FakeVolume(
                FakeWritePath(), state=VolumeState.REPLICA, config=FakeConfig("secondary")
            ),
            "broken": FakeVolume(
                None,
                problem="journal /x/broken.journal is corrupt: record seq 3",
                state=VolumeState.FAILED,
            ),
        }
    )
    return unit, wp


def call(unit: FakeUnit, method: str, target: str) -> tuple[int, dict[str, Any]]:
    path, _, query = target.partition("?")
    return asyncio.run(handle(unit, method, path, query))


# --- routing and validation (pure) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/volumes/db/journal/pause", ControlRequest("db", "journal-pause")),
        ("/api/volumes/db/journal/resume", ControlRequest("db", "journal-resume")),
        (
            "/api/volumes/db/consumers/127.0.0.1:7800/pause",
            ControlRequest("db", "consumer-pause", PEER),
        ),
        (
            "/api/volumes/db/consumers/127.0.0.1%3A7800/resume",
            ControlRequest("db", "consumer-resume", PEER),
        ),
        (
            "/api/volumes/db/consumers/127.0.0.1%3a7800/pause",
            ControlRequest("db", "consumer-pause", PEER),
        ),
        (
            "/api/volumes/db/consumers/%5B%3A%3A1%5D%3A7800/pause",
            ControlRequest("db", "consumer-pause", V6_PEER),
        ),
        (
            "/api/volumes/db/consumers/[::1]:7800/pause",
            ControlRequest("db", "consumer-pause", V6_PEER),
        ),
        ("/api/volumes/d%62/journal/pause", ControlRequest("db", "journal-pause")),
    ],
)
def test_routes(path: str, expected: ControlRequest) -> None:
    assert parse("POST", path, "") == expected


def test_discard_parameters() -> None:
    path = "/api/volumes/db/consumers/127.0.0.1%3A7800/discard"
    assert parse("POST", path, "from=3&to=9") == ControlRequest("db", "discard", PEER, 3, 9)
    assert parse("POST", path, "to=3&from=3") == ControlRequest("db", "discard", PEER, 3, 3)
    big = 2**64 - 1
    assert parse("POST", path, f"from=1&to={big}").last_seq == big


@pytest.mark.parametrize(
    "path",
    [
        "/api/volumes/",
        "/api/volumes/db",
        "/api/volumes/db/journal",
        "/api/volumes/db/journal/stop",
        "/api/volumes/db/journal/pause/",
        "/api/volumes//journal/pause",
        "/api/volumes/db/consumers/pause",
        "/api/volumes/db/consumers//pause",
        "/api/volumes/db/consumers/127.0.0.1:7800/flush",
        "/api/volumes/db/consumers/a/b/pause",
        "/api/volumes/db/journal/pause/extra",
    ],
)
def test_unknown_routes_are_404(path: str) -> None:
    with pytest.raises(ControlError) as err:
        parse("POST", path, "")
    assert err.value.status == HTTPStatus.NOT_FOUND


def test_a_slash_inside_a_name_cannot_make_a_route() -> None:
    # %2F decodes to "/" only after the split: one segment, a consumer named "a/b".
    req = parse("POST", "/api/volumes/db/consumers/a%2Fb/pause", "")
    assert req.consumer == "a/b"
    with pytest.raises(ControlError) as err:
        parse("POST", "/api/volumes/db%2Fjournal/pause", "")
    assert err.value.status == HTTPStatus.NOT_FOUND


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD"])
def test_controls_take_post_only(method: str) -> None:
    with pytest.raises(ControlError) as err:
        parse(method, "/api/volumes/db/journal/pause", "")
    assert err.value.status == HTTPStatus.METHOD_NOT_ALLOWED


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("", "'from' is required"),
        ("from=1", "'to' is required"),
        ("to=1", "'from' is required"),
        ("from=&to=2", "must be a sequence number"),
        ("from=0&to=2", "must be a sequence number"),
        ("from=-1&to=2", "must be a sequence number"),
        ("from=+1&to=2", "must be a sequence number"),
        ("from=1.5&to=2", "must be a sequence number"),
        ("from=0x10&to=20", "must be a sequence number"),
        ("from=1&to=%D9%A1", "must be a sequence number"),  # an Arabic-Indic digit one
        ("from=1&to=18446744073709551616", "must be a sequence number"),
        ("from=1&to=123456789012345678901", "must be a sequence number"),
        ("from=5&to=4", "empty range"),
        ("from=1&to=2&from=1", "given twice"),
        ("from=1&to=2&limit=3", "unknown parameter 'limit'"),
        ("from=1&to=%FF", "malformed"),
    ],
)
def test_bad_discard_parameters_are_400(query: str, needle: str) -> None:
    with pytest.raises(ControlError) as err:
        parse("POST", "/api/volumes/db/consumers/127.0.0.1:7800/discard", query)
    assert err.value.status == HTTPStatus.BAD_REQUEST
    assert needle in err.value.message


def test_pause_takes_no_parameters() -> None:
    with pytest.raises(ControlError) as err:
        parse("POST", "/api/volumes/db/journal/pause", "force=1")
    assert err.value.status == HTTPStatus.BAD_REQUEST
    assert "unknown parameter 'force'" in err.value.message


def test_bad_percent_encoding_in_the_path_is_400() -> None:
    with pytest.raises(ControlError) as err:
        parse("POST", "/api/volumes/db/consumers/%FF%FE/pause", "")
    assert err.value.status == HTTPStatus.BAD_REQUEST


# --- execution against the fake unit ------------------------------------------------------------


def test_journal_pause_and_resume() -> None:
    unit, wp = make_unit()
    code, body = call(unit, "POST", "/api/volumes/db/journal/pause")
    assert code == 200
    assert body == {"volume": "db", "enqueue_paused": True, "changed": True, "newest_seq": 10}
    code, body = call(unit, "POST", "/api/volumes/db/journal/pause")
    assert code == 200 and body["changed"] is False
    code, body = call(unit, "POST", "/api/volumes/db/journal/resume")
    assert code == 200 and body["enqueue_paused"] is False and body["changed"] is True
    assert wp.calls == [("pause_enqueue", True), ("pause_enqueue", True), ("pause_enqueue", False)]


def test_consumer_pause_resume_with_either_spelling_of_the_name() -> None:
    unit, wp = make_unit()
    code, body = call(unit, "POST", "/api/volumes/db/consumers/127.0.0.1%3A7800/pause")
    assert code == 200
    assert body["consumer"] == PEER and body["paused"] is True and body["changed"] is True
    assert body["mode"] == "journal" and body["backlog_records"] == 6
    code, body = call(unit, "POST", "/api/volumes/db/consumers/127.0.0.1:7800/resume")
    assert code == 200 and body["paused"] is False
    code, body = call(unit, "POST", "/api/volumes/db/consumers/%5B%3A%3A1%5D%3A7800/pause")
    assert code == 200 and body["consumer"] == V6_PEER
    assert wp.calls == [
        ("pause_consumer", PEER, True),
        ("pause_consumer", PEER, False),
        ("pause_consumer", V6_PEER, True),
    ]


def test_discard_answers_the_count() -> None:
    unit, wp = make_unit()
    code, body = call(
        unit, "POST", "/api/volumes/db/consumers/127.0.0.1%3A7800/discard?from=5&to=7"
    )
    assert code == 200
    assert body["discarded"] == 3 and body["from"] == 5 and body["to"] == 7
    assert body["consumer"] == PEER and "dirty_bytes" in body and "acked_seq" in body
    assert wp.calls == [("discard", PEER, 5, 7)]


def test_refusals_change_nothing() -> None:
    unit, wp = make_unit()
    cases = [
        ("/api/volumes/nope/journal/pause", "", 404, "no volume named 'nope'"),
        ("/api/volumes/db/consumers/10.0.0.1:1/pause", "", 404, "no consumer '10.0.0.1:1'"),
        ("/api/volumes/db/consumers/10.0.0.1:1/discard", "from=1&to=2", 404, "no consumer"),
        ("/api/volumes/replica/journal/pause", "", 409, "has no journal"),
        ("/api/volumes/broken/journal/pause", "", 409, "is corrupt"),
        ("/api/volumes/db/consumers/127.0.0.1:7800/discard", "from=3&to=2", 400, "empty range"),
        ("/api/volumes/db/journal/nope", "", 404, "no such control"),
    ]
    for path, query, status, needle in cases:
        code, body = asyncio.run(handle(unit, "POST", path, query))
        assert (code, set(body)) == (status, {"error"}), (path, body)
        assert needle in body["error"], (path, body)
    code, body = asyncio.run(handle(unit, "GET", "/api/volumes/db/journal/pause", ""))
    assert code == 405 and "takes POST" in body["error"]
    assert wp.calls == []


def test_a_secondary_journal_is_not_paused_but_its_consumers_are() -> None:
    unit, _ = make_unit()
    relay_wp = unit.volumes["relay"].journal
    assert relay_wp is not None
    relay = relay_wp.controls
    code, body = call(unit, "POST", "/api/volumes/relay/journal/pause")
    assert code == 409 and "is a secondary" in body["error"]
    assert relay.calls == []
    code, body = call(unit, "POST", "/api/volumes/relay/journal/resume")
    assert code == 200 and body["enqueue_paused"] is False
    code, body = call(unit, "POST", "/api/volumes/relay/consumers/127.0.0.1:7800/pause")
    assert code == 200 and body["paused"] is True


def test_failed_or_stopping_volume_is_refused() -> None:
    unit, wp = make_unit()
    wp.failed = OSError(5, "Input/output error")
    code, body = call(unit, "POST", "/api/volumes/db/journal/pause")
    assert code == 409 and "write path has failed" in body["error"]
    wp.failed = None
    unit.volumes["db"].state = VolumeState.STOPPED
    code, body = call(unit, "POST", "/api/volumes/db/journal/pause")
    assert code == 503
    assert wp.calls == []


def test_a_failing_control_is_a_500_not_a_crash() -> None:
    unit, wp = make_unit()
    wp.error = OSError(28, "No space left on device")
    code, body = call(unit, "POST", "/api/volumes/db/journal/pause")
    assert code == 500 and "No space left" in body["error"]


# --- through the HTTP server ---------------------------------------------------------------------


TOKEN = "unit-test-admin-token-0123456789"


def access() -> AdminAccess:
    return AdminAccess(TOKEN)


def with_credentials(raw: bytes) -> bytes:
    """``raw`` with a Host (unless it has one) and the admin token, after the request line."""
    line, sep, rest = raw.partition(b"\r\n")
    extra = b"" if b"\r\nHost:" in raw else b"Host: 127.0.0.1\r\n"
    extra += f"Authorization: Bearer {TOKEN}\r\n".encode()
    return line + sep + extra + rest if sep else raw


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    raw = with_credentials(raw)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    writer.write_eof()  # a request cut short is then refused at once, not after the timeout
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


def test_http_server_routes_controls_and_reads_bodies() -> None:
    unit, wp = make_unit()
    status = {"unit": "u", "version": "0", "volumes": []}

    async def main() -> None:
        server = AdminServer(lambda: status, functools.partial(handle, unit), access=access())
        _, port = await server.start("127.0.0.1", 0)
        try:
            code, headers, body = await request(
                port,
                b"POST /api/volumes/db/journal/pause HTTP/1.1\r\nHost: localhost\r\n"
                b'Content-Type: application/json\r\nContent-Length: 11\r\n\r\n{"x": true}',
            )
            assert code == 200 and headers["content-type"] == "application/json"
            assert json.loads(body)["enqueue_paused"] is True
            # Parameters come from the query string, never from the body.
            code, _, body = await request(
                port,
                b"POST /api/volumes/db/consumers/127.0.0.1%3A7800/discard?from=1&to=2 HTTP/1.1"
                b"\r\nContent-Length: 9\r\n\r\nfrom=9999",
            )
            assert code == 200 and json.loads(body)["discarded"] == 2
            code, headers, body = await request(
                port, b"GET /api/volumes/db/journal/pause HTTP/1.1\r\n\r\n"
            )
            assert code == 405 and headers["allow"] == "POST" and "error" in json.loads(body)
            code, headers, _ = await request(port, b"POST /api/status HTTP/1.1\r\n\r\n")
            assert code == 405 and headers["allow"] == "GET"
            too_big = MAX_REQUEST_BODY + 1
            code, _, body = await request(
                port,
                b"POST /api/volumes/db/journal/resume HTTP/1.1\r\n"
                + f"Content-Length: {too_big}\r\n\r\n".encode(),
            )
            assert code == 413 and "limit" in json.loads(body)["error"]
            code, _, _ = await request(
                port,
                b"POST /api/volumes/db/journal/resume HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            )
            assert code == 400
            code, _, _ = await request(
                port,
                b"POST /api/volumes/db/journal/resume HTTP/1.1\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            )
            assert code == 411
            # A body shorter than announced: the request is incomplete and refused.
            code, _, _ = await request(
                port,
                b"POST /api/volumes/db/journal/resume HTTP/1.1\r\nContent-Length: 10\r\n\r\nab",
            )
            assert code == 400
            code, _, body = await request(
                port, b"POST /api/volumes/nope/journal/pause HTTP/1.1\r\n\r\n"
            )
            assert code == 404 and json.loads(body) == {"error": "no volume named 'nope'"}
            code, _, body = await request(port, b"GET /api/nothing HTTP/1.1\r\n\r\n")
            assert code == 404 and "error" in json.loads(body)
            code, _, body = await request(port, b"GET /api/status HTTP/1.1\r\n\r\n")
            assert code == 200 and json.loads(body) == status
        finally:
            await server.close()
        assert wp.calls == [("pause_enqueue", True), ("discard", PEER, 1, 2)]

    asyncio.run(main())


def test_http_server_without_controls() -> None:
    async def main() -> None:
        server = AdminServer(lambda: {"volumes": []}, access=access())
        _, port = await server.start("127.0.0.1", 0)
        try:
            code, _, body = await request(
                port, b"POST /api/volumes/db/journal/pause HTTP/1.1\r\n\r\n"
            )
            assert code == 404 and "error" in json.loads(body)
        finally:
            await server.close()

    asyncio.run(main())


def test_a_crashing_control_handler_is_a_500() -> None:
    async def broken(method: str, path: str, query: str) -> tuple[int, dict[str, Any]]:
        raise RuntimeError("boom")

    async def main() -> None:
        server = AdminServer(lambda: {"volumes": []}, broken, access=access())
        _, port = await server.start("127.0.0.1", 0)
        try:
            code, _, body = await request(
                port, b"POST /api/volumes/db/journal/pause HTTP/1.1\r\n\r\n"
            )
            assert code == 500 and "boom" in json.loads(body)["error"]
            code, _, _ = await request(port, b"GET /api/status HTTP/1.1\r\n\r\n")
            assert code == 200
        finally:
            await server.close()

    asyncio.run(main())


# --- the status table ---------------------------------------------------------------------------


def test_status_table_shows_journals_consumers_and_problems() -> None:
    status: dict[str, Any] = {
        "unit": "site-a",
        "version": "0.1.0",
        "volumes": [
            {
                "name": "db",
                "role": "primary",
                "state": "serving",
                "size": 1 << 30,
                "counters": {},
                "problem": None,
                "split_brain": [{"peer": "site-b", "common_seq": 2048}],
                "journal": {
                    "capacity": 1 << 20,
                    "used": 1 << 18,
                    "records": 12,
                    "oldest_age_seconds": 3.25,
                    "newest_seq": 40,
                    "enqueue_paused": True,
                    "consumers": {
                        PEER: {
                            "mode": "journal",
                            "paused": True,
                            "backlog_bytes": 49920,
                            "backlog_records": 12,
                            "dirty_bytes": 0,
                        },
                        "10.0.0.2:7800": {
                            "mode": "tracking",
                            "paused": False,
                            "backlog_bytes": 0,
                            "backlog_records": 0,
                            "dirty_bytes": 1 << 30,
                        },
                    },
                },
            },
            {
                "name": "logs",
                "role": "primary",
                "state": "failed",
                "size": 1 << 20,
                "counters": {},
                "problem": "journal /s/logs.journal is corrupt: record seq 3 ...",
                "journal": None,
            },
        ],
    }
    lines = format_status_table(status).splitlines()
    journal = next(line for line in lines if line.startswith("db ") and "%" in line)
    assert "256.0 KiB" in journal and "1.0 MiB" in journal and "25%" in journal
    assert " 12 " in journal and "3.2 s" in journal and "40" in journal and "paused" in journal
    peer = next(line for line in lines if line.startswith(PEER))
    assert "journal" in peer and "yes" in peer and "48.8 KiB" in peer and "0 B" in peer
    other = next(line for line in lines if line.startswith("10.0.0.2:7800"))
    assert "tracking" in other and "1.0 GiB" in other
    assert any("logs: journal /s/logs.journal is corrupt" in line for line in lines)
    assert any("db: split brain with site-b since seq 2048" in line for line in lines)


# --- role changes (issue 9) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "query", "expected"),
    [
        ("/api/volumes/db/promote", "", ControlRequest("db", "promote")),
        ("/api/volumes/db/promote", "force=1", ControlRequest("db", "promote", force=True)),
        ("/api/volumes/db/demote", "timeout=7.5", ControlRequest("db", "demote", timeout=7.5)),
        (
            "/api/volumes/db/resolve",
            "discard_local=true",
            ControlRequest("db", "resolve", discard_local=True),
        ),
    ],
)
def test_role_routes(path: str, query: str, expected: ControlRequest) -> None:
    assert parse("POST", path, query) == expected


@pytest.mark.parametrize(
    ("path", "query", "needle"),
    [
        ("/api/volumes/db/promote", "force=yes", "1, true, 0 or false"),
        ("/api/volumes/db/promote", "timeout=3", "unknown parameter"),
        ("/api/volumes/db/demote", "timeout=-1", "seconds"),
        ("/api/volumes/db/demote", "timeout=1e9", "seconds"),
        ("/api/volumes/db/resolve", "discard_local=maybe", "1, true, 0 or false"),
    ],
)
def test_bad_role_parameters_are_400(path: str, query: str, needle: str) -> None:
    with pytest.raises(ControlError) as err:
        parse("POST", path, query)
    assert err.value.status == HTTPStatus.BAD_REQUEST and needle in err.value.message


def test_role_actions_reach_the_roles_and_a_refusal_is_409() -> None:
    unit, _ = make_unit()
    roles = FakeRoles()
    unit.volumes["db"].roles = roles
    code, body = call(unit, "POST", "/api/volumes/db/promote?force=1")
    assert (code, body) == (200, {"volume": "db", "role": "primary"})
    code, body = call(unit, "POST", "/api/volumes/db/demote")
    assert code == 200 and body["role"] == "secondary"
    code, body = call(unit, "POST", "/api/volumes/db/resolve?discard_local=1")
    assert code == 200
    assert roles.calls == [("promote", True), ("demote", 60.0), ("resolve", True)]
    roles.refuse = "volume db is not consistent: a resync is in progress"
    code, body = call(unit, "POST", "/api/volumes/db/promote")
    assert code == 409 and "not consistent" in body["error"]
    # A volume without live roles (no journal) cannot change role.
    code, body = call(unit, "POST", "/api/volumes/replica/promote")
    assert code == 409 and "no live role" in body["error"]
