"""The client's request head, held to the same rules on every Twisted version.

Twisted's own checks differ by version (22.4 forwards UTF-8 in the request target, bare
CR and NUL in header values and names that are not tokens; later versions let bytes
127-176 through in the target), and an upstream may read such bytes differently from
the gateway: they are refused here.
"""

from __future__ import annotations

import re
from typing import Optional

from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

from openaigw.http_syntax import TOKEN_BYTES

_TARGET = re.compile(rb"[\x21-\x7e]+")  # visible ASCII: no controls, DEL or raw non-ASCII
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
# A whole header line as received: a token, ":", and a value without NUL, CR or LF
# (RFC 9110 5.5: what a recipient must refuse; other bytes pass, as through nginx).
_HEADER_LINE = re.compile(TOKEN_BYTES.pattern + rb":[^\x00\r\n]*")


def invalid_request_line(method: bytes, target: bytes, version: bytes) -> Optional[str]:
    """Why the request line is refused (a 400's message), or None if it is sound."""
    if TOKEN_BYTES.fullmatch(method) is None:
        return "The request method is not a valid token"
    if _TARGET.fullmatch(target) is None:
        return "The request target may only hold visible ASCII characters (percent-encode the rest)"
    if version not in _VERSIONS:
        return "Only HTTP/1.0 and HTTP/1.1 are served"
    return None


def invalid_header_line(line: bytes) -> Optional[str]:
    """Why a header line, as received, is refused, or None (for Twisted versions that
    do not refuse such lines themselves)."""
    if _HEADER_LINE.fullmatch(line) is not None:
        return None
    if TOKEN_BYTES.fullmatch(line.partition(b":")[0]) is None:
        return "A header name is not a valid token"
    return "A header value holds NUL, CR or LF"


class _ProbeRequest:
    requestHeaders: Headers

    def __init__(self) -> None:
        self.requestHeaders = Headers()


class _Probe(HTTPChannel):
    refused = False

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.refused = True


def _twisted_checks_header_lines() -> bool:
    """Whether Twisted's own header parsing refuses NUL, CR and LF in values and names
    that are not tokens (22.4 does not: its Headers turn CR and LF into spaces and keep
    the rest).  Asked once, of the code rather than of its version number."""
    for line in (b"X: a\rb", b"X: a\nb", b"X: a\x00b", b"X Y: a", b"X\x01Y: a", b"X\xc3\xa9: a"):
        probe = _Probe()
        probe.requests = [_ProbeRequest()]
        if probe.headerReceived(line) or not probe.refused:
            return False
    return True


TWISTED_CHECKS_HEADER_LINES = _twisted_checks_header_lines()
