"""Access records, request ids, the access log file and metrics, in memory."""

from __future__ import annotations

import json
import os

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from openaigw.accesslog import AccessLog, AccessRecord
from openaigw.interfaces import IRequestObserver
from openaigw.metrics import Metrics
from openaigw.usage import Usage

from tests.memory import BASE_CONFIG, Gateway, post, response

CHAT = b"/v1/chat/completions"
BODY = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "secret prompt"}]}'
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def header(raw: bytes, name: bytes) -> bytes:
    for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b": ")
        if key.lower() == name:
            return value
    return b""


def test_observers_provide_interface(tmp_path):
    """The access log and the metrics are request observers."""
    assert verifyObject(IRequestObserver, AccessLog(str(tmp_path / "a.log")))
    assert verifyObject(IRequestObserver, Metrics())


def test_record_of_a_proxied_request():
    """A finished request is reported once with route, node, status, sizes, timings and model."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, BODY, b"Authorization: Bearer sk-client\r\n"))
    gw.reactor.advance(0.25)
    gw.upstream().send(response(headers=b"x-request-id: req_up\r\n", body=b'{"ok": true}'))
    (record,) = gw.records
    assert (record.route, record.upstream, record.upstream_node) == ("chat", "up", "10.0.0.1:8080")
    assert (record.method, record.path, record.status, record.upstream_status) == ("POST", CHAT.decode(), 200, 200)
    assert record.client == "192.0.2.7"
    assert record.bytes_in == len(BODY) and record.bytes_out == len(b'{"ok": true}')
    assert record.duration == 0.25 and record.ttfb == 0.25
    assert record.model == "gpt-4o-mini" and not record.streamed and record.error is None
    assert record.upstream_request_id == "req_up"
    # the upstream's request id passes through; the gateway's goes beside it
    assert header(client.value(), b"x-request-id") == b"req_up"
    assert header(client.value(), b"x-gateway-request-id").decode() == record.request_id
    assert b"sk-client" not in json.dumps(record.fields()).encode()


def test_request_ids():
    """A sane incoming X-Request-Id is kept and sent upstream; others are replaced."""
    gw = Gateway()
    _, client = gw.client(post(CHAT, BODY, b"X-Request-Id: abc-123\r\n"))
    assert b"X-Request-Id: abc-123" in gw.upstream().received()
    gw.upstream().send(response())
    assert header(client.value(), b"x-request-id") == b"abc-123"
    assert gw.records[0].request_id == "abc-123"
    _, client = gw.client(post(CHAT, BODY, b"X-Request-Id: bad id with spaces\r\n"))
    _, client = gw.client(b"GET /nowhere HTTP/1.1\r\nHost: gw\r\nX-Request-Id: " + b"x" * 200 + b"\r\n\r\n")
    generated = header(client.value(), b"x-request-id")
    assert len(generated) == 32 and generated == gw.records[-1].request_id.encode()


def test_gateway_errors_are_reported_with_reason():
    """404s, 413s and 502s are logged with the reason the gateway answered itself."""
    gw = Gateway()
    gw.client(b"GET /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n")
    gw.client(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 99999\r\n\r\n")
    assert [(r.status, r.error, r.route) for r in gw.records] == [
        (404, "route_not_found", None), (413, "request_too_large", None)]
    assert gw.records[1].path == "/v1/chat/completions"


def test_client_leaving_is_499():
    """A client that leaves mid-stream is logged as 499 with how far the answer got."""
    gw = Gateway()
    channel, _ = gw.client(post(CHAT, BODY))
    upstream = gw.upstream()
    upstream.send(SSE_HEAD + b"9\r\ndata: 1\n\n\r\n")
    channel.connectionLost(Failure(ConnectionDone()))
    (record,) = gw.records
    assert record.status == 499 and record.streamed
    assert record.bytes_out == len(b"data: 1\n\n")


def test_context_reports_once_when_its_last_holder_is_done():
    """The record goes out once, when both the request and the route are done with it."""
    from twisted.internet.task import Clock

    from openaigw.context import RequestContext

    clock, reported = Clock(), []

    class Observer:
        def request_finished(self, record):
            reported.append((record, clock.seconds()))

    context = RequestContext(AccessRecord(started=0.0), Observer(), clock)
    context.hold()  # a route takes the request
    clock.advance(1)
    context.release()  # the answer is finished
    assert reported == []
    clock.advance(1)
    context.release()  # the route's exchange is over
    assert reported == [(context.record, 2.0)] and context.record.duration == 2.0


def test_client_leaving_during_a_limit_delay_is_reported_once():
    """A client that leaves while its request waits (limit-req): one record, 499."""
    config = BASE_CONFIG.replace(
        "proxy-rewrite.headers.set", "limit-req.rate = 1\nlimit-req.burst = 5\nproxy-rewrite.headers.set")
    gw = Gateway(config)
    gw.client(post(CHAT, BODY))
    gw.upstream().send(response())
    channel, _ = gw.client(post(CHAT, BODY))  # delayed: over the rate
    assert len(gw.records) == 1
    channel.connectionLost(Failure(ConnectionDone()))
    gw.reactor.advance(5)
    assert [(r.status, r.route) for r in gw.records] == [(200, "chat"), (499, "chat")]
    assert gw.requests_sent() == 1


def test_upstream_cut_is_logged_as_such():
    """An upstream that dies mid-body: the record keeps the status sent and says why it ended."""
    gw = Gateway(metrics=True)
    gw.client(post(CHAT, BODY))
    upstream = gw.upstream()
    upstream.send(SSE_HEAD + b"9\r\ndata: 1\n\n\r\n")
    upstream.protocol.connectionLost(Failure(ConnectionDone()))
    (record,) = gw.records
    assert (record.status, record.error) == (200, "upstream_body_cut")
    value = gw.metrics.registry.get_sample_value(
        "openaigw_upstream_failures_total", {"upstream": "up", "node": "10.0.0.1:8080", "reason": "upstream_body_cut"})
    assert value == 1


def test_access_log_json_and_text_lines(tmp_path):
    """The access log writes one parseable line per request; logrotate's move + SIGHUP reopens."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    record = AccessRecord(started=0.0, request_id="r1", method="POST", path="/v1/x", status=200,
                          usage=Usage(1, 2, 3, estimated=True), model="m", duration=0.5)
    log.request_finished(record)
    os.rename(path, tmp_path / "access.log.1")
    log.reopen()
    log.request_finished(record)
    log.close()
    (first,) = [json.loads(line) for line in (tmp_path / "access.log.1").read_text().splitlines()]
    assert first["request_id"] == "r1" and first["total_tokens"] == 3 and first["tokens_estimated"] is True
    assert first["duration_ms"] == 500.0 and first["time"].endswith("Z")
    assert len(path.read_text().splitlines()) == 1
    text = AccessLog(str(tmp_path / "text.log"), "text")
    text.request_finished(record)
    text.close()
    line = (tmp_path / "text.log").read_text()
    assert line.startswith("time=") and " status=200 " in line and " path=/v1/x " in line


