"""The request on its way through the gateway, as filters see and change it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from twisted.logger import Logger
from twisted.web.http_headers import Headers

from openaigw.context import RequestContext
from openaigw.usage import Usage, UsageMeter, estimate_prompt_tokens

if TYPE_CHECKING:
    from openaigw.cache.responses import CachedRequest
    from openaigw.server import GatewayRequest

log = Logger()
_UNPARSED = object()


@dataclass
class Exchange:
    """One client request and the upstream request being made from it.

    ``context`` is the client request's state (its access record, its normalised path).
    ``method``, ``path`` (with its query string), ``headers`` and ``body`` are what will
    be sent upstream; request filters change them in place.  Filters also name the
    ``consumer``, add ``response_headers`` (sent with the answer, the gateway's own
    errors included; named as :func:`openaigw.headers.stored_name` gives them, each
    with its list of values as ``Headers._rawHeaders`` holds them), and
    register callbacks to run when the exchange is over, however it ends.
    ``strip_usage``: the gateway, not the client, asked for the stream's usage chunk,
    which the client must not get.  ``meter`` reads the answer's token usage, and
    ``used`` is what it read, once the exchange is over.  ``cache`` is set when the
    response cache may answer the request.
    """

    request: GatewayRequest
    context: RequestContext
    route: str
    method: bytes
    path: bytes
    headers: Headers
    body: bytes
    consumer: Optional[str] = None
    response_headers: Dict[bytes, List[bytes]] = field(default_factory=dict)
    strip_usage: bool = False
    meter: Optional[UsageMeter] = None
    used: Optional[Usage] = None  # (set by complete: the usage, read once)
    node: Optional[str] = None  # the upstream node (last) tried
    retries: int = 0
    failures: List[str] = field(default_factory=list)  # "upstream node reason" of failed attempts
    cache: Optional[CachedRequest] = None
    _json: Any = _UNPARSED
    _on_complete: List[Callable[["Exchange"], None]] = field(default_factory=list)

    @property
    def client_address(self) -> str:
        return self.context.record.client or "unknown"

    def json(self) -> Any:
        """The request body as JSON (parsed once), or None if it is not JSON."""
        if self._json is _UNPARSED:
            try:
                self._json = json.loads(self.body) if self.body else None
            except (ValueError, RecursionError):
                self._json = None
        return self._json

    def set_json(self, value: Any) -> None:
        """Replace the body with ``value`` serialised."""
        self._json = value
        self.body = json.dumps(value, separators=(",", ":")).encode("utf-8")

    @property
    def usage(self) -> Optional[Usage]:
        """Tokens used by the answer (None when the upstream gave no answer)."""
        if self.meter is None:
            return None
        return self.meter.usage(lambda: estimate_prompt_tokens(self.json()))

    def failed_attempt(self, upstream: str, node: Optional[str], reason: str) -> None:
        """Note an attempt that failed (``node`` None: none could be tried) for the log."""
        self.failures.append(f"{upstream} {node or '-'} {reason}")

    def on_complete(self, callback: Callable[["Exchange"], None]) -> None:
        """Run ``callback(exchange)`` once the exchange is over."""
        self._on_complete.append(callback)

    def complete(self) -> None:
        """Note the answer's usage in ``used``, then run the completion callbacks (each
        once; one failing does not stop the rest)."""
        self.used = self.usage
        callbacks, self._on_complete = self._on_complete, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.failure("completion callback failed for route {route}", route=self.route)
