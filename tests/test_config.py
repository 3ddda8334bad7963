"""gw.ini parsing, validation and secret references."""

from __future__ import annotations

import os

import pytest

from openaigw import http_syntax, secrets
from openaigw.config import ConfigError, Node, load, parse

CONTRACT = """
[gateway]
; Twisted endpoint descriptions, several separated by whitespace
listen = tcp:port=9080:interface=127.0.0.1 tcp:port=9081:interface=127.0.0.1
max_body_size = 10M            ; request bodies above this get 413

[upstream:openai]
scheme = https                 ; http | https
nodes =
    api.openai.com:443 1       ; host:port weight, one node per line
    [::1]:8443 3
type = roundrobin              ; smooth weighted round robin
pass_host = rewrite
upstream_host = api.example.com
timeout_connect = 6            ; seconds, TCP + TLS handshake
timeout_read = 60              ; seconds without a byte from the upstream

[route:openai-chat]
uri = /v1/chat/completions /v1/completions   ; several separated by spaces
methods = POST
upstream = openai
proxy-rewrite.headers.set.Authorization = Bearer $ENV://OPENAI_API_KEY
proxy-rewrite.headers.add.X-Name = value
proxy-rewrite.headers.remove = X-Debug Cookie
proxy-rewrite.uri = /openai/deployments/gpt4/chat/completions
"""


def bad(text: str, environ: dict | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text, "/etc/gw.ini", environ or {})
    return str(caught.value)


def test_contract_example_parses():
    """The issue's example file is valid and every value lands where it should."""
    config = parse(CONTRACT, "gw.ini", {"OPENAI_API_KEY": "sk-1"})
    assert config.gateway.listen == (
        "tcp:port=9080:interface=127.0.0.1", "tcp:port=9081:interface=127.0.0.1"
    )
    assert config.gateway.max_body_size == 10 * 1024 * 1024
    upstream = config.upstreams["openai"]
    assert upstream.nodes == (Node("api.openai.com", 443, 1), Node("::1", 8443, 3))
    assert upstream.retries == 1  # number of nodes - 1
    assert (upstream.timeout_connect, upstream.timeout_read) == (6.0, 60.0)
    assert upstream.upstream_host == "api.example.com"
    (route,) = config.routes
    assert route.uris == ("/v1/chat/completions", "/v1/completions")
    assert route.methods == frozenset({"POST"})
    (plugin,) = route.plugins
    assert plugin.name == "proxy-rewrite"
    assert plugin.settings.set == ((b"Authorization", b"Bearer sk-1"),)
    assert plugin.settings.add == ((b"X-Name", b"value"),)
    assert plugin.settings.remove == (b"x-debug", b"cookie")
    assert plugin.settings.uri == b"/openai/deployments/gpt4/chat/completions"