def test_metrics_count_requests_tokens_and_streams():
    """Requests by route/consumer/status, tokens by model and kind, streams open now."""
    gw = Gateway(metrics=True)
    registry = gw.metrics.registry
    gw.client(post(CHAT, BODY))
    gw.upstream().send(SSE_HEAD)
    assert registry.get_sample_value("openaigw_active_streams", {"route": "chat"}) == 1
    gw.upstream().send(b"0\r\n\r\n")
    assert registry.get_sample_value("openaigw_active_streams", {"route": "chat"}) == 0
    assert registry.get_sample_value(
        "openaigw_requests_total", {"route": "chat", "consumer": "", "status": "200"}) == 1
    assert registry.get_sample_value("openaigw_request_duration_seconds_count", {"route": "chat"}) == 1


def test_model_labels_are_bounded():
    """Models become labels only after a 2xx, up to the cap; the rest fold into 'other'."""
    metrics = Metrics(model_cap=2)
    for model, status in (("a", 200), ("evil", 404), ("b", 200), ("c", 200), ("a", 200)):
        metrics.request_finished(AccessRecord(started=0, route="r", status=status, upstream_status=status,
                                              model=model, usage=Usage(1, 1, 2)))
    models = {s.labels["model"] for m in metrics.registry.collect() if m.name == "openaigw_tokens"
              for s in m.samples}
    assert models == {"a", "b", "other"}


