"""The Admin API in memory: treq's StubTreq against the admin Resource of a real
GatewayService on a MemoryReactorClock."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from openaigw import config
from openaigw.admin.catalog import Catalog
from openaigw.admin.resource import merge
from openaigw.admin.store import FileStore, MemoryStore, StateError, encode
from openaigw.interfaces import IObjectStore
from openaigw.plugins.limits import LimitKey
from openaigw.service import GatewayService

ADMIN_KEY = "admin-key-canary-0123456789"
CONSUMER_KEY = "sk-consumer-canary-0123456789"
GUIDE = {
    "id": "openai-chat",
    "uri": "/v1/chat/completions",
    "plugins": {"proxy-rewrite": {"headers": {"set": {"Authorization": "Bearer sk-real"}}}},
    "upstream": {"scheme": "https", "nodes": {"api.openai.com:443": 1}, "type": "roundrobin"},
}
BASE = """
[gateway]
admin = tcp:port=9180:interface=127.0.0.1
{extra}

[upstream:file-up]
nodes = 127.0.0.1:4443

[route:file-route]
uri = /v1/models
upstream = file-up
"""


class Admin:
    """A GatewayService with the Admin API, and a StubTreq talking to it."""

    def __init__(self, extra: str = "", store=None, environ=None) -> None:
        self.file = config.parse(BASE.format(extra=extra), "gw.ini", {})
        self.store = store or MemoryStore()
        self.catalog = Catalog(self.file, self.store, environ if environ is not None else {})
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_700_000_000)
        self.service = GatewayService(self.file, self.reactor, self.catalog)
        self.resource = self.service.admin_site.resource
        self.stub = StubTreq(self.resource)

    def call(self, method: str, path: str, body=None, headers=None, raw: bytes = None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        d = self.stub.request(method, "http://127.0.0.1:9180" + path, data=data, headers=headers)
        self.stub.flush()
        response = _result(d)
        content = _result(response.content())
        return response.code, json.loads(content)

    def routes(self):
        return sorted(route.name for route in self.service.config.routes)


def _result(d):
    out = []
    d.addBoth(out.append)
    assert out, "did not fire"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def admin():
    return Admin()


def test_guide_put_with_id_in_body(admin):
    """The guide's PUT /apisix/admin/routes with "id" in the body: 201, APISIX's shape, served."""
    code, body = admin.call("PUT", "/apisix/admin/routes", GUIDE)
    assert code == 201
    assert body["key"] == "/apisix/routes/openai-chat"
    value = body["value"]
    assert value["id"] == "openai-chat" and value["uri"] == "/v1/chat/completions"
    assert value["create_time"] == value["update_time"] == 1_700_000_000
    assert admin.routes() == ["file-route", "openai-chat"]
    route = [r for r in admin.service.config.routes if r.name == "openai-chat"][0]
    assert route.upstream == "route:openai-chat"
    upstream = admin.service.config.upstreams["route:openai-chat"]
    assert upstream.scheme == "https" and upstream.nodes[0].address == "api.openai.com:443"
    (rewrite,) = route.plugins
    assert rewrite.settings.set == ((b"Authorization", b"Bearer sk-real"),)


def test_put_again_replaces_and_keeps_create_time(admin):
    """A second PUT is 200; create_time stays, update_time moves."""
    admin.call("PUT", "/apisix/admin/routes/r1", {**GUIDE, "id": "r1"})
    admin.reactor.advance(5)
    code, body = admin.call("PUT", "/apisix/admin/routes/r1", {"uri": "/v1/embeddings", "upstream_id": "file-up"})
    assert code == 200
    assert body["value"]["create_time"] == 1_700_000_000
    assert body["value"]["update_time"] == 1_700_000_005
    assert body["value"]["upstream_id"] == "file-up"
    assert [r.uris for r in admin.service.config.routes if r.name == "r1"] == [("/v1/embeddings",)]


def test_served_table_is_swapped(admin):
    """A change swaps the Site's route table, as a reload does."""
    before = admin.service.site.resource
    admin.call("PUT", "/apisix/admin/routes", GUIDE)
    assert admin.service.site.resource is not before


