"""End to end on loopback: the official openai SDK -> `twistd -n openaigw` -> fake
OpenAI upstreams over real TLS with a CA made here."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import openai
import pytest

from openaigw.testing import (
    free_port,
    start_fake_upstream,
    start_gateway,
    stop_process,
)

KEY = "sk-real-0123456789-canary"
CLIENT_KEY = "sk-client-must-not-leak"
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def nodes(pki):
    """Three fake upstreams with the test CA's certificate, and one with a rogue one."""
    procs = {}
    for name in ("a", "b", "c"):
        procs[name] = start_fake_upstream(pki.directory, name=name)
    procs["rogue"] = start_fake_upstream(pki.directory, name="rogue", cert=pki.rogue)
    yield {name: port for name, (_, port) in procs.items()}
    for proc, _ in procs.values():
        stop_process(proc)


@pytest.fixture(scope="module")
def gateway(pki, nodes, tmp_path_factory):
    dead = free_port()
    port = free_port()
    config = f"""
[gateway]
listen = tcp:port={port}:interface=127.0.0.1
max_body_size = 64K

[upstream:fake]
scheme = https
nodes =
    127.0.0.1:{nodes["a"]} 1
ca_file = {pki.ca}
timeout_connect = 2
timeout_read = 1

[upstream:weighted]
scheme = https
nodes =
    localhost:{nodes["b"]} 3
    localhost:{nodes["c"]} 1
ca_file = {pki.ca}

[upstream:with-dead-node]
scheme = https
nodes =
    127.0.0.1:{dead} 1
    127.0.0.1:{nodes["a"]} 1
ca_file = {pki.ca}

[upstream:rogue]
scheme = https
nodes = 127.0.0.1:{nodes["rogue"]}
ca_file = {pki.ca}

[upstream:wrong-name]
scheme = https
nodes = 127.0.0.1:{nodes["a"]}
ca_file = {pki.ca}
pass_host = rewrite
upstream_host = api.example.com

[route:wrong-name]
uri = /wrong-name/*
upstream = wrong-name
proxy-rewrite.uri = /v1/chat/completions

[route:chat]
uri = /v1/chat/completions
methods = POST
upstream = fake
proxy-rewrite.headers.set.Authorization = Bearer $ENV://OPENAI_API_KEY

[route:models]
uri = /v1/models
upstream = fake
proxy-rewrite.headers.set.Authorization = Bearer $ENV://OPENAI_API_KEY

[route:weighted]
uri = /weighted/*
upstream = weighted
proxy-rewrite.uri = /v1/chat/completions

[route:dead]
uri = /dead/*
upstream = with-dead-node
proxy-rewrite.uri = /v1/chat/completions

[route:rogue]
uri = /rogue/*
upstream = rogue
proxy-rewrite.uri = /v1/chat/completions
"""
    directory = tmp_path_factory.mktemp("gateway")
    proc = start_gateway(directory, config, port, env={**_environ(), "OPENAI_API_KEY": KEY})
    yield port
    stop_process(proc)
    log = (directory / "gateway.log").read_text()
    assert KEY not in log and CLIENT_KEY not in log


def _environ():
    import os

    return {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}


def client(port: int, base: str = "/v1", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}{base}", api_key=CLIENT_KEY, max_retries=0, **kwargs
    )


def received(pki, port: int) -> list:
    context = ssl.create_default_context(cafile=pki.ca)
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/_fake/requests", context=context) as r:
        return json.load(r)


def reset(pki, port: int) -> None:
    context = ssl.create_default_context(cafile=pki.ca)
    request = urllib.request.Request(f"https://127.0.0.1:{port}/_fake/reset", method="POST")
    urllib.request.urlopen(request, context=context).close()


def header(record: dict, name: str) -> list:
    return [v for k, v in record["headers"] if k.lower() == name.lower()]


def test_chat_completion_with_injected_key(pki, nodes, gateway):
    """The SDK gets the upstream's answer; the upstream sees the real key, never the client's."""
    reset(pki, nodes["a"])
    raw = client(gateway).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content.startswith("tok0")
    assert completion.usage.total_tokens > 0
    assert raw.headers["x-request-id"].startswith("req_")
    assert "twisted" not in raw.headers.get("server", "").lower()
    (record,) = received(pki, nodes["a"])
    assert header(record, "authorization") == [f"Bearer {KEY}"]
    assert CLIENT_KEY not in json.dumps(record)
    assert header(record, "x-forwarded-for") == ["127.0.0.1"]


def test_models_listed(gateway):
    """GET routes work too: the SDK lists models through the gateway."""
    models = client(gateway).models.list()
    assert len(models.data) > 0


