"""Operator controls of the admin API: routing, validation and execution, without any HTTP.

The admin server hands every request under ``/api/volumes/`` to :func:`handle` and writes back
the ``(status, body)`` it gets. Routes (all ``POST``; parameters in the query string):

- ``/api/volumes/{volume}/journal/pause`` and ``/resume``: stop or restart *enqueueing*. While
  paused, host writes are still served and applied to the volume, but instead of journal records
  they become bits in every consumer's dirty map.
- ``/api/volumes/{volume}/consumers/{consumer}/pause`` and ``/resume``: stop or restart one
  consumer's dequeueing.
- ``/api/volumes/{volume}/consumers/{consumer}/discard?from=A&to=B``: turn that consumer's
  records with sequence numbers in ``[A, B]`` into dirty bits; answers how many records.
- ``/api/volumes/{volume}/promote[?force=1]``, ``/demote[?timeout=SECONDS]`` and
  ``/resolve?discard_local=1``: role changes (:mod:`blockmirror.failover`); a change that
  cannot be made now is a 409 saying why.

Consumer names are peer addresses (``127.0.0.1:7800``, ``[::1]:7800``) and may come raw or
percent-encoded (``127.0.0.1%3A7800``): every path segment is decoded after the path is split
at ``/``. Every refusal is ``{"error": "..."}`` with a 4xx status and changes nothing
(invariant 7); a failure of the operation itself is a 500 and the unit keeps running.

Routing and validation (:func:`parse`) are pure; :func:`execute` awaits the write path's
controls (:class:`OperatorControls`, a small interface: nothing else of the write path is
reached from here), which write a checkpoint so the setting survives a restart.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl, unquote

from blockmirror.blockdev.journal_controls import DiscardRangeError
from blockmirror.errors import AdminError, BlockmirrorError, RoleError
from blockmirror.state import VolumeState

log = logging.getLogger(__name__)

PREFIX = "/api/volumes/"
# Sequence numbers are u64 in the journal format; 20 digits hold any of them.
_SEQ_RE = re.compile(r"[0-9]{1,20}", re.ASCII)
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

Action = Literal[
    "journal-pause",
    "journal-resume",
    "consumer-pause",
    "consumer-resume",
    "discard",
    "promote",
    "demote",
    "resolve",
]
_ROLE_ACTIONS: frozenset[str] = frozenset({"promote", "demote", "resolve"})
_TIMEOUT_RE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,3})?", re.ASCII)
Reply = tuple[int, dict[str, Any]]


# --- what the controls need from a unit (the daemon's Unit, or a fake in the tests) ----------


class OperatorControls(Protocol):
    """What the controls need of a volume's journaled write path, and all they may do to it
    (:class:`blockmirror.blockdev.journal_controls.JournalControls` is the real one)."""

    @property
    def failed(self) -> BaseException | None: ...

    @property
    def enqueue_paused(self) -> bool: ...

    @property
    def newest_seq(self) -> int: ...

    def consumer_names(self) -> list[str]: ...

    def consumer_status(self, name: str) -> dict[str, object]: ...

    async def pause_enqueue(self, paused: bool) -> None: ...

    async def pause_consumer(self, name: str, paused: bool) -> None: ...

    async def discard(self, name: str, first_seq: int, last_seq: int) -> int: ...


class ControlledWritePath(Protocol):
    @property
    def controls(self) -> OperatorControls: ...


class VolumeConfigView(Protocol):
    @property
    def role(self) -> str: ...


class RoleControls(Protocol):
    """A volume's role changes (:class:`blockmirror.failover.VolumeRoles`); each raises
    :class:`~blockmirror.errors.RoleError` when it cannot be made now."""

    async def promote(self, *, force: bool, delayed: str = "") -> dict[str, Any]: ...

    async def demote(self, *, timeout: float) -> dict[str, Any]: ...

    async def resolve(self, *, discard_local: bool) -> dict[str, Any]: ...


class ControlledVolume(Protocol):
    @property
    def config(self) -> VolumeConfigView: ...

    @property
    def roles(self) -> RoleControls | None: ...

    @property
    def role(self) -> str: ...

    @property
    def journal(self) -> ControlledWritePath | None: ...

    @property
    def problem(self) -> str | None: ...

    @property
    def state(self) -> VolumeState: ...


class ControlledUnit(Protocol):
    def runtime(self, name: str) -> ControlledVolume: ...


# --- requests --------------------------------------------------------------------------------


class ControlError(AdminError):
    """A request refused before anything changed; ``status`` is the HTTP status to answer."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class ControlRequest:
    volume: str
    action: Action
    consumer: str | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    force: bool = False
    discard_local: bool = False
    timeout: float | None = None
    delayed: str = ""  # promote: "apply" or "discard" the records replay_delay holds


# Controls of the unit as a whole (the daemon routes them; see daemon._control).
UNIT_CONTROLS = frozenset({"/api/reload"})


def is_control_path(path: str) -> bool:
    return path.startswith(PREFIX) or path in UNIT_CONTROLS


