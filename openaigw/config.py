"""gw.ini -> frozen configuration objects.

Every error is a :class:`ConfigError` naming the file, the section and the key.  Values
are quoted in errors as written in the file, so a resolved secret never appears.
"""

from __future__ import annotations

import configparser
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, Iterator, List, Mapping, Optional, Tuple

from openaigw import secrets
from openaigw.http_syntax import TOKEN

if TYPE_CHECKING:
    from openaigw.redisclient import RedisAddress

DEFAULT_LISTEN = "tcp:port=9080:interface=127.0.0.1:backlog=511"
_SIZE = re.compile(r"(?P<number>\d+)\s*(?P<unit>[kmg]?)b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_TRUE = {"on", "true", "yes", "1"}
_FALSE = {"off", "false", "no", "0"}


class ConfigError(Exception):
    """The configuration is invalid; the message says where and why."""


@dataclass(frozen=True)
class Node:
    """One upstream server.  ``address`` is ``host:port`` as written in logs (IPv6
    hosts in brackets).  (A node is a key of several per-request lookups: its hash,
    like its address, is worked out once.)"""

    host: str
    port: int
    weight: int
    address: str = field(init=False, compare=False, repr=False)
    _hash: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "address", f"{host}:{self.port}")
        object.__setattr__(self, "_hash", hash((self.host, self.port, self.weight)))

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True)
class GatewayConfig:
    """The ``[gateway]`` section."""

    listen: Tuple[str, ...] = (DEFAULT_LISTEN,)
    max_body_size: int = 10 << 20
    access_log: Optional[str] = "-"  # None: off
    access_log_format: str = "json"
    status: Tuple[str, ...] = ()  # the /metrics, /healthz, /readyz listener(s)
    metrics_max_models: int = 50
    shutdown_timeout: float = 30.0
    state: Optional["RedisAddress"] = None  # None: each process's memory
    state_timeout: float = 0.25
    state_unavailable: str = "reject"  # or "allow"
    state_ca_file: Optional[str] = None  # for rediss://; else the system trust store
    admin: Tuple[str, ...] = ()  # the Admin API listener(s)
    admin_key: Optional[str] = field(default=None, repr=False)
    admin_state: Optional[str] = None
    workers: int = 1  # processes serving the listeners; 0: auto (one per CPU)
    client_header_timeout: float = 10.0  # for the whole request head
    client_body_timeout: float = 60.0  # for the whole request body
    max_connections: Optional[int] = None  # None: the default, fitted to the file limit
    underscores_in_headers: bool = False

    def worker_count(self) -> int:
        """How many worker processes to run (``auto`` resolved on this host)."""
        return self.workers or len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class HealthChecks:
    """The ``checks.*`` keys of an upstream: passive counting, cooldowns, active probes."""

    passive_failures: int = 3
    passive_cooldown: float = 30.0
    max_cooldown: float = 60.0
    active_path: Optional[str] = None  # None: no active probes
    active_interval: float = 10.0
    active_timeout: float = 5.0
    active_healthy: int = 2
    active_unhealthy: int = 3


@dataclass(frozen=True)
class UpstreamConfig:
    """An ``[upstream:NAME]`` section."""

    name: str
    scheme: str
    nodes: Tuple[Node, ...]
    type: str = "roundrobin"
    ca_file: Optional[str] = None
    pass_host: str = "node"
    upstream_host: Optional[str] = None
    timeout_connect: float = 6.0
    timeout_read: float = 60.0
    retries: int = 0
    keepalive_timeout: float = 30.0
    keepalive_pool: int = 320  # APISIX's (nginx keepalive 320 in its config-default.yaml)
    max_connections: int = 0  # per node; 0: no limit
    stream_usage: bool = True  # ask chat/completions streams for their usage chunk
    api_key: Optional[str] = field(default=None, repr=False)  # resolved: never in messages
    provider: str = "openai"  # openai | azure | openai-compatible
    path_prefix: str = ""
    api_version: Optional[str] = None  # azure: a date such as 2024-10-21, or "v1"
    deployments: Tuple[Tuple[str, str], ...] = ()  # azure: (model, deployment); "*" = default
    checks: HealthChecks = HealthChecks()


