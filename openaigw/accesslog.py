"""The access log: one line per finished request, JSON (default) or logfmt text.

Lines go to a file or stdout (not through twisted.logger, whose events cost more
than the line), reopened on SIGHUP for logrotate.  They never hold keys,
Authorization values, query strings or message bodies.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import IO, Any, Dict, List, Optional

from zope.interface import implementer

from openaigw.interfaces import IRequestObserver
from openaigw.usage import Usage


@dataclass
class AccessRecord:
    """What the access log and the metrics learn about one request."""

    started: float
    request_id: str = ""
    client: str = ""
    method: str = ""
    path: str = ""
    status: int = 0
    consumer: Optional[str] = None
    route: Optional[str] = None
    upstream: Optional[str] = None
    upstream_node: Optional[str] = None
    upstream_status: Optional[int] = None
    upstream_request_id: Optional[str] = None
    bytes_in: int = 0
    bytes_out: int = 0
    duration: float = 0.0
    ttfb: Optional[float] = None
    streamed: bool = False
    model: Optional[str] = None
    usage: Optional[Usage] = None
    retries: int = 0
    failed_attempts: Optional[str] = None  # "upstream node reason; ..." (fallback, retries)
    error: Optional[str] = None  # why the gateway answered itself, or cut the answer
    limit: Optional[str] = None  # the limit that rejected the request
    cache: Optional[str] = None  # hit, miss, coalesced or bypass, on routes with cache = on
    tokens_saved: Optional[int] = None  # by a hit or a coalesced answer

    def fields(self) -> Dict[str, Any]:
        usage = self.usage
        return {
            "time": _iso(time.time()),
            "request_id": self.request_id,
            "upstream_request_id": self.upstream_request_id,
            "client": self.client,
            "consumer": self.consumer,
            "route": self.route,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "upstream": self.upstream,
            "upstream_node": self.upstream_node,
            "upstream_status": self.upstream_status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_ms": round(self.duration * 1000, 3),
            "ttfb_ms": None if self.ttfb is None else round(self.ttfb * 1000, 3),
            "streamed": self.streamed,
            "model": self.model,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "total_tokens": usage.total_tokens if usage else None,
            "tokens_estimated": usage.estimated if usage else None,
            "retries": self.retries,
            "failed_attempts": self.failed_attempts,
            "error": self.error,
            "limit": self.limit,
            "cache": self.cache,
            "tokens_saved": self.tokens_saved,
        }

    def json_line(self) -> str:
        """:meth:`fields` as the JSON that ``json.dumps(..., separators=(",", ":"))``
        writes, without building the dict (a test holds the two to the same text).
        Strings go through json's own escaping (remembered for the values that
        repeat: routes, upstreams, clients..., and the run of them a route's requests
        share); numbers are ints and floats, whose ``str`` is their JSON."""
        usage = self.usage
        if usage is None:
            tokens = _NO_TOKENS
        else:
            tokens = (f'"prompt_tokens":{usage.prompt_tokens},'
                      f'"completion_tokens":{usage.completion_tokens},'
                      f'"total_tokens":{usage.total_tokens},'
                      f'"tokens_estimated":{"true" if usage.estimated else "false"}')
        quoted = _QUOTED
        routed = _ROUTED[self.consumer, self.route, self.method, self.path, self.status, self.upstream,
                         self.upstream_node, self.upstream_status]
        ttfb = self.ttfb
        if (self.retries == 0 and self.failed_attempts is None and self.error is None and self.limit is None
                and self.cache is None and self.tokens_saved is None):
            tail = _PLAIN_TAIL  # (most requests)
        else:
            tail = (f'"retries":{self.retries},"failed_attempts":{_text(self.failed_attempts)},'
                    f'"error":{quoted[self.error]},"limit":{quoted[self.limit]},"cache":{quoted[self.cache]},'
                    f'"tokens_saved":{_number(self.tokens_saved)}}}')
        return (
            f'{{"time":"{_iso(time.time())}","request_id":{_text(self.request_id)},'
            f'"upstream_request_id":{_text(self.upstream_request_id)},"client":{quoted[self.client]},'
            f'{routed}'
            f'"bytes_in":{self.bytes_in},"bytes_out":{self.bytes_out},'
            f'"duration_ms":{_ms(self.duration)},'
            f'"ttfb_ms":{"null" if ttfb is None else _ms(ttfb)},'
            f'"streamed":{"true" if self.streamed else "false"},"model":{quoted[self.model]},{tokens},{tail}'
        )


_NO_TOKENS = '"prompt_tokens":null,"completion_tokens":null,"total_tokens":null,"tokens_estimated":null'
_PLAIN_TAIL = '"retries":0,"failed_attempts":null,"error":null,"limit":null,"cache":null,"tokens_saved":null}'
_escape = json.encoder.encode_basestring_ascii  # what json.dumps quotes strings with


def _text(value: Optional[str]) -> str:
    return "null" if value is None else _escape(value)


class _Quoted(Dict[Optional[str], str]):
    """Values as JSON text, remembered: ``quoted[value]``, a dict lookup for a value
    seen before.  Bounded (as Twisted's header name cache): values a client makes up
    cannot fill memory, and are quoted each time once it is full."""

    LIMIT = 10_000

    def __missing__(self, value: Optional[str]) -> str:
        text = _text(value)
        if len(self) < self.LIMIT:
            self[value] = text
        return text


_QUOTED = _Quoted()


class _Routed(_Quoted):
    """The line's text from ``consumer`` to ``upstream_status`` (with its comma), by
    those values: the same for most requests of a route.  Bounded as :class:`_Quoted`."""

    def __missing__(self, values: Any) -> str:  # type: ignore[override]
        consumer, route, method, path, status, upstream, node, upstream_status = values
        quoted = _QUOTED
        text = (f'"consumer":{quoted[consumer]},"route":{quoted[route]},"method":{quoted[method]},'
                f'"path":{quoted[path]},"status":{status},"upstream":{quoted[upstream]},'
                f'"upstream_node":{quoted[node]},'
                f'"upstream_status":{"null" if upstream_status is None else upstream_status},')
        if len(self) < self.LIMIT:
            self[values] = text
        return text


_ROUTED = _Routed()


def _number(value: Optional[int]) -> str:
    return "null" if value is None else repr(value)


def _ms(seconds: float) -> str:
    """``repr(round(seconds * 1000, 3))``, faster: the same correctly rounded digits
    (``%.3f``) less the trailing zeros, for floats of up to 15 digits (which that repr
    writes in full, with no exponent)."""
    ms = seconds * 1000
    if type(ms) is not float or not -1e12 < ms < 1e12:
        return repr(round(ms, 3))
    text = "%.3f" % ms
    text = text.rstrip("0")
    return text + "0" if text[-1] == "." else text


_second: List[Any] = [None, ""]  # the last second formatted, and its text
_MILLIS = [".%03dZ" % ms for ms in range(1000)]
_last: List[Any] = [None, ""]  # the last millisecond, and its text


def _iso(when: float) -> str:
    """UTC, to the millisecond (each second's text is formatted once, each
    millisecond's put together once)."""
    millis = int(when * 1000)
    if _last[0] != millis:
        seconds, ms = divmod(millis, 1000)
        if _second[0] != seconds:
            _second[:] = [seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))]
        _last[:] = [millis, _second[1] + _MILLIS[ms]]
    return _last[1]  # type: ignore[no-any-return]