@pytest.mark.parametrize("path, body, status, message", [
    ("/apisix/admin/routes/other", GUIDE, 400, "wrong route id"),
    ("/apisix/admin/routes", {k: v for k, v in GUIDE.items() if k != "id"}, 400, "missing route id"),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "plugins": {"ai-proxy": {}}}, 400, "unknown plugin [ai-proxy]"),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "methods": "POST"}, 400,
     'property "methods" validation failed: wrong type: expected array, got string'),
    ("/apisix/admin/routes/a", {"id": "a", "uri": "/x"}, 400, "missing upstream"),
    ("/apisix/admin/routes/a", {"uri": "/x", "upstream_id": "nope"}, 400, "upstream id [nope]"),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "uris": ["/y"]}, 400, 'give "uri" or "uris", not both'),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "hosts": "x.com"}, 400,
     'property "hosts" validation failed: wrong type: expected array, got string'),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "hosts": ["a.com", "x:80"]}, 400,
     "property \"hosts\" validation failed: 'x:80' is not a host name"),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "hosts": ["a.com", "b c"]}, 400, 'property "hosts[1]"'),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "hosts": []}, 400, 'property "hosts" validation failed'),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "host": "a.com", "hosts": ["b.com"]}, 400,
     'give "host" or "hosts", not both'),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "priority": 1.5}, 400,
     'property "priority" validation failed: wrong type: expected integer'),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "plugins": {"limit-count": {"count": "ten", "time_window": 60}}},
     400, 'property "plugins.limit-count.count" validation failed: wrong type: expected integer'),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "plugins": {"limit-count": {"count": 0, "time_window": 60}}},
     400, 'property "plugins.limit-count.count" validation failed'),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "plugins": {"limit-count": {"count": 1, "time_window": 60,
                                                                               "rejected_code": 600}}},
     400, 'property "plugins.limit-count.rejected_code" validation failed: \'600\': expected 200 to 599'),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "plugins": {"limit-req": {"rate": 1, "rejected_msg": 5}}},
     400, 'property "plugins.limit-req.rejected_msg" validation failed: wrong type: expected string'),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "plugins": {"ai-rate-limiting": {
        "limit": 1, "time_window": 60, "rejected_code": 503}}},
     400, 'property "plugins.ai-rate-limiting.rejected_code" validation failed'),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "plugins": {"proxy-rewrite": {"regex_uri": ["a", "b"]}}},
     400, 'property "plugins.proxy-rewrite.regex_uri" is not supported'),
    ("/apisix/admin/routes/a", {**GUIDE, "id": "a", "uri": "relative"}, 400, 'property "uri" validation failed'),
    ("/apisix/admin/routes/a", {"uri": "/x", "upstream": {"nodes": {"h:99999": 1}}}, 400,
     'property "upstream.nodes" validation failed'),
    ("/apisix/admin/routes/a", {"uri": "/x", "upstream": {"nodes": {"h:1": 1}, "type": "chash"}}, 400,
     'property "upstream.type" validation failed'),
    ("/apisix/admin/routes/a", {"uri": "/x", "upstream": {"nodes": {"h:1": 1}, "retry_timeout": 3}}, 400,
     'property "upstream.retry_timeout" is not supported'),
    ("/apisix/admin/routes/a", {"uri": "/v1/models", "upstream_id": "file-up"}, 400,
     "'/v1/models' is already served by [route:file-route]"),
    ("/apisix/admin/routes/a", {"uri": "/x", "upstream_id": "file-up", "status": 2}, 400, 'property "status"'),
    ("/apisix/admin/routes/a b", {"uri": "/x", "upstream_id": "file-up"}, 400, 'property "id" validation failed'),
    ("/apisix/admin/routes/file-route", {"uri": "/x", "upstream_id": "file-up"}, 400,
     "route [file-route] is defined in gw.ini: it cannot be changed"),
    ("/apisix/admin/upstreams/file-up", {"nodes": {"h:1": 1}}, 400, "upstream [file-up] is defined in gw.ini"),
    ("/apisix/admin/upstreams/u", {"nodes": [{"host": "h", "port": 1}]}, 400, 'property "nodes[0].weight"'),
    ("/apisix/admin/upstreams/u", {"nodes": {"h:1": 1}, "timeout": {"connect": 0}}, 400,
     'property "timeout.connect" validation failed: must be above 0'),
    ("/apisix/admin/consumers", {"plugins": {"key-auth": {"key": CONSUMER_KEY}}}, 400, "missing consumer username"),
    ("/apisix/admin/consumers", {"username": "c", "plugins": {"key-auth": {"key": "short"}}}, 400,
     'property "plugins.key-auth.key" validation failed: a key needs at least 16 characters'),
    ("/apisix/admin/consumers", {"username": "c"}, 400, 'property "plugins.key-auth.key" validation failed'),
    ("/apisix/admin/consumers", {"username": "c", "plugins": {"key-auth": {"key": CONSUMER_KEY},
                                                              "proxy-rewrite": {}}}, 400,
     "plugin [proxy-rewrite] cannot be configured on a consumer"),
])
def test_validation_errors(admin, path, body, status, message):
    """Bad objects get 400 {"error_msg"} naming the field, and nothing changes."""
    before = admin.service.config
    code, answer = admin.call("PUT", path, body)
    assert (code, list(answer)) == (status, ["error_msg"])
    assert message in answer["error_msg"]
    assert admin.service.config is before


def test_not_json_and_not_an_object(admin):
    """A body that is not a JSON object is a 400."""
    assert admin.call("PUT", "/apisix/admin/routes/a", raw=b"{nope")[0] == 400
    assert admin.call("PUT", "/apisix/admin/routes/a", [1, 2])[1] == {"error_msg": "invalid request body: expected a JSON object"}


@pytest.mark.parametrize("raw", [
    b'{"uri": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # nested past Python's recursion limit
    b'{"uri": "/v1/x", "upstream": {"nodes": {"h:443": 1}}, "name": "\\ud800"}',  # a lone surrogate
    b'{"uri": "/v1/\\udfff", "upstream": {"nodes": {"h:443": 1}}}',
    b'{"uri": "/v1/x", "upstream": {"nodes": {"\\ud800:443": 1}}}',
], ids=["deep", "surrogate-name", "surrogate-uri", "surrogate-node"])
def test_body_json_cannot_be_used_is_a_400(admin, raw):
    """JSON that Python parses but cannot use (too deep, lone UTF-16 surrogates) is a 400, not a 500."""
    code, answer = admin.call("PUT", "/apisix/admin/routes/a", raw=raw)
    assert (code, list(answer)) == (400, ["error_msg"])
    assert answer["error_msg"].startswith("invalid request body")
    assert admin.routes() == ["file-route"]


