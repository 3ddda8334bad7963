"""The upstream HTTP/1.1 client in memory: a fake endpoint, StringTransports, a fake clock."""

from __future__ import annotations

import json
from typing import Any, List

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from openaigw.h1client import (
    MAX_HEAD,
    ChunkedDecoder,
    ConnectionPool,
    InvalidResponse,
    NoConnectionFree,
    ResponseTimeout,
    StaleConnection,
    parse_head,
    serialize_request,
)

from tests.memory import BASE_CONFIG, Gateway, post

KEY = "node"
READ_TIMEOUT = 30.0
QUEUE_TIMEOUT = 5.0
REQUEST = b"GET / HTTP/1.1\r\nHost: node\r\n\r\n"
DONE = Failure(ConnectionDone())
STRAY = b"HTTP/1.1 408 Request Timeout\r\n\r\n"  # what some servers send before closing idle connections
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\nA\r\n, world!!!\r\n0\r\nX-Trailer: t\r\n\r\n"
)


def ok(body: bytes = b"ok", headers: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return version + b" 200 OK\r\nContent-Length: %d\r\n" % len(body) + headers + b"\r\n" + body


class Endpoint:
    """Connects at once: each connection is a protocol on its own StringTransport."""

    def __init__(self) -> None:
        self.connections: List[Any] = []

    def connect(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.connections.append(protocol)
        return succeed(protocol)


class Body(Protocol):
    """A body's consumer: what it received, and how the body ended."""

    def __init__(self) -> None:
        self.data: List[bytes] = []
        self.reason: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = DONE) -> None:
        self.reason = reason

    @property
    def body(self) -> bytes:
        return b"".join(self.data)


class Pool:
    """A ConnectionPool to one node over an :class:`Endpoint` and a fake clock."""

    def __init__(self, max_idle: int = 2, idle_timeout: float = 10.0, max_connections: int = 0) -> None:
        self.reactor = MemoryReactorClock()
        self.endpoint = Endpoint()
        self.pool = ConnectionPool(
            self.reactor, {KEY: self.endpoint}, max_idle, idle_timeout, max_connections, QUEUE_TIMEOUT
        )

    def ask(self, head_only: bool = False) -> "Call":
        return Call(self, head_only)

    def served(self, answer: bytes = ok()) -> "Call":
        """A request answered with ``answer``, its body consumed."""
        call = self.ask()
        call.answer(answer)
        call.deliver()
        return call


class Call:
    """One request through the pool: the connection it was written on, and its outcome."""

    def __init__(self, harness: Pool, head_only: bool) -> None:
        connections = harness.endpoint.connections
        before = {c: len(c.transport.value()) for c in connections}
        self.deferred = harness.pool.request(KEY, [REQUEST], head_only, READ_TIMEOUT)
        [self.connection] = [c for c in connections if len(c.transport.value()) > before.get(c, -1)]
        assert self.connection.transport.value().endswith(REQUEST)
        self.reused = self.connection in before
        self.results: List[Any] = []
        self.deferred.addBoth(self.results.append)

    @property
    def transport(self) -> StringTransport:
        return self.connection.transport

    def answer(self, data: bytes) -> None:
        self.connection.dataReceived(data)

    @property
    def response(self) -> Any:
        [response] = self.results
        assert not isinstance(response, Failure), response
        return response

    @property
    def failure(self) -> Failure:
        [failure] = self.results
        assert isinstance(failure, Failure), failure
        return failure

    def deliver(self) -> Body:
        body = Body()
        self.response.deliverBody(body)
        return body


def test_serialize_request():
    """The request line, every header value (duplicates kept), Content-Length only with a body."""
    headers = Headers()
    for name, value in ((b"X-Dup", b"a"), (b"Host", b"h"), (b"X-Dup", b"b")):
        headers.addRawHeader(name, value)
    assert serialize_request(b"POST", b"/v1/x?q=1", headers, b"body") == (
        b"POST /v1/x?q=1 HTTP/1.1\r\nX-Dup: a\r\nX-Dup: b\r\nHost: h\r\nContent-Length: 4\r\n\r\n"
    )
    assert serialize_request(b"GET", b"/", Headers(), None) == b"GET / HTTP/1.1\r\n\r\n"
    assert serialize_request(b"POST", b"/", Headers(), b"").endswith(b"\r\nContent-Length: 0\r\n\r\n")


def test_content_length_body_then_reused():
    """The head fires with code/phrase/headers/length; the body streams and ends with
    ResponseDone; the connection then serves the next request."""
    h = Pool()
    call = h.ask()
    assert not call.reused and call.results == []
    call.answer(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhel")
    response = call.response
    assert (response.version, response.code, response.phrase) == ((b"HTTP", 1, 1), 201, b"Created")
    assert response.length == 5
    assert response.headers.getRawHeaders(b"x-a") == [b"1", b"2"]
    body = call.deliver()
    assert body.body == b"hel" and body.reason is None
    call.answer(b"lo")
    assert body.body == b"hello" and body.reason.check(ResponseDone)
    again = h.ask()
    assert again.reused and again.connection is call.connection and len(h.endpoint.connections) == 1


@pytest.mark.parametrize("reads", (
    [CHUNKED],
    *([CHUNKED[:i], CHUNKED[i:]] for i in range(1, len(CHUNKED))),
    [CHUNKED[i:i + 1] for i in range(len(CHUNKED))],
), ids=lambda reads: f"{len(reads)}reads/{len(reads[0])}")
def test_chunked_body_any_split(reads):
    """A chunked body (extensions, trailers) decodes the same however its bytes are read."""
    h = Pool()
    call = h.ask()
    body = None
    for data in reads:
        call.answer(data)
        if call.results and body is None:
            body = call.deliver()
    assert body is not None and body.body == b"hello, world!!!"
    assert body.reason.check(ResponseDone) and call.response.length is UNKNOWN_LENGTH
    assert h.ask().reused


@pytest.mark.parametrize("reason, ending", ((ConnectionDone(), PotentialDataLoss), (ConnectionLost(), ResponseFailed)))
def test_body_until_close(reason, ending):
    """Without length or chunking the body ends with the connection: PotentialDataLoss
    when it closes cleanly, a failure otherwise; the connection is not reused."""
    h = Pool()
    call = h.ask()
    call.answer(b"HTTP/1.1 200 OK\r\n\r\nabc")
    assert call.response.length is UNKNOWN_LENGTH
    body = call.deliver()
    call.answer(b"def")
    assert body.reason is None
    call.connection.connectionLost(Failure(reason))
    assert body.body == b"abcdef" and body.reason.check(ending)
    assert not h.ask().reused


@pytest.mark.parametrize("answer", (
    ok(headers=b"Connection: close\r\n"),
    ok(headers=b"Connection: keep-alive, Close\r\n"),
    ok(version=b"HTTP/1.0"),
))
def test_connection_close_and_http10_not_pooled(answer):
    """An answer with Connection: close, or in HTTP/1.0, closes its connection after the body."""
    h = Pool()
    assert h.served(answer).transport.disconnecting
    assert not h.ask().reused and len(h.endpoint.connections) == 2


@pytest.mark.parametrize("head_only, status",
                         ((True, b"200 OK"), (False, b"204 No Content"), (False, b"304 Not Modified")))
def test_no_body_expected(head_only, status):
    """HEAD answers and 204/304 have no body whatever Content-Length says: length 0, reusable."""
    h = Pool()
    call = h.ask(head_only=head_only)
    call.answer(b"HTTP/1.1 " + status + b"\r\nContent-Length: 100\r\n\r\n")
    assert call.response.length == 0
    body = call.deliver()
    assert body.body == b"" and body.reason.check(ResponseDone)
    assert not call.transport.disconnecting and h.ask().reused


@pytest.mark.parametrize("split", (False, True))
def test_interim_answers_skipped(split):
    """100 Continue (and other 1xx) before the real answer are skipped."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    call = Pool().ask()
    for data in ((interim, ok()) if split else (interim + ok(),)):
        call.answer(data)
    assert call.response.code == 200 and call.deliver().body == b"ok"


INVALID_HEADS = {
    "status line": b"NOT HTTP\r\n\r\n",
    "status code": b"HTTP/1.1 20 OK\r\n\r\n",
    "version": b"HTTP/2 200 OK\r\n\r\n",
    "header without colon": b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
    "space in header name": b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    "conflicting lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    "length list": b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
    "negative length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "protocol switch": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    "coding after chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "coding not chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    "coding before chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    "chunked twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    "length not a number": b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
}


@pytest.mark.parametrize("answer", INVALID_HEADS.values(), ids=INVALID_HEADS.keys())
def test_invalid_head(answer):
    """An unreadable head errbacks with InvalidResponse and aborts the connection."""
    call = Pool().ask()
    call.answer(answer)
    assert call.failure.check(InvalidResponse) and call.transport.disconnected


def test_head_over_max_head():
    """A head that grows past MAX_HEAD without ending is invalid (MAX_HEAD itself is not)."""
    call = Pool().ask()
    start = b"HTTP/1.1 200 OK\r\nX: "
    call.answer(start + b"a" * (MAX_HEAD - len(start) - 1))
    call.answer(b"a")
    assert call.results == [] and not call.transport.disconnecting
    call.answer(b"a")
    assert call.failure.check(InvalidResponse) and call.transport.disconnected


def test_whole_head_over_max_head_in_one_read():
    """A head longer than MAX_HEAD is invalid even when its end comes in the same read."""
    call = Pool().ask()
    call.answer(b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD + b"\r\nContent-Length: 0\r\n\r\n")
    assert call.failure.check(InvalidResponse) and call.transport.disconnected


def test_chunked_decoder_one_chunk_a_read():
    """A read of exactly one chunk (the usual case in a stream) decodes as any other;
    one that only looks like it is still refused."""
    decoder = ChunkedDecoder()
    assert [decoder.feed(c) for c in (b"5\r\nhello\r\n", b"1A\r\n" + b"x" * 26 + b"\r\n")] == [b"hello", b"x" * 26]
    assert decoder.feed(b"0\r\n\r\n") == b"" and decoder.done and not decoder.extra
    for bad in (b"2\r\nabcd", b"2\r\nab\n\n", b"3\r\nab\r\n"):
        decoder.reset()
        try:
            out = decoder.feed(bad) + decoder.feed(b"\r\n0\r\n\r\n")
        except InvalidResponse:
            continue
        raise AssertionError(f"{bad!r} gave {out!r}")


@pytest.mark.parametrize("chunks", (b"zz\r\nab\r\n", b"2\r\nabcd\r\n", b"2\r\nabc\n", b"1" * 5000),
                         ids=("size", "overrun", "overrun by one", "long line"))
def test_invalid_chunked_body(chunks):
    """A bad chunk fails the body with InvalidResponse and aborts the connection."""
    call = Pool().ask()
    call.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    body = call.deliver()
    call.answer(chunks)
    assert body.reason.check(ResponseFailed) and body.reason.value.reasons[0].check(InvalidResponse)
    assert call.transport.disconnected


def test_lost_before_answer():
    """A connection lost before any of the answer is ResponseNeverReceived; on a
    connection that had served a whole answer before, StaleConnection (a kind of it)."""
    h = Pool()
    call = h.ask()
    call.connection.connectionLost(DONE)
    assert call.failure.check(ResponseNeverReceived) and not call.failure.check(StaleConnection)
    h.served()
    call = h.ask()
    assert call.reused
    call.connection.connectionLost(DONE)
    assert call.failure.check(StaleConnection)


def test_no_answer_within_timeout():
    """No answer's head within the timeout of the request being written:
    ResponseTimeout, and the connection is aborted."""
    h = Pool()
    call = h.ask()
    call.answer(b"HTTP/1.1 200 OK\r\n")  # a head begun is no answer yet
    h.reactor.advance(READ_TIMEOUT - 0.1)
    assert call.results == []
    h.reactor.advance(0.1)
    assert call.failure.check(ResponseTimeout) and call.transport.disconnected


def test_timeout_counts_from_each_request():
    """On a reused connection the next request's head gets its whole timeout from
    when it was written (the connection's timer, set for an earlier one, waits on)."""
    h = Pool()
    h.served()
    h.reactor.advance(5)
    call = h.ask()
    assert call.reused
    h.reactor.advance(READ_TIMEOUT - 0.1)
    assert call.results == []
    h.reactor.advance(0.1)
    assert call.failure.check(ResponseTimeout) and call.transport.disconnected
    assert h.reactor.getDelayedCalls() == []


@pytest.mark.parametrize("received", (b"HTTP/1.1 200 OK\r\nContent-Le", b"HTTP/1.1 100 Continue\r\n\r\n"))
def test_lost_in_answer_head(received):
    """A connection lost once the answer has begun (part of a head, an interim answer):
    the upstream has the request, so it is ResponseFailed, not ResponseNeverReceived."""
    call = Pool().ask()
    call.answer(received)
    call.connection.connectionLost(DONE)
    assert call.failure.check(ResponseFailed) and not call.failure.check(ResponseNeverReceived)


def test_lost_mid_body():
    """A connection lost before Content-Length bytes came fails the body: not a clean end."""
    call = Pool().ask()
    call.answer(ok(b"0123456789")[:-5])
    body = call.deliver()
    call.connection.connectionLost(DONE)
    assert body.body == b"01234" and body.reason.check(ResponseFailed)
    assert not body.reason.check(ResponseDone, PotentialDataLoss)


def test_reads_before_deliver_body_are_kept():
    """Body bytes (and the end) that come before deliverBody are handed over then."""
    h = Pool()
    whole, partial = h.ask(), h.ask()
    for call in (whole, partial):
        call.answer(ok(b"abcdef")[:-3])
    whole.answer(b"def")
    body = whole.deliver()
    assert body.data == [b"abc", b"def"] and body.reason.check(ResponseDone)
    body = partial.deliver()  # the rest comes after
    assert body.body == b"abc" and body.reason is None
    partial.answer(b"def")
    assert body.body == b"abcdef" and body.reason.check(ResponseDone)


def test_flow_control():
    """The consumer pauses and resumes the connection; a body that ends while paused leaves
    it resumed, and back in the pool."""
    h = Pool()
    call = h.ask()
    call.answer(ok(b"abcdef")[:-3])
    body = call.deliver()
    body.transport.pauseProducing()
    assert call.transport.producerState == "paused"
    body.transport.resumeProducing()
    assert call.transport.producerState == "producing"
    body.transport.pauseProducing()
    call.answer(b"def")  # a read already under way
    assert body.reason.check(ResponseDone) and call.transport.producerState == "producing"
    assert h.ask().reused


def test_stop_producing_not_reusable():
    """A consumer that stops the body stops the connection, which is not pooled after."""
    h = Pool()
    call = h.ask()
    call.answer(ok(b"abcdef")[:-3])
    call.deliver().transport.stopProducing()
    assert call.transport.producerState == "stopped"
    call.answer(b"def")
    assert call.transport.disconnecting and not h.ask().reused


def test_stopped_body_until_close_is_not_complete():
    """A body read until the connection closes, stopped by its consumer: its end is no
    clean end, even when the connection then closes cleanly."""
    call = Pool().ask()
    call.answer(b"HTTP/1.1 200 OK\r\n\r\npart")
    body = call.deliver()
    body.transport.stopProducing()
    call.connection.connectionLost(DONE)
    assert body.reason.check(ResponseFailed)


def test_pool_max_idle_most_recent_first():
    """Up to max_idle connections are kept (the others closed), and reused most
    recently used first."""
    h = Pool(max_idle=2)
    calls = [h.ask() for _ in range(3)]
    for call in calls:
        call.answer(ok())
    assert [call.transport.disconnecting for call in calls] == [False, False, True]
    assert [h.ask().connection for _ in range(2)] == [calls[1].connection, calls[0].connection]
    assert not h.ask().reused and len(h.endpoint.connections) == 4


def test_idle_timeout():
    """An idle connection is closed idle_timeout after it last went idle (not after it
    first did), never while busy, and is then forgotten."""
    h = Pool(idle_timeout=10)
    call = h.served()
    h.reactor.advance(9.9)
    assert not call.transport.disconnecting
    h.reactor.advance(0.1)
    assert call.transport.disconnecting
    call.connection.connectionLost(DONE)
    fresh = h.served()  # idle from t=10
    h.reactor.advance(6)
    again = h.ask()  # busy from t=16: its first timer (t=20) finds it busy
    assert again.reused
    h.reactor.advance(5)
    assert not fresh.transport.disconnecting
    again.answer(ok())
    again.deliver()  # idle from t=21
    h.reactor.advance(9.9)
    assert not fresh.transport.disconnecting
    h.reactor.advance(0.1)
    assert fresh.transport.disconnecting
    fresh.connection.connectionLost(DONE)
    assert h.reactor.getDelayedCalls() == [] and not h.ask().reused


def test_idle_connection_closed_by_server():
    """An idle connection the server closes leaves the pool (and its timer is cancelled)."""
    h = Pool()
    h.served().connection.connectionLost(DONE)
    assert h.reactor.getDelayedCalls() == [] and not h.ask().reused


def test_stray_bytes_close_idle_connection():
    """Bytes that nobody asked for close an idle connection."""
    call = Pool().served()
    call.answer(STRAY)
    assert call.transport.disconnecting


@pytest.mark.parametrize("close, lost", (("idle timeout", False), ("stray bytes", False), ("stray bytes", True)))
def test_closing_connection_not_handed_out(close, lost):
    """A connection the pool has begun to close is not used for the next request."""
    h = Pool(idle_timeout=10)
    call = h.served()
    if close == "idle timeout":
        h.reactor.advance(10)
    else:
        call.answer(STRAY)
    if lost:
        call.connection.connectionLost(DONE)
    assert not h.ask().reused


def test_close_idle():
    """close_idle closes idle connections at once, and fires once they are lost."""
    h = Pool()
    calls = [h.ask() for _ in range(2)]
    for call in calls:
        call.answer(ok())
    closed = []
    h.pool.close_idle().addCallback(closed.append)
    assert all(call.transport.disconnecting for call in calls) and h.reactor.getDelayedCalls() == []
    assert not h.ask().reused
    calls[0].connection.connectionLost(DONE)
    assert closed == []
    calls[1].connection.connectionLost(DONE)
    assert len(closed) == 1


def test_close_pool():
    """After close(), a connection that finishes its answer is closed, not pooled."""
    h = Pool()
    busy = h.ask()
    idle = h.served()
    h.pool.close()
    assert idle.transport.disconnecting and not busy.transport.disconnecting
    busy.answer(ok())
    assert busy.transport.disconnecting


@pytest.mark.parametrize("reused", (False, True))
def test_cancel_while_waiting_aborts(reused):
    """Cancelling the answer's Deferred aborts the connection (new or reused)."""
    h = Pool()
    if reused:
        h.served()
    call = h.ask()
    assert call.reused is reused
    call.deferred.cancel()
    assert call.failure.check(CancelledError) and call.transport.disconnected
    call.connection.connectionLost(DONE)  # nothing left to fire
    assert len(call.results) == 1


@pytest.mark.parametrize("answer", (ok(b"ok") + b"EXTRA", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"2\r\nok\r\n0\r\n\r\nEXTRA"), ids=("length", "chunked"))
def test_bytes_after_body_not_reusable(answer):
    """Bytes beyond the body are dropped, and the connection is closed rather than pooled."""
    h = Pool()
    call = h.ask()
    call.answer(answer)
    body = call.deliver()
    assert body.body == b"ok" and body.reason.check(ResponseDone)
    assert call.transport.disconnecting and not h.ask().reused


@pytest.mark.parametrize("answer", (
    b"NOT HTTP\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\rX-Injected: 1\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX-A: a\rX-Injected: 1\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\x00\r\nContent-Length: 2\r\n\r\nok",
), ids=("garbage", "chunked then gzip", "CR in phrase", "CR in value", "NUL in phrase"))
def test_gateway_invalid_upstream_answer_is_502(answer):
    """Garbage from an upstream, a body coded in a way it would pass on as plain, or a
    head with a bare CR or NUL that would split the client's answer: 502 bad_gateway,
    upstream_invalid_response, not sent elsewhere, nothing of the upstream's head sent."""
    gw = Gateway()
    _, client = gw.client(post(b"/v1/chat/completions", b'{"model": "m"}'))
    gw.upstream().send(answer)
    raw = client.value()
    assert raw.startswith(b"HTTP/1.1 502")
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "bad_gateway"
    assert gw.records[0].error == "upstream_invalid_response"
    assert gw.requests_sent() == 1
    assert b"X-Injected" not in raw and b"\x00" not in raw


@pytest.mark.parametrize("head_only, answer", (
    (True, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nBODY"),
    (False, b"HTTP/1.1 204 No Content\r\n\r\nEXTRA"),
    (False, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nEXTRA"),
), ids=("HEAD answered with a body", "204 and more", "empty and more"))
def test_bytes_after_empty_body_not_reusable(head_only, answer):
    """Bytes after an answer without a body make the connection unfit for reuse too."""
    h = Pool()
    call = h.ask(head_only=head_only)
    call.answer(answer)
    assert call.deliver().reason.check(ResponseDone)
    assert call.transport.disconnecting and not h.ask().reused


def test_same_field_in_different_case_is_one_field():
    """Field names are case-insensitive: Set-Cookie and set-cookie lines keep all values."""
    call = Pool().ask()
    call.answer(b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nContent-Length: 0\r\n\r\n")
    assert call.response.headers.getRawHeaders(b"set-cookie") == [b"a=1", b"b=2"]


def test_status_below_100_is_invalid():
    """A status code under 100 is not an interim answer to wait past: it is invalid."""
    call = Pool().ask()
    call.answer(b"HTTP/1.1 099 Odd\r\n\r\n")
    assert call.failure.check(InvalidResponse)


def test_length_and_chunked_together_not_reusable():
    """Content-Length with Transfer-Encoding: chunked is read as chunked, then closed."""
    h = Pool()
    call = h.ask()
    call.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    assert call.deliver().body == b"ok"
    assert call.transport.disconnecting and not h.ask().reused


def test_flow_control_ends_with_the_body():
    """Once a body has ended, its consumer's pause or stop no longer reaches the
    connection, which may be serving another request."""
    h = Pool()
    call = h.ask()
    call.answer(ok())
    control = call.deliver().transport
    control.pauseProducing()
    control.stopProducing()
    assert call.transport.producerState == "producing" and not call.transport.disconnecting
    assert h.ask().reused


def test_gateway_does_not_resend_once_the_answer_began():
    """A reused connection lost after the upstream began its answer: 502, not resent
    (the upstream has the request)."""
    gw = Gateway(BASE_CONFIG.replace("    10.0.0.2:8080 1\n", ""))
    _, first = gw.client(post(b"/v1/chat/completions", b'{"model": "m"}'))
    upstream = gw.upstream()
    upstream.send(ok(b"{}", b"Content-Type: application/json\r\n"))
    assert first.value().startswith(b"HTTP/1.1 200")
    _, second = gw.client(post(b"/v1/chat/completions", b'{"model": "m"}'))
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Le")
    upstream.protocol.connectionLost(DONE)
    assert second.value().startswith(b"HTTP/1.1 502")
    assert gw.requests_sent() == 2


def test_connection_tokens_are_parsed():
    """Connection is a list of tokens: one that merely contains "close" keeps the
    connection, a "close" token among others closes it."""
    h = Pool()
    assert not h.served(ok(headers=b"Connection: x-close-later\r\n")).transport.disconnecting
    assert h.ask().reused
    h = Pool()
    assert h.served(ok(headers=b"Connection: x-a\r\nConnection: te,  close \r\n")).transport.disconnecting


@pytest.mark.parametrize("head_only, status", ((True, b"200 OK"), (False, b"304 Not Modified")))
def test_declared_length_kept_without_body(head_only, status):
    """HEAD and 304 answers have no body, but keep the upstream's Content-Length (as one number)."""
    call = Pool().ask(head_only=head_only)
    call.answer(b"HTTP/1.1 " + status + b"\r\nContent-Length: 1234, 1234\r\n\r\n")
    assert call.response.length == 0
    assert call.response.headers.getRawHeaders(b"content-length") == [b"1234"]


def test_parse_head_is_a_pure_function():
    """parse_head reads a head on its own: framing, persistence, the upstream's keep-alive."""
    head = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\nKeep-Alive: timeout=5, max=100", False)
    assert head is not None
    assert (head.code, head.framing, head.persistent, head.keep_alive) == (200, -1, True, 5)
    assert parse_head(b"HTTP/1.1 100 Continue", False) is None
    head = parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 3", False)
    assert head is not None and (head.framing, head.persistent, head.keep_alive) == (3, False, None)


@pytest.mark.parametrize("keep_alive, kept", ((b"timeout=5", 4.0), (b"timeout=60", 10.0), (b"max=9", 10.0)))
def test_idle_limit_follows_keep_alive(keep_alive, kept):
    """An idle connection is closed a second before the upstream's Keep-Alive timeout,
    and never later than idle_timeout."""
    h = Pool(idle_timeout=10)
    call = h.served(ok(headers=b"Keep-Alive: " + keep_alive + b"\r\n"))
    h.reactor.advance(kept - 0.1)
    assert not call.transport.disconnecting
    h.reactor.advance(0.1)
    assert call.transport.disconnecting


def test_keep_alive_shortened_on_reuse():
    """A later answer with a shorter Keep-Alive timeout shortens the idle limit."""
    h = Pool(idle_timeout=10)
    call = h.served()
    h.served(ok(headers=b"Keep-Alive: timeout=3\r\n"))
    h.reactor.advance(1.9)
    assert not call.transport.disconnecting
    h.reactor.advance(0.1)
    assert call.transport.disconnecting


def test_keep_alive_of_one_second_not_pooled():
    """An upstream that keeps idle connections a second or less: not worth the race."""
    h = Pool()
    assert h.served(ok(headers=b"Keep-Alive: timeout=1\r\n")).transport.disconnecting
    assert not h.ask().reused


class Failing(Body):
    """A consumer that raises from dataReceived or connectionLost."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.ends: List[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.where == "data":
            raise RuntimeError("consumer bug")

    def connectionLost(self, reason: Failure = DONE) -> None:
        super().connectionLost(reason)
        self.ends.append(reason)
        if self.where == "end":
            raise RuntimeError("consumer bug")


@pytest.mark.parametrize("where", ("data", "end"))
def test_failing_consumer_gives_the_connection_up(where):
    """A body consumer that raises: the connection is aborted (not pooled, not wedged:
    its place is free), and a consumer whose dataReceived raised is ended with
    ResponseFailed."""
    h = Pool(max_connections=1)
    call = h.ask()
    call.answer(ok(b"abcdef")[:-3])
    consumer = Failing(where)
    call.response.deliverBody(consumer)
    call.answer(b"def")
    assert call.transport.disconnected
    [end] = consumer.ends
    assert end.check(ResponseFailed if where == "data" else ResponseDone)
    call.connection.connectionLost(Failure(ConnectionLost()))
    assert len(consumer.ends) == 1
    assert not h.ask().reused and len(h.endpoint.connections) == 2


@pytest.mark.parametrize("where", ("data", "end"))
def test_failing_consumer_of_a_body_already_read(where):
    """A consumer given a body that had all come (its connection back in the pool)
    raises: it is still ended (ResponseFailed when dataReceived raised), and the
    connection, which did nothing wrong, stays pooled."""
    h = Pool()
    call = h.ask()
    call.answer(ok(b"abcdef"))
    consumer = Failing(where)
    call.response.deliverBody(consumer)
    [end] = consumer.ends
    assert end.check(ResponseFailed if where == "data" else ResponseDone)
    assert h.ask().reused


def test_failing_consumer_of_early_reads():
    """A consumer raising on reads that came before deliverBody (the body not over):
    the connection is given up and the consumer ended."""
    h = Pool()
    call = h.ask()
    call.answer(ok(b"abcdef")[:-3])
    consumer = Failing("data")
    call.response.deliverBody(consumer)
    assert call.transport.disconnected
    [end] = consumer.ends
    assert end.check(ResponseFailed)


def test_consumer_failing_when_the_connection_is_lost():
    """A consumer raising from connectionLost as the connection is lost: the
    connection still leaves the pool and frees its place."""
    h = Pool(max_connections=1)
    call = h.ask()
    call.answer(ok(b"abcdef")[:-3])
    call.response.deliverBody(Failing("end"))
    call.connection.connectionLost(Failure(ConnectionLost()))
    assert not h.ask().reused and len(h.endpoint.connections) == 2


class PendingEndpoint:
    """Connects when told: each connect() is a Deferred the test fires."""

    def __init__(self) -> None:
        self.attempts: List[Any] = []
        self.connections: List[Any] = []

    def connect(self, factory: Any) -> Any:
        d: Deferred = Deferred()
        self.attempts.append((factory, d))
        return d

    def succeed(self, index: int = -1) -> Any:
        factory, d = self.attempts[index]
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.connections.append(protocol)
        d.callback(protocol)
        return protocol


def limited(max_connections: int = 1) -> Any:
    reactor = MemoryReactorClock()
    endpoint = PendingEndpoint()
    pool = ConnectionPool(reactor, {KEY: endpoint}, 2, 10.0, max_connections, QUEUE_TIMEOUT)

    def ask() -> List[Any]:
        results: List[Any] = []
        pool.request(KEY, [REQUEST], False, READ_TIMEOUT).addBoth(results.append)
        return results

    return reactor, endpoint, pool, ask


def test_max_connections_queues_then_hands_over():
    """Beyond max_connections (those connecting count) a request waits; a connection
    that has answered goes to the first waiting request, in order."""
    reactor, endpoint, pool, ask = limited(1)
    first, second, third = ask(), ask(), ask()
    assert len(endpoint.attempts) == 1
    connection = endpoint.succeed()
    assert connection.transport.value() == REQUEST
    connection.dataReceived(ok())
    first[0].deliverBody(Body())
    assert connection.transport.value() == REQUEST * 2 and second == [] and third == []
    connection.dataReceived(ok())
    assert second[0].code == 200 and third == []
    second[0].deliverBody(Body())
    assert connection.transport.value() == REQUEST * 3 and len(endpoint.attempts) == 1
    connection.dataReceived(ok())
    third[0].deliverBody(Body())
    assert pool.request(KEY, [REQUEST], False, READ_TIMEOUT) is not None
    assert len(endpoint.attempts) == 1 and reactor.getDelayedCalls() != []


def test_waiting_request_connects_when_a_place_frees():
    """A connection lost (or a failed connect) frees its place: a waiting request
    connects then."""
    reactor, endpoint, pool, ask = limited(1)
    ask()
    waiting = ask()
    endpoint.attempts[0][1].errback(Failure(ConnectionLost()))
    assert len(endpoint.attempts) == 2 and waiting == []
    connection = endpoint.succeed()
    third = ask()
    connection.connectionLost(Failure(ConnectionLost()))
    assert waiting[0].check(ResponseNeverReceived)
    assert len(endpoint.attempts) == 3 and third == []


def test_waiting_is_bounded_and_cancellable():
    """A request waits queue_timeout at most (NoConnectionFree), and one cancelled
    while waiting leaves the queue."""
    reactor, endpoint, pool, ask = limited(1)
    ask()
    cancelled = pool.request(KEY, [REQUEST], False, READ_TIMEOUT)
    cancelled.addErrback(lambda f: f.trap(CancelledError))
    timed = ask()
    cancelled.cancel()
    reactor.advance(QUEUE_TIMEOUT)
    assert timed[0].check(NoConnectionFree)
    connection = endpoint.succeed()
    connection.dataReceived(ok())
    assert connection.transport.value() == REQUEST  # nobody was left waiting for it


def test_gateway_max_connections_queues():
    """With max_connections = 1 a second request waits for the node's one connection
    and goes on it; one that waits longer than timeout_connect gets 502 upstream_busy."""
    config = BASE_CONFIG.replace("    10.0.0.2:8080 1\n", "").replace("retries = 1", "max_connections = 1")
    gw = Gateway(config)
    _, first = gw.client(post(b"/v1/chat/completions", b'{"model": "m"}'))
    upstream = gw.upstream()
    _, second = gw.client(post(b"/v1/chat/completions", b'{"model": "m"}'))
    assert len(gw.connects()) == 1 and upstream.received().count(b"POST ") == 1
    upstream.send(ok(b"{}", b"Content-Type: application/json\r\n"))
    assert first.value().startswith(b"HTTP/1.1 200") and upstream.received().count(b"POST ") == 2
    _, third = gw.client(post(b"/v1/chat/completions", b'{"model": "m"}'))
    gw.reactor.advance(4.9)
    assert third.value() == b""
    gw.reactor.advance(0.1)
    assert third.value().startswith(b"HTTP/1.1 502")
    assert gw.records[-1].error == "upstream_busy"
    upstream.send(ok(b"{}", b"Content-Type: application/json\r\n"))
    assert second.value().startswith(b"HTTP/1.1 200") and len(gw.connects()) == 1



@pytest.mark.parametrize("lines, fields", [
    (b"A:1\nB:  2  \r\nC:\t3\t\nD:\r\nE: a \t b", [(b"a", [b"1"]), (b"b", [b"2"]), (b"c", [b"3"]), (b"d", [b""]),
                                                    (b"e", [b"a \t b"])]),
    (b"Set-Cookie: a=1\r\nset-cookie: b=2\r\nSET-COOKIE: c=3", [(b"set-cookie", [b"a=1", b"b=2", b"c=3"])]),
    (b"X-Text: caf\xc3\xa9 \x80\xff ~!", [(b"x-text", [b"caf\xc3\xa9 \x80\xff ~!"])]),  # obs-text kept
])
def test_header_lines_as_stored(lines, fields):
    head = parse_head(b"HTTP/1.1 204 No Content\r\n" + lines, False)
    assert [(name, head.headers.getRawHeaders(name)) for name, _ in fields] == fields
    assert len(list(head.headers.getAllRawHeaders())) == len(fields)


@pytest.mark.parametrize("lines", [b"X: 1\r\nbad line", b"X: 1\r\n: no name", b"X Y: 1", b"X : 1",
                                   b"X: 1\r\n Folded", b"X\x00: 1", b"Content-Type\r\nX: 1"])
def test_lines_that_are_no_header_refused(lines):
    with pytest.raises(InvalidResponse):
        parse_head(b"HTTP/1.1 200 OK\r\n" + lines, False)


# A CR of its own, a NUL or another control byte (TAB aside) where HTTP allows none:
# passed on, one in the status phrase or a value would split the client's answer.
CONTROL_HEADS = {
    "CR in phrase": b"HTTP/1.1 200 OK\rX-Injected: 1\r\nContent-Length: 0",
    "CR ending phrase": b"HTTP/1.1 200 OK\r\r\nContent-Length: 0",
    "CR in value": b"HTTP/1.1 200 OK\r\nX-A: a\rX-Injected: 1\r\nContent-Length: 0",
    "CR ending value": b"HTTP/1.1 200 OK\r\nX-A: a\r\r\nContent-Length: 0",
    "CR ending head": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r",
    "CR starting line": b"HTTP/1.1 200 OK\r\n\rContent-Length: 0",
    "NUL in phrase": b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0",
    "NUL in value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0",
    "VT in value": b"HTTP/1.1 200 OK\r\nX-A: a\x0bb\r\nContent-Length: 0",
    "ESC in phrase": b"HTTP/1.1 200 \x1b[31mOK\r\nContent-Length: 0",
    "DEL in value": b"HTTP/1.1 200 OK\r\nX-A: a\x7f\r\nContent-Length: 0",
    "CR in interim answer": b"HTTP/1.1 100 Continue\rX-Injected: 1",
}


@pytest.mark.parametrize("head", CONTROL_HEADS.values(), ids=CONTROL_HEADS.keys())
def test_control_bytes_in_head_refused(head):
    """A bare CR, a NUL or another control byte in the status line or a field line
    makes the head invalid (CRLF, bare LF and TAB are what may be there)."""
    with pytest.raises(InvalidResponse):
        parse_head(head, False)


def test_tabs_and_bare_line_feeds_in_head_kept():
    """TAB in the phrase and inside a value is text; LF alone ends a line as CRLF does."""
    head = parse_head(b"HTTP/1.1 200 All\tOK\nX-A: a\tb\r\nX-B: c", False)
    assert head.phrase == b"All\tOK"
    assert head.headers.getRawHeaders(b"x-a") == [b"a\tb"] and head.headers.getRawHeaders(b"x-b") == [b"c"]


def test_parse_head_reads_repeated_fields_in_order():
    head = parse_head(
        b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nKeep-Alive: timeout=9\r\nContent-Length: 5\r\n"
        b"CONNECTION: Close\r\nkeep-alive: max=3\r\nkeep-alive: timeout=4\r\ncontent-length: 5, 5", False)
    assert (head.framing, head.persistent, head.keep_alive) == (5, False, 4)
    assert head.headers.getRawHeaders(b"connection") == [b"keep-alive", b"Close"]
    assert head.headers.getRawHeaders(b"content-length") == [b"5"]
    with pytest.raises(InvalidResponse):
        parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 6", False)
    with pytest.raises(InvalidResponse):
        parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\ntransfer-encoding: gzip", False)
