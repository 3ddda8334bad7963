"""One worker process of the supervisor (``[gateway] workers`` above 1): today's
gateway (:class:`GatewayService`) on listening sockets inherited from the supervisor.

The supervisor runs ``python -m openaigw.worker`` with these file descriptors:

- ``COMMANDS`` (0): commands, one JSON object a line: ``start`` (the configuration's
  text, the listeners), ``reload`` (the new text) and ``metrics``;
- 1 (stdout, the access log's ``-``), relayed by the supervisor in whole lines;
- 2 (stderr), relayed into the supervisor's log;
- ``ANSWERS`` (3): one JSON answer a line, with the ``id`` of its command;
- ``LOG`` (4): the worker's log events, as twisted.logger JSON, one a line;
- ``FIRST_LISTENER`` (5) onwards: the listening sockets, in the order of ``listeners``.

SIGTERM, SIGINT or the end of the commands (the supervisor is gone) stop the worker as
GatewayService stops: no more accepting, requests in flight drain for up to
``shutdown_timeout``, then exit 0.  SIGHUP is ignored: reloads come from the supervisor.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import Any, Dict, Optional

from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from openaigw import config as configuration
from openaigw.hostmetrics import snapshot
from openaigw.service import GatewayService

COMMANDS, ANSWERS, LOG, FIRST_LISTENER = 0, 3, 4, 5
EX_CONFIG = 78  # as tap.py: the configuration was refused
MAX_MESSAGE = 1 << 26  # a configuration's text, a metrics snapshot

log = Logger()


class _OneAcceptAWakeup:
    """A socket shared with the other workers: accept one connection each time it is
    readable (as nginx's ``multi_accept off``).  Twisted accepts up to 100 at once,
    so the first worker to wake would take a whole burst; one at a time, each next
    connection goes to a worker that is back in its event loop, the least busy."""

    @property
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass


class _SharedTCPPort(_OneAcceptAWakeup, tcp.Port):
    pass


class _SharedUNIXPort(_OneAcceptAWakeup, unix.Port):
    """The supervisor owns the path: closing does not unlink it."""

    def connectionLost(self, reason: Any) -> None:
        tcp.Port.connectionLost(self, reason)


@implementer(IStreamServerEndpoint)
class InheritedEndpoint:
    """A listening socket the supervisor opened, served with what it needs here: TLS for
    an ``ssl:`` description, the supervisor's backlog and mode for a unix socket (which
    Twisted listens on again when adopting it).  (What ``reactor.adoptStreamPort``
    does, with the port classes above.)"""

    def __init__(self, reactor: Any, fd: int, description: str, backlog: int, mode: int) -> None:
        self._reactor = reactor
        self._fd = fd
        self._description = description
        self._backlog = backlog
        self._mode = mode

    def listen(self, factory: Any) -> Deferred[Any]:
        if self._description.startswith("ssl:"):
            # Parsing (not listening) loads the certificate; the endpoint keeps the
            # context factory in an attribute without a public accessor.
            endpoint = serverFromString(self._reactor, self._description)
            assert isinstance(endpoint, SSL4ServerEndpoint)
            factory = TLSMemoryBIOFactory(endpoint._sslContextFactory, False, factory)
        family = _family(self._fd)
        if family == socket.AF_UNIX:
            port = _SharedUNIXPort._fromListeningDescriptor(self._reactor, self._fd, factory)
            port.backlog, port.mode = self._backlog, self._mode  # it listens again
        else:
            port = _SharedTCPPort._fromListeningDescriptor(self._reactor, self._fd, family, factory)
        port.startListening()
        os.close(self._fd)  # the port holds its own copy
        return succeed(port)


def _family(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    try:
        return int(sock.family)
    finally:
        sock.detach()


class Worker:
    """Runs the GatewayService the supervisor's commands describe."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.service: Optional[GatewayService] = None
        self.exit_code = 0
        self._stopping = False

    def handle(self, message: Dict[str, Any]) -> Any:
        """The answer to ``message`` (a dict, or a Deferred of one)."""
        op = message.get("op")
        if op == "start" and self.service is None:
            return self._start(message)
        if op == "reload" and self.service is not None:
            return self.service.reload(message["text"]).addCallback(lambda error: {"error": error})
        if op == "metrics":
            metrics = self.service.telemetry.metrics if self.service is not None else None
            return {"families": snapshot(metrics.registry) if metrics is not None else []}
        return {"error": f"unknown command {op!r}"}

    def _start(self, message: Dict[str, Any]) -> Dict[str, Any]:
        try:
            config = configuration.parse(message["text"], message["path"], os.environ)
        except configuration.ConfigError as e:
            log.error("worker cannot start: {error}", error=str(e))
            self.exit_code = EX_CONFIG
            self.shutdown()
            return {"error": str(e)}
        inherited = {
            (listener["kind"], listener["description"]): InheritedEndpoint(
                self._reactor, listener["fd"], listener["description"], listener["backlog"], listener["mode"]
            )
            for listener in message["listeners"]
        }
        self.service = GatewayService(config, self._reactor, inherited=inherited)
        self.service.privilegedStartService()
        self.service.startService()
        self.install_signals()  # over the service's own: this process stops as the supervisor says
        return {"ready": self.service.ready}

    def install_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._reactor.callFromThread(self.shutdown))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def shutdown(self) -> None:
        """Stop once (SIGTERM, the supervisor gone, or both)."""
        if not self._stopping:
            self._stopping = True
            self._reactor.stop()

    def stop(self) -> Optional[Deferred[None]]:
        """The reactor's shutdown: drain as GatewayService does."""
        return self.service.stopService() if self.service is not None else None


class Commands(LineReceiver):
    """The supervisor's commands in, the answers out."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def lineReceived(self, line: bytes) -> None:
        message = json.loads(line)
        answer = maybeDeferred(self._worker.handle, message)
        answer.addErrback(self._failed, message)
        answer.addCallback(self._answer, message.get("id"))

    def _failed(self, failure: Any, message: Dict[str, Any]) -> Dict[str, Any]:
        log.failure("worker: {op} failed", failure, op=message.get("op"))
        if message.get("op") == "start":  # exit, to be started again
            self._worker.exit_code = 1
            self._worker.shutdown()
        return {"error": failure.getErrorMessage()}

    def _answer(self, answer: Dict[str, Any], id_: Any) -> None:
        self.transport.write(json.dumps({"id": id_, **answer}).encode("utf-8") + b"\n")

    def connectionLost(self, reason: Any = None) -> None:
        self._worker.shutdown()


def main() -> None:
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    from openaigw import writethrough

    events = os.fdopen(LOG, "w", encoding="utf-8")
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(events, "")], redirectStandardIO=False)
    writethrough.install()  # as tap.py: the gateway's TCP writes go out at once
    worker = Worker(reactor)
    worker.install_signals()
    StandardIO(Commands(worker), stdin=COMMANDS, stdout=ANSWERS, reactor=reactor)
    reactor.addSystemEventTrigger("before", "shutdown", worker.stop)
    reactor.run(installSignalHandlers=False)
    sys.exit(worker.exit_code)


if __name__ == "__main__":
    main()