def test_unresolvable_secret_is_refused_resolvable_is_kept_as_written():
    """A $ENV:// reference that cannot be resolved is a 400 naming it; one that can is
    stored as written and applied resolved."""
    admin = Admin(environ={"OPENAI_API_KEY": "sk-resolved"})
    route = {**GUIDE, "plugins": {"proxy-rewrite": {"headers": {"set": {"Authorization": "Bearer $ENV://NOPE"}}}}}
    code, body = admin.call("PUT", "/apisix/admin/routes", route)
    assert code == 400 and "$ENV://NOPE: environment variable NOPE is not set" in body["error_msg"]
    route["plugins"]["proxy-rewrite"]["headers"]["set"]["Authorization"] = "Bearer $ENV://OPENAI_API_KEY"
    code, body = admin.call("PUT", "/apisix/admin/routes", route)
    assert code == 201
    assert body["value"]["plugins"]["proxy-rewrite"]["headers"]["set"]["Authorization"] == "Bearer $ENV://OPENAI_API_KEY"
    assert "sk-resolved" not in json.dumps(admin.store.load())
    (rewrite,) = [r for r in admin.service.config.routes if r.name == "openai-chat"][0].plugins
    assert rewrite.settings.set == ((b"Authorization", b"Bearer sk-resolved"),)


def test_get_one_list_and_404(admin):
    """GET answers {"key","value"}, the list {"total","list"} with gw.ini's objects
    marked; an unknown id is 404 {"message": "Key not found"}."""
    admin.call("PUT", "/apisix/admin/routes", GUIDE)
    code, body = admin.call("GET", "/apisix/admin/routes/openai-chat")
    assert code == 200 and body["key"] == "/apisix/routes/openai-chat" and body["source"] == "api"
    assert body["value"]["uri"] == GUIDE["uri"]
    code, body = admin.call("GET", "/apisix/admin/routes")
    assert code == 200 and body["total"] == 2
    assert [(i["key"], i["source"]) for i in body["list"]] == [
        ("/apisix/routes/file-route", "file"), ("/apisix/routes/openai-chat", "api")]
    assert body["list"][0]["value"] == {"id": "file-route", "uris": ["/v1/models"], "upstream_id": "file-up",
                                        "plugins": {}}
    assert admin.call("GET", "/apisix/admin/routes/nope") == (404, {"message": "Key not found"})
    assert admin.call("GET", "/apisix/admin/upstreams")[1]["list"][0]["value"]["nodes"] == [
        {"host": "127.0.0.1", "port": 4443, "weight": 1}]
    assert admin.call("GET", "/apisix/admin/secrets")[0] == 404


def test_post_generates_an_id(admin):
    """POST creates with a generated id: 201."""
    code, body = admin.call("POST", "/apisix/admin/upstreams", {"nodes": {"127.0.0.1:1": 1}})
    assert code == 201
    id = body["value"]["id"]
    assert body["key"] == f"/apisix/upstreams/{id}"
    assert admin.call("GET", f"/apisix/admin/upstreams/{id}")[0] == 200
    assert admin.call("POST", "/apisix/admin/consumers", {"username": "x"})[0] == 405


def test_patch_merges_and_null_removes(admin):
    """PATCH merges into the object; null removes a field; an unknown id is 404."""
    admin.call("PUT", "/apisix/admin/routes", {**GUIDE, "methods": ["POST"], "desc": "chat"})
    code, body = admin.call("PATCH", "/apisix/admin/routes/openai-chat", {
        "desc": None, "upstream": {"nodes": {"api.openai.com:443": None, "127.0.0.1:8443": 2}}})
    assert code == 200
    value = body["value"]
    assert "desc" not in value and value["methods"] == ["POST"]
    assert value["upstream"]["nodes"] == {"127.0.0.1:8443": 2}
    assert admin.service.config.upstreams["route:openai-chat"].nodes[0].address == "127.0.0.1:8443"
    assert admin.call("PATCH", "/apisix/admin/routes/nope", {"desc": "x"}) == (404, {"message": "Key not found"})
    code, body = admin.call("PATCH", "/apisix/admin/routes/openai-chat", {"upstream": None})
    assert code == 400 and "missing upstream" in body["error_msg"]


def test_delete(admin):
    """DELETE answers {"deleted", "key"}; the route is no longer served; again: 404."""
    admin.call("PUT", "/apisix/admin/routes", GUIDE)
    assert admin.call("DELETE", "/apisix/admin/routes/openai-chat") == (
        200, {"deleted": "openai-chat", "key": "/apisix/routes/openai-chat"})
    assert admin.routes() == ["file-route"]
    assert admin.call("DELETE", "/apisix/admin/routes/openai-chat")[0] == 404
    assert admin.call("DELETE", "/apisix/admin/routes/file-route")[0] == 400