def test_shipped_config_is_valid():
    """etc/gw.ini, as shipped, passes validation when the key is in the environment."""
    here = os.path.dirname(__file__)
    config = load(os.path.join(here, "..", "etc", "gw.ini"), {"OPENAI_API_KEY": "sk-x"})
    assert config.routes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[gateway]\n[oops]\n", "/etc/gw.ini: [oops]: unknown section"),
        ("[gateway]\nlisten_on = x\n", "[gateway] listen_on: unknown key"),
        ("[gateway]\nmax_body_size = lots\n", "[gateway] max_body_size: 'lots' is not a size"),
        ("[gateway]\nlisten = tcp:port=nope\n", "[gateway] listen: 'tcp:port=nope'"),
        ("[gateway]\nlisten = systemd:index=0\n", "expected systemd:domain=INET:index=N"),
        ("[gateway]\n", "no [route:NAME] section"),
        ("[route:r]\nuri = /a\nupstream = missing\n", "[route:r] upstream: no section [upstream:missing]"),
        ("[route:r]\nupstream = u\n", "[route:r] uri: is required"),
        ("[upstream:u]\nnodes = h:1\n[route:r]\nuri = a/b\nupstream = u\n", "[route:r] uri: 'a/b'"),
        ("[upstream:u]\nnodes = h:1\n[route:r]\nuri = /a\nupstream = u\nlimit-foo.x = 1\n",
         "[route:r] limit-foo.x: unknown key or plugin 'limit-foo'"),
        ("[upstream:u]\nnodes = h:1\n[route:r]\nuri = /a\nupstream = u\nproxy-rewrite.bogus = 1\n",
         "[route:r] proxy-rewrite.bogus: unknown option"),
        ("[upstream:u]\nnodes = h:1\n[route:r]\nuri = /a\nupstream = u\nproxy-rewrite.headers.set.Host = x\n",
         "set by the gateway itself"),
        ("[upstream:u]\nnodes = h:1\n[route:r]\nuri = /a\nupstream = u\nmethods = GET POST\n"
         "[route:s]\nuri = /a\nupstream = u\nmethods = POST\n",
         "[route:s] uri: '/a' is already served by [route:r]"),
        ("[upstream:u]\nnodes = h:1\nscheme = ftp\n", "[upstream:u] scheme: 'ftp' is not one of http, https"),
        ("[upstream:u]\nnodes = h:1\ntype = chash\n", "[upstream:u] type: 'chash' is not one of roundrobin"),
        ("[upstream:u]\n", "[upstream:u] nodes: is required"),
        ("[upstream:u]\nnodes = h:99999\n", "port out of range"),
        ("[upstream:u]\nnodes = h:1 x\n", "the weight must be a whole number"),
        ("[upstream:u]\nnodes = h:1 0\n", "at least one node with a weight above 0"),
        ("[upstream:u]\nnodes = h:1\ntimeout_read = 0\n", "[upstream:u] timeout_read: must be above 0"),
        ("[upstream:u]\nnodes = h:1\ntimeout_read = -1\n", "[upstream:u] timeout_read: '-1' must be at least 0"),
        ("[upstream:u]\nnodes = h:1\nretries = 1.5\n", "[upstream:u] retries: '1.5' is not a whole number"),
        ("[upstream:u]\nnodes = h:1\npass_host = rewrite\n", "[upstream:u] upstream_host: is required"),
        ("[upstream:u]\nnodes = h:1\nca_file = /nonexistent/ca.pem\n", "[upstream:u] ca_file: cannot read"),
        ("[upstream:u]\nnodes = h:1\nscheme = http\nca_file = /x\n", "only applies to scheme = https"),
        ("[gateway]\nlisten = a\nlisten = b\n", "line 3: [gateway] listen: key appears twice"),
    ],
)
def test_errors_name_file_section_and_key(text, expected):
    """Each kind of bad input stops start-up with a message saying where and why."""
    message = bad(text)
    assert expected in message
    assert message.startswith("/etc/gw.ini")


def test_unresolvable_reference_names_the_reference():
    """An unset variable is an error naming it; APISIX would send the literal."""
    message = bad(CONTRACT)
    assert "[route:openai-chat] proxy-rewrite.headers.set.Authorization" in message
    assert "$ENV://OPENAI_API_KEY" in message and "not set" in message


def test_errors_never_show_resolved_secrets():
    """A bad value built from a secret is quoted as written, not resolved."""
    text = "[gateway]\nmax_body_size = $ENV://SIZE\n"
    message = bad(text, {"SIZE": "canary-secret-1234"})
    assert "canary-secret-1234" not in message
    assert "$ENV://SIZE" in message