@dataclass(frozen=True)
class PluginConfig:
    """A plugin enabled on a route, with the settings its ``parse`` returned."""

    name: str
    settings: Any


@dataclass(frozen=True)
class RouteConfig:
    """A ``[route:NAME]`` section."""

    name: str
    uris: Tuple[str, ...]
    upstream: str
    methods: Optional[FrozenSet[str]] = None
    plugins: Tuple[PluginConfig, ...] = ()
    fallback: Tuple[str, ...] = ()  # upstreams tried, in order, after ``upstream``
    fallback_on: FrozenSet[str] = frozenset(("429", "5xx", "timeout", "connect"))
    hosts: Optional[Tuple[str, ...]] = None  # lower-case names and *.wildcards; None: any host
    priority: int = 0  # among routes for the same URI, the highest serves first


@dataclass(frozen=True)
class ConsumerConfig:
    """A ``[consumer:NAME]`` section: who holds a gateway key, and their limits."""

    name: str
    key_digest: bytes  # SHA-256 of the key
    plugins: Tuple[PluginConfig, ...] = ()


@dataclass(frozen=True)
class Config:
    """A whole, validated gw.ini."""

    path: str
    gateway: GatewayConfig
    upstreams: Mapping[str, UpstreamConfig]
    routes: Tuple[RouteConfig, ...]
    consumers: Tuple[ConsumerConfig, ...] = ()


class Section:
    """One INI section: resolves secret references and reports errors precisely."""

    def __init__(
        self, path: str, name: str, items: Mapping[str, str], environ: Mapping[str, str]
    ) -> None:
        self.path = path
        self.name = name
        self._items = dict(items)
        self._environ = environ

    def error(self, key: Optional[str], message: str) -> ConfigError:
        """A ConfigError for ``key`` of this section (or the section itself)."""
        where = f"[{self.name}] {key}" if key else f"[{self.name}]"
        return ConfigError(f"{self.path}: {where}: {message}")

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def keys(self) -> Iterator[str]:
        return iter(self._items)

    def raw(self, key: str) -> str:
        """The value as written in the file (for messages: never resolved)."""
        return self._items[key]

    def written(self, key: str, part: str) -> str:
        """``part`` of ``key``'s resolved value, for a message: itself, or the whole value
        as written when it holds a secret reference (a resolved secret is never shown)."""
        raw = self._items[key]
        return raw if secrets.has_reference(raw) else part

    def get(self, key: str, default: Optional[str] = None) -> Optional[str]:
        """The value with its secret references resolved, or ``default``."""
        if key not in self._items:
            return default
        try:
            return secrets.resolve(self._items[key], self._environ)
        except secrets.SecretError as e:
            raise self.error(key, str(e)) from None

    def resolve(self, key: str, text: str) -> str:
        """``text``, a part of ``key``'s value, with its secret references resolved."""
        try:
            return secrets.resolve(text, self._environ)
        except secrets.SecretError as e:
            raise self.error(key, str(e)) from None

    def require(self, key: str) -> str:
        value = self.get(key)
        if value is None or not value.strip():
            raise self.error(key, "is required")
        return value.strip()

    def number(
        self, key: str, default: float, minimum: float = 0.0, integer: bool = False
    ) -> Any:
        """A number no smaller than ``minimum`` (an int when ``integer``)."""
        value = self.get(key)
        if value is None:
            return default
        try:
            number = int(value) if integer else float(value)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            raise self.error(key, f"{self.raw(key)!r} is not {kind}") from None
        if not math.isfinite(number) or number < minimum:
            raise self.error(key, f"{self.raw(key)!r} must be at least {minimum:g}")
        return number

    def size(self, key: str, default: int) -> int:
        """A byte size such as ``10M``, ``512k`` or ``1048576``."""
        value = self.get(key)
        if value is None:
            return default
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            raise self.error(key, f"{self.raw(key)!r} is not a size (e.g. 10M, 512K, 4096)")
        return int(match.group("number")) * _UNITS[match.group("unit").lower()]

    def flag(self, key: str, default: bool) -> bool:
        """An on/off switch."""
        value = self.get(key)
        if value is None:
            return default
        if value.strip().lower() in _TRUE:
            return True
        if value.strip().lower() in _FALSE:
            return False
        raise self.error(key, f"{self.raw(key)!r} is not on/off")

    def choice(self, key: str, default: str, choices: Tuple[str, ...]) -> str:
        value = self.get(key)
        if value is None:
            return default
        if value.strip().lower() not in choices:
            raise self.error(
                key, f"{self.raw(key)!r} is not one of {', '.join(choices)}"
            )
        return value.strip().lower()


