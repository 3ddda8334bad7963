"""Plugins by name: the ``name.option`` keys of a route (or consumer) section configure them.

Adding a plugin means adding its module and one entry here.
"""

from __future__ import annotations

from typing import Any, Dict

from openaigw.plugins.ai_rate_limiting import AIRateLimiting
from openaigw.plugins.cache import Cache
from openaigw.plugins.key_auth import KeyAuth
from openaigw.plugins.limits import LimitConn, LimitCount, LimitReq
from openaigw.plugins.proxy_rewrite import ProxyRewrite

REGISTRY: Dict[str, Any] = {
    plugin.name: plugin
    for plugin in (KeyAuth(), LimitConn(), LimitCount(), LimitReq(), AIRateLimiting(), ProxyRewrite(),
                   Cache())
}
