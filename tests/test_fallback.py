"""Fallback across upstreams, in memory: what is resent, what is not, and the answer
when nothing is left."""

from __future__ import annotations

import json

from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.python.failure import Failure

from tests.memory import Gateway, post, response

CHAT = b"/v1/chat/completions"
BODY = b'{"model": "gpt-4o-mini", "messages": []}'
CONFIG = """
[upstream:primary]
scheme = http
nodes = 10.0.0.1:8080
checks.passive.cooldown = 30

[upstream:backup]
scheme = http
nodes = 10.0.1.1:8080
api_key = $ENV://BACKUP_KEY

[route:chat]
uri = /v1/chat/completions
upstream = primary
fallback = backup
proxy-rewrite.headers.set.Authorization = Bearer $ENV://KEY
"""
ENV = {"KEY": "sk-primary", "BACKUP_KEY": "sk-backup"}
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def gateway(config: str = CONFIG) -> Gateway:
    return Gateway(config, ENV)


def refuse(gw: Gateway, index: int) -> None:
    gw.reactor.tcpClients[index][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))


def body_of(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


def test_429_falls_back_with_each_upstreams_credential():
    """A 429 before the body sends the request to the fallback, with the fallback's
    own key (the route's Authorization for the primary only); the 429's connection
    is closed; the log says who answered and why the first attempt failed."""
    gw = gateway()
    _, client = gw.client(post(CHAT, BODY))
    primary = gw.upstream(0)
    assert b"Authorization: Bearer sk-primary" in primary.received()
    primary.send(response(b"429 Too Many Requests", b"retry-after: 5\r\n", b'{"error": {}}'))
    assert primary.transport.disconnecting
    assert gw.connects() == ["10.0.0.1:8080", "10.0.1.1:8080"]
    backup = gw.upstream(1)
    sent = backup.received()
    assert b"Authorization: Bearer sk-backup" in sent and b"sk-primary" not in sent
    assert sent.endswith(BODY)
    backup.send(response(body=b'{"ok": 1}'))
    assert client.value().startswith(b"HTTP/1.1 200") and client.value().endswith(b'{"ok": 1}')
    (record,) = gw.records
    assert (record.upstream, record.upstream_node, record.retries) == ("backup", "10.0.1.1:8080", 1)
    assert record.failed_attempts == "primary 10.0.0.1:8080 status_429"


def test_cooling_primary_is_skipped_until_its_retry_after():
    """After its 429 the primary is not tried for Retry-After seconds, then is again."""
    gw = gateway()
    gw.client(post(CHAT, BODY))
    gw.upstream(0).send(response(b"429 Too Many Requests", b"retry-after: 5\r\n"))
    gw.upstream(1).send(response())
    gw.reactor.advance(4)
    _, client = gw.client(post(CHAT, BODY))
    assert gw.connects()[-1] == "10.0.1.1:8080"
    gw.upstream(-1).send(response())
    assert gw.records[-1].failed_attempts == "primary - unavailable"
    gw.reactor.advance(1)
    gw.client(post(CHAT, BODY))
    assert gw.connects()[-1] == "10.0.0.1:8080"


def test_refused_connection_falls_back():
    """A request that never reached the primary goes to the fallback."""
    gw = gateway()
    _, client = gw.client(post(CHAT, BODY))
    refuse(gw, 0)
    gw.upstream(1).send(response())
    assert client.value().startswith(b"HTTP/1.1 200")
    assert gw.records[0].failed_attempts == "primary 10.0.0.1:8080 connect"


def test_request_lost_after_sending_is_not_resent():
    """A connection lost once the request was written may have been processed: no
    fallback (no double billing); the client gets a 502."""
    gw = gateway()
    _, client = gw.client(post(CHAT, BODY))
    gw.upstream(0).protocol.connectionLost(Failure(ConnectionDone()))
    assert gw.connects() == ["10.0.0.1:8080"]
    assert client.value().startswith(b"HTTP/1.1 502")


def test_no_fallback_after_the_first_byte():
    """A stream that breaks midway is cut, not resent: the client connection is
    aborted, the reason logged, and the failure counts against the node."""
    gw = gateway()
    _, client = gw.client(post(CHAT, BODY))
    upstream = gw.upstream(0)
    upstream.send(SSE_HEAD + b"9\r\ndata: 1\n\n\r\n")
    upstream.protocol.connectionLost(Failure(ConnectionDone()))
    assert gw.connects() == ["10.0.0.1:8080"]
    assert client.disconnecting or client.disconnected
    assert gw.records[0].error == "upstream_body_cut"


def test_last_upstreams_answer_passes_through():
    """When the fallback also answers 5xx, its answer is the client's."""
    gw = gateway()
    _, client = gw.client(post(CHAT, BODY))
    gw.upstream(0).send(response(b"500 Internal Server Error"))
    gw.upstream(1).send(response(b"503 Service Unavailable", body=b'{"error": "backup"}'))
    assert client.value().startswith(b"HTTP/1.1 503") and client.value().endswith(b'{"error": "backup"}')


def test_everything_out_is_answered_at_once():
    """Both upstreams out: 429 with the earliest Retry-After when all are rate
    limited, 503 upstreams_unavailable otherwise; no connection is attempted."""
    gw = gateway()
    gw.client(post(CHAT, BODY))
    gw.upstream(0).send(response(b"429 Too Many Requests", b"retry-after: 20\r\n"))
    gw.upstream(1).send(response(b"429 Too Many Requests", b"retry-after-ms: 7500\r\n"))
    _, client = gw.client(post(CHAT, BODY))
    assert len(gw.connects()) == 2
    raw = client.value()
    assert raw.startswith(b"HTTP/1.1 429") and b"Retry-After: 8\r\n" in raw
    assert body_of(raw)["error"]["code"] == "rate_limit_exceeded"
    for _ in range(3):  # backup: three 5xx in a row once it is back
        gw.reactor.advance(8)
        gw.client(post(CHAT, BODY))
        gw.upstream(-1).send(response(b"500 Internal Server Error"))
    _, client = gw.client(post(CHAT, BODY))
    raw = client.value()
    assert raw.startswith(b"HTTP/1.1 503") and body_of(raw)["error"]["code"] == "upstreams_unavailable"
    assert b"Retry-After: " in raw


def test_fallback_on_is_respected():
    """Without 429 in fallback_on a 429 passes through (the node still cools down)."""
    gw = gateway(CONFIG.replace("fallback = backup", "fallback = backup\nfallback_on = 5xx"))
    _, client = gw.client(post(CHAT, BODY))
    gw.upstream(0).send(response(b"429 Too Many Requests", b"retry-after: 5\r\n"))
    assert client.value().startswith(b"HTTP/1.1 429") and len(gw.connects()) == 1
    _, client = gw.client(post(CHAT, BODY))
    assert gw.connects()[-1] == "10.0.1.1:8080"  # the primary is out: the backup takes it


def test_no_deployment_skips_azure():
    """A fallback Azure upstream without a deployment for the model is passed over;
    the primary's answer stands."""
    config = CONFIG.replace("api_key = $ENV://BACKUP_KEY", "api_key = $ENV://BACKUP_KEY\nprovider = azure\n"
                            "api_version = 2024-10-21\ndeployments = gpt-4o prod")
    gw = gateway(config)
    _, client = gw.client(post(CHAT, BODY))
    gw.upstream(0).send(response(b"500 Internal Server Error"))
    assert client.value().startswith(b"HTTP/1.1 500") and len(gw.connects()) == 1
    _, client = gw.client(post(CHAT, BODY.replace(b"gpt-4o-mini", b"gpt-4o")))
    gw.upstream(-1).send(response(b"500 Internal Server Error"))
    sent = gw.upstream(-1).received()
    assert sent.startswith(b"POST /openai/deployments/prod/chat/completions?api-version=2024-10-21 HTTP/1.1")
    assert b"Api-Key: sk-backup" in sent and b"Authorization" not in sent


def test_metrics_say_who_answered():
    """/metrics counts answers per route, upstream and node, failures per reason."""
    from prometheus_client import generate_latest

    gw = Gateway(CONFIG, ENV, metrics=True)
    gw.client(post(CHAT, BODY))
    gw.upstream(0).send(response(b"429 Too Many Requests"))
    gw.upstream(1).send(response())
    scraped = generate_latest(gw.metrics.registry).decode()
    assert 'openaigw_upstream_answers_total{node="10.0.1.1:8080",route="chat",upstream="backup"} 1.0' in scraped
    assert 'openaigw_upstream_failures_total{node="10.0.0.1:8080",reason="status_429",upstream="primary"} 1.0' in scraped
