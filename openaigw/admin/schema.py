"""APISIX-shaped JSON objects -> the configuration objects gw.ini produces.

This module checks the JSON's shape (field names, JSON types) and maps APISIX's field
names to gw.ini's keys; the values then go through gw.ini's own parsers, as a section
of ``key = value`` lines.  So an object made through the Admin API is validated by the
same code as one in gw.ini (plugins included: their ``parse`` reads the section), and
errors name the JSON field.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from openaigw import config, secrets
from openaigw.config import ConfigError, ConsumerConfig, RouteConfig, Section, UpstreamConfig

ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_METADATA = {"id": "string", "name": "string", "desc": "string", "labels": "object",
             "create_time": "integer", "update_time": "integer"}


class AdminError(Exception):
    """An answer of the Admin API other than success: ``{"error_msg": message}``
    (``{"message": ...}`` for 404s, as APISIX)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def invalid(field: str, message: str) -> AdminError:
    return AdminError(400, f'invalid configuration: property "{field}" validation failed: {message}')


def unsupported(field: str) -> AdminError:
    return AdminError(400, f'invalid configuration: property "{field}" is not supported by openaigw')


_TYPES: Dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)
    or isinstance(v, float) and v.is_integer(),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def _json_type(value: Any) -> str:
    for name in ("boolean", "integer", "number", "string", "object", "array"):
        if _TYPES[name](value):
            return name
    return "null"


def check_type(value: Any, expected: str, field: str) -> Any:
    """``value`` if it has the JSON type ``expected`` (integers as ``int``)."""
    if not _TYPES[expected](value):
        raise invalid(field, f"wrong type: expected {expected}, got {_json_type(value)}")
    return int(value) if expected == "integer" else value


def check_fields(value: Dict[str, Any], known: Mapping[str, str], field: str = "") -> None:
    """Every key of ``value`` is known (``name -> JSON type``, ``""``: any) and has its type."""
    for name, item in value.items():
        where = f"{field}.{name}" if field else name
        if name not in known:
            raise unsupported(where)
        if known[name]:
            check_type(item, known[name], where)


def check_metadata(value: Dict[str, Any]) -> None:
    labels = value.get("labels", {})
    for name, label in labels.items():
        check_type(label, "string", f"labels.{name}")


