"""The response cache and single flight, in memory: real Site and client, fake clock."""

from __future__ import annotations

import hashlib
import json
from typing import Dict, List

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from openaigw.cache.entry import Entry
from openaigw.cache.key import cache_key, cacheable, canonical_json
from openaigw.cache.redis_store import RedisCacheStore
from openaigw.cache.store import MemoryCacheStore
from openaigw.config import ConfigError, parse
from openaigw.interfaces import ICacheStore, IPlugin, IRequestFilter
from openaigw.plugins import REGISTRY
from openaigw.plugins.cache import CacheSettings

from tests.memory import Gateway, now, post, response

CHAT = b"/v1/chat/completions"
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hello there"}]}'
STREAM_BODY = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
ANSWER = json.dumps({"id": "c1", "choices": [{"message": {"content": "hi"}}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}).encode()
KEY_A = "sk-gw-team-a-0123456789abcdef"
KEY_B = "sk-gw-team-b-0123456789abcdef"

CONFIG = """
[upstream:up]
scheme = http
nodes = 10.0.0.1:8080
timeout_read = 30

[route:chat]
uri = /v1/chat/completions
upstream = up
cache = on
cache.ttl = 60
proxy-rewrite.headers.set.Authorization = Bearer sk-real

[route:api]
uri = /v1/*
upstream = up
cache = on
"""


def events(*contents: str, done: bool = True, usage: bool = False) -> List[bytes]:
    out = [b'data: {"choices":[{"delta":{"content":"%s"}}]}\n\n' % c.encode() for c in contents]
    if usage:
        out.append(b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}\n\n')
    return out + ([b"data: [DONE]\n\n"] if done else [])


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def split(raw: bytes):
    """(status, headers, body chunks) of one HTTP/1.1 answer as the client got it."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers: Dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding") != b"chunked":
        return int(lines[0].split()[1]), headers, [rest]
    chunks = []
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            break
        chunks.append(rest[:length])
        rest = rest[length + 2 :]
    return int(lines[0].split()[1]), headers, [c for c in chunks if c]


def answered(gw: Gateway, body: bytes = BODY, headers: bytes = b"", reply: bytes = b"", index: int = -1):
    """Send a request; answer it upstream with ``reply`` (if given); the client's answer."""
    _, client = gw.client(post(CHAT, body, headers))
    if reply:
        gw.upstream(index).send(reply)
    return split(client.value())


def stream_reply(*contents: str, usage: bool = False) -> bytes:
    return STREAM_HEAD + b"".join(chunked(e) for e in events(*contents, usage=usage)) + b"0\r\n\r\n"


def test_plugin_and_store_provide_interfaces():
    """The plugin provides IPlugin, its filter IRequestFilter, the store ICacheStore."""
    plugin = REGISTRY["cache"]
    assert verifyObject(IPlugin, plugin)
    assert verifyObject(IRequestFilter, plugin.create(CacheSettings(), Gateway(CONFIG).runtime, "route:x"))
    assert verifyObject(ICacheStore, MemoryCacheStore(Clock(), 10))
    assert verifyObject(ICacheStore, RedisCacheStore(None))


def test_second_identical_request_is_a_hit():
    """MISS goes upstream; the same request again is answered by the gateway: HIT, Age."""
    gw = Gateway(CONFIG)
    status, headers, body = answered(gw, reply=response(b"200 OK", b"openai-processing-ms: 9\r\n", ANSWER))
    assert (status, headers[b"x-cache-status"], b"".join(body)) == (200, b"MISS", ANSWER)
    gw.reactor.advance(5)
    same = b'{"messages": [{"content": "hello there", "role": "user"}],\n "model": "m"}'  # reordered
    status, headers, body = answered(gw, same)
    assert (status, headers[b"x-cache-status"], headers[b"age"], b"".join(body)) == (200, b"HIT", b"5", ANSWER)
    assert headers[b"content-type"] == b"application/json" and headers[b"content-length"] == b"%d" % len(ANSWER)
    assert headers[b"openai-processing-ms"] == b"9"
    assert gw.requests_sent() == 1
    assert [r.cache for r in gw.records] == ["miss", "hit"]
    assert gw.records[1].tokens_saved == 7 and gw.records[1].usage is None
    assert gw.records[1].fields()["cache"] == "hit" and gw.records[1].fields()["tokens_saved"] == 7


def test_metrics_count_hits_and_tokens_saved():
    """/metrics: requests by cache status, and the tokens hits saved."""
    from prometheus_client import generate_latest

    gw = Gateway(CONFIG, metrics=True)
    answered(gw, reply=response(body=ANSWER))
    answered(gw)
    answered(gw)
    text = generate_latest(gw.metrics.registry).decode()
    assert 'openaigw_cache_requests_total{route="chat",status="miss"} 1.0' in text
    assert 'openaigw_cache_requests_total{route="chat",status="hit"} 2.0' in text
    assert 'openaigw_cache_tokens_saved_total{route="chat"} 14.0' in text
    assert 'openaigw_tokens_total{consumer="",kind="completion",model="m",route="chat"} 4.0' in text


def test_ttl_expiry():
    """An entry older than cache.ttl is gone: the next request goes upstream again."""
    gw = Gateway(CONFIG)
    answered(gw, reply=response(body=ANSWER))
    gw.reactor.advance(59)
    assert answered(gw)[1][b"x-cache-status"] == b"HIT"
    gw.reactor.advance(2)
    status, headers, _ = answered(gw, reply=response(body=ANSWER))
    assert headers[b"x-cache-status"] == b"MISS" and gw.requests_sent() == 2


def test_what_makes_a_different_key():
    """Another body, stream flag, path or client key is another entry."""
    gw = Gateway(CONFIG)
    answered(gw, reply=response(body=ANSWER))
    for body, headers in (
        (b'{"model": "m", "messages": []}', b""),
        (b'{"model": "m", "stream": false, "messages": [{"role": "user", "content": "hello there"}]}', b""),
        (BODY, b"Authorization: Bearer sk-someone-else\r\n"),
    ):
        _, client = gw.client(post(CHAT, body, headers))
        assert client.value() == b""  # waiting for the upstream
        gw.upstream(0).send(response(body=ANSWER))
        assert split(client.value())[1][b"x-cache-status"] == b"MISS"
    assert gw.requests_sent() == 4


def test_key_canonical_json_and_parts():
    """Key order and whitespace do not change a key; each part does; the hash is length-prefixed."""
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == b'{"a":[1,{"c":3,"d":2}],"b":1}'
    key = cache_key("r", "s", b"/v1/chat/completions", {"a": 1})
    assert key == cache_key("r", "s", b"/v1/chat/completions", json.loads('{ "a" : 1 }'))
    assert len({key, cache_key("r2", "s", b"/v1/chat/completions", {"a": 1}),
                cache_key("r", "s2", b"/v1/chat/completions", {"a": 1}),
                cache_key("r", "s", b"/v1/completions", {"a": 1}),
                cache_key("r", "s", b"/v1/chat/completions", {"a": 2}),
                cache_key("r:s", "", b"/v1/chat/completions", {"a": 1})}) == 6
    assert cacheable(b"POST", b"/openai/deployments/d/chat/completions?api-version=1", {})
    assert cacheable(b"POST", b"/v1/embeddings", {}) and cacheable(b"POST", b"/v1/responses", {})
    assert not cacheable(b"GET", b"/v1/chat/completions", {})
    assert not cacheable(b"POST", b"/v1/chat/completions", [1])
    assert not cacheable(b"POST", b"/v1/files", {})


def test_consumers_never_share_unless_scope_route():
    """With key-auth each consumer has its own entries; cache.scope = route shares them."""
    consumers = f"""
[consumer:a]
key_sha256 = {hashlib.sha256(KEY_A.encode()).hexdigest()}
[consumer:b]
key = {KEY_B}
"""
    for scope, shared in (("consumer", False), ("route", True)):
        gw = Gateway(CONFIG.replace("cache.ttl = 60", f"cache.ttl = 60\nkey-auth = on\ncache.scope = {scope}")
                     + consumers)
        answered(gw, headers=f"Authorization: Bearer {KEY_A}\r\n".encode(), reply=response(body=ANSWER))
        assert answered(gw, headers=f"Authorization: Bearer {KEY_A}\r\n".encode())[1][b"x-cache-status"] == b"HIT"
        _, client = gw.client(post(CHAT, BODY, f"api-key: {KEY_B}\r\n".encode()))
        assert (client.value() != b"") == shared
        assert gw.requests_sent() == (1 if shared else 2)


@pytest.mark.parametrize("reply", [
    response(b"500 Internal Server Error", b"", b'{"error": {}}'),
    response(b"429 Too Many Requests", b"retry-after: 0\r\n", b'{"error": {}}'),  # 0: the node stays in
    response(b"201 Created", b"", ANSWER),
    response(b"200 OK", b"Cache-Control: private, no-store\r\n", ANSWER),
])
def test_not_stored(reply):
    """Errors, other statuses and answers the upstream says not to store go upstream each time."""
    gw = Gateway(CONFIG)
    answered(gw, reply=reply)
    assert answered(gw, reply=reply, index=0)[1][b"x-cache-status"] == b"MISS"
    assert gw.requests_sent() == 2


def test_headers_kept_and_recomputed():
    """Set-Cookie and rate-limit headers are not replayed; the request id is the hit's own."""
    gw = Gateway(CONFIG)
    answered(gw, reply=response(b"200 OK", b"Set-Cookie: s=1\r\nx-ratelimit-remaining-requests: 9\r\n"
                                b"x-request-id: req_up\r\nopenai-version: 2020-10-01\r\n", ANSWER))
    _, headers, _ = answered(gw, headers=b"X-Request-Id: mine-1\r\n")
    assert headers[b"x-cache-status"] == b"HIT" and headers[b"openai-version"] == b"2020-10-01"
    assert b"set-cookie" not in headers and b"x-ratelimit-remaining-requests" not in headers
    assert headers[b"x-request-id"] == b"mine-1" and b"x-gateway-request-id" not in headers


def test_client_no_cache_and_no_store():
    """no-cache skips the lookup and stores the fresh answer; no-store neither reads nor writes."""
    gw = Gateway(CONFIG)
    answered(gw, reply=response(body=b'{"n": 1}'))
    _, headers, body = answered(gw, headers=b"Cache-Control: no-cache\r\n", reply=response(body=b'{"n": 2}'),
                                index=0)
    assert headers[b"x-cache-status"] == b"BYPASS" and body == [b'{"n": 2}']
    assert answered(gw)[2] == [b'{"n": 2}']  # the fresh one was stored
    _, headers, body = answered(gw, headers=b"Cache-Control: no-store\r\n", reply=response(body=b'{"n": 3}'),
                                index=0)
    assert headers[b"x-cache-status"] == b"BYPASS" and body == [b'{"n": 3}']
    assert answered(gw)[2] == [b'{"n": 2}']
    assert gw.requests_sent() == 3
    assert [r.cache for r in gw.records] == ["miss", "bypass", "hit", "bypass", "hit"]


def test_not_cacheable_requests_bypass():
    """Other endpoints and methods pass through, saying BYPASS."""
    gw = Gateway(CONFIG)
    _, client = gw.client(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")
    gw.upstream().send(response(body=b"{}"))
    assert split(client.value())[1][b"x-cache-status"] == b"BYPASS"
    _, client = gw.client(post(b"/v1/files", b"{}"))
    gw.upstream(0).send(response(body=b"{}"))
    assert split(client.value())[1][b"x-cache-status"] == b"BYPASS"
    for body in (b"not json", b'{"a": ' * 2000 + b"1" + b"}" * 2000):
        _, client = gw.client(post(CHAT, body))
        gw.upstream(0).send(response(body=b"{}"))
        assert split(client.value())[1][b"x-cache-status"] == b"BYPASS"


def test_stream_stored_after_done_and_replayed_event_by_event():
    """A stream is stored once it ended with [DONE] and replayed one event per write."""
    gw = Gateway(CONFIG)
    status, headers, chunks = answered(gw, STREAM_BODY, reply=stream_reply("a", "b", "c"))
    assert headers[b"x-cache-status"] == b"MISS"
    status, headers, replayed = answered(gw, STREAM_BODY)
    assert (status, headers[b"x-cache-status"]) == (200, b"HIT")
    assert headers[b"content-type"] == b"text/event-stream" and headers[b"x-accel-buffering"] == b"no"
    assert replayed == events("a", "b", "c")
    assert gw.requests_sent() == 1


def test_cut_stream_not_stored():
    """A stream that ends without [DONE], or is cut, is not stored."""
    gw = Gateway(CONFIG)
    no_done = STREAM_HEAD + b"".join(chunked(e) for e in events("a", done=False)) + b"0\r\n\r\n"
    answered(gw, STREAM_BODY, reply=no_done)
    channel, client = gw.client(post(CHAT, STREAM_BODY))
    gw.upstream(0).send(STREAM_HEAD + chunked(events("a")[0]))
    gw.upstream(0).protocol.connectionLost(Failure(ConnectionDone()))
    _, client = gw.client(post(CHAT, STREAM_BODY))
    assert client.value() == b""  # not from the cache: waiting for the upstream
    assert gw.requests_sent() == 3


def test_usage_chunk_stripped_or_kept_on_replay():
    """With a token limit the stored stream holds the usage chunk the gateway asked for;
    a hit strips it for a client that did not ask, and charges no tokens.  A client
    that asks for usage has its own entry (stream_options are part of the key)."""
    config = CONFIG.replace("cache.ttl = 60", "cache.ttl = 60\nai-rate-limiting.limit = 100\n"
                            "ai-rate-limiting.time_window = 60\nai-rate-limiting.key = route")
    gw = Gateway(config)
    _, _, first = answered(gw, STREAM_BODY, reply=stream_reply("a", usage=True))
    assert b"usage" not in b"".join(first)
    counter = "ai-rate-limiting/route:chat"
    assert now(gw.runtime.counters.peek(counter, 60))[0] == 5
    _, headers, replayed = answered(gw, STREAM_BODY)
    assert headers[b"x-cache-status"] == b"HIT" and replayed == events("a")
    assert now(gw.runtime.counters.peek(counter, 60))[0] == 5  # a hit costs no tokens
    assert gw.records[-1].tokens_saved == 5
    asked = json.loads(STREAM_BODY)
    asked["stream_options"] = {"include_usage": True}
    _, headers, replayed = answered(gw, json.dumps(asked).encode(), reply=stream_reply("a", usage=True))
    assert headers[b"x-cache-status"] == b"MISS" and b"".join(replayed) == b"".join(events("a", usage=True))
    _, headers, replayed = answered(gw, json.dumps(asked).encode())
    assert headers[b"x-cache-status"] == b"HIT" and replayed == events("a", usage=True)


def test_max_entry_size():
    """Answers larger than cache.max_entry_size pass uncached."""
    gw = Gateway(CONFIG.replace("cache.ttl = 60", "cache.ttl = 60\ncache.max_entry_size = 16"))
    answered(gw, reply=response(body=b'{"text": "0123456789abcdef"}'))
    assert answered(gw, reply=response(body=ANSWER), index=0)[1][b"x-cache-status"] == b"MISS"
    assert gw.requests_sent() == 2


def test_hit_counts_against_request_limits():
    """A hit is a request like any other for limit-count."""
    gw = Gateway(CONFIG.replace("cache.ttl = 60", "cache.ttl = 60\nlimit-count.count = 2\n"
                                "limit-count.time_window = 60"))
    answered(gw, reply=response(body=ANSWER))
    assert answered(gw)[0] == 200
    assert answered(gw)[0] == 429


@implementer(ICacheStore)
class BrokenStore:
    def get(self, key):
        return fail(ConnectionRefusedError("store down"))

    def set(self, key, value, ttl):
        return fail(ConnectionRefusedError("store down"))


def test_store_failure_is_a_miss():
    """A store that fails on read and write: every request goes upstream, no client error."""
    gw = Gateway(CONFIG)
    gw.runtime.responses.store = BrokenStore()
    for index in (0, 0):
        status, headers, body = answered(gw, reply=response(body=ANSWER), index=index)
        assert (status, headers[b"x-cache-status"], body) == (200, b"MISS", [ANSWER])
    assert gw.requests_sent() == 2


def test_coalesced_stream_one_upstream_call():
    """Identical streams in flight share one upstream request; a late one gets the
    events so far, then the rest live; all get the whole stream."""
    gw = Gateway(CONFIG)
    _, first = gw.client(post(CHAT, STREAM_BODY))
    _, second = gw.client(post(CHAT, STREAM_BODY))
    upstream = gw.upstream(0)
    parts = events("a", "b", "c")
    upstream.send(STREAM_HEAD + chunked(parts[0]))
    _, late = gw.client(post(CHAT, STREAM_BODY))
    assert split(late.value())[2] == parts[:1]
    for part in parts[1:]:
        upstream.send(chunked(part))
    upstream.send(b"0\r\n\r\n")
    statuses = []
    for client in (first, second, late):
        _, headers, chunks = split(client.value())
        statuses.append(headers[b"x-cache-status"])
        assert chunks == parts and client.value().endswith(b"0\r\n\r\n")
    assert statuses == [b"MISS", b"COALESCED", b"COALESCED"]
    assert gw.requests_sent() == 1 and len(gw.reactor.tcpClients) == 1
    assert [r.cache for r in gw.records] == ["miss", "coalesced", "coalesced"]


def test_leader_leaving_does_not_cut_followers():
    """The first client leaving mid-stream: the upstream goes on for the follower; the
    last client leaving closes the upstream connection."""
    gw = Gateway(CONFIG)
    leader, _ = gw.client(post(CHAT, STREAM_BODY))
    follower, follower_transport = gw.client(post(CHAT, STREAM_BODY))
    upstream = gw.upstream(0)
    parts = events("a", "b")
    upstream.send(STREAM_HEAD + chunked(parts[0]))
    leader.connectionLost(Failure(ConnectionDone()))
    assert upstream.transport.producerState == "producing"
    upstream.send(chunked(parts[1]))
    upstream.send(chunked(parts[2]) + b"0\r\n\r\n")
    assert split(follower_transport.value())[2] == parts
    assert gw.records[0].status == 499 and gw.records[1].status == 200

    gw = Gateway(CONFIG)
    first, _ = gw.client(post(CHAT, STREAM_BODY))
    second, _ = gw.client(post(CHAT, STREAM_BODY))
    upstream = gw.upstream(0)
    upstream.send(STREAM_HEAD + chunked(parts[0]))
    first.connectionLost(Failure(ConnectionDone()))
    assert upstream.transport.producerState == "producing"
    second.connectionLost(Failure(ConnectionDone()))
    assert upstream.transport.producerState == "stopped"


def test_leader_leaving_before_the_answer_keeps_the_request():
    """The first client leaving before the upstream answered: the request goes on for the other."""
    gw = Gateway(CONFIG)
    leader, _ = gw.client(post(CHAT, BODY))
    _, follower = gw.client(post(CHAT, BODY))
    leader.connectionLost(Failure(ConnectionDone()))
    upstream = gw.upstream(0)
    upstream.send(response(body=ANSWER))
    _, headers, body = split(follower.value())
    assert (headers[b"x-cache-status"], body) == (b"COALESCED", [ANSWER])
    assert gw.requests_sent() == 1

    gw = Gateway(CONFIG)
    channels = [gw.client(post(CHAT, BODY))[0] for _ in range(2)]
    upstream = gw.upstream(0)
    channels[0].connectionLost(Failure(ConnectionDone()))
    assert not upstream.transport.disconnecting
    channels[1].connectionLost(Failure(ConnectionDone()))
    assert upstream.transport.disconnecting  # nobody waits for it: cancelled


def test_leader_error_followers_go_upstream_themselves_4xx_shared():
    """A 5xx sends each waiting follower upstream on its own; a 4xx is shared as it is."""
    gw = Gateway(CONFIG)
    _, leader = gw.client(post(CHAT, BODY))
    _, follower = gw.client(post(CHAT, BODY))
    gw.upstream(0).send(response(b"500 Internal Server Error", b"", b'{"error": {}}'))
    assert split(leader.value())[0] == 500 and follower.value() == b""
    gw.upstream(-1).send(response(body=ANSWER))
    status, headers, _ = split(follower.value())
    assert (status, headers[b"x-cache-status"]) == (200, b"MISS")

    gw = Gateway(CONFIG)
    _, leader = gw.client(post(CHAT, BODY))
    _, follower = gw.client(post(CHAT, BODY))
    gw.upstream(0).send(response(b"400 Bad Request", b"", b'{"error": {"message": "no"}}'))
    assert split(follower.value())[0] == 400 and split(follower.value())[1][b"x-cache-status"] == b"COALESCED"
    assert gw.requests_sent() == 1


def test_leader_connect_failure_followers_go_upstream():
    """No answer at all for the leader (it gets the 502): followers try for themselves."""
    from twisted.internet.error import ConnectionRefusedError as Refused

    gw = Gateway(CONFIG)
    _, leader = gw.client(post(CHAT, BODY))
    _, follower = gw.client(post(CHAT, BODY))
    _, _, factory, _, _ = gw.reactor.tcpClients[0]
    factory.clientConnectionFailed(None, Failure(Refused()))
    assert split(leader.value())[0] == 502
    assert len(gw.reactor.tcpClients) == 2
    gw.upstream(1).send(response(body=ANSWER))
    assert split(follower.value())[2] == [ANSWER]


def test_slow_follower_cut_alone():
    """A follower that reads nothing falls behind and is cut; the leader gets everything."""
    gw = Gateway(CONFIG.replace("cache.ttl = 60", "cache.ttl = 60\ncache.max_entry_size = 100"))
    _, leader = gw.client(post(CHAT, STREAM_BODY))
    slow_channel, slow = gw.client(post(CHAT, STREAM_BODY))
    upstream = gw.upstream(0)
    upstream.send(STREAM_HEAD)
    slow.producer.pauseProducing()  # the client's socket is full
    flight = next(iter(gw.runtime.responses.flights.values()))
    flight.lag_limit = 300
    big = b"data: " + b"x" * 100 + b"\n\n"
    for _ in range(5):
        upstream.send(chunked(big))
    assert slow.disconnected  # aborted
    slow_channel.connectionLost(Failure(ConnectionDone()))
    upstream.send(chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    assert split(leader.value())[2] == [big] * 5 + [b"data: [DONE]\n\n"]
    assert [(r.cache, r.error) for r in gw.records] == [("coalesced", "client_too_slow"), ("miss", None)]


def test_entry_encoding_round_trip_and_garbage():
    """Entries survive encode/decode; anything else decodes to None (a miss)."""
    entry = Entry(12.5, 200, ((b"content-type", b"text/event-stream"),), True, (b"data: 1\n\n", b"data: [DONE]\n\n"))
    assert Entry.decode(entry.encode()) == entry
    for garbage in (b"", b"\x00\xff", b'{"format": 1}\n', entry.encode()[:-1], b"[1]\nx"):
        assert Entry.decode(garbage) is None


def test_memory_store_lru_by_bytes_and_ttl():
    """The store evicts least recently used entries to stay within its bytes; entries expire."""
    clock = Clock()
    store = MemoryCacheStore(clock, 1000)
    results: list = []
    store.set("a", b"x" * 300, 10)
    store.set("b", b"x" * 300, 10)
    store.get("a").addCallback(results.append)  # a is now the most recent
    store.set("c", b"x" * 300, 10)
    assert len(store) == 2 and store.bytes <= 1000
    store.get("b").addCallback(results.append)
    assert results == [b"x" * 300, None]
    store.set("huge", b"x" * 2000, 10)
    assert len(store) == 2
    clock.advance(10)
    store.get("a").addCallback(results.append)
    assert results[-1] is None and len(store) == 1
    store.resize(0)
    assert len(store) == 0 and store.bytes == 0


def test_memory_sized_by_the_largest_route():
    """cache.memory: the largest value on any route bounds the one store."""
    gw = Gateway(CONFIG.replace("cache.ttl = 60", "cache.ttl = 60\ncache.memory = 1M")
                 .replace("[route:api]\nuri = /v1/*\nupstream = up\ncache = on",
                          "[route:api]\nuri = /v1/*\nupstream = up\ncache = on\ncache.memory = 3M"))
    assert gw.runtime.responses.store.max_bytes == 3 << 20
    assert Gateway(CONFIG).runtime.responses.store.max_bytes == 64 << 20


@pytest.mark.parametrize("lines, message", [
    ("cache.ttl = 5", "[route:x] cache.ttl: only applies with cache = on"),
    ("cache = on\ncache.ttl = 0", "[route:x] cache.ttl: must be above 0"),
    ("cache = on\ncache.scope = everyone", "[route:x] cache.scope: 'everyone' is not one of consumer, route"),
    ("cache = on\ncache.max_entry_size = lots", "[route:x] cache.max_entry_size: 'lots' is not a size"),
    ("cache = on\ncache.size = 1", "[route:x] cache.size: unknown option"),
    ("cache = maybe", "[route:x] cache: 'maybe' is not on/off"),
])
def test_config_errors(lines, message):
    """Bad cache keys stop start-up with a message naming the key."""
    text = f"[upstream:up]\nscheme = http\nnodes = 10.0.0.1:80\n[route:x]\nuri = /v1/*\nupstream = up\n{lines}\n"
    with pytest.raises(ConfigError) as caught:
        parse(text, "gw.ini", {})
    assert message in str(caught.value)


def test_admin_api_configures_the_cache():
    """The same keys through the Admin API: plugins.cache {ttl, scope, max_entry_size, memory}."""
    from tests.test_admin import Admin

    admin = Admin()
    route = {"uri": "/v1/chat/completions", "upstream_id": "file-up",
             "plugins": {"cache": {"ttl": 30, "scope": "route", "max_entry_size": "2K", "memory": "1M"}}}
    code, body = admin.call("PUT", "/apisix/admin/routes/r", route)
    assert code == 201, body
    served = [r for r in admin.service.config.routes if r.name == "r"][0]
    assert {p.name: p.settings for p in served.plugins}["cache"] == CacheSettings(30, "route", 2048, 1 << 20)
    assert admin.service._runtime.responses.store.max_bytes == 1 << 20
    route["plugins"]["cache"] = {"scope": "everyone"}
    code, body = admin.call("PUT", "/apisix/admin/routes/r", route)
    assert code == 400 and "plugins.cache.scope" in body["error_msg"]
    route["plugins"]["cache"] = {"size": 1}
    code, body = admin.call("PUT", "/apisix/admin/routes/r", route)
    assert code == 400 and "plugins.cache.size" in body["error_msg"]


def test_close_delimited_answer_cut_by_a_clean_close_not_stored():
    """An answer of no declared length that ends with the connection, cut short: the
    client gets what came, the next request goes upstream (no cut JSON from the cache)."""
    gw = Gateway(CONFIG)
    _, client = gw.client(post(CHAT, BODY))
    gw.upstream(0).send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + ANSWER[:20])
    gw.upstream(0).protocol.connectionLost(Failure(ConnectionDone()))
    assert ANSWER[:20] in client.value()
    _, client = gw.client(post(CHAT, BODY))
    assert client.value() == b""  # waiting for the upstream
    assert gw.requests_sent() == 2


def test_responses_stream_stored_only_after_response_completed():
    """A Responses API stream is whole after its response.completed event, not after
    an event that merely mentions it."""
    body = b'{"model": "m", "stream": true, "input": "hi"}'
    path = b"/v1/responses"
    gw = Gateway(CONFIG)
    mention = (b'event: response.output_text.delta\n'
               b'data: {"type":"response.output_text.delta","delta":"response.completed"}\n\n')
    _, client = gw.client(post(path, body))
    gw.upstream(0).send(STREAM_HEAD + chunked(mention) + b"0\r\n\r\n")
    _, client = gw.client(post(path, body))
    assert client.value() == b""  # not from the cache
    completed = b'event: response.completed\ndata: {"type":"response.completed","response":{}}\n\n'
    gw.upstream(-1).send(STREAM_HEAD + chunked(mention) + chunked(completed) + b"0\r\n\r\n")
    _, client = gw.client(post(path, body))
    assert split(client.value())[1][b"x-cache-status"] == b"HIT"
    assert gw.requests_sent() == 2


@implementer(ICacheStore)
class CopyingStore:
    """Returns a new copy of a value on each read, as a Redis store does."""

    def __init__(self, clock) -> None:
        self._memory = MemoryCacheStore(clock, 1 << 20)

    def get(self, key):
        return self._memory.get(key).addCallback(lambda value: value and bytes(bytearray(value)))

    def set(self, key, value, ttl):
        return self._memory.set(key, value, ttl)


def test_decoded_entries_held_only_while_the_memory_store_holds_them():
    """Hits decode an entry once, but the decoded copies are bounded by cache.memory too
    (not 1024 entries of any size), and a store that returns copies keeps none."""
    gw = Gateway(CONFIG)
    responses = gw.runtime.responses
    responses.store.resize(4096)
    big = json.dumps({"text": "x" * 1500}).encode()
    for n in range(6):
        body = BODY.replace(b"hello there", b"hello %d" % n)
        answered(gw, body, reply=response(body=big), index=0)
        assert answered(gw, body)[1][b"x-cache-status"] == b"HIT"
    assert len(responses.store) == 2
    assert sum(entry.size for _, entry in responses._decoded.values()) <= responses.store.max_bytes
    gw = Gateway(CONFIG)
    gw.runtime.responses.store = CopyingStore(gw.reactor)
    answered(gw, reply=response(body=ANSWER))
    for _ in range(3):
        assert answered(gw)[1][b"x-cache-status"] == b"HIT"
    assert not gw.runtime.responses._decoded


def test_slow_leader_does_not_stall_followers_waiting_for_the_whole_answer():
    """The leader's client not reading keeps the upstream read while others wait for the
    whole (non-streamed) answer, which is held anyway; once nobody waits, it pauses it."""
    gw = Gateway(CONFIG)
    _, leader = gw.client(post(CHAT, BODY))
    _, follower = gw.client(post(CHAT, BODY))
    upstream = gw.upstream(0)
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(ANSWER) + ANSWER[:10])
    leader.producer.pauseProducing()  # the leader's socket is full
    assert upstream.transport.producerState == "producing"
    upstream.send(ANSWER[10:])
    _, headers, body = split(follower.value())
    assert (headers[b"x-cache-status"], body) == (b"COALESCED", [ANSWER])

    gw = Gateway(CONFIG)
    _, leader = gw.client(post(CHAT, BODY))
    upstream = gw.upstream(0)
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(ANSWER) + ANSWER[:10])
    leader.producer.pauseProducing()
    assert upstream.transport.producerState == "paused"  # alone: backpressure as without the cache


