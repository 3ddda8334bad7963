"""Reload and graceful stop of a real `twistd -n openaigw`, with systemd's notify socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from openaigw import systemd
from openaigw.testing import free_port, start_gateway, stop_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(systemd.__file__)))
MESSAGES = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'


def config(port: int, fake_node: int, pki, extra: str = "", shutdown_timeout: float = 3) -> str:
    return f"""
[gateway]
listen = tcp:port={port}:interface=127.0.0.1
shutdown_timeout = {shutdown_timeout}

[upstream:fake]
scheme = https
nodes = 127.0.0.1:{fake_node}
ca_file = {pki.ca}

[route:chat]
uri = /v1/chat/completions
upstream = fake
{extra}
"""


class Stream(threading.Thread):
    """Reads a streamed completion in the background; records the events and how it ended."""

    def __init__(self, port: int, chunks: int, interval_ms: int, path: str = "/v1/chat/completions") -> None:
        super().__init__(daemon=True)
        self.request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", data=MESSAGES,
            headers={"X-Fake-Chunks": str(chunks), "X-Fake-Interval-Ms": str(interval_ms)},
        )
        self.events: list = []
        self.error = None
        self.started_reading = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            with urllib.request.urlopen(self.request, timeout=30) as response:
                for line in response:
                    if line.startswith(b"data: "):
                        self.events.append(line)
                        self.started_reading.set()
        except Exception as e:  # noqa: BLE001 - the test inspects it
            self.error = e
            self.started_reading.set()


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield path, sock
    sock.close()


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_reload_and_graceful_stop(pki, fake_node, tmp_path, notify_socket):
    """SIGHUP: a broken file keeps the old config, a valid change takes effect, a stream in
    flight survives; SIGTERM: a short stream finishes, exit status 0; systemd is told."""
    path, sock = notify_socket
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": path}
    proc = start_gateway(tmp_path, config(port, fake_node, pki), port, env=env)
    try:
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
        stream = Stream(port, chunks=20, interval_ms=100)
        assert stream.started_reading.wait(10)

        (tmp_path / "gw.ini").write_text("[gateway]\nbroken")
        proc.send_signal(signal.SIGHUP)
        assert sock.recv(4096).startswith(b"RELOADING=1")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
        assert status_of(f"http://127.0.0.1:{port}/v1/models") == 404

        (tmp_path / "gw.ini").write_text(config(port, fake_node, pki, "[route:models]\nuri = /v1/models\nupstream = fake\n"))
        proc.send_signal(signal.SIGHUP)
        assert sock.recv(4096).startswith(b"RELOADING=1")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
        assert status_of(f"http://127.0.0.1:{port}/v1/models") == 200

        stream.join(15)
        assert stream.error is None and len(stream.events) == 21  # 20 chunks and [DONE]

        short = Stream(port, chunks=10, interval_ms=100)
        assert short.started_reading.wait(10)
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        time.sleep(0.3)
        with pytest.raises(OSError):  # no longer accepting
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        short.join(10)
        assert short.error is None and len(short.events) == 11
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)
    log = (tmp_path / "gateway.log").read_text()
    assert "reload refused" in log and "configuration reloaded" in log


def test_stop_aborts_what_outlives_shutdown_timeout(pki, fake_node, tmp_path):
    """A stream longer than shutdown_timeout is cut at the timeout, and the exit is still 0."""
    port = free_port()
    proc = start_gateway(tmp_path, config(port, fake_node, pki, shutdown_timeout=1), port)
    try:
        stream = Stream(port, chunks=100, interval_ms=100)
        assert stream.started_reading.wait(10)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert 0.9 < time.monotonic() - began < 5
        stream.join(5)
        assert stream.error is not None and len(stream.events) < 100
    finally:
        stop_process(proc)


def test_reload_command_fails_with_the_daemons_reason(pki, fake_node, tmp_path):
    """ExecReload's `python3 -m openaigw.systemd reload PID` exits 1 with the daemon's
    reason for a broken file (the daemon goes on serving), 0 for a valid one."""
    port = free_port()
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "RUNTIME_DIRECTORY": str(run)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    proc = start_gateway(tmp_path, config(port, fake_node, pki), port, env=env)

    def reload() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "openaigw.systemd", "reload", str(proc.pid)],
                              capture_output=True, text=True, env=env, timeout=60)

    try:
        (tmp_path / "gw.ini").write_text(config(port, fake_node, pki, "[route:x]\nuri = /x\nupstream = nowhere\n"))
        done = reload()
        assert done.returncode == 1
        assert done.stderr.startswith("openaigw: reload failed: ") and "no section [upstream:nowhere]" in done.stderr
        assert status_of(f"http://127.0.0.1:{port}/v1/models") == 404  # still serving
        (tmp_path / "gw.ini").write_text(config(port, fake_node, pki, "[route:models]\nuri = /v1/models\nupstream = fake\n"))
        done = reload()
        assert (done.returncode, done.stderr) == (0, "")
        assert status_of(f"http://127.0.0.1:{port}/v1/models") == 200
    finally:
        stop_process(proc)


def test_reload_command_times_out(tmp_path):
    """A daemon that gives no outcome fails the reload once the timeout is over."""
    ignoring = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                 "signal.signal(signal.SIGHUP, signal.SIG_IGN); print(1, flush=True); time.sleep(30)"],
                                stdout=subprocess.PIPE)
    try:
        ignoring.stdout.readline()  # SIGHUP is ignored from here on
        with pytest.raises(TimeoutError, match="no answer from process"):
            systemd.reload(ignoring.pid, str(tmp_path), timeout=0.5)
    finally:
        stop_process(ignoring)