def _text(value: Any) -> str:
    """A JSON scalar as gw.ini would write it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class Flat:
    """The gw.ini keys a JSON object maps to, with the JSON field each came from."""

    def __init__(self) -> None:
        self.items: Dict[str, str] = {}
        self.fields: Dict[Optional[str], str] = {}

    def set(self, key: str, value: Any, field: str) -> None:
        self.items[key] = _text(value)
        self.fields[key] = field


class JsonSection(Section):
    """A section made from a JSON object: errors name the JSON field, not the key."""

    def __init__(self, name: str, flat: Flat, environ: Mapping[str, str]) -> None:
        super().__init__("Admin API", name, flat.items, environ)
        self._fields = flat.fields

    def error(self, key: Optional[str], message: str) -> ConfigError:
        field = self._fields.get(key) or self._fields.get(None) or str(key)
        return ConfigError(invalid(field, message).message)


def _parsed(parse: Callable[[], Any]) -> Any:
    try:
        return parse()
    except ConfigError as e:
        raise AdminError(400, str(e)) from None


# --- plugins ---------------------------------------------------------------------------

# APISIX's field -> (our option, JSON type), per plugin.
_LIMIT_FIELDS: Dict[str, Dict[str, Tuple[str, str]]] = {
    "limit-count": {"count": ("count", "integer"), "time_window": ("time_window", "integer")},
    "limit-req": {"rate": ("rate", "number"), "burst": ("burst", "number"),
                  "nodelay": ("nodelay", "boolean")},
    "limit-conn": {"conn": ("conn", "integer")},
    "ai-rate-limiting": {"limit": ("limit", "integer"), "time_window": ("time_window", "integer"),
                         "limit_strategy": ("limit_strategy", "string")},
}
_LIMIT_COMMON = {"key_type": "string", "key": "string", "rejected_code": "integer", "rejected_msg": "string",
                 "policy": "string"}
_VARS = {"remote_addr": "remote_addr", "consumer_name": "consumer"}


def _limit(name: str, conf: Dict[str, Any], field: str, flat: Flat) -> None:
    fields = _LIMIT_FIELDS[name]
    extra = {"burst": "number", "default_conn_delay": "number"} if name == "limit-conn" else {}
    check_fields(conf, {**{k: t for k, (_, t) in fields.items()}, **_LIMIT_COMMON, **extra}, field)
    for apisix, (option, _) in fields.items():
        if apisix in conf:
            flat.set(f"{name}.{option}", conf[apisix], f"{field}.{apisix}")
    for option in ("rejected_code", "rejected_msg"):
        if option not in conf:
            continue
        if name == "ai-rate-limiting":  # it refuses with a 429, which the OpenAI SDKs back off from
            if option == "rejected_msg" or conf[option] != 429:
                raise invalid(f"{field}.{option}", "openaigw's ai-rate-limiting rejects with its own 429")
        else:
            flat.set(f"{name}.{option}", conf[option], f"{field}.{option}")
    if conf.get("policy", "local") != "local":
        raise invalid(f"{field}.policy", 'limits count in the [gateway] state store; give "local" or leave it out')
    if name == "limit-conn" and conf.get("burst", 0) != 0:
        raise invalid(f"{field}.burst", "openaigw rejects above conn at once (burst 0)")
    key_type = conf.get("key_type", "var")
    key = conf.get("key")
    if key_type == "constant":
        flat.set(f"{name}.key", "route", f"{field}.key_type")
    elif key_type != "var":
        raise invalid(f"{field}.key_type", 'openaigw supports "var" and "constant"')
    elif key is not None:
        if key in _VARS:
            key = _VARS[key]
        elif key.startswith("http_") and len(key) > 5:
            key = "header:" + key[5:].replace("_", "-")
        elif not (key in ("consumer", "route") or key.startswith("header:")):
            raise invalid(f"{field}.key", "expected remote_addr, consumer_name or http_NAME")
        flat.set(f"{name}.key", key, f"{field}.key")


def _proxy_rewrite(conf: Dict[str, Any], field: str, flat: Flat) -> None:
    check_fields(conf, {"uri": "string", "headers": "object"}, field)
    if "uri" in conf:
        flat.set("proxy-rewrite.uri", conf["uri"], f"{field}.uri")
    headers = conf.get("headers", {})
    field = f"{field}.headers"
    if not set(headers) <= {"set", "add", "remove"}:  # APISIX's older form: names to set
        headers = {"set": headers}
    else:
        check_fields(headers, {"set": "object", "add": "object", "remove": "array"}, field)
    for action in ("set", "add"):
        for name, value in headers.get(action, {}).items():
            where = f"{field}.{action}.{name}"
            check_type(value, "string", where)
            flat.set(f"proxy-rewrite.headers.{action}.{name}", value, where)
    if "remove" in headers:
        for number, name in enumerate(headers["remove"]):
            check_type(name, "string", f"{field}.remove[{number}]")
            if not name or any(c.isspace() for c in name):
                raise invalid(f"{field}.remove[{number}]", f"{name!r} is not a header name")
        flat.set("proxy-rewrite.headers.remove", " ".join(headers["remove"]), f"{field}.remove")


def _cache(conf: Dict[str, Any], field: str, flat: Flat) -> None:
    """openaigw's own: ``{"ttl": 3600, "scope": "consumer", "max_entry_size": "1M", "memory": "64M"}``."""
    check_fields(conf, {"ttl": "number", "scope": "string", "max_entry_size": "", "memory": ""}, field)
    flat.set("cache", True, field)
    for option in ("ttl", "scope", "max_entry_size", "memory"):
        if option in conf:
            flat.set(f"cache.{option}", conf[option], f"{field}.{option}")