def test_access_log_gathers_lines_for_a_moment(tmp_path):
    """With a clock, lines are written together within FLUSH_SECONDS, and on close."""
    from twisted.internet.task import Clock

    clock = Clock()
    path = tmp_path / "access.log"
    log = AccessLog(str(path), clock=clock)
    for status in (200, 404):
        log.request_finished(AccessRecord(started=0.0, status=status))
    assert path.read_text() == ""
    clock.advance(AccessLog.FLUSH_SECONDS)
    assert [json.loads(line)["status"] for line in path.read_text().splitlines()] == [200, 404]
    log.request_finished(AccessRecord(started=0.0, status=500))
    log.close()
    assert len(path.read_text().splitlines()) == 3


def test_duration_histogram_matches_prometheus_client():
    """The dict-kept histogram exposes what prometheus_client's Histogram would:
    the same buckets (a value on a bound counts in it), count and sum."""
    from prometheus_client import CollectorRegistry, Histogram

    from openaigw.metrics import _SECONDS

    reference = CollectorRegistry()
    histogram = Histogram("openaigw_request_duration_seconds", "d", ["route"], buckets=_SECONDS,
                          registry=reference)
    metrics = Metrics()
    for seconds in (0.005, 0.007, 1, 1.5, 400):
        histogram.labels("r").observe(seconds)
        metrics.request_finished(AccessRecord(started=0, route="r", status=200, duration=seconds))

    def samples(registry):
        return sorted((s.name, tuple(sorted(s.labels.items())), s.value)
                      for m in registry.collect() if m.name == "openaigw_request_duration_seconds"
                      for s in m.samples if not s.name.endswith("_created"))

    assert samples(metrics.registry) == samples(reference)
    assert metrics.registry.get_sample_value(
        "openaigw_requests_total", {"route": "r", "consumer": "", "status": "200"}) == 5


def test_json_line_is_the_fields_as_json(monkeypatch):
    """The access log's JSON line is exactly json.dumps of the record's fields, in
    their order: every kind of value, escapes and non-ASCII text included."""
    import openaigw.accesslog as accesslog

    monkeypatch.setattr(accesslog.time, "time", lambda: 1764633600.0425)
    records = [
        AccessRecord(started=0.0),
        AccessRecord(started=0.0, request_id="r1", client="192.0.2.7", method="POST", path="/v1/x",
                     status=200, duration=0.0012345, ttfb=0.001, streamed=True, model="gpt-4o",
                     usage=Usage(14, 9, 23), upstream="up", upstream_node="10.0.0.1:8080",
                     upstream_status=200, upstream_request_id="req_1", bytes_in=10, bytes_out=20),
        AccessRecord(started=0.0, consumer='te"am\\a', route="r\u00e9\u2028\x00\n", path="/v1/\U0001f600",
                     status=499, duration=12.5, usage=Usage(0, 0, 0, estimated=True), retries=2,
                     failed_attempts="up 10.0.0.1:8080 timeout; up - no_node", error="upstream_body_cut",
                     limit="limit-count", cache="hit", tokens_saved=7),
        AccessRecord(started=0.0, duration=3, ttfb=0, usage=Usage(10**20, 1, -1)),
    ]
    for record in records:
        assert record.json_line() == json.dumps(record.fields(), separators=(",", ":"))


