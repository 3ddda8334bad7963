"""The Redis client and the limit stores against a real redis-server (Debian's) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.trial import unittest

from zope.interface.verify import verifyObject

from openaigw.errors import StateUnavailable
from openaigw.interfaces import IConcurrency, ILeakyBuckets, IWindowCounters
from openaigw.redis_counters import RedisConcurrency, RedisLeakyBuckets, RedisWindowCounters
from openaigw.redisclient import RedisClient, RedisError, RedisUnavailable, Script, parse_url
from openaigw.config import parse
from openaigw.state import build_runtime
from openaigw.testing import RedisServer, free_port, make_test_ca

CANARY = "canary-redis-pw-5e21"


def sleep(seconds: float) -> "Deferred[None]":
    return deferLater(reactor, seconds, lambda: None)


async def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await sleep(0.02)


class RedisTestCase(unittest.TestCase):
    """A redis-server with a password for each test, and a client of it."""

    password: Any = CANARY
    db = 2

    def setUp(self) -> Any:
        if shutil.which("redis-server") is None:
            raise unittest.SkipTest("redis-server is not installed (make test installs it)")
        self.server = RedisServer(tempfile.mkdtemp(prefix="openaigw-redis-"), self.password)
        self.server.extra = self.redis_conf()
        self.server.start()
        self.addCleanup(self.server.stop)
        self.addCleanup(shutil.rmtree, self.server.directory, True)
        self.client = self.connect(self.server.url.replace("/0", f"/{self.db}"))
        return Deferred.fromCoroutine(until(lambda: self.client.available))

    def redis_conf(self) -> str:
        """More redis.conf lines."""
        return ""

    def connect(self, url: str, timeout: float = 0.25) -> RedisClient:
        client = RedisClient(reactor, parse_url(url), timeout)
        client.start()
        self.addCleanup(client.close)
        return client


class ClientTests(RedisTestCase):
    async def _commands(self) -> None:
        client = self.client
        value = bytes(range(256)) * 4000  # binary, over many reads
        self.assertEqual(await client.execute("SET", "openaigw:test:bin", value, "PX", 60000), b"OK")
        self.assertEqual(await client.execute("GET", "openaigw:test:bin"), value)
        replies = await Deferred.fromCoroutine(self._many(client))
        self.assertEqual(replies, list(range(1, 201)))
        with self.assertRaises(RedisError):
            await client.execute("LPUSH", "openaigw:test:bin", "x")
        self.assertEqual(await client.execute("CLIENT", "INFO") and await client.execute("PING"), b"PONG")
        # SELECT 2 took effect: db 0 has no key
        self.assertEqual(self.server.command("EXISTS", "openaigw:test:bin"), b":0\r\n")

    async def _many(self, client: RedisClient) -> list:
        waiting = [client.execute("INCR", "openaigw:test:n") for _ in range(200)]  # pipelined
        return [await d for d in waiting]

    def test_commands(self) -> Any:
        """Binary values, 200 pipelined commands in order, error replies, SELECT."""
        return Deferred.fromCoroutine(self._commands())

    async def _scripts(self) -> None:
        script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        self.assertEqual(await self.client.evalsha(script, ["openaigw:test:s"], [5]), 5)
        self.server.command("SCRIPT", "FLUSH")
        self.assertEqual(await self.client.evalsha(script, ["openaigw:test:s"], [2]), 7)

    def test_noscript_reload(self) -> Any:
        """A flushed script cache: EVALSHA loads the script again and runs it."""
        return Deferred.fromCoroutine(self._scripts())

    async def _wrong_password(self) -> None:
        client = self.connect(self.server.url.replace(CANARY, "not-the-password"))
        await sleep(0.3)
        self.assertFalse(client.available)
        with self.assertRaises(RedisUnavailable):
            await client.execute("PING")

    def test_wrong_password(self) -> Any:
        """A refused password: unavailable, commands fail at once."""
        return Deferred.fromCoroutine(self._wrong_password())

    async def _restart(self) -> None:
        client = self.client
        self.assertEqual(await client.execute("PING"), b"PONG")
        self.server.stop()
        await until(lambda: not client.available)
        started = time.monotonic()
        with self.assertRaises(RedisUnavailable):
            await client.execute("PING")
        self.assertLess(time.monotonic() - started, 0.1)  # at once, not after a timeout
        self.server.start()
        await until(lambda: client.available, timeout=5)
        self.assertEqual(await client.execute("PING"), b"PONG")

    async def _stalled(self) -> None:
        client = self.client
        self.assertEqual(await client.execute("PING"), b"PONG")
        os.kill(self.server.proc.pid, signal.SIGSTOP)  # alive, but answering nothing
        try:
            started = time.monotonic()
            with self.assertRaises(RedisUnavailable):
                await client.execute("PING")
            self.assertLess(time.monotonic() - started, 2)  # the timeout (0.25 s), not a hang
            self.assertFalse(client.available)
            with self.assertRaises(RedisUnavailable):
                await client.execute("PING")
        finally:
            os.kill(self.server.proc.pid, signal.SIGCONT)
        await until(lambda: client.available, timeout=10)
        self.assertEqual(await client.execute("PING"), b"PONG")

    def test_stalled_server(self) -> Any:
        """redis-server stopped (SIGSTOP): commands fail after state_timeout, and the
        client is available again once it runs on."""
        return Deferred.fromCoroutine(self._stalled())

    def test_restart(self) -> Any:
        """redis-server stopped: commands fail at once; started again: the client reconnects."""
        return Deferred.fromCoroutine(self._restart())


class UnixSocketTests(RedisTestCase):
    password = None

    def redis_conf(self) -> str:
        self.path = f"{self.server.directory}/redis.sock"
        return f"unixsocket {self.path}\n"

    async def _unix(self) -> None:
        client = self.connect(f"unix://{self.path}?db=1")
        await until(lambda: client.available)
        self.assertEqual(await client.execute("SET", "k", "v"), b"OK")
        self.assertEqual(self.server.command("EXISTS", "k"), b":0\r\n")  # db 0

    def test_unix_socket(self) -> Any:
        """unix:///path?db=N connects over the socket and selects the database."""
        return Deferred.fromCoroutine(self._unix())


