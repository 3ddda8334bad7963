"""Tests of openaigw.testing: the fake upstream, run as a TLS subprocess."""

import socket
import ssl
import time

import openai
import pytest

try:
    import httpx2 as httpx
except ImportError:  # older openai SDKs use httpx
    import httpx

from openaigw.testing import start_fake_upstream, stop_process


@pytest.fixture(scope="module")
def port(pki):
    proc, port = start_fake_upstream(pki.directory, name="node-a")
    yield port
    stop_process(proc)


def _http(pki, port, host="127.0.0.1"):
    ctx = ssl.create_default_context(cafile=pki.ca)
    return httpx.Client(verify=ctx, trust_env=False, base_url=f"https://{host}:{port}")


def _sdk(pki, port, api_key="sk-test", host="127.0.0.1"):
    http_client = _http(pki, port, host)
    return openai.OpenAI(base_url=f"https://{host}:{port}/v1", api_key=api_key,
                         http_client=http_client, max_retries=0, timeout=5)


def _records(pki, port):
    with _http(pki, port) as c:
        return c.get("/_fake/requests").json()


def test_non_streaming_completion(pki, port):
    with _sdk(pki, port, host="localhost") as client:  # also checks the DNS SAN
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
    assert raw.headers["server"] == "fake-openai"
    assert raw.headers["x-fake-node"] == "node-a"
    assert raw.headers["x-request-id"].startswith("req_")
    resp = raw.parse()
    assert resp.object == "chat.completion" and resp.model == "gpt-4o-mini"
    assert resp.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streaming_chunks_are_spread_in_time(pki, port):
    n, interval_ms = 5, 60
    with _sdk(pki, port) as client:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Fake-Chunks": str(n), "X-Fake-Interval-Ms": str(interval_ms)})
        arrivals = [(time.monotonic(), chunk) for chunk in stream]
    content = [(t, c) for t, c in arrivals if c.choices]
    assert [c.choices[0].delta.content for _, c in content] == [f"tok{i} " for i in range(n)]
    assert content[-1][0] - content[0][0] >= (n - 1) * interval_ms / 1000 * 0.5
    assert arrivals[-1][1].choices == [] and arrivals[-1][1].usage.completion_tokens == n


def test_records_authorization_and_disconnects(pki, port):
    with _http(pki, port) as c:
        assert c.post("/_fake/reset").status_code == 200
        assert c.get("/_fake/health").text == "ok"
    with _sdk(pki, port, api_key="sk-secret-1") as client:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    with _http(pki, port) as c:
        with c.stream("POST", "/v1/chat/completions", json={"model": "m", "stream": True},
                      headers={"X-Fake-Chunks": "100", "X-Fake-Interval-Ms": "20"}) as r:
            next(r.iter_raw())
    deadline = time.monotonic() + 2
    while not _records(pki, port)[-1]["disconnected"] and time.monotonic() < deadline:
        time.sleep(0.02)
    first, second = _records(pki, port)
    assert first["method"] == "POST" and first["path"] == "/v1/chat/completions"
    headers = {name.lower(): value for name, value in first["headers"]}
    assert headers["authorization"] == "Bearer sk-secret-1"
    assert first["finished_at"] and not first["disconnected"]
    assert second["disconnected"] and second["finished_at"] is None


def test_errors(pki, port):
    with _sdk(pki, port) as client:
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="error-429", messages=[])
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.code == "rate_limit_exceeded"
        with pytest.raises(openai.NotFoundError):
            client.get("/nope", cast_to=object)
        assert [m.id for m in client.models.list()][0] == "gpt-4o-mini"


def test_rogue_cert_fails_verification(pki, tmp_path):
    proc, rogue_port = start_fake_upstream(tmp_path, name="rogue", cert=pki.rogue)
    try:
        ctx = ssl.create_default_context(cafile=pki.ca)
        with socket.create_connection(("127.0.0.1", rogue_port), timeout=5) as sock:
            with pytest.raises(ssl.SSLCertVerificationError):
                ctx.wrap_socket(sock, server_hostname="localhost")
        with _sdk(pki, rogue_port) as client, pytest.raises(openai.APIConnectionError):
            client.models.list()
        # The rogue chain itself is fine: it verifies against its own CA.
        own = ssl.create_default_context(cafile=pki.rogue_ca)
        with socket.create_connection(("127.0.0.1", rogue_port), timeout=5) as sock:
            own.wrap_socket(sock, server_hostname="localhost").close()
    finally:
        stop_process(proc)


def test_trouble_mode(pki, port):
    """/_fake/trouble: a status with Retry-After for a while (or a number of
    requests), then normal answers again."""
    with _http(pki, port) as c:
        c.post("/_fake/trouble", json={"status": 429, "retry_after": "2", "times": 2})
        for _ in range(2):
            r = c.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []})
            assert r.status_code == 429 and r.headers["retry-after"] == "2"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert c.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []}).status_code == 200
        c.post("/_fake/trouble", json={"status": 503, "seconds": 60})
        assert c.get("/v1/models").status_code == 503
        c.post("/_fake/trouble", json={})
        assert c.get("/v1/models").status_code == 200


def test_azure_mode(pki, tmp_path):
    """Azure mode checks the path, the api-version and the api-key header, and
    refuses Authorization."""
    proc, azure_port = start_fake_upstream(pki.directory, name="azure", azure_key="az-key")
    chat = "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
    body = {"model": "ignored", "messages": []}
    try:
        with _http(pki, azure_port) as c:
            r = c.post(chat, json=body, headers={"api-key": "az-key"})
            assert r.status_code == 200 and r.json()["model"] == "prod-4o"
            assert c.post(chat, json=body, headers={"api-key": "az-key", "authorization": "Bearer x"}).status_code == 401
            assert c.post(chat, json=body, headers={"api-key": "other"}).status_code == 401
            assert c.post(chat.replace("2024-10-21", "2023-01-01"), json=body,
                          headers={"api-key": "az-key"}).status_code == 400
            assert c.post("/v1/chat/completions?api-version=2024-10-21", json=body,
                          headers={"api-key": "az-key"}).status_code == 404
            assert c.get("/openai/models?api-version=2024-10-21", headers={"api-key": "az-key"}).status_code == 200
            r = c.post("/openai/v1/chat/completions", json={"model": "gpt-4o", "messages": []},
                       headers={"api-key": "az-key"})
            assert r.status_code == 200 and r.json()["model"] == "gpt-4o"
    finally:
        stop_process(proc)
