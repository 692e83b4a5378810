"""SNMP traps: one SNMPv2-Trap per event and receiver, SNMPv2c or SNMPv3 USM (pysnmp 7, asyncio).

The OIDs are those of ``docs/BLOCKMIRROR-MIB.txt``, under the enterprise arc 32473 that RFC 5612
reserves for documentation; a deployment may keep it or move :data:`ENTERPRISE` to its own
Private Enterprise Number. Two notification types, raised and cleared, carry the same varbinds;
every text is a UTF-8 ``SnmpAdminString``, so a receiver without the MIB shows the event name
(``"link-down"``) as text.

A trap is not acknowledged: "sent" means handed to the network. For SNMPv3 the sender is the
authoritative engine, so receivers know our users by this engine's ID (``engine_id``, or one
derived from the unit's name by :func:`default_engine_id`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from pysnmp.hlapi.v3arch.asyncio import (
    CommunityData,
    ContextData,
    NotificationType,
    ObjectIdentity,
    ObjectType,
    OctetString,
    SnmpEngine,
    Udp6TransportTarget,
    UdpTransportTarget,
    Unsigned32,
    UsmUserData,
    send_notification,
    usmAesBlumenthalCfb192Protocol,
    usmAesBlumenthalCfb256Protocol,
    usmAesCfb128Protocol,
    usmAesCfb192Protocol,
    usmAesCfb256Protocol,
    usmDESPrivProtocol,
    usmHMAC128SHA224AuthProtocol,
    usmHMAC192SHA256AuthProtocol,
    usmHMAC256SHA384AuthProtocol,
    usmHMAC384SHA512AuthProtocol,
    usmHMACMD5AuthProtocol,
    usmHMACSHAAuthProtocol,
    usmNoPrivProtocol,
)

from blockmirror.addresses import Address
from blockmirror.config_alerts import MIN_SNMP_KEY_CHARS, SnmpTarget, read_secret
from blockmirror.errors import NotifyError
from blockmirror.events import Event, EventState
from blockmirror.notify.render import iso_time

__all__ = [
    "CLEARED",
    "ENTERPRISE",
    "OBJECTS",
    "RAISED",
    "TrapDeliverer",
    "default_engine_id",
    "varbinds",
]

T = TypeVar("T")

# RFC 5612's documentation enterprise; see the module docstring.
ENTERPRISE = "1.3.6.1.4.1.32473"
MIB_ROOT = f"{ENTERPRISE}.1"  # blockmirrorMIB
RAISED = f"{MIB_ROOT}.0.1"  # bmEventRaised
CLEARED = f"{MIB_ROOT}.0.2"  # bmEventCleared
# The varbinds, in the order the MIB's OBJECTS clause lists them: name -> OID of the instance.
OBJECTS = {
    "bmEventName": f"{MIB_ROOT}.1.1.0",
    "bmEventState": f"{MIB_ROOT}.1.2.0",
    "bmEventUnit": f"{MIB_ROOT}.1.3.0",
    "bmEventVolume": f"{MIB_ROOT}.1.4.0",
    "bmEventPeer": f"{MIB_ROOT}.1.5.0",
    "bmEventMessage": f"{MIB_ROOT}.1.6.0",
    "bmEventTime": f"{MIB_ROOT}.1.7.0",
    "bmEventSince": f"{MIB_ROOT}.1.8.0",
    "bmEventId": f"{MIB_ROOT}.1.9.0",
    "bmVersion": f"{MIB_ROOT}.1.10.0",
}
# SnmpAdminString is at most 255 octets.
MAX_TEXT = 255
# A trap is one datagram and waits for no answer; this bounds the name lookup only.
TIMEOUT = 5.0

_AUTH = {
    "SHA": usmHMACSHAAuthProtocol,
    "SHA224": usmHMAC128SHA224AuthProtocol,
    "SHA256": usmHMAC192SHA256AuthProtocol,
    "SHA384": usmHMAC256SHA384AuthProtocol,
    "SHA512": usmHMAC384SHA512AuthProtocol,
    "MD5": usmHMACMD5AuthProtocol,
}
_PRIV = {
    "AES128": usmAesCfb128Protocol,
    "AES192": usmAesBlumenthalCfb192Protocol,
    "AES256": usmAesBlumenthalCfb256Protocol,
    "AES192C": usmAesCfb192Protocol,
    "AES256C": usmAesCfb256Protocol,
    "DES": usmDESPrivProtocol,
    "none": usmNoPrivProtocol,
}
# RFC 3411 SnmpEngineID: the enterprise with the high bit set, then format 4 (text).
_ENGINE_ID_PREFIX = (0x80000000 | int(ENTERPRISE.rsplit(".", 1)[1])).to_bytes(4, "big") + b"\x04"


def default_engine_id(unit: str) -> bytes:
    """``0x80007ed904`` followed by the unit's name (its first 27 octets): stable across
    restarts, which the receivers' ``createUser -e`` lines need."""
    return _ENGINE_ID_PREFIX + unit.encode("utf-8")[:27]


