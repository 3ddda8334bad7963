"""key-auth: requests need a gateway key; the consumer's name replaces it upstream."""

from __future__ import annotations

from typing import Any, Optional

from zope.interface import implementer

from openaigw.config import PluginOptions
from openaigw.consumers import STORED_CREDENTIAL_HEADERS, KeyRing, presented_key
from openaigw.errors import GatewayError
from openaigw.exchange import Exchange
from openaigw.filters import run_filters
from openaigw.headers import stored_name
from openaigw.interfaces import IPlugin, IRequestFilter


_X_CONSUMER_USERNAME = stored_name(b"x-consumer-username")


def invalid_key(message: str) -> GatewayError:
    return GatewayError(
        401, message, "invalid_request_error", "invalid_api_key",
        headers={"WWW-Authenticate": 'Bearer realm="openaigw"'}, reason="key-auth",
    )


@implementer(IRequestFilter)
class KeyAuthFilter:
    """Finds the consumer by key, drops the key, names the consumer, applies its limits."""

    def __init__(self, keyring: KeyRing) -> None:
        self._keyring = keyring

    def filter_request(self, exchange: Exchange) -> Any:
        key = presented_key(exchange.request.requestHeaders)
        if key is None:
            raise invalid_key(
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'"
                " (or an api-key or X-API-Key header)."
            )
        consumer = self._keyring.find(key)
        if consumer is None:
            raise invalid_key("Incorrect API key provided.")
        exchange.consumer = consumer.name
        fields = exchange.headers._rawHeaders  # (see openaigw.headers)
        for name in STORED_CREDENTIAL_HEADERS:
            fields.pop(name, None)
        fields[_X_CONSUMER_USERNAME] = [consumer.username]
        if consumer.filters:
            return run_filters(consumer.filters, exchange)
        return None


@implementer(IPlugin)
class KeyAuth:
    name = "key-auth"
    priority = 100
    scopes = ("route",)

    def parse(self, options: PluginOptions) -> Optional[bool]:
        for option in options.options():
            if option:
                raise options.error(option, "unknown option (key-auth = on | off)")
        if not options.section.flag(options.key(""), False):
            return None
        if not options.consumers:
            raise options.error("", "no [consumer:NAME] section defines a key")
        return True

    def create(self, settings: bool, runtime: Any, scope: str) -> KeyAuthFilter:
        return KeyAuthFilter(runtime.keyring)
