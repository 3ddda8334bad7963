"""Gateway keys and limits, in memory with a fake clock."""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from openaigw.config import ConfigError, parse
from openaigw.consumers import KeyRing, presented_key
from openaigw.counters import MemoryConcurrency, MemoryLeakyBuckets, MemoryWindowCounters
from openaigw.interfaces import IConcurrency, ILeakyBuckets, IPlugin, IRequestFilter, IWindowCounters
from openaigw.plugins import REGISTRY
from openaigw.runtime import Runtime
from twisted.web.http_headers import Headers

from tests.memory import Gateway, now, post

KEY_A = "sk-gw-team-a-0123456789abcdef"
KEY_B = "sk-gw-team-b-0123456789abcdef"
CHAT = b"/v1/chat/completions"
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hello there"}]}'

CONFIG = f"""
[upstream:up]
scheme = http
nodes = 10.0.0.1:8080
timeout_read = 30

[consumer:team-a]
key_sha256 = {hashlib.sha256(KEY_A.encode()).hexdigest()}
limit-count.count = 5
limit-count.time_window = 3600

[consumer:team-b]
key = {KEY_B}

[route:chat]
uri = /v1/chat/completions
upstream = up
key-auth = on
limit-count.count = 3
limit-count.time_window = 60
proxy-rewrite.headers.set.Authorization = Bearer sk-real
"""


def with_key(key: str, body: bytes = BODY, header: str = "Authorization: Bearer {key}") -> bytes:
    return post(CHAT, body, (header.format(key=key) + "\r\n").encode())


def answer(body: dict, gzipped: bool = False) -> bytes:
    raw = json.dumps(body).encode()
    extra = b""
    if gzipped:
        raw, extra = gzip.compress(raw), b"Content-Encoding: gzip\r\n"
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(raw) + raw)


def completion(prompt: int = 10, completion: int = 20) -> dict:
    return {"id": "c", "object": "chat.completion", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}


def status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def headers_of(raw: bytes) -> dict:
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return {k.lower(): v for k, v in (line.split(b": ", 1) for line in head)}


def error_of(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]


def test_interfaces():
    """Stores and every plugin's filter provide their interfaces."""
    clock = Clock()
    assert verifyObject(IWindowCounters, MemoryWindowCounters(clock))
    assert verifyObject(ILeakyBuckets, MemoryLeakyBuckets(clock))
    assert verifyObject(IConcurrency, MemoryConcurrency())
    config = parse(CONFIG.replace("[route:chat]", "[route:chat]\nlimit-req.rate = 1\nlimit-conn.conn = 1\n"
                                  "ai-rate-limiting.limit = 10\nai-rate-limiting.time_window = 60"), "gw.ini", {})
    runtime = Runtime.memory(clock)
    for plugin in config.routes[0].plugins:
        assert verifyObject(IPlugin, REGISTRY[plugin.name])
        assert verifyObject(IRequestFilter, REGISTRY[plugin.name].create(plugin.settings, runtime, "route:chat"))


# --- stores ------------------------------------------------------------------------

def test_window_counters_align_and_expire():
    """Windows are aligned to their length, report time to reset, and are dropped once over."""
    clock = Clock()
    clock.advance(125)
    counters = MemoryWindowCounters(clock)
    assert now(counters.add("k", 60, 1)) == (1, 55)
    assert now(counters.add("k", 60, 2)) == (3, 55)
    assert now(counters.peek("k", 60)) == (3, 55)
    clock.advance(55)
    assert now(counters.peek("k", 60)) == (0, 60)
    for i in range(10000):
        counters.add(f"client-{i}", 60, 1)
    assert len(counters) >= 10000
    clock.advance(61)
    counters.peek("k", 60)  # a later access sweeps what expired
    assert len(counters) == 0


def test_stores_sweep_on_any_operation_at_most_every_few_seconds():
    """Expired windows go on the next operation of any kind once the sweep is due,
    not before it is."""
    from openaigw.counters import _SWEEP_SECONDS

    clock = Clock()
    counters = MemoryWindowCounters(clock)
    counters.add("a", 1, 1)  # (the first operation sweeps: nothing yet)
    clock.advance(2)
    counters.add("b", 1, 1)
    assert len(counters) == 2  # "a" is over, but the sweep is not due
    clock.advance(_SWEEP_SECONDS)
    counters.add("c", 100, 1)
    assert len(counters) == 1


