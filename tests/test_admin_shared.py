"""The Admin API's objects shared through a real redis-server: two catalogs in one process."""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, List

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from openaigw import config
from openaigw.admin.catalog import Catalog
from openaigw.admin.schema import AdminError
from openaigw.admin.shared import RedisStore
from openaigw.admin.store import MemoryStore
from openaigw.interfaces import ISharedObjectStore
from openaigw.redisclient import RedisClient, parse_url
from openaigw.testing import RedisServer
from tests.test_redis_server import until

GW_INI = """
[gateway]
admin = tcp:port=9180:interface=127.0.0.1
[upstream:{upstream}]
nodes = 127.0.0.1:4443
"""
ROUTE = {"id": "r", "uri": "/x", "upstream_id": "only-a"}


class Gateway:
    """A catalog as a gateway holds it, with what it serves."""

    def __init__(self, redis: RedisClient, upstream: str) -> None:
        self.served: List[Any] = []
        self.catalog = Catalog(config.parse(GW_INI.format(upstream=upstream), "gw.ini", {}), MemoryStore(), {})
        self.catalog.attach(self.prepare, reactor, redis)

    def prepare(self, served: Any, keep_upstreams: bool) -> Any:
        return lambda: self.served.append(served)

    def routes(self) -> List[str]:
        return [route.name for route in self.catalog.config.routes]

    def put(self, id: str, value: dict) -> "Deferred[None]":
        return self.catalog.change("routes", id, self.catalog.dated("routes", id, value))


class SharedTests(unittest.TestCase):
    timeout = 20.0

    def setUp(self) -> Any:
        if shutil.which("redis-server") is None:
            raise unittest.SkipTest("redis-server is not installed (make test installs it)")
        self.server = RedisServer(tempfile.mkdtemp(prefix="openaigw-admin-redis-")).start()
        self.addCleanup(self.server.stop)
        self.addCleanup(shutil.rmtree, self.server.directory, True)
        self.clients = []
        for _ in range(2):
            client = RedisClient(reactor, parse_url(self.server.url), timeout=2)
            client.start()
            self.addCleanup(client.close)
            self.clients.append(client)
        return Deferred.fromCoroutine(until(lambda: all(c.available for c in self.clients)))

    async def _in_step(self) -> None:
        a, b = Gateway(self.clients[0], "only-a"), Gateway(self.clients[1], "only-a")
        verifyObject(ISharedObjectStore, a.catalog._store)
        self.assertIsInstance(a.catalog._store, RedisStore)
        await a.catalog._sync()  # seeds the empty Redis
        await b.catalog._sync()
        await a.put("r", ROUTE)
        await b.catalog._sync()
        self.assertEqual(b.routes(), ["r"])
        self.assertEqual(len(b.served), 1)
        # b changes again before a saw it: a's change is a 409 and changes nothing
        await b.put("r2", {**ROUTE, "uri": "/y"})
        with self.assertRaises(AdminError) as caught:
            await a.put("r3", {**ROUTE, "uri": "/z"})
        self.assertEqual(caught.exception.status, 409)
        self.assertEqual(a.routes(), ["r"])
        await a.catalog._sync()
        await a.put("r3", {**ROUTE, "uri": "/z"})
        await b.catalog._sync()
        self.assertEqual(sorted(b.routes()), ["r", "r2", "r3"])
        self.assertEqual(b.catalog._store._local.load()["routes"].keys(), {"r", "r2", "r3"})  # last good copy

    def test_changes_reach_the_other_gateway_and_conflicts_are_409(self) -> Any:
        """A change on one catalog is served by the other after its sync; a change built on
        an old revision is refused with 409 and nothing changes."""
        return Deferred.fromCoroutine(self._in_step())

    async def _refused(self) -> None:
        a, b = Gateway(self.clients[0], "only-a"), Gateway(self.clients[1], "only-b")
        refusals: List[str] = []

        def observe(event: Any) -> None:
            if "is refused" in event.get("log_format", ""):
                refusals.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        await a.catalog._sync()
        await b.catalog._sync()
        await b.put("ok", {"uri": "/ok", "upstream_id": "only-b"})
        await a.catalog._sync()  # b's route does not fit a's gw.ini (no upstream only-b)
        await a.catalog._sync()
        self.assertEqual(a.routes(), [])
        self.assertEqual(len(refusals), 1)
        self.assertIn("route [ok]: failed to fetch upstream info by upstream id [only-b]", refusals[0])
        self.assertEqual(a.catalog._store._refused, b.catalog._store.revision)
        with self.assertRaises(AdminError) as caught:  # a is not in step: its changes wait
            await a.put("r", ROUTE)
        self.assertEqual(caught.exception.status, 409)

    def test_objects_that_do_not_fit_are_refused(self) -> Any:
        """Shared objects that do not fit this gateway's gw.ini are refused (logged
        once); it keeps serving the previous ones and cannot change them meanwhile."""
        return Deferred.fromCoroutine(self._refused())

    async def _bad_snapshots(self) -> None:
        a = Gateway(self.clients[0], "only-a")
        logged: List[str] = []

        def observe(event: Any) -> None:
            if event.get("log_level") is not None and event["log_level"].name in ("error", "critical"):
                logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        await a.catalog._sync()
        await a.put("r", ROUTE)
        redis = self.clients[1]
        for snapshot, why in (
            (b'{"routes": {"x": 5}}', "routes [x] is not a JSON object"),
            (b'{"routes": {"x": [1]}}', "routes [x] is not a JSON object"),
            (b"not json", "is not valid JSON"),
        ):
            await redis.execute("SET", b"openaigw:admin:objects", snapshot)
            await redis.execute("INCR", b"openaigw:admin:revision")
            for _ in range(3):  # as every 0.5 s
                await a.catalog._sync()
            self.assertEqual(len(logged), 1, logged)
            self.assertIn(why, logged.pop())
            self.assertEqual(a.routes(), ["r"])
        await redis.execute("SET", b"openaigw:admin:revision", b"seven")
        for _ in range(3):
            await a.catalog._sync()
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("openaigw:admin:revision is not a revision number", logged.pop())
        self.assertEqual(a.routes(), ["r"])

    def test_bad_snapshots_are_logged_once_each(self) -> Any:
        """A snapshot in Redis that is not objects (or a revision that is not a number) is
        refused and logged once, however often it is fetched; the last good objects stay."""
        return Deferred.fromCoroutine(self._bad_snapshots())

    async def _failing_prepare(self) -> None:
        a, b = Gateway(self.clients[0], "only-a"), Gateway(self.clients[1], "only-a")
        logged: List[str] = []

        def observe(event: Any) -> None:
            if event.get("log_level") is not None and event["log_level"].name in ("error", "critical"):
                logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        await a.catalog._sync()
        await b.catalog._sync()

        def broken(served: Any, keep_upstreams: bool) -> Any:
            raise RuntimeError("cannot build it")

        a.catalog._prepare = broken
        await b.put("r", ROUTE)
        for _ in range(3):  # as every 0.5 s
            await a.catalog._sync()
        self.assertEqual(len(logged), 2, logged)  # the refusal, then the traceback, once
        self.assertIn("they could not be applied (cannot build it)", logged[0])
        self.assertIn("applying revision", logged[1])
        self.assertEqual(a.routes(), [])
        self.flushLoggedErrors(RuntimeError)

    def test_a_snapshot_that_cannot_be_applied_is_logged_once(self) -> Any:
        """Objects that pass validation but fail to be built here are refused, with their
        traceback logged once, not every check."""
        return Deferred.fromCoroutine(self._failing_prepare())
