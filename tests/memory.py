"""An in-memory gateway: a real Site and upstream client over StringTransports and a fake clock."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from openaigw.accesslog import AccessRecord
from openaigw.config import parse
from openaigw.metrics import Metrics
from openaigw.telemetry import Telemetry
from openaigw.state import build_runtime
from openaigw.service import build_site

BASE_CONFIG = """
[gateway]
listen = tcp:port=0:interface=127.0.0.1
max_body_size = 1K

[upstream:up]
scheme = http
nodes =
    10.0.0.1:8080 1
    10.0.0.2:8080 1
timeout_connect = 5
timeout_read = 30
retries = 1

[route:chat]
uri = /v1/chat/completions
methods = POST
upstream = up
proxy-rewrite.headers.set.Authorization = Bearer $ENV://KEY

[route:api]
uri = /v1/*
upstream = up
"""


class UpstreamConnection:
    """The gateway's side of one connection to a (fake) upstream node."""

    def __init__(self, reactor: MemoryReactorClock, index: int) -> None:
        host, port, factory, _, _ = reactor.tcpClients[index]
        self.address = f"{host}:{port}"
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def received(self) -> bytes:
        return self.transport.value()

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)


class _Recorder:
    """An access log that keeps the records."""

    def __init__(self, records: List[AccessRecord]) -> None:
        self.records = records

    def request_finished(self, record: AccessRecord) -> None:
        self.records.append(record)


class Gateway:
    """Drive the gateway built from ``config`` entirely in memory."""

    def __init__(self, config: str = BASE_CONFIG, environ: Optional[dict] = None, metrics: bool = False) -> None:
        self.reactor = MemoryReactorClock()
        self.config = parse(config, "gw.ini", environ if environ is not None else {"KEY": "sk-real"})
        self.records: List[AccessRecord] = []
        self.metrics = Metrics(model_cap=2) if metrics else None
        self.telemetry = Telemetry(metrics=self.metrics)
        self.runtime = build_runtime(self.config.gateway, self.reactor, self.telemetry)
        self.telemetry.access_log = _Recorder(self.records)  # type: ignore[assignment]
        self.site, self.upstreams = build_site(self.config, self.reactor, self.runtime, self.telemetry)
        self._connections: dict = {}

    def client(self, data: bytes = b"") -> Tuple[Any, StringTransport]:
        """Open a client connection and send ``data`` on it."""
        channel = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 50000))
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 9080),
            peerAddress=IPv4Address("TCP", "192.0.2.7", 50000),
        )
        channel.makeConnection(transport)
        if data:
            channel.dataReceived(data)
        return channel, transport

    def upstream(self, index: int = -1) -> UpstreamConnection:
        """The gateway's connection attempt number ``index`` to a node, completed."""
        index %= len(self.reactor.tcpClients)
        if index not in self._connections:
            self._connections[index] = UpstreamConnection(self.reactor, index)
        return self._connections[index]

    def requests_sent(self) -> int:
        """How many requests reached upstream nodes (connecting any pending attempts)."""
        return sum(
            self.upstream(i).received().count(b" HTTP/1.1\r\n") for i in range(len(self.reactor.tcpClients))
        )

    def connects(self) -> List[str]:
        return [f"{host}:{port}" for host, port, *_ in self.reactor.tcpClients]


def now(d: Any) -> Any:
    """A memory store's answer (a value, or a Deferred that has fired already)."""
    if not isinstance(d, Deferred):
        return d
    results: List[Any] = []
    d.addBoth(results.append)
    assert results, "a memory store answers at once"
    return results[0]


def post(path: bytes, body: bytes, headers: bytes = b"") -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: gw.example\r\n"
        + b"Content-Length: %d\r\n" % len(body) + headers + b"\r\n" + body
    )


def response(status: bytes = b"200 OK", headers: bytes = b"", body: bytes = b"{}") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n" % len(body) + headers + b"\r\n" + body
    )