def test_leaky_bucket_delays_then_rejects():
    """rate 5/s burst 2: 0, 0.2 s, 0.4 s of delay, then rejection until it drains."""
    clock = Clock()
    buckets = MemoryLeakyBuckets(clock)
    assert [now(buckets.take("k", 5, 2)) for _ in range(3)] == [(True, 0.0), (True, 0.2), (True, 0.4)]
    admitted, retry_after = now(buckets.take("k", 5, 2))
    assert not admitted and retry_after == pytest.approx(0.2)
    clock.advance(0.4)
    assert now(buckets.take("k", 5, 2)) == (True, pytest.approx(0.2))
    clock.advance(20)
    buckets.take("other", 5, 2)
    assert len(buckets) == 1  # "k" drained and was dropped


def test_concurrency_slots():
    """limit-conn slots are taken and given back; idle keys take no memory."""
    slots = MemoryConcurrency()
    assert now(slots.acquire("k", 2)) and now(slots.acquire("k", 2))
    assert not now(slots.acquire("k", 2))
    assert now(slots.release("k")) is None
    assert now(slots.acquire("k", 2))
    slots.release("k")
    slots.release("k")
    assert len(slots) == 0


# --- keys ----------------------------------------------------------------------------

@pytest.mark.parametrize("header, value", [
    (b"Authorization", b"Bearer sk-x"), (b"authorization", b"bearer   sk-x"),
    (b"api-key", b"sk-x"), (b"X-API-Key", b"sk-x"),
])
def test_presented_key(header, value):
    """Keys are read from Bearer authorization, api-key (Azure) and X-API-Key."""
    assert presented_key(Headers({header: [value]})) == b"sk-x"


def test_presented_key_absent():
    """Basic auth or no header: no key."""
    assert presented_key(Headers({b"Authorization": [b"Basic eDp5"]})) is None
    assert presented_key(Headers()) is None


def test_keyring_matches_digests():
    """A key is found by its SHA-256 digest only."""
    ring = KeyRing()
    ring.add(hashlib.sha256(b"sk-right").digest(), "consumer")
    assert ring.find(b"sk-right") == "consumer"
    assert ring.find(b"sk-wrong") is None


def test_missing_and_wrong_key_are_401():
    """No key or an unknown key: 401 invalid_api_key, nothing sent upstream."""
    gw = Gateway(CONFIG)
    for request in (post(CHAT, BODY), with_key("sk-gw-wrong-key-000000000")):
        _, client = gw.client(request)
        assert status(client.value()) == 401
        assert error_of(client.value())["code"] == "invalid_api_key"
        assert headers_of(client.value())[b"www-authenticate"].startswith(b"Bearer")
    assert gw.requests_sent() == 0


@pytest.mark.parametrize("header", ["Authorization: Bearer {key}", "api-key: {key}", "X-API-Key: {key}"])
def test_valid_key_replaced_by_consumer_name(header):
    """A valid key in any supported header passes; upstream sees the real key and the consumer."""
    gw = Gateway(CONFIG)
    gw.client(with_key(KEY_B, header=header))
    sent = gw.upstream().received()
    assert KEY_B.encode() not in sent
    lines = sent.split(b"\r\n")
    assert b"Authorization: Bearer sk-real" in lines
    assert b"X-Consumer-Username: team-b" in lines
    assert not any(line.lower().startswith((b"api-key", b"x-api-key")) for line in lines)


def test_every_credential_header_is_dropped_in_any_case():
    """Every credential the client sent (any header, any case, all at once) stays out of
    the upstream request, and the consumer's name replaces a client's own claim."""
    gw = Gateway(CONFIG)
    extra = (f"AUTHORIZATION: Bearer {KEY_B}\r\nAPI-KEY: sk-other\r\nx-api-KEY: sk-third\r\n"
             "X-CONSUMER-USERNAME: team-a\r\n").encode()
    _, client = gw.client(post(CHAT, BODY, extra))
    sent = gw.upstream().received()
    head = sent.split(b"\r\n\r\n", 1)[0].lower()
    assert b"sk-gw-team" not in head and b"sk-other" not in head and b"sk-third" not in head
    assert b"api-key" not in head and head.count(b"authorization: ") == 1
    assert head.count(b"x-consumer-username") == 1 and b"x-consumer-username: team-b" in head


