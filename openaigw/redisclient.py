"""A small Redis client for Twisted: one connection, pipelined commands, Lua scripts.

Commands go out as soon as they are made and are answered in order (a FIFO of
Deferreds); replies are parsed by hiredis's C ``Reader``.  Each command has a timeout:
an answer later than ``timeout`` seconds fails the command with
:class:`RedisUnavailable`, and if nothing at all came back meanwhile the connection is
taken as dead and made anew.  While there is no connection, or a command timed out
and Redis has not answered a PING in time since, commands fail at once (never
queued): callers decide what an unavailable Redis means.  The client connects
by itself (AUTH and SELECT first), and reconnects with a back-off until :meth:`close`.

Use from other modules::

    client = RedisClient(reactor, parse_url("redis://127.0.0.1:6379/0"), timeout=0.25)
    client.start()
    value = await client.execute("GET", b"openaigw:cache:...")   # bytes, int, list, None
    script = Script("return redis.call('INCR', KEYS[1])")
    count = await client.evalsha(script, [b"openaigw:x"], [])     # EVALSHA, loads on NOSCRIPT
    client.available   # connected, and the last command did not time out

Errors: :class:`RedisError` (Redis answered an error), :class:`RedisUnavailable` (no
connection, or no answer in time).  Neither ever holds the password.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, List, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from twisted.internet.defer import Deferred, succeed
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()
Arg = Union[bytes, str, int, float]
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0
_CONNECT_TIMEOUT = 5.0
_LASTED = 5.0  # a connection up this long was a good one: the back-off starts again


class RedisError(Exception):
    """Redis answered the command with an error (``NOSCRIPT ...``, ``WRONGTYPE ...``)."""


class RedisUnavailable(Exception):
    """No connection to Redis, or no answer within the timeout."""


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is: ``redis://``, ``rediss://`` (TLS) or ``unix://``, a database
    number and credentials.  ``str()`` and ``repr()`` never show the password."""

    scheme: str  # "redis", "rediss" or "unix"
    host: str = ""
    port: int = 6379
    path: str = ""  # the socket, for unix://
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)

    def __str__(self) -> str:
        where = f"unix://{self.path}?db={self.db}" if self.scheme == "unix" else (
            f"{self.scheme}://{'[' + self.host + ']' if ':' in self.host else self.host}:{self.port}/{self.db}"
        )
        return where


def parse_url(url: str, resolve: Callable[[str], str] = lambda text: text) -> RedisAddress:
    """``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://...`` or
    ``unix://[[USER]:PASSWORD@]/path/redis.sock[?db=N]``.

    ``resolve`` replaces secret references (``:$CREDENTIAL://redis_password@``): the
    password it returns is taken as it is, a password written in the URL is
    percent-decoded.  A ``ValueError`` says what is wrong without quoting the URL (it
    may hold the password).
    """
    scheme, sep, rest = url.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected memory, redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix:///PATH?db=N")
    userinfo, at, rest = rest.rpartition("@")
    username = password = None
    if at:
        if ":" not in userinfo:
            raise ValueError("write the password as :PASSWORD@ (or USER:PASSWORD@) before the host")
        user, _, secret = userinfo.partition(":")
        resolved = resolve(secret)
        password = resolved if resolved != secret else unquote(secret)
        username = unquote(resolve(user)) or None
        if not password:
            raise ValueError("the password is empty")
    try:
        parts = urlsplit(f"{scheme}://{resolve(rest)}")
        port = parts.port
    except ValueError:
        raise ValueError("not a redis://HOST:PORT/DB, rediss://... or unix:///PATH URL (bad port or host)") from None
    if scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError("a unix socket is written unix:///path/to/redis.sock?db=N")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = set(query) - {"db"}
        if unknown:
            raise ValueError(f"unknown URL parameter(s): {', '.join(sorted(unknown))} (known: db)")
        db = _db(query.get("db", ["0"])[-1])
        return RedisAddress("unix", path=parts.path, db=db, username=username, password=password)
    if not parts.hostname:
        raise ValueError("the URL names no host")
    if parts.query or parts.fragment:
        raise ValueError("redis:// and rediss:// URLs take no parameters (the database is the path: /DB)")
    return RedisAddress(
        scheme, host=parts.hostname, port=port or 6379, db=_db(parts.path.strip("/") or "0"),
        username=username, password=password,
    )


