"""Deterministic cost of the gateway's own code: CPU instructions per request or chunk.

    python bench/instructions.py [plain|full|bare|stream|stream-usage|stream-open|all]   # needs valgrind
    python bench/instructions.py --profile plain           # cProfile's top entries

The gateway of bench/run.py (its routes, proxy-rewrite, the JSON access log; "full"
adds key-auth, limit-count, ai-rate-limiting and metrics; "bare" has no access log:
bench/run.py's openaigw-full and openaigw-bare) is built in memory: a real
GatewaySite and upstream client over StringTransports and a MemoryReactorClock, with
one kept-alive client connection and one kept-alive upstream connection.  Each
scenario runs under callgrind twice, with a small and a large count; the difference
divided by the difference of the counts is the instructions of one request (or, for
"stream", one SSE chunk relayed; "stream-usage": one chunk carrying the ``"usage":null``
that OpenAI adds once asked for usage, stripped for the client; "stream-open": the cost
of opening one stream, i.e. a new client connection, its stream request, a new upstream
connection, the answer's head, one chunk and the end, both connections then closed).  No sockets and no reactor: what it counts is
Python work, the same on a busy machine as on a quiet one, so two commits compare
exactly.  Syscalls and the reactor's own cost are what bench/run.py measures.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:0] = [_HERE, _ROOT]

from run import CLIENT_KEY, gateway_ini  # noqa: E402  (bench/run.py's gateway, in memory)

BODY = (b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello!"}],'
        b'"max_tokens":16}')
STREAM_BODY = BODY[:-1] + b',"stream":true}'
CHAT = (b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
        b'"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant",'
        b'"content":"Hello! How can I help you today?","refusal":null},"logprobs":null,'
        b'"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":9,'
        b'"total_tokens":23},"system_fingerprint":"fp_bench"}')
EVENT = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
         b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hi"},'
         b'"finish_reason":null}]}\n\n')
USAGE = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
         b'"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":14,'
         b'"completion_tokens":20,"total_tokens":34}}\n\ndata: [DONE]\n\n')
# As OpenAI sends them once asked for usage (which the gateway does for every stream):
# "usage":null in every chunk, which the gateway strips for a client that did not ask.
EVENT_ASKED = EVENT[:-3] + b',"usage":null}\n\n'
# (small, large): the counts whose difference is measured.
COUNTS = {"plain": (100, 600), "full": (100, 600), "bare": (100, 600), "stream": (20, 420), "stream-usage": (20, 420),
          "stream-open": (50, 350)}
SCENARIOS = tuple(COUNTS)


def site(full: bool, bare: bool = False) -> Tuple[Any, Any]:
    """Build the in-memory gateway: (its site, its MemoryReactorClock); ``bare``: no
    access log (bench/run.py's openaigw-bare)."""
    from twisted.internet.testing import MemoryReactorClock

    from openaigw.accesslog import AccessLog
    from openaigw.config import parse
    from openaigw.metrics import Metrics
    from openaigw.service import build_site
    from openaigw.state import build_runtime
    from openaigw.telemetry import Telemetry

    reactor = MemoryReactorClock()
    variant = "openaigw-full" if full else "openaigw-bare" if bare else "openaigw"
    ini = gateway_ini(0, 8080, variant, tempfile.gettempdir())
    parsed = parse(ini, "gw.ini", {"OPENAI_API_KEY": "sk-real"})
    access_log = None if bare else AccessLog(os.devnull, "json", reactor)
    telemetry = Telemetry(access_log, Metrics() if full else None)
    runtime = build_runtime(parsed.gateway, reactor, telemetry)
    return build_site(parsed, reactor, runtime, telemetry)[0], reactor


def gateway(full: bool, bare: bool = False) -> Tuple[Callable[[bytes], None], Any, Any, Any]:
    """Build the in-memory gateway; return (send a client request, upstream, clock, client)."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    gateway_site, reactor = site(full, bare)
    peer = IPv4Address("TCP", "127.0.0.1", 50000)
    channel = gateway_site.buildProtocol(peer)
    client = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 9080), peerAddress=peer)
    channel.makeConnection(client)
    upstream: list = []

    def send(request: bytes) -> None:
        client.clear()
        channel.dataReceived(request)
        if not upstream:  # the first request connects; later ones reuse the connection
            host, port, factory, _, _ = reactor.tcpClients[0]
            transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
            protocol = factory.buildProtocol(None)
            protocol.makeConnection(transport)
            # (The protocol a TCP transport delivers reads to, as it may be handed on.)
            upstream.append((getattr(transport, "protocol", protocol), transport))
        upstream[0][1].clear()

    return send, upstream, reactor, client


def open_streams(count: int) -> None:
    """``count`` streams, each on a new client connection and a new upstream one."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    gateway_site, reactor = site(False)
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    body = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(EVENT_ASKED), EVENT_ASKED, len(USAGE), USAGE)
    data = request(STREAM_BODY, False)
    for i in range(count):
        peer = IPv4Address("TCP", "127.0.0.1", 40000 + i % 20000)
        channel = gateway_site.buildProtocol(peer)
        client = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 9080), peerAddress=peer)
        channel.makeConnection(client)
        channel.dataReceived(data)
        host, port, factory, _, _ = reactor.tcpClients.pop()
        upstream = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(upstream)
        protocol = getattr(upstream, "protocol", protocol)
        protocol.dataReceived(head)
        protocol.dataReceived(body)
        protocol.connectionLost(Failure(ConnectionDone()))
        check(client.value(), b"data: [DONE]")
        if b'"usage"' in client.value():
            raise SystemExit("the usage the gateway asked for reached the client")
        channel.connectionLost(Failure(ConnectionDone()))
        if i % 100 == 99:
            reactor.advance(0.1)  # the access log's batched flush


