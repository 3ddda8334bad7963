"""The Admin API end to end: curl and the openai SDK -> twistd openaigw -> fake upstream."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest

from openaigw.testing import free_port, start_gateway, stop_process
from tests.test_integration_lifecycle import Stream

ADMIN_KEY = "admin-canary-7f3a9c1e5b2d4680"
CONSUMER_KEY = "sk-consumer-canary-4b1d8e2f6a9c"
REAL_KEY = "sk-real-upstream-canary-0451"
MESSAGES = [{"role": "user", "content": "hello there"}]
# The guide's curl, as the issue quotes it (only the port is the test's).
GUIDE_CURL = """curl "http://127.0.0.1:9180/apisix/admin/routes" -X PUT -d '{
  "id": "openai-chat",
  "uri": "/v1/chat/completions",
  "plugins": {"proxy-rewrite": {"headers": {"set": {"Authorization": "Bearer '"$OPENAI_API_KEY"'"}}}},
  "upstream": {"scheme": "https", "nodes": {"api.openai.com:443": 1}, "type": "roundrobin"}
}'"""


class Gateway:
    """A twistd openaigw with an Admin API listener, in its own directory."""

    def __init__(self, directory, keyed: bool) -> None:
        self.directory = directory
        self.port, self.admin_port, self.status_port = free_port(), free_port(), free_port()
        self.state = directory / "admin.json"
        key = "admin_key = $ENV://ADMIN_KEY\n" if keyed else ""
        self.config = f"""
[gateway]
listen = tcp:port={self.port}:interface=127.0.0.1
admin = tcp:port={self.admin_port}:interface=127.0.0.1
status = tcp:port={self.status_port}:interface=127.0.0.1
{key}admin_state = {self.state}
shutdown_timeout = 3
"""
        self.env = {**os.environ, "ADMIN_KEY": ADMIN_KEY, "OPENAI_API_KEY": REAL_KEY}
        self.proc = None

    def start(self) -> "Gateway":
        self.proc = start_gateway(self.directory, self.config, self.admin_port, env=self.env)
        return self

    def stop(self) -> int:
        stop_process(self.proc)
        return self.proc.returncode

    def log(self) -> str:
        return (self.directory / "gateway.log").read_text()

    def curl(self, command: str) -> tuple:
        command = command.replace("9180", str(self.admin_port))
        done = subprocess.run(["bash", "-c", command + ' -s -w "\\n%{http_code}"'], env=self.env,
                              capture_output=True, check=True, timeout=30)
        body, _, code = done.stdout.decode().rpartition("\n")
        return int(code), json.loads(body)

    def admin(self, method: str, path: str, body=None, key: str = ADMIN_KEY) -> tuple:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}/apisix/admin/{path}",
                                         data=data, method=method, headers={"X-API-KEY": key})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def sdk(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0)


def to_fake(pki, fake_node: int) -> dict:
    """The PATCH that points the guide's route at the fake upstream."""
    return {"upstream": {"nodes": {"api.openai.com:443": None, f"127.0.0.1:{fake_node}": 1}, "ca_file": pki.ca}}


def fake_requests(pki, port: int) -> list:
    context = ssl.create_default_context(cafile=pki.ca)
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/_fake/requests", context=context) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    gateway = Gateway(tmp_path_factory.mktemp("admin-keyed"), keyed=True).start()
    yield gateway
    gateway.stop()
    for secret in (ADMIN_KEY, CONSUMER_KEY, REAL_KEY):
        assert secret not in gateway.log()
    assert CONSUMER_KEY not in gateway.state.read_text() and ADMIN_KEY not in gateway.state.read_text()


def test_guide_curl_then_sdk_chat(pki, fake_node, tmp_path):
    """Without admin_key (loopback only): the guide's curl verbatim creates the route
    (201), and after pointing it at the fake upstream the SDK chats through it."""
    gateway = Gateway(tmp_path, keyed=False).start()
    try:
        code, body = gateway.curl(GUIDE_CURL)
        assert code == 201, body
        assert body["key"] == "/apisix/routes/openai-chat"
        assert body["value"]["plugins"]["proxy-rewrite"]["headers"]["set"]["Authorization"] == f"Bearer {REAL_KEY}"
        assert gateway.admin("PATCH", "routes/openai-chat", to_fake(pki, fake_node))[0] == 200
        answer = gateway.sdk().chat.completions.create(model="m", messages=MESSAGES)
        assert answer.choices[0].message.content
        headers = {k.lower(): v for k, v in fake_requests(pki, fake_node)[-1]["headers"]}
        assert headers["authorization"] == f"Bearer {REAL_KEY}"
        assert "no admin_key: it serves loopback clients only" in gateway.log()
    finally:
        gateway.stop()