def test_own_headers_are_stored_as_twisted_stores_them():
    """A value set under its stored name (as the gateway sets its own headers) leaves a
    Headers as setRawHeaders would (the name's stored case differs between Twisted
    versions), replacing any value the name had in another case."""
    from openaigw.headers import stored_name

    for name in (b"X-RateLimit-Limit", b"x-ai-ratelimit-reset-tokens", b"X-Consumer-Username",
                 b"accept-encoding", b"WWW-Authenticate"):
        ours, theirs = Headers({b"Accept-Encoding": [b"gzip"]}), Headers({b"Accept-Encoding": [b"gzip"]})
        ours._rawHeaders[stored_name(name)] = [b"7"]
        theirs.setRawHeaders(name, [b"7"])
        assert list(ours.getAllRawHeaders()) == list(theirs.getAllRawHeaders())
        assert ours.getRawHeaders(name.upper()) == [b"7"]


def test_counter_names_per_consumer():
    """A route's limit counts each consumer under its own name (remembered once per
    consumer), and a consumer's own limit under its scope."""
    config = CONFIG.replace("limit-count.count = 3", "limit-count.count = 30")
    gw = Gateway(config)
    for i, key in enumerate((KEY_B, KEY_A, KEY_B)):
        _, client = gw.client(with_key(key))
        gw.upstream(i).send(answer(completion()))
        assert status(client.value()) == 200
    counts = {key: count for (key, _), (_, count) in gw.runtime.counters._counts.items()}
    assert counts == {"limit-count/route:chat|consumer=team-b": 2, "limit-count/route:chat|consumer=team-a": 1,
                      "limit-count/consumer:team-a": 1}


# --- request limits -----------------------------------------------------------------

def test_limit_headers_replace_the_upstreams_own():
    """The gateway's limit headers replace what the upstream said under those names
    (in any case): one of each, the gateway's, and the upstream's others untouched."""
    config = CONFIG + "ai-rate-limiting.limit = 1000\nai-rate-limiting.time_window = 60\n"
    gw = Gateway(config)
    _, client = gw.client(with_key(KEY_B))
    raw = json.dumps(completion()).encode()
    gw.upstream().send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-ratelimit-limit: 99\r\n"
                       b"X-RATELIMIT-REMAINING: 98\r\nX-AI-RateLimit-Limit-Tokens: 7\r\n"
                       b"X-RateLimit-Limit-Requests: 500\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw)
    head = client.value().split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
    assert sorted(line for line in head if b"ratelimit" in line) == [
        b"x-ai-ratelimit-limit-tokens: 1000", b"x-ai-ratelimit-remaining-tokens: 1000",
        b"x-ai-ratelimit-reset-tokens: 60", b"x-ratelimit-limit-requests: 500", b"x-ratelimit-limit: 3",
        b"x-ratelimit-remaining: 2", b"x-ratelimit-reset: 60"]


def test_limit_count_rejects_over_the_window_and_resets():
    """The 4th request in a 60 s window gets 429 with Retry-After and the X-RateLimit headers."""
    gw = Gateway(CONFIG)
    for i in range(3):
        _, client = gw.client(with_key(KEY_B))
        gw.upstream(i).send(answer(completion()))
        headers = headers_of(client.value())
        assert headers[b"x-ratelimit-limit"] == b"3"
        assert headers[b"x-ratelimit-remaining"] == b"%d" % (2 - i)
    gw.reactor.advance(20)
    _, client = gw.client(with_key(KEY_B))
    assert status(client.value()) == 429
    error = error_of(client.value())
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "3 per 60s" in error["message"] and "route chat" in error["message"]
    headers = headers_of(client.value())
    assert headers[b"retry-after"] == headers[b"x-ratelimit-reset"] == b"40"
    assert headers[b"x-ratelimit-remaining"] == b"0"
    assert gw.requests_sent() == 3
    gw.reactor.advance(40)
    _, client = gw.client(with_key(KEY_B))
    assert client.value() == b""  # sent upstream, waiting
    assert gw.requests_sent() == 4


