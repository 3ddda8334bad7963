"""Client connections kept under the process's file descriptor limit (RLIMIT_NOFILE)."""

from __future__ import annotations

import resource
from typing import Tuple

from twisted.logger import Logger

from openaigw.config import Config, ConfigError

log = Logger()

DEFAULT_MAX_CONNECTIONS = 4096
SPARE = 64  # listeners, log files, the status listener, probes, Redis


def descriptors_needed(config: Config, connections: int) -> int:
    """What ``connections`` client connections may need: as many upstream connections
    (one request each), the upstreams' idle pools, and some spare."""
    return 2 * connections + _pools(config) + SPARE


def _pools(config: Config) -> int:
    return sum(u.keepalive_pool * len(u.nodes) for u in config.upstreams.values())


def _limit(needed: int) -> Tuple[int, bool]:
    """The soft limit, raised towards ``needed`` as far as the hard limit allows;
    and whether ``needed`` fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed <= soft:
        return soft, True
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, False
    return target, needed <= target


def fit_connections(config: Config) -> int:
    """The client connection cap to serve ``config`` with, below the file limit.

    The soft limit is raised (up to the hard one) when the cap needs it.  A
    ``max_connections`` set in the file that cannot fit is a ConfigError; the default
    is lowered to fit, and says so.
    """
    configured = config.gateway.max_connections
    wanted = configured or DEFAULT_MAX_CONNECTIONS
    needed = descriptors_needed(config, wanted)
    limit, fits = _limit(needed)
    if fits:
        return wanted
    fitted = (limit - _pools(config) - SPARE) // 2
    if configured is None and fitted >= 1:
        log.warn(
            "max_connections lowered to {fitted} (from {default}): the process may open {limit} files",
            fitted=fitted, default=wanted, limit=limit,
        )
        return fitted
    connections = wanted if fitted >= 1 else 1
    raise ConfigError(
        f"{config.path}: [gateway] max_connections: {connections} client connection(s) need"
        f" {descriptors_needed(config, connections)} file descriptors (as many upstream"
        f" connections, {_pools(config)} idle upstream ones in keepalive_pool, {SPARE} spare)"
        f" but the process may open only {limit}: lower max_connections (or keepalive_pool),"
        " or raise the limit (LimitNOFILE= in the systemd unit, ulimit -n)"
    )
