"""Which headers cross the gateway, in each direction.

The request path reads and writes ``Headers._rawHeaders`` directly, under the names
:func:`stored_name` gives, with values known to be sound (parsed, or the gateway's
own): Headers' methods would encode the name and sanitise the values again at every
call, a dozen times a request.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional

from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest

from openaigw.http_syntax import TOKEN_BYTES


def _stored_name(name: bytes) -> bytes:
    """How this Twisted's Headers keys ``name``: asked of Headers itself."""
    probe = Headers()
    probe.setRawHeaders(name, [b""])
    return next(iter(probe._rawHeaders))


_STORED: Dict[bytes, bytes] = {}  # header names (any case) -> as Headers keys them
_MAX_STORED = 10_000  # (as Twisted's own cache: names a peer makes up cannot fill memory)


def stored_name(name: bytes) -> bytes:
    """``name`` as the key of ``Headers._rawHeaders`` on this Twisted: lower case in
    22.4, canonical Header-Case later (the same for every case of a name).  Raises
    ValueError if ``name`` is not a token: a name remembered is one."""
    key = _STORED.get(name)
    if key is None:
        if TOKEN_BYTES.fullmatch(name) is None:
            raise ValueError(f"not a header name: {name[:100]!r}")
        key = _stored_name(name)
        if len(_STORED) < _MAX_STORED:
            _STORED[name] = key
    return key


remembered_name = _STORED.get
"""``stored_name(name)`` if ``name`` was asked before (so is a token), else None."""


def _sent_name(key: bytes) -> bytes:
    """How this Twisted writes the header stored under ``key``: asked of Headers itself."""
    probe = Headers()
    probe._rawHeaders = {key: [b""]}
    return next(iter(probe.getAllRawHeaders()))[0]


# Whether Headers stores names as they are written (canonical Header-Case, from
# Twisted 22.8), or in lower case to be capitalised when written (22.4).
_STORED_AS_SENT = _sent_name(stored_name(b"x-request-id")) == stored_name(b"x-request-id")
_SENT: Dict[bytes, bytes] = {}  # stored names -> as written (lower-case storage only)


def sent_name(key: bytes) -> bytes:
    """The name Twisted's ``HTTPChannel.writeHeaders`` writes for the header stored
    under ``key`` (a key of ``Headers._rawHeaders``)."""
    if _STORED_AS_SENT:
        return key
    name = _SENT.get(key)
    if name is None:
        name = _sent_name(key)
        if len(_SENT) < _MAX_STORED:
            _SENT[key] = name
    return name


def add_field_lines(parts: List[bytes], fields: Dict[bytes, List[bytes]]) -> None:
    """Add the lines of ``fields`` (``Headers._rawHeaders``), named as Twisted writes
    them, to ``parts`` in pieces: name, ``: ``, value, CRLF (one join of the pieces
    costs less than formatting each line)."""
    for name, values in fields.items():
        if not _STORED_AS_SENT:
            name = sent_name(name)
        if len(values) == 1:
            parts += (name, b": ", values[0], b"\r\n")
        else:
            for value in values:
                parts += (name, b": ", value, b"\r\n")


def serialize_head(status_line: bytes, fields: Dict[bytes, List[bytes]]) -> Optional[bytes]:
    """An answer's head as Twisted's ``HTTPChannel.writeHeaders`` writes it:
    ``status_line`` (with its CRLF), then each of ``fields`` (``Headers._rawHeaders``)
    in order, then the blank line; in one join.  None if a line would hold a CR or
    LF of its own: such a head is left to Twisted's path (which cleans the values)."""
    parts = [status_line]
    add_field_lines(parts, fields)
    parts.append(b"\r\n")
    head = b"".join(parts)
    breaks = (len(parts) - 2) // 4 + 2  # the status line's, each field line's, the blank line's
    if head.count(b"\n") != breaks or head.count(b"\r") != breaks:
        return None
    return head