def test_consumer_and_route_limits_both_apply():
    """team-a's own limit (5/h) and the route's (3/min, per consumer) both count;
    the headers report whichever has less left."""
    config = CONFIG.replace("limit-count.count = 3", "limit-count.count = 30")
    gw = Gateway(config)
    for i in range(5):
        _, client = gw.client(with_key(KEY_A))
        gw.upstream(i).send(answer(completion()))
        assert headers_of(client.value())[b"x-ratelimit-remaining"] == b"%d" % (4 - i)
        assert headers_of(client.value())[b"x-ratelimit-limit"] == b"5"
    _, client = gw.client(with_key(KEY_A))
    assert status(client.value()) == 429
    assert "consumer team-a" in error_of(client.value())["message"]
    _, client = gw.client(with_key(KEY_B))  # another consumer is not affected
    assert client.value() == b""


def test_limit_req_delays_then_rejects():
    """rate 1/s, burst 1: the 2nd request waits 1 s, the 3rd is rejected."""
    config = CONFIG.replace("limit-count.count = 3", "limit-req.rate = 1\nlimit-req.burst = 1\nlimit-count.count = 30")
    gw = Gateway(config)
    gw.client(with_key(KEY_B))
    assert gw.requests_sent() == 1
    gw.client(with_key(KEY_B))
    assert gw.requests_sent() == 1  # delayed
    _, third = gw.client(with_key(KEY_B))
    assert status(third.value()) == 429
    assert headers_of(third.value())[b"retry-after"] == b"1"
    gw.reactor.advance(1)
    assert gw.requests_sent() == 2


def test_limit_req_nodelay_and_disconnect_while_delayed():
    """nodelay passes within the burst at once; a client that leaves while delayed is never sent."""
    config = CONFIG.replace("limit-count.count = 3", "limit-req.rate = 1\nlimit-req.burst = 1\nlimit-count.count = 30")
    gw = Gateway(config.replace("limit-req.burst = 1", "limit-req.burst = 1\nlimit-req.nodelay = on"))
    gw.client(with_key(KEY_B))
    gw.client(with_key(KEY_B))
    assert gw.requests_sent() == 2
    gw = Gateway(config)
    gw.client(with_key(KEY_B))
    channel, _ = gw.client(with_key(KEY_B))
    channel.connectionLost(Failure(ConnectionDone()))
    gw.reactor.advance(5)
    assert gw.requests_sent() == 1


def test_limit_conn_counts_streams_until_they_end():
    """conn 1: a second request during a stream is rejected; the slot frees when the stream
    ends or its client leaves."""
    config = CONFIG.replace("limit-count.count = 3", "limit-conn.conn = 1\nlimit-count.count = 30")
    gw = Gateway(config)
    channel, _ = gw.client(with_key(KEY_B))
    gw.upstream(0).send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    _, second = gw.client(with_key(KEY_B))
    assert status(second.value()) == 429
    assert headers_of(second.value())[b"retry-after"] == b"1"
    gw.upstream(0).send(b"0\r\n\r\n")  # the stream ends
    _, third = gw.client(with_key(KEY_B))
    assert third.value() == b""
    channel3, _ = gw.client(with_key(KEY_A))  # another consumer has its own slot
    assert gw.requests_sent() == 3
    channel3.connectionLost(Failure(ConnectionDone()))
    gw.client(with_key(KEY_A))
    assert gw.requests_sent() == 4


# --- token limits -----------------------------------------------------------------

TOKENS = CONFIG.replace("limit-count.count = 3", "ai-rate-limiting.limit = 100\nai-rate-limiting.time_window = 60\n"
                        "limit-count.count = 30")


