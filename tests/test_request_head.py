"""The client's request head read whole and parsed in one pass (openaigw/head.py): the
same requests and refusals however the bytes are split into reads, pipelined requests,
each strictness rule and the size limits, on every Twisted version."""

from __future__ import annotations

import json
import re
from typing import Iterable, List, Tuple

import pytest
from twisted.web.http_headers import Headers

from openaigw.head import MAX_HEAD_SIZE, MAX_HEADERS, InvalidHead, parse_head
from tests.memory import Gateway, post, response

CHAT = b"/v1/chat/completions"
BODY = b'{"model": "gpt-4o-mini", "messages": []}'
GET = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Request-Id: get-1\r\n\r\n"


def served(chunks: Iterable[bytes]) -> Tuple[bytes, bytes, List[tuple]]:
    """Send ``chunks`` as reads on one client connection, answer every request that
    reaches an upstream node; return what the client got, what the upstream nodes got
    (without request ids the gateway made) and the access records."""
    gw = Gateway()
    channel, client = gw.client()
    for chunk in chunks:
        channel.dataReceived(chunk)
    answered: dict = {}
    progress = True
    while progress:
        progress = False
        for index in range(len(gw.reactor.tcpClients)):
            upstream = gw.upstream(index)
            if upstream.received().count(b" HTTP/1.1\r\n") > answered.get(index, 0):
                answered[index] = answered.get(index, 0) + 1
                upstream.send(response())
                progress = True
    sent = b"".join(gw.upstream(i).received() for i in range(len(gw.reactor.tcpClients)))
    made = re.compile(rb"X-Request-Id: [0-9a-f]{32}\r\n")  # (random, when the client gave none)
    return (made.sub(b"", client.value()), made.sub(b"", sent),
            [(r.status, r.error, r.method, r.path) for r in gw.records])


def statuses(answers: bytes) -> List[bytes]:
    return re.findall(rb"HTTP/1\.[01] ([0-9]{3}) ", answers)


def error_of(answers: bytes) -> dict:
    return json.loads(answers.partition(b"\r\n\r\n")[2])["error"]


