"""The supervisor in memory: host-wide metrics, the workers' pipes, restarts and stops."""

from __future__ import annotations

import json
from typing import Any, Dict, List

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import eventAsJSON, globalLogPublisher
from twisted.python.failure import Failure

from openaigw import worker
from openaigw.accesslog import AccessRecord
from openaigw.config import parse
from openaigw.hostmetrics import HostMetrics, snapshot
from openaigw.metrics import Metrics
from openaigw.supervisor import RESTART_DELAY, STABLE_SECONDS, Supervisor, WorkerProcess

CONFIG = """
[gateway]
status = tcp:port=9091:interface=127.0.0.1
workers = 2
[upstream:u]
nodes = h:1
[route:chat]
uri = /v1/*
upstream = u
"""


def samples(collected: Any) -> Dict[tuple, float]:
    text = generate_latest(collected).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def worker_metrics(requests: int, streams: int = 0) -> Metrics:
    metrics = Metrics()
    for _ in range(requests):
        metrics.request_finished(AccessRecord(started=0, route="chat", status=200, duration=0.02))
    for _ in range(streams):
        metrics.stream_opened("chat")
    return metrics


def test_host_metrics_sum_workers_and_label_process_figures():
    """Request counts, histograms and gauges add up over the workers; process figures
    keep one sample per worker."""
    host = HostMetrics()
    merged = samples(host.merge({
        "1": snapshot(worker_metrics(3, streams=1).registry),
        "2": snapshot(worker_metrics(4, streams=2).registry),
    }))
    assert merged[("openaigw_requests_total", (("consumer", ""), ("route", "chat"), ("status", "200")))] == 7
    assert merged[("openaigw_request_duration_seconds_count", (("route", "chat"),))] == 7
    assert merged[("openaigw_request_duration_seconds_bucket", (("le", "0.025"), ("route", "chat")))] == 7
    assert merged[("openaigw_active_streams", (("route", "chat"),))] == 3
    assert ("process_cpu_seconds_total", (("worker", "1"),)) in merged
    assert ("process_cpu_seconds_total", (("worker", "2"),)) in merged
    assert not any(name == "process_cpu_seconds_total" and not labels for name, labels in merged)
    assert not any(name.endswith("_created") for name, _ in merged)


def test_a_dead_workers_counters_stay_in_the_host_totals():
    """A worker that exited leaves its counters (its last snapshot), not its gauges."""
    host = HostMetrics()
    dead = snapshot(worker_metrics(5, streams=1).registry)
    host.retire(dead)
    merged = samples(host.merge({"1": snapshot(worker_metrics(2).registry)}))
    assert merged[("openaigw_requests_total", (("consumer", ""), ("route", "chat"), ("status", "200")))] == 7
    assert ("openaigw_active_streams", (("route", "chat"),)) not in merged
    assert merged[("openaigw_request_duration_seconds_sum", (("route", "chat"),))] == 7 * 0.02