# RFC 9110 7.6.1 hop-by-hop headers, plus what the upstream client and Site write themselves.
HOP_BY_HOP: FrozenSet[bytes] = frozenset(
    (
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
        b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    )
)
# What the gateway itself tells the upstream: never taken from a client, on any route.
GATEWAY_OWNED: FrozenSet[bytes] = frozenset((b"x-consumer-username", b"x-forwarded-proto", b"x-forwarded-host"))
# (As stored: see _dropped.)
_NOT_FORWARDED = frozenset(map(stored_name, HOP_BY_HOP | GATEWAY_OWNED | {b"host", b"content-length", b"expect"}))
_NOT_RETURNED = frozenset(map(stored_name, HOP_BY_HOP | {b"content-length"}))
_CONNECTION = stored_name(b"connection")
_HOST = stored_name(b"host")
_X_FORWARDED_FOR = stored_name(b"x-forwarded-for")
_X_FORWARDED_PROTO = stored_name(b"x-forwarded-proto")
_X_FORWARDED_HOST = stored_name(b"x-forwarded-host")


def connection_tokens(headers: Headers) -> FrozenSet[bytes]:
    """Header names listed in ``Connection`` (also hop-by-hop), in lower case."""
    tokens = set()
    for value in headers._rawHeaders.get(_CONNECTION, ()):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def _dropped(headers: Headers, excluded: FrozenSet[bytes]) -> FrozenSet[bytes]:
    """``excluded`` (stored names) and the names ``headers``' Connection lists, as
    stored: Headers keys every name as :func:`stored_name` does, the same for every
    case of it, so a set of stored names finds them at C speed.  (What is not a token
    names no header.)"""
    if _CONNECTION not in headers._rawHeaders:
        return excluded
    listed = [stored_name(token) for token in connection_tokens(headers) if TOKEN_BYTES.fullmatch(token)]
    return excluded.union(listed)


def _forwarded(headers: Headers, underscores: bool) -> Headers:
    """A copy of ``headers`` less what is not forwarded (and names with an underscore,
    unless ``underscores``), each name as stored (the case this Twisted keeps it in)."""
    fields = headers._rawHeaders
    out = Headers()
    copied = dict(zip(fields, map(list, fields.values())))  # (copied whole, then the few dropped)
    for name in _dropped(headers, _NOT_FORWARDED).intersection(copied):
        del copied[name]
    if not underscores and b"_" in b"".join(copied):
        for name in [name for name in copied if b"_" in name]:
            del copied[name]
    out._rawHeaders = copied
    return out


def request_headers(request: IRequest, scheme: bytes, client: str, underscores: bool = False) -> Headers:
    """The client's end-to-end headers plus ``X-Forwarded-*`` (Host is set later);
    ``client`` is the client's address ("" on a UNIX socket: not added).  Names with
    an underscore are dropped unless ``underscores`` (as nginx does by default: an
    upstream may read ``X_Consumer_Username`` as ``X-Consumer-Username``)."""
    received = request.requestHeaders._rawHeaders
    out = _forwarded(request.requestHeaders, underscores)
    fields = out._rawHeaders
    if client:
        address = client.encode("ascii")
        prior = b", ".join(fields.get(_X_FORWARDED_FOR, ()))
        fields[_X_FORWARDED_FOR] = [prior + b", " + address if prior else address]
    fields[_X_FORWARDED_PROTO] = [scheme]
    host = received.get(_HOST)
    if host:
        fields[_X_FORWARDED_HOST] = [host[0]]
    return out


def response_headers(upstream: Headers) -> Headers:
    """The upstream's end-to-end response headers: ``upstream`` itself, its hop-by-hop
    headers removed (the answer's headers are the gateway's to change: no copy)."""
    fields = upstream._rawHeaders
    for name in _dropped(upstream, _NOT_RETURNED).intersection(fields):
        del fields[name]
    return upstream
