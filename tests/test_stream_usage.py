"""Exact tokens for every stream: the gateway asks chat/completions streams for their usage
chunk, keeps it from a client that did not ask, and leaves requests alone with
``stream_usage = off``."""

from __future__ import annotations

import json
import os
import ssl
import urllib.request

import pytest

from openaigw.testing import free_port, start_gateway, stop_process

from tests.memory import BASE_CONFIG, Gateway, post

CHAT = b"/v1/chat/completions"
STREAM = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi there"}]}'
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
OFF = BASE_CONFIG.replace("retries = 1\n", "retries = 1\nstream_usage = off\n")


def sse(*events: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events)


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def answer_with_usage(upstream) -> None:
    """A stream as OpenAI sends it when asked for usage: "usage": null in every chunk,
    then a chunk with no choices and the usage."""
    chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": None}
    usage = {"id": "c", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
    upstream.send(STREAM_HEAD + chunked(sse(chunk, chunk)) + chunked(sse(usage) + b"data: [DONE]\n\n") + b"0\r\n\r\n")


def sent_body(gw: Gateway) -> bytes:
    return gw.upstream(0).received().split(b"\r\n\r\n", 1)[1]


def test_stream_without_a_token_limit_gets_exact_usage():
    """No ai-rate-limiting on the route: the upstream is asked for usage (uncompressed, to
    keep the chunk from the client) and the access record has its exact count."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, STREAM, b"Accept-Encoding: gzip\r\n"))
    head, body = gw.upstream(0).received().split(b"\r\n\r\n", 1)
    assert json.loads(body)["stream_options"] == {"include_usage": True}
    assert b"Accept-Encoding: identity" in head and b"gzip" not in head
    answer_with_usage(gw.upstream(0))
    usage = gw.records[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.estimated) == (7, 3, 10, False)


@pytest.mark.parametrize("body, kept", [
    (' \n{ "model": "m", "stream": true, "messages": [{"role": "user", "content": "h\u00e9 \\u00e9"}] }', True),
    ('{"model":"m","stream":true,"stream_options":{"x":1},"messages":[]}', False),
])
def test_usage_asked_with_the_clients_bytes(body, kept):
    """Asking for usage adds one member; the rest of the client's text goes as it came
    (spacing, escapes, UTF-8), else (other stream_options) it is serialised anew."""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    gw = Gateway()
    gw.client(post(CHAT, raw))
    sent = sent_body(gw)
    asked = json.loads(sent)
    assert asked["stream_options"]["include_usage"] is True
    assert {k: v for k, v in asked.items() if k != "stream_options"} == {
        k: v for k, v in json.loads(raw).items() if k != "stream_options"}
    assert (raw.lstrip()[1:] in sent) is kept


def test_usage_asked_in_utf8_text_only():
    """JSON in UTF-16 or 32, or after a BOM, is not edited as bytes (None: serialise it)."""
    from openaigw.usage import with_usage_asked

    text = '{"stream":true,"messages":[]}'
    for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"):
        assert with_usage_asked(text.encode(encoding)) is None
    assert json.loads(with_usage_asked(b"\r\n " + text.encode())) == {
        "stream_options": {"include_usage": True}, "stream": True, "messages": []}


def test_client_that_did_not_ask_never_sees_the_usage_chunk():
    """The client gets the stream it asked for: no usage chunk, no "usage": null fields."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, STREAM))
    answer_with_usage(gw.upstream(0))
    relayed = client.value().split(b"\r\n\r\n", 1)[1]
    assert b"usage" not in relayed
    assert relayed.count(b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n') == 2
    assert relayed.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


def test_client_that_asked_gets_it_untouched():
    """A client asking for include_usage has its request and the usage chunk as they are."""
    gw = Gateway()
    body = b'{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}'
    _, client = gw.client(post(CHAT, body))
    assert sent_body(gw) == body
    answer_with_usage(gw.upstream(0))
    assert client.value().count(b'"usage":') == 3 and not gw.records[-1].usage.estimated


@pytest.mark.parametrize("path", [b"/v1/completions", b"/v1/chat/completions?api-version=1"])
def test_completions_streams_are_asked_too(path):
    """Completions streams (and chat paths with a query string) ask for usage as well."""
    gw = Gateway()
    gw.client(post(path, b'{"model":"m","stream":true,"prompt":"hi"}'))
    assert json.loads(sent_body(gw))["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("path, body", [
    (b"/v1/images/generations", b'{"model":"gpt-image-1","stream":true,"prompt":"a cat"}'),
    (b"/v1/responses", b'{"model":"m","stream":true,"input":"hi"}'),
    (CHAT, b'{"model":"m","stream":false,"messages":[]}'),
])
def test_other_requests_are_left_alone(path, body):
    """Other APIs (which may reject stream_options) and non-streams are sent as written."""
    gw = Gateway()
    gw.client(post(path, body, b"Accept-Encoding: gzip\r\n"))
    assert sent_body(gw) == body and b"Accept-Encoding: gzip" in gw.upstream(0).received()


def test_stream_usage_off_leaves_the_request_untouched():
    """With stream_usage = off the upstream gets the client's bytes; the stream's tokens
    are estimated, and the access record says so."""
    gw = Gateway(OFF)
    body = b'{ "model": "m", "stream": true, "messages": [{"role": "user", "content": "hi there"}] }'
    _, client = gw.client(post(CHAT, body, b"Accept-Encoding: gzip\r\n"))
    assert sent_body(gw) == body and b"Accept-Encoding: gzip" in gw.upstream(0).received()
    chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    gw.upstream(0).send(STREAM_HEAD + chunked(sse(chunk, chunk) + b"data: [DONE]\n\n") + b"0\r\n\r\n")
    assert client.value().count(b'"content":"hi"') == 2
    assert gw.records[-1].usage.estimated


def test_stream_usage_must_be_on_or_off():
    """stream_usage is an on/off switch of [upstream:NAME]."""
    from openaigw.config import ConfigError, parse

    with pytest.raises(ConfigError, match=r"\[upstream:up\] stream_usage: 'maybe' is not on/off"):
        parse(OFF.replace("stream_usage = off", "stream_usage = maybe"), "gw.ini", {"KEY": "k"})


def test_access_log_of_real_streams(pki, fake_node, tmp_path):
    """Through a real twistd and the fake OpenAI upstream: a stream on a route without
    ai-rate-limiting logs the upstream's exact tokens, and the client sees no usage
    chunk; with stream_usage = off the upstream gets the client's body and the log
    says the tokens are estimated."""
    port = free_port()
    config = f"""
[gateway]
listen = tcp:port={port}:interface=127.0.0.1
access_log = {tmp_path}/access.log

[upstream:exact]
nodes = 127.0.0.1:{fake_node}
ca_file = {pki.ca}

[upstream:asis]
nodes = 127.0.0.1:{fake_node}
ca_file = {pki.ca}
stream_usage = off

[route:exact]
uri = /v1/chat/completions
upstream = exact

[route:asis]
uri = /asis/chat/completions
upstream = asis
proxy-rewrite.uri = /v1/chat/completions
"""
    proc = start_gateway(tmp_path, config, port, env=dict(os.environ))
    try:
        relayed = {}
        for route in ("exact", "asis"):
            path = "/v1/chat/completions" if route == "exact" else "/asis/chat/completions"
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=STREAM,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as r:
                relayed[route] = r.read()
        with urllib.request.urlopen(f"https://127.0.0.1:{fake_node}/_fake/requests", timeout=10,
                                    context=ssl.create_default_context(cafile=pki.ca)) as r:
            bodies = [json.loads(seen["body"]) for seen in json.load(r)[-2:]]
    finally:
        stop_process(proc)
    assert b"usage" not in relayed["exact"] and relayed["exact"].endswith(b"data: [DONE]\n\n")
    assert bodies[0]["stream_options"] == {"include_usage": True}
    assert bodies[1] == json.loads(STREAM)
    lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    exact, asis = lines[-2:]
    assert (exact["route"], exact["total_tokens"], exact["tokens_estimated"]) == ("exact", 7, False)
    assert (asis["route"], asis["tokens_estimated"]) == ("asis", True)


def test_cached_stream_keeps_usage_from_the_client():
    """With cache = on, the stored stream is the one fetched with usage: a hit replays it
    to a client that did not ask without the usage chunk, and counts the exact tokens it
    saved."""
    from tests.test_cache import CONFIG as CACHED, split

    gw = Gateway(CACHED)
    for hit in (False, True):
        _, client = gw.client(post(CHAT, STREAM))
        if not hit:
            assert json.loads(sent_body(gw))["stream_options"] == {"include_usage": True}
            answer_with_usage(gw.upstream(0))
        status, headers, chunks = split(client.value())
        assert headers[b"x-cache-status"] == (b"HIT" if hit else b"MISS")
        relayed = b"".join(chunks)
        assert b"usage" not in relayed and relayed.count(b'"content":"hi"') == 2
        assert relayed.endswith(b"data: [DONE]\n\n")
        record = gw.records[-1]
        if hit:  # tokens saved, not used
            assert (record.usage, record.tokens_saved) == (None, 10)
        else:
            assert (record.usage.total_tokens, record.usage.estimated) == (10, False)
    assert gw.requests_sent() == 1


def test_usage_asked_when_the_stream_key_is_escaped():
    """``"str\\u0065am": true`` is the member "stream" to any JSON parser: the stream is
    asked for its usage (exact tokens, not an estimate a client could choose)."""
    gw = Gateway()
    body = b'{"model":"m","str\\u0065am":true,"messages":[{"role":"user","content":"hi there"}]}'
    gw.client(post(CHAT, body))
    assert json.loads(sent_body(gw))["stream_options"] == {"include_usage": True}
    answer_with_usage(gw.upstream(0))
    usage = gw.records[-1].usage
    assert (usage.total_tokens, usage.estimated) == (10, False)


def test_metering_does_not_depend_on_where_reads_end():
    """However a stream is cut into reads (events, CRLFs or a usage chunk split across
    them, "usage" in comments), the client gets the same bytes and the same usage as
    from one read."""
    import random

    from openaigw.usage import UsageMeter

    usage = b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}'
    pieces = [b"data: ", b'{"a":1}', b"\n", b"\r\n", b"\r", b"\n\n", b"\r\n\r\n", b'"usage"', b',"usage":null',
              b": a comment naming \"usage\"\n", b'data: {"choices":[],' + usage + b"}\n\n",
              b'data: {"choices":[],' + usage + b"}\r\n\r\n", b"data: [DONE]\n\n",
              b'data: {"choices":[{"delta":{"content":"\\"usage\\":{"}}],"usage":null}\n\n']
    rng = random.Random(15)
    for _ in range(3000):
        stream = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        cuts = sorted(rng.sample(range(len(stream) + 1), min(len(stream) + 1, rng.randint(1, 5))))
        reads = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
        for strip in (False, True):
            whole, split = UsageMeter(b"text/event-stream", b"", strip), UsageMeter(b"text/event-stream", b"", strip)
            expected = whole.feed(stream) + whole.finish(True)
            assert b"".join(split.feed(read) for read in reads) + split.finish(True) == expected, (stream, reads)
            assert split.usage(lambda: 5) == whole.usage(lambda: 5), (stream, reads)
