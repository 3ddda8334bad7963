"""The root resource: finds the route for a request's path, host and method."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Optional, Sequence, Tuple
from urllib.parse import unquote_to_bytes

from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from openaigw import errors

if TYPE_CHECKING:
    from openaigw.server import GatewayRequest


class Hosts:
    """A route's ``hosts``: names (``api.example.com``) and wildcards (``*.example.com``,
    any name ending in ``.example.com``), lower-case."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self._names = frozenset(p.encode("ascii") for p in patterns if not p.startswith("*"))
        self._suffixes = tuple(p[1:].encode("ascii") for p in patterns if p.startswith("*"))

    def match(self, host: bytes) -> bool:
        return host in self._names or host.endswith(self._suffixes)


# A route as the router keeps it: its methods (None: any) and hosts (None: any).
Entry = Tuple[Optional[FrozenSet[str]], Optional[Hosts], IResource]
# What the router is built from: uris, methods, hosts, priority, resource.
RouteSpec = Tuple[Sequence[str], Optional[FrozenSet[str]], Optional[Sequence[str]], int, IResource]


class Router(Resource):
    """Exact URIs beat prefixes (``/v1/*``); the longest prefix wins.  Among the
    routes for one URI, the highest ``priority`` comes first, then (at equal
    priority) those with ``hosts`` before those without, then the order given.

    The first route in that order whose hosts (if any) include the request's Host
    and whose methods include the request's serves it; when routes match the URI and
    host but no method does, the answer is 405; otherwise 404.
    """

    isLeaf = True

    def __init__(self, routes: Sequence[RouteSpec]) -> None:
        super().__init__()
        exact: Dict[bytes, List[Tuple[Tuple[int, int, int], Entry]]] = {}
        prefixes: Dict[bytes, List[Tuple[Tuple[int, int, int], Entry]]] = {}
        for number, (uris, methods, hosts, priority, resource) in enumerate(routes):
            entry = (methods, None if hosts is None else Hosts(hosts), resource)
            order = (-priority, hosts is None, number)
            for uri in uris:
                table = prefixes if uri.endswith("*") else exact
                table.setdefault(uri.rstrip("*").encode(), []).append((order, entry))
        ordered = sorted(prefixes.items(), key=lambda item: -len(item[0]))
        self._prefixes = [(prefix, [e for _, e in sorted(entries, key=lambda oe: oe[0])])
                          for prefix, entries in ordered]
        # An exact URI's candidates, the prefixes it also matches included, worked out once.
        self._exact: Dict[bytes, List[Entry]] = {
            path: [e for _, e in sorted(entries, key=lambda oe: oe[0])] + self._prefixed(path)
            for path, entries in exact.items()
        }

    def _prefixed(self, path: bytes) -> List[Entry]:
        found: List[Entry] = []
        for prefix, entries in self._prefixes:
            if path.startswith(prefix):
                found.extend(entries)
        return found

    def render(self, request: GatewayRequest) -> Any:
        path = request.context.path = normalize(request.path)  # what routes forward upstream
        if _ambiguous(path):
            errors.write_error(
                request,
                errors.GatewayError(400, "Invalid path", "invalid_request_error", "invalid_path"),
            )
            return NOT_DONE_YET
        candidates = self._exact.get(path)
        if candidates is None:
            candidates = self._prefixed(path)
        method = request.method.decode("ascii", "replace")
        host = None
        for methods, hosts, resource in candidates:
            if hosts is not None:
                if host is None:
                    host = request_host(request)
                if not hosts.match(host):
                    continue
            if methods is None or method in methods:
                return resource.render(request)
        if host is None and any(hosts is not None for _, hosts, _ in candidates):
            host = request_host(request)
        served = [methods for methods, hosts, _ in candidates if hosts is None or hosts.match(host or b"")]
        if not served:
            error = errors.not_found(path.decode("ascii", "replace"))
        else:
            allowed = sorted(set().union(*(m for m in served if m is not None)))
            error = errors.method_not_allowed(method, ", ".join(allowed))
        errors.write_error(request, error)
        return NOT_DONE_YET


def request_host(request: Any) -> bytes:
    """The request's Host header without its port (or trailing dot), lower-case;
    ``b""`` without one."""
    host = request.requestHeaders.getRawHeaders(b"host")
    if not host:
        return b""
    name = host[0].strip().lower()
    if name.startswith(b"["):
        return name.partition(b"]")[0] + b"]"
    return name.partition(b":")[0].rstrip(b".")


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
    if b"." not in path and b"%" not in path:
        return False  # (no dot segment, even once decoded)
    return any(segment in (b".", b"..") for segment in unquote_to_bytes(path).split(b"/"))
