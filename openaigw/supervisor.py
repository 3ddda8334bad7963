"""Several workers on one host (``[gateway] workers`` above 1).

The supervisor opens the listeners (systemd's sockets too) but never accepts on them:
it starts the workers (openaigw/worker.py, each today's GatewayService) with the
sockets as inherited file descriptors, and each worker accepts on all of them, so the
kernel spreads connections across the workers.  The supervisor serves the status
listener (/metrics summed over the workers, /healthz, /readyz), restarts a worker
that dies (with a back-off), checks a new configuration on SIGHUP before any worker
reloads it, drains the workers on SIGTERM, and alone talks to systemd.  Worker log
events join its log; their stdout (the access log's ``-``) reaches its stdout in
whole lines.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
from typing import Any, Dict, List, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST, GCCollector, PlatformCollector, ProcessCollector
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol, ServerFactory
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

import openaigw
from openaigw import config as configuration
from openaigw import systemd, worker
from openaigw.config import Config
from openaigw.hostmetrics import Family, HostMetrics, snapshot
from openaigw.state import state_changed
from openaigw.status import StatusSite, status_resource

log = Logger()

RESTART_DELAY = 0.5  # seconds before the first restart of a worker; doubled after each
MAX_RESTART_DELAY = 30.0
STABLE_SECONDS = 10.0  # a worker up this long has its back-off reset
ANSWER_TIMEOUT = 10.0  # seconds a worker has to answer a command (metrics, reload)
KILL_GRACE = 5.0  # seconds after shutdown_timeout before a worker that will not exit is killed
# What only the supervisor may use: the notify socket, systemd's sockets, the watchdog,
# and the runtime directory where the reload command reads the outcome.
_SYSTEMD_ENVIRON = (
    "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID",
    "RUNTIME_DIRECTORY",
)


class WorkerProcess(ProcessProtocol):
    """One worker: its pipes, and the answers it owes."""

    def __init__(self, supervisor: "Supervisor", slot: int, clock: Any) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.ready = False
        self.pid = 0
        self.started = clock.seconds()
        self.snapshot: List[Family] = []  # its metrics at the last scrape
        self.exited = False
        self._waiting: List[Deferred[None]] = []
        self._clock = clock
        self._ids = itertools.count(1)
        self._pending: Dict[int, Deferred[Dict[str, Any]]] = {}
        self._partial: Dict[int, bytes] = {}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        started = self.request("start", timeout=None, **self.supervisor.start_message(self.slot))
        started.addCallbacks(self._started, lambda _: None)  # no answer: it exits, or is restarted

    def _started(self, answer: Dict[str, Any]) -> None:
        if answer.get("ready"):
            self.ready = True
            self.supervisor.worker_ready(self)

    def request(self, op: str, timeout: Optional[float] = ANSWER_TIMEOUT, **fields: Any) -> Deferred[Dict[str, Any]]:
        """Send a command; the Deferred fires with the answer (errback: none within
        ``timeout`` seconds, or the worker exited)."""
        id_ = next(self._ids)
        answer: Deferred[Dict[str, Any]] = Deferred(lambda _: self._pending.pop(id_, None))
        self._pending[id_] = answer
        message = json.dumps({"id": id_, "op": op, **fields}).encode("utf-8") + b"\n"
        self.transport.writeToChild(worker.COMMANDS, message)
        return answer if timeout is None else answer.addTimeout(timeout, self._clock)

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def childDataReceived(self, fd: int, data: bytes) -> None:
        buffered = self._partial.get(fd, b"") + data
        end = buffered.rfind(b"\n") + 1
        self._partial[fd] = buffered[end:]
        if end:
            self._lines(fd, buffered[:end])

    def _lines(self, fd: int, whole: bytes) -> None:
        if fd == 1:
            self.supervisor.write_stdout(whole)
        elif fd == 2:
            for line in whole.decode("utf-8", "replace").splitlines():
                log.error("worker {worker}: {line}", worker=self.slot, line=line)
        elif fd == worker.ANSWERS:
            for line in whole.splitlines():
                answer = json.loads(line)
                pending = self._pending.pop(answer.pop("id", None), None)
                if pending is not None:
                    pending.callback(answer)
        elif fd == worker.LOG:
            for line in whole.decode("utf-8", "replace").splitlines():
                self._publish(line)

    def _publish(self, line: str) -> None:
        try:
            event = eventFromJSON(line)
        except ValueError:
            log.error("worker {worker}: {line}", worker=self.slot, line=line)
            return
        namespace, level = event.get("log_namespace"), getattr(event.get("log_level"), "name", "info")
        system = "-" if namespace in (None, "log_legacy") else f"{namespace}#{level}"
        event["log_system"] = f"{system} worker={self.slot}"
        event["worker"] = self.slot
        globalLogPublisher(event)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():  # a line the worker could not finish
            if rest:
                self._lines(fd, rest + b"\n")
        self._partial.clear()
        self.ready = False
        for pending in list(self._pending.values()):
            pending.cancel()
        self.exited = True
        self.supervisor.worker_ended(self, reason)
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    def wait(self) -> Deferred[None]:
        """Fires once the process has exited."""
        if self.exited:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiting.append(waiter)
        return waiter


class HeldForWorkers(ServerFactory):
    """The supervisor listens but never accepts: the workers do."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


