"""Fixtures shared by the integration tests: a test CA and a fake OpenAI upstream."""

import contextlib
import io

import pytest

from openaigw.keygen import main as keygen

from openaigw.testing import make_test_ca, start_fake_upstream, stop_process


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA made for this run, with certificates for 127.0.0.1/localhost and a rogue one."""
    return make_test_ca(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def fake_node(pki):
    """One fake OpenAI upstream over TLS: its port."""
    proc, port = start_fake_upstream(pki.directory, name="shared")
    yield port
    stop_process(proc)


def make_keys(*names: str) -> dict:
    """Consumers' keys made with openaigw-keygen: name -> (key, the config lines it printed)."""
    made = {}
    for name in names:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            keygen([name])
        lines = [line for line in out.getvalue().splitlines() if line and not line.startswith("#")]
        made[name] = (lines[0], "\n".join(lines[1:]))
    return made
