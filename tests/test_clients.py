"""Slow, malformed and overreaching clients, in memory: deadlines for a request's head
and body, bytes an upstream may read differently, gateway-owned and underscored
headers, lines over Twisted's limit, and the cap on connections."""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from tests.memory import BASE_CONFIG, Gateway, post, response

CHAT = b"/v1/chat/completions"
BODY = b'{"model": "gpt-4o-mini", "messages": []}'
SLOW = BASE_CONFIG.replace(
    "max_body_size = 1K", "max_body_size = 1K\nclient_header_timeout = 10\nclient_body_timeout = 20")
KEY_AUTH = BASE_CONFIG.replace("proxy-rewrite.headers.set", "key-auth = on\nproxy-rewrite.headers.set") + (
    "\n[consumer:team-a]\nkey = gw-key-team-a-0123456789\n")


def error_of(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head
    return json.loads(body)["error"]


def trickle(gw: Gateway, channel, data: bytes, seconds: float = 1.0) -> None:
    """Send ``data`` one byte every ``seconds``."""
    for i in range(len(data)):
        channel.dataReceived(data[i:i + 1])
        gw.reactor.advance(seconds)


def test_slow_head_gets_408():
    """A head trickled a byte a second is cut at client_header_timeout with a 408."""
    gw = Gateway(SLOW)
    channel, client = gw.client()
    trickle(gw, channel, b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n")
    assert client.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert error_of(client.value())["code"] == "request_timeout"
    assert b"Connection: close" in client.value()
    assert client.disconnecting  # (the discarding second has passed too)
    assert gw.connects() == []
    (record,) = gw.records
    assert (record.status, record.error, record.client) == (408, "client_header_timeout", "192.0.2.7")


def test_head_deadline_counts_from_the_first_byte():
    """On a kept-alive connection, the next head's deadline starts with its first byte,
    not when the connection opened or the last answer ended."""
    gw = Gateway(SLOW)
    channel, client = gw.client(post(CHAT, BODY))
    gw.upstream().send(response())
    assert client.value().startswith(b"HTTP/1.1 200")
    client.clear()
    gw.reactor.advance(30)  # idle between requests: Twisted's idle timer's business
    channel.dataReceived(b"GET /v1/models HTTP/1.1\r\n")
    gw.reactor.advance(9.5)
    assert client.value() == b"" and not client.disconnecting
    channel.dataReceived(b"Host: gw\r\n\r\n")  # in time
    assert gw.upstream().received().endswith(b"\r\n\r\n") and b"GET /v1/models" in gw.upstream().received()
    gw.reactor.advance(25)  # the answer may take longer than the head's deadline
    assert client.value() == b"" and not client.disconnecting


def test_idle_connection_closes_after_the_site_timeout():
    """Between requests a kept-alive connection may idle for the Site's timeout (from
    the end of the last answer, however long that took), then it is closed."""
    gw = Gateway(SLOW)
    gw.site.timeOut = 60
    channel, client = gw.client()
    gw.reactor.advance(59)
    channel.dataReceived(post(CHAT, BODY))  # in time
    gw.reactor.advance(25)  # the answer takes its time: not idle
    gw.upstream().send(response())
    assert client.value().startswith(b"HTTP/1.1 200") and not client.disconnecting
    gw.reactor.advance(59)
    assert not client.disconnecting
    gw.reactor.advance(1)
    assert client.disconnecting


def test_slow_body_gets_408():
    """A body trickled a byte a second is cut at client_body_timeout with a 408."""
    gw = Gateway(SLOW)
    channel, client = gw.client(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n")
    trickle(gw, channel, b"x" * 19)
    assert client.value() == b""
    trickle(gw, channel, b"x")
    assert client.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert "body" in error_of(client.value())["message"]
    channel.dataReceived(b"x" * 80)  # read and dropped, for a moment
    assert gw.connects() == []
    gw.reactor.advance(1)
    assert client.disconnecting
    (record,) = gw.records
    assert (record.status, record.error, record.path) == (408, "client_body_timeout", "/v1/chat/completions")


def test_body_in_time_is_served():
    """A body that arrives whole before its deadline is proxied as usual."""
    gw = Gateway(SLOW)
    channel, client = gw.client(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n"
                                % len(BODY))
    for i in range(0, len(BODY), 4):
        channel.dataReceived(BODY[i:i + 4])
        gw.reactor.advance(1.5)  # 15 s in all: under 20
    gw.upstream().send(response())
    assert client.value().startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("target", [
    b"/v1/models\x7f", b"/v1/mod\x80els", b"/v1/mod\xb0els", b"/v1/caf\xc3\xa9", b"/v1/models?q=\xa0",
])
def test_request_target_bytes_refused(target):
    """DEL, raw non-ASCII (127-176 too, which Twisted lets through) and UTF-8 in the
    request target: 400, on every Twisted version."""
    gw = Gateway()
    _, client = gw.client(b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert error_of(client.value())["type"] == "invalid_request_error"
    assert gw.connects() == []


@pytest.mark.parametrize("header", [
    b"X-A: 1\r2", b"X-A: 1\x002", b"X-A: 1\n2", b"X-A: 1\r\nX-A: 1\r2", b"X A: 1", b"X\x00A: 1", b"X\xc3\xa9: 1",
])
def test_header_bytes_refused(header):
    """Bare CR, NUL and LF in header values, and names that are not tokens: 400, on
    every Twisted version (22.4 lets them through)."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, BODY, header + b"\r\n"))
    assert client.value().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert set(error_of(client.value())) == {"message", "type", "param", "code"}
    assert gw.connects() == []


def test_method_must_be_a_token():
    """A method with a control byte is refused (Twisted 22.4 takes any ASCII)."""
    gw = Gateway()
    _, client = gw.client(b"GE\x01T /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 400")
    assert gw.connects() == []


def test_header_values_may_hold_utf8_and_tabs():
    """obs-text (UTF-8, say) and HTAB stay allowed in header values."""
    gw = Gateway()
    gw.client(post(CHAT, BODY, "X-Title: caf\u00e9\tbar\r\n".encode("utf-8")))
    assert "X-Title: caf\u00e9\tbar".encode("utf-8") in gw.upstream().received()


@pytest.mark.parametrize("path", [
    b"/v1/chat%2Fcompletions", b"/v1/chat%2fcompletions", b"/v1/chat%5Ccompletions", b"/v1/chat\\completions",
])
def test_encoded_slash_and_backslash_refused(path):
    """An encoded slash or a backslash would miss the exact (key-auth) route, land on
    /v1/* and be read as chat completions by an upstream that decodes paths: 400."""
    gw = Gateway(KEY_AUTH)
    _, client = gw.client(post(path, BODY))
    assert client.value().startswith(b"HTTP/1.1 400")
    assert error_of(client.value())["code"] == "invalid_path"
    assert gw.connects() == []


def test_gateway_headers_from_clients_are_dropped():
    """X-Consumer-Username and the X-Forwarded-* the gateway sets are never the
    client's, on routes without key-auth too."""
    gw = Gateway()
    gw.client(b"GET /v1/models HTTP/1.0\r\nX-Consumer-Username: admin\r\nX-Forwarded-Host: evil\r\n"
              b"X-Forwarded-Proto: https\r\n\r\n")
    sent = gw.upstream().received().lower()
    assert b"admin" not in sent and b"evil" not in sent
    assert b"x-forwarded-proto: http\r\n" in sent


def test_underscored_headers_dropped_by_default():
    """X_Consumer_Username cannot pass beside the real X-Consumer-Username."""
    gw = Gateway(KEY_AUTH)
    gw.client(post(CHAT, BODY, b"Authorization: Bearer gw-key-team-a-0123456789\r\nX_Consumer_Username: admin\r\n"
                   b"X-Consumer-Username: admin\r\nX_Other: 1\r\n"))
    sent = gw.upstream().received()
    assert b"X-Consumer-Username: team-a" in sent
    assert b"admin" not in sent and b"_Other" not in sent and b"_other" not in sent


def test_underscores_in_headers_on_keeps_them():
    """underscores_in_headers = on forwards them (but never the gateway's own)."""
    gw = Gateway(BASE_CONFIG.replace("max_body_size = 1K", "max_body_size = 1K\nunderscores_in_headers = on"))
    gw.client(post(CHAT, BODY, b"X_Other: 1\r\n"))
    assert b"x_other: 1" in gw.upstream().received().lower()


def test_header_line_over_the_limit_is_431():
    """A 64 KiB header line gets a 431, not a bare close."""
    gw = Gateway()
    channel, client = gw.client(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert error_of(client.value())["code"] == "request_header_fields_too_large"
    channel.dataReceived(b"more")
    gw.reactor.advance(1)
    assert client.disconnecting
    assert gw.connects() == []
    assert [(r.status, r.error) for r in gw.records] == [(431, "request_header_fields_too_large")]


def test_heads_over_twisteds_total_are_431():
    """Many header lines, over Twisted's 16 KiB for a head: 431 as well."""
    gw = Gateway()
    lines = b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 1000) for i in range(20))
    _, client = gw.client(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n" + lines + b"\r\n")
    assert client.value().startswith(b"HTTP/1.1 431")


def test_request_line_over_the_limit_is_414():
    """A request line over Twisted's line limit gets a 414."""
    gw = Gateway()
    _, client = gw.client(b"GET /v1/" + b"a" * 70000 + b" HTTP/1.1\r\n")
    assert client.value().startswith(b"HTTP/1.1 414 ")
    assert error_of(client.value())["code"] == "uri_too_long"


@pytest.mark.parametrize("head", [
    b"GET /v1/models HTTP/1.1\r\nNo colon here\r\n\r\n",
    b"GET /v1/models\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_twisteds_400s_are_openai_shaped(head):
    """What Twisted cannot parse gets its 400 with the gateway's JSON error body."""
    gw = Gateway()
    _, client = gw.client(head)
    assert client.value().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert error_of(client.value())["type"] == "invalid_request_error"
    assert gw.records[-1].status == 400


def test_connections_over_the_cap_get_503():
    """Past max_connections a connection gets a 503 and is closed; once one closes,
    a new one is served."""
    gw = Gateway(BASE_CONFIG.replace("max_body_size = 1K", "max_body_size = 1K\nmax_connections = 2"))
    first, _ = gw.client()
    gw.client()
    refused = gw.site.buildProtocol(IPv4Address("TCP", "192.0.2.8", 50001))
    transport = StringTransport()
    refused.makeConnection(transport)
    assert transport.value().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert error_of(transport.value())["code"] == "too_many_connections"
    assert b"Retry-After: 1" in transport.value()
    refused.dataReceived(b"GET /v1/models HTTP/1.1\r\n\r\n")
    assert transport.disconnecting
    first.connectionLost(None)
    _, client = gw.client(b"GET /v2/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 404")


def test_request_ids_are_fresh_random_bytes_in_every_process():
    """Request ids come from blocks of os.urandom: none repeats, and a forked worker
    does not hand out the ids its parent has yet to."""
    import os

    from openaigw.server import _Randomness

    random = _Randomness(block=64)
    taken = {random.take(16) for _ in range(40)}  # several blocks
    assert len(taken) == 40 and all(len(b) == 16 for b in taken)
    random.take(16)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        os.write(write, random.take(16))
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 16) != random.take(16)
    os.close(read)
    os.close(write)


def test_addresses_asked_once_per_connection():
    """Each request gets the connection's addresses without asking the transport again."""
    gw = Gateway()
    channel, client = gw.client()
    asked = []
    client.getHost = lambda: asked.append("host")
    client.getPeer = lambda: asked.append("peer")
    for _ in range(2):
        channel.dataReceived(post(CHAT, BODY))
        gw.upstream().send(response())
    assert asked == []
    assert gw.records[-1].client == "192.0.2.7"


def test_write_after_the_client_left_is_dropped():
    """As Twisted's Request.write: once the client is gone, a write (even the first,
    which would send the head) is dropped, not an AttributeError on the lost channel."""
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    gw = Gateway()
    channel, client = gw.client(post(CHAT, BODY))
    (request,) = channel.requests
    channel.connectionLost(Failure(ConnectionLost()))
    request.write(b"data: late\n\n")
    assert client.value() == b""


def test_more_than_one_host_header_refused():
    """Two Host headers are a 400 (RFC 9112 3.2): routes with hosts, the upstream's
    Host and a proxy in front could each read another one."""
    gw = Gateway()
    channel, client = gw.client(b"GET /v1/models HTTP/1.1\r\nHost: internal.example\r\nHost: gw\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert "Host" in error_of(client.value())["message"]
    assert gw.connects() == []


def test_pipelined_head_gets_its_deadline_when_parsing_resumes():
    """A head sent behind a request still being answered is timed from when the gateway
    reads it (the answer may take longer than the deadline): cut at 408 all the same."""
    gw = Gateway(SLOW)
    channel, client = gw.client(post(CHAT, BODY) + b"GET /v1/models HTTP/1.1\r\nHo")
    gw.reactor.advance(25)  # longer than the head's deadline: its own answer's time
    gw.upstream().send(response())
    assert client.value().startswith(b"HTTP/1.1 200")
    client.clear()
    gw.reactor.advance(9.5)
    assert client.value() == b""
    gw.reactor.advance(1)
    assert client.value().startswith(b"HTTP/1.1 408")


def test_a_new_connection_has_one_timer_for_its_idle_time_and_first_head():
    """A new connection's request costs no second timer (its timer is due no later
    than a head's deadline from the first byte); idle, it still lasts the Site's timeout."""
    gw = Gateway(SLOW)
    gw.site.timeOut = 60
    channel, client = gw.client()
    (timer,) = gw.reactor.getDelayedCalls()
    channel.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert gw.reactor.getDelayedCalls() == [timer] and timer.active()
    channel.dataReceived(b"Host: gw\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
    gw.upstream().send(response())
    assert client.value().startswith(b"HTTP/1.1 200")
    idle, client2 = gw.client()
    gw.reactor.advance(59)
    assert not client2.disconnecting
    gw.reactor.advance(1)
    assert client2.disconnecting
