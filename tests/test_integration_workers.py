"""`[gateway] workers = 2`: a real `twistd -n openaigw` supervising two worker processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from openaigw.testing import RedisServer, free_port, start_gateway, stop_process
from tests.test_integration_lifecycle import Stream, notify_socket  # noqa: F401 - a fixture

BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


def config(port: int, status: int, fake_node: int, pki, extra: str = "", gateway: str = "") -> str:
    return f"""
[gateway]
listen = tcp:port={port}:interface=127.0.0.1:backlog=511
status = tcp:port={status}:interface=127.0.0.1
workers = 2
shutdown_timeout = 5
{gateway}

[upstream:fake]
scheme = https
nodes = 127.0.0.1:{fake_node}
ca_file = {pki.ca}

[route:chat]
uri = /v1/chat/completions
upstream = fake
{extra}
"""


@pytest.fixture
def ports():
    return free_port(), free_port()


def start(tmp_path, text: str, port: int, status: int, env=None):
    """The supervisor, once both workers serve."""
    proc = start_gateway(tmp_path, text, port, env=env)
    try:
        wait_for(lambda: ready(status))
    except AssertionError:
        exited = proc.poll()
        stop_process(proc)
        raise AssertionError(f"not ready (exit {exited}):\n{(tmp_path / 'gateway.log').read_text()}") from None
    return proc


def ready(status: int) -> bool:
    try:
        return get(f"http://127.0.0.1:{status}/readyz")[0] == 200
    except OSError:
        return False


def wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def get(url: str, data: bytes = None) -> tuple:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=15) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def chat(port: int) -> int:
    return get(f"http://127.0.0.1:{port}/v1/chat/completions", BODY)[0]


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` that have ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def workers_of(pid: int) -> list:
    """The pids of ``pid``'s children."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                children.append(int(entry))
    return sorted(children)


def connections(pid: int, port: int) -> int:
    """Established connections to 127.0.0.1:``port`` that process ``pid`` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def test_two_workers_share_the_connections(pki, fake_node, tmp_path, ports):
    """Both workers accept: with 16 streams open at once, neither worker is idle; the
    supervisor accepts none itself."""
    port, status = ports
    proc = start(tmp_path, config(port, status, fake_node, pki), port, status)
    try:
        workers = workers_of(proc.pid)
        assert len(workers) == 2
        streams = [Stream(port, chunks=30, interval_ms=100) for _ in range(16)]
        for stream in streams:
            assert stream.started_reading.wait(15)
        held = {pid: connections(pid, port) for pid in workers}
        assert sum(held.values()) == 16 and all(held.values()), held
        assert connections(proc.pid, port) == 0
        for stream in streams:
            stream.join(20)
            assert stream.error is None and len(stream.events) == 31
    finally:
        stop_process(proc)


def test_metrics_sum_the_workers_and_access_lines_stay_whole(pki, fake_node, tmp_path, ports):
    """/metrics counts every worker's requests once (process figures per worker); the
    access log, a file and stdout, has one whole JSON line per request."""
    port, status = ports
    proc = start(tmp_path, config(port, status, fake_node, pki), port, status)
    try:
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(lambda _: chat(port), range(200))) == {200}
        code, text = get(f"http://127.0.0.1:{status}/metrics")
        assert code == 200
        assert metric(text, "openaigw_requests_total", route="chat", status="200") == 200
        assert metric(text, "openaigw_request_duration_seconds_count", route="chat") == 200
        assert metric(text, "openaigw_workers") == 2
        for worker in ("1", "2", "supervisor"):
            assert metric(text, "process_resident_memory_bytes", worker=worker) > 0
        assert 'worker="' not in "".join(l for l in text.splitlines() if l.startswith("openaigw_"))
        wait_for(lambda: len(access_lines(tmp_path / "gateway.log")) >= 200)
        assert len(access_lines(tmp_path / "gateway.log")) == 200
    finally:
        stop_process(proc)


def test_access_log_file_lines_stay_whole(pki, fake_node, tmp_path, ports):
    """Two workers appending to one access log file never split a line."""
    port, status = ports
    path = tmp_path / "access.log"
    proc = start(tmp_path, config(port, status, fake_node, pki, gateway=f"access_log = {path}"), port, status)
    try:
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(lambda _: chat(port), range(300))) == {200}
        wait_for(lambda: path.exists() and len(path.read_text().splitlines()) >= 300)
        assert len(access_lines(path)) == 300
    finally:
        stop_process(proc)


def access_lines(path) -> list:
    """The JSON lines of ``path``; any line that starts like one must parse whole."""
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            assert record["route"] == "chat"
            lines.append(record)
    return lines


def test_a_killed_worker_is_replaced(pki, fake_node, tmp_path, ports):
    """SIGKILL to a worker: the other serves on, a new one takes the slot after a short
    back-off, and the host's counters do not go down."""
    port, status = ports
    proc = start(tmp_path, config(port, status, fake_node, pki), port, status)
    try:
        for _ in range(20):
            assert chat(port) == 200
        before = metric(get(f"http://127.0.0.1:{status}/metrics")[1], "openaigw_requests_total")
        assert before == 20
        first, second = workers_of(proc.pid)
        os.kill(first, signal.SIGKILL)
        for _ in range(20):  # the survivor serves meanwhile
            assert chat(port) == 200
        wait_for(lambda: len(workers_of(proc.pid)) == 2 and first not in workers_of(proc.pid))
        wait_for(lambda: metric(get(f"http://127.0.0.1:{status}/metrics")[1], "openaigw_workers") == 2)
        replacement = (set(workers_of(proc.pid)) - {second}).pop()
        streams = [Stream(port, chunks=20, interval_ms=100) for _ in range(12)]
        for stream in streams:
            assert stream.started_reading.wait(15)
        assert connections(replacement, port) > 0  # the new worker accepts too
        for stream in streams:
            stream.join(20)
            assert stream.error is None
        text = get(f"http://127.0.0.1:{status}/metrics")[1]
        assert metric(text, "openaigw_worker_restarts_total") == 1
        # The killed worker's counts were scraped just before it died: none is lost.
        assert metric(text, "openaigw_requests_total") == 52
    finally:
        stop_process(proc)
    log = (tmp_path / "gateway.log").read_text()
    assert "worker 1 (pid" in log or "worker 2 (pid" in log