class PluginOptions:
    """The ``plugin.option`` keys of one plugin in one section."""

    def __init__(
        self,
        section: Section,
        plugin: str,
        keys: Mapping[str, str],
        scope: str = "route",
        consumers: Tuple[str, ...] = (),
    ) -> None:
        self.section = section
        self.plugin = plugin
        self._keys = dict(keys)  # option -> full key in the section
        self.scope = scope  # "route" or "consumer"
        self.consumers = consumers  # the names of all [consumer:NAME] sections

    def options(self) -> List[str]:
        """Option names, without the plugin prefix (``""`` for ``plugin = value``)."""
        return list(self._keys)

    def key(self, option: str) -> str:
        return self._keys.get(option, f"{self.plugin}.{option}" if option else self.plugin)

    def get(self, option: str, default: Optional[str] = None) -> Optional[str]:
        return self.section.get(self.key(option), default)

    def error(self, option: str, message: str) -> ConfigError:
        return self.section.error(self.key(option), message)


def load(path: str, environ: Optional[Mapping[str, str]] = None) -> Config:
    """Read and validate the configuration file at ``path``."""
    return parse(read(path), path, os.environ if environ is None else environ)


def read(path: str) -> str:
    """The text of the configuration file at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def parse(text: str, path: str, environ: Mapping[str, str]) -> Config:
    """Validate the INI ``text`` (``path`` is only used in messages)."""
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";", "#"),
        comment_prefixes=(";", "#"),
        empty_lines_in_values=False,
        default_section="\0none",
    )
    parser.optionxform = lambda option: option  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateSectionError as e:
        raise ConfigError(f"{path}: line {e.lineno}: section [{e.section}] appears twice") from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(
            f"{path}: line {e.lineno}: [{e.section}] {e.option}: key appears twice"
        ) from None
    except configparser.Error as e:
        raise ConfigError(f"{path}: {e.message.splitlines()[0]}") from None

    gateway = GatewayConfig()
    upstream_sections: List[Section] = []
    route_sections: List[Section] = []
    consumer_sections: List[Section] = []
    for name in parser.sections():
        section = Section(path, name, parser[name], environ)
        kind, _, label = name.partition(":")
        if name == "gateway":
            gateway = _gateway(section)
        elif kind == "upstream" and label:
            upstream_sections.append(section)
        elif kind == "route" and label:
            route_sections.append(section)
        elif kind == "consumer" and label:
            consumer_sections.append(section)
        else:
            raise section.error(
                None,
                "unknown section (expected [gateway], [upstream:NAME], [route:NAME]"
                " or [consumer:NAME])",
            )
    upstreams = {s.name.partition(":")[2]: parse_upstream(s) for s in upstream_sections}
    names = tuple(s.name.partition(":")[2] for s in consumer_sections)
    consumers = tuple(parse_consumer(s, names) for s in consumer_sections)
    digests: Dict[bytes, str] = {}
    for consumer in consumers:
        if consumer.key_digest in digests:
            raise ConfigError(
                f"{path}: [consumer:{consumer.name}]: same key as [consumer:{digests[consumer.key_digest]}]"
            )
        digests[consumer.key_digest] = consumer.name
    routes = tuple(parse_route(s, upstreams, names) for s in route_sections)
    if not routes and not gateway.admin:
        raise ConfigError(f"{path}: no [route:NAME] section (and no admin listener): nothing to serve")
    check_overlaps(routes, route_sections)
    config = Config(path, gateway, upstreams, routes, consumers)
    _check_workers(config)
    return config


def _known(section: Section, keys: Tuple[str, ...]) -> None:
    for key in section.keys():
        if key not in keys:
            raise section.error(key, f"unknown key (known: {', '.join(keys)})")


def _gateway(section: Section) -> GatewayConfig:
    _known(
        section,
        (
            "listen", "max_body_size", "access_log", "access_log_format", "status",
            "metrics_max_models", "shutdown_timeout",
            "state", "state_timeout", "state_unavailable", "state_ca_file",
            "admin", "admin_key", "admin_state",
            "workers",
            "client_header_timeout", "client_body_timeout",
            "max_connections",
            "underscores_in_headers",
        ),
    )
    listen = tuple((section.get("listen") or DEFAULT_LISTEN).split())
    if not listen:
        raise section.error("listen", "needs at least one endpoint description")
    for description in listen:
        _check_endpoint(section, "listen", description)
    status = tuple((section.get("status") or "").split())
    for description in status:
        _check_endpoint(section, "status", description)
    admin = tuple((section.get("admin") or "").split())
    for description in admin:
        _check_endpoint(section, "admin", description)
    admin_key, admin_state = _admin(section, admin)
    state = _state(section)
    access_log: Optional[str] = (section.get("access_log") or "-").strip()
    if access_log == "off":
        access_log = None
    elif access_log != "-":
        access_log = os.path.abspath(access_log)
        if not os.path.isdir(os.path.dirname(access_log)):
            shown = section.written("access_log", access_log)
            raise section.error("access_log", f"{shown!r}: its directory does not exist")
    return GatewayConfig(
        listen=listen,
        max_body_size=section.size("max_body_size", GatewayConfig.max_body_size),
        access_log=access_log,
        access_log_format=section.choice("access_log_format", "json", ("json", "text")),
        status=status,
        metrics_max_models=section.number("metrics_max_models", 50, integer=True),
        shutdown_timeout=section.number("shutdown_timeout", 30.0),
        state=state,
        state_ca_file=_state_ca_file(section, state),
        state_timeout=_positive(section, "state_timeout", 0.25),
        state_unavailable=section.choice("state_unavailable", "reject", ("reject", "allow")),
        admin=admin,
        admin_key=admin_key,
        admin_state=admin_state,
        workers=_workers(section),
        client_header_timeout=_timeout(section, "client_header_timeout", 10.0),
        client_body_timeout=_timeout(section, "client_body_timeout", 60.0),
        max_connections=section.number("max_connections", None, minimum=1, integer=True),
        underscores_in_headers=section.flag("underscores_in_headers", False),
    )


def _positive(section: Section, key: str, default: float) -> float:
    value: float = section.number(key, default)
    if value <= 0:
        raise section.error(key, "must be above 0")
    return value


def _state(section: Section) -> Optional["RedisAddress"]:
    """``memory`` (None) or where Redis is; errors never quote the value (it may hold
    the password)."""
    raw = section.raw("state").strip() if "state" in section else "memory"
    if raw.lower() == "memory":
        return None
    from openaigw.redisclient import parse_url

    try:
        if raw.startswith("$"):  # the whole URL is a secret
            return parse_url(section.resolve("state", raw))
        return parse_url(raw, lambda text: section.resolve("state", text))
    except ValueError as e:
        raise section.error("state", str(e)) from None



def _state_ca_file(section: Section, state: Optional["RedisAddress"]) -> Optional[str]:
    path = section.get("state_ca_file")
    if path is None:
        return None
    if state is None or state.scheme != "rediss":
        raise section.error("state_ca_file", "only applies to state = rediss://...")
    _check_ca_file(section, path.strip(), "state_ca_file")
    return os.path.abspath(path.strip())


def _admin(section: Section, admin: Tuple[str, ...]) -> Tuple[Optional[str], Optional[str]]:
    """``admin_key`` and ``admin_state`` (which need an ``admin`` listener)."""
    for key in ("admin_key", "admin_state"):
        if key in section and not admin:
            raise section.error(key, "only applies with an admin listener")
    key = section.require("admin_key") if "admin_key" in section else None
    if key is not None and len(key) < 16:
        raise section.error("admin_key", "an admin key needs at least 16 characters")
    state = os.path.abspath(section.require("admin_state")) if "admin_state" in section else None
    if state is not None and not os.path.isdir(os.path.dirname(state)):
        raise section.error("admin_state", f"no directory {os.path.dirname(state)}")
    return key, state


_MAX_WORKERS = 256


def _workers(section: Section) -> int:
    if (section.get("workers") or "").strip().lower() == "auto":
        return 0
    workers: int = section.number("workers", 1, minimum=1, integer=True)
    if workers > _MAX_WORKERS:
        raise section.error("workers", f"{section.raw('workers')!r}: at most {_MAX_WORKERS} (or auto)")
    return workers


LIMITS = ("limit-count", "limit-req", "limit-conn", "ai-rate-limiting")  # plugins that keep counts


def _check_workers(config: Config) -> None:
    """With state = memory, several workers would each count every limit on its own,
    and keep their own Admin API objects: refuse that."""
    if config.gateway.workers == 1 or config.gateway.state is not None:
        return
    if config.gateway.admin:
        raise ConfigError(
            f"{config.path}: [gateway] admin: with several workers and state = memory, each"
            " worker would keep its own Admin API objects; set state = redis://... or workers = 1"
        )
    limited = [
        f"[{kind}:{owner.name}] {plugin.name}"
        for kind, owners in (("route", config.routes), ("consumer", config.consumers))
        for owner in owners
        for plugin in owner.plugins
        if plugin.name in LIMITS
    ]
    if limited:
        raise ConfigError(
            f"{config.path}: [gateway] workers: with several workers and state = memory, each"
            f" worker would count its own share of these limits: {', '.join(limited)};"
            " set state = redis://... (shared by all) or workers = 1"
        )
def _timeout(section: Section, key: str, default: float) -> float:
    value = section.number(key, default)
    if value <= 0:
        raise section.error(key, "must be above 0")
    return float(value)


def _check_endpoint(section: Section, key: str, description: str) -> None:
    """Parse a server endpoint description without listening on it."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    if description.startswith("systemd:"):
        # Parsing it would look up the inherited sockets, which exist only under systemd.
        if not re.fullmatch(r"systemd:domain=(INET|INET6|UNIX):index=\d+", description):
            raise section.error(key, f"{section.raw(key)!r}: expected systemd:domain=INET:index=N")
        return
    try:
        serverFromString(MemoryReactor(), description)
    except Exception as e:  # the parsers raise whatever they meet
        # Quote the value as written: the description may hold a resolved secret.
        raise section.error(key, f"{section.raw(key)!r}: {type(e).__name__}") from None


