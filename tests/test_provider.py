"""Providers: the credential header and the URL each kind of upstream expects."""

from __future__ import annotations

import pytest
from twisted.web.http_headers import Headers

from openaigw import errors
from openaigw.config import parse
from openaigw.provider import PathMapper, credential, set_credential

AZURE = """
[upstream:azure]
nodes = example.openai.azure.com
provider = azure
api_key = $ENV://AZURE_KEY
api_version = 2024-10-21
deployments =
    gpt-4o       prod-4o
    text-embedding-3-small  emb
[route:r]
uri = /v1/*
upstream = azure
"""


def upstream(text: str, name: str = "azure"):
    return parse(text, "gw.ini", {"AZURE_KEY": "az-canary", "KEY": "sk-canary"}).upstreams[name]


def with_keys(provider: str, extra: str = "") -> str:
    return f"[upstream:u]\nnodes = h\nprovider = {provider}\n{extra}\n[route:r]\nuri = /\nupstream = u\n"


def sent(config, headers: Headers) -> dict:
    set_credential(config, headers, credential(config))
    return {k.decode(): v for k, v in headers.getAllRawHeaders()}


def test_credential_per_provider():
    """openai: Bearer; azure: api-key; openai-compatible: Bearer with a key, nothing
    without one.  A key replaces the credential headers a route or client set."""
    client = lambda: Headers({b"authorization": [b"Bearer from-rewrite"], b"api-key": [b"client"],  # noqa: E731
                              b"x-other": [b"1"]})
    assert sent(upstream(with_keys("openai", "api_key = $ENV://KEY"), "u"), client()) == {
        "Authorization": [b"Bearer sk-canary"], "X-Other": [b"1"]}
    assert sent(upstream(AZURE), client()) == {"Api-Key": [b"az-canary"], "X-Other": [b"1"]}
    assert sent(upstream(with_keys("openai-compatible", "api_key = $ENV://KEY"), "u"), client()) == {
        "Authorization": [b"Bearer sk-canary"], "X-Other": [b"1"]}
    assert sent(upstream(with_keys("openai-compatible"), "u"), client()) == {"X-Other": [b"1"]}
    # Without api_key an openai upstream keeps what the route's proxy-rewrite set, as before.
    assert sent(upstream(with_keys("openai"), "u"), client())["Authorization"] == [b"Bearer from-rewrite"]


def test_key_not_in_repr():
    """The resolved key is not part of the upstream's repr (tracebacks, logs)."""
    assert "az-canary" not in repr(upstream(AZURE))


def test_azure_classic_paths():
    """Chat, completions and embeddings go to the model's deployment with the
    api-version; other paths go under /openai; a query string is kept."""
    mapper = PathMapper(upstream(AZURE))
    assert mapper.needs_model
    assert mapper.path(b"/v1/chat/completions", "gpt-4o") == (
        b"/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21")
    assert mapper.path(b"/v1/embeddings?x=1&api-version=old", "text-embedding-3-small") == (
        b"/openai/deployments/emb/embeddings?x=1&api-version=2024-10-21")
    assert mapper.path(b"/v1/completions", "gpt-4o") == (
        b"/openai/deployments/prod-4o/completions?api-version=2024-10-21")
    assert mapper.path(b"/v1/models", None) == b"/openai/models?api-version=2024-10-21"


def test_azure_without_deployment_is_a_400():
    """A model without a deployment (and no '*') is an OpenAI-shaped 400 naming it."""
    mapper = PathMapper(upstream(AZURE))
    with pytest.raises(errors.GatewayError) as caught:
        mapper.path(b"/v1/chat/completions", "gpt-5-secret-model")
    error = caught.value
    assert error.status == 400 and "gpt-5-secret-model" in error.message
    assert (error.type, error.code, error.param) == ("invalid_request_error", "model_not_found", "model")
    with pytest.raises(errors.GatewayError):
        mapper.path(b"/v1/chat/completions", None)
    default = PathMapper(upstream(AZURE.replace("    gpt-4o       prod-4o", "    *  any")))
    assert default.path(b"/v1/chat/completions", "gpt-5") == (
        b"/openai/deployments/any/chat/completions?api-version=2024-10-21")


def test_azure_v1_keeps_the_model():
    """api_version = v1: /openai/v1/... and no api-version; the body is untouched."""
    text = AZURE.replace("2024-10-21", "v1").split("deployments")[0] + "[route:r]\nuri = /\nupstream = azure\n"
    mapper = PathMapper(upstream(text))
    assert not mapper.needs_model
    assert mapper.path(b"/v1/chat/completions?a=b", "gpt-4o") == b"/openai/v1/chat/completions?a=b"


def test_path_prefix():
    """openai-compatible servers under another prefix get it in front of the path."""
    mapper = PathMapper(upstream(with_keys("openai-compatible", "path_prefix = /api/"), "u"))
    assert mapper.path(b"/v1/chat/completions?x", None) == b"/api/v1/chat/completions?x"
    assert PathMapper(upstream(with_keys("openai"), "u")).path(b"/v1/models", None) == b"/v1/models"
