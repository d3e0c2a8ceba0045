"""`sealgate run --no-web --workers 1` vs `--workers 2` (N proxy processes on one port, SO_REUSEPORT) under
concurrent load: curl with CONCURRENCY parallel keep-alive HTTP/1.1 transfers (C, far cheaper per request
than the proxy), to nginx serving a constant answer when installed (one process), else the lean
Python upstream. Two proxy processes on two cores leave little for the client and the upstream, so
their CPU per request is shown too, and `direct` (curl straight to the upstream) is the floor."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

from bench_common import (
    Column, Ratio, Section, Table, cpu_seconds, curl, free_port, machine_busy, median, ratio, rotated, settled_cpu,
    wait_listening,
)
from bench_world import LOOPBACK_SANS, SEALGATE, Proxy, World

CONCURRENCY = 32
LOAD = 5  # requests per run: this many times --requests
WARM = 2 * CONCURRENCY  # requests of an untimed first run per contender (connections, certificates, caches)
NGINX_CONF = """daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
  server {{
    listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};
    location / {{ default_type application/json; return 200 '{{"ok": true}}'; }}
  }}
}}
"""


@dataclass
class Contender:
    name: str
    proxy: Proxy | None
    rates: list[float] = field(default_factory=list)
    proxy_cpu: list[float] = field(default_factory=list)  # s per request, each of these
    client_cpu: list[float] = field(default_factory=list)
    upstream_cpu: list[float] = field(default_factory=list)
    connects: list[int] = field(default_factory=list)
    others: list[float] = field(default_factory=list)  # share of the machine's cores busy with others' work

    def row(self) -> dict:
        def ms(v: list[float]) -> float | None:
            return median(v) * 1000 if v else None
        return {"contender": self.name, "req_s": median(self.rates), "proxy_ms": ms(self.proxy_cpu),
                "client_ms": ms(self.client_cpu), "upstream_ms": ms(self.upstream_cpu),
                "connects": median(self.connects), "others_pct": median(self.others) * 100 if self.others else None,
                "rates": self.rates}


def has_workers_flag() -> bool:
    out = subprocess.run([SEALGATE, "run", "--help"], capture_output=True, text=True)
    return "--workers" in out.stdout


def start_upstream(world: World) -> tuple[str, int, str]:
    """(origin, pid, what) of the upstream: nginx when installed, else the lean one already running."""
    if not shutil.which("nginx"):
        return world.lean.origin, world.lean_proc.pid, "the lean Python upstream (nginx not installed)"
    d, port = world.tmp / "nginx", free_port()
    d.mkdir()
    cert, key = world.pki.issue("nginx", LOOPBACK_SANS)
    (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=port, cert=cert, key=key))
    proc = world.procs.start(["nginx", "-p", d, "-e", d / "error.log", "-c", d / "nginx.conf"])
    wait_listening(proc, port)
    return f"https://127.0.0.1:{port}", proc.pid, "nginx, one process"


def run_once(world: World, c: Contender, url: str, n: int, upstream_pid: int, timed: bool = True) -> None:
    roots = [c.proxy.proc.pid] if c.proxy else []
    proxy0, up0 = settled_cpu(roots), cpu_seconds([upstream_pid])
    child0, busy0 = resource.getrusage(resource.RUSAGE_CHILDREN), machine_busy()
    lines, elapsed = curl(world.tmp / "curl.conf", world.env, ca=c.proxy.ca if c.proxy else str(world.pki.ca_pem),
                          proxy=c.proxy.url() if c.proxy else None, headers=world.session.auth, urls=[url] * n,
                          options=["parallel", f"parallel-max = {CONCURRENCY}",
                                   'write-out = "%{http_code} %{num_connects}\\n"'])
    child1, busy1 = resource.getrusage(resource.RUSAGE_CHILDREN), machine_busy()
    if (codes := Counter(code for code, _ in lines)) != {"200": n}:
        raise SystemExit(f"bench: curl through {c.name}: statuses {dict(codes)}")
    if timed:
        client, upstream = child1.ru_utime + child1.ru_stime - child0.ru_utime - child0.ru_stime, \
            cpu_seconds([upstream_pid]) - up0
        proxy = cpu_seconds(roots) - proxy0  # over the run itself, like machine_busy
        c.rates.append(n / elapsed)
        c.client_cpu.append(client / n)
        c.upstream_cpu.append(upstream / n)
        c.connects.append(sum(int(k) for _, k in lines))
        c.others.append(max(0.0, busy1 - busy0 - client - upstream - proxy) / (elapsed * (os.cpu_count() or 1)))
        if roots:
            c.proxy_cpu.append((settled_cpu(roots) - proxy0) / n)


def run(world: World, args: argparse.Namespace) -> Section:
    if not shutil.which("curl"):
        return Section("workers", skipped="curl is not installed (the load generator)")
    if not has_workers_flag():
        return Section("workers", skipped="this sealgate has no `run --workers N` yet")
    origin, upstream_pid, upstream_text = start_upstream(world)
    if origin not in world.origins:
        world.allow(origin)
    cs = [Contender("direct", None), *(Contender(f"sealgate --workers {k}", world.sealgate(f"workers {k}", "--workers", str(k)))
                                       for k in (1, 2))]
    url, n = f"{origin}/small", args.requests * LOAD
    for c in cs:
        run_once(world, c, url, WARM, upstream_pid, timed=False)
    for r in range(args.rounds):
        for c in rotated(cs, r):
            run_once(world, c, url, n, upstream_pid)
        print(f"workers: round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    for c in cs[1:]:
        world.procs.stop(c.proxy.proc)
    rows = {c.name: c.row() for c in cs}
    one, two = rows["sealgate --workers 1"], rows["sealgate --workers 2"]
    table = Table(f"workers: {n} HTTPS GETs per run over {CONCURRENCY} keep-alive connections (curl --parallel), "
                  f"upstream {upstream_text}; medians of {args.rounds}, CPU ms per request",
                  [Column("contender", "contender"), Column("req_s", "req/s"), Column("proxy_ms", "proxy CPU", "{:.2f}"),
                   Column("client_ms", "curl CPU", "{:.3f}"), Column("upstream_ms", "upstream CPU", "{:.3f}"),
                   Column("connects", "connections"), Column("others_pct", "others' CPU %")], list(rows.values()))
    ratios = [Ratio("req/s  --workers 2 / --workers 1", ratio(two["req_s"], one["req_s"]), ">= 1.7"),
              Ratio("proxy CPU per request  --workers 2 / --workers 1", ratio(two["proxy_ms"], one["proxy_ms"]))]
    return Section("workers", [table], ratios,
                   ["connections: TCP connections curl opened per run (reuse works when it is about "
                    f"{CONCURRENCY}); proxy CPU counts every process of the proxy tree",
                    "others' CPU %: the share of all cores busy during a run with work that is none of the bench's "
                    "(other users of the machine): two workers need both cores, so compare ratios from runs where "
                    "it is low"])