def _nodes(section: Section, scheme: str) -> Tuple[Node, ...]:
    nodes = []
    default_port = 443 if scheme == "https" else 80
    for line in section.require("nodes").splitlines():
        parts = line.split()
        if not parts:
            continue
        shown = repr(section.written("nodes", line.strip()))
        if len(parts) > 2:
            raise section.error("nodes", f"{shown}: expected 'host:port weight'")
        match = re.fullmatch(
            r"\[(?P<v6>[0-9A-Fa-f:.]+)\](?::(?P<p6>\d+))?|(?P<host>[^:\[\]/]+)(?::(?P<port>\d+))?", parts[0]
        )
        if match is None:
            raise section.error("nodes", f"{shown}: not host:port")
        host = match.group("v6") or match.group("host")
        port = int(match.group("p6") or match.group("port") or default_port)
        if not 0 < port < 65536:
            raise section.error("nodes", f"{shown}: port out of range")
        try:
            weight = int(parts[1]) if len(parts) == 2 else 1
        except ValueError:
            raise section.error("nodes", f"{shown}: the weight must be a whole number") from None
        if weight < 0:
            raise section.error("nodes", f"{shown}: the weight must not be negative")
        nodes.append(Node(host.lower(), port, weight))
    if not any(node.weight for node in nodes):
        raise section.error("nodes", "needs at least one node with a weight above 0")
    return tuple(nodes)


