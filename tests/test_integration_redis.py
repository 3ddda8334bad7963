"""Limits shared through Redis, end to end: two `twistd openaigw` processes, one real
redis-server (Debian's), the fake OpenAI upstream, the openai SDK and raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from openaigw.testing import RedisServer, free_port, start_gateway, stop_process
from tests.conftest import make_keys

CANARY = "redis-pw-canary-7d41e0"
MESSAGES = [{"role": "user", "content": "hello there"}]  # the fake counts 2 prompt tokens
CONSUMERS = {  # name -> its limit lines
    "burst": "limit-count.count = 20\nlimit-count.time_window = 3600",
    "steady": "limit-count.count = 5\nlimit-count.time_window = 3600",
    "tokens": "ai-rate-limiting.limit = 30\nai-rate-limiting.time_window = 3600",
    "after": "limit-count.count = 3\nlimit-count.time_window = 3600",
}

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (make test installs it)")


@pytest.fixture(scope="module")
def cluster(pki, fake_node, tmp_path_factory):
    """redis-server with a password; gateway "a" rejects when it is unavailable, "b" allows."""
    redis = RedisServer(tmp_path_factory.mktemp("redis"), CANARY).start()
    keys = make_keys(*CONSUMERS)
    consumers = "\n\n".join(f"{keys[name][1]}\n{limits}" for name, limits in CONSUMERS.items())
    gateways, procs, directories = {}, [], []
    env = {**os.environ, "REDIS_PASSWORD": CANARY, "OPENAI_API_KEY": "sk-real"}
    try:
        for name, policy in (("a", "reject"), ("b", "allow")):
            port, status = free_port(), free_port()
            config = f"""
[gateway]
listen = tcp:port={port}:interface=127.0.0.1
status = tcp:port={status}:interface=127.0.0.1
state = redis://:$ENV://REDIS_PASSWORD@127.0.0.1:{redis.port}/0
state_unavailable = {policy}

[upstream:fake]
scheme = https
nodes = 127.0.0.1:{fake_node}
ca_file = {pki.ca}

{consumers}

[route:chat]
uri = /v1/chat/completions
methods = POST
upstream = fake
key-auth = on
proxy-rewrite.headers.set.Authorization = Bearer $ENV://OPENAI_API_KEY

[route:conn]
uri = /conn/chat
upstream = fake
limit-conn.conn = 2
limit-conn.key = route
proxy-rewrite.uri = /v1/chat/completions
"""
            directory = tmp_path_factory.mktemp(f"gateway-{name}")
            procs.append(start_gateway(directory, config, port, env=env))
            directories.append(directory)
            gateways[name] = {"port": port, "status": status}
        for gateway in gateways.values():
            wait_for(lambda: ready(gateway))
        yield {"redis": redis, "keys": keys, **gateways}
    finally:
        for proc in procs:
            stop_process(proc)
        redis.stop()
    for directory in directories:
        log = (directory / "gateway.log").read_text()
        assert CANARY not in log
        assert "redis://127.0.0.1:" in log  # the address is logged, without the password
        assert log.count("is unavailable") == 1  # one outage, one line (not one per request)
        assert log.count("is available again") == 1


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def readyz(gateway: dict) -> tuple:
    connection = http.client.HTTPConnection("127.0.0.1", gateway["status"], timeout=5)
    try:
        connection.request("GET", "/readyz")
        answer = connection.getresponse()
        return answer.status, answer.read().decode()
    finally:
        connection.close()


def ready(gateway: dict) -> bool:
    """/readyz says ok (its first line; each upstream node's state follows)."""
    status, text = readyz(gateway)
    return status == 200 and text.startswith("ok\n")


def chat(gateway: dict, key: str = "", path: str = "/v1/chat/completions", timeout: float = 10.0) -> tuple:
    """One non-streaming chat request: (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway["port"], timeout=timeout)
    try:
        body = json.dumps({"model": "m", "messages": MESSAGES})
        connection.request("POST", path, body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        connection.close()


def sdk(gateway: dict, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway['port']}/v1", api_key=key, max_retries=0)


def test_limit_count_is_exact_across_gateways(cluster):
    """limit-count 20: 60 concurrent requests over both gateways, exactly 20 pass."""
    key = cluster["keys"]["burst"][0]
    targets = [cluster["a"], cluster["b"]] * 30
    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(pool.map(lambda gateway: chat(gateway, key)[0], targets))
    assert statuses.count(200) == 20 and statuses.count(429) == 40


def test_remaining_agrees_across_gateways(cluster):
    """Alternating gateways, X-RateLimit-Remaining counts down as one; then both say 429."""
    key = cluster["keys"]["steady"][0]
    seen = []
    for i in range(5):
        status, headers, _ = chat(cluster["ab"[i % 2]], key)
        assert status == 200
        seen.append((headers["x-ratelimit-remaining"], headers["x-ratelimit-limit"]))
    assert seen == [(str(n), "5") for n in (4, 3, 2, 1, 0)]
    for gateway in (cluster["a"], cluster["b"]):
        with pytest.raises(openai.RateLimitError) as caught:
            sdk(gateway, key).chat.completions.create(model="m", messages=MESSAGES)
        assert caught.value.response.headers["x-ratelimit-remaining"] == "0"
    resets = {int(chat(g, key)[1]["x-ratelimit-reset"]) for g in (cluster["a"], cluster["b"])}
    assert max(resets) - min(resets) <= 1  # one window, by Redis's clock


def test_token_budget_is_shared(cluster):
    """A token budget of 30: what one gateway charges, the other sees; both refuse once spent."""
    key = cluster["keys"]["tokens"][0]
    a, b = sdk(cluster["a"], key), sdk(cluster["b"], key)
    first = a.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    assert first.headers["x-ai-ratelimit-remaining-tokens"] == "30"
    # the fake answers 5 words: 2 prompt + 5 completion tokens, charged after the answer
    # (sent as the answer ends: on a busy machine the next request can reach Redis first,
    # the documented overshoot, so each waits until the charge before it has landed)
    charged = ["EVAL", "return tonumber(redis.call('HGET', KEYS[1], 'count'))", "1",
               "openaigw:ai-rate-limiting/consumer:tokens:3600"]
    remaining = []
    for n, client in enumerate((b, a, b, a), 1):
        wait_for(lambda: cluster["redis"].command(*charged) == b":%d\r\n" % (7 * n))
        remaining.append(client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES))
    assert [r.headers["x-ai-ratelimit-remaining-tokens"] for r in remaining] == ["23", "16", "9", "2"]
    wait_for(lambda: cluster["redis"].command(*charged) == b":35\r\n")
    for client in (a, b):  # 35 of 30 spent
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="m", messages=MESSAGES)
        assert caught.value.body["type"] == "tokens"


def open_stream(gateway: dict) -> tuple:
    """A streaming request on the limit-conn route: (connection, response)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway["port"], timeout=10)
    body = json.dumps({"model": "m", "stream": True, "messages": MESSAGES})
    connection.request("POST", "/conn/chat", body, {
        "Content-Type": "application/json", "X-Fake-Chunks": "100", "X-Fake-Interval-Ms": "100"})
    return connection, connection.getresponse()