def test_request_metrics_match_prometheus_client():
    """The dict-kept request counters expose what prometheus_client's Counters would,
    for label sets first seen at any time (a new status, route or consumer late on)."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    reference = CollectorRegistry()
    requests = Counter("openaigw_requests", "Finished requests.", ["route", "consumer", "status"],
                       registry=reference)
    tokens = Counter("openaigw_tokens", "Tokens used, from the upstream's usage (or estimates).",
                     ["route", "consumer", "model", "kind"], registry=reference)
    metrics = Metrics()
    records = [("r", None, 200, 3), ("r", "a", 200, 0), ("r", None, 429, 0), ("s", "b", 200, 5),
               ("r", None, 200, 2), ("r", "a", 503, 0), ("r", "a", 200, 1)]
    for route, consumer, status, used in records:
        requests.labels(route, consumer or "", str(status)).inc()
        if used:
            tokens.labels(route, consumer or "", "m", "prompt").inc(used)
            tokens.labels(route, consumer or "", "m", "completion").inc(used)
        metrics.request_finished(AccessRecord(
            started=0, route=route, consumer=consumer, status=status, upstream_status=status,
            model="m", usage=Usage(used, used, 2 * used) if used else None))

    def text(registry, name):
        return sorted(line for line in generate_latest(registry).decode().splitlines()
                      if line.startswith(name) and "_created" not in line)

    for name in ("openaigw_requests_total", "openaigw_tokens_total"):
        assert text(metrics.registry, name) == text(reference, name)


def test_json_line_durations_are_rounded_as_before():
    """Durations in the JSON line read as ``repr(round(ms, 3))`` did: the same
    digits for every magnitude and sign, halves included, ints and oddities too."""
    import random

    from openaigw.accesslog import _ms

    rand = random.Random(15)
    values = [0.0, -0.0, 5e-7, 1.5e-6, 2.5e-6, 0.0025, 2.0005e-3, 1e-9, 3, 0, 10**13, 1e9 + 4.999e-7,
              float("inf"), float("nan"), -4e-7, 999999999.9999995, 1e12, 0.9999999999995]
    for exponent in range(-10, 14):
        for _ in range(500):
            values.append(rand.random() * 10.0 ** exponent * rand.choice((1, -1)))
            values.append(round(rand.random() * 10.0 ** exponent, rand.randrange(8)) + rand.choice((0, 5e-7)))
    assert [_ms(v) for v in values] == [repr(round(v * 1000, 3)) for v in values]


def test_json_line_quotes_every_value_even_once_its_memory_is_full(monkeypatch):
    """Remembered JSON texts are bounded, and values beyond the bound are still quoted."""
    import openaigw.accesslog as accesslog

    quoted, routed = accesslog._Quoted(), accesslog._Routed()
    monkeypatch.setattr(accesslog._Quoted, "LIMIT", 2)
    monkeypatch.setattr(accesslog, "_QUOTED", quoted)
    monkeypatch.setattr(accesslog, "_ROUTED", routed)
    for path in ("/v1/a", '/v1/"b"', "/v1/\u00e9", "/v1/a", "/v1/c"):
        line = AccessRecord(started=0.0, path=path).json_line()
        assert json.loads(line)["path"] == path
    assert len(quoted) == 2 and len(routed) == 2


def test_access_log_time_is_utc_to_the_millisecond(monkeypatch):
    """The line's time is the wall clock's, in UTC, each millisecond its own."""
    import openaigw.accesslog as accesslog

    times = []
    for when in (1764633600.0425, 1764633600.0427, 1764633600.9996, 1764633601.0, 1764633599.0005, 0.001):
        monkeypatch.setattr(accesslog.time, "time", lambda: when)
        times.append(json.loads(AccessRecord(started=0.0).json_line())["time"])
    assert times == ["2025-12-02T00:00:00.042Z", "2025-12-02T00:00:00.042Z", "2025-12-02T00:00:00.999Z",
                     "2025-12-02T00:00:01.000Z", "2025-12-01T23:59:59.000Z", "1970-01-01T00:00:00.001Z"]
