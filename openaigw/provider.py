"""What each kind of upstream expects of a request: its credential header and its URL.

``provider = openai`` takes ``Authorization: Bearer``; ``azure`` an ``api-key`` header
and its own paths (built here from the OpenAI ones); ``openai-compatible`` (vLLM,
Ollama, ...) Bearer when it has a key, no credential at all otherwise, under an
optional ``path_prefix``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from twisted.web.http_headers import Headers

from openaigw import errors
from openaigw.config import UpstreamConfig

CREDENTIAL_HEADERS = (b"authorization", b"api-key")
# Operations that Azure's classic API serves under /openai/deployments/<deployment>/.
_DEPLOYMENT_OPERATIONS = frozenset((b"chat/completions", b"completions", b"embeddings"))


def credential(config: UpstreamConfig) -> Optional[Tuple[bytes, bytes]]:
    """The header (name, value) that carries ``config``'s ``api_key``, if it has one."""
    if config.api_key is None:
        return None
    key = config.api_key.encode("utf-8")
    if config.provider == "azure":
        return b"api-key", key
    return b"authorization", b"Bearer " + key


def touches_credentials(config: UpstreamConfig) -> bool:
    """Whether :func:`set_credential` changes anything for ``config``."""
    return config.api_key is not None or config.provider == "openai-compatible"


def set_credential(config: UpstreamConfig, headers: Headers, header: Optional[Tuple[bytes, bytes]]) -> None:
    """Make ``headers`` carry this upstream's credential and no other: with an
    ``api_key`` it replaces whatever the client or the route's proxy-rewrite set
    (Authorization and api-key alike); an openai-compatible upstream without one gets
    neither.  Other upstreams keep the headers as they are.  ``header`` is
    :func:`credential` of ``config`` (made once)."""
    if header is None and config.provider != "openai-compatible":
        return
    for name in CREDENTIAL_HEADERS:
        headers.removeHeader(name)
    if header is not None:
        headers.setRawHeaders(header[0], [header[1]])


class PathMapper:
    """Turns the OpenAI path a client asked for into the one ``config``'s server serves."""

    def __init__(self, config: UpstreamConfig) -> None:
        self._azure = config.provider == "azure"
        self._prefix = config.path_prefix.encode("utf-8")
        self._version = (config.api_version or "").encode("ascii")
        self._deployments: Dict[str, bytes] = {
            model: deployment.encode("ascii") for model, deployment in config.deployments
        }

    @property
    def needs_model(self) -> bool:
        """Whether :meth:`path` needs the request's model (Azure's classic API)."""
        return self._azure and self._version != b"v1"

    def path(self, path: bytes, model: Optional[str]) -> bytes:
        """The upstream path (with its query) for ``path``; raises an OpenAI-shaped
        400 when Azure has no deployment for ``model``."""
        if not self._azure:
            return self._prefix + path if self._prefix else path
        route, _, query = path.partition(b"?")
        if route.startswith(b"/openai/"):
            pass  # already an Azure path
        elif self._version == b"v1":
            route = b"/openai/v1" + _without_v1(route)
        else:
            rest = _without_v1(route)
            if rest[1:] in _DEPLOYMENT_OPERATIONS:
                route = b"/openai/deployments/%s%s" % (self._deployment(model), rest)
            else:  # /v1/models and the like: Azure serves them without a deployment
                route = b"/openai" + rest
        if self._version == b"v1":
            return route + b"?" + query if query else route
        kept = [p for p in query.split(b"&") if p and not p.startswith(b"api-version=")]
        return route + b"?" + b"&".join(kept + [b"api-version=" + self._version])

    def _deployment(self, model: Optional[str]) -> bytes:
        deployment = self._deployments.get(model) if model is not None else None
        if deployment is None:
            deployment = self._deployments.get("*")
        if deployment is not None:
            return deployment
        if model is None:
            message = "The request names no model, which Azure OpenAI needs to choose a deployment"
        else:
            message = f"The model {model[:100]!r} is not available: no Azure OpenAI deployment is configured for it"
        raise errors.GatewayError(400, message, "invalid_request_error", "model_not_found", "model",
                                  reason="no_deployment")


def _without_v1(route: bytes) -> bytes:
    return route[3:] if route.startswith(b"/v1/") else route
