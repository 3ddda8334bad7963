"""The Redis client in memory: RESP over a StringTransport, time from a fake clock."""

from __future__ import annotations

from typing import Any, List

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from openaigw.config import ConfigError, parse
from openaigw.redisclient import (
    RedisAddress,
    RedisClient,
    RedisError,
    RedisProtocol,
    RedisUnavailable,
    Script,
    encode,
    parse_url,
)

CANARY = "canary-pw-9f3b1c"


def connected(clock: Any = None, timeout: float = 0.25) -> tuple:
    clock = clock or Clock()
    protocol = RedisProtocol(clock, timeout)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


def results(deferreds: List[Any]) -> List[Any]:
    out: List[Any] = []
    for d in deferreds:
        d.addBoth(out.append)
    return out


# --- URLs --------------------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("redis://127.0.0.1:6380/2", RedisAddress("redis", "127.0.0.1", 6380, db=2)),
    ("redis://redis.internal", RedisAddress("redis", "redis.internal", 6379)),
    ("rediss://:p%40ss@cache.example:6390/1", RedisAddress("rediss", "cache.example", 6390, db=1, password="p@ss")),
    ("redis://gw:pw@[::1]:6379/0", RedisAddress("redis", "::1", 6379, username="gw", password="pw")),
    ("unix:///run/redis/redis.sock?db=3", RedisAddress("unix", path="/run/redis/redis.sock", db=3)),
    ("unix://:pw@/run/redis/redis.sock", RedisAddress("unix", path="/run/redis/redis.sock", password="pw")),
])
def test_urls(url, expected):
    """redis://, rediss:// and unix:// URLs give the address, database and credentials."""
    address = parse_url(url)
    assert address == expected and address.password == expected.password


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:6379", "expected memory"),
    ("redis://:pw@/0", "names no host"),
    ("redis://127.0.0.1:99999/0", "bad port"),
    ("redis://127.0.0.1/zero", "database must be a number"),
    ("redis://127.0.0.1/0?timeout=1", "take no parameters"),
    ("unix://relative.sock", "unix:///path"),
    ("unix:///run/redis.sock?database=1", "unknown URL parameter"),
    ("redis://pw@127.0.0.1/0", ":PASSWORD@"),
])
def test_bad_urls(url, message):
    """Bad URLs are refused with a message that does not quote them."""
    with pytest.raises(ValueError) as caught:
        parse_url(url.replace("pw", CANARY))
    assert message in str(caught.value) and CANARY not in str(caught.value)


def test_address_never_shows_the_password():
    """str() and repr() of an address leave the password out."""
    address = parse_url(f"redis://gw:{CANARY}@127.0.0.1:6379/4")
    assert CANARY not in str(address) and CANARY not in repr(address)
    assert str(address) == "redis://127.0.0.1:6379/4"


GATEWAY = """
[gateway]
{lines}

[upstream:up]
scheme = http
nodes = 10.0.0.1:8080

[route:r]
uri = /v1/*
upstream = up
"""


