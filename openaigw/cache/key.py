"""Which requests the cache may answer, and the key an answer is stored under."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Optional

# The generation APIs whose answers depend on the body alone (under a route and a caller).
CACHEABLE_ENDPOINTS = (b"/chat/completions", b"/completions", b"/embeddings", b"/responses")


def cacheable(method: bytes, path: bytes, body: Any) -> bool:
    """POST to one of :data:`CACHEABLE_ENDPOINTS` (``path`` may carry a query) with a
    JSON object as its body."""
    endpoint = path.partition(b"?")[0].rstrip(b"/")
    return method == b"POST" and endpoint.endswith(CACHEABLE_ENDPOINTS) and isinstance(body, dict)


def canonical_json(value: Any) -> bytes:
    """``value`` serialised so that key order and whitespace do not matter."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True
    ).encode("utf-8", "surrogatepass")


def cache_key(route: str, scope: str, path: bytes, body: Any) -> str:
    """The hex SHA-256 of route, scope (who may share the answer), upstream path (with
    its query) and the body as canonical JSON; each part length-prefixed so that no
    two different tuples hash alike."""
    digest = hashlib.sha256()
    for part in _parts(route.encode("utf-8"), scope.encode("utf-8"), path, canonical_json(body)):
        digest.update(part)
    return digest.hexdigest()


def _parts(*fields: bytes) -> Iterable[bytes]:
    for field in fields:
        yield b"%d:" % len(field)
        yield field


def caller_scope(consumer: Optional[str], presented_key: Optional[bytes]) -> str:
    """Who an answer belongs to with ``cache.scope = consumer``: the consumer (key-auth),
    else the hash of the key the client sent (never the key itself), else nobody in
    particular."""
    if consumer is not None:
        return "consumer:" + consumer
    if presented_key is not None:
        return "key:" + hashlib.sha256(presented_key).hexdigest()
    return "anonymous"
