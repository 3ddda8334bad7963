"""A limit's rejected_code and rejected_msg (APISIX's), in memory."""

from __future__ import annotations

import pytest

from openaigw.config import ConfigError, parse

from tests.memory import Gateway
from tests.test_limits import CONFIG, KEY_A, KEY_B, answer, completion, error_of, headers_of, status, with_key


def test_limit_count_rejected_code_and_msg():
    """The status and message are the route's; the body stays OpenAI-shaped, Retry-After stays."""
    config = CONFIG.replace("limit-count.count = 3", "limit-count.count = 1\nlimit-count.rejected_code = 503\n"
                            "limit-count.rejected_msg = Team quota used up, try later")
    gw = Gateway(config)
    _, client = gw.client(with_key(KEY_B))
    gw.upstream(0).send(answer(completion()))
    _, client = gw.client(with_key(KEY_B))
    assert client.value().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    error = error_of(client.value())
    assert error == {"message": "Team quota used up, try later", "type": "requests", "param": None,
                     "code": "rate_limit_exceeded"}
    assert headers_of(client.value())[b"retry-after"] == b"60"


def test_unusual_codes_and_the_default():
    """Any code 200-599 (one without a standard reason too); a consumer's limit keeps its own (429)."""
    config = CONFIG.replace("limit-count.count = 3", "limit-count.count = 30\nlimit-req.rate = 1\n"
                            "limit-req.nodelay = on\nlimit-req.rejected_code = 599")
    gw = Gateway(config)
    gw.client(with_key(KEY_B))
    _, client = gw.client(with_key(KEY_B))
    assert client.value().startswith(b"HTTP/1.1 599 Unknown Status\r\n")
    assert "1/s, burst 0" in error_of(client.value())["message"]
    gw = Gateway(CONFIG.replace("limit-count.count = 3", "limit-count.count = 30\nlimit-count.rejected_code = 503"))
    for i in range(5):
        gw.client(with_key(KEY_A))
        gw.upstream(i).send(answer(completion()))
    _, client = gw.client(with_key(KEY_A))  # team-a's own limit (5/h) has no rejected_code
    assert status(client.value()) == 429


def test_limit_conn_rejected_code():
    config = CONFIG.replace("limit-count.count = 3", "limit-conn.conn = 1\nlimit-conn.rejected_code = 403\n"
                            "limit-count.count = 30")
    gw = Gateway(config)
    gw.client(with_key(KEY_B))
    _, second = gw.client(with_key(KEY_B))
    assert second.value().startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert headers_of(second.value())[b"retry-after"] == b"1"


@pytest.mark.parametrize("line, expected", [
    ("limit-count.rejected_code = 199", "[route:chat] limit-count.rejected_code: '199' must be at least 200"),
    ("limit-count.rejected_code = 600", "[route:chat] limit-count.rejected_code: '600': expected 200 to 599"),
    ("limit-count.rejected_code = busy", "limit-count.rejected_code: 'busy' is not a whole number"),
    ("limit-count.rejected_msg =", "[route:chat] limit-count.rejected_msg: must be one line, not empty"),
    ("ai-rate-limiting.limit = 5\nai-rate-limiting.time_window = 5\nai-rate-limiting.rejected_code = 503",
     "[route:chat] ai-rate-limiting.rejected_code: unknown option"),
])
def test_rejection_config_errors(line, expected):
    with pytest.raises(ConfigError) as caught:
        parse(CONFIG.replace("limit-count.count = 3", f"limit-count.count = 3\n{line}"), "gw.ini", {})
    assert expected in str(caught.value)


@pytest.mark.parametrize("code", [204, 304])
def test_rejected_with_a_code_that_has_no_body(code):
    """A 204 or 304 has no body (RFC 9110 15.3.5, 15.4.5): the rejection sends none and
    announces none (a Content-Length there would desynchronise a proxy in front); the
    connection stays usable."""
    config = CONFIG.replace("limit-count.count = 3", f"limit-count.count = 1\nlimit-count.rejected_code = {code}")
    gw = Gateway(config)
    channel, client = gw.client(with_key(KEY_B))
    gw.upstream(0).send(answer(completion()))
    client.clear()
    channel.dataReceived(with_key(KEY_B))
    raw = client.value()
    assert status(raw) == code
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body == b"" and b"content-length" not in head.lower() and b"content-type" not in head.lower()
    assert headers_of(raw)[b"retry-after"] == b"60"
    client.clear()
    channel.dataReceived(with_key(KEY_B))  # the next request on the connection: parsed as one
    assert status(client.value()) == code and not client.disconnecting
