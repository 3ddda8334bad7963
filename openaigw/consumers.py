"""Gateway keys: who is calling, from the credential an SDK sends."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from twisted.web.http_headers import Headers

from openaigw.headers import stored_name

# Where SDKs put the key: OpenAI's (Bearer), Azure's (api-key), and the common X-API-Key.
CREDENTIAL_HEADERS = (b"authorization", b"api-key", b"x-api-key")
STORED_CREDENTIAL_HEADERS = tuple(map(stored_name, CREDENTIAL_HEADERS))  # (see openaigw.headers)
_AUTHORIZATION = STORED_CREDENTIAL_HEADERS[0]


@dataclass(frozen=True)
class Consumer:
    """A key holder and the filters of its own limits; ``username`` is the name as
    the upstream's ``X-Consumer-Username`` (UTF-8, on one line)."""

    name: str
    filters: Tuple[Any, ...] = ()
    username: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "username", b" ".join(self.name.encode("utf-8").splitlines()))


def presented_key(headers: Headers) -> Optional[bytes]:
    """The key in ``Authorization: Bearer``, ``api-key`` or ``X-API-Key``, if any."""
    fields = headers._rawHeaders
    for value in fields.get(_AUTHORIZATION, ()):
        scheme, _, token = value.strip().partition(b" ")
        token = token.strip()
        if token and scheme.lower() == b"bearer":
            return token
    for name in STORED_CREDENTIAL_HEADERS[1:]:
        for value in fields.get(name, ()):
            value = value.strip()
            if value:
                return value
    return None


class KeyRing:
    """Consumers by the SHA-256 digest of their key.

    Keys are never stored or compared: a presented key is hashed and its digest
    looked up.  The time that takes depends only on the digest, which tells an
    attacker nothing about a valid key (no byte-by-byte comparison of secrets).
    """

    def __init__(self) -> None:
        self._consumers: Dict[bytes, Consumer] = {}

    def add(self, digest: bytes, consumer: Consumer) -> None:
        self._consumers[digest] = consumer

    def __len__(self) -> int:
        return len(self._consumers)

    def find(self, key: bytes) -> Optional[Consumer]:
        return self._consumers.get(hashlib.sha256(key).digest())