def test_upstream_in_use_cannot_be_deleted(admin):
    """Deleting an upstream a route uses is a 400 naming the route."""
    admin.call("PUT", "/apisix/admin/upstreams/u1", {"nodes": {"127.0.0.1:1": 1}})
    admin.call("PUT", "/apisix/admin/routes/r1", {"uri": "/x", "upstream_id": "u1"})
    code, body = admin.call("DELETE", "/apisix/admin/upstreams/u1")
    assert code == 400 and body["error_msg"] == "can not delete this upstream, route [r1] is still using it now"
    admin.call("DELETE", "/apisix/admin/routes/r1")
    assert admin.call("DELETE", "/apisix/admin/upstreams/u1")[0] == 200


def test_disabled_route_is_kept_not_served(admin):
    """status 0: the route is validated and kept, but not served."""
    code, _ = admin.call("PUT", "/apisix/admin/routes", {**GUIDE, "status": 0})
    assert code == 201
    assert admin.routes() == ["file-route"]
    admin.call("PATCH", "/apisix/admin/routes/openai-chat", {"status": 1})
    assert admin.routes() == ["file-route", "openai-chat"]


def test_plugin_fields_map_to_our_options(admin):
    """APISIX's limit fields become the plugins' own settings (key consumer_name, http_X,
    constant)."""
    admin.call("PUT", "/apisix/admin/consumers", {"username": "c1", "plugins": {"key-auth": {"key": CONSUMER_KEY}}})
    code, body = admin.call("PUT", "/apisix/admin/routes/r", {"uri": "/x", "upstream_id": "file-up", "plugins": {
        "key-auth": {},
        "limit-count": {"count": 5, "time_window": 60, "key": "consumer_name", "rejected_code": 429},
        "limit-req": {"rate": 1.5, "burst": 2, "nodelay": True, "key": "http_x_team"},
        "limit-conn": {"conn": 3, "burst": 0, "default_conn_delay": 0.1, "key_type": "constant"},
        "ai-rate-limiting": {"limit": 100, "time_window": 3600, "limit_strategy": "prompt_tokens"},
    }})
    assert code == 201, body
    plugins = {p.name: p.settings for p in [r for r in admin.service.config.routes if r.name == "r"][0].plugins}
    assert plugins["key-auth"] is True
    assert (plugins["limit-count"].count, plugins["limit-count"].key) == (5, LimitKey("consumer"))
    assert plugins["limit-req"].nodelay and plugins["limit-req"].key == LimitKey("header", b"x-team")
    assert plugins["limit-conn"].key == LimitKey("route")
    assert plugins["ai-rate-limiting"].strategy == "prompt_tokens"


def test_consumer_key_hashed_never_shown(admin):
    """A consumer's key is kept as its SHA-256 and never answered; a second consumer
    with the same key is refused; a PATCH without a key keeps it."""
    code, body = admin.call("PUT", "/apisix/admin/consumers", {
        "username": "team-a", "plugins": {"key-auth": {"key": CONSUMER_KEY}, "limit-count": {"count": 2, "time_window": 60}}})
    assert code == 201
    digest = hashlib.sha256(CONSUMER_KEY.encode()).hexdigest()
    assert body["key"] == "/apisix/consumers/team-a"
    assert body["value"]["plugins"]["key-auth"] == {}
    stored = admin.store.load()["consumers"]["team-a"]
    assert stored["plugins"]["key-auth"] == {"key_sha256": digest}
    for answer in (body, admin.call("GET", "/apisix/admin/consumers/team-a")[1],
                   admin.call("GET", "/apisix/admin/consumers")[1]):
        assert CONSUMER_KEY not in json.dumps(answer) and digest not in json.dumps(answer)
    code, body = admin.call("PUT", "/apisix/admin/consumers/team-b", {"plugins": {"key-auth": {"key": CONSUMER_KEY}}})
    assert code == 400 and "consumer [team-a] has the same key" in body["error_msg"]
    assert admin.call("PATCH", "/apisix/admin/consumers/team-a", {"desc": "A"})[0] == 200
    assert admin.store.load()["consumers"]["team-a"]["plugins"]["key-auth"] == {"key_sha256": digest}
    admin.call("PATCH", "/apisix/admin/consumers/team-a", {"plugins": {"key-auth": {"key": CONSUMER_KEY + "2"}}})
    new = hashlib.sha256((CONSUMER_KEY + "2").encode()).hexdigest()
    assert admin.store.load()["consumers"]["team-a"]["plugins"]["key-auth"] == {"key_sha256": new}
    (consumer,) = admin.service.config.consumers
    assert consumer.key_digest.hex() == new


def test_route_key_auth_needs_a_consumer_and_keeps_it(admin):
    """A key-auth route needs a consumer; the last consumer of such a route cannot go."""
    code, body = admin.call("PUT", "/apisix/admin/routes/r", {"uri": "/x", "upstream_id": "file-up",
                                                            "plugins": {"key-auth": {}}})
    assert code == 400 and 'property "plugins.key-auth"' in body["error_msg"]
    admin.call("PUT", "/apisix/admin/consumers/c", {"plugins": {"key-auth": {"key": CONSUMER_KEY}}})
    assert admin.call("PUT", "/apisix/admin/routes/r", {"uri": "/x", "upstream_id": "file-up",
                                                       "plugins": {"key-auth": {}}})[0] == 201
    code, body = admin.call("DELETE", "/apisix/admin/consumers/c")
    assert code == 400 and body["error_msg"].startswith("route [r]: ")


