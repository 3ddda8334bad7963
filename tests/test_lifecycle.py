"""Reload, graceful stop and sd_notify, in memory (the real-process side is in
test_integration_lifecycle.py)."""

from __future__ import annotations

import gc
import socket

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from openaigw import config, systemd
from openaigw.service import GC_THRESHOLDS, GatewayService

from tests.memory import BASE_CONFIG, Gateway, post, response

CHAT = b"/v1/chat/completions"


@pytest.fixture
def notifications(tmp_path, monkeypatch):
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET; yields a reader."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)

    def read() -> list:
        messages = []
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                return messages

    yield read
    sock.close()


def test_notify_without_systemd_does_nothing(monkeypatch):
    """Outside systemd (no $NOTIFY_SOCKET) notify is a no-op."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_drain_closes_idle_waits_for_busy_then_aborts():
    """A graceful stop closes idle connections at once, lets busy ones finish their answer,
    and aborts what is still open after the timeout."""
    gw = Gateway()
    _, idle = gw.client()
    busy_channel, busy = gw.client(post(CHAT, b"{}"))
    _, slow = gw.client(post(CHAT, b"{}"))
    done = gw.site.drain(10)
    assert idle.disconnecting and not busy.disconnecting and not done.called
    gw.upstream(0).send(response())  # the busy request is answered: its connection closes
    assert busy.value().startswith(b"HTTP/1.1 200") and busy.disconnecting
    assert b"Connection: close" in busy.value()  # and the client is told so
    busy_channel.connectionLost(Failure(ConnectionDone()))
    gw.reactor.advance(10)
    assert slow.disconnected  # aborted after the timeout


def test_drain_closes_after_a_head_that_was_halfway_in():
    """A head still coming in when the stop begins is answered, with Connection: close,
    and its connection closes then (not at the drain's timeout)."""
    gw = Gateway()
    request = post(CHAT, b"{}")
    channel, client = gw.client(request[:20])
    done = gw.site.drain(10)
    channel.dataReceived(request[20:])
    gw.upstream(0).send(response())
    assert client.value().startswith(b"HTTP/1.1 200") and b"Connection: close" in client.value()
    assert client.disconnecting and not done.called
    channel.connectionLost(Failure(ConnectionDone()))
    assert done.called


def write(path, text: str) -> None:
    path.write_text(text)


def start(tmp_path, text: str = BASE_CONFIG):
    from twisted.internet.testing import MemoryReactorClock

    path = tmp_path / "gw.ini"
    write(path, text)
    reactor = MemoryReactorClock()
    service = GatewayService(config.load(str(path), {"KEY": "sk-real"}), reactor)
    service.privilegedStartService()
    return service, reactor, path


def test_ready_once_listening(tmp_path, notifications):
    """READY=1 goes to systemd when every listener is up; what start-up made is out of
    the collector's sight, and full collections are rarer from then on."""
    thresholds = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        service, reactor, _ = start(tmp_path)
        assert service.ready
        assert notifications() == ["READY=1\nSTATUS=serving"]
        assert gc.get_threshold() == GC_THRESHOLDS and GC_THRESHOLDS[2] > 10
        assert gc.get_freeze_count() > 0
        assert [port for port, *_ in reactor.tcpServers] == [0]
    finally:
        gc.set_threshold(*thresholds)


def test_reload_valid_invalid_and_listeners(tmp_path, notifications, monkeypatch):
    """A valid file replaces routes and listeners; an invalid one is refused and the old one
    kept; systemd sees RELOADING=1 then READY=1 each time."""
    monkeypatch.setenv("KEY", "sk-real")
    service, reactor, path = start(tmp_path)
    notifications()
    old_root = service.site.resource
    write(path, BASE_CONFIG + "bogus = 1\n")
    service.reload()
    assert service.site.resource is old_root
    messages = notifications()
    assert messages[0].startswith("RELOADING=1\nMONOTONIC_USEC=") and messages[1] == "READY=1\nSTATUS=serving"
    new = BASE_CONFIG.replace("listen = tcp:port=0:interface=127.0.0.1",
                              "listen = tcp:port=0:interface=127.0.0.1 tcp:port=0:interface=127.0.0.2")
    write(path, new.replace("[route:api]\nuri = /v1/*", "[route:api]\nuri = /v2/*"))
    service.reload()
    assert service.site.resource is not old_root
    assert [interface for _, _, _, interface in reactor.tcpServers] == ["127.0.0.1", "127.0.0.2"]
    assert sorted(key for key in service._ports) == [
        ("listen", "tcp:port=0:interface=127.0.0.1"), ("listen", "tcp:port=0:interface=127.0.0.2")]
    write(path, BASE_CONFIG)
    service.reload()
    assert list(service._ports) == [("listen", "tcp:port=0:interface=127.0.0.1")]


def test_reload_outcome_for_the_reload_command(tmp_path, monkeypatch):
    """Under a unit with RuntimeDirectory=, each reload writes its outcome for
    ``python3 -m openaigw.systemd reload``: ok, or failed and why."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("KEY", "sk-real")
    service, _, path = start(tmp_path)
    status = tmp_path / systemd.RELOAD_STATUS
    write(path, BASE_CONFIG + "bogus = 1\n")
    service.reload()
    outcome, why = status.read_text().split("\n", 1)
    assert outcome == "failed" and "bogus: unknown key" in why
    write(path, BASE_CONFIG)
    service.reload()
    assert status.read_text() == "ok\n"


def test_stop_notifies_and_drains(tmp_path, notifications):
    """Stopping tells systemd STOPPING=1, closes the listeners and waits for connections."""
    service, reactor, _ = start(tmp_path)
    notifications()
    stopped = service.stopService()
    assert notifications() == ["STOPPING=1"]
    assert not service.ready and stopped.called