def _plugins(value: Dict[str, Any], scope: str, flat: Flat) -> None:
    from openaigw.plugins import REGISTRY

    plugins = check_type(value.get("plugins", {}), "object", "plugins")
    for name, conf in plugins.items():
        field = f"plugins.{name}"
        if name == "key-auth" and scope == "consumer":
            continue  # the consumer's key: see consumer()
        if name not in REGISTRY:
            known = ", ".join(sorted(REGISTRY))
            raise AdminError(400, f"unknown plugin [{name}] (openaigw has {known})")
        if scope not in REGISTRY[name].scopes:
            raise AdminError(400, f"plugin [{name}] cannot be configured on a {scope}")
        check_type(conf, "object", field)
        if name == "key-auth":
            check_fields(conf, {}, field)
            flat.set("key-auth", True, field)
        elif name == "proxy-rewrite":
            _proxy_rewrite(conf, field, flat)
        elif name == "cache":
            _cache(conf, field, flat)
        else:
            _limit(name, conf, field, flat)


# --- upstreams ---------------------------------------------------------------------------

_UPSTREAM_FIELDS = {
    **_METADATA, "nodes": "", "type": "string", "scheme": "string", "pass_host": "string",
    "upstream_host": "string", "timeout": "object", "retries": "integer",
    "keepalive_pool": "object", "ca_file": "string", "max_connections": "integer",
    "api_key": "string", "provider": "string", "path_prefix": "string", "api_version": "string",
    "deployments": "object", "checks": "object",
}
# APISIX's health check fields -> gw.ini's checks.* keys (openaigw counts any failure).
_CHECKS = {
    "active": ("object", {"http_path": ("string", "checks.active.path"), "timeout": ("number", "checks.active.timeout"),
                          "healthy": ("object", {"interval": ("number", "checks.active.interval"),
                                                 "successes": ("integer", "checks.active.healthy")}),
                          "unhealthy": ("object", {"interval": ("number", "checks.active.interval"),
                                                   "http_failures": ("integer", "checks.active.unhealthy")})}),
    "passive": ("object", {"unhealthy": ("object", {"http_failures": ("integer", "checks.passive.failures")}),
                           "cooldown": ("number", "checks.passive.cooldown")}),
    "max_cooldown": ("number", "checks.max_cooldown"),
}


def _checks(value: Dict[str, Any], known: Mapping[str, Any], field: str, flat: Flat) -> None:
    check_fields(value, {name: kind for name, (kind, _) in known.items()}, field)
    for name, item in value.items():
        kind, target = known[name]
        if kind == "object":
            _checks(item, target, f"{field}.{name}", flat)
        elif target in flat.items and flat.items[target] != _text(item):
            raise invalid(f"{field}.{name}", f"openaigw has one {target}: give the same value as {flat.fields[target]}")
        else:
            flat.set(target, item, f"{field}.{name}")


def _nodes(nodes: Any, field: str) -> str:
    lines = []
    if isinstance(nodes, dict):
        for address, weight in nodes.items():
            check_type(weight, "integer", f"{field}.{address}")
            if not address or any(c.isspace() for c in address):
                raise invalid(field, f"{address!r} is not host:port")
            lines.append(f"{address} {int(weight)}")
    elif isinstance(nodes, list):
        for number, node in enumerate(nodes):
            where = f"{field}[{number}]"
            check_fields(check_type(node, "object", where),
                         {"host": "string", "port": "integer", "weight": "integer"}, where)
            host = node.get("host")
            if not host or any(c.isspace() or c in "[]/" for c in host):
                raise invalid(f"{where}.host", "is required (a host name or address)")
            if "weight" not in node:
                raise invalid(f"{where}.weight", "is required")
            host = f"[{host}]" if ":" in host else host
            port = f":{int(node['port'])}" if "port" in node else ""
            lines.append(f"{host}{port} {int(node['weight'])}")
    else:
        raise invalid(field, f"wrong type: expected object or array, got {_json_type(nodes)}")
    return "\n".join(lines)