def test_reload_reaches_every_worker_and_a_bad_file_none(pki, fake_node, tmp_path, ports, notify_socket):
    """SIGHUP: a broken file is refused once, by the supervisor, and every worker keeps
    the old routes; a good one is taken by both workers; systemd hears from the
    supervisor alone (READY, RELOADING/READY, STOPPING)."""
    port, status = ports
    path, sock = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path}
    proc = start(tmp_path, config(port, status, fake_node, pki), port, status, env=env)
    try:
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
        (tmp_path / "gw.ini").write_text(config(port, status, fake_node, pki, "[route:bad]\nuri = x\n"))
        proc.send_signal(signal.SIGHUP)
        assert sock.recv(4096).startswith(b"RELOADING=1")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
        models = f"http://127.0.0.1:{port}/v1/models"
        assert {get(models)[0] for _ in range(10)} == {404}

        extra = "[route:models]\nuri = /v1/models\nupstream = fake\n"
        (tmp_path / "gw.ini").write_text(config(port, status, fake_node, pki, extra))
        proc.send_signal(signal.SIGHUP)
        assert sock.recv(4096).startswith(b"RELOADING=1")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
        assert {get(models)[0] for _ in range(20)} == {200}

        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert proc.wait(15) == 0
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            sock.recv(4096)
    finally:
        stop_process(proc)
    log = (tmp_path / "gateway.log").read_text()
    assert log.count("reload refused") == 1 and "worker=" not in line_of(log, "reload refused")
    assert "worker=1]" in line_of(log, "configuration reloaded from", "worker=1]")
    assert "worker=2]" in line_of(log, "configuration reloaded from", "worker=2]")


def line_of(log: str, *words: str) -> str:
    return next(line for line in log.splitlines() if all(w in line for w in words))


def test_stop_drains_streams_on_both_workers(pki, fake_node, tmp_path, ports):
    """SIGTERM: nobody can connect any more, the streams on both workers finish, and the
    supervisor exits 0."""
    port, status = ports
    proc = start(tmp_path, config(port, status, fake_node, pki), port, status)
    try:
        workers = workers_of(proc.pid)
        streams = [Stream(port, chunks=20, interval_ms=100) for _ in range(12)]
        for stream in streams:
            assert stream.started_reading.wait(15)
        assert all(connections(pid, port) for pid in workers)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        for stream in streams:
            stream.join(15)
            assert stream.error is None and len(stream.events) == 21
        assert proc.wait(15) == 0
        assert not workers_of(proc.pid)
    finally:
        stop_process(proc)


def test_limits_with_workers_are_refused(pki, fake_node, tmp_path, ports):
    """workers = 2 with a limit and state = memory: twistd refuses to start, naming the keys."""
    port, status = ports
    text = config(port, status, fake_node, pki, "limit-count.count = 10\nlimit-count.time_window = 60\n")
    with pytest.raises(RuntimeError) as error:
        start_gateway(tmp_path, text, port)
    assert "exited with 78" in str(error.value)
    assert "[route:chat] limit-count" in str(error.value)



@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (make test installs it)")
def test_limits_stay_exact_across_workers_with_redis(pki, fake_node, tmp_path, ports):
    """workers = 2 with state = redis: a limit-count of 15 admits exactly 15 of 60
    concurrent requests, served by both workers; limit-conn counts streams on both."""
    port, status = ports
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis").start()
    extra = ("limit-count.count = 15\nlimit-count.time_window = 3600\nlimit-count.key = route\n"
             "[route:conn]\nuri = /conn/chat\nupstream = fake\nlimit-conn.conn = 3\nlimit-conn.key = route\n"
             "proxy-rewrite.uri = /v1/chat/completions\n")
    gateway = f"state = redis://127.0.0.1:{redis.port}/0"
    try:
        proc = start(tmp_path, config(port, status, fake_node, pki, extra, gateway), port, status)
        try:
            with ThreadPoolExecutor(12) as pool:
                codes = list(pool.map(lambda _: chat(port), range(60)))
            assert codes.count(200) == 15 and codes.count(429) == 45
            text = get(f"http://127.0.0.1:{status}/metrics")[1]
            assert metric(text, "openaigw_requests_total", route="chat", status="429") == 45

            streams = [Stream(port, chunks=30, interval_ms=100, path="/conn/chat") for _ in range(3)]
            for stream in streams:
                assert stream.started_reading.wait(15)
            with ThreadPoolExecutor(6) as pool:  # whichever worker answers: no slot is free
                assert set(pool.map(lambda _: get(f"http://127.0.0.1:{port}/conn/chat", BODY)[0], range(6))) == {429}
            for stream in streams:
                stream.join(20)
                assert stream.error is None
        finally:
            stop_process(proc)
    finally:
        redis.stop()