def test_limit_conn_counts_streams_on_both(cluster):
    """limit-conn 2: a stream on each gateway fills it; a third is refused on either; a
    stream that ends frees its slot for the other gateway."""
    first, answer = open_stream(cluster["a"])
    assert answer.status == 200
    second, answer = open_stream(cluster["b"])
    assert answer.status == 200
    for gateway in (cluster["a"], cluster["b"]):
        status, headers, body = chat(gateway, path="/conn/chat")
        assert status == 429 and json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    first.close()  # the client leaves: gateway a gives its slot back
    wait_for(lambda: chat(cluster["b"], path="/conn/chat")[0] == 200)
    second.close()


def test_redis_outage_and_return(cluster):
    """Redis stopped mid-traffic: "a" (reject) answers 503 at once, "b" (allow) passes,
    /readyz says degraded; Redis back: limits apply again within seconds, no restart.
    The outage is logged once per gateway; no error shows the password."""
    redis, key = cluster["redis"], cluster["keys"]["after"][0]
    assert chat(cluster["a"], key)[0] == 200
    redis.stop()
    for _ in range(5):
        started = time.monotonic()
        status, headers, body = chat(cluster["a"], key)
        assert time.monotonic() - started < 2  # no hang
        assert status == 503 and json.loads(body)["error"]["code"] == "gateway_state_unavailable"
        assert headers["retry-after"] == "1" and CANARY.encode() not in body
        status, headers, _ = chat(cluster["b"], key)
        assert status == 200 and "x-ratelimit-remaining" not in headers  # unlimited
    for gateway in (cluster["a"], cluster["b"]):
        status, text = readyz(gateway)
        assert status == 200 and text.startswith("degraded: shared state unavailable (Redis at redis://127.0.0.1:")
        assert CANARY not in text
    metrics = http.client.HTTPConnection("127.0.0.1", cluster["b"]["status"], timeout=5)
    metrics.request("GET", "/metrics")
    assert 'openaigw_state_unavailable_total{action="allowed",limit="limit-count"} 5.0' in (
        metrics.getresponse().read().decode())
    metrics.close()
    redis.start()  # empty: counts start again, scripts must be loaded again
    for gateway in (cluster["a"], cluster["b"]):  # both reconnected (back-off up to 2 s)
        wait_for(lambda: ready(gateway), timeout=10)
    wait_for(lambda: chat(cluster["a"], key)[0] == 200, timeout=10)
    statuses = [chat(cluster["ab"[i % 2]], key)[0] for i in range(4)]
    assert statuses[-1] == 429 and statuses.count(200) <= 2