CANARY = "7f3a9c"  # inside every canary value below: no message may contain it
CANARIES = (
    f"canary-{CANARY}", f"/canary-{CANARY}/none.pem", f"canary {CANARY}*?", f"Canary@{CANARY}:x",
    f"header:canary {CANARY}",
)
PLUGIN_KEYS = {  # the option keys of the plugins, on routes and on consumers
    "route": (
        "key-auth", "proxy-rewrite.uri", "proxy-rewrite.headers.remove", "proxy-rewrite.headers.set.X-A",
        "proxy-rewrite.headers.add.X-A", "limit-count.count", "limit-count.time_window", "limit-count.key",
        "limit-req.rate", "limit-req.burst", "limit-req.nodelay", "limit-req.key", "limit-conn.conn",
        "limit-conn.key", "ai-rate-limiting.limit", "ai-rate-limiting.time_window",
        "ai-rate-limiting.limit_strategy", "ai-rate-limiting.key",
    ),
    "consumer": (
        "limit-count.count", "limit-req.rate", "limit-conn.conn", "ai-rate-limiting.limit",
        "ai-rate-limiting.limit_strategy", "limit-count.key",
    ),
}
VALID = {  # a valid file, which each case below changes in one key
    "gateway": {},
    "upstream:u": {"nodes": "127.0.0.1:1"},
    "consumer:c": {"key": "0123456789abcdef-consumer"},
    "route:r": {"uri": "/a", "upstream": "u"},
}


def _text(sections: dict) -> str:
    return "".join(
        f"[{name}]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items())
        for name, keys in sections.items()
    )


def _keys_of(section: str) -> list:
    """Every key a section accepts, as its "unknown key" message lists them (keys
    added later are covered too)."""
    sections = {**VALID, section: {**VALID[section], "zzz": "1"}}
    message = bad(_text(sections))
    known = message.split("(known: ", 1)[1] if "(known: " in message else message.split("(keys: ", 1)[1]
    return known.split(";")[0].rstrip(")").split(", ")


def _every_key():
    for section in VALID:
        keys = _keys_of(section) + list(PLUGIN_KEYS.get(section.partition(":")[0], ()))
        for key in keys:
            yield section, key


@pytest.mark.parametrize("section, key", list(_every_key()))
def test_no_error_quotes_a_resolved_value(section, key):
    """Whatever a key's value resolves to, an error about it quotes the reference as
    written, never the resolved value (every key of every section, plugins included)."""
    for canary in CANARIES:
        sections = {**VALID, section: {**VALID[section], key: "$ENV://SECRET"}}
        try:
            parse(_text(sections), "/etc/gw.ini", {"SECRET": canary})
        except ConfigError as e:
            message = str(e)
            assert CANARY not in message and "canary" not in message.lower(), (key, canary, message)


@pytest.mark.parametrize(
    "section, key, canary, expected",
    [
        ("route:r", "uri", f"canary-{CANARY}", "[route:r] uri: '$ENV://SECRET': a path"),
        ("route:r", "upstream", f"canary-{CANARY}", "[route:r] upstream: no section [upstream:$ENV://SECRET]"),
        ("route:r", "methods", f"canary {CANARY}?", "[route:r] methods: '$ENV://SECRET' is not an HTTP method"),
        ("upstream:u", "ca_file", f"/canary-{CANARY}.pem", "[upstream:u] ca_file: cannot read '$ENV://SECRET'"),
        ("gateway", "access_log", f"/canary-{CANARY}/log", "[gateway] access_log: '$ENV://SECRET': its directory does not exist"),
        ("route:r", "proxy-rewrite.headers.remove", f"canary {CANARY}?",
         "proxy-rewrite.headers.remove: '$ENV://SECRET' is not a header name"),
    ],
)
def test_errors_quote_the_reference(section, key, canary, expected):
    """An error about a value holding a reference quotes the value as written."""
    sections = {**VALID, section: {**VALID[section], key: "$ENV://SECRET"}}
    message = bad(_text(sections), {"SECRET": canary})
    assert expected in message and CANARY not in message


def test_overlap_error_quotes_the_reference():
    """Two routes on one URI: the URI is quoted as written when it came from a reference."""
    sections = {**VALID, "route:s": {"uri": "$ENV://SECRET", "upstream": "u"}}
    message = bad(_text(sections), {"SECRET": "/a"})
    assert "[route:s] uri: '$ENV://SECRET' is already served by [route:r]" in message