class FakeProcess:
    """The transport spawnProcess gives: what was written to the child, signals sent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: List[bytes] = []
        self.signals: List[str] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        assert fd == worker.COMMANDS
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def commands(self) -> List[Dict[str, Any]]:
        return [json.loads(line) for line in b"".join(self.written).splitlines()]


class ProcessReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: List[tuple] = []

    def spawnProcess(self, protocol: Any, executable: str, args: List[str], env: Any = None,
                     childFDs: Any = None, **kwargs: Any) -> FakeProcess:
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, args, env, childFDs))
        protocol.makeConnection(process)
        return process


def supervisor(reactor: ProcessReactor) -> Supervisor:
    return Supervisor(parse(CONFIG, "/etc/gw.ini", {}), CONFIG, reactor)


def answer(process: WorkerProcess, **fields: Any) -> None:
    """The worker answers its last command."""
    last = process.transport.commands()[-1]
    process.childDataReceived(worker.ANSWERS, json.dumps({"id": last["id"], **fields}).encode() + b"\n")


def test_workers_start_with_the_checked_text_and_without_systemds_variables(monkeypatch):
    """Each worker gets the configuration text the supervisor checked, and neither the
    notify socket nor systemd's sockets in its environment."""
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("LISTEN_FDS", "1")
    reactor = ProcessReactor()
    service = supervisor(reactor)
    service._spawn(1)
    protocol, args, env, child_fds = reactor.spawned[0]
    assert args[1:] == ["-m", "openaigw.worker"]
    assert "NOTIFY_SOCKET" not in env and "LISTEN_FDS" not in env
    assert child_fds[worker.COMMANDS] == "w" and child_fds[worker.ANSWERS] == "r"
    [start] = protocol.transport.commands()
    assert (start["op"], start["text"], start["worker"]) == ("start", CONFIG, 1)
    assert not service.ready
    answer(protocol, ready=True)
    assert protocol.ready and not service.ready  # one of two
    service._spawn(2)
    answer(reactor.spawned[1][0], ready=True)
    assert service.ready


def test_worker_output_is_passed_on_in_whole_lines():
    """stdout goes to the supervisor's stdout only in whole lines; log events join the
    supervisor's log with the worker's number."""
    reactor = ProcessReactor()
    service = supervisor(reactor)
    written: List[bytes] = []
    service.write_stdout = written.append  # type: ignore[method-assign]
    service._spawn(1)
    process = reactor.spawned[0][0]
    process.childDataReceived(1, b'{"a":1}\n{"b":')
    process.childDataReceived(1, b"2")
    process.childDataReceived(1, b'}\n{"c":3}\n')
    assert written == [b'{"a":1}\n', b'{"b":2}\n{"c":3}\n']
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        line = eventAsJSON({"log_format": "hello {who}", "who": "world", "log_namespace": "openaigw.x"})
        process.childDataReceived(worker.LOG, line.encode()[:10])
        process.childDataReceived(worker.LOG, line.encode()[10:] + b"\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e.get("who") == "world"]
    assert event["worker"] == 1 and "worker=1" in event["log_system"]


def test_a_dead_worker_is_restarted_with_a_back_off():
    """Restarts wait 0.5 s, then twice as long each time the worker dies again soon; a
    worker that ran a while is restarted at the shortest delay again."""
    reactor = ProcessReactor()
    service = supervisor(reactor)
    service._spawn(1)
    for delay in (RESTART_DELAY, 2 * RESTART_DELAY, 4 * RESTART_DELAY):
        process = reactor.spawned[-1][0]
        process.processEnded(Failure(ProcessTerminated(signal=9)))
        spawned = len(reactor.spawned)
        reactor.advance(delay - 0.01)
        assert len(reactor.spawned) == spawned
        reactor.advance(0.01)
        assert len(reactor.spawned) == spawned + 1
    reactor.advance(STABLE_SECONDS)
    reactor.spawned[-1][0].processEnded(Failure(ProcessDone(0)))
    reactor.advance(RESTART_DELAY)
    assert len(reactor.spawned) == 5


def test_stop_drains_every_worker_and_restarts_none():
    """SIGTERM: every worker is told to stop; one that exits is not restarted; the stop
    is over when all have exited."""
    reactor = ProcessReactor()
    service = supervisor(reactor)
    service._spawn(1)
    service._spawn(2)
    first, second = (spawned[0] for spawned in reactor.spawned)
    stopped = service.stopService()
    assert first.transport.signals == ["TERM"] and second.transport.signals == ["TERM"]
    first.processEnded(Failure(ProcessDone(0)))
    reactor.advance(60)
    assert len(reactor.spawned) == 2
    assert not stopped.called
    assert second.transport.signals == ["TERM", "KILL"]  # it outlived shutdown_timeout
    second.processEnded(Failure(ProcessTerminated(signal=9)))
    assert stopped.called
