"""Fallback and health end to end: the openai SDK (max_retries=0) -> `twistd -n
openaigw` -> a primary fake OpenAI that rate limits, dies or hangs, and a fake Azure
OpenAI behind it, both over real TLS."""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request

import openai
import pytest

from openaigw.testing import free_port, start_fake_upstream, start_gateway, stop_process

PRIMARY_KEY = "sk-primary-canary-3b9e1f"
AZURE_KEY = "az-canary-key-77d2c4"
MESSAGES = [{"role": "user", "content": "hello there"}]


def _tls() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=os.environ["_FALLBACK_TEST_CA"])


def fake(port: int, path: str, body: object = None) -> object:
    """GET (or POST ``body`` to) a fake upstream's control endpoint."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=data,
                                     method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, context=_tls(), timeout=10) as r:
        return json.load(r)


def chats(port: int) -> list:
    """The chat requests a fake upstream received (not its health probes)."""
    return [r for r in fake(port, "/_fake/requests") if "chat/completions" in r["path"]]


@pytest.fixture
def upstreams(pki, monkeypatch):
    """A primary fake OpenAI and a fake Azure OpenAI: {name: (process, port)}."""
    monkeypatch.setenv("_FALLBACK_TEST_CA", pki.ca)
    procs = {"primary": start_fake_upstream(pki.directory, name="primary"),
             "azure": start_fake_upstream(pki.directory, name="azure", azure_key=AZURE_KEY)}
    yield procs
    for proc, _ in procs.values():
        stop_process(proc)


def start(pki, tmp_path, upstreams, cooldown: float):
    """A gateway: route chat to the primary, falling back to Azure."""
    port, status = free_port(), free_port()
    config = f"""
[gateway]
listen = tcp:port={port}:interface=127.0.0.1
status = tcp:port={status}:interface=127.0.0.1
access_log = {tmp_path}/access.log

[upstream:primary]
nodes = 127.0.0.1:{upstreams["primary"][1]}
ca_file = {pki.ca}
api_key = $ENV://PRIMARY_KEY
timeout_connect = 2
timeout_read = 1
checks.passive.cooldown = {cooldown}

[upstream:azure]
nodes = localhost:{upstreams["azure"][1]}
ca_file = {pki.ca}
provider = azure
api_key = $ENV://AZURE_KEY
api_version = 2024-10-21
deployments =
    gpt-4o-mini  mini-deployment
checks.active.path = /v1/models
checks.active.interval = 1