def test_secret_kinds(tmp_path):
    """$ENV, $FILE (trailing newline stripped) and $CREDENTIAL resolve anywhere in a value."""
    (tmp_path / "key").write_text("sk-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "openai_api_key").write_text("sk-cred")
    environ = {"A": "sk-env", "CREDENTIALS_DIRECTORY": str(creds)}
    value = f"x $ENV://A y $FILE://{tmp_path}/key z $CREDENTIAL://openai_api_key"
    assert secrets.resolve(value, environ) == "x sk-env y sk-file z sk-cred"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("$FILE:///nonexistent/key", "$FILE:///nonexistent/key: cannot read"),
        ("$FILE://relative", "must be absolute"),
        ("$CREDENTIAL://k", "$CREDENTIALS_DIRECTORY is not set"),
        ("$CREDENTIAL://../etc/passwd", "not a credential name"),
        ("$ENV://EMPTY", "the secret is empty"),
    ],
)
def test_secret_errors(value, expected):
    """Unresolvable references fail with a message naming the reference."""
    with pytest.raises(secrets.SecretError) as caught:
        secrets.resolve(value, {"EMPTY": ""})
    assert expected in str(caught.value)


def test_sizes_and_defaults():
    """Sizes take K/M/G suffixes; retries default to nodes - 1; ports default by scheme;
    the idle pool is APISIX's size."""
    config = parse(
        "[gateway]\nmax_body_size = 512k\n[upstream:u]\nnodes = a.example\n  b.example 2\n"
        "[route:r]\nuri = /x\nupstream = u\n",
        "gw.ini",
        {},
    )
    assert config.gateway.max_body_size == 512 * 1024
    assert config.upstreams["u"].nodes == (Node("a.example", 443, 1), Node("b.example", 443, 2))
    assert config.upstreams["u"].retries == 1
    assert config.upstreams["u"].keepalive_pool == 320
    assert config.routes[0].methods is None


RESILIENT = """
[upstream:openai]
nodes = api.openai.com
api_key = $ENV://OPENAI_API_KEY
checks.passive.failures = 2
checks.passive.cooldown = 15
checks.max_cooldown = 120
checks.active.path = /v1/models
checks.active.interval = 5
checks.active.timeout = 2
checks.active.healthy = 1
checks.active.unhealthy = 4

[upstream:azure]
nodes = example.openai.azure.com
provider = azure
api_key = $ENV://AZURE_KEY
api_version = 2024-10-21
deployments =
    gpt-4o prod-4o
    * fallback-deployment

[upstream:local]
scheme = http
nodes = 127.0.0.1:11434
provider = openai-compatible
path_prefix = /ollama

[route:chat]
uri = /v1/chat/completions
upstream = openai
fallback = azure local
fallback_on = 429 503 timeout
"""
ENV = {"OPENAI_API_KEY": "sk-canary-1", "AZURE_KEY": "az-canary-2"}


def test_providers_checks_and_fallback_parse():
    """Every new upstream and route key lands where it should; defaults hold."""
    config = parse(RESILIENT, "gw.ini", ENV)
    openai = config.upstreams["openai"]
    assert (openai.provider, openai.api_key) == ("openai", "sk-canary-1")
    checks = openai.checks
    assert (checks.passive_failures, checks.passive_cooldown, checks.max_cooldown) == (2, 15, 120)
    assert (checks.active_path, checks.active_interval, checks.active_timeout) == ("/v1/models", 5, 2)
    assert (checks.active_healthy, checks.active_unhealthy) == (1, 4)
    azure = config.upstreams["azure"]
    assert (azure.provider, azure.api_version) == ("azure", "2024-10-21")
    assert azure.deployments == (("gpt-4o", "prod-4o"), ("*", "fallback-deployment"))
    assert azure.checks.passive_failures == 3 and azure.checks.active_path is None
    assert (azure.checks.passive_cooldown, azure.checks.max_cooldown) == (30, 60)
    local = config.upstreams["local"]
    assert (local.provider, local.api_key, local.path_prefix) == ("openai-compatible", None, "/ollama")
    (route,) = config.routes
    assert route.fallback == ("azure", "local")
    assert route.fallback_on == frozenset(("429", "503", "timeout"))
    plain = parse(CONTRACT, "gw.ini", {"OPENAI_API_KEY": "k"}).routes[0]
    assert plain.fallback == () and plain.fallback_on == frozenset(("429", "5xx", "timeout", "connect"))