def _segments(path: str) -> list[str]:
    raw = path[len(PREFIX) :].split("/")
    try:
        # Split first, decode after: a name's %2F can never create or hide a path level.
        return [unquote(seg, errors="strict") for seg in raw]
    except UnicodeDecodeError:
        raise ControlError(
            HTTPStatus.BAD_REQUEST, "the path is not valid percent-encoded UTF-8"
        ) from None


def _route(segments: list[str]) -> tuple[str, Action, str | None] | None:
    if any(not seg for seg in segments):
        return None
    match segments:
        case [volume, "journal", "pause"]:
            return volume, "journal-pause", None
        case [volume, "journal", "resume"]:
            return volume, "journal-resume", None
        case [volume, "consumers", consumer, "pause"]:
            return volume, "consumer-pause", consumer
        case [volume, "consumers", consumer, "resume"]:
            return volume, "consumer-resume", consumer
        case [volume, "consumers", consumer, "discard"]:
            return volume, "discard", consumer
        case [volume, ("promote" | "demote" | "resolve") as action]:
            return volume, action, None
    return None


def _params(query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise ControlError(HTTPStatus.BAD_REQUEST, "the query string is malformed") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            what = f"allowed: {', '.join(allowed)}" if allowed else "this control takes none"
            raise ControlError(HTTPStatus.BAD_REQUEST, f"unknown parameter {key!r} ({what})")
        if key in params:
            raise ControlError(HTTPStatus.BAD_REQUEST, f"parameter {key!r} is given twice")
        params[key] = value
    return params


def _seq(params: dict[str, str], key: str) -> int:
    text = params.get(key)
    if text is None:
        raise ControlError(HTTPStatus.BAD_REQUEST, f"parameter {key!r} is required")
    if not _SEQ_RE.fullmatch(text) or not 1 <= int(text) <= _U64_MAX:
        raise ControlError(
            HTTPStatus.BAD_REQUEST,
            f"parameter {key!r} must be a sequence number (an integer from 1 to 2**64-1), "
            f"not {text!r}",
        )
    return int(text)


def parse(method: str, path: str, query: str) -> ControlRequest:
    """Route and validate a request; raises :class:`ControlError` (404, 405 or 400)."""
    route = _route(_segments(path))
    if route is None:
        raise ControlError(
            HTTPStatus.NOT_FOUND,
            f"no such control: {path} (see docs/operations.md, 'Operator controls')",
        )
    volume, action, consumer = route
    if method != "POST":
        raise ControlError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes POST, not {method}")
    if action in _ROLE_ACTIONS:
        return _role_request(volume, action, query)
    if action != "discard":
        _params(query, ())
        return ControlRequest(volume, action, consumer)
    params = _params(query, ("from", "to"))
    first, last = _seq(params, "from"), _seq(params, "to")
    if first > last:
        raise ControlError(
            HTTPStatus.BAD_REQUEST, f"empty range: from ({first}) is greater than to ({last})"
        )
    return ControlRequest(volume, action, consumer, first, last)


def _flag(params: dict[str, str], key: str) -> bool:
    value = params.get(key)
    if value is None:
        return False
    if value not in ("1", "true", "0", "false"):
        raise ControlError(
            HTTPStatus.BAD_REQUEST, f"parameter {key!r} is 1, true, 0 or false, not {value!r}"
        )
    return value in ("1", "true")


def _role_request(volume: str, action: Action, query: str) -> ControlRequest:
    allowed = {
        "promote": ("force", "delayed"),
        "demote": ("timeout",),
        "resolve": ("discard_local",),
    }
    params = _params(query, allowed[action])
    timeout = None
    if "timeout" in params:
        text = params["timeout"]
        if not _TIMEOUT_RE.fullmatch(text):
            raise ControlError(
                HTTPStatus.BAD_REQUEST, f"parameter 'timeout' is seconds (like 30), not {text!r}"
            )
        timeout = float(text)
    return ControlRequest(
        volume,
        action,
        None,
        force=_flag(params, "force"),
        discard_local=_flag(params, "discard_local"),
        timeout=timeout,
        delayed=_delayed(params),
    )


def _delayed(params: dict[str, str]) -> str:
    value = params.get("delayed", "")
    if value not in ("", "apply", "discard"):
        raise ControlError(
            HTTPStatus.BAD_REQUEST, f"parameter 'delayed' is apply or discard, not {value!r}"
        )
    return value


async def _execute_role(rt: ControlledVolume, req: ControlRequest) -> Reply:
    roles = rt.roles
    if roles is None:
        why = rt.problem or "it has no journal (journal = false or read_only)"
        raise ControlError(
            HTTPStatus.CONFLICT, f"volume {req.volume!r} has no live role to change: {why}"
        )
    if rt.state is VolumeState.STOPPED:
        raise ControlError(HTTPStatus.SERVICE_UNAVAILABLE, "the unit is stopping")
    try:
        if req.action == "promote":
            body = await roles.promote(force=req.force, delayed=req.delayed)
        elif req.action == "demote":
            body = await roles.demote(timeout=60.0 if req.timeout is None else req.timeout)
        else:
            body = await roles.resolve(discard_local=req.discard_local)
    except RoleError as exc:
        raise ControlError(HTTPStatus.CONFLICT, str(exc)) from None
    log.warning("volume %s: %s by the operator: %s", req.volume, req.action, body)
    return HTTPStatus.OK, {"volume": req.volume, **body}


# --- execution -------------------------------------------------------------------------------


def _runtime(unit: ControlledUnit, volume: str) -> ControlledVolume:
    try:
        return unit.runtime(volume)
    except KeyError:
        raise ControlError(HTTPStatus.NOT_FOUND, f"no volume named {volume!r}") from None


def _controls(rt: ControlledVolume, volume: str) -> OperatorControls:
    wp = rt.journal
    if wp is None:
        if rt.problem is not None:
            why = f"it is not served: {rt.problem}"
        else:
            why = "it is read-only or has journal = false"
        raise ControlError(HTTPStatus.CONFLICT, f"volume {volume!r} has no journal ({why})")
    if rt.state is VolumeState.STOPPED:
        raise ControlError(HTTPStatus.SERVICE_UNAVAILABLE, "the unit is stopping")
    controls = wp.controls
    if controls.failed is not None:
        raise ControlError(
            HTTPStatus.CONFLICT, f"volume {volume!r}: the write path has failed: {controls.failed}"
        )
    return controls


def _consumer(controls: OperatorControls, volume: str, name: str) -> None:
    names = controls.consumer_names()
    if name not in names:
        known = ", ".join(names) if names else "none: the volume lists no peers"
        raise ControlError(
            HTTPStatus.NOT_FOUND,
            f"volume {volume!r} has no consumer {name!r} (consumers: {known})",
        )


def _consumer_status(controls: OperatorControls, name: str) -> dict[str, Any]:
    try:
        return dict(controls.consumer_status(name))
    except KeyError:  # gone since it was checked (cannot happen today; be safe)
        return {}


async def execute(unit: ControlledUnit, req: ControlRequest) -> Reply:
    """Carry out a validated request; refusals raise :class:`ControlError`.

    A failure of the control itself propagates: OSError (errno) or a BlockmirrorError
    (a JournalError when the checkpoint cannot be written, say).
    """
    rt = _runtime(unit, req.volume)
    if req.action in _ROLE_ACTIONS:
        return await _execute_role(rt, req)
    controls = _controls(rt, req.volume)
    body: dict[str, Any] = {"volume": req.volume}
    if req.action in ("journal-pause", "journal-resume"):
        paused = req.action == "journal-pause"
        if paused and rt.role != "primary":
            # A secondary journals what its source sends, numbered by the source; there is no
            # host write to divert into dirty maps. (Resuming stays allowed: it undoes a flag.)
            raise ControlError(
                HTTPStatus.CONFLICT,
                f"volume {req.volume!r} is a {rt.role}: it journals what its source "
                "sends; pause enqueueing on the primary",
            )
        was_paused = controls.enqueue_paused
        await controls.pause_enqueue(paused)
        log.warning(
            "volume %s: journal enqueueing %s by the operator",
            req.volume,
            "paused" if paused else "resumed",
        )
        body |= {
            "enqueue_paused": controls.enqueue_paused,
            "changed": was_paused != paused,
            "newest_seq": controls.newest_seq,
        }
        return HTTPStatus.OK, body
    assert req.consumer is not None
    _consumer(controls, req.volume, req.consumer)
    body["consumer"] = req.consumer
    if req.action == "discard":
        assert req.first_seq is not None and req.last_seq is not None
        try:
            count = await controls.discard(req.consumer, req.first_seq, req.last_seq)
        except DiscardRangeError as exc:
            return HTTPStatus.BAD_REQUEST, {"error": str(exc)}
        log.warning(
            "volume %s: the operator discarded %d records (seq %d..%d) of consumer %s",
            req.volume,
            count,
            req.first_seq,
            req.last_seq,
            req.consumer,
        )
        body |= {"from": req.first_seq, "to": req.last_seq, "discarded": count}
    else:
        pause = req.action == "consumer-pause"
        before = _consumer_status(controls, req.consumer).get("paused")
        await controls.pause_consumer(req.consumer, pause)
        log.warning(
            "volume %s: consumer %s %s by the operator",
            req.volume,
            req.consumer,
            "paused" if pause else "resumed",
        )
        body["changed"] = before != pause
    body |= _consumer_status(controls, req.consumer)
    return HTTPStatus.OK, body


async def handle(unit: ControlledUnit, method: str, path: str, query: str) -> Reply:
    """Route, validate and execute one request; never raises for a bad request."""
    try:
        return await execute(unit, parse(method, path, query))
    except ControlError as exc:
        return exc.status, {"error": exc.message}
    except (OSError, BlockmirrorError) as exc:
        log.error("control %s %s failed: %s", method, path, exc)
        return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"the control failed: {exc}"}