def _logfmt(value: Any) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


@implementer(IRequestObserver)
class AccessLog:
    """Writes one line per finished request to ``path`` (``-``: stdout).

    With a ``clock``, lines are gathered and written together at most
    ``FLUSH_SECONDS`` later (one write instead of one per request, as nginx's
    ``flush=``); without one, each line is written at once.
    """

    FLUSH_SECONDS = 0.1

    def __init__(self, path: str = "-", format: str = "json", clock: Any = None) -> None:
        self.path = path
        self.format = format
        self._clock = clock
        self._file: Optional[IO[Any]] = None
        self._lines: List[str] = []
        self._flushing: Any = None
        self.reopen()

    def reopen(self) -> None:
        """Close and open the file again (after logrotate moved it)."""
        self.flush()
        if self.path == "-":
            # The process's real stdout: twistd replaces sys.stdout with a logger.
            self._file = sys.__stdout__
            return
        # Unbuffered: a batch is one write(2), which appends whole (several workers
        # appending to one file never split each other's lines).
        old, self._file = self._file, open(self.path, "ab", buffering=0)
        if old is not None:
            old.close()

    def close(self) -> None:
        self.flush()
        if self._file is not None and self._file is not sys.__stdout__:
            self._file.close()
        self._file = None

    def flush(self) -> None:
        """Write out the lines gathered so far."""
        if self._flushing is not None and self._flushing.active():
            self._flushing.cancel()
        self._flushing = None
        lines, self._lines = self._lines, []
        if lines and self._file is sys.__stdout__:
            self._file.write("".join(lines))
            self._file.flush()
        elif lines and self._file is not None:
            data = memoryview("".join(lines).encode("utf-8"))
            while data:
                data = data[self._file.write(data):]

    def request_finished(self, record: AccessRecord) -> None:
        if self.format == "json":
            line = record.json_line()
        else:
            line = " ".join(f"{key}={_logfmt(value)}" for key, value in record.fields().items())
        self._lines.append(line + "\n")
        if self._clock is None:
            self.flush()
        elif self._flushing is None:
            self._flushing = self._clock.callLater(self.FLUSH_SECONDS, self.flush)