def test_admin_key_required_constant_time_header_or_query():
    """With admin_key: 401 {"error_msg": "failed to check token"} without it or with a
    wrong one; X-API-KEY or ?api_key= pass."""
    admin = Admin(f"admin_key = {ADMIN_KEY}")
    denied = (401, {"error_msg": "failed to check token"})
    assert admin.call("GET", "/apisix/admin/routes") == denied
    assert admin.call("GET", "/apisix/admin/routes", headers={"X-API-KEY": "wrong"}) == denied
    assert admin.call("PUT", "/apisix/admin/routes", GUIDE, headers={"X-API-KEY": "x" + ADMIN_KEY}) == denied
    assert admin.routes() == ["file-route"]
    assert admin.call("PUT", "/apisix/admin/routes", GUIDE, headers={"X-API-KEY": ADMIN_KEY})[0] == 201
    assert admin.call("GET", f"/apisix/admin/routes?api_key={ADMIN_KEY}")[0] == 200


def test_without_admin_key_loopback_only(admin):
    """Without admin_key, a client that is not on loopback gets 403."""
    from twisted.internet.address import IPv4Address

    request = DummyRequest([b"apisix", b"admin", b"routes"])
    request.path = b"/apisix/admin/routes"
    request.uri = request.path
    request.client = IPv4Address("TCP", "10.0.0.8", 5555)
    body = admin.resource.render(request)
    assert request.responseCode == 403 and b"loopback" in body


def test_changes_counted(admin):
    """Every request is counted by resource, method and status."""
    admin.call("PUT", "/apisix/admin/routes", GUIDE)
    admin.call("PUT", "/apisix/admin/routes/x", GUIDE)
    stats = admin.resource.stats.counts
    assert stats[("routes", "PUT", "201")] == 1 and stats[("routes", "PUT", "400")] == 1
    (family,) = admin.resource.stats.collect()
    assert family.name == "openaigw_admin_requests"


def test_store_failure_changes_nothing(tmp_path):
    """A change that cannot be saved is a 503 and is not applied."""
    store = FileStore(str(tmp_path / "gone" / "admin.json"))
    admin = Admin(store=store)
    code, body = admin.call("PUT", "/apisix/admin/routes", GUIDE)
    assert code == 503 and "could not be saved" in body["error_msg"]
    assert admin.routes() == ["file-route"]
    assert admin.call("GET", "/apisix/admin/routes/openai-chat")[0] == 404


def test_refused_change_leaves_the_cache_store_as_it_was(tmp_path):
    """A change that cannot be saved does not resize (and so empty) the response cache's store."""
    directory = tmp_path / "state"
    directory.mkdir()
    admin = Admin(store=FileStore(str(directory / "admin.json")))
    cached = {"uri": "/v1/x", "upstream_id": "file-up", "plugins": {"cache": {"memory": "1M"}}}
    assert admin.call("PUT", "/apisix/admin/routes/c", cached)[0] == 201
    store = admin.service._runtime.responses.store
    assert store.max_bytes == 1 << 20
    store.set("k", b"v" * 1000, 60)
    state = directory / "admin.json"
    kept = state.read_bytes()
    state.unlink()
    (state / "in-the-way").mkdir(parents=True)  # the next save cannot rename onto it (even as root)
    code, body = admin.call("PATCH", "/apisix/admin/routes/c/plugins/cache/memory", "1K")
    assert code == 503, body
    assert store.max_bytes == 1 << 20 and len(store) == 1
    (state / "in-the-way").rmdir()
    state.rmdir()
    state.write_bytes(kept)
    assert admin.call("PATCH", "/apisix/admin/routes/c/plugins/cache/memory", "1K")[0] == 200
    assert store.max_bytes == 1 << 10 and len(store) == 0


def test_reload_keeps_api_objects_and_refuses_what_breaks_them(tmp_path):
    """A reload of gw.ini keeps the API's objects; one that removes an upstream an API
    route uses is refused."""
    admin = Admin()
    admin.call("PUT", "/apisix/admin/routes/r", {"uri": "/x", "upstream_id": "file-up"})
    path = tmp_path / "gw.ini"
    text = BASE.format(extra="") + "\n[route:more]\nuri = /v1/more\nupstream = file-up\n"
    assert _result(admin.catalog.reload(config.parse(text, str(path), {})))
    assert admin.routes() == ["file-route", "more", "r"]
    broken = text.replace("upstream = file-up", "upstream = other").replace("[upstream:file-up]", "[upstream:other]")
    assert not _result(admin.catalog.reload(config.parse(broken, str(path), {})))
    assert admin.routes() == ["file-route", "more", "r"]


def test_file_store_round_trip_and_atomic(tmp_path):
    """The file store writes JSON (mode 0600) that it reads back; no temporary file stays."""
    path = tmp_path / "admin.json"
    store = FileStore(str(path))
    verifyObject(IObjectStore, store)
    verifyObject(IObjectStore, MemoryStore())
    assert store.load() == {"routes": {}, "upstreams": {}, "consumers": {}}
    _result(store.put("routes", "a", {"id": "a"}))
    _result(store.put("upstreams", "u", {"id": "u"}))
    _result(store.delete("upstreams", "u"))
    assert json.loads(path.read_text())["routes"] == {"a": {"id": "a"}}
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["admin.json"]
    assert FileStore(str(path)).load()["routes"] == {"a": {"id": "a"}}


