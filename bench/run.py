"""openaigw benchmark: the gateway against a direct connection, nginx, Twisted's own
floors and Twisted's ReverseProxyResource, in one run.

    python bench/run.py [--quick] [--json results.json] [--baseline DIR]

Starts on 127.0.0.1 a fast fake OpenAI upstream (nginx: canned chat.completion, and
SSE streams timed by the echo module), nginx as a plain reverse proxy (the
reference), Twisted's TCP relay (``twistd portforward``) and hello-world Site
(bench/site.py): the floors, Twisted's plain ReverseProxyResource
(bench/rpr.py, the baseline) and openaigw, then runs each workload in interleaved
rounds against them and prints one table of medians and ratios.  The proxies run on
core 0; upstream, wrk and the Python load generator on core 1.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import glob
import json
import os
import re
import signal
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import loadgen  # noqa: E402
from openaigw.testing import RedisServer, free_port, start_gateway, stop_process  # noqa: E402

# The floors: Twisted's TCP relay (twistd portforward: relaying bytes through the
# reactor) and its hello-world Site (Twisted's HTTP server side; it answers every
# request with 12 bytes of its own: in the request workloads, and in the stream ones
# only how soon it answers the same bursts).
TARGETS = ("direct", "nginx", "twisted-tcp", "twisted-site", "twisted-rpr", "openaigw")
RELAYS = tuple(t for t in TARGETS if t != "twisted-site")  # answer with the upstream's answers
# The +X columns: the time added over direct (for twisted-site, answering itself, how
# much later than the upstream (direct) Twisted's server side answers).
ADDED = ("nginx", "twisted-tcp", "twisted-site", "twisted-rpr", "openaigw")
# With --baseline DIR: the seed gateway run from another source tree (a checkout of an
# older commit), in the main table beside openaigw, for a before/after from one run.
BEFORE = "openaigw-before"
# The cost of features, throughput only: the gateway bare (no access log, no metrics),
# as seeded (access log on), and with key-auth, a request limit, a token limit, the
# access log and metrics all on; the floors beside them.
GATEWAYS = ("openaigw-bare", "openaigw", "openaigw-full")
FEATURE_TARGETS = ("twisted-tcp", "twisted-site") + GATEWAYS
# The response cache: a hit (every request of the wrk run is the same) against the same
# request proxied, and identical streams coalesced into one upstream call.
CACHE_TARGETS = ("openaigw", "openaigw-cache")
CACHE_STREAMS = 50
# The cost of shared state: the seed route with a limit-count kept in this process's
# memory, and in Redis (redis-server on the load core).
STATE_TARGETS = ("limit-memory", "limit-redis")
# The cost of health bookkeeping: the seed (one node, passive checks only) against
# three nodes with passive and active checks.
HEALTH_TARGETS = ("openaigw", "openaigw-health")
CLIENT_KEY = "sk-bench-client-key-0001"
PROXY_CORE, LOAD_CORE = 0, 1
# Several upstream workers (sharing LOAD_CORE): nginx timers set in one event-loop
# pass share its cached clock, so one worker's sleeping streams fall into lockstep
# and each round of chunks goes out as one burst, stamped with the burst's start.
# Four workers make four smaller bursts at independent phases.
UPSTREAM_WORKERS = 4
ECHO_MODULE_GLOBS = ("/usr/lib/nginx/modules/ngx_http_echo_module.so",
                     "/usr/lib/*/nginx/modules/ngx_http_echo_module.so",
                     "/usr/share/nginx/modules/ngx_http_echo_module.so")
CHAT_COMPLETION = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
    '"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant",'
    '"content":"Hello! How can I help you today?","refusal":null},"logprobs":null,'
    '"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":9,'
    '"total_tokens":23},"system_fingerprint":"fp_bench"}')
WRK_LUA = """wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run (full or --quick)."""

    rounds: int
    wrk_seconds: int
    wrk_connections: int
    rate: float  # open-loop req/s
    rate_seconds: float
    fast_streams: int
    fast_chunks: int
    fast_interval: float
    slow_streams: int
    slow_chunks: int
    slow_interval: float
    feature_rounds: int


FULL = Plan(3, 5, 50, 200, 4, 200, 20, 0.010, 1000, 100, 0.050, 5)
QUICK = Plan(1, 2, 50, 200, 2, 200, 20, 0.010, 1000, 20, 0.050, 1)


# --- processes -------------------------------------------------------------------

def pinned(core: int, argv: List[str]) -> List[str]:
    """*argv* run under ``taskset -c core`` (unpinned on a one-core machine)."""
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        return argv
    return ["taskset", "-c", str(core)] + argv


def pin_pid(pid: int, core: int) -> None:
    """Pin every thread of *pid* to *core* (``taskset -a -p``)."""
    if (os.cpu_count() or 1) < 2:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {core})


def wait_listening(port: int, proc: "subprocess.Popen[bytes]", what: str,
                   timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not listening on {port}")
            time.sleep(0.05)


def echo_module() -> str:
    for pattern in ECHO_MODULE_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise SystemExit("nginx echo module not found: apt-get install libnginx-mod-http-echo")


def sse_location(name: str, chunks: int, interval: float) -> str:
    """An internal location answering with *chunks* SSE events *interval* apart, each
    stamped with nginx's send time ($msec) and flushed on its own, then [DONE]."""
    lines = [f"location = /_stream/{name} {{", "    internal;",
             "    default_type text/event-stream;", "    add_header Cache-Control no-cache;"]
    for i in range(chunks):
        delta = ('{"role":"assistant","content":"tok0 "}' if i == 0
                 else '{"content":"tok%d "}' % i)
        finish = '"stop"' if i == chunks - 1 else "null"
        event = ('data: {"id":"chatcmpl-bench-$msec","object":"chat.completion.chunk",'
                 '"created":1700000000,"model":"gpt-4o-mini-2024-07-18",'
                 '"system_fingerprint":"fp_bench","choices":[{"index":0,"delta":%s,'
                 '"logprobs":null,"finish_reason":%s}]}\\n\\n' % (delta, finish))
        lines.append(f"    echo -n '{event}'; echo_flush;")
        if i < chunks - 1:
            lines.append(f"    echo_sleep {interval:.3f};")
    lines += ["    echo -n 'data: [DONE]\\n\\n';", "}"]
    return "\n".join(lines)


