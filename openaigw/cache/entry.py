"""A stored answer: its status, the headers a client reads, and its body as it came
(an event stream as its events, to be replayed one by one)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from twisted.web.http_headers import Headers

from openaigw.headers import HOP_BY_HOP

COOKIES = (b"set-cookie", b"set-cookie2")  # the upstream's, for the one client it answered
_NOT_STORED = HOP_BY_HOP | set(COOKIES) | {
    b"date", b"age", b"content-length", b"x-cache-status",
    b"x-request-id", b"x-gateway-request-id", b"retry-after", b"retry-after-ms",
    b"x-ms-retry-after-ms", b"x-accel-buffering",
}
_NOT_STORED_PREFIXES = (b"x-ratelimit-", b"x-ai-ratelimit-")  # recomputed for each request
_FORMAT = 1


def stored_headers(headers: Headers) -> Tuple[Tuple[bytes, bytes], ...]:
    """The headers of an answer worth replaying: not cookies, not hop-by-hop, not the
    rate-limit headers or the request id (those belong to the request that is served)."""
    kept = []
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in _NOT_STORED or lower.startswith(_NOT_STORED_PREFIXES):
            continue
        kept.extend((lower, value) for value in values)
    return tuple(kept)


def forbids_storing(headers: Headers) -> bool:
    """True if the upstream said ``Cache-Control: no-store`` (or ``private``).

    ``no-cache`` (OpenAI sends it on every stream) is a request to revalidate,
    which a gateway whose operator turned the cache on may skip.
    """
    for value in headers.getRawHeaders(b"cache-control", ()):
        for directive in value.split(b","):
            if directive.strip().split(b"=", 1)[0].lower() in (b"no-store", b"private"):
                return True
    return False


@dataclass(frozen=True)
class Entry:
    """One cached answer; ``chunks`` are the SSE events of a stream, or the body;
    ``tokens`` the total of its usage (None if it had none)."""

    created: float
    status: int
    headers: Tuple[Tuple[bytes, bytes], ...]
    streamed: bool
    chunks: Tuple[bytes, ...]
    tokens: Optional[int] = None

    @property
    def size(self) -> int:
        return sum(map(len, self.chunks)) + sum(len(n) + len(v) for n, v in self.headers)

    def encode(self) -> bytes:
        """A self-describing binary form: one JSON line, then the body bytes."""
        head = {
            "format": _FORMAT,
            "created": self.created,
            "status": self.status,
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
            "streamed": self.streamed,
            "tokens": self.tokens,
            "chunks": [len(chunk) for chunk in self.chunks],
        }
        return json.dumps(head, separators=(",", ":")).encode("ascii") + b"\n" + b"".join(self.chunks)

    @classmethod
    def decode(cls, data: bytes) -> Optional["Entry"]:
        """The entry ``encode`` wrote, or None for anything else (a foreign or damaged
        value is a miss)."""
        line, _, body = data.partition(b"\n")
        try:
            head: Any = json.loads(line)
            if not isinstance(head, dict) or head.get("format") != _FORMAT:
                return None
            lengths = head["chunks"]
            if not all(isinstance(n, int) and n >= 0 for n in lengths) or sum(lengths) != len(body):
                return None
            chunks: List[bytes] = []
            start = 0
            for length in lengths:
                chunks.append(body[start : start + length])
                start += length
            headers = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in head["headers"])
            created, status, streamed, tokens = head["created"], head["status"], head["streamed"], head["tokens"]
            if not isinstance(created, (int, float)) or not isinstance(status, int):
                return None
            if tokens is not None and not isinstance(tokens, int):
                return None
            return cls(float(created), status, headers, bool(streamed), tuple(chunks), tokens)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeError):
            return None