@pytest.mark.parametrize("content, why", [
    (b"{not json", "not JSON"),
    (b'{"version": 2}', '"version": 1'),
    (b'{"version": 1, "routes": []}', "'routes' is not an object of objects"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_corrupt_state_file_is_an_error(tmp_path, content, why):
    """A corrupt state file is a StateError (a ConfigError) saying why; it is left as is."""
    path = tmp_path / "admin.json"
    path.write_bytes(content)
    with pytest.raises(StateError) as caught:
        FileStore(str(path)).load()
    assert why in str(caught.value) and str(path) in str(caught.value)
    assert path.read_bytes() == content


def test_state_with_an_object_gw_ini_now_rejects(tmp_path):
    """Kept objects that do not fit gw.ini stop start-up with a message naming them."""
    path = tmp_path / "admin.json"
    path.write_bytes(encode({"routes": {"r": {"id": "r", "uri": "/x", "upstream_id": "gone"}},
                             "upstreams": {}, "consumers": {}}))
    file = config.parse(BASE.format(extra=""), "gw.ini", {})
    with pytest.raises(config.ConfigError) as caught:
        Catalog(file, FileStore(str(path)), {})
    assert f"{path}: route [r]: " in str(caught.value)


def test_config_keys():
    """admin_key and admin_state need an admin listener; the key is not in the repr."""
    with pytest.raises(config.ConfigError, match="admin_key: only applies with an admin listener"):
        config.parse("[gateway]\nadmin_key = 0123456789abcdef\n[upstream:u]\nnodes = h\n[route:r]\nuri = /\nupstream = u\n",
                     "gw.ini", {})
    file = config.parse(BASE.format(extra=f"admin_key = {ADMIN_KEY}"), "gw.ini", {})
    assert ADMIN_KEY not in repr(file)
    only_admin = config.parse("[gateway]\nadmin = tcp:port=9180:interface=127.0.0.1\n", "gw.ini", {})
    assert only_admin.routes == ()


def test_merge_patch():
    """RFC 7396: objects merge, null removes, arrays and scalars replace."""
    assert merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"b": None, "e": 3}, "d": [2]}) == {
        "a": {"c": 2, "e": 3}, "d": [2]}


def test_changes_keep_unchanged_upstreams(admin):
    """An Admin API change keeps the running upstreams it does not change (and their
    pooled connections); a changed one is made anew; a reload makes all anew."""
    admin.call("PUT", "/apisix/admin/upstreams/u1", {"nodes": {"127.0.0.1:1": 1}, "max_connections": 8})
    assert admin.service.config.upstreams["u1"].max_connections == 8
    before = dict(admin.service._upstreams)
    admin.call("PUT", "/apisix/admin/routes/r1", {"uri": "/x", "upstream_id": "u1"})
    after = admin.service._upstreams
    assert after["u1"] is before["u1"] and after["file-up"] is before["file-up"]
    admin.call("PATCH", "/apisix/admin/upstreams/u1", {"retries": 0, "max_connections": None})
    assert admin.service._upstreams["u1"] is not before["u1"]
    assert admin.service._upstreams["file-up"] is before["file-up"]
    _result(admin.catalog.reload(admin.file))
    assert admin.service._upstreams["file-up"] is not before["file-up"]


def test_resilience_fields(admin):
    """Upstream api_key, provider, Azure deployments and checks (APISIX's shape), and
    route fallback map to gw.ini's keys; a fallback upstream cannot be deleted."""
    code, body = admin.call("PUT", "/apisix/admin/upstreams/azure", {
        "nodes": {"example.openai.azure.com:443": 1}, "provider": "azure", "api_version": "2024-10-21",
        "api_key": "$ENV://AZURE_KEY", "deployments": {"gpt-4o": "prod-4o", "*": "default"},
        "checks": {"active": {"http_path": "/health", "timeout": 2, "healthy": {"interval": 5, "successes": 2},
                              "unhealthy": {"interval": 5, "http_failures": 4}},
                   "passive": {"unhealthy": {"http_failures": 2}, "cooldown": 10}, "max_cooldown": 90}})
    assert code == 400 and "$ENV://AZURE_KEY: environment variable AZURE_KEY is not set" in body["error_msg"]
    admin.catalog._environ = {"AZURE_KEY": "sk-azure"}
    code, body = admin.call("PUT", "/apisix/admin/upstreams/azure", {
        "nodes": {"example.openai.azure.com:443": 1}, "provider": "azure", "api_version": "2024-10-21",
        "api_key": "$ENV://AZURE_KEY", "deployments": {"gpt-4o": "prod-4o", "*": "default"},
        "checks": {"active": {"http_path": "/health", "timeout": 2, "healthy": {"interval": 5, "successes": 2},
                              "unhealthy": {"interval": 5, "http_failures": 4}},
                   "passive": {"unhealthy": {"http_failures": 2}, "cooldown": 10}, "max_cooldown": 90}})
    assert code == 201, body
    upstream = admin.service.config.upstreams["azure"]
    assert (upstream.provider, upstream.api_key, upstream.api_version) == ("azure", "sk-azure", "2024-10-21")
    assert upstream.deployments == (("gpt-4o", "prod-4o"), ("*", "default"))
    checks = upstream.checks
    assert (checks.active_path, checks.active_timeout, checks.active_interval) == ("/health", 2, 5)
    assert (checks.active_healthy, checks.active_unhealthy, checks.passive_failures) == (2, 4, 2)
    assert (checks.passive_cooldown, checks.max_cooldown) == (10, 90)
    code, body = admin.call("PUT", "/apisix/admin/upstreams/x", {
        "nodes": {"h:1": 1}, "checks": {"active": {"http_path": "/h", "healthy": {"interval": 5},
                                                   "unhealthy": {"interval": 6}}}})
    assert code == 400 and 'property "checks.active.unhealthy.interval"' in body["error_msg"]
    code, body = admin.call("PUT", "/apisix/admin/routes/r", {
        "uri": "/v1/chat/completions", "upstream_id": "file-up", "fallback": ["azure"], "fallback_on": ["429", "5xx"]})
    assert code == 201, body
    route = [r for r in admin.service.config.routes if r.name == "r"][0]
    assert route.fallback == ("azure",) and route.fallback_on == frozenset(("429", "5xx"))
    code, body = admin.call("DELETE", "/apisix/admin/upstreams/azure")
    assert code == 400 and "route [r] is still using it" in body["error_msg"]
    code, body = admin.call("PUT", "/apisix/admin/routes/r2", {"uri": "/y", "upstream_id": "file-up", "fallback": ["nope"]})
    assert code == 400 and 'property "fallback"' in body["error_msg"]
    assert "sk-azure" not in json.dumps(admin.call("GET", "/apisix/admin/upstreams")[1])


