"""Fixtures shared by the integration tests: a test CA and a fake OpenAI upstream."""

import pytest

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
