"""A bug in the gateway's own code is logged, and the client gets an answer like the
gateway's other errors (a JSON 500, ``server_error``), or a dropped connection once its
answer has begun: never Twisted's HTML "Processing Failed" page."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.testing import StringTransport

from openaigw.relay import RouteResource
from tests.memory import Gateway, post, response


def _bug(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a bug")


def _json_500(transport: StringTransport) -> None:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ")
    assert b"\r\ncontent-type: application/json" in head.lower()
    assert json.loads(body)["error"]["type"] == "server_error"
    assert not transport.disconnecting  # the connection stays open for the next request


def test_a_bug_before_routing(monkeypatch):
    gw = Gateway()
    monkeypatch.setattr(gw.site, "getResourceFor", _bug)
    _, transport = gw.client(post(b"/v1/chat/completions", b"{}"))
    _json_500(transport)
    assert [(r.status, r.error) for r in gw.records] == [(500, "server_error")]


def test_a_bug_in_a_route(monkeypatch):
    gw = Gateway()
    monkeypatch.setattr(RouteResource, "_relay", _bug)
    _, transport = gw.client(post(b"/v1/chat/completions", b"{}"))
    gw.upstream(0).send(response())
    _json_500(transport)
    assert [(r.status, r.route, r.error) for r in gw.records] == [(500, "chat", "server_error")]


def test_a_bug_once_the_answer_has_begun_drops_the_connection(monkeypatch):
    async def begins_then_fails(self: RouteResource, exchange: Any, *args: Any) -> None:
        exchange.request.setResponseCode(200)
        exchange.request.write(b'{"id":')
        raise RuntimeError("a bug")

    gw = Gateway()
    monkeypatch.setattr(RouteResource, "_relay", begins_then_fails)
    _, transport = gw.client(post(b"/v1/chat/completions", b"{}"))
    gw.upstream(0).send(response())
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert b"500" not in transport.value() and transport.disconnecting
