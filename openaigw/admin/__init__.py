"""The Admin API: APISIX's ``/apisix/admin/{routes,upstreams,consumers}`` on its own
listener, adding objects to gw.ini's and applying each change at once."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from openaigw.admin.catalog import Catalog
from openaigw.admin.resource import AdminResource, AdminSite
from openaigw.admin.store import FileStore, MemoryStore
from openaigw.config import Config

log = Logger()


def open_catalog(config: Config) -> Catalog:
    """The catalog for ``config``'s ``admin_state``: raises a ConfigError when the
    state cannot be read or its objects do not fit gw.ini."""
    state = config.gateway.admin_state
    return Catalog(config, FileStore(state) if state else MemoryStore())


def make_site(catalog: Catalog, clock: Any, telemetry: Any) -> AdminSite:
    """The Site of the Admin API listener."""
    gateway = catalog.file.gateway
    if gateway.admin_key is None:
        log.warn("Admin API on {listen} has no admin_key: it serves loopback clients only",
                 listen=" ".join(gateway.admin))
    if gateway.admin_state is None:
        log.warn("Admin API without admin_state: its objects are lost when the gateway stops")
    return AdminSite(AdminResource(catalog, telemetry), reactor=clock)
