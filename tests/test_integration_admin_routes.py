"""Route matching and limits set through the Admin API, seen by clients of a real twistd."""

from __future__ import annotations

import http.client
import json

import pytest

pytest.importorskip("openai")  # through tests.test_integration_admin; the package build has no SDK

from tests.test_integration_admin import ADMIN_KEY, Gateway, fake_requests


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gateway = Gateway(tmp_path_factory.mktemp("admin-routes"), keyed=True).start()
    yield gateway
    gateway.stop()
    assert ADMIN_KEY not in gateway.log()


def upstream(pki, fake_node: int) -> dict:
    return {"nodes": {f"127.0.0.1:{fake_node}": 1}, "ca_file": pki.ca}


def marked(name: str) -> dict:
    """A proxy-rewrite that tells the fake upstream which route sent the request."""
    return {"proxy-rewrite": {"uri": "/v1/models", "headers": {"set": {"X-Route": name}}}}


def call(gateway: Gateway, path: str, host: str) -> tuple:
    """GET ``path`` with ``Host: host``: (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def served_by(gateway: Gateway, pki, fake_node: int, path: str, host: str):
    status, _, _ = call(gateway, path, host)
    if status != 200:
        return status
    headers = {k.lower(): v for k, v in fake_requests(pki, fake_node)[-1]["headers"]}
    return headers["x-route"]


def test_hosts_and_priority_decide_the_route(gateway, pki, fake_node):
    """Two routes for one prefix: the one with hosts serves its hosts (any port, any case),
    the other the rest; raising the other's priority through PATCH hands it every host."""
    for id, extra in (("team", {"hosts": ["api.example.com", "*.team.example.com"]}), ("any", {})):
        code, body = gateway.admin("PUT", f"routes/{id}", {
            "uri": "/hp/*", "upstream": upstream(pki, fake_node), "plugins": marked(id), **extra})
        assert code == 201, body
    assert served_by(gateway, pki, fake_node, "/hp/x", "API.example.com:8443") == "team"
    assert served_by(gateway, pki, fake_node, "/hp/x", "a.team.example.com") == "team"
    assert served_by(gateway, pki, fake_node, "/hp/x", "example.com") == "any"
    assert gateway.admin("PATCH", "routes/any", {"priority": 10})[0] == 200
    assert served_by(gateway, pki, fake_node, "/hp/x", "api.example.com") == "any"
    assert gateway.admin("DELETE", "routes/any")[0] == 200
    assert served_by(gateway, pki, fake_node, "/hp/x", "example.com") == 404


def test_limit_count_rejected_code(gateway, pki, fake_node):
    """limit-count's rejected_code and rejected_msg through the Admin API: the client gets
    that status with an OpenAI-shaped body and Retry-After."""
    code, body = gateway.admin("PUT", "routes/rc", {
        "uri": "/rc/*", "upstream": upstream(pki, fake_node),
        "plugins": {**marked("rc"), "limit-count": {"count": 1, "time_window": 600, "key_type": "constant",
                                                    "rejected_code": 503, "rejected_msg": "quota used up"}}})
    assert code == 201, body
    assert call(gateway, "/rc/x", "gw")[0] == 200
    status, headers, raw = call(gateway, "/rc/x", "gw")
    assert status == 503
    assert json.loads(raw)["error"] == {"message": "quota used up", "type": "requests", "param": None,
                                        "code": "rate_limit_exceeded"}
    assert 0 < int(headers["Retry-After"]) <= 600


def test_sub_path_patch(gateway, pki, fake_node):
    """PATCH routes/ID/plugins/limit-count replaces just that plugin's settings: the route
    serves again at once, its other plugins kept; PATCH routes/ID/hosts moves it to a host."""
    code, body = gateway.admin("PUT", "routes/sp", {
        "uri": "/sp/*", "upstream": upstream(pki, fake_node),
        "plugins": {**marked("sp"), "limit-count": {"count": 1, "time_window": 600, "key_type": "constant"}}})
    assert code == 201, body
    assert call(gateway, "/sp/x", "gw")[0] == 200
    assert call(gateway, "/sp/x", "gw")[0] == 429
    code, body = gateway.admin("PATCH", "routes/sp/plugins/limit-count",
                               {"count": 100, "time_window": 600, "key_type": "constant"})
    assert code == 200 and body["value"]["plugins"]["proxy-rewrite"] == marked("sp")["proxy-rewrite"]
    assert served_by(gateway, pki, fake_node, "/sp/x", "gw") == "sp"
    assert gateway.admin("PATCH", "routes/sp/hosts", ["sp.example.com"])[0] == 200
    assert served_by(gateway, pki, fake_node, "/sp/x", "gw") == 404
    assert served_by(gateway, pki, fake_node, "/sp/x", "sp.example.com") == "sp"
    assert gateway.admin("PATCH", "routes/sp/uri/x", "y") == (400, {"error_msg": "invalid sub-path: /uri is not an object"})
    assert gateway.admin("PATCH", "routes/nope/uri", "/x") == (404, {"message": "Key not found"})
    assert 'patched "/plugins/limit-count" of route sp' in gateway.log()