def test_followers_get_no_cookie_of_the_leader():
    """A coalesced answer is the leader's: the upstream's Set-Cookie (for the leader's
    client) is not handed to the others, as a stored answer never replays it."""
    gw = Gateway(CONFIG)
    _, leader = gw.client(post(CHAT, BODY))
    _, follower = gw.client(post(CHAT, BODY))
    gw.upstream(0).send(response(b"200 OK", b"Set-Cookie: __cf_bm=leader-only; HttpOnly\r\n", ANSWER))
    assert split(leader.value())[1][b"set-cookie"] == b"__cf_bm=leader-only; HttpOnly"
    _, headers, body = split(follower.value())
    assert (headers[b"x-cache-status"], body) == (b"COALESCED", [ANSWER])
    assert b"set-cookie" not in headers


def test_client_not_reading_a_shared_answer_is_cut_after_the_read_timeout():
    """A client that stops reading a coalesced (or replayed) answer is cut after the
    upstream's timeout_read, as without the cache, even once the upstream is done."""
    gw = Gateway(CONFIG)
    _, leader = gw.client(post(CHAT, STREAM_BODY))
    slow_channel, slow = gw.client(post(CHAT, STREAM_BODY))
    upstream = gw.upstream(0)
    upstream.send(STREAM_HEAD)
    slow.producer.pauseProducing()  # the client's socket is full, and stays so
    upstream.send(b"".join(chunked(e) for e in events("a", "b")) + b"0\r\n\r\n")
    assert b"".join(split(leader.value())[2]) == b"".join(events("a", "b"))
    gw.reactor.advance(29)
    assert not slow.disconnected
    gw.reactor.advance(1)  # timeout_read = 30
    assert slow.disconnected  # aborted
    slow_channel.connectionLost(Failure(ConnectionDone()))
    assert [(r.cache, r.error) for r in gw.records] == [("miss", None), ("coalesced", "client_send_timeout")]
