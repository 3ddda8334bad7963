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


class IPlugin(Interface):
    """A feature configured by ``name.option`` keys of a route section."""

    name = Attribute("The key prefix that configures the plugin, e.g. 'proxy-rewrite'.")
    priority = Attribute(
        "Order among a route's plugins, lowest first (auth before limits before rewrites)."
    )
    scopes = Attribute("Where it may be configured: 'route' and/or 'consumer' sections.")

    def parse(options):  # type: ignore[no-untyped-def]
        """Validate :class:`openaigw.config.PluginOptions`; return frozen settings.

        Return ``None`` when the options leave the plugin off.  Raise the
        ``ConfigError`` made by ``options.error(option, message)`` for bad input.
        """

    def create(settings, runtime, scope):  # type: ignore[no-untyped-def]
        """Build the filter (providing IRequestFilter).

        ``runtime`` is the :class:`openaigw.runtime.Runtime` (clock, shared state);
        ``scope`` names the section, e.g. ``route:openai-chat`` or ``consumer:team-a``.
        """


class IBalancer(Interface):
    """Chooses the upstream node for each attempt."""

    def pick(excluded):  # type: ignore[no-untyped-def]
        """Return the next :class:`openaigw.config.Node` not in ``excluded``, or None."""


class IWindowCounters(Interface):
    """Fixed-window counters (limit-count requests, ai-rate-limiting tokens).

    Windows are aligned to multiples of their length, so instances sharing a store
    agree on them.  Implementations drop expired windows.  Every method returns its
    answer, or a Deferred of it: a shared store (Redis) answers later, and fails the
    Deferred with :class:`openaigw.errors.StateUnavailable` when it cannot answer; the
    memory store answers at once.  Callers handle both (``LimitFilter._then``).
    """

    def peek(key, window):  # type: ignore[no-untyped-def]
        """``(count, seconds_to_reset)`` for ``key``'s current window."""

    def add(key, window, amount):  # type: ignore[no-untyped-def]
        """Add ``amount`` to ``key``'s current window: ``(count, seconds_to_reset)``
        after the addition, in one atomic step."""


class ILeakyBuckets(Interface):
    """Leaky buckets for limit-req (nginx's limit_req semantics); answering as
    IWindowCounters."""

    def take(key, rate, burst):  # type: ignore[no-untyped-def]
        """Admit one request: ``(True, delay)``, or ``(False, retry_after)`` when over the burst."""


class IConcurrency(Interface):
    """Counts requests in flight per key (limit-conn); answering as IWindowCounters.

    A shared store must not keep the slots of a gateway that died: it leases them.
    """

    def acquire(key, limit):  # type: ignore[no-untyped-def]
        """Take a slot for ``key``: True, or False when ``limit`` are already taken."""

    def release(key):  # type: ignore[no-untyped-def]
        """Give back a slot taken by ``acquire`` (never fails)."""


class IRequestObserver(Interface):
    """Told about every finished request (the access log, the metrics)."""

    def request_finished(record):  # type: ignore[no-untyped-def]
        """``record`` is the request's :class:`openaigw.accesslog.AccessRecord`."""


class ICacheStore(Interface):
    """Cached answers by key: binary values that expire (the response cache).

    Both methods return Deferreds.  A store that fails errbacks; callers treat
    that as a miss (or a value not kept), never as an error for the client.
    """

    def get(key):  # type: ignore[no-untyped-def]
        """Fire with the bytes stored under ``key``, or None (never stored, expired, evicted)."""

    def set(key, value, ttl):  # type: ignore[no-untyped-def]
        """Keep ``value`` under ``key`` for ``ttl`` seconds; fire with None once stored."""


class IObjectStore(Interface):
    """Where the Admin API keeps its objects (routes, upstreams, consumers).

    Objects are JSON values by kind and id: ``{"routes": {"ID": {...}}, ...}``.
    """

    def load():  # type: ignore[no-untyped-def]
        """Return the objects kept; raise :class:`openaigw.admin.store.StateError` if
        what is kept cannot be read."""

    def put(kind, id, value):  # type: ignore[no-untyped-def]
        """Keep ``value``; return a Deferred that fires once it is durable."""

    def delete(kind, id):  # type: ignore[no-untyped-def]
        """Forget an object; return a Deferred that fires once that is durable."""

    def replace(objects):  # type: ignore[no-untyped-def]
        """Keep exactly ``objects``; return a Deferred that fires once that is durable."""


class ISharedObjectStore(IObjectStore):
    """An object store several gateways share: changes may come from the others.

    ``put``, ``delete`` and ``replace`` fail with a ``StoreError`` (409) when another
    gateway changed the objects since this one last saw them.
    """

    def start(sync):  # type: ignore[no-untyped-def]
        """Call ``sync()`` (which returns a Deferred) now and then, until ``stop``."""

    def stop():  # type: ignore[no-untyped-def]
        """Stop calling ``sync``."""

    def fetch():  # type: ignore[no-untyped-def]
        """A coroutine: ``(objects, revision)`` newer than those last seen, or None."""

    def accept(objects, revision):  # type: ignore[no-untyped-def]
        """A coroutine: ``objects`` (of ``revision``) are served now."""

    def refuse(revision, why):  # type: ignore[no-untyped-def]
        """Revision ``revision`` cannot be served here (``why`` is logged once); true
        the first time it is refused."""
