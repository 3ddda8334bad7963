"""A fake OpenAI-compatible upstream for tests, benchmarks and demos.

``FakeOpenAI`` is a twisted.web resource that answers like the OpenAI API and
records what it receives; ``make_test_ca`` writes a throw-away PKI;
``start_fake_upstream`` runs ``python -m openaigw.testing`` as a subprocess;
``RedisServer`` runs Debian's redis-server on loopback.

Per-request knobs (request headers): ``X-Fake-Chunks`` (stream chunks, default
5), ``X-Fake-Interval-Ms`` (gap between chunks, default 10), ``X-Fake-Delay-Ms``
(wait before answering, default 0), ``X-Fake-Bytes`` (content size for model
"big", default 1 MiB).  Special models: hang, hang-body, error-429, error-500,
die-mid-stream, big.

Trouble for a while (``POST /_fake/trouble`` with JSON ``{"status": 429,
"retry_after": "2", "seconds": 2}`` or ``{"hang": true, "times": 3}``; ``{}`` ends
it): every API request answers that status (an OpenAI error body, the given
``Retry-After``) or hangs, for ``seconds`` or ``times`` requests.

Azure mode (``--azure-key KEY``, ``--azure-api-version V``): the API is served as
Azure OpenAI's: ``/openai/deployments/<deployment>/chat/completions?api-version=V``,
``/openai/models?api-version=V`` and ``/openai/v1/...``, with ``api-key: KEY``; a
request with an ``Authorization`` header, another key or another api-version gets 401
or 400.  The deployment name is answered as the model.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import json
import os
import select
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPullProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

log = Logger()

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WRITE_SIZE = 64 * 1024
_RATE_HEADERS = {
    "x-ratelimit-limit-requests": "10000", "x-ratelimit-limit-tokens": "2000000",
    "x-ratelimit-remaining-requests": "9999", "x-ratelimit-remaining-tokens": "1999000",
    "x-ratelimit-reset-requests": "6ms", "x-ratelimit-reset-tokens": "30ms",
}
_NO_USAGE = ("digital_signature content_commitment key_encipherment data_encipherment "
             "key_agreement encipher_only decipher_only").split()


@dataclass(frozen=True)
class TestPKI:
    """Paths of the PEM files written by :func:`make_test_ca`."""

    __test__ = False  # not a pytest test class

    directory: str
    ca: str  # ca.pem: the trusted CA certificate
    ca_key: str  # ca-key.pem
    server: str  # server.pem: key + certificate, for ``ssl:...:privateKey=``
    server_cert: str  # server-cert.pem
    server_key: str  # server-key.pem
    rogue: str  # rogue.pem: key + certificate from an untrusted self-signed CA
    rogue_ca: str  # rogue-ca.pem


def _issue(cn: str, key: ec.EllipticCurvePrivateKey, issuer_key: ec.EllipticCurvePrivateKey,
           issuer: Optional[x509.Certificate] = None) -> x509.Certificate:
    """Sign a CA certificate (no issuer: self-signed) or a localhost server one."""
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1))
         .not_valid_after(now + datetime.timedelta(days=30))
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             issuer_key.public_key()), False))
    if issuer is None:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=0), True).add_extension(
            x509.KeyUsage(key_cert_sign=True, crl_sign=True, **dict.fromkeys(_NO_USAGE, False)),
            True)
    else:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        b = (b.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
             .add_extension(x509.SubjectAlternativeName(san), False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False))
    return b.sign(issuer_key, hashes.SHA256())


def _pem(obj: Any) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_test_ca(directory: "str | os.PathLike[str]") -> TestPKI:
    """Write a test CA, a localhost/127.0.0.1 server cert it signs, and a rogue pair.

    Keys are EC P-256; certificates are valid from now-1d to now+30d.
    """
    d = os.fspath(directory)
    os.makedirs(d, exist_ok=True)
    pem: dict = {}
    for prefix in ("", "rogue-"):
        ca_key, key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
        ca = _issue(f"openaigw {prefix}test CA", ca_key, ca_key)
        cert = _issue("localhost", key, ca_key, ca)
        for label, obj in (("ca", ca), ("ca-key", ca_key), ("cert", cert), ("key", key)):
            pem[prefix + label] = _pem(obj)
    files = {"ca.pem": pem["ca"], "ca-key.pem": pem["ca-key"],
             "server.pem": pem["key"] + pem["cert"], "server-cert.pem": pem["cert"],
             "server-key.pem": pem["key"], "rogue.pem": pem["rogue-key"] + pem["rogue-cert"],
             "rogue-ca.pem": pem["rogue-ca"]}
    for name, data in files.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    return TestPKI(d, *(os.path.join(d, name) for name in files))


@dataclass
class ReceivedRequest:
    """What the fake upstream saw of one request (times are reactor.seconds())."""

    method: str
    path: str  # including the query string
    headers: List[Tuple[str, str]]  # received order and case, duplicates kept
    body: bytes
    received_at: float
    finished_at: Optional[float] = None  # response completed
    disconnected: bool = False  # client went away before the response ended
    disconnected_at: Optional[float] = None
    aborted: bool = False  # we cut the connection on purpose (die-mid-stream)

    def header(self, name: str) -> Optional[str]:
        """First value of header *name* (case-insensitive), or None."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def to_json(self) -> dict:
        """A JSON-able dict: body as text if UTF-8, else base64 (see body_encoding)."""
        d = dict(vars(self), headers=[list(h) for h in self.headers])
        try:
            d["body"], d["body_encoding"] = self.body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            d["body"], d["body_encoding"] = base64.b64encode(self.body).decode(), "base64"
        return d