class _HostMetricsPage(Resource):
    """/metrics: every worker's metrics, summed (openaigw/hostmetrics.py)."""

    isLeaf = True

    def __init__(self, supervisor: "Supervisor") -> None:
        super().__init__()
        self._supervisor = supervisor

    def render_GET(self, request: Any) -> Any:
        scrape = Deferred.fromCoroutine(self._supervisor.metrics())
        gone: List[Failure] = []
        request.notifyFinish().addErrback(lambda failure: gone.append(failure) or scrape.cancel())

        def send(body: bytes) -> None:
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            if not gone:
                log.failure("/metrics failed", failure)
                request.setResponseCode(500)
                request.finish()

        scrape.addCallbacks(send, failed)
        return NOT_DONE_YET


class Supervisor(Service):
    """Listeners, workers and the lifecycle of a host running several workers."""

    def __init__(self, config: Config, text: str, reactor: Any) -> None:
        self.config = config
        self._text = text  # what the workers parse: the file as the supervisor checked it
        self._reactor = reactor
        self._count = config.gateway.worker_count()
        self._listeners: List[Any] = []  # the listen ports, in config order
        self._status_ports: List[Any] = []
        self._workers: Dict[int, WorkerProcess] = {}
        self._failures: Dict[int, int] = {}  # slot -> restarts in a row
        self._restarts: Dict[int, Any] = {}  # slot -> the delayed call that will restart it
        self._announced = False
        self._stopping = False
        self._host = HostMetrics()
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self._running = Gauge("openaigw_workers", "Worker processes serving.", registry=self.registry)
        self._restarted = Counter(
            "openaigw_worker_restarts", "Workers started again after one exited.", registry=self.registry
        )

    @property
    def ready(self) -> bool:
        """Serving: started, not stopping, and at least one worker accepting."""
        return self._announced and not self._stopping and any(w.ready for w in self._workers.values())

    def route_health(self) -> Dict[str, List[Any]]:
        """Node health is each worker's own (passive checks see only its traffic):
        the supervisor's /readyz reports none of it."""
        return {}

    # Start-up

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # Before listening: a SIGHUP as soon as the port answers must not kill the
        # process (the default action); it reloads once the reactor runs.
        signal.signal(signal.SIGHUP, self._signal)
        gateway = self.config.gateway
        status = StatusSite(status_resource(self, None))
        status.resource.putChild(b"metrics", _HostMetricsPage(self))
        held = self._held(self.config)
        wanted = [(d, HeldForWorkers()) for _, d in held] + [(d, status) for d in gateway.status]
        opened: List[Tuple[int, Any]] = []
        failures: List[Failure] = []
        for index, (description, factory) in enumerate(wanted):
            listening = serverFromString(self._reactor, description).listen(factory)
            listening.addCallbacks(lambda port, i=index: opened.append((i, port)), failures.append)
        if failures or len(opened) < len(wanted):  # the endpoints we serve answer at once
            for _, port in opened:
                port.stopListening()
            if failures:
                failures[0].raiseException()
            raise RuntimeError("openaigw cannot listen: an endpoint did not answer at once")
        ports = [port for _, port in sorted(opened, key=lambda pair: pair[0])]
        self._listeners, self._status_ports = ports[: len(held)], ports[len(held):]
        for port in self._listeners:
            port.stopReading()  # the workers accept

    def startService(self) -> None:
        super().startService()
        self._reactor.addSystemEventTrigger("after", "startup", signal.signal, signal.SIGTERM, self._signal)
        for slot in range(1, self._count + 1):
            self._spawn(slot)

    def _signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._reactor.callFromThread(lambda: Deferred.fromCoroutine(self.reload()))
        else:
            self._reactor.callFromThread(self._reactor.stop)

    @staticmethod
    def _held(config: Config) -> List[Tuple[str, str]]:
        """The listeners the workers accept on: (kind, description)."""
        gateway = config.gateway
        return [("listen", d) for d in gateway.listen] + [("admin", d) for d in gateway.admin]

    def start_message(self, slot: int) -> Dict[str, Any]:
        """The ``start`` command for the worker in ``slot``."""
        listeners = [
            {
                "fd": worker.FIRST_LISTENER + index, "kind": kind, "description": description,
                "backlog": getattr(port, "backlog", 50), "mode": getattr(port, "mode", 0o666),
            }
            for index, ((kind, description), port) in enumerate(zip(self._held(self.config), self._listeners))
        ]
        return {"worker": slot, "path": self.config.path, "text": self._text, "listeners": listeners}

    def _spawn(self, slot: int) -> None:
        self._restarts.pop(slot, None)
        process = WorkerProcess(self, slot, self._reactor)
        child_fds: Dict[int, Any] = {worker.COMMANDS: "w", 1: "r", 2: "r", worker.ANSWERS: "r", worker.LOG: "r"}
        for index, port in enumerate(self._listeners):
            child_fds[worker.FIRST_LISTENER + index] = port.fileno()
        environ = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENVIRON}
        # The workers import openaigw from where this process did.
        home = os.path.dirname(os.path.dirname(os.path.abspath(openaigw.__file__)))
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [home, environ.get("PYTHONPATH")]))
        self._reactor.spawnProcess(
            process, sys.executable, [sys.executable, "-m", "openaigw.worker"], env=environ, childFDs=child_fds
        )
        self._workers[slot] = process

    def worker_ready(self, process: WorkerProcess) -> None:
        self._serving()
        log.info("worker {worker} serving (pid {pid})", worker=process.slot, pid=process.pid)
        if self._announced or self._stopping or not all(w.ready for w in self._workers.values()):
            return
        if len(self._workers) == self._count:
            self._announced = True
            systemd.notify("READY=1\nSTATUS=serving")
            log.info(
                "openaigw ready: {workers} workers, {routes} route(s) from {path}, listening on {listen}",
                workers=self._count, routes=len(self.config.routes), path=self.config.path,
                listen=" ".join(self.config.gateway.listen + self.config.gateway.status),
            )

    def _serving(self) -> None:
        self._running.set(sum(1 for w in self._workers.values() if w.ready))

    def worker_ended(self, process: WorkerProcess, reason: Failure) -> None:
        if self._workers.get(process.slot) is process:
            del self._workers[process.slot]
        self._serving()
        self._host.retire(process.snapshot)
        if self._stopping:
            return
        now = self._reactor.seconds()
        failures = 0 if now - process.started >= STABLE_SECONDS else self._failures.get(process.slot, 0)
        delay = min(RESTART_DELAY * 2 ** failures, MAX_RESTART_DELAY)
        self._failures[process.slot] = failures + 1
        log.warn(
            "worker {worker} (pid {pid}) ended: {reason}; starting it again in {delay}s",
            worker=process.slot, pid=process.pid, reason=reason.getErrorMessage(), delay=delay,
        )
        self._restarted.inc()
        self._restarts[process.slot] = self._reactor.callLater(delay, self._spawn, process.slot)

    def write_stdout(self, lines: bytes) -> None:
        """Whole lines from a worker's stdout, written as one piece."""
        out = sys.__stdout__
        assert out is not None
        out.flush()
        view = memoryview(lines)
        while view:
            view = view[os.write(out.fileno(), view):]

    # Reload

    async def reload(self) -> None:
        """Check the configuration file again; if valid, every worker reloads it.  The
        outcome goes to systemd's reload command."""
        systemd.notify(systemd.reloading())
        error: Optional[str] = "the reload failed (see the log)"
        try:
            error = await self._reload()
        finally:
            systemd.report_reload(error)
            systemd.notify("READY=1\nSTATUS=serving")

    async def _reload(self) -> Optional[str]:
        try:
            text = configuration.read(self.config.path)
            config = configuration.parse(text, self.config.path, os.environ)
            self._check_unchanged(config)
        except configuration.ConfigError as e:
            log.error("reload refused, still serving the previous configuration: {error}", error=str(e))
            return str(e)
        self.config, self._text = config, text
        answers = await DeferredList(
            [w.request("reload", text=text) for w in self._workers.values()], consumeErrors=True
        )
        failed = sum(1 for ok, answer in answers if not ok or answer.get("error"))
        if failed:
            log.error("reload failed in {failed} worker(s): see their log lines", failed=failed)
            return f"the reload failed in {failed} of {len(answers)} worker(s) (see the log)"
        log.info("configuration reloaded from {path} by {count} worker(s): {routes} route(s)",
                 path=config.path, count=len(answers), routes=len(config.routes))
        return None

    def _check_unchanged(self, config: Config) -> None:
        old, new = self.config.gateway, config.gateway
        changed = [
            key for key in ("listen", "status", "admin", "workers") if getattr(old, key) != getattr(new, key)
        ]
        if state_changed(old, new):
            changed.append("state")
        if changed:
            raise configuration.ConfigError(
                f"{config.path}: [gateway] {', '.join(changed)}: with several workers, a change"
                " here takes a restart"
            )

    # Metrics

    async def metrics(self) -> bytes:
        """The host's metrics: each worker's (its last if it does not answer) and ours."""
        workers = list(self._workers.values())
        answers = await DeferredList([w.request("metrics") for w in workers], consumeErrors=True)
        for process, (ok, answer) in zip(workers, answers):
            if ok and "families" in answer:
                process.snapshot = answer["families"]
        snapshots = {str(w.slot): w.snapshot for w in workers}
        snapshots["supervisor"] = snapshot(self.registry)
        return generate_latest(self._host.merge(snapshots))  # type: ignore[no-any-return]

    # Stop

    def _kill(self) -> None:
        for process in self._workers.values():
            log.error("worker {worker} did not stop in time: killing it", worker=process.slot)
            process.signal("KILL")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        systemd.notify("STOPPING=1")
        for restart in self._restarts.values():
            restart.cancel()
        self._restarts.clear()
        # The workers close their copies as they begin draining: once all are closed,
        # connecting is refused.
        await DeferredList([maybeDeferred(port.stopListening) for port in self._listeners])
        workers = list(self._workers.values())
        if workers:
            log.info("stopping: {count} worker(s) draining for up to {timeout}s",
                     count=len(workers), timeout=self.config.gateway.shutdown_timeout)
        for process in workers:
            process.signal("TERM")
        kill = self._reactor.callLater(self.config.gateway.shutdown_timeout + KILL_GRACE, self._kill)
        await gatherResults([w.wait() for w in workers])
        if kill.active():
            kill.cancel()
        await DeferredList([maybeDeferred(port.stopListening) for port in self._status_ports])