def parse_upstream(section: Section) -> UpstreamConfig:
    """An ``[upstream:NAME]`` section (or the Admin API's upstream, mapped onto one)."""
    _known(
        section,
        (
            "scheme", "nodes", "type", "ca_file", "pass_host", "upstream_host",
            "timeout_connect", "timeout_read", "retries", "keepalive_timeout",
            "keepalive_pool",
            "max_connections",
            "stream_usage",
            "api_key", "provider", "path_prefix", "api_version", "deployments",
            "checks.passive.failures", "checks.passive.cooldown", "checks.max_cooldown",
            "checks.active.path", "checks.active.interval", "checks.active.timeout",
            "checks.active.healthy", "checks.active.unhealthy",
        ),
    )
    name = section.name.partition(":")[2]
    scheme = section.choice("scheme", "https", ("http", "https"))
    nodes = _nodes(section, scheme)
    ca_file = section.get("ca_file")
    if ca_file is not None:
        if scheme != "https":
            raise section.error("ca_file", "only applies to scheme = https")
        _check_ca_file(section, ca_file.strip())
        ca_file = os.path.abspath(ca_file.strip())
    pass_host = section.choice("pass_host", "node", ("node", "pass", "rewrite"))
    upstream_host = section.get("upstream_host")
    if pass_host == "rewrite" and not (upstream_host and upstream_host.strip()):
        raise section.error("upstream_host", "is required with pass_host = rewrite")
    if upstream_host is not None and pass_host != "rewrite":
        raise section.error("upstream_host", "only applies with pass_host = rewrite")
    timeout = section.number("timeout_connect", 6.0)
    read = section.number("timeout_read", 60.0)
    for key, value in (("timeout_connect", timeout), ("timeout_read", read)):
        if value <= 0:
            raise section.error(key, "must be above 0")
    return UpstreamConfig(
        name=name,
        scheme=scheme,
        nodes=nodes,
        type=section.choice("type", "roundrobin", ("roundrobin",)),
        ca_file=ca_file,
        pass_host=pass_host,
        upstream_host=upstream_host.strip() if upstream_host else None,
        timeout_connect=timeout,
        timeout_read=read,
        retries=section.number("retries", len(nodes) - 1, integer=True),
        keepalive_timeout=section.number("keepalive_timeout", 30.0),
        keepalive_pool=section.number("keepalive_pool", 320, integer=True),
        max_connections=section.number("max_connections", 0, integer=True),
        stream_usage=section.flag("stream_usage", True),
        checks=_checks(section),
        **_provider(section),
    )


