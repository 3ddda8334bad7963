"""The Admin API's HTTP side: APISIX's ``/apisix/admin/{routes,upstreams,consumers}``."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import parse_qs, unquote

from prometheus_client.core import CounterMetricFamily, Metric
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from openaigw.admin import schema
from openaigw.admin.catalog import SINGULAR, Catalog, ObjectError
from openaigw.admin.schema import AdminError
from openaigw.admin.store import KINDS

log = Logger()
PREFIX = b"/apisix/admin/"
MAX_BODY = 3 << 19  # 1.5 MiB, as APISIX


class AdminStats:
    """Admin API requests counted by resource, method and status (``openaigw_admin_requests``)."""

    def __init__(self) -> None:
        self.counts: Dict[Tuple[str, str, str], int] = {}
        self._registries: set = set()

    def count(self, resource: str, method: str, status: int, registry: Any = None) -> None:
        key = (resource, method, str(status))
        self.counts[key] = self.counts.get(key, 0) + 1
        self.register(registry)

    def register(self, registry: Any) -> None:
        """Be collected by ``registry`` too (the status listener's, once there is one)."""
        if registry is not None and id(registry) not in self._registries:
            self._registries.add(id(registry))
            registry.register(self)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "openaigw_admin_requests", "Admin API requests (changes and reads).",
            labels=["resource", "method", "status"],
        )
        for labels, value in self.counts.items():
            family.add_metric(labels, value)
        yield family


