"""The root resource: finds the route for a request's path and method."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Optional, Sequence, Tuple
from urllib.parse import unquote_to_bytes

from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from openaigw import errors

if TYPE_CHECKING:
    from openaigw.server import GatewayRequest

Entry = Tuple[Optional[FrozenSet[str]], IResource]


class Router(Resource):
    """Exact URIs beat prefixes (``/v1/*``); the longest prefix wins.

    Among the routes for a URI the first whose methods include the request's
    serves it; when the URI matches but no method does, the answer is 405.
    """

    isLeaf = True

    def __init__(self, routes: Sequence[Tuple[Sequence[str], Optional[FrozenSet[str]], IResource]]) -> None:
        super().__init__()
        self._exact: Dict[bytes, List[Entry]] = {}
        prefixes: Dict[bytes, List[Entry]] = {}
        for uris, methods, resource in routes:
            for uri in uris:
                if uri.endswith("*"):
                    prefixes.setdefault(uri[:-1].encode(), []).append((methods, resource))
                else:
                    self._exact.setdefault(uri.encode(), []).append((methods, resource))
        self._prefixes = sorted(prefixes.items(), key=lambda item: -len(item[0]))

    def _candidates(self, path: bytes) -> List[Entry]:
        found = list(self._exact.get(path, ()))
        for prefix, entries in self._prefixes:
            if path.startswith(prefix):
                found.extend(entries)
        return found

    def render(self, request: GatewayRequest) -> Any:
        request.responseHeaders.removeHeader(b"server")
        path = request.context.path = normalize(request.path)  # what routes forward upstream
        if _ambiguous(path):
            errors.write_error(
                request,
                errors.GatewayError(400, "Invalid path", "invalid_request_error", "invalid_path"),
            )
            return NOT_DONE_YET
        candidates = self._candidates(path)
        method = request.method.decode("ascii", "replace")
        for methods, resource in candidates:
            if methods is None or method in methods:
                return resource.render(request)
        if not candidates:
            error = errors.not_found(path.decode("ascii", "replace"))
        else:
            allowed = sorted(set().union(*(m for m, _ in candidates if m is not None)))
            error = errors.method_not_allowed(method, ", ".join(allowed))
        errors.write_error(request, error)
        return NOT_DONE_YET


_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _unescape_unreserved(match: "re.Match[bytes]") -> bytes:
    value = int(match.group(1), 16)
    return bytes((value,)) if value in _UNRESERVED else b"%" + match.group(1).upper()


def normalize(path: bytes) -> bytes:
    """RFC 3986 normalisation, so that one resource has one path: percent-encoded
    unreserved characters decoded (``%63`` -> ``c``), other escapes upper-cased,
    repeated slashes folded.  Routes match, and forward, this form."""
    if b"%" in path:
        path = _ESCAPE.sub(_unescape_unreserved, path)
    while b"//" in path:
        path = path.replace(b"//", b"/")
    return path


def _ambiguous(path: bytes) -> bool:
    """Whether an upstream may read the (normalised) path as another one: ``.`` or
    ``..`` segments (also percent-encoded), an encoded slash or a backslash (an
    upstream that decodes ``/v1/chat%2Fcompletions`` serves the exact route's URI,
    which the gateway matched to a prefix)."""
    if b"%2F" in path or b"%5C" in path or b"\\" in path:
        return True
    return any(segment in (b".", b"..") for segment in unquote_to_bytes(path).split(b"/"))