class StoreTests(RedisTestCase):
    """The limit stores' Lua scripts on a real Redis."""

    password = None
    db = 0

    async def _windows(self) -> None:
        counters = RedisWindowCounters(self.client, reactor)
        verifyObject(IWindowCounters, counters)
        count, reset = await counters.add("limit-count/route:r|addr=1.2.3.4", 60, 1)
        self.assertEqual(count, 1)
        self.assertTrue(0 < reset <= 60)
        self.assertEqual((await counters.add("limit-count/route:r|addr=1.2.3.4", 60, 4))[0], 5)
        self.assertEqual((await counters.peek("limit-count/route:r|addr=1.2.3.4", 60))[0], 5)
        self.assertEqual((await counters.peek("limit-count/route:r|addr=9.9.9.9", 60))[0], 0)
        ttl = int(self.server.command("PTTL", "openaigw:limit-count/route:r|addr=1.2.3.4:60")[1:-2])
        self.assertTrue(0 < ttl <= 61000)  # expires with its window
        self.assertEqual(self.server.command("EXISTS", "openaigw:limit-count/route:r|addr=9.9.9.9:60"), b":0\r\n")
        count, reset = await counters.add("k", 1, 1)  # a 1 s window: the next one starts afresh
        await sleep(reset + 0.05)
        self.assertEqual((await counters.add("k", 1, 1))[0], 1)

    def test_window_counters(self) -> Any:
        """Counts add up within a window, keys expire with it, peeks write nothing."""
        return Deferred.fromCoroutine(self._windows())

    async def _buckets(self) -> None:
        buckets = RedisLeakyBuckets(self.client, reactor)
        verifyObject(ILeakyBuckets, buckets)
        taken = [await buckets.take("limit-req/route:r", 5, 2) for _ in range(3)]
        self.assertEqual([t[0] for t in taken], [True, True, True])
        self.assertLess(abs(taken[0][1] - 0.0), 0.02)
        self.assertLess(abs(taken[2][1] - 0.4), 0.1)
        admitted, retry_after = await buckets.take("limit-req/route:r", 5, 2)
        self.assertFalse(admitted)
        self.assertLess(abs(retry_after - 0.2), 0.1)
        await sleep(1.0)  # drained (and expired)
        self.assertEqual((await buckets.take("limit-req/route:r", 5, 2))[0], True)

    def test_leaky_buckets(self) -> Any:
        """rate 5/s burst 2 as the memory store: delays of 0, 0.2, 0.4 s, then rejection."""
        return Deferred.fromCoroutine(self._buckets())

    async def _slots(self) -> None:
        one, other = RedisConcurrency(self.client, reactor, lease=1.5), RedisConcurrency(self.client, reactor)
        verifyObject(IConcurrency, one)
        self.assertTrue(await one.acquire("limit-conn/route:r", 2))
        self.assertTrue(await other.acquire("limit-conn/route:r", 2))
        self.assertFalse(await one.acquire("limit-conn/route:r", 2))  # 2 across both gateways
        await other.release("limit-conn/route:r")
        self.assertTrue(await one.acquire("limit-conn/route:r", 2))
        await sleep(2.0)  # past the lease: renewed while held
        self.assertFalse(await other.acquire("limit-conn/route:r", 2))
        self.server.command("DEL", "openaigw:limit-conn/route:r")  # as a restarted Redis
        # the next renewal puts the slots back
        await until(lambda: self.server.command("ZCARD", "openaigw:limit-conn/route:r") == b":2\r\n")
        await one.release("limit-conn/route:r")
        await one.release("limit-conn/route:r")
        await one.release("limit-conn/route:r")  # more than held: nothing happens
        self.assertEqual(len(one), 0)
        self.assertEqual(self.server.command("EXISTS", "openaigw:limit-conn/route:r"), b":0\r\n")

    def test_concurrency_leases(self) -> Any:
        """Slots count across gateways, are renewed while held, come back after a flush."""
        return Deferred.fromCoroutine(self._slots())

    async def _dead_gateway(self) -> None:
        dead = RedisConcurrency(self.client, reactor, lease=0.5)
        self.assertTrue(await dead.acquire("limit-conn/route:r", 1))
        dead._held.clear()  # the gateway "dies": nobody renews its slot
        alive = RedisConcurrency(self.client, reactor)
        self.assertFalse(await alive.acquire("limit-conn/route:r", 1))
        await sleep(0.6)
        self.assertTrue(await alive.acquire("limit-conn/route:r", 1))
        await alive.release("limit-conn/route:r")

    def test_dead_gateway_slots_expire(self) -> Any:
        """Slots nobody renews are free again once their lease is over."""
        return Deferred.fromCoroutine(self._dead_gateway())

    async def _cancelled(self) -> None:
        gateway, other = RedisConcurrency(self.client, reactor), RedisConcurrency(self.client, reactor)
        self.assertTrue(await gateway.acquire("limit-conn/route:loaded", 1))  # the script is loaded
        await gateway.release("limit-conn/route:loaded")
        waiting = gateway.acquire("limit-conn/route:r", 1)
        waiting.cancel()  # the client left while its slot was being taken
        with self.assertRaises(CancelledError):
            await waiting
        self.assertEqual(len(gateway), 0)
        # Redis took the slot all the same; it is given back, not held for the lease.
        self.assertTrue(await other.acquire("limit-conn/route:r", 1))
        await other.release("limit-conn/route:r")

    def test_cancelled_acquire_gives_its_slot_back(self) -> Any:
        """A request cancelled while its slot is being taken does not hold the slot
        until its lease ends (it is removed right after the script ran)."""
        return Deferred.fromCoroutine(self._cancelled())

    async def _unavailable(self) -> None:
        counters = RedisWindowCounters(self.client, reactor)
        self.server.stop()
        await until(lambda: not self.client.available)
        with self.assertRaises(StateUnavailable):
            await counters.add("k", 60, 1)
        with self.assertRaises(StateUnavailable):
            await RedisConcurrency(self.client, reactor).acquire("k", 1)
        self.server.start()
        await until(lambda: self.client.available)
        self.assertEqual((await counters.add("k", 60, 1))[0], 1)  # a new Redis: scripts loaded again

    def test_unavailable(self) -> Any:
        """Redis gone: StateUnavailable at once; back: the scripts load and run again."""
        return Deferred.fromCoroutine(self._unavailable())


