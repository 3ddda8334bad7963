"""The request path in memory: real Site and upstream client, StringTransports, a fake clock."""

from __future__ import annotations

import json

import pytest

from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from openaigw.interfaces import IPlugin, IRequestFilter
from openaigw.plugins import REGISTRY
from openaigw.plugins.proxy_rewrite import RewriteFilter, RewriteSettings

from tests.memory import BASE_CONFIG, Gateway, post, response

CHAT = b"/v1/chat/completions"
BODY = b'{"model": "gpt-4o-mini", "messages": []}'


def error_of(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]


def head_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def test_plugins_provide_interfaces():
    """Every registered plugin provides IPlugin; proxy-rewrite's filter IRequestFilter."""
    for plugin in REGISTRY.values():
        assert verifyObject(IPlugin, plugin)
    assert verifyObject(IRequestFilter, RewriteFilter(RewriteSettings()))


def test_request_headers_forwarded_and_key_injected():
    """The key replaces the client's; hop-by-hop and Connection-named headers go;
    duplicates stay; X-Forwarded-* and the node's Host are set."""
    gw = Gateway()
    gw.client(post(CHAT, BODY, b"Authorization: Bearer client-key\r\nConnection: keep-alive, X-Drop\r\n"
                   b"X-Drop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Dup: a\r\nX-Dup: b\r\n"
                   b"X-Forwarded-For: 203.0.113.9\r\n"))
    sent = gw.upstream().received()
    head, body = sent.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert b"Authorization: Bearer sk-real" in lines
    assert b"client-key" not in sent
    for dropped in (b"X-Drop", b"Keep-Alive", b"Te:", b"TE:"):
        assert not any(line.startswith(dropped) for line in lines)
    assert lines.count(b"X-Dup: a") == 1 and lines.count(b"X-Dup: b") == 1
    assert b"X-Forwarded-For: 203.0.113.9, 192.0.2.7" in lines
    assert b"X-Forwarded-Proto: http" in lines
    assert b"X-Forwarded-Host: gw.example" in lines
    assert b"Host: 10.0.0.1:8080" in lines
    assert body == BODY


def test_pass_host_pass_and_rewrite():
    """pass_host = pass keeps the client's Host; rewrite uses upstream_host."""
    for setting, expected in ((b"pass_host = pass", b"Host: gw.example"),
                              (b"pass_host = rewrite\nupstream_host = api.internal", b"Host: api.internal")):
        config = BASE_CONFIG.replace("retries = 1", "retries = 1\n" + setting.decode())
        gw = Gateway(config)
        gw.client(post(CHAT, BODY))
        assert expected in gw.upstream().received().split(b"\r\n")