STREAMS = {
    "pipelined, IE's CRLF between": post(CHAT, BODY, b"X-Request-Id: post-1\r\n") + b"\r\n" + GET,
    "chunked body then pipelined": (
        b"POST /v1/files HTTP/1.1\r\nHost: gw\r\nX-Request-Id: post-2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n" + GET),
    "second head refused (obs-fold)": GET + b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-A: 1\r\n folded\r\n\r\n",
    "first head refused (bad Content-Length)": post(CHAT, BODY).replace(b"Content-Length: ", b"Content-Length: +") + GET,
}
EXPECTED = {
    "pipelined, IE's CRLF between": [b"200", b"200"],
    "chunked body then pipelined": [b"200", b"200"],
    "second head refused (obs-fold)": [b"200", b"400"],
    "first head refused (bad Content-Length)": [b"400"],
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_same_result_whole_byte_by_byte_and_split_anywhere(name):
    """A stream of requests fed in one read, a byte a read, and split in two at every
    offset gives the same answers, upstream requests and access records."""
    data = STREAMS[name]
    whole = served([data])
    assert statuses(whole[0]) == EXPECTED[name]
    assert whole[1].count(b" HTTP/1.1\r\n") == EXPECTED[name].count(b"200")
    assert served([data[i:i + 1] for i in range(len(data))]) == whole
    for at in range(1, len(data)):
        assert served([data[:at], data[at:]]) == whole, at


def test_chunked_body_reaches_the_upstream_whole():
    """The chunked body is decoded by Twisted's decoder and sent on with its length."""
    answers, sent, _ = served([STREAMS["chunked body then pipelined"]])
    assert b"Content-Length: 5\r\n" in sent and b"\r\n\r\nhello" in sent
    assert b"GET /v1/models HTTP/1.1\r\n" in sent


def test_many_pipelined_requests_answered_at_once():
    """Hundreds of pipelined requests with bodies, each answered by the gateway itself
    while the read is being parsed (bytes replayed beneath the read are queued, not
    parsed recursively): all answered, in order."""
    request = b"POST /v2/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}"
    answers, _, records = served([request * 300])
    assert statuses(answers) == [b"404"] * 300
    assert len(records) == 300


@pytest.mark.parametrize("connection", [
    b"close", b"Close", b"keep-alive, close", b"close,keep-alive", b"keep-alive,\tclose",
])
def test_connection_close_ends_the_connection_after_its_answer(connection):
    """A request whose Connection list holds close is the last: its answer says so, and
    what follows it is not served."""
    gw = Gateway()
    channel, client = gw.client(post(CHAT, BODY, b"Connection: " + connection + b"\r\n") + GET)
    gw.upstream().send(response())
    assert statuses(client.value()) == [b"200"] and client.disconnecting
    assert b"\r\nConnection: close\r\n" in client.value()
    assert gw.upstream().received().count(b" HTTP/1.1\r\n") == 1


@pytest.mark.parametrize("connection", [b"keep-alive", b"Keep-Alive, Upgrade", b"closed"])
def test_connection_without_close_stays_open(connection):
    gw = Gateway()
    channel, client = gw.client(post(CHAT, BODY, b"Connection: " + connection + b"\r\n"))
    gw.upstream().send(response())
    assert statuses(client.value()) == [b"200"] and not client.disconnecting
    assert b"Connection: close" not in client.value()


def test_expect_100_continue_answered_before_the_body():
    """Expect: 100-continue on HTTP/1.1 gets Twisted's 100 Continue; on HTTP/1.0 not."""
    gw = Gateway()
    _, client = gw.client(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n"
                          b"Expect: 100-continue\r\n\r\n" % len(BODY))
    assert client.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    _, client = gw.client(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n"
                          b"Expect: 100-continue\r\n\r\n" % len(BODY))
    assert client.value() == b""


@pytest.mark.parametrize("head, why", [
    (b"GET  /v1/models HTTP/1.1", "single spaces"),
    (b"GET\t/v1/models HTTP/1.1", "single spaces"),
    (b"GET /v1/models HTTP/1.1 ", "single spaces"),
    (b" GET /v1/models HTTP/1.1", "single spaces"),
    (b"GET /v1/models", "single spaces"),
    (b"GET /v1/models http/1.1", "HTTP/1.0 and HTTP/1.1"),
    (b"GET /v1/models HTTP/2.0", "HTTP/1.0 and HTTP/1.1"),
    (b"GET /v1/models HTTP/1.10", "HTTP/1.0 and HTTP/1.1"),
    (b"G@T /v1/models HTTP/1.1", "token"),
    (b"GET /v1/mod\x7fels HTTP/1.1", "visible ASCII"),
    (b"GET /v1/mod\xb0els HTTP/1.1", "visible ASCII"),
    (b"GET /v1/models HTTP/1.1\r\nX-A : 1", "token"),
    (b"GET /v1/models HTTP/1.1\r\nX-A\t: 1", "token"),
    (b"GET /v1/models HTTP/1.1\r\n: 1", "token"),
    (b"GET /v1/models HTTP/1.1\r\nX-A: 1\r\n folded", "obs-fold"),
    (b"GET /v1/models HTTP/1.1\r\nX-A: 1\r\n\tfolded", "obs-fold"),
    (b"GET /v1/models HTTP/1.1\r\n X-A: 1", "obs-fold"),
    (b"GET /v1/models HTTP/1.1\r\nNo colon", "no colon"),
    (b"GET /v1/models HTTP/1.1\r\nX-A: 1\x002", "NUL, CR or LF"),
    (b"GET /v1/models HTTP/1.1\r\nX-A: 1\r2", "NUL, CR or LF"),
    (b"GET /v1/models HTTP/1.1\r\nX-A: 1\n2", "NUL, CR or LF"),
    (b"GET /v1/models HTTP/1.1\r\nX-A: 1\nX-B: 2", "NUL, CR or LF"),
    (b"GET /v1/models HTTP/1.1\nX-A: 1", "single spaces"),
    (b"POST / HTTP/1.1\r\nContent-Length: +1", "not a number"),
    (b"POST / HTTP/1.1\r\nContent-Length: -1", "not a number"),
    (b"POST / HTTP/1.1\r\nContent-Length: 1,1", "not a number"),
    (b"POST / HTTP/1.1\r\nContent-Length: 1 1", "not a number"),
    (b"POST / HTTP/1.1\r\nContent-Length: 0x10", "not a number"),
    (b"POST / HTTP/1.1\r\nContent-Length: ", "not a number"),
    (b"POST / HTTP/1.1\r\nContent-Length: 1234567890123456789", "not a number"),
    (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1", "more than one Content-Length"),
    (b"POST / HTTP/1.1\r\ncontent-length: 1\r\nContent-Length: 2", "more than one Content-Length"),
    (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked", "both"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1", "both"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: identity", "single chunked"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked", "single chunked"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked", "single chunked"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked", "single chunked"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked", "single chunked"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nhost: b", "more than one Host"),
    (b"GET / HTTP/1.1", "must have a Host header"),
    (b"GET / HTTP/1.1\r\nX-Host: a", "must have a Host header"),
    (b"GET / HTTP/1.1" + b"\r\nX: 1" * (MAX_HEADERS + 1), "more than 500 header lines"),
])
def test_strictness(head, why):
    """Each rule, checked by the gateway itself on every Twisted version: the pure
    parse refuses the head with a 400 saying why, and so does the channel."""
    with pytest.raises(InvalidHead) as refused:
        parse_head(head)
    assert refused.value.error.status == 400 and why in refused.value.error.message
    answers, sent, records = served([head + b"\r\n\r\n"])
    assert statuses(answers) == [b"400"] and sent == b""
    assert why in error_of(answers)["message"]
    assert [status for status, *_ in records] == [400]


def test_refused_head_keeps_its_request_line_in_the_record():
    """A head refused for a header line is logged with its method and path."""
    _, _, records = served([b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n"])
    assert records == [(400, "invalid_request", "POST", "/v1/chat/completions")]


@pytest.mark.parametrize("head, length", [
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:  5 \t", 5),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 007", 7),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  Chunked ", None),
    (b"POST / HTTP/1.0\r\ncontent-length: 0", 0),
    (b"GET / HTTP/1.0", 0),  # (HTTP/1.0 needs no Host)
    (b"GET / HTTP/1.1\r\nhost: a", 0),
    (b"GET / HTTP/1.1\r\nHost: a" + b"\r\nX: 1" * (MAX_HEADERS - 1), 0),
])
def test_sound_heads_and_their_body_length(head, length):
    """What the rules let through, and the body's length each head gives."""
    assert parse_head(head).length == length


def test_fields_stored_as_this_twisted_stores_them():
    """The parsed fields are what Twisted's own Headers would hold (lower-case keys in
    22.4, canonical ones later): values in order, stripped, names in any case."""
    head = parse_head(b"GET /x?y HTTP/1.1\r\nHost: gw\r\ncontent-TYPE:  a/b \r\nX-A: 1\r\nx-a:\t2\r\n"
                      b"X-Empty:\r\nX-Title: caf\xc3\xa9\tbar")
    assert (head.method, head.target, head.version) == (b"GET", b"/x?y", b"HTTP/1.1")
    parsed = Headers()
    parsed._rawHeaders = head.fields
    expected = Headers()
    for name, value in [(b"Host", b"gw"), (b"content-TYPE", b"a/b"), (b"X-A", b"1"), (b"x-a", b"2"),
                        (b"X-Empty", b""), (b"X-Title", b"caf\xc3\xa9\tbar")]:
        expected.addRawHeader(name, value)
    assert parsed == expected
    assert parsed.getRawHeaders(b"x-a") == [b"1", b"2"]
    assert parsed.getRawHeaders("Content-Type") == ["a/b"]


def head_of_size(size: int, line: int = 0) -> bytes:
    """A GET head (without its CRLF CRLF) of exactly ``size`` bytes; ``line``: the
    request line's size, else a short one and the rest in a header line."""
    if line:
        request_line = b"GET /v1/" + b"a" * (line - len(b"GET /v1/ HTTP/1.0")) + b" HTTP/1.0"
        rest = size - line
        return request_line + (b"\r\nX: " + b"b" * (rest - 5) if rest else b"")
    start = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Big: "
    return start + b"b" * (size - len(start))


@pytest.mark.parametrize("head, status", [
    (head_of_size(MAX_HEAD_SIZE), b"200"),
    (head_of_size(MAX_HEAD_SIZE + 1), b"431"),
    (head_of_size(MAX_HEAD_SIZE, line=MAX_HEAD_SIZE), b"200"),
    (head_of_size(MAX_HEAD_SIZE + 1, line=MAX_HEAD_SIZE + 1), b"414"),
    (head_of_size(MAX_HEAD_SIZE + 6, line=MAX_HEAD_SIZE), b"431"),
], ids=["head-at", "head-over", "line-at", "line-over", "line-at-head-over"])
def test_limits_exactly_at_and_one_byte_over(head, status):
    """A head (request line and header lines with the CRLFs between them) of 16384
    bytes is served, one byte more is a 431, or a 414 when the request line alone is
    over; the same whole or a byte a read."""
    assert len(head) in (MAX_HEAD_SIZE, MAX_HEAD_SIZE + 1, MAX_HEAD_SIZE + 6)
    data = head + b"\r\n\r\n"
    whole = served([data])
    assert statuses(whole[0]) == [status]
    assert served([data[i:i + 1] for i in range(len(data))]) == whole


def test_head_without_end_refused_once_it_cannot_fit():
    """A head still without its blank line is refused as soon as no blank line to come
    could bring it within the limit, not before."""
    gw = Gateway()
    channel, client = gw.client()
    data = head_of_size(MAX_HEAD_SIZE + 3)
    channel.dataReceived(data)
    assert client.value() == b""
    channel.dataReceived(b"b")
    assert statuses(client.value()) == [b"431"]
    assert gw.records[-1].status == 431


@pytest.mark.parametrize("name", [b"X Bad", b"X\x00", b"Host ", b"", b"X\xc3\xa9"])
def test_stored_name_refuses_what_is_not_a_token(name: bytes) -> None:
    """The name cache parse_head trusts holds tokens only, whoever asks it."""
    from openaigw.headers import remembered_name, stored_name

    with pytest.raises(ValueError):
        stored_name(name)
    assert remembered_name(name) is None
    with pytest.raises(InvalidHead):
        parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n" + name + b": v")
