"""The answer's head as GatewayRequest writes it (in one piece, from the stored headers)
is what Twisted's own ``Request.write`` would write, on every Twisted version: status
line, header names in Twisted's case, chunked framing, bodiless answers, the fall back
to Twisted's path for what only it does."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, List, Sequence, Tuple

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from openaigw.accesslog import AccessRecord
from openaigw.headers import sent_name, serialize_head, stored_name
from openaigw.server import GatewayRequest
from tests.memory import Gateway, post, response

Fields = Sequence[Tuple[bytes, List[bytes]]]


class Writes(StringTransport):
    """A transport that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: List[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def channel_on(transport: StringTransport) -> Any:
    channel = HTTPChannel()
    channel.site = Site(Resource())
    channel.makeConnection(transport)
    return channel


def gateway_request(channel: Any) -> GatewayRequest:
    request = GatewayRequest(channel)
    request.context = SimpleNamespace(record=AccessRecord(started=0.0))
    request._site = SimpleNamespace(clock=Clock())
    return request


def answer(request_class: Any, method: bytes, version: bytes, code: int, fields: Fields,
           writes: Sequence[bytes], raw: Fields = ()) -> Tuple[bytes, Any]:
    """What ``request_class`` writes for this answer (``raw``: stored as they are, not
    through setRawHeaders), and the request."""
    transport = StringTransport()
    channel = channel_on(transport)
    request = gateway_request(channel) if request_class is GatewayRequest else request_class(channel)
    request.defaultContentType = None  # (as GatewayRequest)
    channel.requests.append(request)
    request.method, request.clientproto = method, version
    request.setResponseCode(code)
    for name, values in fields:
        request.responseHeaders.setRawHeaders(name, values)
    for name, values in raw:
        request.responseHeaders._rawHeaders[stored_name(name)] = values
    for data in writes:
        request.write(data)
    request.finish()
    return transport.value(), request


def normalised(written: bytes) -> Tuple[bytes, List[bytes], bytes]:
    """Status line, header lines in order of name (Twisted 22.4 writes its
    Transfer-Encoding first, later versions last), body."""
    head, _, body = written.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return status, sorted(lines), body


CL = (b"Content-Length", [b"3"])
CT = (b"Content-Type", [b"application/json"])
CASES = {
    "length": (b"POST", b"HTTP/1.1", 200, [CT, CL], [b"abc"]),
    "length, several writes": (b"POST", b"HTTP/1.1", 200, [CL], [b"a", b"", b"bc"]),
    "chunked": (b"POST", b"HTTP/1.1", 200, [CT], [b"ab", b"cd", b""]),
    "chunked, head only then chunks": (b"POST", b"HTTP/1.1", 200, [CT], [b"", b"ab"]),
    "empty chunked": (b"GET", b"HTTP/1.1", 200, [], []),
    "HEAD keeps its length": (b"HEAD", b"HTTP/1.1", 200, [(b"Content-Length", [b"10"])], [b"x"]),
    "HEAD without length": (b"HEAD", b"HTTP/1.1", 200, [CT], [b"x", b"y"]),
    "204": (b"GET", b"HTTP/1.1", 204, [CT], [b"x"]),
    "304": (b"GET", b"HTTP/1.1", 304, [(b"ETag", [b'"v1"'])], [b"x"]),
    "HTTP/1.0, no length": (b"GET", b"HTTP/1.0", 200, [CT], [b"ab", b"cd"]),
    "Twisted's special cases and repeats": (
        b"GET", b"HTTP/1.1", 401,
        [(b"www-authenticate", [b"Bearer", b"Basic"]), (b"content-md5", [b"x"]), (b"x-xss-protection", [b"0"]),
         (b"te", [b"trailers"]), (b"X-Ratelimit-Remaining-Tokens", [b"9"]), CL],
        [b"abc"],
    ),
    "a status without a phrase of Twisted's": (b"GET", b"HTTP/1.1", 599, [CL], [b"abc"]),
}


@pytest.mark.parametrize("case", CASES)
def test_written_as_twisted_writes_it(case):
    method, version, code, fields, writes = CASES[case]
    ours, request = answer(GatewayRequest, method, version, code, fields, writes)
    theirs, reference = answer(Request, method, version, code, fields, writes)
    assert normalised(ours) == normalised(theirs)
    assert (request.sentLength, request.chunked) == (reference.sentLength, reference.chunked)
    if case.startswith("length"):
        assert ours.endswith(b"\r\n\r\nabc")


def test_head_and_first_bytes_written_at_once():
    transport = Writes()
    request = gateway_request(channel_on(transport))
    request.method, request.clientproto = b"GET", b"HTTP/1.1"
    request.responseHeaders.setRawHeaders(b"content-length", [b"2"])
    request.write(b"ok")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n%s: 2\r\n\r\nok" % sent_name(stored_name(b"content-length"))]


@pytest.mark.parametrize("value", [b"a\rb", b"a\nb", b"a\r\nX-Injected: 1"])
def test_a_value_with_a_line_break_is_left_to_twisted(value):
    """Values the gateway stores itself are sound; one that is not goes through
    Twisted's path, which this Twisted cleans (or not) as it always has."""
    raw = [(b"x-odd", [value])]
    ours, request = answer(GatewayRequest, b"GET", b"HTTP/1.1", 200, [CL], [b"abc"], raw)
    theirs, _ = answer(Request, b"GET", b"HTTP/1.1", 200, [CL], [b"abc"], raw)
    assert ours == theirs
    assert request.responseHeaders.getRawHeaders(b"transfer-encoding") is None


def test_what_only_twisted_does_goes_its_way():
    transport = StringTransport()
    request = gateway_request(channel_on(transport))
    request.method, request.clientproto = b"GET", b"HTTP/1.1"
    request.addCookie(b"a", b"b")
    request.setETag(b"v1")
    request.write(b"x")
    written = transport.value()
    assert b"Set-Cookie: a=b\r\n" in written and b'ETag: v1\r\n' in written


def test_serialize_head():
    fields = {stored_name(b"content-type"): [b"text/plain"], stored_name(b"x-a"): [b"1", b"2"]}
    assert serialize_head(b"HTTP/1.1 200 OK\r\n", fields) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-A: 1\r\nX-A: 2\r\n\r\n")
    assert serialize_head(b"HTTP/1.1 200 O\rK\r\n", {}) is None
    assert serialize_head(b"HTTP/1.1 200 OK\r\n", {stored_name(b"x-a"): [b"1\n"]}) is None


def test_proxied_answers_end_to_end():
    """Through the gateway: a HEAD keeps the upstream's length and gets no body, a
    request asking to close gets Connection: close and the connection closes."""
    gw = Gateway()
    channel, client = gw.client(b"HEAD /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")
    gw.upstream().send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 42\r\n\r\n")
    head = client.value()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert b"Content-Length: 42\r\n" in head and b"Transfer-Encoding" not in head
    client.clear()
    channel.dataReceived(post(b"/v1/files", b"{}", b"Connection: close\r\n"))
    gw.upstream().send(response(body=b'{"ok":1}'))
    written = client.value()
    assert b"Connection: close\r\n" in written and written.endswith(b'\r\n\r\n{"ok":1}')
    assert client.disconnecting