[route:chat]
uri = /v1/*
upstream = primary
fallback = azure
"""
    env = {**os.environ, "PRIMARY_KEY": PRIMARY_KEY, "AZURE_KEY": AZURE_KEY}
    proc = start_gateway(tmp_path, config, port, env=env)
    return proc, port, status


def _gateway(pki, tmp_path, upstreams, cooldown):
    proc, port, status = start(pki, tmp_path, upstreams, cooldown)
    yield port, status
    stop_process(proc)
    logs = (tmp_path / "gateway.log").read_text() + (tmp_path / "access.log").read_text()
    assert PRIMARY_KEY not in logs and AZURE_KEY not in logs


@pytest.fixture
def gateway(pki, tmp_path, upstreams):
    """The gateway, with a passive cooldown of 2 s."""
    yield from _gateway(pki, tmp_path, upstreams, 2)


@pytest.fixture
def steady(pki, tmp_path, upstreams):
    """The gateway, with a passive cooldown of 30 s (longer than any test)."""
    yield from _gateway(pki, tmp_path, upstreams, 30)


def sdk(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-client-anything",
                         max_retries=0, timeout=20)


def ask(port: int) -> str:
    """One chat completion through the gateway; the fake node that answered."""
    raw = sdk(port).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content.startswith("tok0")
    return raw.headers["x-fake-node"]


def header(record: dict, name: str) -> list:
    """The values of header ``name`` (any case) a fake upstream received."""
    return [v for k, v in record["headers"] if k.lower() == name]


def access_lines(tmp_path) -> list:
    deadline = time.monotonic() + 5
    while True:  # lines are written within 0.1 s
        text = (tmp_path / "access.log").read_text()
        if text or time.monotonic() > deadline:
            return [json.loads(line) for line in text.splitlines()]
        time.sleep(0.1)


def test_429_falls_back_and_the_primary_comes_back(gateway, upstreams, tmp_path):
    """A 429 with Retry-After: 2 sends that request on to Azure (right path,
    api-version and api-key, no Authorization); the primary gets nothing for 2 s,
    then traffic again.  Every SDK request succeeds."""
    port, status = gateway
    primary, azure = upstreams["primary"][1], upstreams["azure"][1]
    fake(primary, "/_fake/trouble", {"status": 429, "retry_after": "2", "times": 1})
    answered = []
    started = time.monotonic()
    while time.monotonic() - started < 6 and answered[-3:] != ["primary"] * 3:
        answered.append(ask(port))
        time.sleep(0.05)
    assert answered[0] == "azure" and answered[-1] == "primary"
    sent = chats(primary)
    assert sent[1]["received_at"] - sent[0]["received_at"] >= 1.9  # the cooldown held
    assert sent[0]["path"] == "/v1/chat/completions"
    assert header(sent[0], "authorization") == [f"Bearer {PRIMARY_KEY}"]
    to_azure = chats(azure)[0]
    assert to_azure["path"] == "/openai/deployments/mini-deployment/chat/completions?api-version=2024-10-21"
    assert header(to_azure, "api-key") == [AZURE_KEY] and header(to_azure, "authorization") == []
    first = access_lines(tmp_path)[0]
    assert (first["upstream"], first["status"], first["retries"]) == ("azure", 200, 1)
    assert first["failed_attempts"] == f"primary 127.0.0.1:{primary} status_429"


def test_sse_429_before_the_stream_falls_back(gateway, upstreams):
    """A streamed request that meets a 429 before the stream starts gets one clean
    stream from the fallback."""
    port, _ = gateway
    fake(upstreams["primary"][1], "/_fake/trouble", {"status": 429, "retry_after": "2", "times": 1})
    stream = sdk(port).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert len(chats(upstreams["primary"][1])) == len(chats(upstreams["azure"][1])) == 1


def test_node_dies_and_comes_back(pki, gateway, upstreams):
    """While the primary refuses connections every request succeeds through Azure;
    once it is back (and its cooldown over) it gets traffic again."""
    port, status = gateway
    proc, primary = upstreams["primary"]
    stop_process(proc)
    assert [ask(port) for _ in range(5)] == ["azure"] * 5
    with urllib.request.urlopen(f"http://127.0.0.1:{status}/readyz", timeout=5) as r:
        body = r.read().decode()
    assert body.startswith("ok\n") and f"upstream primary node 127.0.0.1:{primary}: cooling" in body
    with urllib.request.urlopen(f"http://127.0.0.1:{status}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert f'openaigw_upstream_node_up{{node="127.0.0.1:{primary}",upstream="primary"}} 0.0' in metrics
    upstreams["primary"] = start_fake_upstream(pki.directory, name="primary", port=primary)
    deadline = time.monotonic() + 10
    while ask(port) != "primary":
        assert time.monotonic() < deadline, "the primary never got traffic again"
        time.sleep(0.1)


def test_node_that_hangs(steady, upstreams):
    """A primary that never answers costs each request timeout_read, then Azure
    answers; after three timeouts it is out and requests go to Azure at once."""
    port, _ = steady
    fake(upstreams["primary"][1], "/_fake/trouble", {"hang": True})
    started = time.monotonic()
    assert [ask(port) for _ in range(3)] == ["azure"] * 3
    assert time.monotonic() - started >= 3
    assert [ask(port) for _ in range(3)] == ["azure"] * 3
    assert len(chats(upstreams["primary"][1])) == 3


def test_everything_out_answers_at_once(steady, upstreams):
    """With the primary and Azure both rate limited the last 429 passes through;
    then the gateway answers 429 itself at once, Retry-After the earliest end."""
    port, status = steady
    fake(upstreams["primary"][1], "/_fake/trouble", {"status": 429, "retry_after": "30"})
    fake(upstreams["azure"][1], "/_fake/trouble", {"status": 429, "retry_after": "20"})
    with pytest.raises(openai.RateLimitError) as caught:
        ask(port)
    assert caught.value.response.headers["x-fake-node"] == "azure"
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        ask(port)
    assert time.monotonic() - started < 1
    response = caught.value.response
    assert "x-fake-node" not in response.headers
    assert 18 <= int(response.headers["retry-after"]) <= 20
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(urllib.error.HTTPError) as not_ready:
        urllib.request.urlopen(f"http://127.0.0.1:{status}/readyz", timeout=5)
    assert not_ready.value.code == 503
    assert not_ready.value.read().decode().startswith("no usable upstream for route(s): chat")


def test_model_without_deployment(steady, upstreams):
    """Azure without a deployment for the model is skipped for fallback; asked
    directly (the primary out) it is a clear 400 naming the model."""
    port, _ = steady
    fake(upstreams["primary"][1], "/_fake/trouble", {"status": 503})
    client = sdk(port)
    with pytest.raises(openai.InternalServerError):  # the primary's 503 passes through
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    for _ in range(2):  # three 5xx in a row: the primary is out
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert "gpt-4o" in caught.value.message and caught.value.code == "model_not_found"
    assert ask(port) == "azure"


def test_probes_reach_azure_with_its_key(gateway, upstreams):
    """Active probes of the idle Azure upstream: GET /openai/models?api-version=...
    with its api-key (a free call)."""
    azure = upstreams["azure"][1]
    deadline = time.monotonic() + 10
    while True:
        probes = [r for r in fake(azure, "/_fake/requests") if r["method"] == "GET"]
        if probes or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert probes and probes[0]["path"] == "/openai/models?api-version=2024-10-21"
    assert header(probes[0], "api-key") == [AZURE_KEY]
