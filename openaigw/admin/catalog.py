"""The Admin API's objects on top of gw.ini's: each change is validated together with
all the others, kept in the store, then served (the route table is swapped as a SIGHUP
reload swaps it)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from twisted.python.failure import Failure

from openaigw import config as configuration
from openaigw.admin import schema
from openaigw.admin.schema import AdminError
from openaigw.admin.store import KINDS, Objects, StoreError
from openaigw.config import Config, ConfigError, ConsumerConfig, Section, UpstreamConfig
from openaigw.interfaces import IObjectStore, ISharedObjectStore

log = Logger()
SINGULAR = {"routes": "route", "upstreams": "upstream", "consumers": "consumer"}
Prepare = Callable[[Config, bool], Callable[[], None]]


class ObjectError(AdminError):
    """An error in one of the Admin API's objects (which may not be the one changed)."""

    def __init__(self, kind: str, id: str, error: AdminError) -> None:
        super().__init__(error.status, error.message)
        self.kind = kind
        self.id = id

    def about(self, kind: str, id: str) -> AdminError:
        """The error as answered to a change of ``kind``/``id``: named when it is another object's."""
        if (kind, id) == (self.kind, self.id):
            return AdminError(self.status, self.message)
        return AdminError(self.status, f"{SINGULAR[self.kind]} [{self.id}]: {self.message}")


def file_ids(file: Config) -> Dict[str, Tuple[str, ...]]:
    """The ids gw.ini's own objects take, by kind."""
    return {
        "routes": tuple(route.name for route in file.routes),
        "upstreams": tuple(file.upstreams),
        "consumers": tuple(consumer.name for consumer in file.consumers),
    }


def combine(file: Config, objects: Objects, environ: Mapping[str, str]) -> Config:
    """gw.ini's configuration with the Admin API's objects added, validated as a whole."""
    taken = file_ids(file)
    for kind in KINDS:
        for id in objects[kind]:
            if id in taken[kind]:
                raise ObjectError(kind, id, AdminError(
                    400, f"{SINGULAR[kind]} [{id}] is defined in {file.path}: change it there"))

    def checked(kind: str, id: str, make: Callable[[], Any]) -> Any:
        try:
            return make()
        except AdminError as e:
            raise ObjectError(kind, id, e) from None

    upstreams: Dict[str, UpstreamConfig] = dict(file.upstreams)
    for id, value in objects["upstreams"].items():
        upstreams[id] = checked("upstreams", id, lambda: schema.upstream(id, value, environ))
    names = taken["consumers"] + tuple(objects["consumers"])
    consumers: List[ConsumerConfig] = list(file.consumers)
    owners = {consumer.key_digest: consumer.name for consumer in consumers}
    for id, value in objects["consumers"].items():
        consumer = checked("consumers", id, lambda: schema.consumer(id, value, names, environ))
        if consumer.key_digest in owners:
            raise ObjectError("consumers", id, AdminError(
                400, f"consumer [{owners[consumer.key_digest]}] has the same key"))
        owners[consumer.key_digest] = id
        consumers.append(consumer)
    routes = list(file.routes)
    # gw.ini's routes do not overlap each other: an overlap is an API route's error.
    sections = [Section(file.path, f"route:{route.name}", {}, environ) for route in routes]
    inline: Dict[str, UpstreamConfig] = {}
    for id, value in objects["routes"].items():
        route, own, section = checked("routes", id, lambda: schema.route(id, value, upstreams, names, environ))
        if value.get("status", 1) == 0:
            continue  # disabled: validated, not served
        routes.append(route)
        sections.append(section)
        if own is not None:
            if own.name in upstreams:
                raise ObjectError("routes", id, AdminError(
                    400, f"the inline upstream's name {own.name} is taken by [upstream:{own.name}]"))
            inline[own.name] = own
    try:
        configuration.check_overlaps(tuple(routes), sections)
    except ConfigError as e:
        raise AdminError(400, str(e)) from None
    return dataclasses.replace(file, upstreams={**upstreams, **inline}, routes=tuple(routes),
                               consumers=tuple(consumers))


