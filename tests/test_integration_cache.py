"""The response cache end to end: the openai SDK -> twistd openaigw -> a fake upstream
that records every request (counted here by a marker unique to each test)."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import socket
import ssl
import time
import urllib.request
import uuid

import openai
import pytest

from openaigw.testing import RedisServer, free_port, start_fake_upstream, start_gateway, stop_process

REAL_KEY = "sk-real-upstream-canary-cache"
KEY_A = "sk-gw-cache-team-a-0123456789"
KEY_B = "sk-gw-cache-team-b-0123456789"

CONFIG = """
[gateway]
listen = tcp:port={port}:interface=127.0.0.1
access_log = {log}
{state}

[upstream:fake]
scheme = https
nodes = 127.0.0.1:{fake}
ca_file = {ca}
; its 429s must not take the only node out (these tests are about the cache)
checks.max_cooldown = 0

[consumer:team-a]
key = {key_a}

[consumer:team-b]
key = {key_b}

[route:chat]
uri = /v1/chat/completions
methods = POST
upstream = fake
key-auth = on
cache = on
cache.ttl = 300
proxy-rewrite.headers.set.Authorization = Bearer $ENV://OPENAI_API_KEY
"""


@pytest.fixture(scope="module")
def fake(pki):
    proc, port = start_fake_upstream(pki.directory, name="cache")
    yield port
    stop_process(proc)


def run_gateway(directory, pki, fake: int, state: str = ""):
    port = free_port()
    config = CONFIG.format(port=port, log=directory / "access.log", state=state, fake=fake, ca=pki.ca,
                           key_a=KEY_A, key_b=KEY_B)
    proc = start_gateway(directory, config, port, env={**os.environ, "OPENAI_API_KEY": REAL_KEY})
    return proc, port


@pytest.fixture(scope="module")
def gateway(pki, fake, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gateway-cache")
    proc, port = run_gateway(directory, pki, fake)
    yield port, directory
    stop_process(proc)
    log = (directory / "gateway.log").read_text() + (directory / "access.log").read_text()
    for secret in (REAL_KEY, KEY_A, KEY_B):
        assert secret not in log


def sdk(port: int, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)


def marked(text: str = "") -> list:
    """Messages with a marker no other test uses."""
    return [{"role": "user", "content": f"{text} {uuid.uuid4().hex}"}]


def upstream_calls(pki, fake: int, messages: list) -> list:
    context = ssl.create_default_context(cafile=pki.ca)
    with urllib.request.urlopen(f"https://127.0.0.1:{fake}/_fake/requests", context=context) as r:
        received = json.load(r)
    marker = messages[0]["content"].split()[-1]
    return [r for r in received if marker in r["body"]]


def access_lines(directory) -> list:
    time.sleep(0.3)  # the access log is written a tenth of a second after the request
    return [json.loads(line) for line in (directory / "access.log").read_text().splitlines()]


def test_second_identical_request_is_a_hit(pki, fake, gateway):
    """The second identical request is answered by the gateway: HIT, same answer, one upstream call."""
    port, directory = gateway
    client = sdk(port)
    messages = marked()
    first = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
    second = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
    assert first.headers["x-cache-status"] == "MISS" and second.headers["x-cache-status"] == "HIT"
    assert "age" in second.headers
    assert second.parse().model_dump() == first.parse().model_dump()
    assert len(upstream_calls(pki, fake, messages)) == 1
    request_id = second.headers["x-request-id"]
    line = next(line for line in access_lines(directory) if line["request_id"] == request_id)
    assert line["cache"] == "hit" and line["tokens_saved"] > 0 and line["total_tokens"] is None


def test_consumers_never_share(pki, fake, gateway):
    """The same request from another consumer goes upstream: entries are per consumer."""
    port, _ = gateway
    messages = marked()
    sdk(port, KEY_A).chat.completions.create(model="gpt-4o-mini", messages=messages)
    other = sdk(port, KEY_B).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
    assert other.headers["x-cache-status"] == "MISS"
    assert len(upstream_calls(pki, fake, messages)) == 2


@pytest.mark.parametrize("model, error", [("error-500", openai.InternalServerError),
                                          ("error-429", openai.RateLimitError)])
def test_errors_are_not_cached(pki, fake, gateway, model, error):
    """A 500 or a 429 goes upstream every time."""
    port, _ = gateway
    messages = marked()
    for _ in range(2):
        with pytest.raises(error):
            sdk(port).chat.completions.create(model=model, messages=messages)
    assert len(upstream_calls(pki, fake, messages)) == 2


def stream_text(client: openai.OpenAI, messages: list, **kwargs):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, stream=True, **kwargs
    )
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return raw.headers["x-cache-status"], text, chunks


def test_stream_replayed_and_assembled_alike(pki, fake, gateway):
    """A cached stream is replayed as its events: the SDK assembles the same text, the
    usage chunk only for a client that asked for it."""
    port, _ = gateway
    client = sdk(port)
    messages = marked()
    status, text, chunks = stream_text(client, messages)
    assert status == "MISS" and text == "tok0 tok1 tok2 tok3 tok4 " and len(chunks) == 5
    status, replayed, replayed_chunks = stream_text(client, messages)
    assert status == "HIT" and replayed == text
    assert [c.model_dump() for c in replayed_chunks] == [c.model_dump() for c in chunks]
    status, _, with_usage = stream_text(client, messages, stream_options={"include_usage": True})
    assert status == "MISS" and with_usage[-1].usage is not None  # another key: stream_options
    assert stream_text(client, messages, stream_options={"include_usage": True})[2][-1].usage is not None
    assert len(upstream_calls(pki, fake, messages)) == 2


def test_client_no_cache_and_no_store(pki, fake, gateway):
    """no-cache goes upstream and stores the fresh answer; no-store neither reads nor stores."""
    port, _ = gateway
    client = sdk(port)
    messages = marked()
    create = client.chat.completions.with_raw_response.create
    first = create(model="gpt-4o-mini", messages=messages).parse()
    fresh = create(model="gpt-4o-mini", messages=messages, extra_headers={"Cache-Control": "no-cache"})
    assert fresh.headers["x-cache-status"] == "BYPASS" and fresh.parse().id != first.id
    hit = create(model="gpt-4o-mini", messages=messages)
    assert hit.headers["x-cache-status"] == "HIT" and hit.parse().id == fresh.parse().id
    unstored = create(model="gpt-4o-mini", messages=messages, extra_headers={"Cache-Control": "no-store"})
    assert unstored.headers["x-cache-status"] == "BYPASS"
    assert create(model="gpt-4o-mini", messages=messages).parse().id == fresh.parse().id
    assert len(upstream_calls(pki, fake, messages)) == 3


def test_twenty_identical_streams_one_upstream_call(pki, fake, gateway):
    """20 identical streaming requests at once: one upstream call, 20 full identical streams."""
    port, _ = gateway
    messages = marked()
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY_A, max_retries=0)
    headers = {"X-Fake-Chunks": "20", "X-Fake-Interval-Ms": "50"}

    async def one():
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=messages, stream=True, extra_headers=headers
        )
        stream = raw.parse()  # a coroutine in some SDK versions
        if inspect.isawaitable(stream):
            stream = await stream
        chunks = [chunk async for chunk in stream]
        return raw.headers["x-cache-status"], [c.model_dump_json() for c in chunks]

    async def all_of_them():
        try:
            return await asyncio.gather(*[one() for _ in range(20)])
        finally:
            await client.close()

    results = asyncio.run(all_of_them())
    statuses = sorted(status for status, _ in results)
    assert statuses.count("MISS") == 1 and set(statuses) <= {"MISS", "COALESCED", "HIT"}
    streams = {tuple(chunks) for _, chunks in results}
    assert len(streams) == 1 and len(next(iter(streams))) == 20
    calls = upstream_calls(pki, fake, messages)
    assert len(calls) == 1 and calls[0]["finished_at"] and not calls[0]["disconnected"]


def raw_stream_request(port: int, messages: list, interval_ms: int = 100) -> socket.socket:
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": messages}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY_A.encode() + b"\r\nX-Fake-Chunks: 10\r\n"
                 b"X-Fake-Interval-Ms: %d\r\nContent-Length: %d\r\n\r\n%s" % (interval_ms, len(body), body))
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    return data


def test_leader_leaving_does_not_cut_followers(pki, fake, gateway):
    """The first client hanging up mid-stream: the follower still gets the whole stream,
    and the upstream request was not cancelled."""
    port, _ = gateway
    messages = marked()
    leader = raw_stream_request(port, messages)
    read_until(leader, b"tok1 ")
    follower = raw_stream_request(port, messages)
    got = read_until(follower, b"tok1 ")
    assert b"X-Cache-Status: COALESCED" in got
    leader.close()
    got += read_until(follower, b"data: [DONE]")
    follower.close()
    assert b"data: [DONE]" in got and all(b"tok%d " % i in got for i in range(10))
    calls = upstream_calls(pki, fake, messages)
    assert len(calls) == 1 and not calls[0]["disconnected"]


@pytest.fixture(scope="module")
def redis_gateways(pki, fake, tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis-cache")).start()
    procs = []
    try:
        ports = []
        for name in ("one", "two"):
            proc, port = run_gateway(tmp_path_factory.mktemp(f"gateway-{name}"), pki, fake,
                                     state=f"state = {server.url}")
            procs.append(proc)
            ports.append(port)
        yield ports, server
    finally:
        for proc in procs:
            stop_process(proc)
        server.stop()


def test_redis_shared_across_gateways(pki, fake, redis_gateways):
    """With state = redis://, an answer one gateway stored is a hit on the other (streams too)."""
    (one, two), server = redis_gateways
    messages = marked()
    first = sdk(one).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
    deadline = time.monotonic() + 5
    while True:  # stored in the background, just after the answer
        second = sdk(two).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
        if second.headers["x-cache-status"] == "HIT" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (first.headers["x-cache-status"], second.headers["x-cache-status"]) == ("MISS", "HIT")
    assert second.parse().id == first.parse().id
    assert stream_text(sdk(one), messages)[0] == "MISS"
    time.sleep(0.2)
    status, text, _ = stream_text(sdk(two), messages)
    assert status == "HIT" and text == "tok0 tok1 tok2 tok3 tok4 "
    assert sdk(two, KEY_B).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages).headers["x-cache-status"] == "MISS"


def test_redis_down_is_a_miss(pki, fake, redis_gateways):
    """With its Redis gone, the cache answers as misses: every request still gets its answer."""
    (one, _), server = redis_gateways
    server.stop()
    messages = marked()
    for _ in range(2):
        raw = sdk(one).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
        assert raw.headers["x-cache-status"] == "MISS" and raw.parse().choices[0].message.content
    assert len(upstream_calls(pki, fake, messages)) == 2