class _Exchange:
    """One in-flight response: timers, writes and disconnect bookkeeping."""

    def __init__(self, reactor: IReactorTime, request: server.Request, record: ReceivedRequest):
        self.reactor, self.request, self.record = reactor, request, record
        self.pending: Optional[IDelayedCall] = None
        self.done = False  # finished, aborted, or client gone: write nothing more
        request.notifyFinish().addCallbacks(self._finished, self._lost)

    def later(self, seconds: float, fn: Callable[..., Any], *args: Any) -> None:
        if not self.done:
            self.pending = self.reactor.callLater(seconds, self._fire, fn, args)

    def _fire(self, fn: Callable[..., Any], args: Sequence[Any]) -> None:
        self.pending = None
        if not self.done:
            fn(*args)

    def write(self, data: bytes) -> None:
        if not self.done:
            self.request.write(data)

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.request.finish()

    def abort(self) -> None:
        """Cut the TCP connection so the client sees a truncated body."""
        if not self.done and self.request.channel is not None:
            self.done = self.record.aborted = True
            cast(Any, self.request.channel.transport).abortConnection()

    def _finished(self, _: object) -> None:
        self.record.finished_at = self.reactor.seconds()

    def _lost(self, _: object) -> None:
        if not self.done:
            self.record.disconnected, self.record.disconnected_at = True, self.reactor.seconds()
        self.done = True
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        self.pending = None


@implementer(IPullProducer)
class _BodyProducer:
    """Writes a body in 64 KiB pieces as the transport asks for more."""

    def __init__(self, exchange: _Exchange, data: bytes):
        self.exchange, self.data, self.offset, self.stopped = exchange, data, 0, False

    def resumeProducing(self) -> None:
        ex = self.exchange
        if ex.done or self.stopped:
            return
        ex.write(self.data[self.offset:self.offset + _WRITE_SIZE])
        self.offset += _WRITE_SIZE
        if self.offset >= len(self.data):
            ex.request.unregisterProducer()
            ex.finish()

    def stopProducing(self) -> None:
        self.stopped = True