def upstream(name: str, value: Dict[str, Any], environ: Mapping[str, str], field: str = "") -> UpstreamConfig:
    """The ``UpstreamConfig`` named ``name`` for an APISIX upstream object."""
    prefix = f"{field}." if field else ""
    check_fields(value, _UPSTREAM_FIELDS, field)
    check_metadata(value)
    flat = Flat()
    flat.fields[None] = field or "nodes"
    if "nodes" not in value:
        raise invalid(f"{prefix}nodes", "is required")
    flat.set("nodes", _nodes(value["nodes"], f"{prefix}nodes"), f"{prefix}nodes")
    for key in ("type", "scheme", "pass_host", "upstream_host", "retries", "ca_file", "max_connections",
                "api_key", "provider", "path_prefix", "api_version"):
        if key in value:
            flat.set(key, value[key], f"{prefix}{key}")
    if "deployments" in value:  # {"model": "deployment"} ("*": any model)
        for model, deployment in value["deployments"].items():
            check_type(deployment, "string", f"{prefix}deployments.{model}")
        lines = "\n".join(f"{model} {deployment}" for model, deployment in value["deployments"].items())
        flat.set("deployments", lines, f"{prefix}deployments")
    _checks(value.get("checks", {}), _CHECKS, f"{prefix}checks", flat)
    timeout = value.get("timeout", {})
    check_fields(timeout, {"connect": "number", "send": "number", "read": "number"}, f"{prefix}timeout")
    for key in ("connect", "read"):
        if key in timeout:
            flat.set(f"timeout_{key}", timeout[key], f"{prefix}timeout.{key}")
    if timeout.get("send", 1) <= 0:  # the request is written within connect + read
        raise invalid(f"{prefix}timeout.send", "must be above 0")
    pool = value.get("keepalive_pool", {})
    check_fields(pool, {"size": "integer", "idle_timeout": "number"}, f"{prefix}keepalive_pool")
    if "size" in pool:
        flat.set("keepalive_pool", pool["size"], f"{prefix}keepalive_pool.size")
    if "idle_timeout" in pool:
        flat.set("keepalive_timeout", pool["idle_timeout"], f"{prefix}keepalive_pool.idle_timeout")
    section = JsonSection(f"upstream:{name}", flat, environ)
    return _parsed(lambda: config.parse_upstream(section))


# --- routes ------------------------------------------------------------------------------

_ROUTE_FIELDS = {
    **_METADATA, "uri": "string", "uris": "array", "methods": "array", "host": "string", "hosts": "array",
    "priority": "integer", "status": "integer", "upstream": "object", "upstream_id": "string", "plugins": "object",
    "fallback": "array", "fallback_on": "array",
}


def inline_upstream(route_id: str) -> str:
    """The name of a route's inline upstream (``:`` cannot be in an id)."""
    return f"route:{route_id}"