def request(body: bytes, full: bool) -> bytes:
    auth = CLIENT_KEY if full else "sk-ignored"
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:9080\r\n"
            b"User-Agent: OpenAI/Python 1.50.0\r\nAccept: application/json\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer " + auth.encode() + b"\r\n"
            b"X-Stainless-Lang: python\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def run(scenario: str, count: int) -> None:
    """Relay ``count`` requests (or, for "stream", one stream of ``count`` chunks)."""
    if scenario == "stream-open":
        open_streams(count)
        return
    full = scenario == "full"
    send, upstream, clock, client = gateway(full, scenario == "bare")
    if scenario.startswith("stream"):
        send(request(STREAM_BODY, full))
        protocol = upstream[0][0]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n")
        event = EVENT_ASKED if scenario == "stream-usage" else EVENT
        chunk = b"%x\r\n%s\r\n" % (len(event), event)
        for _ in range(count):
            protocol.dataReceived(chunk)
        protocol.dataReceived(b"%x\r\n%s\r\n0\r\n\r\n" % (len(USAGE), USAGE))
        check(client.value(), b"data: [DONE]")
        if b'"usage"' in client.value():
            raise SystemExit("the usage the gateway asked for reached the client")
        return
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\nX-Request-Id: req_1\r\n\r\n" % len(CHAT) + CHAT)
    data = request(BODY, full)
    for i in range(count):
        send(data)
        upstream[0][0].dataReceived(answer)
        if i % 100 == 99:
            clock.advance(0.1)  # the access log's batched flush
    check(client.value(), b"chatcmpl-bench")


def check(answer: bytes, expected: bytes) -> None:
    if not answer.startswith(b"HTTP/1.1 200 ") or expected not in answer:
        raise SystemExit(f"the gateway did not relay the answer: {answer[:300]!r}")


def instructions(scenario: str, count: int) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, os.path.abspath(__file__), "--run", scenario, str(count)],
        env=dict(os.environ, PYTHONHASHSEED="0"), capture_output=True, text=True, check=True,
    ).stderr
    match = re.search(r"Collected : (\d+)", out)
    if match is None:
        raise SystemExit(f"no count from callgrind:\n{out}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", nargs="?", default="all", choices=SCENARIOS + ("all",))
    parser.add_argument("--profile", action="store_true", help="cProfile's top 25 entries instead")
    parser.add_argument("--run", nargs=2, metavar=("SCENARIO", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run(args.run[0], int(args.run[1]))
        return
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    for scenario in scenarios:
        small, large = COUNTS[scenario]
        if args.profile:
            run(scenario, 1)  # imports and first-time costs: not in the profile
            profile = cProfile.Profile()
            profile.runcall(run, scenario, large)
            print(f"== {scenario}: {large} {'chunks' if scenario in ('stream', 'stream-usage') else 'streams' if scenario == 'stream-open' else 'requests'}")
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
            continue
        cost = (instructions(scenario, large) - instructions(scenario, small)) / (large - small)
        unit = "chunk" if scenario in ("stream", "stream-usage") else "stream" if scenario == "stream-open" else "request"
        print(f"{scenario:7s} {cost / 1000:8.1f} k instructions per {unit}", flush=True)


if __name__ == "__main__":
    main()