@pytest.mark.parametrize("old, new, where", [
    ("provider = azure", "provider = bedrock", "[upstream:azure] provider"),
    ("api_version = 2024-10-21\n", "", "[upstream:azure] api_version"),
    ("    gpt-4o prod-4o\n    * fallback-deployment", "    gpt-4o", "[upstream:azure] deployments"),
    ("    gpt-4o prod-4o\n", "    gpt-4o prod/4o\n", "[upstream:azure] deployments"),
    ("    * fallback-deployment", "    gpt-4o again", "[upstream:azure] deployments"),
    ("api_version = 2024-10-21", "api_version = v1", "[upstream:azure] deployments"),
    ("path_prefix = /ollama", "path_prefix = ollama", "[upstream:local] path_prefix"),
    ("path_prefix = /ollama", "api_version = 1", "[upstream:local] api_version"),
    ("checks.passive.failures = 2", "checks.passive.failures = 0", "[upstream:openai] checks.passive.failures"),
    ("checks.max_cooldown = 120", "checks.max_cooldown = -1", "[upstream:openai] checks.max_cooldown"),
    ("checks.active.path = /v1/models", "checks.active.path = v1/models", "[upstream:openai] checks.active.path"),
    ("checks.active.path = /v1/models\n", "", "[upstream:openai] checks.active.interval"),
    ("checks.active.interval = 5", "checks.active.interval = 0", "[upstream:openai] checks.active.interval"),
    ("checks.active.timeout = 2", "checks.active.timeout = x", "[upstream:openai] checks.active.timeout"),
    ("checks.active.healthy = 1", "checks.active.healthys = 1", "[upstream:openai] checks.active.healthys"),
    ("fallback = azure local", "fallback = azure nowhere", "[route:chat] fallback"),
    ("fallback = azure local", "fallback = azure openai", "[route:chat] fallback"),
    ("fallback = azure local", "fallback = azure azure", "[route:chat] fallback"),
    ("fallback_on = 429 503 timeout", "fallback_on = 404", "[route:chat] fallback_on"),
])
def test_resilience_errors_name_the_key(old, new, where):
    """Bad provider, checks and fallback keys are errors naming the section and key."""
    assert old in RESILIENT
    message = bad(RESILIENT.replace(old, new), ENV)
    assert f"/etc/gw.ini: {where}: " in message


def test_bad_api_key_never_quoted():
    """An api_key error does not show the resolved key."""
    message = bad(RESILIENT, {"OPENAI_API_KEY": "sk-canary\nline", "AZURE_KEY": "a"})
    assert "[upstream:openai] api_key" in message and "canary" not in message

def test_token_is_rfc_9110s():
    """TOKEN (str and bytes) matches exactly RFC 9110's tchar, one or more."""
    tchar = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    for code in range(256):
        assert bool(http_syntax.TOKEN.fullmatch(chr(code))) == (chr(code) in tchar), code
        assert bool(http_syntax.TOKEN_BYTES.fullmatch(bytes([code]))) == (chr(code) in tchar), code
    assert http_syntax.TOKEN.fullmatch("X-Foo_Bar") and not http_syntax.TOKEN.fullmatch("")


