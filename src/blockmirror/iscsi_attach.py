"""The unit's iSCSI portal: one target per volume with ``iscsi = true`` (docs/iscsi.md).

Built after the volumes are open, on the same block-device service as their NBD exports, so
every write still goes through the journal and to the peers. The target name is
``BASE_IQN:VOLUME``; the logical unit's identity (the NAA of VPD page 83h, the serial) comes
from the volume's identity, the same on a primary and its replicas, so a host sees one disk
wherever it is served from.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from blockmirror.config import Config
from blockmirror.config_alerts import read_secret
from blockmirror.config_iscsi import IscsiConfig, target_name
from blockmirror.frontend.iscsi_chap import ChapSecrets
from blockmirror.frontend.iscsi_keys import KeyPolicy
from blockmirror.frontend.iscsi_login import LoginConfig
from blockmirror.frontend.iscsi_server import IscsiServer, IscsiTarget
from blockmirror.frontend.scsi_pages import Identity
from blockmirror.frontend.scsi_target import ScsiLogicalUnit
from blockmirror.runtime import VolumeRuntime

__all__ = ["start_iscsi"]

log = logging.getLogger("blockmirror.daemon")


def _chap(config: IscsiConfig) -> ChapSecrets | None:
    """The CHAP credentials, read from their files (blocking: at start, in a thread)."""
    if config.chap_user is None or config.chap_secret_file is None:
        return None
    secret = read_secret(config.chap_secret_file, "iSCSI CHAP secret").encode()
    mutual = None
    if config.mutual_user is not None and config.mutual_secret_file is not None:
        mutual = read_secret(config.mutual_secret_file, "iSCSI mutual CHAP secret").encode()
    return ChapSecrets(config.chap_user, secret, config.mutual_user, mutual)


async def start_iscsi(
    config: Config,
    volumes: Sequence[VolumeRuntime],
    identity_of: Callable[[VolumeRuntime], str],
) -> IscsiServer | None:
    """Serve the volumes with ``iscsi = true``; None when there are none. Raises OSError when
    the portal cannot be bound, NotifyError/ValueError for unreadable CHAP secrets."""
    iscsi = config.iscsi
    chosen = [rt for rt in volumes if rt.config.iscsi and rt.problem is None]
    if iscsi is None or not chosen:
        return None
    chap = await asyncio.to_thread(_chap, iscsi)
    targets: dict[str, IscsiTarget] = {}
    for rt in chosen:
        name = target_name(iscsi.base_iqn, rt.config.name)
        lu = ScsiLogicalUnit(rt.export, Identity(volume_id=identity_of(rt)))
        targets[name] = IscsiTarget(name, lu, rt.export, alias=rt.config.name)
    # Up to four connections per session (MC/S) for initiators that use them.
    server = IscsiServer(targets, LoginConfig(chap=chap, keys=KeyPolicy(max_connections=4)))
    host, port = await server.start(iscsi.listen.host, iscsi.listen.port)
    for rt in chosen:
        name = target_name(iscsi.base_iqn, rt.config.name)
        rt.iscsi_status = _status(server, name)
        log.info("volume %s served as iSCSI target %s on %s:%d", rt.config.name, name, host, port)
    return server


def _status(server: IscsiServer, name: str) -> Callable[[], dict[str, Any]]:
    return lambda: server.status(name)