def route(
    route_id: str, value: Dict[str, Any], upstreams: Mapping[str, UpstreamConfig],
    consumers: Tuple[str, ...], environ: Mapping[str, str],
) -> Tuple[RouteConfig, Optional[UpstreamConfig], Section]:
    """The ``RouteConfig`` for an APISIX route object, its inline upstream if it has
    one, and the section it was parsed from (for errors about it)."""
    if isinstance(value.get("upstream_id"), int):
        value = {**value, "upstream_id": str(value["upstream_id"])}
    check_fields(value, _ROUTE_FIELDS)
    check_metadata(value)
    if value.get("status", 1) not in (0, 1):
        raise invalid("status", "expected 1 (enabled) or 0 (disabled)")
    flat = Flat()
    if "uri" in value and "uris" in value:
        raise AdminError(400, 'invalid configuration: give "uri" or "uris", not both')
    uris = [value["uri"]] if "uri" in value else value.get("uris")
    field = "uri" if "uri" in value else "uris"
    if not uris:
        raise invalid(field, "is required (a path, or a prefix ending in *)")
    for number, uri in enumerate(uris):
        where = field if field == "uri" else f"uris[{number}]"
        check_type(uri, "string", where)
        if not uri or any(c.isspace() for c in uri):
            raise invalid(where, f"{uri!r}: a path starting with '/', optionally ending in '*'")
    flat.set("uri", " ".join(uris), field)
    if "methods" in value:
        methods = value["methods"]
        for number, method in enumerate(methods):
            check_type(method, "string", f"methods[{number}]")
        if not methods:
            raise invalid("methods", "give at least one method, or leave methods out")
        flat.set("methods", " ".join(methods), "methods")
    if "host" in value and "hosts" in value:
        raise AdminError(400, 'invalid configuration: give "host" or "hosts", not both')
    if "host" in value or "hosts" in value:
        field = "host" if "host" in value else "hosts"
        hosts = [value["host"]] if field == "host" else value["hosts"]
        for number, host in enumerate(hosts):
            where = field if field == "host" else f"hosts[{number}]"
            check_type(host, "string", where)
            if not host or any(c.isspace() or c == "," for c in host):
                raise invalid(where, f"{host!r} is not a host name (e.g. api.example.com, *.example.com)")
        if not hosts:
            raise invalid("hosts", "give at least one host, or leave hosts out")
        flat.set("hosts", " ".join(hosts), field)
    if "priority" in value:
        flat.set("priority", value["priority"], "priority")
    inline = None
    if "upstream" in value and "upstream_id" in value:
        raise AdminError(400, 'invalid configuration: give "upstream" or "upstream_id", not both')
    if "upstream" in value:
        name = inline_upstream(route_id)
        inline = upstream(name, value["upstream"], environ, "upstream")
        upstreams = {**upstreams, name: inline}
    elif "upstream_id" in value:
        name = value["upstream_id"]
        if name not in upstreams:
            raise AdminError(400, f"failed to fetch upstream info by upstream id [{name}]: no such upstream")
    else:
        raise AdminError(400, 'invalid configuration: missing upstream: give "upstream" or "upstream_id"')
    flat.set("upstream", name, "upstream_id")
    for key in ("fallback", "fallback_on"):  # upstream ids tried after the route's own; on what
        if key in value:
            for number, item in enumerate(value[key]):
                check_type(item, "string", f"{key}[{number}]")
                if not item or any(c.isspace() for c in item):
                    raise invalid(f"{key}[{number}]", f"{item!r} is not a name")
            flat.set(key, " ".join(value[key]), key)
    _plugins(value, "route", flat)
    section = JsonSection(f"route:{route_id}", flat, environ)
    return _parsed(lambda: config.parse_route(section, upstreams, consumers)), inline, section


# --- consumers ---------------------------------------------------------------------------

_CONSUMER_FIELDS = {**_METADATA, "username": "string", "plugins": "object"}


def consumer(
    username: str, value: Dict[str, Any], consumers: Tuple[str, ...], environ: Mapping[str, str]
) -> ConsumerConfig:
    """The ``ConsumerConfig`` for an APISIX consumer object (stored or as sent)."""
    check_fields(value, _CONSUMER_FIELDS)
    check_metadata(value)
    flat = Flat()
    field = "plugins.key-auth"
    flat.fields[None] = f"{field}.key"
    auth = check_type(value.get("plugins", {}).get("key-auth", {}), "object", field)
    check_fields(auth, {"key": "string", "key_sha256": "string"}, field)
    for name in ("key", "key_sha256"):
        if name in auth:
            flat.set(name, auth[name], f"{field}.{name}")
    _plugins(value, "consumer", flat)
    section = JsonSection(f"consumer:{username}", flat, environ)
    return _parsed(lambda: config.parse_consumer(section, consumers))


def stored_consumer(value: Dict[str, Any], parsed: ConsumerConfig) -> Dict[str, Any]:
    """What is kept of a consumer: its key as a SHA-256 digest (or a secret reference)."""
    plugins = dict(value.get("plugins", {}))
    key = plugins.get("key-auth", {}).get("key")
    if key is None or not secrets.has_reference(key):
        plugins["key-auth"] = {"key_sha256": parsed.key_digest.hex()}
    return {**value, "plugins": plugins}


def shown_consumer(value: Dict[str, Any]) -> Dict[str, Any]:
    """A consumer as answered: neither its key nor the key's digest."""
    plugins = dict(value.get("plugins", {}))
    auth = dict(plugins.get("key-auth", {}))
    auth.pop("key_sha256", None)
    plugins["key-auth"] = auth
    return {**value, "plugins": plugins}