def nginx_conf(prefix: str, server: str, extra_http: str = "", module: str = "",
               workers: int = 1) -> str:
    return f"""{f'load_module {module};' if module else ''}
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi; uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{extra_http}
    server {{
{server}
    }}
}}
"""


def start_nginx(prefix: str, conf: str, port: int, core: int) -> "subprocess.Popen[bytes]":
    os.makedirs(prefix, exist_ok=True)
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    with open(os.path.join(prefix, "stderr.log"), "ab") as err:
        proc = subprocess.Popen(
            pinned(core, ["nginx", "-e", f"{prefix}/error.log", "-c", path, "-p", prefix,
                          "-g", "daemon off;"]),
            stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        wait_listening(port, proc, f"nginx ({prefix}; see error.log)")
    except BaseException:
        stop_process(proc)
        raise
    return proc


def upstream_server(port: int, plan: Plan, more_ports: Tuple[int, ...] = ()) -> str:
    body = CHAT_COMPLETION.replace("'", "\\'")
    listen = "".join(f"listen 127.0.0.1:{p} reuseport;\n" for p in (port,) + more_ports)
    return f"""{listen}location = /v1/models {{
    default_type application/json;
    return 200 '{{"object":"list","data":[]}}';
}}
location = /v1/chat/completions {{
    if ($http_x_bench_stream = "fast") {{ rewrite ^ /_stream/fast last; }}
    if ($http_x_bench_stream = "slow") {{ rewrite ^ /_stream/slow last; }}
    default_type application/json;
    return 200 '{body}';
}}
{sse_location("fast", plan.fast_chunks, plan.fast_interval)}
{sse_location("slow", plan.slow_chunks, plan.slow_interval)}"""


def proxy_server(port: int) -> str:
    return f"""listen 127.0.0.1:{port};
location / {{
    proxy_pass http://bench_upstream;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Authorization "Bearer sk-bench";
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Host $http_host;
    proxy_buffering off;
    proxy_read_timeout 60s;
}}"""


def gateway_ini(gw_port: int, upstream_port: int, variant: str = "openaigw", tmp: str = "",
                health_ports: Tuple[int, ...] = ()) -> str:
    """The seed etc/gw.ini, pointed at the bench upstream over plain http; ``variant``
    openaigw-bare turns the access log off, openaigw-full turns every check on,
    openaigw-cache turns the cache on (entries live 1 s: each round starts cold),
    openaigw-health has three nodes (``health_ports``) with active checks."""
    gateway, route = "", ""
    if variant == "openaigw-cache":
        gateway = f"access_log = {tmp}/access-cache.log\n"
        route = "cache = on\ncache.ttl = 1\n"
    elif variant == "openaigw-bare":
        gateway = "access_log = off\n"
    elif variant == "openaigw-full":
        gateway = (f"access_log = {tmp}/access-full.log\n"
                   f"status = tcp:port={free_port()}:interface=127.0.0.1\n")
        route = ("key-auth = on\nlimit-count.count = 1000000000\nlimit-count.time_window = 3600\n"
                 "ai-rate-limiting.limit = 1000000000000\nai-rate-limiting.time_window = 3600\n")
    consumer = f"\n[consumer:bench]\nkey = {CLIENT_KEY}\n" if variant == "openaigw-full" else ""
    nodes = f"    127.0.0.1:{upstream_port} 1\n"
    if variant == "openaigw-health":
        nodes = "".join(f"    127.0.0.1:{p} 1\n" for p in health_ports)
        nodes += "checks.active.path = /v1/models\nchecks.active.interval = 1\n"
    return f"""[gateway]
listen = tcp:port={gw_port}:interface=127.0.0.1:backlog=1024
max_body_size = 10M
{gateway}{consumer}
[upstream:bench]
scheme = http
nodes =
{nodes}type = roundrobin
timeout_connect = 6
timeout_read = 60

[route:openai-chat]
uri = /v1/chat/completions
methods = POST
upstream = bench
{route}proxy-rewrite.headers.set.Authorization = Bearer $ENV://OPENAI_API_KEY

[route:openai-api]
uri = /v1/*
upstream = bench
proxy-rewrite.headers.set.Authorization = Bearer $ENV://OPENAI_API_KEY
"""


# --- /proc -------------------------------------------------------------------------

def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss(pid: int) -> None:
    """Make VmHWM restart from the current RSS (Linux clear_refs 5)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nginx_worker(master: int) -> int:
    with open(f"/proc/{master}/task/{master}/children") as f:
        children = [int(c) for c in f.read().split()]
    if not children:
        raise RuntimeError(f"nginx master {master} has no worker")
    return children[0]


# --- workloads ------------------------------------------------------------------------

def run_wrk(port: int, seconds: int, connections: int, lua: str) -> Dict[str, float]:
    argv = pinned(LOAD_CORE, ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                              "-s", lua, f"http://127.0.0.1:{port}/v1/chat/completions"])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                         check=True).stdout
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}
    lat = {p: float(v) * units[u] for p, v, u in
           re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)}
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if rps is None or len(lat) != 2:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                              r"timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    total = re.search(r"^\s+(\d+) requests in", out, re.M)
    return {"rps": float(rps.group(1)), "p50_ms": lat["50"], "p99_ms": lat["99"],
            "errors": errors, "requests": int(total.group(1)) if total else 0}


class Bench:
    def __init__(self, plan: Plan, tmp: str, baseline: str = "") -> None:
        self.plan, self.tmp, self.baseline = plan, tmp, baseline
        extra = (BEFORE,) if baseline else ()
        self.targets, self.relays, self.added = TARGETS + extra, RELAYS + extra, ADDED + extra
        self.procs: List["subprocess.Popen[bytes]"] = []
        self.ports: Dict[str, int] = {}
        self.pids: Dict[str, int] = {}  # process serving each proxy target
        self.raw: Dict[str, Dict[str, List[float]]] = {}  # metric -> target -> rounds
        self.lua = os.path.join(tmp, "post.lua")

    def start(self) -> None:
        with open(self.lua, "w") as f:
            body = loadgen.build_request(0).split(b"\r\n\r\n", 1)[1].decode()
            f.write(WRK_LUA % (body, CLIENT_KEY))
        up, px = free_port(), free_port()
        self.ports = {"direct": up, "nginx": px}
        health_ports = (up, free_port(), free_port())
        module = echo_module()
        self.procs.append(start_nginx(
            f"{self.tmp}/upstream", nginx_conf(f"{self.tmp}/upstream", upstream_server(
                up, self.plan, health_ports[1:]), module=module, workers=UPSTREAM_WORKERS),
            up, LOAD_CORE))
        keepalive = (f"    upstream bench_upstream {{ server 127.0.0.1:{up}; keepalive 64; "
                     "keepalive_requests 1000000; keepalive_timeout 60s; }")
        self.procs.append(start_nginx(f"{self.tmp}/proxy", nginx_conf(
            f"{self.tmp}/proxy", proxy_server(px), keepalive), px, PROXY_CORE))
        self.pids["nginx"] = nginx_worker(self.procs[-1].pid)
        tcp = free_port()
        self.start_python("twisted-tcp", tcp, [
            "-c", "from twisted.scripts.twistd import run; run()", "--nodaemon", "--pidfile=",
            f"--logfile={self.tmp}/twisted-tcp.twistd.log", "portforward",
            "--port", f"tcp:{tcp}:interface=127.0.0.1", "--host", "127.0.0.1", "--dest_port", str(up)])
        site = free_port()
        self.start_python("twisted-site", site, [os.path.join(_HERE, "site.py"), str(site)])
        rpr = free_port()
        self.start_python("twisted-rpr", rpr, [os.path.join(_HERE, "rpr.py"), str(rpr), str(up)])
        env = dict(os.environ, OPENAI_API_KEY="sk-bench")
        for variant in GATEWAYS + CACHE_TARGETS[1:] + HEALTH_TARGETS[1:] + self.targets[len(TARGETS):]:
            gw = self.ports[variant] = free_port()
            directory = os.path.join(self.tmp, variant)
            os.mkdir(directory)
            ini = gateway_ini(gw, up, "openaigw" if variant == BEFORE else variant, directory, health_ports)
            root = self.baseline if variant == BEFORE else None
            gateway = start_gateway(directory, ini, gw, env=env, root=root)
            self.procs.append(gateway)
            pin_pid(gateway.pid, PROXY_CORE)
            self.pids[variant] = gateway.pid
        for target, port in self.ports.items():  # check that it answers, and warm up
            result = asyncio.run(loadgen.fixed_rate(port, 100, 0.2, connections=4))
            if result["errors"] or not result["ok"]:
                raise RuntimeError(f"{target} on port {port} does not answer: {result}")
            run_wrk(port, 1, self.plan.wrk_connections, self.lua)

    def start_python(self, target: str, port: int, argv: List[str]) -> None:
        """Run ``python argv`` on the proxy core as *target*, listening on *port*."""
        self.ports[target] = port
        with open(os.path.join(self.tmp, f"{target}.log"), "ab") as log:
            self.procs.append(subprocess.Popen(pinned(PROXY_CORE, [sys.executable] + argv),
                                               stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        wait_listening(port, self.procs[-1], f"{target} (see {self.tmp}/{target}.log)")
        self.pids[target] = self.procs[-1].pid  # taskset execs, same pid

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        self.procs.clear()

    def record(self, target: str, values: Dict[str, float], prefix: str) -> None:
        for key, value in values.items():
            self.raw.setdefault(f"{prefix}.{key}", {}).setdefault(target, []).append(value)

    def cpu(self, target: str) -> float:
        return cpu_seconds(self.pids[target]) if target in self.pids else float("nan")

    def rounds(self, name: str, fn: Callable[[str, int], Dict[str, float]],
               targets: Tuple[str, ...] = (), rounds: int = 0) -> None:
        """Run *fn* for each target (default: the main table's), rotating the order each round."""
        targets = targets or self.targets
        for r in range(rounds or self.plan.rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for target in order:
                started = time.monotonic()
                values = fn(target, self.ports[target])
                self.record(target, values, name)
                print(f"  {name:<9} round {r + 1} {target:<11} {time.monotonic() - started:5.1f}s "
                      + " ".join(f"{k}={v:.4g}" for k, v in values.items()), flush=True)

    def throughput(self, target: str, port: int) -> Dict[str, float]:
        cpu = self.cpu(target)
        result = run_wrk(port, self.plan.wrk_seconds, self.plan.wrk_connections, self.lua)
        result["cpu_us_per_req"] = (self.cpu(target) - cpu) / max(1, result["requests"]) * 1e6
        return result

    def fixed_rate(self, target: str, port: int) -> Dict[str, float]:
        return asyncio.run(loadgen.fixed_rate(port, self.plan.rate, self.plan.rate_seconds))

    def fast_streams(self, target: str, port: int) -> Dict[str, float]:
        p = self.plan
        if target == "twisted-site":  # the floor: the same burst of requests, answered
            return loadgen.first_bytes(port, p.fast_streams, "fast", p.fast_interval, timeout=30)
        cpu = self.cpu(target)
        result = loadgen.streams(port, p.fast_streams, "fast", p.fast_chunks, p.fast_interval,
                                 timeout=p.fast_chunks * p.fast_interval + 30)
        result["cpu_us_per_chunk"] = (self.cpu(target) - cpu) / max(1, result["chunks"]) * 1e6
        return result

    def cache_streams(self, target: str, port: int) -> Dict[str, float]:
        """CACHE_STREAMS identical fast streams at once; upstream calls from the access log."""
        p = self.plan
        log = os.path.join(self.tmp, target, "access-cache.log")
        time.sleep(0.5)  # the access log is flushed every 0.1 s: the last run's lines first
        offset = os.path.getsize(log)
        result = loadgen.streams(port, CACHE_STREAMS, "fast", p.fast_chunks, p.fast_interval,
                                 timeout=p.fast_chunks * p.fast_interval + 30)
        time.sleep(0.5)
        with open(log) as f:
            f.seek(offset)
            records = [json.loads(line) for line in f if line.strip()]
        result["upstream_calls"] = sum(1 for r in records if r["upstream_status"] is not None)
        result["coalesced"] = sum(1 for r in records if r["cache"] in ("coalesced", "hit"))
        return result

    def slow_streams(self, target: str, port: int) -> Dict[str, float]:
        p = self.plan
        if target == "twisted-site":
            return loadgen.first_bytes(port, p.slow_streams, "slow", p.slow_interval, timeout=30)
        pid = self.pids.get(target)
        if pid is not None:
            reset_peak_rss(pid)
            idle, cpu = proc_status_kib(pid, "VmRSS"), cpu_seconds(pid)
        result = loadgen.streams(port, p.slow_streams, "slow", p.slow_chunks, p.slow_interval,
                                 timeout=p.slow_chunks * p.slow_interval + 30)
        if pid is not None:
            peak = proc_status_kib(pid, "VmHWM")
            result.update(idle_rss_mib=idle / 1024, peak_rss_mib=peak / 1024,
                          rss_per_stream_kib=(peak - idle) / p.slow_streams,
                          cpu_us_per_chunk=(cpu_seconds(pid) - cpu) / max(1, result["chunks"]) * 1e6)
        return result


# --- shared state -------------------------------------------------------------------

def state_ini(gw_port: int, upstream_port: int, redis_url: str = "") -> str:
    """The seed gw.ini with a limit-count on the chat route (never reached), its state
    in memory or, given ``redis_url``, in Redis."""
    ini = gateway_ini(gw_port, upstream_port)
    if redis_url:
        ini = ini.replace("[gateway]\n", f"[gateway]\nstate = {redis_url}\n", 1)
    return ini.replace("upstream = bench\nproxy-rewrite", "upstream = bench\n"
                       "limit-count.count = 1000000000\nlimit-count.time_window = 3600\n"
                       "proxy-rewrite", 1)


def start_state_targets(bench: Bench) -> None:
    """redis-server (pinned to the load core) and one gateway per STATE_TARGETS."""
    directory = os.path.join(bench.tmp, "redis")
    os.mkdir(directory)
    redis = RedisServer(directory).start()
    bench.procs.append(redis.proc)  # type: ignore[arg-type]
    pin_pid(redis.proc.pid, LOAD_CORE)  # type: ignore[union-attr]
    env = dict(os.environ, OPENAI_API_KEY="sk-bench")
    for target, url in zip(STATE_TARGETS, ("", redis.url)):
        gw = bench.ports[target] = free_port()
        directory = os.path.join(bench.tmp, target)
        os.mkdir(directory)
        gateway = start_gateway(directory, state_ini(gw, bench.ports["direct"], url), gw, env=env)
        bench.procs.append(gateway)
        pin_pid(gateway.pid, PROXY_CORE)
        bench.pids[target] = gateway.pid
        result = run_wrk(gw, 1, bench.plan.wrk_connections, bench.lua)  # warm up, and check
        if result["errors"]:
            raise RuntimeError(f"{target} on port {gw} answers errors: {result}")


def health_table(bench: Bench) -> str:
    """CPU per request of the seed gateway (one node, passive checks) and of one with
    three nodes and active checks too, and their per-round ratio (target: <= 1.05)."""
    rows = [["wrk c=%d, same run" % bench.plan.wrk_connections, "req/s", "CPU us/req",
             "CPU vs seed (per round)"]]
    seed = bench.raw.get("health.cpu_us_per_req", {}).get("openaigw", [])
    for target in HEALTH_TARGETS:
        rounds = bench.raw.get("health.cpu_us_per_req", {}).get(target, [])
        ratios = [r / b for r, b in zip(rounds, seed) if b]
        rows.append([target, fmt(summary(bench, "health.rps", target)),
                     fmt(summary(bench, "health.cpu_us_per_req", target)),
                     fmt(statistics.median(ratios) if ratios else float("nan"), 3)
                     + " (" + " ".join(fmt(r, 3) for r in ratios) + ")"])
    return layout(rows)


def state_table(bench: Bench) -> str:
    """req/s and CPU per request with the limit's state in memory and in Redis; "vs
    memory" is the median of each round's ratio (the two run back to back)."""
    rows = [["limit-count, wrk c=%d" % bench.plan.wrk_connections, "req/s", "CPU us/req",
             "CPU vs memory (per round)"]]
    memory = bench.raw.get("state.cpu_us_per_req", {}).get("limit-memory", [])
    for target in STATE_TARGETS:
        rounds = bench.raw.get("state.cpu_us_per_req", {}).get(target, [])
        rows.append([target, fmt(summary(bench, "state.rps", target)),
                     fmt(summary(bench, "state.cpu_us_per_req", target)), per_round(rounds, memory)])
    return layout(rows)


# --- workers = 2 vs 1 --------------------------------------------------------------------

WORKER_TARGETS = ("openaigw-1w", "openaigw-2w")  # the seed gw.ini with workers = 1, 2


def process_tree(pid: int) -> List[int]:
    """*pid* and its children (a supervisor and its workers)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [pid] + [int(c) for c in f.read().split()]


def start_worker_targets(bench: Bench) -> None:
    """Both gateways, every process of each on the proxy core(s): one core for both on
    a two-core machine, so that 2 workers can only show their cost there; two cores for
    2 workers where the load generator still has its own."""
    env = dict(os.environ, OPENAI_API_KEY="sk-bench")
    cores = os.cpu_count() or 1
    for target, workers in zip(WORKER_TARGETS, (1, 2)):
        port = bench.ports[target] = free_port()
        directory = os.path.join(bench.tmp, target)
        os.mkdir(directory)
        ini = gateway_ini(port, bench.ports["direct"]).replace(
            "[gateway]\n", f"[gateway]\nworkers = {workers}\n", 1)
        gateway = start_gateway(directory, ini, port, env=env)
        bench.procs.append(gateway)
        bench.pids[target] = gateway.pid
        deadline = time.monotonic() + 30
        while len(process_tree(gateway.pid)) < 1 + (workers > 1) * workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target}: workers did not start; see {directory}")
            time.sleep(0.1)
        proxy_cores = {PROXY_CORE, 2} if workers > 1 and cores >= 3 else {PROXY_CORE}
        for pid in process_tree(gateway.pid):
            if cores >= 2:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    os.sched_setaffinity(int(tid), proxy_cores)
        result = asyncio.run(loadgen.fixed_rate(port, 100, 0.2, connections=4))
        if result["errors"] or not result["ok"]:
            raise RuntimeError(f"{target} on port {port} does not answer: {result}")
        run_wrk(port, 1, bench.plan.wrk_connections, bench.lua)


def workers_throughput(bench: Bench, target: str, port: int) -> Dict[str, float]:
    """wrk against one of WORKER_TARGETS; CPU of all its processes."""
    pids = process_tree(bench.pids[target])
    cpu = sum(cpu_seconds(pid) for pid in pids)
    result = run_wrk(port, bench.plan.wrk_seconds, bench.plan.wrk_connections, bench.lua)
    used = sum(cpu_seconds(pid) for pid in pids) - cpu
    result["cpu_us_per_req"] = used / max(1, result["requests"]) * 1e6
    return result


def workers_table(bench: Bench) -> str:
    """workers = 2 against 1: medians, and the median of each round's ratio."""
    one, two = WORKER_TARGETS
    rows = [["wrk c=%d, same run" % bench.plan.wrk_connections, "workers = 1", "workers = 2",
             "2 / 1 (per round)"]]
    for metric, label in (("rps", "req/s"), ("cpu_us_per_req", "CPU us/request (all processes)"),
                          ("p99_ms", "latency p99 ms")):
        values = bench.raw.get(f"work.{metric}", {})
        rows.append([label, fmt(summary(bench, f"work.{metric}", one)),
                     fmt(summary(bench, f"work.{metric}", two)),
                     per_round(values.get(two, []), values.get(one, []))])
    cores = os.cpu_count() or 1
    where = ("2 workers on 2 cores, the load generator on a third" if cores >= 3
             else "both on one core (the other runs the load generator): compare CPU/request")
    return layout(rows) + f"\n({where})"


# --- report ---------------------------------------------------------------------------

def summary(bench: Bench, metric: str, target: str, peak: bool = False) -> float:
    """Median over rounds, or the largest value (*peak*)."""
    values = bench.raw.get(metric, {}).get(target, [])
    if not values:
        return float("nan")
    return max(values) if peak else statistics.median(values)


def table(bench: Bench) -> Tuple[str, Dict[str, Dict[str, float]]]:
    p = bench.plan
    fast = f"{p.fast_streams} streams x {p.fast_chunks} x {p.fast_interval * 1e3:.0f}ms"
    slow = f"{p.slow_streams} streams x {p.slow_chunks} x {p.slow_interval * 1e3:.0f}ms"
    # (metric, label, is a latency: show the added time over direct)
    rows: List[Tuple[str, str, bool]] = [
        ("tput.rps", f"wrk c={p.wrk_connections}: req/s", False),
        ("tput.p50_ms", "  latency p50 ms", True),
        ("tput.p99_ms", "  latency p99 ms", True),
        ("tput.cpu_us_per_req", "  proxy CPU us/request", False),
        ("rate.p50_ms", f"{p.rate:g} req/s open loop: p50 ms", True),
        ("rate.p99_ms", "  p99 ms", True),
        ("fast.ttfb_p50_ms", f"{fast}: TTFB p50 ms", True),
        ("fast.ttfb_p99_ms", "  TTFB p99 ms", True),
        ("fast.chunk_p50_ms", "  chunk transit p50 ms", True),
        ("fast.chunk_p99_ms", "  chunk transit p99 ms", True),
        ("fast.coalesced_pct", "  chunks coalesced %", False),
        ("fast.complete", "  streams complete", False),
        ("fast.cpu_us_per_chunk", "  proxy CPU us/chunk", False),
        ("slow.complete", f"{slow}: complete", False),
        ("slow.ttfb_p99_ms", "  TTFB p99 ms", True),
        ("slow.chunk_p99_ms", "  chunk transit p99 ms", True),
        ("slow.coalesced_pct", "  chunks coalesced %", False),
        ("slow.cpu_us_per_chunk", "  proxy CPU us/chunk", False),
        ("slow.peak_rss_mib", "  proxy peak RSS MiB (max)", False),
        ("slow.rss_per_stream_kib", "  proxy RSS/stream KiB (max)", False),
    ]
    targets, added = bench.targets, bench.added
    # the gw/X columns
    compared = ("nginx", "twisted-tcp", "twisted-site", "twisted-rpr") + targets[len(TARGETS):]
    def short(target: str) -> str:
        return target.replace("twisted-", "").replace("openaigw-", "")

    head = (["workload", "direct", "nginx proxy", "twisted tcp", "twisted site", "twisted rpr",
             "openaigw"] + [t.replace("-", " ") for t in targets[len(TARGETS):]]
            + ["gw/" + short(t) for t in compared] + ["+" + short(t) for t in added])
    lines = [head]
    medians: Dict[str, Dict[str, float]] = {}
    for metric, label, latency in rows:
        m = {t: summary(bench, metric, t, "(max)" in label) for t in targets}
        medians[metric] = m
        ratios = [m["openaigw"] / m[t] if m[t] else float("nan") for t in compared]
        cells = [label] + [fmt(m[t]) for t in targets] + [fmt(r, 2) for r in ratios]
        cells += [fmt(m[t] - m["direct"]) if latency else "" for t in added]
        lines.append(cells)
    errors = {t: sum(sum(v.get(t, [])) for k, v in bench.raw.items() if k.endswith(".errors"))
              for t in targets}
    lines.append(["errors (wrk + open loop)"] + [fmt(errors[t]) for t in targets]
                 + [""] * (len(head) - 1 - len(targets)))
    text = layout(lines)
    return text, medians


def features_table(bench: Bench) -> str:
    """Throughput of the gateway bare, as seeded, and with every check on, and of the
    floors.  "vs bare" is the median over rounds of each round's ratio: they run back
    to back in a round, so the ratio cancels the drift that moves whole rounds on a
    shared machine."""
    rows = [["wrk c=%d, same run" % bench.plan.wrk_connections, "req/s", "CPU us/req",
             "vs bare (per round)"]]
    bare = bench.raw.get("feat.rps", {}).get("openaigw-bare", [])
    for target in FEATURE_TARGETS:
        rounds = bench.raw.get("feat.rps", {}).get(target, [])
        rows.append([target, fmt(summary(bench, "feat.rps", target)),
                     fmt(summary(bench, "feat.cpu_us_per_req", target)), per_round(rounds, bare)])
    return layout(rows)


def cache_table(bench: Bench) -> str:
    """A hit against the same request proxied (wrk, same rounds), and identical streams."""
    def cell(metric: str, target: str) -> str:
        return fmt(summary(bench, metric, target))

    rows = [["response cache, same run", "proxied", "hit", "hit/proxied"]]
    for metric, label in (("hitcpu.rps", "wrk c=%d: req/s" % bench.plan.wrk_connections),
                          ("hitcpu.p50_ms", "  latency p50 ms"), ("hitcpu.p99_ms", "  latency p99 ms"),
                          ("hitcpu.cpu_us_per_req", "  gateway CPU us/request (target: <= 0.5)")):
        values = [summary(bench, metric, t) for t in CACHE_TARGETS]
        rows.append([label, fmt(values[0]), fmt(values[1]),
                     fmt(values[1] / values[0] if values[0] else float("nan"), 2)])
    streams = f"{CACHE_STREAMS} identical streams x {bench.plan.fast_chunks}"
    target = CACHE_TARGETS[1]
    rows.append([f"{streams}: upstream calls", str(CACHE_STREAMS), cell("cstream.upstream_calls", target),
                 ""])
    rows.append(["  streams complete", "", cell("cstream.complete", target), ""])
    rows.append(["  coalesced (or hit)", "", cell("cstream.coalesced", target), ""])
    rows.append(["  TTFB p50 / p99 ms", "", cell("cstream.ttfb_p50_ms", target) + " / "
                 + cell("cstream.ttfb_p99_ms", target), ""])
    return layout(rows)


def per_round(rounds: List[float], base: List[float]) -> str:
    """The median of the rounds' ratios to ``base``'s, then each round's."""
    ratios = [r / b for r, b in zip(rounds, base) if b]
    median = statistics.median(ratios) if ratios else float("nan")
    return fmt(median, 2) + " (" + " ".join(fmt(r, 2) for r in ratios) + ")"


def layout(rows: List[List[str]]) -> str:
    """Rows as aligned columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(row, widths))) for row in rows)


def fmt(value: float, digits: int = 3) -> str:
    if value != value:  # NaN
        return "-"
    if abs(value) >= 100 or float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (< 1 minute)")
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers here")
    parser.add_argument("--baseline", metavar="DIR", default="",
                        help="also run the gateway from this source tree (a checkout of an older "
                             "commit) as openaigw-before, in the main table")
    parser.add_argument("--only", choices=("rate", "streams", "state", "workers", "health"), help="run this workload only")
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: apt-get install nginx-light wrk "
                             "libnginx-mod-http-echo")
    plan = QUICK if args.quick else FULL
    loadgen.raise_nofile()
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {LOAD_CORE})  # the Python load generator and its children
    else:
        print("warning: one core only: nothing is pinned", file=sys.stderr)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="openaigw-bench-")
    bench = Bench(plan, tmp, os.path.abspath(args.baseline) if args.baseline else "")
    try:
        bench.start()
        print("  ".join(f"{t} :{bench.ports[t]}" for t in bench.targets), flush=True)
        if args.only is None:
            bench.rounds("tput", bench.throughput)
        if args.only in (None, "rate"):
            bench.rounds("rate", bench.fixed_rate, bench.targets)
        if args.only in (None, "streams"):
            # (twisted-site: only how soon it answers the same bursts of requests)
            bench.rounds("fast", bench.fast_streams, bench.relays + ("twisted-site",))
            bench.rounds("slow", bench.slow_streams, bench.relays + ("twisted-site",))
        if args.only is None:
            bench.rounds("feat", bench.throughput, FEATURE_TARGETS, plan.feature_rounds)
            bench.rounds("hitcpu", bench.throughput, CACHE_TARGETS)
            bench.rounds("cstream", bench.cache_streams, CACHE_TARGETS[1:])
        if args.only in (None, "health"):
            bench.rounds("health", bench.throughput, HEALTH_TARGETS, plan.feature_rounds)
        if args.only in (None, "state"):
            start_state_targets(bench)
            bench.rounds("state", bench.throughput, STATE_TARGETS, plan.feature_rounds)
        if args.only in (None, "workers"):
            start_worker_targets(bench)
            bench.rounds("work", lambda target, port: workers_throughput(bench, target, port),
                         WORKER_TARGETS, plan.feature_rounds)
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted; logs kept in {tmp}")
    except BaseException:
        print(f"failed; logs kept in {tmp}", file=sys.stderr)
        raise
    finally:
        bench.stop()
    text, medians = table(bench)
    if args.only in (None, "rate", "streams"):
        print(f"\nmedians of {plan.rounds} round(s); +X = X - direct; "
              f"total {time.monotonic() - started:.0f}s\n")
        print(text)
    if args.only is None:
        print("\n" + features_table(bench))
        print("\n" + cache_table(bench))
    if args.only in (None, "health"):
        print("\n" + health_table(bench))
    if args.only in (None, "state"):
        print("\n" + state_table(bench))
    if args.only in (None, "workers"):
        print("\n" + workers_table(bench))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"plan": dataclasses.asdict(plan), "median": medians,
                       "rounds": bench.raw}, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