@pytest.mark.parametrize(
    "key, value, valid",
    [
        ("methods", "GET PURGE", True),
        ("methods", "GE(T", False),
        ("limit-count.key", "header:X-Team_Id", True),
        ("limit-count.key", "header:X Team", False),
        ("proxy-rewrite.headers.remove", "X-A X~B", True),
        ("proxy-rewrite.headers.remove", "X-A X[B", False),
    ],
)
def test_methods_and_header_names_are_tokens(key, value, valid):
    """Methods and header names in the file are RFC 9110 tokens, the same rule everywhere."""
    extra = {"limit-count.count": "1", "limit-count.time_window": "1"} if key.startswith("limit") else {}
    sections = {**VALID, "route:r": {**VALID["route:r"], key: value, **extra}}
    if valid:
        parse(_text(sections), "/etc/gw.ini", {})
    else:
        assert "[route:r] " + key in bad(_text(sections))


def test_max_connections():
    """[upstream:NAME] max_connections: 0 (no limit) by default, a whole number >= 0."""
    base = "[upstream:u]\nscheme = http\nnodes = 10.0.0.1:80\n"
    route = "[route:r]\nuri = /v1/*\nupstream = u\n"
    assert parse(base + route, "gw.ini", {}).upstreams["u"].max_connections == 0
    assert parse(base + "max_connections = 8\n" + route, "gw.ini", {}).upstreams["u"].max_connections == 8
    assert "max_connections" in bad(base + "max_connections = -1\n" + route)
    assert "max_connections" in bad(base + "max_connections = 1.5\n" + route)


SEED = "[upstream:u]\nnodes = h:1\n[route:r]\nuri = /a\nupstream = u\n"


@pytest.mark.parametrize(
    "value, expected", [("1", 1), ("4", 4), ("auto", 0), (" AUTO ", 0)],
)
def test_workers(value, expected):
    """workers: a number of processes, or auto (0: one per CPU, resolved at start)."""
    gateway = parse(f"[gateway]\nworkers = {value}\n{SEED}", "/etc/gw.ini", {}).gateway
    assert gateway.workers == expected
    assert gateway.worker_count() == (expected or len(os.sched_getaffinity(0)))
    assert parse(SEED, "/etc/gw.ini", {}).gateway.worker_count() == 1


@pytest.mark.parametrize(
    "value, expected",
    [("0", "'0' must be at least 1"), ("two", "'two' is not a whole number"), ("1000", "at most 256")],
)
def test_bad_workers(value, expected):
    assert expected in bad(f"[gateway]\nworkers = {value}\n{SEED}")


@pytest.mark.parametrize("workers", ["2", "auto"])
def test_limits_with_workers_need_shared_state(workers):
    """With state = memory, several workers would each count a limit on its own:
    refused, naming every limit; with state = redis they share it."""
    text = (
        f"[gateway]\nworkers = {workers}\n{SEED}limit-count.count = 5\nlimit-count.time_window = 60\n"
        "key-auth = on\n[route:s]\nuri = /b\nupstream = u\n"
        f"[consumer:team]\nkey_sha256 = {'ab' * 32}\nai-rate-limiting.limit = 100\n"
        "ai-rate-limiting.time_window = 60\nlimit-conn.conn = 2\n"
    )
    message = bad(text)
    assert "[gateway] workers" in message
    assert "[route:r] limit-count" in message and "[consumer:team] ai-rate-limiting" in message
    assert "[consumer:team] limit-conn" in message and "[route:s]" not in message
    assert "state = redis" in message
    parse(text.replace(f"workers = {workers}", "workers = 1"), "/etc/gw.ini", {})
    shared = text.replace("[gateway]\n", "[gateway]\nstate = redis://127.0.0.1:6379/0\n")
    assert parse(shared, "/etc/gw.ini", {}).gateway.workers == (0 if workers == "auto" else 2)


def test_admin_api_with_workers_needs_shared_state():
    """With state = memory each worker would keep its own Admin API objects: refused."""
    text = f"[gateway]\nworkers = 2\nadmin = tcp:port=9180:interface=127.0.0.1\n{SEED}"
    assert "[gateway] admin: with several workers and state = memory" in bad(text)
    parse(text.replace("workers = 2", "workers = 2\nstate = redis://127.0.0.1:6379/0"), "/etc/gw.ini", {})