def test_hosts_and_priority_are_served(admin):
    """hosts (or APISIX's single host) and priority reach the route table; two routes for one
    URI are ambiguous only at the same priority with overlapping hosts."""
    code, body = admin.call("PUT", "/apisix/admin/routes/a", {"uri": "/v1/x", "upstream_id": "file-up",
                                                          "hosts": ["API.example.com", "*.example.org"]})
    assert code == 201 and body["value"]["hosts"] == ["API.example.com", "*.example.org"]  # as written
    code, body = admin.call("PUT", "/apisix/admin/routes/b", {"uri": "/v1/x", "upstream_id": "file-up",
                                                          "host": "b.example.com", "priority": 3})
    assert code == 201, body
    code, body = admin.call("PUT", "/apisix/admin/routes/c", {"uri": "/v1/x", "upstream_id": "file-up",
                                                          "hosts": ["x.example.org"]})
    assert code == 400 and "is already served by [route:a] for the same methods and hosts" in body["error_msg"]
    assert admin.call("PUT", "/apisix/admin/routes/c", {"uri": "/v1/x", "upstream_id": "file-up",
                                                        "hosts": ["x.example.org"], "priority": -1})[0] == 201
    served = {r.name: (r.hosts, r.priority) for r in admin.service.config.routes}
    assert served["a"] == (("api.example.com", "*.example.org"), 0)
    assert served["b"] == (("b.example.com",), 3)
    assert served["c"] == (("x.example.org",), -1)


def test_limit_rejected_code_and_msg(admin):
    """limit-count, limit-req and limit-conn take rejected_code (200-599) and rejected_msg."""
    code, body = admin.call("PUT", "/apisix/admin/routes/a", {"uri": "/v1/x", "upstream_id": "file-up", "plugins": {
        "limit-count": {"count": 1, "time_window": 60, "rejected_code": 503, "rejected_msg": "slow down"},
        "limit-req": {"rate": 1, "rejected_code": 200},
        "limit-conn": {"conn": 1, "rejected_code": 429}}})
    assert code == 201, body
    route = next(r for r in admin.service.config.routes if r.name == "a")
    rejections = {p.name: p.settings.rejection for p in route.plugins}
    assert (rejections["limit-count"].code, rejections["limit-count"].message) == (503, "slow down")
    assert (rejections["limit-req"].code, rejections["limit-conn"].code) == (200, 429)


def test_sub_path_patch_replaces_one_field(admin):
    """PATCH /routes/ID/PATH: the body (any JSON value) replaces that field whole (null
    removes it), validated as a full PATCH; objects on the way are made."""
    admin.call("PUT", "/apisix/admin/routes", {**GUIDE, "methods": ["POST"], "plugins": {
        "limit-count": {"count": 5, "time_window": 60}, **GUIDE["plugins"]}})
    path = "/apisix/admin/routes/openai-chat"
    code, body = admin.call("PATCH", path + "/plugins/limit-count", {"count": 2, "time_window": 10})
    assert code == 200 and set(body) == {"key", "value", "source"}
    assert body["value"]["plugins"]["limit-count"] == {"count": 2, "time_window": 10}
    assert "proxy-rewrite" in body["value"]["plugins"]
    route = next(r for r in admin.service.config.routes if r.name == "openai-chat")
    assert next(p for p in route.plugins if p.name == "limit-count").settings.count == 2
    assert admin.call("PATCH", path + "/uri", "/v1/embeddings")[1]["value"]["uri"] == "/v1/embeddings"
    assert admin.call("PATCH", path + "/methods", ["GET", "POST"])[1]["value"]["methods"] == ["GET", "POST"]
    code, body = admin.call("PATCH", path + "/upstream/nodes", {"127.0.0.1:8443": 1})
    assert code == 200 and body["value"]["upstream"]["nodes"] == {"127.0.0.1:8443": 1}
    assert admin.service.config.upstreams["route:openai-chat"].nodes[0].address == "127.0.0.1:8443"
    assert "methods" not in admin.call("PATCH", path + "/methods", raw=b"null")[1]["value"]
    code, body = admin.call("PATCH", path + "/labels/team", "a")  # labels made on the way
    assert code == 200 and body["value"]["labels"] == {"team": "a"}
    assert admin.call("PATCH", path + "/labels/x/y", raw=b"null")[1]["value"]["labels"] == {"team": "a"}
    code, body = admin.call("PATCH", path + "/plugins/proxy-rewrite/headers/set/Authorization", "Bearer sk-other")
    assert code == 200
    assert body["value"]["plugins"]["proxy-rewrite"]["headers"]["set"] == {"Authorization": "Bearer sk-other"}