def _text(value: str) -> OctetString:
    raw = value.encode("utf-8")
    if len(raw) > MAX_TEXT:
        # Cut on a character boundary, so the receiver still sees valid UTF-8.
        raw = raw[:MAX_TEXT].decode("utf-8", "ignore").encode("utf-8")
    return OctetString(raw)


def varbinds(event: Event, version: str) -> list[tuple[str, Any]]:
    """The notification's variable bindings (after sysUpTime.0 and snmpTrapOID.0), as
    ``(OID, value)``."""
    values = {
        "bmEventName": _text(str(event.name)),
        "bmEventState": _text(str(event.state)),
        "bmEventUnit": _text(event.unit),
        "bmEventVolume": _text(event.subject.volume or ""),
        "bmEventPeer": _text(event.subject.peer or ""),
        "bmEventMessage": _text(event.message),
        "bmEventTime": _text(iso_time(event.time)),
        "bmEventSince": _text(iso_time(event.since)),
        "bmEventId": Unsigned32(event.id % (1 << 32)),
        "bmVersion": _text(version),
    }
    return [(OBJECTS[name], value) for name, value in values.items()]


class _LoopThread:
    """An event loop of its own in a thread, where pysnmp runs: its engine's first trap costs
    a few tenths of a second of pure Python (loading MIB modules, configuring the engine's
    tables, localizing keys), which must not hold the unit's event loop. The GIL is still
    shared, but the interpreter switches threads every few milliseconds."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the thread's loop; cancelling the caller cancels it there too."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self.thread.join, 10.0)
        if not self.thread.is_alive():
            self.loop.close()


class TrapDeliverer:
    """Sends each event as a trap to one receiver of an :class:`SnmpTarget`.

    The SNMP engine (and its UDP socket) is made at the first trap, on a thread of its own
    (:class:`_LoopThread`), and kept until :meth:`aclose`; passphrases are read for every
    trap, so a changed key file is used without a reload.
    """

    def __init__(self, target: SnmpTarget, receiver: Address, unit: str, version: str) -> None:
        self.target = target
        self.receiver = receiver
        self.version = version
        self.engine_id = target.engine_id or default_engine_id(unit)
        self._engine: Any = None
        self._thread: _LoopThread | None = None

    def _credentials(self) -> Any:
        t = self.target
        if t.version == "2c":
            community = t.community
            if t.community_file is not None:
                community = read_secret(t.community_file, "SNMP community")
            return CommunityData(community, mpModel=1)  # mpModel 1: SNMPv2c
        if t.user is None or t.auth_key_file is None:
            raise NotifyError("SNMPv3 needs user and auth_key_file")  # parse_alerts ensures
        auth_key = read_secret(
            t.auth_key_file, "SNMP auth passphrase", min_chars=MIN_SNMP_KEY_CHARS
        )
        priv_key = None
        if t.priv != "none" and t.priv_key_file is not None:
            priv_key = read_secret(
                t.priv_key_file, "SNMP privacy passphrase", min_chars=MIN_SNMP_KEY_CHARS
            )
        return UsmUserData(
            t.user,
            auth_key,
            priv_key,
            authProtocol=_AUTH[t.auth],
            privProtocol=_PRIV[t.priv],
        )

    async def deliver(self, event: Event) -> None:
        credentials = self._credentials()
        if self._thread is None:
            self._thread = _LoopThread(f"snmp {self.receiver}")
        await self._thread.run(self._send(credentials, event))

    async def _send(self, credentials: Any, event: Event) -> None:
        """On the SNMP thread's loop."""
        if self._engine is None:
            self._engine = SnmpEngine(snmpEngineID=OctetString(self.engine_id))
        host, port = self.receiver.host, self.receiver.port
        kind = Udp6TransportTarget if ":" in host else UdpTransportTarget
        transport = await kind.create((host, port), timeout=TIMEOUT, retries=0)
        oid = RAISED if event.state is EventState.RAISED else CLEARED
        notification = NotificationType(ObjectIdentity(oid)).add_varbinds(
            *(
                ObjectType(ObjectIdentity(name), value)
                for name, value in varbinds(event, self.version)
            )
        )
        error, *_ = await send_notification(
            self._engine, credentials, transport, ContextData(), "trap", notification
        )
        if error is not None:
            raise NotifyError(f"SNMP trap to {self.receiver}: {error}")

    async def _close_engine(self) -> None:
        """On the SNMP thread's loop: the engine's socket belongs to it."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close_dispatcher()

    async def aclose(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            try:
                await thread.run(self._close_engine())
            finally:
                await thread.stop()