class TLSTests(RedisTestCase):
    """rediss://: verified TLS to redis-server's tls-port."""

    password = CANARY
    db = 0

    def redis_conf(self) -> str:
        self.pki = make_test_ca(tempfile.mkdtemp(prefix="openaigw-pki-"))
        self.addCleanup(shutil.rmtree, self.pki.directory, True)
        self.tls_port = free_port()
        return (f"tls-port {self.tls_port}\ntls-cert-file {self.pki.server_cert}\n"
                f"tls-key-file {self.pki.server_key}\ntls-ca-cert-file {self.pki.ca}\n"
                "tls-auth-clients no\n")

    def gateway(self, lines: str) -> Any:
        text = (f"[gateway]\nstate = rediss://:{CANARY}@127.0.0.1:{self.tls_port}/0\n{lines}\n"
                "[upstream:u]\nscheme = http\nnodes = 10.0.0.1:80\n[route:r]\nuri = /\nupstream = u\n")
        runtime = build_runtime(parse(text, "gw.ini", {}).gateway, reactor)
        runtime.redis.start()
        self.addCleanup(runtime.redis.close)
        return runtime.redis

    async def _verified(self) -> None:
        client = self.gateway(f"state_ca_file = {self.pki.ca}")
        await until(lambda: client.available)
        self.assertEqual(await client.execute("SET", "over-tls", "yes"), b"OK")
        self.assertEqual(self.server.command("GET", "over-tls"), b"$3\r\nyes\r\n")

    def test_verified(self) -> Any:
        """With state_ca_file naming the CA that signed redis-server's certificate: connected."""
        return Deferred.fromCoroutine(self._verified())

    async def _unverified(self) -> None:
        client = self.gateway("")  # the system trust store does not know the test CA
        await sleep(0.5)
        self.assertFalse(client.available)
        with self.assertRaises(RedisUnavailable):
            await client.execute("PING")

    def test_unverified_certificate_refused(self) -> Any:
        """A certificate the trust store does not vouch for: never connected."""
        return Deferred.fromCoroutine(self._unverified())
