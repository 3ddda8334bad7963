"""The Admin API's objects in Redis, shared by every gateway using it (``state = redis://``).

Redis holds one JSON snapshot of all objects and a revision number.  A change is
written with a compare-and-set on the revision, so two gateways never both build on
the same revision; each gateway checks the revision twice a second and applies a newer
snapshot (after validating it against its own gw.ini).  The local store
(``admin_state``, or memory) keeps the last good snapshot: a Redis outage never drops
a route, and a restart during one serves what was last seen.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from openaigw.admin.store import KINDS, Objects, StoreError, encode
from openaigw.interfaces import IObjectStore, ISharedObjectStore
from openaigw.redisclient import RedisError, RedisUnavailable, Script

log = Logger()
OBJECTS = b"openaigw:admin:objects"
REVISION = b"openaigw:admin:revision"
INTERVAL = 0.5  # seconds between checks of the revision

# Replace the snapshot if the revision is still ARGV[1]; answer {1, new} or {0, current}.
_WRITE = Script("""
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if current ~= tonumber(ARGV[1]) then return {0, current} end
redis.call('SET', KEYS[1], ARGV[2])
return {1, redis.call('INCR', KEYS[2])}
""")


def _decode(blob: bytes) -> Objects:
    """The objects of a snapshot; ValueError saying what is wrong with it."""
    try:
        state = json.loads(blob.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{OBJECTS.decode()} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(kind, {}), dict) for kind in KINDS):
        raise ValueError(f"{OBJECTS.decode()} is not an object of objects by kind")
    for kind in KINDS:
        for id, value in state.get(kind, {}).items():
            if not isinstance(value, dict):
                raise ValueError(f"{OBJECTS.decode()}: {kind} [{id}] is not a JSON object")
    return {kind: state.get(kind, {}) for kind in KINDS}


@implementer(ISharedObjectStore)
class RedisStore:
    """Objects in Redis; ``local`` keeps the last good copy."""

    def __init__(self, redis: Any, local: IObjectStore, objects: Objects, clock: Any) -> None:
        self._redis = redis
        self._local = local
        self._objects = copy.deepcopy(objects)
        self._clock = clock
        self.revision: Optional[int] = None  # Redis's revision of our objects; None: not known yet
        self._refused: Any = None  # the revision that did not fit (logged once), as fetched
        self._call: Any = None

    def load(self) -> Objects:
        return copy.deepcopy(self._objects)

    def put(self, kind: str, id: str, value: Any) -> "Deferred[None]":
        objects = copy.deepcopy(self._objects)
        objects[kind][id] = value
        return Deferred.fromCoroutine(self._write(objects))

    def delete(self, kind: str, id: str) -> "Deferred[None]":
        objects = copy.deepcopy(self._objects)
        objects[kind].pop(id, None)
        return Deferred.fromCoroutine(self._write(objects))

    def replace(self, objects: Objects) -> "Deferred[None]":
        return Deferred.fromCoroutine(self._write(copy.deepcopy(objects)))

    async def _write(self, objects: Objects) -> None:
        if self.revision is None:
            raise StoreError(503, "not in step with Redis yet (or Redis is unavailable)")
        try:
            done, revision = await self._redis.evalsha(_WRITE, [OBJECTS, REVISION],
                                                       [self.revision, encode(objects)])
        except (RedisUnavailable, RedisError) as e:
            raise StoreError(503, f"Redis: {e}") from None
        if not done:
            raise StoreError(409, "another gateway changed the objects meanwhile: send the change again")
        self.revision, self._objects = int(revision), objects
        await self._keep_locally(objects)

    async def _keep_locally(self, objects: Objects) -> None:
        try:
            await self._local.replace(objects)
        except StoreError as e:  # Redis has it: the local copy catches up next time
            log.error("Admin API: cannot keep the local copy of the shared objects: {error}", error=str(e))

    def start(self, sync: Any) -> None:
        def again() -> None:
            done = sync()
            done.addErrback(lambda f: log.failure("Admin API: synchronising with Redis failed", f))
            done.addBoth(lambda _: self._schedule(again))

        self._schedule(again, 0)

    def _schedule(self, again: Any, delay: float = INTERVAL) -> None:
        if self._call is not False:
            self._call = self._clock.callLater(delay, again)

    def stop(self) -> None:
        if self._call and self._call.active():
            self._call.cancel()
        self._call = False

    async def fetch(self) -> Optional[Tuple[Objects, int]]:
        """A newer snapshot from Redis, or None (none, the same revision, or Redis is
        unavailable: the outage is logged by the client).  An empty Redis is given
        our objects."""
        try:
            blob, revision = await self._redis.execute("MGET", OBJECTS, REVISION)
        except (RedisUnavailable, RedisError):
            return None
        if revision is not None and not revision.isdigit():
            self.refuse(revision.decode("latin-1"), f"{REVISION.decode()} is not a revision number")
            return None
        current = int(revision or 0)
        if current == self.revision or current == self._refused:
            return None
        if blob is None:  # a new (or flushed) Redis: ours become the shared objects
            self.revision = current
            try:
                await self._write(self._objects)
                log.info("Admin API: this gateway's objects are now the shared ones in Redis")
            except StoreError:
                self.revision = None
            return None
        try:
            return _decode(blob), current
        except ValueError as e:
            self.refuse(current, str(e))
            return None

    def refuse(self, revision: Any, why: str) -> bool:
        """Keep serving the last good objects: revision ``revision`` does not fit (logged
        once for each revision refused; true that first time)."""
        if self._refused == revision:
            return False
        log.error("Admin API: revision {revision} of the shared objects is refused, still"
                  " serving the previous ones: {why}", revision=revision, why=why)
        self._refused = revision
        return True

    async def accept(self, objects: Objects, revision: int) -> None:
        """Revision ``revision`` is served now: keep it as the last good copy."""
        self._objects, self.revision = copy.deepcopy(objects), revision
        await self._keep_locally(objects)
