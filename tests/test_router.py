"""Route matching in memory: URIs, hosts and priority, through a real Site."""

from __future__ import annotations

import pytest

from openaigw import config
from openaigw.config import ConfigError

from tests.memory import Gateway

UPSTREAMS = """
[gateway]
listen = tcp:port=0:interface=127.0.0.1

[upstream:a]
scheme = http
nodes = 10.0.0.1:80

[upstream:b]
scheme = http
nodes = 10.0.0.2:80
"""


def served_by(gw: Gateway, path: bytes, host: bytes = b"gw", method: bytes = b"GET") -> object:
    """The node the request went to, or the status line the gateway answered."""
    before = len(gw.connects())
    _, client = gw.client(b"%s %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (method, path, host))
    connects = gw.connects()
    if len(connects) > before:
        return connects[-1]
    return client.value().split(b"\r\n", 1)[0].decode()


def gateway(routes: str) -> Gateway:
    return Gateway(UPSTREAMS + routes)


def test_hosts_exact_and_wildcard_case_insensitive_without_port():
    gw = gateway(
        "[route:team]\nuri = /v1/*\nhosts = API.example.com, *.team.example.com\nupstream = a\n"
        "[route:any]\nuri = /v1/*\nupstream = b\n"
    )
    assert served_by(gw, b"/v1/models", b"api.example.com") == "10.0.0.1:80"
    assert served_by(gw, b"/v1/models", b"Api.Example.COM:9080") == "10.0.0.1:80"
    assert served_by(gw, b"/v1/models", b"x.y.team.example.com") == "10.0.0.1:80"
    assert served_by(gw, b"/v1/models", b"team.example.com") == "10.0.0.2:80"  # *. needs a label
    assert served_by(gw, b"/v1/models", b"api.example.com.evil") == "10.0.0.2:80"
    assert served_by(gw, b"/v1/models", b"[::1]:9080") == "10.0.0.2:80"


def test_a_route_with_hosts_only_serves_them():
    """Another host gets the 404 of an unknown route; a known host with another method, 405."""
    gw = gateway("[route:team]\nuri = /v1/models\nmethods = GET\nhosts = api.example.com\nupstream = a\n")
    assert served_by(gw, b"/v1/models", b"other.example.com") == "HTTP/1.1 404 Not Found"
    assert served_by(gw, b"/v1/models", b"api.example.com", b"POST") == "HTTP/1.1 405 Method Not Allowed"
    _, client = gw.client(b"GET /v1/models HTTP/1.0\r\n\r\n")  # no Host at all
    assert client.value().startswith(b"HTTP/1.0 404")


def test_same_uri_disjoint_hosts_are_not_ambiguous():
    gw = gateway(
        "[route:one]\nuri = /v1/chat/completions\nhosts = one.example.com\nupstream = a\n"
        "[route:two]\nuri = /v1/chat/completions\nhosts = two.example.com\nupstream = b\n"
    )
    assert served_by(gw, b"/v1/chat/completions", b"two.example.com", b"POST") == "10.0.0.2:80"
    assert served_by(gw, b"/v1/chat/completions", b"one.example.com", b"POST") == "10.0.0.1:80"


@pytest.mark.parametrize("routes, message", [
    ("[route:one]\nuri = /v1/x\nhosts = *.example.com\nupstream = a\n"
     "[route:two]\nuri = /v1/x\nhosts = a.example.com\nupstream = b\n",
     "[route:two] uri: '/v1/x' is already served by [route:one] for the same methods and hosts, at the same priority"),
    ("[route:one]\nuri = /v1/x\nhosts = *.example.com\nupstream = a\n"
     "[route:two]\nuri = /v1/x\nhosts = *.b.example.com\nupstream = b\n", "already served by [route:one]"),
    ("[route:one]\nuri = /v1/x\nupstream = a\n[route:two]\nuri = /v1/x\nupstream = b\n",
     "already served by [route:one]"),
    ("[route:one]\nuri = /v1/x\npriority = 2\nupstream = a\n"
     "[route:two]\nuri = /v1/x\npriority = 2\nupstream = b\n", "already served by [route:one]"),
    ("[route:one]\nuri = /v1/x\nhosts = api.example.com:443\nupstream = a\n", "[route:one] hosts: 'api.example.com:443'"),
    ("[route:one]\nuri = /v1/x\nhosts = *\nupstream = a\n", "[route:one] hosts: '*' is not a host name"),
    ("[route:one]\nuri = /v1/x\nhosts = a.*.com\nupstream = a\n", "[route:one] hosts: 'a.*.com'"),
    ("[route:one]\nuri = /v1/x\nhosts =\nupstream = a\n", "[route:one] hosts: is required"),
    ("[route:one]\nuri = /v1/x\npriority = high\nupstream = a\n", "[route:one] priority: 'high' is not a whole number"),
])
def test_ambiguous_or_bad_routes_are_refused(routes, message):
    with pytest.raises(ConfigError) as e:
        config.parse(UPSTREAMS + routes, "gw.ini", {})
    assert message in str(e.value)


def test_not_ambiguous_when_hosts_disjoint_or_priority_differs():
    """Disjoint hosts (example.com is not *.example.com), other priorities, hosts against none."""
    for routes in (
        "[route:one]\nuri = /v1/x\nhosts = *.example.com\nupstream = a\n"
        "[route:two]\nuri = /v1/x\nhosts = example.com\nupstream = b\n",
        "[route:one]\nuri = /v1/x\npriority = 1\nupstream = a\n[route:two]\nuri = /v1/x\nupstream = b\n",
        "[route:one]\nuri = /v1/x\nhosts = a.example.com\nupstream = a\n[route:two]\nuri = /v1/x\nupstream = b\n",
    ):
        config.parse(UPSTREAMS + routes, "gw.ini", {})


def test_priority_decides_among_routes_for_the_same_uri():
    """The higher priority serves first, whatever the order in the file (negative allowed)."""
    gw = gateway(
        "[route:low]\nuri = /v1/x\npriority = -1\nupstream = a\n"
        "[route:high]\nuri = /v1/x\npriority = 5\nupstream = b\n"
    )
    assert served_by(gw, b"/v1/x") == "10.0.0.2:80"
    parsed = config.parse(UPSTREAMS + "[route:r]\nuri = /v1/x\nupstream = a\n", "gw.ini", {})
    assert parsed.routes[0].priority == 0 and parsed.routes[0].hosts is None


def test_priority_against_hosts():
    """A catch-all route with a higher priority beats one with hosts; at equal priority the one
    with hosts comes first (it is the more specific)."""
    routes = (
        "[route:host]\nuri = /v1/*\nhosts = api.example.com\nupstream = a\n"
        "[route:any]\nuri = /v1/*\npriority = {priority}\nupstream = b\n"
    )
    gw = gateway(routes.format(priority=0))
    assert served_by(gw, b"/v1/models", b"api.example.com") == "10.0.0.1:80"
    assert served_by(gw, b"/v1/models", b"other.example.com") == "10.0.0.2:80"
    gw = gateway(routes.format(priority=10))
    assert served_by(gw, b"/v1/models", b"api.example.com") == "10.0.0.2:80"


def test_priority_does_not_cross_uris():
    """As in APISIX: exact before prefix, longer prefix before shorter, whatever the priority;
    priority orders the routes of one URI.  A more specific URI whose host does not match
    leaves the request to the next one."""
    gw = gateway(
        "[route:wide]\nuri = /v1/*\npriority = 100\nupstream = a\n"
        "[route:chat]\nuri = /v1/chat/*\nhosts = chat.example.com\nupstream = b\n"
        "[route:exact]\nuri = /v1/chat/completions\nhosts = exact.example.com\nupstream = b\n"
    )
    assert served_by(gw, b"/v1/chat/x", b"chat.example.com") == "10.0.0.2:80"
    assert served_by(gw, b"/v1/chat/completions", b"exact.example.com") == "10.0.0.2:80"
    assert served_by(gw, b"/v1/chat/completions", b"chat.example.com") == "10.0.0.2:80"
    assert served_by(gw, b"/v1/chat/completions", b"gw") == "10.0.0.1:80"
    assert served_by(gw, b"/v1/chat/x", b"gw") == "10.0.0.1:80"
