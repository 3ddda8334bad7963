"""Errors the gateway answers itself, as OpenAI-shaped JSON bodies."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import TYPE_CHECKING, List, Mapping, Optional

from twisted.web.http import NO_BODY_CODES

if TYPE_CHECKING:
    from openaigw.server import GatewayRequest


class GatewayError(Exception):
    """An answer the gateway gives instead of the upstream's."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "gateway_error",
        code: Optional[str] = None,
        param: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
        reason: Optional[str] = None,
        limit: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.reason = reason or code or type  # for the access log and metrics
        self.limit = limit  # the limit plugin that rejected the request

    def body(self) -> bytes:
        """``{"error": {"message", "type", "param", "code"}}`` as bytes."""
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode("utf-8") + b"\n"


def write_error(
    request: GatewayRequest, error: GatewayError, extra: Optional[Mapping[bytes, List[bytes]]] = None
) -> None:
    """Send ``error`` as the whole response and finish the request; ``extra`` headers
    (a limit's X-RateLimit-*, say) go with it."""
    record = request.context.record
    record.error = error.reason
    record.limit = error.limit
    body = error.body()
    request.setResponseCode(error.status, phrase(error.status))
    headers = request.responseHeaders
    headers.removeHeader(b"server")
    if error.status in NO_BODY_CODES:  # (a limit's rejected_code): no body, none announced
        body = b""
    else:
        headers.setRawHeaders(b"content-type", [b"application/json"])
        headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
    for name, value in error.headers.items():
        headers.setRawHeaders(name.encode("ascii"), [value.encode("latin-1")])
    for raw_name, raw_values in (extra or {}).items():
        headers.setRawHeaders(raw_name, raw_values)
    if request.method != b"HEAD" and body:
        request.write(body)
    request.finish()


def phrase(status: int) -> bytes:
    """The reason phrase for ``status`` (a limit's ``rejected_code`` may be any of 200-599)."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown Status"


def raw_response(error: GatewayError) -> bytes:
    """``error`` as a whole HTTP/1.1 response that closes the connection, for answers
    written to the connection directly (the request got no further than its head
    or body, or the connection none at all)."""
    body = error.body()
    extra = b"".join(
        b"%s: %s\r\n" % (name.encode("ascii"), value.encode("latin-1"))
        for name, value in error.headers.items()
        if name.lower() != "connection"
    )
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%sConnection: close\r\n\r\n%s" % (
        error.status, phrase(error.status), len(body), extra, body)


def bad_request(message: str, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", code)


def request_timeout(part: str) -> GatewayError:
    """408: the request's ``part`` ("header" or "body") did not arrive in time."""
    return GatewayError(
        408, f"The request {part} took too long to arrive", "invalid_request_error",
        "request_timeout", reason=f"client_{part}_timeout",
    )


def header_too_large() -> GatewayError:
    return GatewayError(
        431, "The request's header fields are too large", "invalid_request_error",
        "request_header_fields_too_large",
    )


def uri_too_long() -> GatewayError:
    return GatewayError(414, "The request URI is too long", "invalid_request_error", "uri_too_long")


def too_many_connections(limit: int) -> GatewayError:
    return GatewayError(
        503, f"The gateway has {limit} connections open, its limit: retry later",
        "server_error", "too_many_connections", headers={"Retry-After": "1"},
    )


def not_found(path: str) -> GatewayError:
    return GatewayError(404, f"No route for {path}", "invalid_request_error", "route_not_found")


def method_not_allowed(method: str, allowed: str) -> GatewayError:
    return GatewayError(
        405,
        f"Method {method} is not allowed here (allowed: {allowed})",
        "invalid_request_error",
        "method_not_allowed",
        headers={"Allow": allowed},
    )


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"The request body exceeds the gateway's limit of {limit} bytes",
        "invalid_request_error",
        "request_too_large",
        headers={"Connection": "close"},
    )


def bad_gateway(message: str, reason: str) -> GatewayError:
    return GatewayError(502, message, "upstream_error", "bad_gateway", reason=f"upstream_{reason}")


def gateway_timeout(message: str) -> GatewayError:
    return GatewayError(504, message, "upstream_error", "gateway_timeout", reason="upstream_timeout")


def internal_error() -> GatewayError:
    """A bug in the gateway's own code."""
    return GatewayError(500, "Internal gateway error", "server_error")


class StateUnavailable(Exception):
    """The shared state (Redis) did not answer in time: limits cannot be checked."""


def state_unavailable() -> GatewayError:
    """``state_unavailable = reject``: the limits cannot be checked, so no request passes."""
    return GatewayError(
        503,
        "The gateway cannot check this request's limits right now (its shared state is"
        " unavailable). Please try again shortly.",
        "server_error",
        "gateway_state_unavailable",
        headers={"Retry-After": "1"},
    )
