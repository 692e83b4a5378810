"""Routing and validation of the history, drill and verify controls: every bad request is a
clear 4xx that changes nothing."""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.admin.drill_controls import drill_route
from blockmirror.admin.history_controls import (
    HistoryControlError,
    parse,
    parse_time,
    route,
)
from blockmirror.admin.verify_controls import is_verify_route


def test_routes() -> None:
    assert route(["db", "history"]) == ("db", "history")
    assert route(["db", "restore"]) == ("db", "restore")
    assert route(["db", "promote"]) is None and route(["", "history"]) is None
    assert drill_route(["db", "drill", "start"]) == ("db", "start")
    assert drill_route(["db", "drills"]) == ("db", "list")
    assert drill_route(["db", "drill", "nope"]) is None
    assert is_verify_route(["db", "verify"]) == "db" and is_verify_route(["db"]) is None


@pytest.mark.parametrize(
    ("method", "action", "query", "status", "fragment"),
    [
        ("GET", "restore", "seq=1&to=/tmp/x", HTTPStatus.METHOD_NOT_ALLOWED, "POST"),
        ("POST", "restore", "seq=1", HTTPStatus.BAD_REQUEST, "absolute path"),
        ("POST", "restore", "seq=1&to=rel.img", HTTPStatus.BAD_REQUEST, "absolute path"),
        ("POST", "restore", "to=/tmp/x", HTTPStatus.BAD_REQUEST, "exactly one"),
        ("POST", "restore", "seq=1&at=-5m&to=/tmp/x", HTTPStatus.BAD_REQUEST, "exactly one"),
        ("POST", "restore", "seq=-1&to=/tmp/x", HTTPStatus.BAD_REQUEST, "sequence number"),
        ("POST", "restore", "at=yesterday&to=/tmp/x", HTTPStatus.BAD_REQUEST, "ISO 8601"),
        ("POST", "restore", "seq=1&seq=2&to=/tmp/x", HTTPStatus.BAD_REQUEST, "twice"),
        ("POST", "restore", "seq=1&to=/tmp/x&evil=1", HTTPStatus.BAD_REQUEST, "unknown"),
        ("POST", "restore", "seq=1&to=/no/such/dir/x", HTTPStatus.BAD_REQUEST, "directory"),
        ("POST", "bookmark", "name=", HTTPStatus.BAD_REQUEST, "bookmark name"),
        ("POST", "bookmark", "name=../x", HTTPStatus.BAD_REQUEST, "bookmark name"),
        ("POST", "bookmark", "name=" + "a" * 201, HTTPStatus.BAD_REQUEST, "bookmark name"),
        ("DELETE", "history", "", HTTPStatus.METHOD_NOT_ALLOWED, "GET or POST"),
        ("POST", "restore", "seq=1&to=%ff", HTTPStatus.BAD_REQUEST, "malformed"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(
    method: str, action: str, query: str, status: HTTPStatus, fragment: str
) -> None:
    with pytest.raises(HistoryControlError) as caught:
        parse(method, "db", action, query)  # type: ignore[arg-type]
    assert caught.value.status == status and fragment in caught.value.message, caught.value


def test_restore_refuses_an_existing_file(tmp_path: Path) -> None:
    existing = tmp_path / "image"
    existing.write_bytes(b"keep")
    with pytest.raises(HistoryControlError) as caught:
        parse("POST", "db", "restore", f"seq=3&to={existing}")
    assert caught.value.status == HTTPStatus.CONFLICT and existing.read_bytes() == b"keep"
    req = parse("POST", "db", "restore", f"bookmark=nightly&to={tmp_path / 'new.img'}")
    assert req.bookmark == "nightly" and req.to == tmp_path / "new.img"


def test_times_iso_and_relative() -> None:
    now = 1_800_000_000_000_000_000
    assert parse_time("-15m", now_ns=now) == now - 15 * 60 * 10**9
    assert parse_time("-1h30m", now_ns=now) == now - 5400 * 10**9
    assert parse_time("2026-12-02T10:00:00Z") == parse_time("2026-12-02T10:00:00")
    assert parse_time("2026-12-02T11:00:00+01:00") == parse_time("2026-12-02T10:00:00Z")
    assert parse_time("1970-01-01T00:00:01.5Z") == 1_500_000_000


@given(st.text(max_size=40))
def test_any_time_text_parses_or_says_what_is_accepted(text: str) -> None:
    try:
        parse_time(text, now_ns=10**18)
    except ValueError as exc:
        assert "ISO 8601" in str(exc) or "duration" in str(exc) or "invalid" in str(exc)
