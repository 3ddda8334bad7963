"""Plugins by name: the ``name.option`` keys of a route section configure them.

Adding a plugin means adding its module and one entry here.
"""

from __future__ import annotations

from typing import Dict

from openaigw.plugins.proxy_rewrite import ProxyRewrite

REGISTRY: Dict[str, ProxyRewrite] = {plugin.name: plugin for plugin in (ProxyRewrite(),)}