def test_stream_chunks_arrive_spread_out(gateway):
    """SSE chunks reach the SDK as the upstream sends them, not in one burst."""
    stream = client(gateway).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True,
        extra_headers={"X-Fake-Chunks": "6", "X-Fake-Interval-Ms": "150"},
    )
    arrivals = []
    text = ""
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text == "".join(f"tok{i} " for i in range(6))
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert len(gaps) == 5
    # Each chunk came on its own, about 150 ms after the one before (the SDK's
    # first parse can delay the first arrival, so its gap is not judged).
    assert all(gap > 0.075 for gap in gaps[1:]), gaps
    assert arrivals[-1] - arrivals[0] > 0.6


def test_stream_usage_passes_when_asked(gateway):
    """A client asking for include_usage gets the usage chunk before [DONE]."""
    stream = client(gateway).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


def test_weighted_round_robin(pki, nodes, gateway):
    """Weights 3:1 send three of every four requests to the first node."""
    sdk = client(gateway, base="/weighted")
    seen = Counter()
    for _ in range(8):
        raw = sdk.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        seen[raw.headers["x-fake-node"]] += 1
    assert seen == {"b": 6, "c": 2}


def test_dead_node_is_skipped(gateway):
    """With a node refusing connections every request still succeeds on the other."""
    sdk = client(gateway, base="/dead")
    for _ in range(4):
        assert sdk.chat.completions.create(model="m", messages=MESSAGES).choices


def test_rogue_certificate_is_502(gateway):
    """An upstream whose certificate does not chain to ca_file gets no request: 502."""
    with pytest.raises(openai.APIStatusError) as caught:
        client(gateway, base="/rogue").chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.body["message"] == "TLS verification of the upstream server failed"


def test_certificate_for_another_name_is_502(gateway):
    """A certificate from the right CA but for another host name fails verification."""
    with pytest.raises(openai.APIStatusError) as caught:
        client(gateway, base="/wrong-name").chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.body["message"] == "TLS verification of the upstream server failed"


def test_hanging_upstream_is_504(gateway):
    """No response headers within timeout_read: an OpenAI-shaped 504."""
    with pytest.raises(openai.APIStatusError) as caught:
        client(gateway).chat.completions.create(model="hang", messages=MESSAGES)
    assert caught.value.status_code == 504
    assert caught.value.body["type"] == "upstream_error"


def test_upstream_dying_mid_stream_is_an_error(gateway):
    """A stream cut by the upstream is cut for the client too, never a clean end."""
    stream = client(gateway).chat.completions.create(model="die-mid-stream", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_client_disconnect_ends_upstream_stream(pki, nodes, gateway):
    """A client that leaves mid-stream ends the upstream's stream within a second."""
    reset(pki, nodes["a"])
    stream = client(gateway).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True,
        extra_headers={"X-Fake-Chunks": "200", "X-Fake-Interval-Ms": "50"},
    )
    iterator = iter(stream)
    next(iterator)
    next(iterator)
    stream.close()
    left = time.monotonic()
    while time.monotonic() - left < 1.0:
        (record,) = received(pki, nodes["a"])
        if record["disconnected"]:
            break
        time.sleep(0.05)
    assert record["disconnected"], "the upstream stream was still running after 1 s"


def test_body_too_large(gateway):
    """A request body over max_body_size gets an OpenAI-shaped 413."""
    with pytest.raises(openai.APIStatusError) as caught:
        client(gateway).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x" * 70000}]
        )
    assert caught.value.status_code == 413


def test_unknown_route_is_404(gateway):
    """Paths without a route get an OpenAI-shaped 404 (the SDK's NotFoundError)."""
    with pytest.raises(openai.NotFoundError):
        client(gateway).embeddings.create(model="e", input="x")


@pytest.mark.parametrize("valid", [True, False])
def test_check_option(tmp_path, valid):
    """`twistd openaigw --check` exits 0 for a valid file and 78 naming the error otherwise."""
    text = "[upstream:u]\nnodes = h:1\n[route:r]\nuri = /x\nupstream = u\n"
    (tmp_path / "gw.ini").write_text(text if valid else text + "bogus = 1\n")
    result = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "openaigw",
         "-c", str(tmp_path / "gw.ini"), "--check"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**_environ(), "PYTHONPATH": str(__import__("pathlib").Path(__file__).parent.parent)},
    )
    if valid:
        assert result.returncode == 0, result.stderr
        assert "configuration OK" in result.stdout
    else:
        assert result.returncode == 78  # EX_CONFIG
        assert "[route:r] bogus: unknown key or plugin 'bogus'" in result.stderr
