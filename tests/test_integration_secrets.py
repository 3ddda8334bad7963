"""Secret references in a real `twistd openaigw`: errors at start-up, with --check and on
SIGHUP quote them as written; the canary values they resolve to appear nowhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import openaigw
from openaigw.testing import free_port, start_gateway, stop_process

CANARY = "5d2e81c4"  # in every secret below: must appear in no output or log
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(openaigw.__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--nodaemon", "--pidfile="]


def config(port: int, fake_node: int, ca: str, uri: str = "/v1/chat/completions", upstream: str = "fake") -> str:
    return f"""
[gateway]
listen = tcp:port={port}:interface=127.0.0.1

[upstream:fake]
nodes = 127.0.0.1:{fake_node}
ca_file = {ca}

[route:chat]
uri = {uri}
upstream = {upstream}
"""


@pytest.fixture
def secrets(tmp_path):
    """An environment whose $ENV, $FILE and $CREDENTIAL secrets are all canaries."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "upstream").write_text(f"canary-upstream-{CANARY}\n")
    (tmp_path / "ca-path").write_text(f"/nonexistent/canary-ca-{CANARY}.pem\n")
    env = {**os.environ, "GW_URI": f"canary-uri-{CANARY}", "CREDENTIALS_DIRECTORY": str(credentials)}
    return env, f"$FILE://{tmp_path}/ca-path"


def bad_configs(port: int, fake_node: int, pki, ca_reference: str) -> dict:
    """One file per key holding a reference to a canary, each invalid because of it."""
    return {
        "$ENV://GW_URI": config(port, fake_node, pki.ca, uri="$ENV://GW_URI"),
        "$CREDENTIAL://upstream": config(port, fake_node, pki.ca, upstream="$CREDENTIAL://upstream"),
        ca_reference: config(port, fake_node, ca_reference),
    }


@pytest.mark.parametrize("check", [False, True], ids=["start-up", "--check"])
def test_start_up_errors_quote_references(pki, fake_node, tmp_path, secrets, check):
    """twistd refuses each file (exit 78) naming the reference, never its value."""
    env, ca_reference = secrets
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    for reference, text in bad_configs(free_port(), fake_node, pki, ca_reference).items():
        path = tmp_path / "gw.ini"
        path.write_text(text)
        done = subprocess.run(
            TWISTD + ["openaigw", "-c", str(path)] + (["--check"] if check else []),
            stdin=subprocess.DEVNULL, capture_output=True, env=env, cwd=tmp_path, timeout=60,
        )
        output = (done.stdout + done.stderr).decode()
        assert done.returncode == 78, output
        assert reference in output and CANARY not in output and "canary" not in output, output


def test_reload_errors_quote_references(pki, fake_node, tmp_path, secrets):
    """SIGHUP with each bad file: refused, logged with the reference, never its value."""
    env, ca_reference = secrets
    port = free_port()
    proc = start_gateway(tmp_path, config(port, fake_node, pki.ca), port, env=env)
    log = tmp_path / "gateway.log"
    try:
        for number, (reference, text) in enumerate(bad_configs(port, fake_node, pki, ca_reference).items(), 1):
            (tmp_path / "gw.ini").write_text(text)
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while log.read_text().count("reload refused") < number:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            assert reference in log.read_text().rsplit("reload refused", 1)[1]
    finally:
        stop_process(proc)
    text = log.read_text()
    assert CANARY not in text and "canary" not in text, text