def test_rewrite_uri_keeps_query():
    """proxy-rewrite.uri replaces the path and keeps the client's query string."""
    config = BASE_CONFIG + "proxy-rewrite.uri = /openai/deployments/d/models\n"
    gw = Gateway(config)
    gw.client(b"GET /v1/models?api-version=1 HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert gw.upstream().received().startswith(b"GET /openai/deployments/d/models?api-version=1 HTTP/1.1")


def test_response_passes_through():
    """Status and headers pass; no TwistedWeb Server header; the body is untouched."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, BODY))
    gw.upstream().send(response(b"201 Created", b"x-request-id: req_1\r\nopenai-processing-ms: 12\r\n"
                                b"x-ratelimit-remaining-requests: 9\r\nKeep-Alive: timeout=5\r\n", b'{"a": 1}'))
    raw = client.value()
    head = head_of(raw).lower()
    assert head.startswith(b"http/1.1 201 created")
    for header in (b"x-request-id: req_1", b"openai-processing-ms: 12", b"x-ratelimit-remaining-requests: 9",
                   b"content-length: 8"):
        assert header in head
    assert b"twistedweb" not in head and b"keep-alive" not in head
    assert raw.endswith(b'{"a": 1}')


def test_headers_named_by_connection_are_dropped_both_ways():
    """What a Connection header lists is hop-by-hop, in any case, toward the upstream
    and back to the client; a listed word that is no header name drops nothing else."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, BODY, b"Connection: x-PRIVATE, no\x7fname\r\nX-Private: 1\r\nX-Kept: 2\r\n"))
    upstream = gw.upstream()
    sent = head_of(upstream.received()).lower()
    assert b"x-private" not in sent and b"connection: x-private" not in sent and b"x-kept: 2" in sent
    upstream.send(response(b"200 OK", b"Connection: keep-alive, X-Secret-Hop\r\nx-secret-hop: s\r\n"
                           b"X-Other: o\r\n", b"{}"))
    head = head_of(client.value()).lower()
    assert b"x-secret-hop" not in head and b"x-other: o" in head


def test_upstream_errors_pass_through_unchanged():
    """A 429 from the upstream reaches the client as it was."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, BODY))
    body = b'{"error": {"message": "slow down", "type": "requests", "param": null, "code": "rate_limit_exceeded"}}'
    gw.upstream().send(response(b"429 Too Many Requests", b"retry-after: 3\r\n", body))
    assert client.value().startswith(b"HTTP/1.1 429 Too Many Requests")
    assert b"Retry-After: 3" in client.value() and client.value().endswith(body)


def test_event_stream_relayed_chunk_by_chunk():
    """Each upstream read is written to the client at once, and SSE gets X-Accel-Buffering: no."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, BODY))
    upstream = gw.upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert b"X-Accel-Buffering: no" in client.value()
    for i in range(3):
        event = b'data: {"n": %d}\n\n' % i
        before = len(client.value())
        upstream.send(b"%x\r\n%s\r\n" % (len(event), event))
        assert event in client.value()[before:]
    upstream.send(b"0\r\n\r\n")
    assert client.value().endswith(b"0\r\n\r\n")  # a clean end of the chunked body


def test_no_route_and_wrong_method():
    """Unknown paths get 404 and known URIs with another method 405, as OpenAI JSON."""
    gw = Gateway()
    _, client = gw.client(b"GET /v2/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 404")
    assert error_of(client.value())["code"] == "route_not_found"
    # /v1/chat/completions is POST-only, but /v1/* takes any method: it serves the GET.
    config = BASE_CONFIG.replace("[route:api]\nuri = /v1/*", "[route:api]\nuri = /v1/models\nmethods = GET")
    gw = Gateway(config)
    _, client = gw.client(b"GET /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 405")
    assert b"Allow: POST" in client.value()
    assert set(error_of(client.value())) == {"message", "type", "param", "code"}
    assert b"TwistedWeb" not in client.value()


def test_own_answers_are_dated_by_the_site_clock():
    """The gateway's own answers carry a Date from the site's clock (formatted once a
    second); a proxied answer keeps the upstream's."""
    gw = Gateway()
    gw.reactor.advance(1700000000.4)
    channel, client = gw.client(b"GET /v2/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert b"\r\nDate: Tue, 14 Nov 2023 22:13:20 GMT\r\n" in client.value()
    client.clear()
    gw.reactor.advance(1)
    channel.dataReceived(b"GET /v2/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert b"\r\nDate: Tue, 14 Nov 2023 22:13:21 GMT\r\n" in client.value()
    client.clear()
    channel.dataReceived(post(CHAT, BODY))
    gw.upstream().send(response(headers=b"Date: Mon, 13 Nov 2023 00:00:00 GMT\r\n"))
    head = head_of(client.value())
    assert head.count(b"Date: ") == 1 and b"Date: Mon, 13 Nov 2023 00:00:00 GMT" in head
    client.clear()
    channel.dataReceived(post(CHAT, BODY))
    gw.upstream().send(response())  # undated: the gateway dates it (RFC 9110 6.6.1)
    head = head_of(client.value())
    assert head.count(b"Date: ") == 1 and b"Date: Tue, 14 Nov 2023 22:13:21 GMT" in head


def test_exact_beats_prefix_and_longest_prefix_wins():
    """/v1/chat/completions goes to the exact route; /v1/x/y to the longer prefix."""
    config = BASE_CONFIG + (
        "\n[upstream:other]\nscheme = http\nnodes = 10.0.0.9:80\n"
        "[route:longer]\nuri = /v1/x/*\nupstream = other\n"
    )
    gw = Gateway(config)
    gw.client(b"GET /v1/x/y HTTP/1.1\r\nHost: gw\r\n\r\n")
    gw.client(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert gw.connects() == ["10.0.0.9:80", "10.0.0.1:8080"]


def test_dot_segments_rejected():
    """Paths with . or .. segments (even percent-encoded) never reach an upstream."""
    gw = Gateway()
    _, client = gw.client(b"GET /v1/%2e%2e/admin HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 400")
    assert gw.connects() == []


def test_body_too_large_by_content_length():
    """A declared body over max_body_size gets 413 before the body is read."""
    gw = Gateway()
    _, client = gw.client(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 5000\r\n"
                          b"Expect: 100-continue\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 413")
    assert b"100 Continue" not in client.value()
    assert error_of(client.value())["code"] == "request_too_large"
    gw.reactor.advance(1)
    assert client.disconnecting
    assert gw.connects() == []


def test_body_too_large_chunked():
    """A chunked body that grows over the limit gets 413 as soon as it does."""
    gw = Gateway()
    channel, client = gw.client(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
    channel.dataReceived(b"400\r\n" + b"x" * 1024 + b"\r\n")
    assert client.value() == b""
    channel.dataReceived(b"1\r\nx\r\n")
    assert client.value().startswith(b"HTTP/1.1 413")
    channel.dataReceived(b"0\r\n\r\n")
    assert gw.connects() == []


def test_connect_failure_tries_next_node():
    """A refused connection moves on to the next node before anything reaches the client."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, BODY))
    host, port, factory, _, _ = gw.reactor.tcpClients[0]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert gw.connects() == ["10.0.0.1:8080", "10.0.0.2:8080"]
    gw.upstream(1).send(response())
    assert client.value().startswith(b"HTTP/1.1 200")


def test_all_nodes_down_is_502():
    """When every try fails the client gets an OpenAI-shaped 502."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, BODY))
    for index in range(2):
        gw.reactor.tcpClients[index][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert client.value().startswith(b"HTTP/1.1 502")
    assert error_of(client.value())["type"] == "upstream_error"


def test_connect_timeout():
    """A node that does not complete the connection within timeout_connect is skipped."""
    gw = Gateway(BASE_CONFIG.replace("retries = 1", "retries = 0"))
    _, client = gw.client(post(CHAT, BODY))
    gw.reactor.advance(4.9)
    assert client.value() == b""
    gw.reactor.advance(0.2)
    assert client.value().startswith(b"HTTP/1.1 502")
    assert b"timed out" in client.value()


def test_read_timeout_before_headers_is_504():
    """No response headers within timeout_read: 504, and the upstream connection is dropped."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, BODY))
    upstream = gw.upstream()
    gw.reactor.advance(29)
    assert client.value() == b""
    gw.reactor.advance(2)
    assert client.value().startswith(b"HTTP/1.1 504")
    assert upstream.transport.disconnecting
    assert len(gw.connects()) == 1  # not retried: the upstream may be working on it


def test_idle_timeout_mid_body_aborts_client():
    """An upstream silent for timeout_read mid-body: the client connection is aborted."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, BODY))
    upstream = gw.upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"6\r\ndata: \r\n")
    gw.reactor.advance(20)
    upstream.send(b"2\r\n1\n\r\n")  # data re-arms the timer
    gw.reactor.advance(20)
    assert not client.disconnecting
    gw.reactor.advance(11)
    assert upstream.transport.producerState == "stopped"
    upstream.protocol.connectionLost(Failure(ConnectionDone()))
    assert client.disconnected  # aborted, not a clean end


def test_upstream_dies_mid_body_aborts_client():
    """A truncated upstream body is never ended cleanly towards the client."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, BODY))
    upstream = gw.upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    upstream.protocol.connectionLost(Failure(ConnectionDone()))
    assert client.value().endswith(b"partial")
    assert client.disconnected


def test_disconnect_before_response_cancels_upstream():
    """A client that leaves while waiting closes the upstream connection at once."""
    gw = Gateway()
    channel, client = gw.client(post(CHAT, BODY))
    upstream = gw.upstream()
    channel.connectionLost(Failure(ConnectionDone()))
    assert upstream.transport.disconnecting
    gw.reactor.advance(100)  # no timers left to fire into a dead request
    assert client.value() == b""


def test_disconnect_while_connecting_cancels_attempt():
    """A client that leaves before the upstream connection is up cancels the connect."""
    gw = Gateway()
    channel, client = gw.client(post(CHAT, BODY))
    channel.connectionLost(Failure(ConnectionDone()))
    connector = gw.reactor.connectors[0]
    assert connector.stoppedConnecting


def test_disconnect_mid_stream_closes_upstream():
    """A client that leaves mid-stream stops the upstream stream."""
    gw = Gateway()
    channel, client = gw.client(post(CHAT, BODY))
    upstream = gw.upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"6\r\ndata: \r\n")
    channel.connectionLost(Failure(ConnectionDone()))
    assert upstream.transport.producerState == "stopped"


def test_backpressure_pauses_upstream():
    """A client that cannot keep up pauses reading from the upstream, and resumes it."""
    gw = Gateway()
    channel, client = gw.client(post(CHAT, BODY))
    upstream = gw.upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
    channel.pauseProducing()  # what the client transport does when its buffer is full
    assert upstream.transport.producerState == "paused"
    upstream.send(b"def")  # a read already under way still arrives, and is relayed
    assert client.value().endswith(b"abcdef")
    gw.reactor.advance(29)
    assert not client.disconnected
    channel.resumeProducing()
    assert upstream.transport.producerState == "producing"
    gw.reactor.advance(29)  # the upstream's silence is timed afresh
    assert not client.disconnected


def test_client_that_stops_reading_is_dropped():
    """A client that reads nothing for timeout_read seconds no longer holds the upstream."""
    gw = Gateway()
    channel, client = gw.client(post(CHAT, BODY))
    upstream = gw.upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
    channel.pauseProducing()
    gw.reactor.advance(30)
    assert upstream.transport.producerState == "stopped"
    upstream.protocol.connectionLost(Failure(ConnectionDone()))
    assert client.disconnected
    assert gw.records[0].error == "client_send_timeout"


def test_idle_timeout_on_close_delimited_body_is_a_cut():
    """A body that ends with the connection is still cut, not complete, after a timeout."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, BODY))
    upstream = gw.upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\ndata: 1\n\n")
    gw.reactor.advance(30)
    upstream.protocol.connectionLost(Failure(ConnectionDone()))
    assert client.disconnected
    assert gw.records[0].error == "upstream_read_timeout"


def test_request_that_reached_the_upstream_is_not_resent():
    """A new connection lost after the request was sent: 502, and no other node gets it."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, BODY))
    gw.upstream(0).protocol.connectionLost(Failure(ConnectionDone()))
    assert client.value().startswith(b"HTTP/1.1 502")
    assert gw.requests_sent() == 1


MODELS = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n"


def one_node(retries: int = 1) -> str:
    return BASE_CONFIG.replace("    10.0.0.2:8080 1\n", "").replace("retries = 1", f"retries = {retries}")


def test_post_on_a_reused_connection_is_not_resent():
    """A reused connection lost after the upstream read the request (it reset, say):
    502, and the POST reached the upstream exactly once."""
    gw = Gateway(one_node())
    _, first = gw.client(post(CHAT, BODY))
    gw.upstream(0).send(response())
    assert first.value().startswith(b"HTTP/1.1 200")
    _, client = gw.client(post(CHAT, BODY))
    upstream = gw.upstream(0)
    assert upstream.received().count(b"POST ") == 2  # the pooled connection is reused
    upstream.protocol.connectionLost(Failure(ConnectionLost()))
    assert client.value().startswith(b"HTTP/1.1 502")
    assert error_of(client.value())["code"] == "bad_gateway"
    assert gw.requests_sent() == 2 and len(gw.connects()) == 1
    assert gw.records[-1].error == "upstream_closed"


def test_stale_get_is_retried_once_on_a_new_connection():
    """A bodiless GET whose reused connection was lost before any of the answer goes
    once more to the same node, on a new connection."""
    gw = Gateway(one_node())
    _, first = gw.client(MODELS)
    gw.upstream().send(response())
    assert first.value().startswith(b"HTTP/1.1 200")
    _, client = gw.client(MODELS)
    assert len(gw.connects()) == 1  # the pooled connection is reused
    gw.upstream(0).protocol.connectionLost(Failure(ConnectionDone()))
    assert len(gw.connects()) == 2
    gw.upstream(1).send(response())
    assert client.value().startswith(b"HTTP/1.1 200")
    assert gw.records[-1].retries == 1


def test_stale_get_is_retried_only_once():
    """The GET's second try lost before an answer too (now on a new connection): 502."""
    gw = Gateway(one_node())
    gw.client(MODELS)
    gw.upstream().send(response())
    _, client = gw.client(MODELS)
    gw.upstream(0).protocol.connectionLost(Failure(ConnectionDone()))
    gw.upstream(1).protocol.connectionLost(Failure(ConnectionDone()))
    assert client.value().startswith(b"HTTP/1.1 502")
    assert gw.requests_sent() == 3 and len(gw.connects()) == 2


def test_stale_retry_opens_a_new_connection():
    """After a stale reused connection, the retry does not take another idle (stale) one."""
    gw = Gateway(one_node(retries=0))
    gw.client(MODELS)
    gw.client(MODELS)
    gw.upstream(0).send(response())
    gw.upstream(1).send(response())
    _, client = gw.client(MODELS)
    gw.upstream(1).protocol.connectionLost(Failure(ConnectionDone()))  # the most recently used
    assert len(gw.connects()) == 3  # a new one, not idle connection 0
    assert gw.upstream(0).transport.disconnecting  # the other idle connection was closed
    gw.upstream(2).send(response())
    assert client.value().startswith(b"HTTP/1.1 200")


def test_disconnect_while_connecting_tries_no_other_node():
    """A client that leaves while its upstream connection is being made: no other
    node is tried for it."""
    gw = Gateway()
    channel, _ = gw.client(post(CHAT, BODY))
    channel.connectionLost(Failure(ConnectionDone()))
    assert gw.connects() == ["10.0.0.1:8080"]


@pytest.mark.parametrize("request_, answer", (
    (b"HEAD /v1/files/f HTTP/1.1\r\nHost: gw\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
    (b"GET /v1/files/f HTTP/1.1\r\nHost: gw\r\nIf-None-Match: \"e\"\r\n\r\n",
     b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\nContent-Length: 1234\r\n\r\n"),
), ids=("HEAD", "304"))
def test_bodiless_answers_keep_the_upstream_length(request_, answer):
    """HEAD and 304 answers tell the client the upstream's Content-Length (and no body follows)."""
    gw = Gateway()
    _, client = gw.client(request_)
    gw.upstream().send(answer)
    head, _, rest = client.value().partition(b"\r\n\r\n")
    assert b"\r\nContent-Length: 1234" in head and b"Transfer-Encoding" not in head and rest == b""


def test_paths_are_normalised_before_routing():
    """/v1/chat/%63ompletions and //v1//chat/completions are the chat route (its plugins
    apply), and are forwarded in normal form."""
    gw = Gateway()
    gw.client(post(b"/v1/chat/%63ompletions?x=%2F", BODY, b"Authorization: Bearer client\r\n"))
    sent = gw.upstream(0).received()
    assert sent.startswith(b"POST /v1/chat/completions?x=%2F HTTP/1.1")
    assert b"Authorization: Bearer sk-real" in sent  # the chat route's rewrite applied
    from openaigw.router import normalize
    assert normalize(b"//v1//chat/completions") == b"/v1/chat/completions"
    assert normalize(b"/a%2fb%7e%41") == b"/a%2Fb~A"


def test_requests_leave_no_reference_cycles():
    """A request's objects are freed by reference counting, not left to the cyclic GC
    (which cost ~10% of the CPU under load when each request made a cycle)."""
    import gc

    config = BASE_CONFIG.replace("    10.0.0.2:8080 1\n", "").replace(
        "proxy-rewrite.headers.set", "limit-count.count = 100\nlimit-count.time_window = 60\n"
        "ai-rate-limiting.limit = 100000\nai-rate-limiting.time_window = 60\nproxy-rewrite.headers.set")
    gw = Gateway(config, metrics=True)
    channel, client = gw.client()

    def one() -> None:
        channel.dataReceived(post(CHAT, b'{"model": "m", "stream": true, "messages": []}'))
        upstream = gw.upstream(0)
        upstream.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                      b"\r\n10\r\ndata: {\"a\": 1}\n\n\r\n0\r\n\r\n")
        upstream.transport.clear()
        assert client.value().startswith(b"HTTP/1.1 200")
        client.clear()

    one()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            one()
        gc.collect()
        # (Twisted < 24 leaves small cycles of its own: a fired Deferred and its canceller.)
        left = [type(o).__name__ for o in gc.garbage
                if type(o).__module__.startswith("openaigw") or isinstance(o, Headers)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


def test_relay_that_raises_at_the_end_still_ends_the_request(monkeypatch):
    """A BodyRelay.connectionLost that raises partway still fires ``done``: the request
    is reported (its completion callbacks run, limit-conn gives its slot back) and the
    client connection does not hang open."""
    from openaigw.usage import UsageMeter

    def broken(self, complete):
        raise RuntimeError("meter bug")

    monkeypatch.setattr(UsageMeter, "finish", broken)
    config = BASE_CONFIG.replace("proxy-rewrite.headers.set", "limit-conn.conn = 1\nproxy-rewrite.headers.set")
    gw = Gateway(config)
    _, client = gw.client(post(CHAT, BODY))
    gw.upstream().send(response(body=b'{"a": 1}'))
    assert len(gw.records) == 1
    assert client.disconnected or client.disconnecting
    assert len(gw.runtime.concurrency) == 0


def test_relay_failing_before_the_body_stops_the_upstream_body(monkeypatch):
    """If the relay raises after Upstream.send() returned, before the body has a consumer,
    the upstream body is stopped (not buffered in the response until it ends), and the
    client gets a 500."""
    from openaigw.relay import RouteResource

    def broken(self, exchange, head, length):
        raise RuntimeError("head bug")

    monkeypatch.setattr(RouteResource, "send_head", broken)
    gw = Gateway()
    _, client = gw.client(post(CHAT, BODY))
    upstream = gw.upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"6\r\ndata: \r\n")
    assert upstream.transport.producerState == "stopped"
    assert client.value().startswith(b"HTTP/1.1 500")
    assert len(gw.records) == 1


def test_client_leaving_stops_the_upstream_even_if_the_meter_raises(monkeypatch):
    """A client that leaves mid-stream stops the upstream body first: a meter that
    raises while being told the body was cut does not keep the upstream streaming."""
    from openaigw.usage import UsageMeter

    def broken(self, complete):
        raise RuntimeError("meter bug")

    monkeypatch.setattr(UsageMeter, "finish", broken)
    gw = Gateway()
    channel, _ = gw.client(post(CHAT, BODY))
    upstream = gw.upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"6\r\ndata: \r\n")
    channel.connectionLost(Failure(ConnectionDone()))
    assert upstream.transport.producerState == "stopped"
    assert len(gw.records) == 1


def test_reused_upstream_connection_times_each_head():
    """One timer per upstream connection: a request on a reused connection still gets a
    504 timeout_read after its own start (not the first request's, nor later)."""
    gw = Gateway(BASE_CONFIG.replace("    10.0.0.2:8080 1\n", ""))
    channel, client = gw.client(post(CHAT, BODY))
    upstream = gw.upstream()
    gw.reactor.advance(25)  # the first answer's head is slow, but in time
    upstream.send(response())
    client.clear()
    channel.dataReceived(post(CHAT, BODY))
    assert len(gw.connects()) == 1  # the same connection
    gw.reactor.advance(29.5)
    assert client.value() == b""
    gw.reactor.advance(1)
    assert client.value().startswith(b"HTTP/1.1 504")
