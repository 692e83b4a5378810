"""Process limits a unit raises for itself at start."""

from __future__ import annotations

import logging
import resource

__all__ = ["raise_fd_limit"]

log = logging.getLogger("blockmirror.daemon")


def raise_fd_limit() -> None:
    """Raise the descriptor soft limit to the hard limit: links, NBD clients and the admin API
    share it, and the soft default (often 1024) is easily reached by a flood of connections."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            if target > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                log.info("descriptor limit raised from %d to %d", soft, target)
    except (OSError, ValueError) as exc:
        log.warning("could not raise the descriptor limit: %s", exc)
