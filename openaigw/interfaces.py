"""Every zope interface of openaigw: the seams between the request path and its features."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IRequestFilter(Interface):
    """Sees, and may change, the request that will go upstream.

    Filters run in plugin priority order before the upstream is called.  A filter that
    wants to answer the client itself (401, 429, ...) raises
    :class:`openaigw.errors.GatewayError`.
    """

    def filter_request(exchange):  # type: ignore[no-untyped-def]
        """Inspect or change ``exchange`` (method, path, headers, body).

        Return ``None``, or an awaitable (a Deferred or coroutine) to delay the request.
        """


class IResponseFilter(Interface):
    """Sees, and may change, the upstream's response status and headers."""

    def filter_response(exchange, head):  # type: ignore[no-untyped-def]
        """Change ``head`` (an :class:`openaigw.exchange.ResponseHead`) in place."""


class IPlugin(Interface):
    """A feature configured by ``name.option`` keys of a route section."""

    name = Attribute("The key prefix that configures the plugin, e.g. 'proxy-rewrite'.")
    priority = Attribute(
        "Order among a route's plugins, lowest first (auth before limits before rewrites)."
    )

    def parse(options):  # type: ignore[no-untyped-def]
        """Validate :class:`openaigw.config.PluginOptions`; return frozen settings.

        Return ``None`` when the options leave the plugin off.  Raise the
        ``ConfigError`` made by ``options.error(option, message)`` for bad input.
        """

    def create(settings, reactor):  # type: ignore[no-untyped-def]
        """Build the filter object (providing IRequestFilter and/or IResponseFilter)."""


class IBalancer(Interface):
    """Chooses the upstream node for each attempt."""

    def pick(excluded):  # type: ignore[no-untyped-def]
        """Return the next :class:`openaigw.config.Node` not in ``excluded``, or None."""