def test_token_limit_charges_usage_and_rejects():
    """Usage from JSON answers (gzip too) adds up; at the limit the next request is a 429 tokens."""
    gw = Gateway(TOKENS)
    _, client = gw.client(with_key(KEY_B))
    sent = gw.upstream(0).received()
    assert b"Accept-Encoding: identity" in sent
    gw.upstream(0).send(answer(completion(10, 20)))
    headers = headers_of(client.value())
    assert headers[b"x-ai-ratelimit-limit-tokens"] == b"100"
    assert headers[b"x-ai-ratelimit-remaining-tokens"] == b"100"  # before this answer's charge
    _, client = gw.client(with_key(KEY_B))
    gw.upstream(1).send(answer(completion(30, 40), gzipped=True))
    assert headers_of(client.value())[b"x-ai-ratelimit-remaining-tokens"] == b"70"
    _, client = gw.client(with_key(KEY_B))
    assert status(client.value()) == 429
    error = error_of(client.value())
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert headers_of(client.value())[b"x-ai-ratelimit-remaining-tokens"] == b"0"
    _, other = gw.client(with_key(KEY_A))  # counted per consumer
    assert other.value() == b""


def test_the_charge_is_the_usage_the_access_record_reports():
    """The usage is read once, when the exchange is over: the token limit charges what
    the access record reports (an estimate, for an answer cut short, too)."""
    gw = Gateway(TOKENS)
    counters = gw.runtime.counters
    gw.client(with_key(KEY_B))
    gw.upstream(0).send(answer(completion(10, 20)))
    gw.client(with_key(KEY_B))
    raw = json.dumps(completion(1, 2)).encode()
    gw.upstream(1).send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                        % len(raw) + raw[:40])
    gw.upstream(1).protocol.connectionLost(Failure(ConnectionDone()))
    (first, cut) = [record.usage for record in gw.records]
    assert (first.total_tokens, first.estimated, cut.estimated) == (30, False, True)
    used = now(counters.peek("ai-rate-limiting/route:chat|consumer=team-b", 60))[0]
    assert used == first.total_tokens + cut.total_tokens


def test_upstream_errors_are_not_charged():
    """A 4xx/5xx answer uses no tokens."""
    gw = Gateway(TOKENS)
    gw.client(with_key(KEY_B))
    body = b'{"error": {"message": "bad", "type": "invalid_request_error", "param": null, "code": null}}'
    gw.upstream(0).send(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(body), body))
    counters = gw.runtime.counters
    assert now(counters.peek("ai-rate-limiting/route:chat|consumer=team-b", 60))[0] == 0


def sse(*events: dict, done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_stream_without_include_usage_is_counted_and_stripped():
    """The gateway asks for usage; the client gets exactly what it asked for; tokens count."""
    gw = Gateway(TOKENS)
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    _, client = gw.client(with_key(KEY_B, body))
    sent = gw.upstream(0).received().split(b"\r\n\r\n", 1)[1]
    assert json.loads(sent)["stream_options"] == {"include_usage": True}
    upstream = gw.upstream(0)
    upstream.send(STREAM_HEAD)
    chunk = {"id": "c", "choices": [{"delta": {"content": "hi"}}], "usage": None}
    usage = {"id": "c", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
    upstream.send(chunked(sse(chunk, chunk, done=False)))
    upstream.send(chunked(sse(usage)))
    upstream.send(b"0\r\n\r\n")
    relayed = client.value().split(b"\r\n\r\n", 1)[1]
    assert b"usage" not in relayed
    assert relayed.count(b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}]}\n\n') == 2
    assert b"data: [DONE]" in relayed
    assert now(gw.runtime.counters.peek("ai-rate-limiting/route:chat|consumer=team-b", 60))[0] == 10


def test_stream_with_include_usage_passes_usage_chunk():
    """A client that asked for usage gets the chunk untouched, and is charged by it."""
    gw = Gateway(TOKENS)
    body = b'{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}'
    _, client = gw.client(with_key(KEY_B, body))
    upstream = gw.upstream(0)
    assert upstream.received().endswith(body)  # not rewritten
    usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    upstream.send(STREAM_HEAD + chunked(sse({"choices": [], "usage": None}, usage)) + b"0\r\n\r\n")
    assert b'"usage":{"prompt_tokens":1' in client.value()
    assert now(gw.runtime.counters.peek("ai-rate-limiting/route:chat|consumer=team-b", 60))[0] == 3