def test_state_keys(tmp_path):
    """[gateway] state takes memory or a URL whose password may be a secret reference."""
    assert parse(GATEWAY.format(lines=""), "gw.ini", {}).gateway.state is None
    assert parse(GATEWAY.format(lines="state = memory"), "gw.ini", {}).gateway.state is None
    (tmp_path / "redis_password").write_text(CANARY + "\n")
    config = parse(GATEWAY.format(lines=(
        "state = redis://:$CREDENTIAL://redis_password@127.0.0.1:6379/1\n"
        "state_timeout = 0.5\nstate_unavailable = allow"
    )), "gw.ini", {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    gateway = config.gateway
    assert gateway.state == RedisAddress("redis", "127.0.0.1", 6379, db=1, password=CANARY)
    assert (gateway.state_timeout, gateway.state_unavailable) == (0.5, "allow")
    assert CANARY not in repr(config)
    whole = parse(GATEWAY.format(lines="state = $ENV://REDIS_URL"), "gw.ini",
                  {"REDIS_URL": f"redis://:{CANARY}@10.1.2.3:6379/0"})
    assert whole.gateway.state.host == "10.1.2.3" and whole.gateway.state.password == CANARY


@pytest.mark.parametrize("lines, message", [
    (f"state = redis://:{CANARY}@127.0.0.1:6379/x", "[gateway] state: the database must be a number"),
    (f"state = mysql://:{CANARY}@db", "[gateway] state: expected memory"),
    ("state = redis://:$ENV://NOPE@127.0.0.1/0", "[gateway] state: $ENV://NOPE: environment variable NOPE is not set"),
    ("state_timeout = 0", "[gateway] state_timeout: must be above 0"),
    ("state_unavailable = maybe", "[gateway] state_unavailable: 'maybe' is not one of reject, allow"),
])
def test_bad_state_keys(lines, message):
    """Bad state keys are config errors naming the key, never quoting a password."""
    with pytest.raises(ConfigError) as caught:
        parse(GATEWAY.format(lines=lines), "gw.ini", {})
    assert message in str(caught.value) and CANARY not in str(caught.value)


# --- the protocol ------------------------------------------------------------------

def test_encode():
    """Commands go out as RESP arrays of bulk strings."""
    assert encode(("SET", b"k\r\n", 12, 0.5)) == b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n$3\r\n0.5\r\n"


def test_pipelined_replies_in_order():
    """Commands are written at once and answered in order, replies split anywhere."""
    protocol, transport, _ = connected()
    got = results([protocol.execute("PING"), protocol.execute("GET", "k"), protocol.execute("MGET", "a", "b")])
    assert transport.value() == encode(("PING",)) + encode(("GET", "k")) + encode(("MGET", "a", "b"))
    for byte in b"+PONG\r\n$5\r\nva\x00ue\r\n*2\r\n:7\r\n$-1\r\n":
        protocol.dataReceived(bytes([byte]))
    assert got == [b"PONG", b"va\x00ue", [7, None]]


def test_error_reply_fails_only_its_command():
    """An error reply fails its own command with RedisError; the next one still works."""
    protocol, _, _ = connected()
    got = results([protocol.execute("INCR", "s"), protocol.execute("PING")])
    protocol.dataReceived(b"-ERR value is not an integer\r\n+PONG\r\n")
    assert isinstance(got[0], Failure) and got[0].check(RedisError)
    assert str(got[0].value) == "ERR value is not an integer"
    assert got[1] == b"PONG"


def test_timeout_fails_the_command_and_drops_its_late_reply():
    """No answer within the timeout: RedisUnavailable; the late reply goes to no one."""
    protocol, transport, clock = connected()
    first = results([protocol.execute("GET", "a")])
    clock.advance(0.1)
    protocol.dataReceived(b"")  # something came meanwhile: the connection is alive
    second = results([protocol.execute("GET", "b")])
    clock.advance(0.16)
    assert first[0].check(RedisUnavailable) and second == []
    assert not transport.disconnecting
    protocol.dataReceived(b"$1\r\na\r\n$1\r\nb\r\n")
    assert second == [b"b"] and len(first) == 1


def test_silent_connection_is_aborted():
    """A command that times out with nothing received since: the connection is dropped."""
    protocol, transport, clock = connected()
    got = results([protocol.execute("GET", "a"), protocol.execute("GET", "b")])
    clock.advance(0.25)
    assert all(f.check(RedisUnavailable) for f in got)
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert protocol.lost.called
    late = results([protocol.execute("PING")])
    assert late[0].check(RedisUnavailable)


def test_connection_lost_fails_pending():
    """Commands waiting when the connection goes fail with RedisUnavailable."""
    protocol, _, _ = connected()
    got = results([protocol.execute("PING")])
    protocol.connectionLost(Failure(ConnectionDone()))
    assert got[0].check(RedisUnavailable)


def test_cancelled_command_skips_its_reply():
    """A cancelled command's reply is dropped; the next reply reaches the next command."""
    protocol, _, _ = connected()
    first = protocol.execute("GET", "a")
    got = results([protocol.execute("GET", "b")])
    first.cancel()
    first.addErrback(lambda _: None)
    protocol.dataReceived(b"$1\r\na\r\n$1\r\nb\r\n")
    assert got == [b"b"]


def test_protocol_error_aborts():
    """Bytes that are not RESP drop the connection."""
    protocol, transport, _ = connected()
    results([protocol.execute("PING")])
    protocol.dataReceived(b"!nonsense\r\n")
    assert transport.disconnecting


# --- the client --------------------------------------------------------------------

class Server:
    """The far end of the client's connection attempts on a MemoryReactorClock."""

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor
        self.transport: Any = None
        self.protocol: Any = None

    def accept(self) -> None:
        factory = self.reactor.tcpClients[-1][2]
        self.transport = StringTransport()
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def refuse(self) -> None:
        from twisted.internet.error import ConnectionRefusedError

        connector = self.reactor.connectors[-1] if self.reactor.connectors else None
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def reply(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def drop(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def client(url: str = "redis://127.0.0.1:6379/0", timeout: float = 0.25, jitter: float = 0.0) -> tuple:
    """A client on a MemoryReactorClock; its waits are ``1 - jitter / 2`` of its
    back-off (by default the whole back-off)."""
    reactor = MemoryReactorClock()
    redis = RedisClient(reactor, parse_url(url), timeout, jitter=lambda: jitter)
    changes: List[bool] = []
    redis.watchers.append(changes.append)
    redis.start()
    return redis, Server(reactor), reactor, changes


def test_handshake_auth_select(caplog_events=None):
    """On connect: AUTH and SELECT, pipelined; available once both answered."""
    redis, server, reactor, changes = client(f"redis://gw:{CANARY}@127.0.0.1:6379/3")
    assert reactor.tcpClients[-1][:2] == ("127.0.0.1", 6379)
    server.accept()
    assert server.sent() == encode(("AUTH", "gw", CANARY)) + encode(("SELECT", 3)) + encode(("PING",))
    assert not redis.available
    server.reply(b"+OK\r\n+OK\r\n+PONG\r\n")
    assert redis.available and changes == [True]


def test_commands_fail_at_once_without_connection():
    """Before a connection (or between two), commands fail at once: nothing waits."""
    redis, server, reactor, _ = client()
    got = results([redis.execute("PING")])
    assert got[0].check(RedisUnavailable)


def test_wrong_password_retries_with_backoff():
    """AUTH refused: unavailable (told once), then tried again after a back-off."""
    redis, server, reactor, changes = client(f"redis://:{CANARY}@127.0.0.1:6379/0")
    server.accept()
    server.sent()
    server.reply(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n+PONG\r\n")
    assert server.transport.disconnecting
    assert changes == [False] and not redis.available
    attempts = len(reactor.tcpClients)
    reactor.advance(0.05)
    assert len(reactor.tcpClients) == attempts + 1
    server.accept()
    server.sent()
    server.reply(b"-WRONGPASS invalid\r\n+PONG\r\n")
    assert changes == [False]  # one outage, told once


def test_reconnects_after_loss_with_growing_backoff():
    """A lost connection is made anew: 0.05 s, then 0.1 s, ... after failed attempts."""
    redis, server, reactor, changes = client()
    server.accept()
    server.sent()
    server.reply(b"+PONG\r\n")
    server.drop()
    assert changes == [True, False]
    assert results([redis.execute("PING")])[0].check(RedisUnavailable)
    attempts = len(reactor.tcpClients)
    reactor.advance(0.05)
    assert len(reactor.tcpClients) == attempts + 1
    server.refuse()
    reactor.advance(0.05)
    assert len(reactor.tcpClients) == attempts + 1  # the back-off doubled
    reactor.advance(0.05)
    assert len(reactor.tcpClients) == attempts + 2
    server.accept()
    server.sent()
    server.reply(b"+PONG\r\n")
    assert changes == [True, False, True]
    got = results([redis.execute("GET", "k")])
    server.reply(b"$-1\r\n")
    assert got == [None]


def test_reconnect_waits_are_jittered():
    """Each wait is a random part of the back-off, down to half of it: clients that
    lost the same Redis together spread their attempts."""
    redis, server, reactor, changes = client(jitter=0.999)
    server.accept()
    server.sent()
    server.reply(b"+PONG\r\n")
    server.drop()
    attempts = len(reactor.tcpClients)
    reactor.advance(0.024)
    assert len(reactor.tcpClients) == attempts  # not before half of 0.05 s
    reactor.advance(0.002)
    assert len(reactor.tcpClients) == attempts + 1  # at about half of 0.05 s
    server.refuse()
    reactor.advance(0.049)
    assert len(reactor.tcpClients) == attempts + 1
    reactor.advance(0.002)
    assert len(reactor.tcpClients) == attempts + 2  # at about half of the doubled 0.1 s


def slowed() -> tuple:
    """A connected client whose GET "a" timed out on a Redis still alive, just slow
    (some bytes came back): (redis, server, reactor, changes, GET's result)."""
    redis, server, reactor, changes = client()
    server.accept()
    server.sent()
    server.reply(b"+PONG\r\n")
    got = results([redis.execute("GET", "a")])
    reactor.advance(0.1)
    server.reply(b"")  # alive, just slow
    reactor.advance(0.15)
    return redis, server, reactor, changes, got


def test_timeout_on_live_connection_marks_unavailable_until_answer():
    """A command timing out marks Redis unavailable; a PING answered in time ends it."""
    redis, server, reactor, changes, got = slowed()
    assert got[0].check(RedisUnavailable) and changes == [True, False]
    assert server.sent() == encode(("GET", "a")) + encode(("PING",))
    server.reply(b"$1\r\na\r\n+PONG\r\n")
    assert changes == [True, False, True]


def test_evalsha_loads_the_script_on_noscript():
    """EVALSHA first; on NOSCRIPT, SCRIPT LOAD and EVALSHA again, pipelined."""
    redis, server, reactor, _ = client()
    server.accept()
    server.sent()
    server.reply(b"+PONG\r\n")
    script = Script("return KEYS[1]")
    got = results([redis.evalsha(script, ["k"], [1])])
    assert server.sent() == encode(("EVALSHA", script.sha1, 1, "k", 1))
    server.reply(b"-NOSCRIPT No matching script. Please use EVAL.\r\n")
    assert server.sent() == encode(("SCRIPT", "LOAD", script.source)) + encode(("EVALSHA", script.sha1, 1, "k", 1))
    server.reply(b"$40\r\n" + script.sha1 + b"\r\n$1\r\nk\r\n")
    assert got == [b"k"]
    other = results([redis.evalsha(script, ["k"], [1])])
    server.reply(b"-ERR user_script:1: boom\r\n")
    assert other[0].check(RedisError) and server.sent() == encode(("EVALSHA", script.sha1, 1, "k", 1))


def test_close_stops_reconnecting():
    """After close() the client neither keeps its connection nor makes a new one."""
    redis, server, reactor, _ = client()
    server.accept()
    server.sent()
    server.reply(b"+PONG\r\n")
    closed = results([redis.close()])
    assert server.transport.disconnecting
    server.drop()
    assert closed == [None]
    attempts = len(reactor.tcpClients)
    reactor.advance(10)
    assert len(reactor.tcpClients) == attempts


def test_state_ca_file_only_with_rediss(tmp_path):
    """state_ca_file applies to rediss:// only, and must hold a PEM certificate."""
    with pytest.raises(ConfigError) as caught:
        parse(GATEWAY.format(lines="state = redis://127.0.0.1/0\nstate_ca_file = /etc/hostname"), "gw.ini", {})
    assert "[gateway] state_ca_file: only applies to state = rediss://" in str(caught.value)
    (tmp_path / "not.pem").write_text("nope")
    with pytest.raises(ConfigError) as caught:
        parse(GATEWAY.format(lines=f"state = rediss://h/0\nstate_ca_file = {tmp_path}/not.pem"), "gw.ini", {})
    assert "holds no PEM certificate" in str(caught.value)


def test_outage_logged_once():
    """However many commands fail during an outage, it is logged once when it starts
    and once when it ends."""
    from twisted.logger import LogLevel, globalLogPublisher

    events: List[dict] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        redis, server, reactor, _ = client()
        server.accept()
        server.sent()
        server.reply(b"+PONG\r\n")
        server.drop()
        for _ in range(50):
            results([redis.execute("GET", "k")])
        for _ in range(5):  # attempts refused, with the back-off
            reactor.advance(2)
            server.refuse()
        reactor.advance(2)
        server.accept()
        server.sent()
        server.reply(b"+PONG\r\n")
    finally:
        globalLogPublisher.removeObserver(observer)
    ours = [e for e in events if e.get("log_namespace") == "openaigw.redisclient"]
    assert [e["log_level"] for e in ours] == [LogLevel.info, LogLevel.warn, LogLevel.info]
    assert "is available again" in ours[-1]["log_format"]


def test_commands_fail_at_once_while_redis_is_too_slow():
    """Once a command timed out on a live connection, commands fail at once (nothing
    queues behind a slow Redis, no request waits state_timeout) until a PING answers."""
    redis, server, reactor, changes, _ = slowed()
    assert changes == [True, False]
    assert server.sent() == encode(("GET", "a")) + encode(("PING",))
    got = results([redis.execute("GET", "b") for _ in range(100)])
    assert len(got) == 100 and all(f.check(RedisUnavailable) for f in got)
    assert server.sent() == b""  # not written to the slow Redis
    server.reply(b"$1\r\na\r\n+PONG\r\n")
    assert changes == [True, False, True]
    got = results([redis.execute("GET", "c")])
    assert server.sent() == encode(("GET", "c"))


def test_a_slow_redis_is_probed_soon_then_less_often():
    """While Redis answers, but too slowly, a late PING is followed by another 0.05 s
    later, then 0.1 s, ... up to 2 s: the end of a short slowdown is noticed soon, a
    long one costs a PING every 2 s."""
    redis, server, reactor, changes, _ = slowed()
    assert changes == [True, False]
    assert server.sent() == encode(("GET", "a")) + encode(("PING",))
    waits = []
    for _ in range(8):
        server.reply(b"")  # still alive, the PING still late
        reactor.advance(0.25)
        waited = 0.0
        while not server.sent():
            reactor.advance(0.01)
            waited += 0.01
        waits.append(round(waited, 2))
    assert waits == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0], abs=0.015)
    server.reply(b"$1\r\na\r\n" + b"+PONG\r\n" * 9)  # all answered, the last PING in time
    assert changes == [True, False, True]


def test_a_connection_that_drops_at_once_backs_off():
    """A Redis that takes the connection set-up and drops it at once (a proxy, a
    client-kill loop) is not reconnected to 20 times a second: the back-off grows
    until a connection has lasted a while."""
    redis, server, reactor, changes = client()
    for _ in range(6):
        server.accept()
        server.sent()
        server.reply(b"+PONG\r\n")
        server.drop()
        reactor.advance(2.0)  # whatever the back-off is, the next attempt is made
    attempts = len(reactor.tcpClients)
    server.accept()
    server.sent()
    server.reply(b"+PONG\r\n")
    server.drop()
    reactor.advance(1.0)
    assert len(reactor.tcpClients) == attempts  # not 0.05 s later
    reactor.advance(1.0)
    assert len(reactor.tcpClients) == attempts + 1
    server.accept()
    server.sent()
    server.reply(b"+PONG\r\n")
    reactor.advance(5.0)  # a connection that lasted: the next loss is retried at once
    server.drop()
    reactor.advance(0.05)
    assert len(reactor.tcpClients) == attempts + 2


def test_noscript_reload_that_fails_leaves_no_unhandled_error():
    """SCRIPT LOAD failing with its EVALSHA (the connection lost) fails the command,
    and leaves no "Unhandled error in Deferred" behind."""
    import gc

    from twisted.logger import globalLogPublisher

    events: List[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        redis, server, reactor, _ = client()
        server.accept()
        server.sent()
        server.reply(b"+PONG\r\n")
        got = results([redis.evalsha(Script("return 1"), ["k"], [])])
        server.reply(b"-NOSCRIPT No matching script. Please use EVAL.\r\n")
        server.drop()
        assert got[0].check(RedisUnavailable)
        del got
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e for e in events if "Unhandled error" in str(e.get("log_format", ""))] == []
