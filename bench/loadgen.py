"""A small asyncio HTTP/1.1 load generator for the openaigw benchmark.

Two workloads, both over raw keep-alive sockets (no HTTP library in the timing path):

* :func:`fixed_rate` sends POSTs open-loop at fixed times and measures each
  latency from its *scheduled* send time, so a stalled server cannot hide its
  queueing.
* :func:`streams` opens N connections, then sends N streaming requests (spread
  over one chunk interval) and times every SSE event.  The bench upstream (nginx +
  echo) stamps each chunk with its send time (``"id":"chatcmpl-bench-<unix time,
  ms>"``), so the per-chunk transit time (arrival - stamp) is measured directly,
  free of the drift of the upstream's own timers.  A read that completes more than
  one stamped event counts as *coalesced*.

Every run is bounded in requests and in time.
"""

from __future__ import annotations

import asyncio
import math
import resource
import select
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

_STAMP = b"chatcmpl-bench-"
_CHAT_BODY = (b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":'
              b'"Say hello in one short sentence."}]}')
_STREAM_BODY = _CHAT_BODY[:-1] + b',"stream":true}'


def raise_nofile(wanted: int = 65536) -> None:
    """Raise this process's open-files soft limit as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def build_request(port: int, stream: Optional[str] = None) -> bytes:
    """A chat-completions POST as the openai SDK sends it; *stream* selects the SSE
    variant of the bench upstream ("fast" or "slow") through ``X-Bench-Stream``."""
    body = _STREAM_BODY if stream else _CHAT_BODY
    head = [b"POST /v1/chat/completions HTTP/1.1", b"Host: 127.0.0.1:%d" % port,
            b"User-Agent: openaigw-bench", b"Content-Type: application/json",
            b"Authorization: Bearer sk-bench-client-key-0001",
            b"Accept: " + (b"text/event-stream" if stream else b"application/json"),
            b"Content-Length: %d" % len(body)]
    if stream:
        head.append(b"X-Bench-Stream: " + stream.encode())
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(q / 100.0 * len(ordered))) - 1)]


class _Chunked:
    """Incremental decoder of a chunked transfer-coded body."""

    def __init__(self) -> None:
        self.buf = b""
        self.left = -1  # >0: data bytes left in this chunk; 0: CRLF expected; -1: size line
        self.trailers = False
        self.done = False

    def feed(self, data: bytes) -> List[bytes]:
        self.buf += data
        out: List[bytes] = []
        while not self.done:
            if self.left > 0:
                if not self.buf:
                    break
                piece = self.buf[:self.left]
                self.buf = self.buf[len(piece):]
                self.left -= len(piece)
                out.append(piece)
                continue
            eol = self.buf.find(b"\r\n")
            if eol < 0:
                break
            line, self.buf = self.buf[:eol], self.buf[eol + 2:]
            if self.trailers:
                self.done = not line
            elif self.left == 0:
                self.left = -1  # the CRLF after a chunk's data
            else:
                size = int(line.split(b";", 1)[0], 16)
                self.left, self.trailers = (size, False) if size else (-1, True)
        return out


@dataclass
class Response:
    """One response, parsed as it arrives; SSE events are timed when *sse* is set."""

    sse: bool = False
    sent: float = 0.0  # time.time() of the request write
    status: int = 0
    first_byte: Optional[float] = None
    done_at: Optional[float] = None
    events: List[Tuple[float, float]] = field(default_factory=list)  # (arrival, stamp)
    saw_done_event: bool = False
    coalesced_reads: int = 0
    coalesced_chunks: int = 0  # stamped events that arrived in a coalesced read
    _head: bytes = b""
    _length: Optional[int] = None
    _chunked: Optional[_Chunked] = None
    _events: bytes = b""

    def feed(self, data: bytes, now: float) -> bool:
        """Take bytes read at *now*; True once the response is complete."""
        if self.first_byte is None:
            self.first_byte = now
        if not self.status:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return False
            head, data = self._head[:end], self._head[end + 4:]
            lines = head.split(b"\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self._length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    self._chunked = _Chunked()
            if self._length is None and self._chunked is None:
                raise ValueError("response without Content-Length or chunked body")
        if self._chunked is not None:
            pieces = self._chunked.feed(data)
            if self.sse:
                self._sse(b"".join(pieces), now)
            complete = self._chunked.done
        else:
            assert self._length is not None
            self._length -= len(data)
            complete = self._length <= 0
        if complete:
            self.done_at = now
        return complete

    def _sse(self, data: bytes, now: float) -> None:
        self._events += data
        stamped = 0
        while True:
            end = self._events.find(b"\n\n")
            if end < 0:
                break
            event, self._events = self._events[:end], self._events[end + 2:]
            at = event.find(_STAMP)
            if at >= 0:
                start = at + len(_STAMP)
                self.events.append((now, float(event[start:event.index(b'"', start)])))
                stamped += 1
            elif event.startswith(b"data: [DONE]"):
                self.saw_done_event = True
        if stamped > 1:
            self.coalesced_reads += 1
            self.coalesced_chunks += stamped


class Connection(asyncio.Protocol):
    """One keep-alive client connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.closed = False
        self._response: Optional[Response] = None
        self._waiter: "Optional[asyncio.Future[Response]]" = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # asyncio sets TCP_NODELAY

    def send(self, request: bytes, response: Response) -> "asyncio.Future[Response]":
        assert self.transport is not None and self._response is None
        self._response = response
        self._waiter = asyncio.get_running_loop().create_future()
        response.sent = time.time()
        self.transport.write(request)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        response, now = self._response, time.time()
        if response is None or self._waiter is None:
            return
        try:
            complete = response.feed(data, now)
        except ValueError as e:
            self._fail(e)
            return
        if complete:
            self._response = None
            self._waiter.set_result(response)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self._fail(exc or ConnectionError("connection closed by the server"))

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter, self._response = self._waiter, None, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