def _error(message: str, type_: str, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class FakeOpenAI(Resource):
    """Root resource of a fake OpenAI API; every request is appended to ``received``.

    ``/_fake/requests`` (GET), ``/_fake/reset`` (POST) and ``/_fake/health`` (GET)
    are control endpoints and are not recorded.
    """

    isLeaf = True
    MODELS = ("gpt-4o-mini", "gpt-4o", "big", "hang", "hang-body", "error-429",
              "error-500", "die-mid-stream")

    def __init__(self, reactor: IReactorTime, name: str = "fake", azure_key: Optional[str] = None,
                 azure_api_version: str = "2024-10-21") -> None:
        super().__init__()
        self.reactor, self.name = reactor, name
        self.azure_key, self.azure_api_version = azure_key, azure_api_version
        self.received: List[ReceivedRequest] = []
        self.trouble: Dict[str, Any] = {}  # see the module docstring

    def render(self, request: server.Request) -> Any:
        request.setHeader(b"server", b"fake-openai")
        request.setHeader(b"x-fake-node", self.name.encode())
        method, path = request.method.decode(), request.path.decode("utf-8", "replace")
        if path.startswith("/_fake/"):
            return self._control(request, method, path)
        content = cast(IO[bytes], request.content)
        content.seek(0)
        headers = getattr(request, "_fake_raw_headers", None) or [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs]
        record = ReceivedRequest(method, request.uri.decode("utf-8", "replace"), list(headers),
                                 content.read(), self.reactor.seconds())
        self.received.append(record)
        ex = _Exchange(self.reactor, request, record)
        request.setHeader(b"x-request-id", b"req_" + uuid.uuid4().hex.encode())
        if self._in_trouble():
            if self.trouble.get("hang"):
                return server.NOT_DONE_YET
            retry_after = self.trouble.get("retry_after")
            if retry_after is not None:
                request.setHeader(b"retry-after", str(retry_after).encode())
            status = int(self.trouble.get("status", 503))
            return self._json(request, status, _error(
                f"Trouble on {self.name} (fake {status}).",
                "requests" if status == 429 else "server_error",
                "rate_limit_exceeded" if status == 429 else None))
        deployment = None
        if self.azure_key is not None:
            path, deployment, refusal = self._azure(request, path)
            if refusal is not None:
                return refusal
        if method == "POST" and path == "/v1/chat/completions":
            return self._chat(ex, deployment)
        if method == "GET" and path == "/v1/models":
            return self._json(request, 200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"}
                for m in self.MODELS]})
        return self._json(request, 404, _error(f"Invalid URL ({method} {path})",
                                               "invalid_request_error"))

    def _in_trouble(self) -> bool:
        trouble = self.trouble
        if not trouble:
            return False
        if "until" in trouble and self.reactor.seconds() >= trouble["until"]:
            trouble.clear()
            return False
        if "times" in trouble:
            if trouble["times"] <= 0:
                trouble.clear()
                return False
            trouble["times"] -= 1
        return True

    def _azure(self, request: server.Request, path: str) -> Tuple[str, Optional[str], Optional[bytes]]:
        """Check an Azure-shaped request; return the OpenAI path it stands for, the
        deployment, and a refusal to send instead (None if all is well)."""
        if request.getHeader(b"authorization") is not None:
            return path, None, self._json(request, 401, _error(
                "Azure OpenAI takes the key in api-key here, not Authorization", "invalid_request_error"))
        if request.getHeader(b"api-key") != (self.azure_key or "").encode():
            return path, None, self._json(request, 401, _error(
                "Access denied due to invalid subscription key.", "invalid_request_error", "401"))
        if path.startswith("/openai/v1/"):
            if b"api-version" in request.args:
                return path, None, self._json(request, 400, _error(
                    "The v1 API takes no api-version", "invalid_request_error"))
            return path[len("/openai"):], None, None
        versions = request.args.get(b"api-version", [])
        if versions != [self.azure_api_version.encode()]:
            return path, None, self._json(request, 400, _error(
                f"api-version {versions!r} is not supported here", "invalid_request_error"))
        parts = path.split("/")
        if len(parts) >= 4 and parts[1:3] == ["openai", "deployments"]:
            return "/v1/" + "/".join(parts[4:]), parts[3], None
        if path.startswith("/openai/"):
            return "/v1/" + path[len("/openai/"):], None, None
        return path, None, self._json(request, 404, _error("Resource not found", "invalid_request_error", "404"))

    def _json(self, request: server.Request, code: int, obj: Any) -> bytes:
        data = json.dumps(obj).encode()
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", str(len(data)).encode())
        return data

    def _control(self, request: server.Request, method: str, path: str) -> bytes:
        if method == "GET" and path == "/_fake/requests":
            return self._json(request, 200, [r.to_json() for r in self.received])
        if method == "POST" and path == "/_fake/reset":
            del self.received[:]
            self.trouble = {}
            return self._json(request, 200, {"ok": True})
        if method == "POST" and path == "/_fake/trouble":
            content = cast(IO[bytes], request.content)
            content.seek(0)
            trouble = dict(json.loads(content.read() or b"{}"))
            if "seconds" in trouble:
                trouble["until"] = self.reactor.seconds() + float(trouble.pop("seconds"))
            self.trouble = trouble
            return self._json(request, 200, {"ok": True})
        if method == "GET" and path == "/_fake/health":
            request.setHeader(b"content-type", b"text/plain")
            return b"ok"
        return self._json(request, 404, _error(f"Invalid URL ({method} {path})",
                                               "invalid_request_error"))

    def _chat(self, ex: _Exchange, deployment: Optional[str] = None) -> Any:
        request = ex.request
        try:
            body = json.loads(ex.record.body)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            knob = lambda name, default: int(request.getHeader(name) or default)  # noqa: E731
            n, size = max(knob("x-fake-chunks", 5), 1), knob("x-fake-bytes", 1 << 20)
            interval = knob("x-fake-interval-ms", 10) / 1000.0
            delay = knob("x-fake-delay-ms", 0) / 1000.0
        except ValueError as e:
            return self._json(request, 400, _error(
                f"We could not parse the JSON body of your request. ({e})",
                "invalid_request_error"))
        model = deployment or str(body.get("model", ""))
        if model != "hang":
            ex.later(delay, self._respond, ex, body, model, n, interval, size)
        return server.NOT_DONE_YET

    def _respond(self, ex: _Exchange, body: dict, model: str, n: int,
                 interval: float, size: int) -> None:
        request = ex.request
        if model == "error-429":
            request.setHeader(b"retry-after", b"1")
            ex.write(self._json(request, 429, _error(
                "Rate limit reached for requests (fake). Please try again in 1s.",
                "requests", "rate_limit_exceeded")))
            return ex.finish()
        if model == "error-500":
            ex.write(self._json(request, 500, _error(
                "The server had an error while processing your request.", "server_error")))
            return ex.finish()
        elapsed_ms = int((self.reactor.seconds() - ex.record.received_at) * 1000)
        request.setHeader(b"openai-processing-ms", str(elapsed_ms).encode())
        for k, v in _RATE_HEADERS.items():
            request.setHeader(k.encode(), v.encode())
        prompt_tokens = max(1, sum(len(str(m.get("content") or "").split())
                                   for m in body.get("messages") or [] if isinstance(m, dict)))
        base = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "created": int(self.reactor.seconds()),
                "model": model, "system_fingerprint": "fp_fake"}
        if not body.get("stream") and model not in ("hang-body", "die-mid-stream"):
            content = "".join(f"tok{i} " for i in range(n))
            if model == "big":
                line = "All work and no play makes a big body. "
                content = (line * (size // len(line) + 1))[:size]
            message = {"role": "assistant", "content": content, "refusal": None}
            data = self._json(request, 200, dict(base, object="chat.completion", choices=[
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
                usage=_usage(prompt_tokens, len(content.split()))))
            return request.registerProducer(_BodyProducer(ex, data), False)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        n = max(n, 3) if model == "die-mid-stream" else n
        extra = {"usage": None} if include_usage else {}

        def send(i: int) -> None:
            delta = dict({"role": "assistant"} if i == 0 else {}, content=f"tok{i} ")
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": "stop" if i == n - 1 else None}
            ex.write(_sse(dict(base, object="chat.completion.chunk", choices=[choice], **extra)))
            if model == "hang-body":
                return
            if model == "die-mid-stream" and i == 1:
                return ex.later(max(interval, 0.05), ex.abort)  # let chunk 1 reach the wire
            if i + 1 < n:
                return ex.later(interval, send, i + 1)
            if include_usage:
                ex.write(_sse(dict(base, object="chat.completion.chunk", choices=[],
                                   usage=_usage(prompt_tokens, n))))
            ex.write(b"data: [DONE]\n\n")
            ex.finish()

        send(0)


class _Channel(http.HTTPChannel):
    """HTTPChannel with TCP_NODELAY that also keeps raw request headers in order."""

    def connectionMade(self) -> None:
        super().connectionMade()
        try:
            cast(Any, self.transport).setTcpNoDelay(True)
        except Exception:  # not a TCP transport
            pass

    def headerReceived(self, line: bytes) -> bool:
        ok = super().headerReceived(line)
        if ok and self.requests:
            name, _, value = line.partition(b":")
            raw = self.requests[-1].__dict__.setdefault("_fake_raw_headers", [])
            raw.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        return ok


def make_site(reactor: IReactorTime, name: str = "fake", **options: Any) -> server.Site:
    """A Site serving a new FakeOpenAI (reachable as ``site.resource``); ``options``
    go to FakeOpenAI."""
    site = server.Site(FakeOpenAI(reactor, name, **options), reactor=reactor)
    site.protocol = _Channel  # type: ignore[assignment,method-assign]
    return site


def start_fake_upstream(
    tmpdir: "str | os.PathLike[str]", name: str = "fake", tls: bool = True,
    cert: Optional[str] = None, timeout: float = 10.0, port: int = 0,
    azure_key: Optional[str] = None,
) -> Tuple["subprocess.Popen[bytes]", int]:
    """Spawn ``python -m openaigw.testing`` on 127.0.0.1 and return (process, port).

    With *tls* it serves *cert* (key + cert PEM; default ``<tmpdir>/server.pem``,
    created by :func:`make_test_ca` if missing).  It listens on *port* (0: any free
    one), in Azure mode with *azure_key*.  It logs to ``<tmpdir>/fake-<name>.log``
    and exits when its stdin closes; stop it with :func:`stop_process`.
    """
    tmpdir = os.fspath(tmpdir)
    endpoint = f"tcp:port={port}:interface=127.0.0.1"
    if tls:
        if cert is None:
            cert = os.path.join(tmpdir, "server.pem")
            if not os.path.exists(cert):
                make_test_ca(tmpdir)
        escaped = cert.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")
        endpoint = f"ssl:port={port}:interface=127.0.0.1:privateKey={escaped}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
    log_path = os.path.join(tmpdir, f"fake-{name}.log")
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "openaigw.testing", "--listen", endpoint,
             "--name", name, "--exit-on-eof"] + (["--azure-key", azure_key] if azure_key else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, env=env)
    try:
        fd, buf, deadline = cast(IO[bytes], proc.stdout).fileno(), b"", time.monotonic() + timeout
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"fake upstream not listening after {timeout}s; see {log_path}")
            if select.select([fd], [], [], remaining)[0]:
                data = os.read(fd, 4096)
                if not data:
                    raise RuntimeError(f"fake upstream exited ({proc.wait()}); see {log_path}")
                buf += data
        word, port = buf.split(b"\n", 1)[0].split()
        if word != b"listening":
            raise RuntimeError(f"unexpected output from fake upstream: {buf!r}")
        return proc, int(port)
    except BaseException:
        stop_process(proc)
        raise


def stop_process(proc: "subprocess.Popen[bytes]", timeout: float = 5.0) -> None:
    """Terminate (then kill) a process from :func:`start_fake_upstream` or :func:`start_gateway`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            f.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_gateway(
    tmpdir: "str | os.PathLike[str]", config: str, port: int,
    env: Optional[Dict[str, str]] = None, timeout: float = 15.0, root: Optional[str] = None,
) -> "subprocess.Popen[bytes]":
    """Write *config* to ``<tmpdir>/gw.ini`` and run ``twistd -n openaigw`` on it, as
    users do; return once *port* (its listener) accepts connections.  The gateway's
    code comes from *root* (default: this source tree).

    It logs to ``<tmpdir>/gateway.log``; stop it with :func:`stop_process`.
    """
    tmpdir = os.fspath(tmpdir)
    path = os.path.join(tmpdir, "gw.ini")
    with open(path, "w", encoding="utf-8") as f:
        f.write(config)
    environ = dict(os.environ if env is None else env)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root or _ROOT, environ.get("PYTHONPATH")]))
    log_path = os.path.join(tmpdir, "gateway.log")
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "--nodaemon", "--pidfile=", "openaigw", "-c", path],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env=environ, cwd=tmpdir)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                raise RuntimeError(f"gateway exited with {proc.returncode}:\n{f.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                stop_process(proc)
                raise RuntimeError(f"gateway not listening on {port}; see {log_path}")
            time.sleep(0.05)


class RedisServer:
    """Debian's ``redis-server`` on 127.0.0.1, for tests and benchmarks: no
    persistence, its files in ``directory``; ``stop()`` and ``start()`` again on the
    same port (a restart loses the data and the loaded scripts, as a real one does)."""

    def __init__(self, directory: "str | os.PathLike[str]", password: Optional[str] = None) -> None:
        self.directory = os.fspath(directory)
        self.password = password
        self.port = free_port()
        self.extra = ""  # more redis.conf lines (tls-port, unixsocket, ...)
        self.proc: "Optional[subprocess.Popen[bytes]]" = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        config = os.path.join(self.directory, "redis.conf")
        with open(config, "w", encoding="utf-8") as f:  # the password stays out of argv
            f.write(f"port {self.port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\n"
                    f"dir {self.directory}\nlogfile {os.path.join(self.directory, 'redis.log')}\n"
                    + (f"requirepass {self.password}\n" if self.password else "") + self.extra)
        self.proc = subprocess.Popen(["redis-server", config], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start; see {self.directory}/redis.log")
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        """Whether it answers (a blocking PING, for set-up code)."""
        try:
            return self.command("PING") in (b"+PONG\r\n", b"-NOAUTH Authentication required.\r\n")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command over a fresh connection (after AUTH): the raw reply line(s)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            out = b""
            if self.password:
                out += b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(self.password), self.password.encode())
            out += b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args)
            sock.sendall(out)
            data = b""
            want = 2 if self.password else 1
            while data.count(b"\r\n") < want:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data.split(b"\r\n", 1)[1] if self.password else data

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class _StopOnEOF(Protocol):
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: object = None) -> None:
        if self.reactor.running:
            self.reactor.stop()


@defer.inlineCallbacks
def _serve(reactor: Any, args: argparse.Namespace) -> Any:
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.stdio import StandardIO

    options = {"azure_key": args.azure_key, "azure_api_version": args.azure_api_version}
    site = make_site(reactor, args.name, **options)
    for description in args.listen:
        port = yield serverFromString(reactor, description).listen(site)
        log.info("fake upstream {name} listening on {addr}", name=args.name, addr=port.getHost())
        print(f"listening {port.getHost().port}", flush=True)
    if args.exit_on_eof:
        StandardIO(_StopOnEOF(reactor), reactor=reactor)
    yield defer.Deferred()  # serve until the reactor stops


def main(argv: Optional[Sequence[str]] = None) -> None:
    """CLI: ``python -m openaigw.testing --listen ENDPOINT [...] | --make-ca DIR``."""
    parser = argparse.ArgumentParser(prog="python -m openaigw.testing",
                                     description="Fake OpenAI-compatible upstream.")
    parser.add_argument("--listen", action="append", default=[], metavar="ENDPOINT",
                        help="Twisted server endpoint, e.g. tcp:port=0:interface=127.0.0.1")
    parser.add_argument("--name", default="fake", help="value of the x-fake-node header")
    parser.add_argument("--make-ca", metavar="DIR", help="write a test PKI into DIR and exit")
    parser.add_argument("--exit-on-eof", action="store_true", help="exit when stdin closes")
    parser.add_argument("--azure-key", help="serve the API as Azure OpenAI, with this api-key")
    parser.add_argument("--azure-api-version", default="2024-10-21", help="the api-version it takes")
    parser.add_argument("-v", "--verbose", action="store_true", help="log info and access lines")
    args = parser.parse_args(argv)
    if args.make_ca:
        for key, value in vars(make_test_ca(args.make_ca)).items():
            print(f"{key} {value}")
        return
    if not args.listen:
        parser.error("at least one --listen or --make-ca is required")

    from twisted.internet import reactor, task
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                                globalLogBeginner, textFileLogObserver)

    level = LogLevel.info if args.verbose else LogLevel.warn
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr),
                                    [LogLevelFilterPredicate(defaultLogLevel=level)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    task.react(_serve, (args,), reactor)


if __name__ == "__main__":
    main()
