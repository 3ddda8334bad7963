"""Observability end to end: access log lines, /metrics after SDK traffic, health, secrets."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest

from openaigw.testing import free_port, start_gateway, stop_process

CANARY = "sk-canary-8c1d7f0e5b"  # the real key: must appear in no log
CLIENT_KEY = "sk-gw-observed-team-key-0001"
MESSAGES = [{"role": "user", "content": "a private prompt"}]


@pytest.fixture(scope="module")
def gateway(pki, fake_node, tmp_path_factory):
    port, status = free_port(), free_port()
    directory = tmp_path_factory.mktemp("gateway-observed")
    config = f"""
[gateway]
listen = tcp:port={port}:interface=127.0.0.1
status = tcp:port={status}:interface=127.0.0.1
access_log = {directory}/access.log

[upstream:fake]
scheme = https
nodes = 127.0.0.1:{fake_node}
ca_file = {pki.ca}
timeout_read = 1

[upstream:nowhere]
scheme = https
nodes = 127.0.0.1:{free_port()}
ca_file = {pki.ca}

[consumer:team-o]
key_sha256 = {hashlib.sha256(CLIENT_KEY.encode()).hexdigest()}

[route:chat]
uri = /v1/chat/completions
upstream = fake
key-auth = on
ai-rate-limiting.limit = 100000
ai-rate-limiting.time_window = 60
proxy-rewrite.headers.set.Authorization = Bearer $ENV://OPENAI_API_KEY

[route:down]
uri = /down/*
upstream = nowhere
proxy-rewrite.headers.set.Authorization = Bearer $ENV://OPENAI_API_KEY
"""
    proc = start_gateway(directory, config, port, env={**os.environ, "OPENAI_API_KEY": CANARY})
    yield {"port": port, "status": status, "dir": directory, "proc": proc}
    stop_process(proc)


def get(url: str) -> tuple:
    try:
        with urllib.request.urlopen(url) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def access_lines(gateway, path: str = "access.log", at_least: int = 1) -> list:
    """The access log's lines, once it has ``at_least`` (the gateway writes them
    together, up to 0.1 s after the requests)."""
    deadline = time.monotonic() + 5
    while True:
        file = gateway["dir"] / path
        lines = [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []
        if len(lines) >= at_least or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_traffic_shows_in_metrics_and_access_log(gateway):
    """After SDK traffic (plain and streamed) /metrics counts requests and tokens, and the
    access log has a JSON line for each with the fields operators need."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway['port']}/v1", api_key=CLIENT_KEY, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert len([c for c in stream]) == 5
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{gateway['port']}/v1", api_key="sk-wrong-key-0000000000",
                      max_retries=0).chat.completions.create(model="m", messages=MESSAGES)
    code, text = get(f"http://127.0.0.1:{gateway['status']}/metrics")
    assert code == 200
    assert metric(text, "openaigw_requests_total", route="chat", consumer="team-o", status="200") == 2
    assert metric(text, "openaigw_requests_total", route="chat", consumer="", status="401") == 1
    # the fake counts 3 prompt and 5 completion tokens for each answer
    assert metric(text, "openaigw_tokens_total", route="chat", consumer="team-o", model="gpt-4o-mini", kind="prompt") == 6
    assert metric(text, "openaigw_tokens_total", route="chat", model="gpt-4o-mini", kind="completion") == 10
    assert metric(text, "openaigw_time_to_first_byte_seconds_count", route="chat") == 3
    assert metric(text, "openaigw_active_streams", route="chat") == 0
    assert metric(text, "openaigw_requests_waiting") == 0  # (three requests: no burst)
    assert metric(text, "process_resident_memory_bytes") > 0
    plain, streamed, rejected = access_lines(gateway, at_least=3)[-3:]
    assert (plain["status"], plain["consumer"], plain["route"], plain["model"]) == (200, "team-o", "chat", "gpt-4o-mini")
    assert plain["upstream_status"] == 200 and plain["upstream_request_id"].startswith("req_")
    assert (plain["prompt_tokens"], plain["completion_tokens"], plain["tokens_estimated"]) == (3, 5, False)
    assert streamed["streamed"] is True and streamed["total_tokens"] == 8
    assert streamed["ttfb_ms"] <= streamed["duration_ms"]
    assert (rejected["status"], rejected["error"], rejected["consumer"]) == (401, "key-auth", None)
    for line in (plain, streamed):
        assert line["request_id"] and line["client"] == "127.0.0.1" and line["bytes_out"] > 0


def test_upstream_failures_counted(gateway):
    """Failed upstream attempts show in metrics by upstream, node and reason."""
    request = urllib.request.Request(f"http://127.0.0.1:{gateway['port']}/down/x", data=b"{}")
    assert get_status(request) == 502
    code, text = get(f"http://127.0.0.1:{gateway['status']}/metrics")
    assert metric(text, "openaigw_upstream_failures_total", upstream="nowhere", reason="upstream_connect") == 1
    assert access_lines(gateway, at_least=4)[-1]["error"] == "upstream_connect"


def get_status(request) -> int:
    try:
        with urllib.request.urlopen(request) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_health_endpoints(gateway):
    """/healthz and /readyz answer 200 once the gateway listens."""
    assert get(f"http://127.0.0.1:{gateway['status']}/healthz") == (200, "ok\n")
    status, body = get(f"http://127.0.0.1:{gateway['status']}/readyz")
    assert status == 200 and body.startswith("ok\n") and "upstream fake node 127.0.0.1:" in body


def test_sighup_reopens_access_log(gateway):
    """After logrotate moves the file, SIGHUP makes the gateway write a new one."""
    log = gateway["dir"] / "access.log"
    os.rename(log, gateway["dir"] / "access.log.1")
    gateway["proc"].send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    get(f"http://127.0.0.1:{gateway['port']}/nowhere")
    assert access_lines(gateway)[-1]["status"] == 404
    assert gateway["proc"].poll() is None  # SIGHUP did not stop it


def test_no_secret_in_any_log(gateway):
    """The real key, the client's key and prompts appear in no log, even around errors."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway['port']}/v1", api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError):  # hangs past timeout_read: 504
        client.chat.completions.create(model="hang", messages=MESSAGES)
    stream = client.chat.completions.create(model="die-mid-stream", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError):
        list(stream)
    for name in os.listdir(gateway["dir"]):
        if name.endswith(".log") or ".log." in name:
            text = (gateway["dir"] / name).read_text()
            for secret in (CANARY, CLIENT_KEY, "a private prompt"):
                assert secret not in text, (name, secret)