def _loopback(address: Any) -> bool:
    if isinstance(address, UNIXAddress):
        return True
    if isinstance(address, IPv4Address):
        return address.host.startswith("127.")
    if isinstance(address, IPv6Address):
        return address.host in ("::1", "::ffff:127.0.0.1")
    return False


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class AdminResource(Resource):
    """Serves the Admin API from a :class:`Catalog`.

    Requests need ``X-API-KEY`` (or the ``api_key`` query parameter) equal to
    ``admin_key``, compared in constant time; without an ``admin_key`` only loopback
    clients are served.  Every change is logged with the client's address, the
    resource and the id (never a body) and counted.
    """

    isLeaf = True

    def __init__(self, catalog: Catalog, telemetry: Any = None) -> None:
        super().__init__()
        self._catalog = catalog
        self._telemetry = telemetry
        self.stats = AdminStats()
        self.stats.register(self._registry())

    def _registry(self) -> Any:
        metrics = getattr(self._telemetry, "metrics", None)
        return None if metrics is None else metrics.registry

    def render(self, request: IRequest) -> Any:
        method = request.method.decode("ascii", "replace")
        resource, id, sub_path, problem = self._target(request, method)
        address = request.getClientAddress()
        client = getattr(address, "host", None) or str(address)
        if problem is None:
            problem = self._denied(request, address)
            if problem is not None:
                log.warn("Admin API: {client}: {method} {resource}: refused ({why})",
                         client=client, method=method, resource=resource or "-", why=problem.message)
        if problem is not None:
            return self._answer(request, resource, problem.status, {"error_msg": problem.message})
        assert resource is not None
        done = Deferred.fromCoroutine(self._handle(request, method, resource, id, sub_path, client))
        done.addErrback(self._failed, request, resource)
        return NOT_DONE_YET

    def _target(
        self, request: IRequest, method: str
    ) -> Tuple[Optional[str], Optional[str], Optional[List[str]], Optional[AdminError]]:
        """(kind, id, sub-path) from the path, or the 404 for a path that is not a
        resource; a sub-path (``/routes/ID/plugins/limit-count``) only for PATCH."""
        path = request.path
        parts = path[len(PREFIX):].split(b"/") if path.startswith(PREFIX) else []
        if parts and parts[-1] == b"" and len(parts) > 1:
            parts.pop()  # a trailing slash
        if not parts or (len(parts) > 2 and method != "PATCH") or parts[0].decode("latin-1") not in KINDS:
            return None, None, None, AdminError(
                404, "404 Not Found: /apisix/admin/{routes,upstreams,consumers}[/ID] (PATCH: [/ID/PATH])")
        kind = parts[0].decode("ascii")
        id = parts[1].decode("latin-1") if len(parts) >= 2 else None
        sub_path = [unquote(part.decode("latin-1")) for part in parts[2:]] or None
        return kind, id, sub_path, None

    def _denied(self, request: IRequest, address: Any) -> Optional[AdminError]:
        key = self._catalog.admin_key
        if key is None:
            if _loopback(address):
                return None
            return AdminError(403, "the Admin API has no admin_key: it serves loopback clients only")
        presented = request.getHeader(b"x-api-key")
        if presented is None:
            query = parse_qs(request.uri.partition(b"?")[2])
            presented = query.get(b"api_key", [None])[0]
        if presented is None:
            return AdminError(401, "failed to check token")
        if not hmac.compare_digest(_digest(presented), _digest(key.encode("utf-8"))):
            return AdminError(401, "failed to check token")
        return None

    def _answer(self, request: IRequest, resource: Optional[str], status: int, body: Any) -> bytes:
        self.stats.count(resource or "-", request.method.decode("ascii", "replace"), status, self._registry())
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode("utf-8") + b"\n"

    def _write(self, request: IRequest, resource: str, status: int, body: Any) -> None:
        if request.finished or request.channel is None:  # type: ignore[attr-defined]
            return
        request.write(self._answer(request, resource, status, body))
        request.finish()

    def _failed(self, failure: Failure, request: IRequest, resource: str) -> None:
        log.failure("Admin API: {method} {resource} failed", failure,
                    method=request.method.decode("ascii", "replace"), resource=resource)
        self._write(request, resource, 500, {"error_msg": "internal error (see the gateway's log)"})

    async def _handle(
        self, request: IRequest, method: str, kind: str, id: Optional[str], sub_path: Optional[List[str]], client: str
    ) -> None:
        try:
            status, body = await self._dispatch(request, method, kind, id, sub_path, client)
        except AdminError as e:
            status, body = e.status, ({"message": e.message} if e.status == 404 else {"error_msg": e.message})
        self._write(request, kind, status, body)

    async def _dispatch(
        self, request: IRequest, method: str, kind: str, id: Optional[str], sub_path: Optional[List[str]],
        client: str,
    ) -> Tuple[int, Any]:
        catalog = self._catalog
        if method == "GET":
            if id is None:
                items = [_item(kind, source, value) for source, value in catalog.list(kind)]
                return 200, {"total": len(items), "list": items}
            found = catalog.get(kind, id)
            if found is None:
                raise AdminError(404, "Key not found")
            return 200, _item(kind, *found)
        if method == "DELETE":
            if id is None:
                raise AdminError(400, f"missing {SINGULAR[kind]} id")
            self._changeable(kind, id)
            if catalog.stored(kind, id) is None:
                raise AdminError(404, "Key not found")
            if kind == "upstreams":
                for route in catalog.routes_using(id):
                    raise AdminError(400, f"can not delete this upstream, route [{route}] is still using it now")
            await catalog.change(kind, id, None)
            log.info("Admin API: {client} deleted {kind} {id}", client=client, kind=SINGULAR[kind], id=id)
            return 200, {"deleted": id, "key": _key(kind, id)}
        if method not in ("PUT", "POST", "PATCH"):
            raise AdminError(405, f"not supported `{method}` method for {SINGULAR[kind]}")
        if method == "PATCH":
            if id is None:
                raise AdminError(400, f"missing {SINGULAR[kind]} id")
            if sub_path is None:
                body = _body(request)
                _body_id(kind, id, body)
            else:
                part = _json(request)
                _sub_path_id(kind, id, sub_path, part)
            self._changeable(kind, id)
            old = catalog.stored(kind, id)
            if old is None:
                raise AdminError(404, "Key not found")
            if sub_path is None:
                value = merge(copy.deepcopy(old), body)
            else:  # the value at that path replaced (null: removed), as APISIX's sub-path PATCH
                value = replace_at(copy.deepcopy(old), sub_path, part)
                body = replace_at({}, sub_path, part)  # what the change touched
            if kind == "consumers" and _sets_key(body):
                value["plugins"]["key-auth"].pop("key_sha256", None)  # a new key replaces the old
            created = False
        else:
            body = _body(request)
            if method == "POST":
                if kind == "consumers":
                    raise AdminError(405, "not supported `POST` method for consumer")
                if id is not None:
                    raise AdminError(405, f"not supported `POST` method with an id: PUT /apisix/admin/{kind}/{id}")
                id = os.urandom(8).hex()
            id = _body_id(kind, id, body)
            self._changeable(kind, id)
            value = body
            created = catalog.stored(kind, id) is None
        try:
            value = catalog.validate(kind, id, catalog.dated(kind, id, value))
        except ObjectError as e:
            raise e.about(kind, id) from None
        await catalog.change(kind, id, value)
        action = "created" if created else "patched" if method == "PATCH" else "replaced"
        if sub_path is not None:  # (quoted: its names, a label's say, may hold any character)
            action += " " + json.dumps("/" + "/".join(sub_path)) + " of"
        log.info("Admin API: {client} {action} {kind} {id}", client=client, action=action,
                 kind=SINGULAR[kind], id=id)
        return (201 if created else 200), _item(kind, "api", value)

    def _changeable(self, kind: str, id: str) -> None:
        if self._catalog.is_file_object(kind, id):
            raise AdminError(400, f"{SINGULAR[kind]} [{id}] is defined in {self._catalog.file.path}:"
                                  " it cannot be changed through the Admin API")


