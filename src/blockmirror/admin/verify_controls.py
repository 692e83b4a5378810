"""The admin API's verify control (docs/operations.md, "Verifying a replica").

``POST /api/volumes/{volume}/verify[?peer=PEER][&repair=1]``: compare the volume with the
replica of each peer it sends to (or of one), region by region, while the host keeps writing.
The answer names every region that differs; ``repair`` marks them dirty for that peer, so its
next resync copies only them.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Protocol

from blockmirror.admin.history_controls import (
    HistoryControlError,
    Reply,
    bad_request,
    query_params,
)
from blockmirror.link.sender import PeerSender
from blockmirror.link.verify import VerifyError, verify_peer

__all__ = ["VerifiedVolume", "handle_verify", "is_verify_route"]


class VerifiedVolume(Protocol):
    @property
    def senders(self) -> list[PeerSender]: ...


def is_verify_route(segments: list[str]) -> str | None:
    """The volume of a verify route, else None."""
    if len(segments) == 2 and segments[0] and segments[1] == "verify":
        return segments[0]
    return None


async def handle_verify(rt: VerifiedVolume, method: str, volume: str, query: str) -> Reply:
    """Validate and run a verify; raises HistoryControlError for a refusal."""
    if method != "POST":
        raise HistoryControlError(HTTPStatus.METHOD_NOT_ALLOWED, "verify takes POST")
    params = query_params(query, ("peer", "repair"))
    repair = params.get("repair", "0")
    if repair not in ("0", "1", "true", "false"):
        raise bad_request(f"parameter 'repair' is 1, true, 0 or false, not {repair!r}")
    senders = rt.senders
    if "peer" in params:
        senders = [s for s in senders if s.consumer_name == params["peer"]]
        if not senders:
            known = ", ".join(s.consumer_name for s in rt.senders) or "none"
            raise HistoryControlError(
                HTTPStatus.NOT_FOUND,
                f"volume {volume!r} sends to no peer {params['peer']!r} (peers: {known})",
            )
    if not senders:
        raise HistoryControlError(
            HTTPStatus.CONFLICT, f"volume {volume!r} sends to no peer: nothing to verify against"
        )
    results: list[dict[str, Any]] = []
    for sender in senders:
        try:
            result = await verify_peer(sender, repair=repair in ("1", "true"))
        except VerifyError as exc:
            raise HistoryControlError(HTTPStatus.CONFLICT, str(exc)) from None
        except (TimeoutError, ConnectionError) as exc:
            raise HistoryControlError(
                HTTPStatus.CONFLICT,
                f"peer {sender.consumer_name}: the link went away during verify ({exc}); "
                "nothing was marked",
            ) from None
        results.append(result.as_dict())
    return HTTPStatus.OK, {"volume": volume, "peers": results}