class Catalog:
    """Every object the gateway serves, from gw.ini and from the Admin API.

    ``config`` is what is served: gw.ini's configuration plus the API's objects.
    Changes (and SIGHUP reloads) take turns: each is validated against the whole,
    built, made durable in the store, then served, before the next begins.
    """

    def __init__(self, file: Config, store: IObjectStore, environ: Optional[Mapping[str, str]] = None) -> None:
        self.file = file
        self._store = store
        self._environ = os.environ if environ is None else environ
        self._objects = store.load()
        try:
            self.config = combine(file, self._objects, self._environ)
        except AdminError as e:
            where = f"{getattr(store, 'path', 'Admin API state')}"
            if isinstance(e, ObjectError):
                where += f": {SINGULAR[e.kind]} [{e.id}]"
            raise ConfigError(f"{where}: {e.message}") from None
        self._lock = DeferredLock()
        self._prepare: Optional[Prepare] = None
        self._clock: Any = None

    def attach(self, prepare: Prepare, clock: Any, redis: Any = None) -> None:
        """``prepare(config, keep_upstreams)`` builds what serves ``config`` and returns
        the function that swaps it in; ``clock`` dates the changes.  With ``redis`` (a RedisClient)
        the objects are shared through it, the store keeping the last good copy."""
        self._prepare = prepare
        self._clock = clock
        if redis is not None:
            from openaigw.admin.shared import RedisStore

            self._store = RedisStore(redis, self._store, self._objects, clock)

    def start(self) -> None:
        """Follow the changes other gateways make (with a shared store)."""
        if ISharedObjectStore.providedBy(self._store):
            self._store.start(lambda: Deferred.fromCoroutine(self._sync()))

    def stop(self) -> None:
        if ISharedObjectStore.providedBy(self._store):
            self._store.stop()

    async def _sync(self) -> None:
        """Serve the shared objects if they changed (and fit gw.ini)."""
        await self._lock.acquire()
        try:
            store = self._store
            update = await store.fetch()
            if update is None:
                return
            objects, revision = update
            if objects != self._objects:
                try:
                    config = combine(self.file, objects, self._environ)
                    commit = self._prepare(config, True)
                except AdminError as e:
                    where = f"{SINGULAR[e.kind]} [{e.id}]: " if isinstance(e, ObjectError) else ""
                    store.refuse(revision, where + e.message)
                    return
                except Exception:  # not the objects' fault: a bug, shown once, not every check
                    failure = Failure()
                    if store.refuse(revision, f"they could not be applied ({failure.getErrorMessage()})"):
                        log.failure("Admin API: applying revision {revision} failed", failure, revision=revision)
                    return
                self._objects, self.config = objects, config
                commit()
                log.info("Admin API: serving revision {revision} of the shared objects", revision=revision)
            await store.accept(objects, revision)
        finally:
            self._lock.release()

    @property
    def admin_key(self) -> Optional[str]:
        return self.file.gateway.admin_key

    def get(self, kind: str, id: str) -> Optional[Tuple[str, Dict[str, Any]]]:
        """``(source, value)`` for an object: source ``api`` or ``file``."""
        if id in self._objects[kind]:
            return "api", self._objects[kind][id]
        shown = _file_objects(self.file, kind).get(id)
        return None if shown is None else ("file", shown)

    def list(self, kind: str) -> List[Tuple[str, Dict[str, Any]]]:
        everything = {id: ("file", value) for id, value in _file_objects(self.file, kind).items()}
        everything.update({id: ("api", value) for id, value in self._objects[kind].items()})
        return [everything[id] for id in sorted(everything)]

    def is_file_object(self, kind: str, id: str) -> bool:
        return id in file_ids(self.file)[kind]

    def stored(self, kind: str, id: str) -> Optional[Dict[str, Any]]:
        return self._objects[kind].get(id)

    def routes_using(self, upstream_id: str) -> List[str]:
        """The API's routes calling ``upstream_id`` (first, or as a fallback)."""
        return sorted(id for id, value in self._objects["routes"].items()
                      if upstream_id == value.get("upstream_id") or upstream_id in value.get("fallback", ()))

    def validate(self, kind: str, id: str, value: Dict[str, Any]) -> Dict[str, Any]:
        """``value`` checked on its own, in the form it is kept (a consumer's key hashed)."""
        if kind == "consumers":
            names = file_ids(self.file)["consumers"] + tuple(self._objects["consumers"])
            try:
                parsed = schema.consumer(id, value, names, self._environ)
            except AdminError as e:
                raise ObjectError(kind, id, e) from None
            value = schema.stored_consumer(value, parsed)
        return value

    def dated(self, kind: str, id: str, value: Dict[str, Any]) -> Dict[str, Any]:
        """``value`` with its id and create/update times (the creation time kept)."""
        now = int(self._clock.seconds())
        old = self._objects[kind].get(id, {})
        named = {"username": id} if kind == "consumers" else {"id": id}
        rest = {k: v for k, v in value.items() if k not in ("create_time", "update_time")}
        return {**rest, **named, "create_time": old.get("create_time", now), "update_time": now}

    def change(self, kind: str, id: str, value: Optional[Dict[str, Any]]) -> "Deferred[None]":
        """Validate the objects with ``kind``/``id`` set to ``value`` (None: deleted),
        keep the change, then serve it; fails with an :class:`AdminError` (nothing changed)."""
        return Deferred.fromCoroutine(self._change(kind, id, value))

    async def _change(self, kind: str, id: str, value: Optional[Dict[str, Any]]) -> None:
        assert self._prepare is not None
        await self._lock.acquire()
        try:
            objects = {k: dict(v) for k, v in self._objects.items()}
            if value is None:
                objects[kind].pop(id, None)
            else:
                objects[kind][id] = value
            try:
                config = combine(self.file, objects, self._environ)
            except ObjectError as e:
                raise e.about(kind, id) from None
            commit = self._prepare(config, True)
            try:
                if value is None:
                    await self._store.delete(kind, id)
                else:
                    await self._store.put(kind, id, value)
            except StoreError as e:
                log.error("Admin API: cannot keep a change: {error}", error=e.message)
                raise AdminError(e.status, f"the change could not be saved ({e.message}); nothing changed") from None
            self._objects, self.config = objects, config
            commit()
        finally:
            self._lock.release()

    def reload(self, file: Config) -> "Deferred[bool]":
        """Serve a new gw.ini with the API's objects; refused (False) if they no longer fit it."""
        return Deferred.fromCoroutine(self._reload(file))

    async def _reload(self, file: Config) -> bool:
        assert self._prepare is not None
        await self._lock.acquire()
        try:
            try:
                config = combine(file, self._objects, self._environ)
            except AdminError as e:
                where = f"{SINGULAR[e.kind]} [{e.id}] of the Admin API: " if isinstance(e, ObjectError) else ""
                log.error("reload refused, still serving the previous configuration: {error}",
                          error=f"{where}{e.message}")
                return False
            try:
                commit = self._prepare(config, False)
            except Exception:
                log.failure("reload failed, still serving the previous configuration")
                return False
            self.file, self.config = file, config
            commit()
            return True
        finally:
            self._lock.release()


