"""Which headers cross the gateway, in each direction."""

from __future__ import annotations

from typing import Dict, FrozenSet

from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest

# RFC 9110 7.6.1 hop-by-hop headers, plus what the upstream client and Site write themselves.
HOP_BY_HOP: FrozenSet[bytes] = frozenset(
    (
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
        b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    )
)
# What the gateway itself tells the upstream: never taken from a client, on any route.
GATEWAY_OWNED: FrozenSet[bytes] = frozenset((b"x-consumer-username", b"x-forwarded-proto", b"x-forwarded-host"))
_NOT_FORWARDED = HOP_BY_HOP | GATEWAY_OWNED | {b"host", b"content-length", b"expect"}
_NOT_RETURNED = HOP_BY_HOP | {b"content-length"}


def connection_tokens(headers: Headers) -> FrozenSet[bytes]:
    """Header names listed in ``Connection`` (also hop-by-hop)."""
    tokens = set()
    for value in headers.getRawHeaders(b"connection", ()):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def _end_to_end(headers: Headers, excluded: FrozenSet[bytes], underscores: bool) -> Headers:
    tokens = connection_tokens(headers)
    dropped = excluded | tokens if tokens else excluded
    out = Headers()
    # Copied as stored (Headers' own dict, on every Twisted version): the values
    # were sanitised on their way in, and each name keeps the case this Twisted
    # stores it in; setRawHeaders would normalise both again, header by header.
    kept = out._rawHeaders
    for name, values in headers._rawHeaders.items():
        if name.lower() not in dropped and (underscores or b"_" not in name):
            kept[name] = list(values)
    return out


def request_headers(request: IRequest, scheme: bytes, client: str, underscores: bool = False) -> Headers:
    """The client's end-to-end headers plus ``X-Forwarded-*`` (Host is set later);
    ``client`` is the client's address ("" on a UNIX socket: not added).  Names with
    an underscore are dropped unless ``underscores`` (as nginx does by default: an
    upstream may read ``X_Consumer_Username`` as ``X-Consumer-Username``)."""
    out = _end_to_end(request.requestHeaders, _NOT_FORWARDED, underscores)
    if client:
        forwarded = out.getRawHeaders(b"x-forwarded-for", [])
        prior = b", ".join(forwarded)
        address = client.encode("ascii")
        out.setRawHeaders(b"x-forwarded-for", [prior + b", " + address if prior else address])
    out.setRawHeaders(b"x-forwarded-proto", [scheme])
    host = request.requestHeaders.getRawHeaders(b"host")
    if host:
        out.setRawHeaders(b"x-forwarded-host", [host[0]])
    return out


def response_headers(upstream: Headers) -> Headers:
    """The upstream's end-to-end response headers: ``upstream`` itself, its hop-by-hop
    headers removed (the answer's headers are the gateway's to change: no copy)."""
    tokens = connection_tokens(upstream)
    dropped = _NOT_RETURNED | tokens if tokens else _NOT_RETURNED
    for name in [name for name, _ in upstream.getAllRawHeaders() if name.lower() in dropped]:
        upstream.removeHeader(name)
    return upstream


_STORED: Dict[bytes, bytes] = {}  # a name the gateway sets -> the key Headers stores it under


def set_own(headers: Headers, name: bytes, value: bytes) -> None:
    """``headers.setRawHeaders(name, [value])`` for a header the gateway makes itself
    (a name from our own code, a value with no line breaks): the name is looked up
    once in the form this Twisted stores it (lower case before 23, Header-Case since),
    not encoded and sanitised again for every request."""
    stored = _STORED.get(name)
    if stored is None:
        probe = Headers()
        probe.setRawHeaders(name, [b""])
        (stored,) = probe._rawHeaders
        _STORED[name] = stored
    headers._rawHeaders[stored] = [value]