def test_cut_stream_is_charged_an_estimate():
    """A client that leaves mid-stream is charged the prompt estimate plus one token a chunk."""
    gw = Gateway(TOKENS)
    content = "word " * 40  # 200 characters: about 50 tokens
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": content}]})
    channel, _ = gw.client(with_key(KEY_B, body.encode()))
    upstream = gw.upstream(0)
    upstream.send(STREAM_HEAD + chunked(sse(*[{"choices": [{"delta": {"content": "x"}}], "usage": None}] * 5,
                                            done=False)))
    channel.connectionLost(Failure(ConnectionDone()))
    assert now(gw.runtime.counters.peek("ai-rate-limiting/route:chat|consumer=team-b", 60))[0] == 50 + 4 + 5


def test_usage_found_at_every_split():
    """SSE usage parsing and stripping give the same result however the stream is cut."""
    from openaigw.usage import UsageMeter

    chunk = {"choices": [{"delta": {"content": "a"}}], "usage": None}
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}}
    stream = sse(chunk, chunk, usage).replace(b"\n", b"\r\n", 2)  # mixed line ends too
    expected = None
    for cut in range(len(stream) + 1):
        for cut2 in (cut, min(len(stream), cut + 7)):
            meter = UsageMeter(b"text/event-stream; charset=utf-8", b"", True)
            out = meter.feed(stream[:cut]) + meter.feed(stream[cut:cut2]) + meter.feed(stream[cut2:])
            out += meter.finish(True)
            assert meter.usage(lambda: 0).total_tokens == 9 and not meter.usage(lambda: 0).estimated
            expected = expected or out
            assert out == expected
    assert b"usage" not in expected and expected.count(b"data:") == 3


# --- configuration ------------------------------------------------------------------

@pytest.mark.parametrize("change, expected", [
    (("[consumer:team-b]\nkey = " + KEY_B, "[consumer:team-b]\n"), "[consumer:team-b]: needs key_sha256"),
    (("key = " + KEY_B, "key = short"), "[consumer:team-b] key: a key needs at least 16 characters"),
    (("key = " + KEY_B, "key = " + KEY_A), "[consumer:team-b]: same key as [consumer:team-a]"),
    (("key_sha256 = ", "key_sha256 = zz"), "[consumer:team-a] key_sha256: expected 64 hex digits"),
    (("limit-count.count = 3", "limit-count.count = three"), "[route:chat] limit-count.count: 'three' is not a whole number"),
    (("limit-count.count = 3", "limit-count.count = 0"), "[route:chat] limit-count.count: '0' must be at least 1"),
    (("limit-count.time_window = 60\n", ""), "[route:chat] limit-count.time_window: is required"),
    (("limit-count.count = 3", "limit-count.count = 3\nlimit-count.key = nobody"), "[route:chat] limit-count.key: 'nobody'"),
    (("limit-count.count = 5", "limit-count.count = 5\nlimit-count.key = route"), "[consumer:team-a] limit-count.key: a consumer's limits"),
    (("key-auth = on", "key-auth = off\nlimit-count.key = consumer"), "limit-count.key: counting per consumer needs key-auth"),
    (("key-auth = on", "key-auth = maybe"), "[route:chat] key-auth: 'maybe' is not on/off"),
    (("limit-count.count = 3", "ai-rate-limiting.limit = 5\nai-rate-limiting.time_window = 5\n"
      "ai-rate-limiting.limit_strategy = cost"), "limit_strategy: 'cost' is not one of total_tokens"),
    (("limit-count.count = 3", "limit-req.rate = 0"), "[route:chat] limit-req.rate: is required and must be above 0"),
    (("limit-count.count = 5", "limit-count.count = 5\nproxy-rewrite.uri = /x"), "[consumer:team-a] proxy-rewrite.uri: unknown key or plugin"),
])
def test_limit_config_errors(change, expected):
    """Bad limit and consumer settings name the section and key."""
    text = CONFIG.replace(*change)
    with pytest.raises(ConfigError) as caught:
        parse(text, "gw.ini", {})
    assert expected in str(caught.value)


def test_key_auth_needs_consumers():
    """A route with key-auth but no consumers defined is a config error."""
    text = CONFIG.split("[consumer:team-a]")[0] + "[route:chat]" + CONFIG.split("[route:chat]")[1]
    text = text.replace("limit-count.count = 3\nlimit-count.time_window = 60\n", "")
    with pytest.raises(ConfigError, match=r"\[route:chat\] key-auth: no \[consumer:NAME\] section"):
        parse(text, "gw.ini", {})


