"""The Redis client against a real redis-server (Debian's) on 127.0.0.1."""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial import unittest

from openaigw.redisclient import RedisClient, RedisError, RedisUnavailable, Script, parse_url
from openaigw.testing import RedisServer

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
    timeout = 5.0

    def setUp(self) -> Any:
        if shutil.which("redis-server") is None:
            raise unittest.SkipTest("redis-server is not installed (make test installs it)")
        self.server = RedisServer(tempfile.mkdtemp(prefix="openaigw-redis-"), self.password).start()
        self.addCleanup(self.server.stop)
        self.addCleanup(shutil.rmtree, self.server.directory, True)
        self.client = self.connect(self.server.url.replace("/0", "/2"))
        return Deferred.fromCoroutine(until(lambda: self.client.available))

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

    def test_restart(self) -> Any:
        """redis-server stopped: commands fail at once; started again: the client reconnects."""
        return Deferred.fromCoroutine(self._restart())


class UnixSocketTests(RedisTestCase):
    password = None

    async def _unix(self) -> None:
        self.server.stop()
        path = f"{self.server.directory}/redis.sock"
        with open(f"{self.server.directory}/extra.conf", "w") as f:
            f.write(f"unixsocket {path}\n")
        self.server.extra = f"include {self.server.directory}/extra.conf\n"
        self.server.start()
        client = self.connect(f"unix://{path}?db=1")
        await until(lambda: client.available)
        self.assertEqual(await client.execute("SET", "k", "v"), b"OK")
        self.assertEqual(self.server.command("EXISTS", "k"), b":0\r\n")  # db 0

    def test_unix_socket(self) -> Any:
        """unix:///path?db=N connects over the socket and selects the database."""
        return Deferred.fromCoroutine(self._unix())