def _provider(section: Section) -> Dict[str, Any]:
    """``api_key``, ``provider`` and the keys that shape a provider's URLs."""
    provider = section.choice("provider", "openai", ("openai", "azure", "openai-compatible"))
    api_key = section.get("api_key")
    if api_key is not None:
        api_key = api_key.strip()
        if not api_key or any(c in api_key for c in "\r\n\0"):
            raise section.error("api_key", "must be one line, not empty")
    path_prefix = (section.get("path_prefix") or "").strip().rstrip("/")
    if "path_prefix" in section:
        if provider == "azure":
            raise section.error("path_prefix", "does not apply to provider = azure (its paths are built)")
        if not path_prefix.startswith("/") or not re.fullmatch(r"[A-Za-z0-9._~!$&'()*+,;=:@%/-]+", path_prefix):
            raise section.error("path_prefix", f"{section.raw('path_prefix')!r} is not a path such as /api")
    api_version = section.get("api_version")
    deployments: List[Tuple[str, str]] = []
    if provider != "azure":
        for key in ("api_version", "deployments"):
            if key in section:
                raise section.error(key, "only applies to provider = azure")
    else:
        api_version = (api_version or "").strip()
        if not api_version:
            raise section.error("api_version", "is required with provider = azure (a date such as 2024-10-21, or v1)")
        if not re.fullmatch(r"[A-Za-z0-9.-]+", api_version):
            raise section.error("api_version", f"{section.raw('api_version')!r} is not an API version")
        for number, line in enumerate((section.get("deployments") or "").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not re.fullmatch(r"[A-Za-z0-9._-]+", parts[1]):
                raise section.error("deployments", f"line {number}: expected 'model deployment'")
            if parts[0] in dict(deployments):
                raise section.error("deployments", f"line {number}: {parts[0]} is mapped twice")
            deployments.append((parts[0], parts[1]))
        if api_version == "v1" and deployments:
            raise section.error("deployments", "does not apply with api_version = v1 (the body's model names the deployment)")
        if api_version != "v1" and not deployments:
            raise section.error("deployments", "is required with provider = azure: one 'model deployment' a line ('*' for any model)")
    return {
        "provider": provider, "api_key": api_key, "path_prefix": path_prefix,
        "api_version": api_version, "deployments": tuple(deployments),
    }


def _checks(section: Section) -> HealthChecks:
    """The ``checks.*`` keys."""
    path = section.get("checks.active.path")
    if path is not None:
        path = path.strip()
        if not path.startswith("/") or any(c.isspace() for c in path):
            raise section.error("checks.active.path", "expected a path starting with '/' (e.g. /v1/models)")
    elif any(key.startswith("checks.active.") for key in section.keys()):
        key = next(key for key in section.keys() if key.startswith("checks.active."))
        raise section.error(key, "needs checks.active.path (active checks are off without it)")
    checks = HealthChecks(
        passive_failures=section.number("checks.passive.failures", 3, minimum=1, integer=True),
        passive_cooldown=section.number("checks.passive.cooldown", 30.0),
        max_cooldown=section.number("checks.max_cooldown", 60.0),
        active_path=path,
        active_interval=section.number("checks.active.interval", 10.0),
        active_timeout=section.number("checks.active.timeout", 5.0),
        active_healthy=section.number("checks.active.healthy", 2, minimum=1, integer=True),
        active_unhealthy=section.number("checks.active.unhealthy", 3, minimum=1, integer=True),
    )
    for key, value in (("checks.active.interval", checks.active_interval),
                       ("checks.active.timeout", checks.active_timeout)):
        if key in section and value <= 0:
            raise section.error(key, "must be above 0")
    return checks


def _check_ca_file(section: Section, path: str, key: str = "ca_file") -> None:
    from twisted.internet.ssl import Certificate

    shown = section.written(key, path)
    try:
        with open(path, "rb") as f:
            Certificate.loadPEM(f.read())
    except OSError as e:
        raise section.error(key, f"cannot read {shown!r}: {e.strerror}") from None
    except Exception:
        raise section.error(key, f"{shown!r} holds no PEM certificate") from None


def _plugins(
    section: Section, core: Tuple[str, ...], scope: str, consumers: Tuple[str, ...]
) -> Tuple[PluginConfig, ...]:
    """The plugins configured by the ``plugin.option`` keys of ``section``."""
    from openaigw.plugins import REGISTRY

    grouped: Dict[str, Dict[str, str]] = {}
    for key in section.keys():
        if key in core:
            continue
        plugin, _, option = key.partition(".")
        if plugin not in REGISTRY or scope not in REGISTRY[plugin].scopes:
            known = ", ".join(sorted(p for p, v in REGISTRY.items() if scope in v.scopes))
            raise section.error(
                key, f"unknown key or plugin {plugin!r} (keys: {', '.join(core)}; plugins: {known})"
            )
        grouped.setdefault(plugin, {})[option] = key
    plugins = []
    for plugin_name, keys in grouped.items():
        options = PluginOptions(section, plugin_name, keys, scope, consumers)
        settings = REGISTRY[plugin_name].parse(options)
        if settings is not None:
            plugins.append(PluginConfig(plugin_name, settings))
    plugins.sort(key=lambda p: REGISTRY[p.name].priority)
    return tuple(plugins)


def parse_consumer(section: Section, names: Tuple[str, ...]) -> ConsumerConfig:
    """A ``[consumer:NAME]`` section; ``names``: every consumer's (for the plugins)."""
    name = section.name.partition(":")[2]
    if "key" in section and "key_sha256" in section:
        raise section.error("key", "give key_sha256 or key, not both")
    if "key_sha256" in section:
        digest = section.require("key_sha256").lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise section.error("key_sha256", "expected 64 hex digits (openaigw-keygen prints them)")
        key_digest = bytes.fromhex(digest)
    elif "key" in section:
        key = section.require("key")
        if len(key) < 16:
            raise section.error("key", "a key needs at least 16 characters")
        key_digest = hashlib.sha256(key.encode("utf-8")).digest()
    else:
        raise section.error(None, "needs key_sha256 (or key)")
    plugins = _plugins(section, ("key_sha256", "key"), "consumer", names)
    return ConsumerConfig(name, key_digest, plugins)


def parse_route(
    section: Section, upstreams: Mapping[str, UpstreamConfig], consumers: Tuple[str, ...] = ()
) -> RouteConfig:
    """A ``[route:NAME]`` section, calling ``upstreams``; ``consumers``: every consumer's name."""
    name = section.name.partition(":")[2]
    uris = tuple(section.require("uri").split())
    for uri in uris:
        if not uri.startswith("/") or "*" in uri[:-1] or "?" in uri:
            raise section.error(
                "uri", f"{section.written('uri', uri)!r}: a path starting with '/', optionally ending in '*'"
            )
    methods = None
    if "methods" in section:
        methods = frozenset(m.upper() for m in re.split(r"[\s,]+", section.require("methods")) if m)
        for method in methods:
            if not TOKEN.fullmatch(method):
                raise section.error("methods", f"{section.written('methods', method)!r} is not an HTTP method")
    hosts = _hosts(section) if "hosts" in section else None
    priority = section.number("priority", 0, minimum=-math.inf, integer=True)
    upstream = section.require("upstream")
    if upstream not in upstreams:
        raise section.error("upstream", f"no section [upstream:{section.written('upstream', upstream)}]")

    fallback = tuple((section.get("fallback") or "").split())
    for other in fallback:
        if other not in upstreams:
            raise section.error("fallback", f"no section [upstream:{section.written('fallback', other)}]")
        if other == upstream or fallback.count(other) > 1:
            raise section.error("fallback", f"{section.written('fallback', other)} is already tried before")
    fallback_on = RouteConfig.fallback_on
    if "fallback_on" in section:
        fallback_on = frozenset((section.get("fallback_on") or "").lower().split())
        for condition in fallback_on:
            if condition not in ("429", "5xx", "timeout", "connect") and not re.fullmatch(r"5\d\d", condition):
                raise section.error(
                    "fallback_on",
                    f"{section.written('fallback_on', condition)!r}: expected 429, 5xx, a 5xx code (503),"
                    " timeout or connect",
                )
    plugins = _plugins(
        section, ("uri", "methods", "hosts", "priority", "upstream", "fallback", "fallback_on"), "route", consumers
    )
    return RouteConfig(name, uris, upstream, methods, plugins, fallback, fallback_on, hosts, priority)


_HOST = re.compile(r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\]")


def _hosts(section: Section) -> Tuple[str, ...]:
    """``hosts``: names such as ``api.example.com``, ``*.example.com`` (any name ending in
    ``.example.com``), IP addresses; compared case-insensitively, without a port."""
    hosts = []
    for host in re.split(r"[\s,]+", section.require("hosts")):
        if not host:
            continue
        name = host.lower().rstrip(".")
        if not _HOST.fullmatch(name):
            raise section.error(
                "hosts", f"{section.written('hosts', host)!r} is not a host name (e.g. api.example.com, *.example.com)"
            )
        if name not in hosts:
            hosts.append(name)
    return tuple(hosts)


def hosts_overlap(a: Optional[Tuple[str, ...]], b: Optional[Tuple[str, ...]]) -> bool:
    """Whether some Host matches both lists (None: any host)."""
    if a is None or b is None:
        return True
    for x in a:
        for y in b:
            if x == y:
                return True
            for wild, other in ((x, y), (y, x)):  # *.example.com vs a.example.com or *.a.example.com
                if wild.startswith("*") and other.lstrip("*").endswith(wild[1:]):
                    return True
    return False


def check_overlaps(routes: Tuple[RouteConfig, ...], sections: List[Section]) -> None:
    """Two routes may share a URI only if a request can tell which one serves it: their
    methods or hosts are disjoint, their priorities differ, or only one has hosts
    (the one with hosts comes first)."""
    seen: Dict[str, List[RouteConfig]] = {}
    for route, section in zip(routes, sections):
        for uri in route.uris:
            for other in seen.get(uri, []):
                if (
                    other.priority == route.priority
                    and (other.hosts is None) == (route.hosts is None)
                    and (other.methods is None or route.methods is None or other.methods & route.methods)
                    and hosts_overlap(other.hosts, route.hosts)
                ):
                    raise section.error(
                        "uri", f"{section.written('uri', uri)!r} is already served by"
                        f" [route:{other.name}] for the same methods and hosts, at the same priority"
                    )
            seen.setdefault(uri, []).append(route)
