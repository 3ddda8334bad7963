"""proxy-rewrite: change the upstream request's URI and headers (as APISIX's plugin)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

from twisted.web.http_headers import Headers
from zope.interface import implementer

from openaigw.config import PluginOptions
from openaigw.exchange import Exchange
from openaigw.http_syntax import TOKEN
from openaigw.interfaces import IPlugin, IRequestFilter

_FORBIDDEN = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection"))


@dataclass(frozen=True)
class RewriteSettings:
    uri: Optional[bytes] = None
    set: Tuple[Tuple[bytes, bytes], ...] = ()
    add: Tuple[Tuple[bytes, bytes], ...] = ()
    remove: Tuple[bytes, ...] = ()


@implementer(IRequestFilter)
class RewriteFilter:
    """Applies one route's rewrite: remove, then set, then add headers; then the URI.

    A new URI without a query keeps the client's query string; one with a query
    replaces it.
    """

    def __init__(self, settings: RewriteSettings) -> None:
        self._settings = settings

    def filter_request(self, exchange: Exchange) -> None:
        headers: Headers = exchange.headers
        for name in self._settings.remove:
            headers.removeHeader(name)
        for name, value in self._settings.set:
            headers.setRawHeaders(name, [value])
        for name, value in self._settings.add:
            headers.addRawHeader(name, value)
        uri = self._settings.uri
        if uri is not None:
            _, question, query = exchange.path.partition(b"?")
            exchange.path = uri if b"?" in uri or not question else uri + b"?" + query


@implementer(IPlugin)
class ProxyRewrite:
    name = "proxy-rewrite"
    priority = 900  # after authentication and limits, which read the client's headers
    scopes = ("route",)

    def parse(self, options: PluginOptions) -> Optional[RewriteSettings]:
        uri = None
        sets = []
        adds = []
        remove: Tuple[bytes, ...] = ()
        for option in options.options():
            value = options.get(option) or ""
            if option == "uri":
                value = value.strip()
                if not value.startswith("/") or any(c.isspace() for c in value):
                    raise options.error(option, "expected a path starting with '/'")
                uri = value.encode("utf-8")
            elif option == "headers.remove":
                names = value.split()
                for name in names:
                    self._check_name(options, option, name, options.section.written(options.key(option), name))
                remove = tuple(name.lower().encode("ascii") for name in names)
            elif option.startswith(("headers.set.", "headers.add.")):
                header = option.split(".", 2)[2]
                self._check_name(options, option, header, header)
                if "\r" in value or "\n" in value:
                    raise options.error(option, "a header value cannot span lines")
                pair = (header.encode("ascii"), value.strip().encode("utf-8"))
                (sets if option.startswith("headers.set.") else adds).append(pair)
            else:
                raise options.error(
                    option,
                    "unknown option (known: uri, headers.set.NAME, headers.add.NAME, headers.remove)",
                )
        return RewriteSettings(uri, tuple(sets), tuple(adds), remove)

    @staticmethod
    def _check_name(options: PluginOptions, option: str, name: str, shown: str) -> None:
        """Check the header ``name`` (``shown`` in messages: as written in the file)."""
        if not TOKEN.fullmatch(name):
            raise options.error(option, f"{shown!r} is not a header name")
        if name.lower().encode("ascii") in _FORBIDDEN:
            raise options.error(option, f"{shown} is set by the gateway itself (see pass_host)")

    def create(self, settings: RewriteSettings, runtime: Any, scope: str) -> RewriteFilter:
        return RewriteFilter(settings)
