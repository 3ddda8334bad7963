"""The request on its way through the gateway, as filters see and change it."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest


@dataclass
class Exchange:
    """One client request and the upstream request being made from it.

    ``method``, ``path`` (with its query string), ``headers`` and ``body`` are what will
    be sent upstream; request filters change them in place.
    """

    request: IRequest
    route: str
    method: bytes
    path: bytes
    headers: Headers
    body: bytes


@dataclass
class ResponseHead:
    """The upstream's status and headers, before they are sent to the client."""

    code: int
    phrase: bytes
    headers: Headers