def _key(kind: str, id: str) -> str:
    return f"/apisix/{kind}/{id}"


def _item(kind: str, source: str, value: Dict[str, Any]) -> Dict[str, Any]:
    """``{"key", "value", "source"}``: source ``api``, or ``file`` for gw.ini's objects."""
    shown = schema.shown_consumer(value) if kind == "consumers" and source == "api" else value
    id = value.get("username") if kind == "consumers" else value.get("id")
    return {"key": _key(kind, str(id)), "value": shown, "source": source}


def _body(request: IRequest) -> Dict[str, Any]:
    body = _json(request)
    if not isinstance(body, dict):
        raise AdminError(400, "invalid request body: expected a JSON object")
    return body


def _json(request: IRequest) -> Any:
    """The request's body: any JSON value."""
    content = request.content
    content.seek(0)
    data = content.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise AdminError(413, "invalid request body: larger than 1.5 MiB")
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise AdminError(400, "invalid request body: not JSON") from None
    except RecursionError:
        raise AdminError(400, "invalid request body: nested too deep") from None
    try:  # JSON's \uD800-style escapes may leave lone surrogates: not text
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise AdminError(400, "invalid request body: a string holds a lone UTF-16 surrogate") from None
    return body


def _body_id(kind: str, url_id: Optional[str], body: Dict[str, Any]) -> str:
    """The object's id: from the URL, the body (``id``; a consumer's ``username``) or both."""
    field = "username" if kind == "consumers" else "id"
    given = body.get(field)
    if isinstance(given, int) and not isinstance(given, bool) and field == "id":
        given = str(given)
    if given is not None and not isinstance(given, str):
        raise schema.invalid(field, "wrong type: expected string")
    if url_id is not None and given is not None and given != url_id:
        raise AdminError(400, f"wrong {SINGULAR[kind]} {'username' if field == 'username' else 'id'}")
    id = url_id if url_id is not None else given
    if id is None:
        raise AdminError(400, f"missing {SINGULAR[kind]} {field}")
    if not schema.ID.fullmatch(id):
        raise schema.invalid(field, f"{id[:80]!r} does not match [A-Za-z0-9._-]{{1,64}}")
    body.pop(field, None)
    return id


def _sub_path_id(kind: str, id: str, sub_path: List[str], value: Any) -> None:
    """A sub-path PATCH may not change the object's id (a consumer's username)."""
    if any(not name for name in sub_path):
        raise AdminError(400, f"invalid sub-path: /{'/'.join(sub_path)} (an empty name)")
    field = "username" if kind == "consumers" else "id"
    if sub_path[0] == field and (len(sub_path) > 1 or value != id):
        raise AdminError(400, f"wrong {SINGULAR[kind]} {field}")


def replace_at(target: Dict[str, Any], path: List[str], value: Any) -> Dict[str, Any]:
    """``target`` with the value at ``path`` (names of nested objects) set to ``value``
    (None: removed); missing objects on the way are made (none to remove from)."""
    node = target
    for number, name in enumerate(path[:-1]):
        child = node.get(name)
        if child is None:
            if value is None:
                return target
            child = node[name] = {}
        if not isinstance(child, dict):
            raise AdminError(400, f"invalid sub-path: /{'/'.join(path[:number + 1])} is not an object")
        node = child
    if value is None:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = copy.deepcopy(value)
    return target


def _sets_key(patch: Dict[str, Any]) -> bool:
    plugins = patch.get("plugins")
    auth = plugins.get("key-auth") if isinstance(plugins, dict) else None
    return isinstance(auth, dict) and auth.get("key") is not None


def merge(target: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7396): objects merge, ``null`` removes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = merge(merged.get(name), value)
    return merged


class AdminSite(Site):
    """The Admin API's Site: requests are not logged by Twisted (a query string may
    hold the admin key); the resource logs every change itself."""

    noisy = False

    def log(self, request: Any) -> None:
        pass
