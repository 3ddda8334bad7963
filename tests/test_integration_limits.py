"""Gateway keys and limits end to end: the openai SDK -> twistd openaigw -> fake upstream."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request

import openai
import pytest

from openaigw.testing import free_port, start_gateway, stop_process
from tests.conftest import make_keys

REAL_KEY = "sk-real-upstream-canary-42"
MESSAGES = [{"role": "user", "content": "hello there"}]  # the fake counts 2 prompt tokens


@pytest.fixture(scope="module")
def keys():
    """Two consumers' keys, made with openaigw-keygen, and the config lines it printed."""
    return make_keys("team-a", "team-b")


@pytest.fixture(scope="module")
def gateway(pki, fake_node, keys, tmp_path_factory):
    port = free_port()
    config = f"""
[gateway]
listen = tcp:port={port}:interface=127.0.0.1

[upstream:fake]
scheme = https
nodes = 127.0.0.1:{fake_node}
ca_file = {pki.ca}

{keys["team-a"][1]}

{keys["team-b"][1]}
ai-rate-limiting.limit = 30
ai-rate-limiting.time_window = 3600

[route:chat]
uri = /v1/chat/completions
methods = POST
upstream = fake
key-auth = on
limit-count.count = 100
limit-count.time_window = 3600
proxy-rewrite.headers.set.Authorization = Bearer $ENV://OPENAI_API_KEY
"""
    directory = tmp_path_factory.mktemp("gateway-limits")
    env = {**os.environ, "OPENAI_API_KEY": REAL_KEY}
    proc = start_gateway(directory, config, port, env=env)
    yield port
    stop_process(proc)
    log = (directory / "gateway.log").read_text()
    for secret in (REAL_KEY, keys["team-a"][0], keys["team-b"][0]):
        assert secret not in log


def sdk(port: int, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)


def fake_requests(pki, port: int) -> list:
    import ssl

    context = ssl.create_default_context(cafile=pki.ca)
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/_fake/requests", context=context) as r:
        return json.load(r)


def test_keygen_prints_key_and_hash(keys):
    """openaigw-keygen's key hashes to the key_sha256 it prints."""
    key, section = keys["team-a"]
    assert section.startswith("[consumer:team-a]\nkey_sha256 = ")
    assert section.split(" = ")[1] == hashlib.sha256(key.encode()).hexdigest()


def test_valid_key_works_and_never_reaches_upstream(pki, fake_node, gateway, keys):
    """The SDK with a gateway key gets an answer; the upstream sees the real key and the consumer."""
    key = keys["team-a"][0]
    answer = sdk(gateway, key).chat.completions.create(model="m", messages=MESSAGES)
    assert answer.choices[0].message.content
    record = fake_requests(pki, fake_node)[-1]
    headers = {k.lower(): v for k, v in record["headers"]}
    assert headers["authorization"] == f"Bearer {REAL_KEY}"
    assert headers["x-consumer-username"] == "team-a"
    assert key not in json.dumps(record)


def test_bad_key_raises_authentication_error(gateway):
    """A wrong key is the SDK's AuthenticationError."""
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(gateway, "sk-gw-not-a-real-key-at-all").chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.code == "invalid_api_key"


def test_101st_request_is_rate_limited(gateway, keys):
    """limit-count 100 per window: the 101st raises RateLimitError with the headers."""
    client = sdk(gateway, keys["team-a"][0])
    used = 1  # test_valid_key_works... spent one
    remaining = None
    while used < 100:
        raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        used += 1
        remaining = int(raw.headers["x-ratelimit-remaining"])
    assert remaining == 0
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=MESSAGES)
    headers = caught.value.response.headers
    assert headers["x-ratelimit-limit"] == "100"
    assert headers["x-ratelimit-remaining"] == "0"
    assert int(headers["retry-after"]) == int(headers["x-ratelimit-reset"]) > 0
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.body["type"] == "requests"


def test_stream_without_usage_is_counted_but_not_shown(gateway, keys):
    """A stream that did not ask for usage gets no usage from the gateway, yet its tokens count,
    and the token limit trips once streamed and plain answers add up."""
    key = keys["team-b"][0]
    client = sdk(gateway, key)
    raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    assert raw.headers["x-ai-ratelimit-remaining-tokens"] == "30"
    # the fake answers 5 words: 2 prompt + 5 completion tokens
    request = urllib.request.Request(
        f"http://127.0.0.1:{gateway}/v1/chat/completions",
        data=json.dumps({"model": "m", "stream": True, "messages": MESSAGES}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        assert response.headers["x-ai-ratelimit-remaining-tokens"] == "23"
        body = response.read()
    assert b"usage" not in body
    assert body.count(b"data: ") == 6 and body.endswith(b"data: [DONE]\n\n")
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert all(chunk.usage is None for chunk in stream)
    stream = client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    assert [c.usage.total_tokens for c in stream if c.usage] == [7]
    raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    assert raw.headers["x-ai-ratelimit-remaining-tokens"] == "2"  # 30 - 4 * 7
    with pytest.raises(openai.RateLimitError) as caught:  # 35 of 30 used
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.body["type"] == "tokens"
    assert caught.value.response.headers["x-ai-ratelimit-remaining-tokens"] == "0"
