"""The client's request head, parsed in one pass and held to the same rules on every
Twisted version.

twisted.web parses a head line by line, and its checks differ by version (22.4 splits
the request line at any whitespace, forwards UTF-8 in the request target, bare CR and
NUL in header values and names that are not tokens; later versions let bytes 127-176
through in the target; both unfold obs-fold lines and take ``Transfer-Encoding:
identity``).  An upstream may read such bytes differently from the gateway (request
smuggling): :func:`parse_head` refuses them all, on every version.
"""

from __future__ import annotations

import re
from typing import Dict, List, NamedTuple, Optional

from twisted.web.http import HTTPChannel

from openaigw import errors
from openaigw.headers import remembered_name, stored_name
from openaigw.http_syntax import TOKEN_BYTES

MAX_HEAD_SIZE: int = HTTPChannel.totalHeadersSize  # 16384, and Twisted's line limit too
"""The most bytes of a head: the request line and header lines with the CRLFs between
them (not the CRLF CRLF that ends the head, nor IE's extra CRLF before it)."""
MAX_HEADERS: int = HTTPChannel.maxHeaders  # 500
HEAD_END = b"\r\n\r\n"

_TARGET = re.compile(rb"[\x21-\x7e]+")  # visible ASCII: no controls, DEL or raw non-ASCII
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
_REQUEST_LINE = re.compile(b"(%s) (%s) (HTTP/1\\.[01])" % (TOKEN_BYTES.pattern, _TARGET.pattern))
# A header line: a token, ":", and a value without NUL, CR or LF (RFC 9110 5.5: what a
# recipient must refuse; other bytes pass, as through nginx).
_FIELD_LINE = re.compile(rb"%s:[^\x00\r\n]*" % TOKEN_BYTES.pattern)


class RequestHead(NamedTuple):
    """A sound request head."""

    method: bytes
    target: bytes
    version: bytes
    fields: Dict[bytes, List[bytes]]
    """Header values by name, keyed as this Twisted's ``Headers._rawHeaders`` is."""
    length: Optional[int]
    """The body's length: 0 for none, None for a chunked body."""


class InvalidHead(Exception):
    """A head refused with ``error``; ``method`` and ``target`` when its request line was
    sound (for the access record)."""

    def __init__(self, error: errors.GatewayError, method: bytes = b"", target: bytes = b"") -> None:
        super().__init__(error.message)
        self.error, self.method, self.target = error, method, target


_CONTENT_LENGTH = stored_name(b"content-length")
_TRANSFER_ENCODING = stored_name(b"transfer-encoding")
_HOST = stored_name(b"host")


def head_too_large(data: bytes) -> errors.GatewayError:
    """The refusal of a head over :data:`MAX_HEAD_SIZE` starting ``data`` (at least its
    first ``MAX_HEAD_SIZE + 2`` bytes): 414 if its request line alone is over, else 431."""
    if data.find(b"\r\n", 0, MAX_HEAD_SIZE + 2) == -1:
        return errors.uri_too_long()
    return errors.header_too_large()


def parse_head(head: bytes) -> RequestHead:
    """Parse a request's head: its bytes up to the CRLF CRLF that ends it.

    Raises :class:`InvalidHead` unless the request line is exactly ``method SP target
    SP version`` (a token, visible ASCII, HTTP/1.0 or 1.1) and each header line a token,
    ":" and a value without NUL, CR or LF (no obs-fold, no whitespace before the colon);
    at most :data:`MAX_HEADERS` header lines in at most :data:`MAX_HEAD_SIZE` bytes; one
    Host at most (and one in HTTP/1.1); the body's length given by at most one of a single ``Content-Length``
    (digits) or a single ``Transfer-Encoding: chunked``.  Values are stripped of
    surrounding spaces and tabs, as Twisted does.
    """
    if len(head) > MAX_HEAD_SIZE:
        raise InvalidHead(head_too_large(head))
    lines = head.split(b"\r\n")
    line = _REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        raise InvalidHead(errors.bad_request(_why_request_line(lines[0])))
    method, target, version = line.groups()
    count = len(lines) - 1
    if count > MAX_HEADERS:
        raise InvalidHead(errors.bad_request(f"The request has more than {MAX_HEADERS} header lines"),
                          method, target)
    # No NUL, and every CR and LF in one of the CRLFs split at (the request line has
    # none): counted over the whole head at once (a regex costs far more a byte).
    if len(head) - len(head.translate(None, b"\x00\r\n")) != 2 * count:
        raise InvalidHead(errors.bad_request(_why_header_lines(lines[1:])), method, target)
    fields: Dict[bytes, List[bytes]] = {}
    for field in lines[1:]:
        name, colon, value = field.partition(b":")
        key = remembered_name(name)  # (a name remembered is a token)
        if key is None or not colon:
            if not colon or TOKEN_BYTES.fullmatch(name) is None:
                raise InvalidHead(errors.bad_request(_why_header_lines(lines[1:])), method, target)
            key = stored_name(name)
        if key in fields:
            fields[key].append(value.strip(b" \t"))
        else:
            fields[key] = [value.strip(b" \t")]
    length: Optional[int] = 0
    codings = fields.get(_TRANSFER_ENCODING)
    lengths = fields.get(_CONTENT_LENGTH)
    hosts = fields.get(_HOST)
    why = None
    if codings is not None:
        if lengths is not None:
            why = "The request has both Content-Length and Transfer-Encoding"
        elif len(codings) > 1 or codings[0].lower() != b"chunked":
            why = "The only Transfer-Encoding served is a single chunked"
        length = None
    elif lengths is not None:
        if len(lengths) > 1:
            why = "The request has more than one Content-Length"
        elif not (lengths[0].isdigit() and len(lengths[0]) <= 18):  # (ASCII digits only)
            why = "The request's Content-Length is not a number"
        else:
            length = int(lengths[0])
    if hosts is not None and len(hosts) > 1:
        # RFC 9112 3.2: routes (hosts), the upstream's Host and a proxy in front could
        # each read another one.
        why = "The request has more than one Host header"
    elif why is None and hosts is None and version == b"HTTP/1.1":  # RFC 9112 3.2: 400 (as nginx)
        why = "An HTTP/1.1 request must have a Host header"
    if why is not None:
        raise InvalidHead(errors.bad_request(why), method, target)
    return RequestHead(method, target, version, fields, length)


def invalid_request_line(method: bytes, target: bytes, version: bytes) -> Optional[str]:
    """Why the request line is refused (a 400's message), or None if it is sound."""
    if TOKEN_BYTES.fullmatch(method) is None:
        return "The request method is not a valid token"
    if _TARGET.fullmatch(target) is None:
        return "The request target may only hold visible ASCII characters (percent-encode the rest)"
    if version not in _VERSIONS:
        return "Only HTTP/1.0 and HTTP/1.1 are served"
    return None


def _why_request_line(line: bytes) -> str:
    parts = line.split(b" ")
    if len(parts) != 3:
        return "The request line is not a method, a target and an HTTP version, separated by single spaces"
    return invalid_request_line(*parts) or "The request line could not be parsed"


def _why_header_lines(lines: List[bytes]) -> str:
    """Why the first unsound one of these header lines is refused."""
    for line in lines:
        if _FIELD_LINE.fullmatch(line) is not None:
            continue
        if line[:1] in (b" ", b"\t"):
            return "A header line may not start with whitespace (obs-fold)"
        name, colon, _ = line.partition(b":")
        if not colon:
            return "A header line has no colon"
        if TOKEN_BYTES.fullmatch(name) is None:
            return "A header name is not a valid token"
        break
    return "A header value holds NUL, CR or LF"
