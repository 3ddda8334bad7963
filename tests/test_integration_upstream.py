"""A real `twistd openaigw` against raw-socket upstreams that misbehave on kept-alive
connections: one that resets after reading a request, one that frames its body in a
way the gateway must not pass on."""

from __future__ import annotations

import json
import socket
import struct
import threading
import urllib.error
import urllib.request
from typing import Callable, List, Optional

import pytest

from openaigw.testing import free_port, start_gateway, stop_process

BODY = b'{"model": "m", "messages": []}'
OK = b'{"id": "chatcmpl-1"}'


def answer(body: bytes = OK, headers: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
            + headers + b"\r\n" + body)


class RawUpstream(threading.Thread):
    """A plain-TCP upstream: reads each request whole, then lets ``respond(number, request)``
    (the requests' count so far across connections, the request's bytes) return the
    bytes to send, or None to reset the connection (SO_LINGER 0).  With
    ``half_close``, it shuts its side down after each answer; ``dropped`` is set once
    the gateway closes a connection."""

    def __init__(self, respond: Callable[[int, bytes], Optional[bytes]], half_close: bool = False) -> None:
        super().__init__(daemon=True)
        self.respond = respond
        self.half_close = half_close
        self.dropped = threading.Event()
        self.requests: List[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]

    def run(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._requests(conn)
        except OSError:  # the gateway dropped the connection
            pass

    def _requests(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        self.dropped.set()
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                request, buffer = head + b"\r\n\r\n" + buffer[:length], buffer[length:]
                with self._lock:
                    self.requests.append(request)
                    number = len(self.requests)
                reply = self.respond(number, request)
                if reply is None:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return  # closed with a reset
                conn.sendall(reply)
                if self.half_close:
                    conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def gateway(tmp_path):
    """A function starting the gateway in front of an upstream: its port."""
    started = []

    def start(upstream: RawUpstream) -> int:
        upstream.start()
        port = free_port()
        config = f"""
[gateway]
listen = tcp:port={port}:interface=127.0.0.1

[upstream:raw]
scheme = http
nodes = 127.0.0.1:{upstream.port}
timeout_read = 10

[route:api]
uri = /v1/*
upstream = raw
"""
        started.append((start_gateway(tmp_path, config, port), upstream))
        return port

    yield start
    for proc, upstream in started:
        stop_process(proc)
        upstream.close()


def call(port: int, method: str = "POST") -> tuple:
    """(status, body) of one request to the gateway, on a new client connection."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=BODY if method == "POST" else None,
        headers={"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_post_reset_after_read_on_a_kept_alive_connection_is_not_resent(gateway):
    """The upstream answers a POST, keeps the connection, reads the next POST on it and
    resets: the client gets 502, and that POST reached the upstream once (a retry on a
    new connection would be answered, and counted)."""
    upstream = RawUpstream(lambda number, request: None if number == 2 else answer())
    port = gateway(upstream)
    assert call(port) == (200, OK)
    status, body = call(port)
    assert status == 502 and json.loads(body)["error"]["code"] == "bad_gateway"
    assert len(upstream.requests) == 2 and upstream.connections == 1
    assert call(port) == (200, OK)  # a new connection for the next request
    assert len(upstream.requests) == 3 and upstream.connections == 2


def test_get_reset_on_a_kept_alive_connection_is_retried_once(gateway):
    """The same for a GET: it is sent once more, on a new connection, and answered."""
    upstream = RawUpstream(lambda number, request: None if number == 2 else answer())
    port = gateway(upstream)
    assert call(port, "GET") == (200, OK)
    assert call(port, "GET") == (200, OK)
    assert len(upstream.requests) == 3 and upstream.connections == 2


def test_chunked_then_gzip_is_502(gateway):
    """A body framed chunked-then-gzip is not passed on as if it were plain: 502."""
    upstream = RawUpstream(lambda number, request: (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"))
    port = gateway(upstream)
    status, body = call(port)
    assert status == 502 and json.loads(body)["error"]["code"] == "bad_gateway"
    assert len(upstream.requests) == 1


def test_bare_cr_in_status_phrase_is_502(gateway):
    """A status phrase with a CR of its own (which would start a header line of the
    upstream's making in the client's answer) is an invalid answer: 502, nothing of it sent."""
    upstream = RawUpstream(lambda number, request: answer().replace(b" OK\r\n", b" OK\rSet-Cookie: injected=1\r\n", 1))
    port = gateway(upstream)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
        raw = b""
        while True:
            data = conn.recv(65536)
            if not data:
                break
            raw += data
    assert raw.startswith(b"HTTP/1.1 502 ") and b"injected" not in raw
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "bad_gateway"
    assert len(upstream.requests) == 1


def test_connection_half_closed_while_idle_is_not_reused(gateway):
    """An upstream that shuts its side of a kept-alive connection after answering: the
    gateway drops that connection, and the next POST goes on a new one."""
    upstream = RawUpstream(lambda number, request: answer(), half_close=True)
    port = gateway(upstream)
    assert call(port) == (200, OK)
    assert upstream.dropped.wait(10)
    assert call(port) == (200, OK)
    assert len(upstream.requests) == 2 and upstream.connections == 2