def test_usage_is_read_without_token_limits():
    """Tokens reach the access log and metrics on any route, not only with ai-rate-limiting."""
    gw = Gateway(CONFIG, metrics=True)
    gw.client(with_key(KEY_B))
    gw.upstream(0).send(answer(completion(10, 20)))
    assert gw.records[-1].usage.total_tokens == 30 and not gw.records[-1].usage.estimated


def test_usage_that_is_not_a_count_is_estimated():
    """A JSON answer whose token counts are not integers (true counts as 1 in Python)
    is metered by estimate; a total that is not one is the sum of the others."""
    from openaigw.usage import UsageMeter

    def metered(usage):
        meter = UsageMeter(b"application/json", b"", False)
        meter.feed(json.dumps({"choices": [], "usage": usage}).encode())
        meter.finish(True)
        return meter.usage(lambda: 100)

    assert metered({"prompt_tokens": True, "completion_tokens": 2}).estimated
    assert metered({"prompt_tokens": 1, "completion_tokens": 2.0}).estimated
    exact = metered({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": False})
    assert (exact.total_tokens, exact.estimated) == (3, False)


def test_responses_api_usage_and_no_injection():
    """Responses API streams carry usage in response.completed; their requests are not
    rewritten with stream_options."""
    from openaigw.usage import UsageMeter, ask_for_usage

    assert ask_for_usage({"stream": True, "input": "hi"}) is False
    assert ask_for_usage({"stream": True, "messages": []}) is True
    completed = {"type": "response.completed", "response": {"usage": {
        "input_tokens": 5, "output_tokens": 7, "total_tokens": 12}}}
    meter = UsageMeter(b"text/event-stream", b"", False)
    meter.feed(b"event: response.completed\ndata: " + json.dumps(completed).encode() + b"\n\n")
    meter.finish(True)
    assert (meter.usage(lambda: 0).prompt_tokens, meter.usage(lambda: 0).completion_tokens) == (5, 7)


def test_meter_gives_up_on_unbounded_input():
    """An endless event or a compression bomb is relayed untouched and estimated, not buffered."""
    import zlib

    from openaigw.usage import DECODE_LIMIT, EVENT_LIMIT, UsageMeter

    meter = UsageMeter(b"text/event-stream", b"", True)
    relayed = meter.feed(b"data: " + b"x" * (EVENT_LIMIT + 1))
    assert len(relayed) == EVENT_LIMIT + 7 and meter.feed(b"more") == b"more"
    assert meter.usage(lambda: 0).estimated
    bomb = zlib.compress(b"\0" * (DECODE_LIMIT * 8))
    meter = UsageMeter(b"application/json", b"deflate", False)
    assert meter.feed(bomb) == bomb
    meter.finish(True)
    assert meter.usage(lambda: 0).estimated


def test_header_keys_are_hashed():
    """A limit keyed by a header counts by its hash: a credential never becomes a counter name."""
    config = CONFIG.replace("key-auth = on\n", "").replace(
        "limit-count.time_window = 60", "limit-count.time_window = 60\nlimit-count.key = header:Authorization")
    gw = Gateway(config)
    gw.client(with_key("sk-client-canary-000000000"))
    keys = [key for key, _ in gw.runtime.counters._counts]
    assert len(keys) == 1 and "canary" not in keys[0] and "authorization=" in keys[0]


def test_prompt_estimate():
    """Four characters a token over messages' text (parts included), plus 4 a message;
    prompt and input strings count too; other fields and non-objects count nothing."""
    from openaigw.usage import estimate_prompt_tokens

    body = {"model": "m" * 400, "messages": [
        {"role": "system", "content": "a" * 40},
        {"role": "user", "content": [{"type": "text", "text": "b" * 40}, {"type": "image_url"}]},
    ]}
    assert estimate_prompt_tokens(body) == 80 // 4 + 4 * 2
    assert estimate_prompt_tokens({"prompt": ["c" * 8, "d" * 8]}) == 4
    assert estimate_prompt_tokens({"input": "e" * 12}) == 3
    assert estimate_prompt_tokens(["not", "an", "object"]) == 0
