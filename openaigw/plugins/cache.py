"""cache: answer repeated requests from the gateway (``cache = on`` on a route).

The filter decides, for each request, whether the cache may answer it and under
which key; :mod:`openaigw.cache.responses` then serves it (a hit, a coalesced
request, or a miss that goes upstream and is stored).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from zope.interface import implementer

from openaigw.cache.key import cache_key, cacheable, caller_scope
from openaigw.cache.responses import STATUS, CachedRequest, ResponseCache
from openaigw.config import PluginOptions
from openaigw.consumers import presented_key
from openaigw.exchange import Exchange
from openaigw.interfaces import IPlugin, IRequestFilter
from openaigw.plugins.limits import check_options

DEFAULT_MEMORY = 64 << 20
_KEYS_KEPT = 1024


@dataclass(frozen=True)
class CacheSettings:
    ttl: float = 3600.0
    scope: str = "consumer"
    max_entry_size: int = 1 << 20
    memory: int = DEFAULT_MEMORY


def client_directives(exchange: Exchange) -> "tuple[bool, bool]":
    """The client's ``Cache-Control``: (no-cache, no-store)."""
    directives = set()
    for value in exchange.request.requestHeaders.getRawHeaders(b"cache-control", ()):
        directives.update(d.strip().split(b"=", 1)[0].lower() for d in value.split(b","))
    return b"no-cache" in directives, b"no-store" in directives


@implementer(IRequestFilter)
class CacheFilter:
    """Runs last among a route's filters (the key is of what goes upstream): marks
    the exchange for the cache, or says BYPASS."""

    def __init__(self, settings: CacheSettings, responses: ResponseCache, route: str) -> None:
        self._settings = settings
        self._responses = responses
        self._route = route
        # Keys by (scope, path, the body's digest): a body seen before is not parsed
        # and serialised again to find its key.
        self._keys: "OrderedDict[Tuple[str, bytes, bytes], str]" = OrderedDict()

    def filter_request(self, exchange: Exchange) -> None:
        no_cache, no_store = client_directives(exchange)
        key = None if no_store or exchange.method != b"POST" else self._key(exchange)
        if key is None:
            exchange.response_headers[STATUS] = [b"BYPASS"]
            exchange.context.record.cache = "bypass"
            return
        # Stored answers are replayed to any client of the scope, event by event: plain.
        exchange.headers.setRawHeaders(b"accept-encoding", [b"identity"])
        exchange.cache = CachedRequest(self._responses, self._settings, key, lookup=not no_cache)

    def _key(self, exchange: Exchange) -> Optional[str]:
        """The cache key of ``exchange`` as it will go upstream; None if not cacheable."""
        if self._settings.scope == "route":
            scope = "route"
        else:
            scope = caller_scope(exchange.consumer, presented_key(exchange.request.requestHeaders))
        seen = (scope, exchange.path, hashlib.sha256(exchange.body).digest())
        key = self._keys.get(seen)
        if key is not None:
            self._keys.move_to_end(seen)
            return key
        body = exchange.json()
        if not cacheable(exchange.method, exchange.path, body):
            return None
        try:
            key = cache_key(self._route, scope, exchange.path, body)
        except (ValueError, RecursionError):  # nested too deep to serialise again
            return None
        self._keys[seen] = key
        if len(self._keys) > _KEYS_KEPT:
            self._keys.popitem(last=False)
        return key


@implementer(IPlugin)
class Cache:
    name = "cache"
    priority = 1000  # after proxy-rewrite: the key is of the upstream path and body
    scopes = ("route",)

    def parse(self, options: PluginOptions) -> Optional[CacheSettings]:
        check_options(options, ("", "ttl", "scope", "max_entry_size", "memory"))
        section = options.section
        on = section.flag(options.key(""), False)
        if not on:
            for option in options.options():
                if option:
                    raise options.error(option, "only applies with cache = on")
            return None
        ttl = section.number(options.key("ttl"), CacheSettings.ttl)
        if ttl <= 0:
            raise options.error("ttl", "must be above 0 (seconds)")
        scope = section.choice(options.key("scope"), "consumer", ("consumer", "route"))
        max_entry_size = section.size(options.key("max_entry_size"), CacheSettings.max_entry_size)
        memory = section.size(options.key("memory"), DEFAULT_MEMORY)
        if max_entry_size <= 0:
            raise options.error("max_entry_size", "must be above 0")
        return CacheSettings(ttl, scope, max_entry_size, memory)

    def create(self, settings: CacheSettings, runtime: Any, scope: str) -> CacheFilter:
        return CacheFilter(settings, runtime.responses, scope.partition(":")[2])

