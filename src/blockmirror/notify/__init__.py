"""Alert delivery: every event of the unit to its ``[alerts]`` targets (docs/operations.md,
"Alert targets").

:class:`~blockmirror.notify.dispatch.AlertDispatcher` is the one entry point: an
:class:`~blockmirror.events.EventLog` listener that queues each event per target and delivers it
from a worker task per target, retrying with backoff, so that a dead mail server delays neither
the unit nor the other targets. The transports are :mod:`~blockmirror.notify.mail` (SMTP),
:mod:`~blockmirror.notify.traps` (SNMP) and :mod:`~blockmirror.notify.webhook` (HTTP).
"""

from __future__ import annotations

from blockmirror.notify.dispatch import AlertDispatcher, Deliverer, Target

__all__ = ["AlertDispatcher", "Deliverer", "Target"]