async def _connect(port: int) -> Connection:
    _, conn = await asyncio.get_running_loop().create_connection(
        Connection, "127.0.0.1", port)
    return conn




async def fixed_rate(port: int, rate: float, seconds: float, connections: int = 16) -> Dict:
    """POST at *rate* req/s for *seconds*, open loop; latency from the scheduled time."""
    raise_nofile()
    request = build_request(port)
    pool = [await asyncio.wait_for(_connect(port), 10) for _ in range(connections)]
    idle: Deque[Connection] = deque(pool)
    latencies: List[float] = []
    errors = 0

    async def one(scheduled: float) -> None:
        nonlocal errors
        if idle:
            conn = idle.popleft()
        else:  # all busy: a new connection, its setup counted in the latency
            conn = await _connect(port)
            pool.append(conn)
        try:
            response = await conn.send(request, Response())
            if response.status == 200 and response.done_at is not None:
                latencies.append(response.done_at - scheduled)
            else:
                errors += 1
        except (OSError, ValueError):
            errors += 1
        if not conn.closed:
            idle.append(conn)

    tasks = []
    start = time.time() + 0.05
    try:
        for k in range(int(rate * seconds)):
            scheduled = start + k / rate
            delay = scheduled - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(scheduled)))
        done, pending = await asyncio.wait(tasks, timeout=10)
        errors += len(pending)
    finally:
        for task in tasks:
            task.cancel()
        for conn in pool:
            conn.close()
    return {"requests": len(tasks), "ok": len(latencies), "errors": errors,
            "p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3}


def streams(port: int, n: int, kind: str, chunks: int, spread: float, timeout: float) -> Dict:
    """*n* concurrent streaming requests (bench upstream variant *kind*, *chunks*
    events each) on pre-opened connections, their sends spread evenly over *spread*
    seconds (one chunk interval: clients are not in lockstep); bounded by *timeout*.

    A bare epoll loop only stamps and stores each read (a few microseconds), so the
    load generator stays far from being the bottleneck; responses are parsed after
    the run, each read with its arrival time.
    """
    reads: List[List[Tuple[float, bytes]]] = [[] for _ in range(n)]
    failed: Dict[int, Response] = {}  # streams whose answer is not a 200 stream

    def read(i: int, data: bytes, now: float) -> bool:
        if not data:
            return True
        stream = reads[i]
        stream.append((now, data))
        if len(stream) == 1 and not data.startswith(b"HTTP/1.1 200"):
            failed[i] = Response()
        if i in failed:
            return failed[i].feed(data, now)
        # The last chunk may come alone: look across the previous read.
        tail = data if len(data) >= 7 or len(stream) == 1 else stream[-2][1] + data
        return tail.endswith(b"\r\n0\r\n\r\n")

    sent = _burst(port, n, build_request(port, kind), spread, timeout, read)
    responses = []
    for i, stream in enumerate(reads):
        response = Response(sse=True, sent=sent[i])
        try:
            for at, data in stream:
                if response.feed(data, at):
                    break
        except ValueError:
            pass
        responses.append(response)
    return _stream_stats(responses, chunks)


def _burst(port: int, n: int, request: bytes, spread: float, timeout: float,
           read: Callable[[int, bytes, float], bool]) -> List[float]:
    """Open *n* connections, then send *request* on each, evenly over *spread* seconds;
    hand each read (``b""`` at the end) to ``read(i, data, now)`` until it returns True
    for that connection, for at most *timeout* seconds after the last send.  Returns
    each request's send time."""
    raise_nofile()
    socks: List[socket.socket] = []
    poller = select.epoll()
    sent = [0.0] * n
    try:
        for i in range(n):
            if i % 25 == 24:  # paced: a listen backlog of 50 (Twisted's default) overflows
                time.sleep(0.005)  # and costs a 1 s SYN retransmission
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            socks.append(sock)
        index = {sock.fileno(): i for i, sock in enumerate(socks)}
        start = time.time()
        deadline, due, pending = start + spread + timeout, 0, n
        while pending and time.time() < deadline:
            now = time.time()
            while due < n and start + due * spread / n <= now:
                poller.register(socks[due].fileno(), select.EPOLLIN)
                sent[due] = time.time()
                socks[due].send(request)
                due += 1
            wait = start + due * spread / n - now if due < n else deadline - now
            for fd, _ in poller.poll(max(0.0, min(wait, 0.5))):
                i = index[fd]
                try:
                    data = socks[i].recv(262144)
                except OSError:
                    data = b""
                if read(i, data, time.time()):
                    poller.unregister(fd)
                    pending -= 1
    finally:
        poller.close()
        for sock in socks:
            sock.close()
    return sent


def first_bytes(port: int, n: int, kind: str, spread: float, timeout: float) -> Dict:
    """The burst of :func:`streams` (*n* of its requests on pre-opened connections,
    sent evenly over *spread* seconds), timing each answer's first byte only: for a
    server that does not stream (Twisted's hello-world Site: the floor of taking and
    answering such a burst at all)."""
    first: Dict[int, Tuple[float, bytes]] = {}

    def read(i: int, data: bytes, now: float) -> bool:
        first[i] = (now, data)
        return True

    sent = _burst(port, n, build_request(port, kind), spread, timeout, read)
    ttfb = [now - sent[i] for i, (now, _) in first.items()]
    ok = sum(data.startswith(b"HTTP/1.1 200") for _, data in first.values())
    return {"streams": n, "answered": ok,
            "ttfb_p50_ms": percentile(ttfb, 50) * 1e3, "ttfb_p99_ms": percentile(ttfb, 99) * 1e3}


def _stream_stats(responses: List[Response], chunks: int) -> Dict:
    complete = [r for r in responses if r.done_at is not None and r.status == 200
                and r.saw_done_event and len(r.events) == chunks]
    ttfb = [r.first_byte - r.sent for r in responses if r.first_byte is not None]
    first_chunk = [r.events[0][0] - r.sent for r in responses if r.events]
    transit = [arrival - stamp for r in responses for arrival, stamp in r.events]
    received = sum(len(r.events) for r in responses)
    coalesced = sum(r.coalesced_chunks for r in responses)
    return {"streams": len(responses), "complete": len(complete), "chunks": received,
            "ttfb_p50_ms": percentile(ttfb, 50) * 1e3, "ttfb_p99_ms": percentile(ttfb, 99) * 1e3,
            "first_chunk_p50_ms": percentile(first_chunk, 50) * 1e3,
            "first_chunk_p99_ms": percentile(first_chunk, 99) * 1e3,
            "chunk_p50_ms": percentile(transit, 50) * 1e3,
            "chunk_p99_ms": percentile(transit, 99) * 1e3,
            "chunk_max_ms": max(transit, default=float("nan")) * 1e3,
            "coalesced_reads": sum(r.coalesced_reads for r in responses),
            "coalesced_pct": 100.0 * coalesced / max(1, received)}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="openaigw bench load generator")
    parser.add_argument("port", type=int)
    parser.add_argument("--rate", type=float, help="fixed-rate mode: requests per second")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--streams", type=int, help="stream mode: concurrent streams")
    parser.add_argument("--kind", default="fast", choices=("fast", "slow"))
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--spread", type=float, default=0.01, help="seconds to spread sends")
    args = parser.parse_args()
    if args.rate:
        result = asyncio.run(fixed_rate(args.port, args.rate, args.seconds))
    else:
        result = streams(args.port, args.streams or 10, args.kind, args.chunks, args.spread, 60)
    print(json.dumps(result, indent=1))