@pytest.mark.parametrize("path, body, status, message", [
    ("/routes/openai-chat/uri/x", "a", 400, "invalid sub-path: /uri is not an object"),
    ("/routes/openai-chat/methods/0", "GET", 400, "invalid sub-path: /methods is not an object"),
    ("/routes/openai-chat/plugins//x", {}, 400, "invalid sub-path: /plugins//x (an empty name)"),
    ("/routes/openai-chat/methods", "POST", 400,
     'property "methods" validation failed: wrong type: expected array, got string'),
    ("/routes/openai-chat/plugins/limit-count", {"count": 0, "time_window": 1}, 400,
     'property "plugins.limit-count.count" validation failed'),
    ("/routes/openai-chat/plugins/nope", {}, 400, "unknown plugin [nope]"),
    ("/routes/openai-chat/id", "other", 400, "wrong route id"),
    ("/routes/openai-chat/upstream", b"null", 400, "missing upstream"),
    ("/routes/nope/uri", "/x", 404, "Key not found"),
    ("/routes/file-route/uri", "/x", 400, "route [file-route] is defined in gw.ini"),
    ("/upstreams/nope/nodes", {"h:1": 1}, 404, "Key not found"),
    ("/consumers/nope/plugins", {}, 404, "Key not found"),
])
def test_sub_path_patch_errors(admin, path, body, status, message):
    """Refused like a full PATCH (400 naming the field, 404 for a missing id); nothing changes."""
    admin.call("PUT", "/apisix/admin/routes", {**GUIDE, "methods": ["POST"]})
    before = (admin.service.config, admin.store.load())
    raw = body if isinstance(body, bytes) else None
    code, answer = admin.call("PATCH", "/apisix/admin" + path, body, raw=raw)
    assert code == status and message in str(answer)
    assert list(answer) == (["message"] if status == 404 else ["error_msg"])
    assert (admin.service.config, admin.store.load()) == before


def test_sub_path_patch_upstreams_and_consumers(admin):
    """Upstreams and consumers too; a consumer's new key at a sub-path replaces the old one."""
    assert admin.call("PUT", "/apisix/admin/upstreams/u", {"nodes": {"127.0.0.1:1": 1}})[0] == 201
    code, body = admin.call("PATCH", "/apisix/admin/upstreams/u/timeout/read", 5)
    assert code == 200 and body["value"]["timeout"] == {"read": 5}
    assert admin.service.config.upstreams["u"].timeout_read == 5
    admin.call("PUT", "/apisix/admin/consumers", {"username": "team-a", "plugins": {"key-auth": {"key": CONSUMER_KEY}}})
    new_key = "sk-consumer-new-key-0123456789"
    code, body = admin.call("PATCH", "/apisix/admin/consumers/team-a/plugins/key-auth/key", new_key)
    assert code == 200 and new_key not in json.dumps(body)
    stored = admin.store.load()["consumers"]["team-a"]["plugins"]["key-auth"]
    assert stored == {"key_sha256": hashlib.sha256(new_key.encode()).hexdigest()}
    code, body = admin.call("PATCH", "/apisix/admin/consumers/team-a/plugins/limit-count",
                            {"count": 3, "time_window": 60})
    assert code == 200 and body["value"]["plugins"]["limit-count"] == {"count": 3, "time_window": 60}
    assert admin.call("PATCH", "/apisix/admin/consumers/team-a/username", "other")[0] == 400
    for method in ("GET", "PUT", "DELETE"):
        assert admin.call(method, "/apisix/admin/upstreams/u/nodes", {})[0] == 404


def test_sub_path_in_the_change_log_is_quoted(admin):
    """A sub-path's names come from the URL (a label's name may hold a newline): the
    log line quotes it, so it cannot forge a line of its own."""
    from twisted.logger import formatEvent, globalLogPublisher

    admin.call("PUT", "/apisix/admin/routes", GUIDE)
    lines = []
    observe = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observe)
    try:
        code, _ = admin.call("PATCH", "/apisix/admin/routes/openai-chat/labels/a%0AAdmin%20API:%20forged", "v")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert code == 200
    (line,) = [line for line in lines if "Admin API" in line]
    assert "\n" not in line and '"/labels/a\\nAdmin API: forged"' in line