def _db(text: str) -> int:
    if not text.isdigit() or int(text) > 1 << 16:
        raise ValueError("the database must be a number (redis://HOST:PORT/DB, unix:///PATH?db=N)")
    return int(text)


class Script:
    """A Lua script, run by SHA-1 (EVALSHA); Redis is given its source when it lacks it."""

    def __init__(self, source: str) -> None:
        self.source = source.encode("utf-8")
        self.sha1 = hashlib.sha1(self.source).hexdigest().encode("ascii")


def encode(args: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode("utf-8")
        elif isinstance(arg, int):
            arg = b"%d" % arg
        elif isinstance(arg, float):
            arg = repr(arg).encode("ascii")
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class RedisProtocol(Protocol):
    """One connection: commands written at once, replies matched in order.

    ``timeout`` seconds after it was sent, a command not yet answered fails with
    RedisUnavailable (its reply, if it comes later, is dropped); if nothing at all
    came back in that time, the connection is aborted.
    """

    def __init__(self, clock: Any, timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout
        self._reader = hiredis.Reader()
        self._pending: Deque[Tuple[float, "Deferred[Any]"]] = deque()  # (deadline, waiting)
        self._timer: Any = None
        self._received = 0.0  # when data last came
        self.lost: "Deferred[None]" = Deferred()  # fires when the connection is gone

    def execute(self, *args: Arg) -> "Deferred[Any]":
        """Send one command; the Deferred fires with its reply."""
        return self.pipeline([args])[0]

    def pipeline(self, commands: Sequence[Sequence[Arg]]) -> "List[Deferred[Any]]":
        """Send several commands in one write; one Deferred per reply, in order."""
        if self.transport is None or self.lost.called:
            return [_failed(RedisUnavailable("no connection to Redis")) for _ in commands]
        deadline = self._clock.seconds() + self._timeout
        waiting = []
        for _ in commands:
            d: "Deferred[Any]" = Deferred()
            self._pending.append((deadline, d))
            waiting.append(d)
        self.transport.write(b"".join(encode(c) for c in commands))
        if self._timer is None:
            self._timer = self._clock.callLater(self._timeout, self._expire)
        return waiting

    def dataReceived(self, data: bytes) -> None:
        self._received = self._clock.seconds()
        self._reader.feed(data)
        pending = self._pending
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError:
                log.error("Redis sent a reply that is not RESP: closing the connection")
                self.transport.abortConnection()
                return
            if reply is False:
                return
            if not pending:
                log.error("Redis sent a reply to no command: closing the connection")
                self.transport.abortConnection()
                return
            _, d = pending.popleft()
            if d.called:  # timed out or cancelled already
                continue
            if isinstance(reply, hiredis.ReplyError):
                d.errback(RedisError(str(reply)))
            else:
                d.callback(reply)

    def _expire(self) -> None:
        """Fail the commands whose time is up; abort a connection that went silent."""
        self._timer = None
        now = self._clock.seconds()
        pending = self._pending
        expired = []
        for deadline, d in pending:
            if deadline > now:
                break
            if not d.called:
                expired.append((deadline, d))
        # Silent: nothing at all came back since the oldest of them was sent.
        silent = bool(expired) and self._received <= expired[0][0] - self._timeout
        if silent and self.transport is not None:
            self.transport.abortConnection()  # connectionLost fails them all
        for _, d in expired:
            if not d.called:
                d.errback(RedisUnavailable(f"no answer from Redis within {self._timeout:g}s"))
        if silent:
            return
        for deadline, d in pending:
            if not d.called:
                self._timer = self._clock.callLater(max(0.0, deadline - now), self._expire)
                break

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending, self._pending = self._pending, deque()
        for _, d in pending:
            if not d.called:
                d.errback(RedisUnavailable("the connection to Redis was lost"))
        if not self.lost.called:
            self.lost.callback(None)


def _failed(error: Exception) -> "Deferred[Any]":
    d: "Deferred[Any]" = Deferred()
    d.errback(error)
    return d


class RedisClient:
    """A Redis connection kept up: connects (AUTH, SELECT), reconnects with a back-off
    (0.05 s doubling to 2 s; from 0.05 s again once a connection had lasted 5 s), and
    tells ``watchers`` when Redis becomes unavailable or available again.  An outage is
    logged once, when it starts, and once when it ends.

    Each wait is a random part of the back-off, from half of it to all of it (by
    ``jitter()``, a draw in [0, 1): 0 waits it all): gateways and workers that lost the
    same Redis at once do not all come back to it in the same instant.
    """

    def __init__(
        self,
        reactor: Any,
        address: RedisAddress,
        timeout: float = 0.25,
        tls_options: Any = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._reactor = reactor
        self._jitter = jitter
        self.address = address
        self.timeout = timeout
        self._tls_options = tls_options
        self._protocol: Optional[RedisProtocol] = None
        self._connecting: Optional["Deferred[Any]"] = None
        self._retry: Any = None  # the next connection attempt
        self._probing: Any = None  # the next PING of a connection that timed out
        self._probe_wait = _BACKOFF_FIRST  # before the PING after one that was late
        self._backoff = _BACKOFF_FIRST
        self._up_since = 0.0
        self._closed = False
        self._started = False
        self.available = False
        self._down_since: Optional[float] = None
        self.watchers: List[Callable[[bool], None]] = []

    # --- the connection -------------------------------------------------------------

    def _endpoint(self) -> Any:
        a = self.address
        if a.scheme == "unix":
            return UNIXClientEndpoint(self._reactor, a.path, timeout=_CONNECT_TIMEOUT)
        if isIPAddress(a.host):  # no name to resolve
            endpoint = TCP4ClientEndpoint(self._reactor, a.host, a.port, timeout=_CONNECT_TIMEOUT)
        elif isIPv6Address(a.host):
            endpoint = TCP6ClientEndpoint(self._reactor, a.host, a.port, timeout=_CONNECT_TIMEOUT)
        else:
            endpoint = HostnameEndpoint(self._reactor, a.host, a.port, timeout=_CONNECT_TIMEOUT)
        if a.scheme == "rediss":
            from twisted.internet.ssl import optionsForClientTLS

            # Verified: the host's name (or address) against the system trust store,
            # unless the caller gives its own options (a CA of its own).
            endpoint = wrapClientTLS(self._tls_options or optionsForClientTLS(a.host), endpoint)
        return endpoint

    def start(self) -> None:
        """Connect (in the background); idempotent."""
        if not self._started:
            self._started = True
            self._connect()

    def _connect(self) -> None:
        self._retry = None
        if self._closed:
            return
        factory = Factory.forProtocol(lambda: RedisProtocol(self._reactor, self.timeout))
        factory.noisy = False  # no "Starting factory" line per attempt
        self._connecting = connecting = self._endpoint().connect(factory)
        connecting.addCallback(self._handshake)
        connecting.addCallbacks(self._connected, self._connect_failed)

    async def _handshake_steps(self, protocol: RedisProtocol) -> RedisProtocol:
        a = self.address
        commands: List[Sequence[Arg]] = []
        if a.password is not None:
            commands.append(("AUTH", a.username, a.password) if a.username else ("AUTH", a.password))
        if a.db:
            commands.append(("SELECT", a.db))
        commands.append(("PING",))
        first: Optional[Exception] = None
        for waiting in protocol.pipeline(commands):
            try:
                await waiting
            except Exception as e:  # WRONGPASS, then NOAUTH for the rest
                first = first or e
        if first is not None:
            protocol.transport.loseConnection()
            raise first
        return protocol

    def _handshake(self, protocol: RedisProtocol) -> "Deferred[RedisProtocol]":
        return Deferred.fromCoroutine(self._handshake_steps(protocol))

    def _connected(self, protocol: RedisProtocol) -> None:
        self._connecting = None
        if self._closed:
            protocol.transport.loseConnection()
            return
        self._protocol = protocol
        self._up_since = self._reactor.seconds()
        protocol.lost.addCallback(self._lost, protocol)
        self._set_available(True, "")

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._closed:
            return
        if failure.check(RedisError):
            why = f"Redis refused the connection set-up: {failure.getErrorMessage()}"
        else:
            why = f"cannot connect: {failure.getErrorMessage()}"
        self._set_available(False, why)
        self._retry_later()

    def _lost(self, _: object, protocol: RedisProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None
        if self._closed:
            return
        self._set_available(False, "the connection was lost")
        if self._reactor.seconds() - self._up_since >= _LASTED:
            self._backoff = _BACKOFF_FIRST
        if self._retry is None and self._connecting is None:
            self._retry_later()

    def _retry_later(self) -> None:
        self._retry = self._reactor.callLater(self._backoff * (1 - self._jitter() / 2), self._connect)
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

    def _set_available(self, available: bool, why: str) -> None:
        if available == self.available and (available or self._down_since is not None):
            return
        now = self._reactor.seconds()
        self.available = available
        if available:
            if self._down_since is None:
                log.info("shared state: connected to Redis at {address}", address=str(self.address))
            else:
                log.info(
                    "shared state: Redis at {address} is available again (after {seconds:.1f}s)",
                    address=str(self.address), seconds=now - self._down_since,
                )
            self._down_since = None
        else:
            self._down_since = now
            log.warn(
                "shared state: Redis at {address} is unavailable ({why}); retrying in the background",
                address=str(self.address), why=why,
            )
        for watcher in list(self.watchers):
            watcher(available)

    def close(self) -> "Deferred[None]":
        """Stop reconnecting and close the connection; fires once it is closed."""
        self._closed = True
        for call in (self._retry, self._probing):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._probing = None
        if self._connecting is not None:
            self._connecting.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is None or protocol.transport is None:
            return succeed(None)
        protocol.transport.loseConnection()
        return protocol.lost

    # --- commands -------------------------------------------------------------------

    def execute(self, *args: Arg) -> "Deferred[Any]":
        """Run one command: its reply (bytes, int, list, None), or RedisError, or
        RedisUnavailable (at once while there is no connection, or while Redis is too
        slow: nothing queues behind it)."""
        protocol = self._protocol
        if protocol is None or not self.available:
            return self._unavailable()
        d = protocol.execute(*args)
        d.addErrback(self._note_failure)
        return d

    def _unavailable(self) -> "Deferred[Any]":
        if self._protocol is None:
            return _failed(RedisUnavailable(f"no connection to Redis at {self.address}"))
        return _failed(RedisUnavailable(f"Redis at {self.address} answers too slowly (over {self.timeout:g}s)"))

    def _note_failure(self, failure: Failure) -> Failure:
        if failure.check(RedisUnavailable) and self._protocol is not None and self.available:
            self._set_available(False, failure.getErrorMessage())
            self._probe_wait = _BACKOFF_FIRST
            self._probe()
        return failure

    def _probe(self) -> None:
        """After a timeout on a live connection: PING until Redis answers in time
        (then it is available again), or the connection goes (then it reconnects);
        after a late answer, again 0.05 s later, the wait doubling up to 2 s."""
        self._probing = None
        protocol = self._protocol
        if protocol is None or self._closed:
            return

        def answered(_: object) -> None:
            if self._protocol is protocol:
                self._set_available(True, "")

        def again(_: object) -> None:
            if self._protocol is protocol and self._probing is None:
                self._probing = self._reactor.callLater(self._probe_wait, self._probe)
                self._probe_wait = min(self._probe_wait * 2, _BACKOFF_MAX)

        protocol.execute("PING").addCallbacks(answered, again)

    def evalsha(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> "Deferred[Any]":
        """Run ``script`` by its SHA-1; on NOSCRIPT (a restarted or flushed Redis) load
        it and run it again."""
        d = self.execute("EVALSHA", script.sha1, len(keys), *keys, *args)
        d.addErrback(self._load_and_run, script, keys, args)
        return d

    def _load_and_run(self, failure: Failure, script: Script, keys: Sequence[Arg],
                      args: Sequence[Arg]) -> Any:
        failure.trap(RedisError)
        if not str(failure.value).startswith("NOSCRIPT"):
            return failure
        protocol = self._protocol
        if protocol is None or not self.available:
            return self._unavailable()
        loaded, ran = protocol.pipeline([("SCRIPT", "LOAD", script.source),
                                         ("EVALSHA", script.sha1, len(keys), *keys, *args)])
        loaded.addErrback(lambda _: None)  # then its EVALSHA fails too, and says why
        ran.addErrback(self._note_failure)
        return ran