def test_guide_curl_with_and_without_key(keyed):
    """With admin_key: the curl without X-API-KEY is 401, with it 201."""
    assert keyed.curl(GUIDE_CURL) == (401, {"error_msg": "failed to check token"})
    code, body = keyed.curl(GUIDE_CURL + ' -H "X-API-KEY: $ADMIN_KEY"')
    assert code == 201 and body["value"]["id"] == "openai-chat"
    code, body = keyed.curl(GUIDE_CURL + ' -H "X-API-KEY: $ADMIN_KEY"')
    assert code == 200  # replaced


def test_status_codes_and_shapes(keyed):
    """201/200/400/404/401 over HTTP, with APISIX's bodies."""
    code, body = keyed.admin("PUT", "upstreams/up1", {"nodes": [{"host": "127.0.0.1", "port": 9, "weight": 1}]})
    assert code == 201 and set(body) == {"key", "value", "source"} and body["key"] == "/apisix/upstreams/up1"
    assert {"create_time", "update_time"} <= set(body["value"])
    assert keyed.admin("PUT", "upstreams/up1", {"nodes": {"127.0.0.1:9": 1}})[0] == 200
    code, body = keyed.admin("PUT", "routes/r9", {"id": "r8", "uri": "/x", "upstream_id": "up1"})
    assert (code, body) == (400, {"error_msg": "wrong route id"})
    code, body = keyed.admin("PUT", "routes/r9", {"uri": "/x", "upstream_id": "up1", "plugins": {"nope": {}}})
    assert code == 400 and body["error_msg"].startswith("unknown plugin [nope]")
    assert keyed.admin("GET", "routes/r9") == (404, {"message": "Key not found"})
    code, body = keyed.admin("GET", "upstreams")
    assert code == 200 and body["total"] == len(body["list"]) >= 1
    assert keyed.admin("GET", "upstreams", key="wrong-key") == (401, {"error_msg": "failed to check token"})
    assert keyed.admin("DELETE", "upstreams/up1") == (200, {"deleted": "up1", "key": "/apisix/upstreams/up1"})
    with urllib.request.urlopen(f"http://127.0.0.1:{keyed.status_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 'openaigw_admin_requests_total{method="PUT",resource="upstreams",status="201"} 1.0' in metrics
    assert 'openaigw_admin_requests_total{method="GET",resource="upstreams",status="401"} 1.0' in metrics


def test_consumer_calls_with_its_key_and_hits_its_limit(keyed, pki, fake_node):
    """A consumer created through the API calls with its key and gets 429 past its limit;
    its key is never answered."""
    code, body = keyed.admin("PUT", "consumers", {
        "username": "team-a",
        "plugins": {"key-auth": {"key": CONSUMER_KEY}, "limit-count": {"count": 2, "time_window": 600}}})
    assert code == 201 and CONSUMER_KEY not in json.dumps(body)
    code, body = keyed.admin("PUT", "routes/models", {
        "uri": "/v1/chat/*", "methods": ["POST"],
        "plugins": {"key-auth": {}, "proxy-rewrite": {"uri": "/v1/chat/completions", "headers": {"set": {"Authorization": "Bearer $ENV://OPENAI_API_KEY"}}}},
        "upstream": {"nodes": {f"127.0.0.1:{fake_node}": 1}, "ca_file": pki.ca}})
    assert code == 201, body
    assert body["value"]["plugins"]["proxy-rewrite"]["headers"]["set"]["Authorization"] == "Bearer $ENV://OPENAI_API_KEY"
    client = keyed.sdk(CONSUMER_KEY)
    path = "/chat/other"
    for _ in range(2):
        assert client.post(path, cast_to=object, body={"model": "m", "messages": MESSAGES}) is not None
    with pytest.raises(openai.RateLimitError):
        client.post(path, cast_to=object, body={"model": "m", "messages": MESSAGES})
    with pytest.raises(openai.AuthenticationError):
        keyed.sdk("sk-not-a-consumer-key-000").post(path, cast_to=object, body={"model": "m"})
    for path in ("consumers", "consumers/team-a"):
        assert CONSUMER_KEY not in json.dumps(keyed.admin("GET", path)[1])
    assert ADMIN_KEY not in json.dumps(keyed.admin("GET", "routes")[1])


def test_stream_survives_put_and_delete_restart_keeps_objects(pki, fake_node, tmp_path):
    """A stream in flight finishes on its route after a PUT and a DELETE of it; new
    requests see the change; after a restart the objects are still there."""
    gateway = Gateway(tmp_path, keyed=True).start()
    try:
        route = {"uri": "/v1/chat/completions", "upstream": to_fake(pki, fake_node)["upstream"]}
        route["upstream"]["nodes"] = {f"127.0.0.1:{fake_node}": 1}
        assert gateway.admin("PUT", "routes/chat", route)[0] == 201
        stream = Stream(gateway.port, chunks=20, interval_ms=100)
        assert stream.started_reading.wait(10)
        assert gateway.admin("PUT", "routes/chat", {**route, "methods": ["GET"]})[0] == 200
        assert gateway.admin("DELETE", "routes/chat")[0] == 200
        stream.join(20)
        assert stream.error is None and len(stream.events) == 21  # 20 chunks and [DONE]
        with pytest.raises(openai.NotFoundError):
            gateway.sdk().chat.completions.create(model="m", messages=MESSAGES)
        assert gateway.admin("PUT", "routes/chat", route)[0] == 201
        assert gateway.stop() == 0
        gateway.start()
        code, body = gateway.admin("GET", "routes/chat")
        assert code == 200 and body["value"]["uri"] == "/v1/chat/completions"
        assert gateway.sdk().chat.completions.create(model="m", messages=MESSAGES).choices
        gateway.proc.send_signal(signal.SIGHUP)  # gw.ini reloaded: the API's route stays
        deadline = time.monotonic() + 10
        while "configuration reloaded" not in gateway.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "configuration reloaded from" in gateway.log()
        assert gateway.sdk().chat.completions.create(model="m", messages=MESSAGES).choices
        log = gateway.log()
        assert "Admin API: 127.0.0.1 created route chat" in log
        assert "Admin API: 127.0.0.1 deleted route chat" in log
    finally:
        gateway.stop()


def test_corrupt_state_stops_start_up(tmp_path):
    """A corrupt admin_state stops start-up (exit 78) with a clear message; the file is kept."""
    gateway = Gateway(tmp_path, keyed=False)
    gateway.state.write_text('{"version": 1, "routes": {')
    with pytest.raises(RuntimeError) as caught:
        gateway.start()
    message = str(caught.value)
    assert "gateway exited with 78" in message
    assert f"{gateway.state}: the Admin API state is corrupt (not JSON" in message
    assert gateway.state.read_text() == '{"version": 1, "routes": {'


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def answers(gateway: Gateway) -> bool:
    try:
        return bool(gateway.sdk().chat.completions.create(model="m", messages=MESSAGES).choices)
    except openai.NotFoundError:
        return False


def test_shared_through_redis(pki, fake_node, tmp_path):
    """With state = redis://: a change made on one gateway is served by another within
    a second; during a Redis outage both keep serving (and a restarted one serves its
    last good copy) while changes are refused with 503."""
    import shutil

    from openaigw.testing import RedisServer

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis", "redis-canary-pw-31").start()
    gateways = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            gateway = Gateway(tmp_path / name, keyed=True)
            gateway.config += f"state = {redis.url}\n"
            gateways.append(gateway.start())
        a, b = gateways
        route = {"uri": "/v1/chat/completions",
                 "upstream": {"nodes": {f"127.0.0.1:{fake_node}": 1}, "ca_file": pki.ca}}
        wait_for(lambda: "this gateway's objects are now the shared ones" in a.log() + b.log())
        wait_for(lambda: a.admin("PUT", "routes/chat", route)[0] == 201)
        started = time.monotonic()
        wait_for(lambda: answers(b))
        assert time.monotonic() - started < 3  # twice a second, on a loaded machine
        assert b.admin("GET", "routes/chat")[0] == 200
        assert b.admin("DELETE", "routes/chat")[0] == 200
        wait_for(lambda: not answers(a))
        assert b.admin("PUT", "routes/chat", route)[0] == 201
        wait_for(lambda: answers(a))
        redis.stop()
        assert answers(a) and answers(b)
        code, body = a.admin("PUT", "routes/other", {**route, "uri": "/v1/other"})
        assert code == 503 and "nothing changed" in body["error_msg"]
        b.stop()
        b.start()  # Redis still down: the last good copy
        assert answers(b)
        for gateway in gateways:
            assert "redis-canary-pw-31" not in gateway.log()
    finally:
        for gateway in gateways:
            gateway.stop()
        redis.stop()