def _file_objects(file: Config, kind: str) -> Dict[str, Dict[str, Any]]:
    """gw.ini's objects as the Admin API shows them: what they are, never their
    settings (plugin settings may hold resolved secrets)."""
    if kind == "upstreams":
        return {name: _shown_upstream(u) for name, u in file.upstreams.items()}
    if kind == "routes":
        shown = {}
        for route in file.routes:
            value: Dict[str, Any] = {"id": route.name, "uris": list(route.uris), "upstream_id": route.upstream}
            if route.methods is not None:
                value["methods"] = sorted(route.methods)
            if route.hosts is not None:
                value["hosts"] = list(route.hosts)
            if route.priority:
                value["priority"] = route.priority
            value["plugins"] = {plugin.name: {} for plugin in route.plugins}
            shown[route.name] = value
        return shown
    return {c.name: {"username": c.name, "plugins": {p.name: {} for p in c.plugins}} for c in file.consumers}


def _shown_upstream(upstream: UpstreamConfig) -> Dict[str, Any]:
    value: Dict[str, Any] = {
        "id": upstream.name, "type": upstream.type, "scheme": upstream.scheme,
        "nodes": [{"host": n.host, "port": n.port, "weight": n.weight} for n in upstream.nodes],
        "pass_host": upstream.pass_host,
        "timeout": {"connect": upstream.timeout_connect, "read": upstream.timeout_read},
        "retries": upstream.retries,
        "keepalive_pool": {"size": upstream.keepalive_pool, "idle_timeout": upstream.keepalive_timeout},
    }
    if upstream.upstream_host is not None:
        value["upstream_host"] = upstream.upstream_host
    return value
