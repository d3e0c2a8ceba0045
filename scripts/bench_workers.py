"""`sealgate run --no-web --workers 1` vs `--workers 2` (N proxy processes accepting on one port) under
concurrent load: CONCURRENCY keep-alive HTTP/1.1 connections, each with one request in flight (closed loop),
to nginx serving a constant answer when installed (one process), else the lean Python upstream.

The load generator is scripts/bench_load.py: one Python process, one epoll loop (wrk-like), run as a child
of its own so its CPU is counted apart. Why: everything shares the machine's two cores. Two proxy processes
need both, so whatever the client and the upstream spend per request is taken from the proxy: with p, c and
u the proxy's, the client's and the upstream's CPU per request, two cores carry at most 2p / (p + c + u)
times one proxy process's rate. `curl --parallel` spent ~0.5 ms a request (a cap near 1.68x whatever the
gateway did, lower as the proxy gets cheaper); bench_load.py spends ~0.15-0.2 ms through the proxy (it
wakes for every response; see its docstring) and ~0.04 ms flat out against nginx. BENCH_CLIENT=curl
measures with curl as before (whole runs).

bench_load.py's runs are measured from the moment all its connections are open to its last response (its
--mark). Opening 32 connections through sealgate (CONNECT, proxy authentication, TLS both ways: some 12-14 ms
of proxy CPU each, several requests' worth) takes 0.3-0.4 s of every run, and a second proxy process shortens
it only partly (measured: 74-87 new connections a second with one, 101-114 with two): a fixed cost that
weighs more on the shorter run (--workers 2's) and pulled the ratio down by 0.03-0.05; the whole-run ratio
is shown beside it. `direct` (the client straight to the upstream) is the
floor. The table also shows how busy each proxy process was (CPU / measured time), how the kernel spread the
connections over them (looked up in /proc), and what the rest of the proxy's process tree (the supervisor of
--workers 2, the API process) cost."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench_common import (
    BIN, ROOT, Column, Ratio, Section, Table, cpu_seconds, curl, free_port, machine_busy, median, process_cpu, ratio,
    rotated, settled_cpu, tree, wait_listening,
)
from bench_world import LOOPBACK_SANS, SEALGATE, Proxy, World

CONCURRENCY = 32
CLIENT = "curl" if os.environ.get("BENCH_CLIENT") == "curl" else "bench_load"  # the load generator
LOAD_SCRIPT = ROOT / "scripts" / "bench_load.py"
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
    rates: list[float] = field(default_factory=list)  # requests/s once the client's connections were open
    whole_rates: list[float] = field(default_factory=list)  # requests/s with the connecting
    proxy_cpu: list[float] = field(default_factory=list)  # s per request, each of these
    client_cpu: list[float] = field(default_factory=list)
    upstream_cpu: list[float] = field(default_factory=list)
    rest_cpu: list[float] = field(default_factory=list)  # the proxy's processes that are no proxy process
    connects: list[int] = field(default_factory=list)
    others: list[float] = field(default_factory=list)  # share of the machine's cores busy with others' work
    busy: list[list[float]] = field(default_factory=list)  # per run: each proxy process's CPU / wall time
    spread: list[list[int]] = field(default_factory=list)  # per run: connections each proxy process held

    def row(self) -> dict:
        def ms(v: list[float]) -> float | None:
            return median(v) * 1000 if v else None
        busy = [median([sorted(b, reverse=True)[i] for b in self.busy]) for i in range(len(self.busy[0]))] \
            if self.busy else []
        return {"contender": self.name, "req_s": median(self.rates), "proxy_ms": ms(self.proxy_cpu),
                "client_ms": ms(self.client_cpu), "upstream_ms": ms(self.upstream_cpu), "rest_ms": ms(self.rest_cpu),
                "busy_pct": "/".join(f"{b * 100:.0f}" for b in busy) or None,
                "proxy_cores": median([sum(b) for b in self.busy]) if self.busy else None,
                "spread": " ".join("/".join(map(str, s)) for s in self.spread) or None,
                "connects": median(self.connects), "others_pct": median(self.others) * 100 if self.others else None,
                "req_s_whole": median(self.whole_rates), "rates": self.rates, "whole_rates": self.whole_rates,
                "busy": self.busy}


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


def proxy_processes(root: int) -> list[int]:
    """The processes of a proxy's tree that proxy: `python -m sealgate.runner` under a supervisor, else the
    root itself (`--workers 1`)."""
    workers = [pid for pid in tree(root) if b"sealgate.runner" in _cmdline(pid)]
    return workers or [root]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def connections_held(pids: list[int], port: int) -> list[int]:
    """How many established TCP connections to `port` each process holds now (/proc/net/tcp by socket inode)."""
    established: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port:
                established.add(f[9])
    held = []
    for pid in pids:
        inodes = set()
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    link = os.readlink(fd)
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
        held.append(len(inodes & established))
    return held


class Spread:
    """While the `with` block runs: the most connections to the proxy's port seen held at once, per process
    (looked at every 0.25 s: the client keeps CONCURRENCY open for the whole run)."""

    def __init__(self, pids: list[int], port: int) -> None:
        self.pids, self.port, self.best = pids, port, [0] * len(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._look, daemon=True)

    def _look(self) -> None:
        while not self._stop.wait(0.25):
            if sum(now := connections_held(self.pids, self.port)) > sum(self.best):
                self.best = now

    def __enter__(self) -> Spread:
        if self.pids:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.pids:
            self._thread.join()


@dataclass
class Snapshot:
    """CPU seconds so far of the processes a run measures, the machine's busy seconds, and the time."""
    t: float
    busy: float
    proxy: dict[int, float]  # by pid: every process of the proxy's tree
    upstream: float
    client: float  # the load generator's, while it runs (0 before)


def snapshot(pids: list[int], upstream_pid: int, client_pid: int | None = None) -> Snapshot:
    return Snapshot(time.perf_counter(), machine_busy(), {pid: process_cpu(pid) for pid in pids},
                    cpu_seconds([upstream_pid]), process_cpu(client_pid) if client_pid else 0.0)


@dataclass
class Result:
    statuses: dict[str, int]
    connects: int
    requests: int  # in the measured stretch: once every connection was set up (bench_load), else all
    elapsed: float  # seconds of that stretch
    client_cpu: float  # the client's CPU seconds over it
    whole_elapsed: float  # from the first connect to the last response
    start: Snapshot | None  # taken when the stretch began (bench_load's mark), None: at the start


def drive(world: World, c: Contender, url: str, n: int, pids: list[int], upstream_pid: int) -> Result:
    """One run of the load generator. bench_load.py's numbers are those of its steady stretch, once all its
    connections are open (the module's docstring says why); the table's CPU columns are over the same stretch,
    from a snapshot taken when it says so (--mark)."""
    ca = c.proxy.ca if c.proxy else str(world.pki.ca_pem)
    if CLIENT == "curl":
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        lines, elapsed = curl(world.tmp / "curl.conf", world.env, ca=ca, proxy=c.proxy.url() if c.proxy else None,
                              headers=world.session.auth, urls=[url] * n,
                              options=["parallel", f"parallel-max = {CONCURRENCY}",
                                       'write-out = "%{http_code} %{num_connects}\\n"'])
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return Result(dict(Counter(code for code, _ in lines)), sum(int(k) for _, k in lines), n, elapsed,
                      child1.ru_utime + child1.ru_stime - child0.ru_utime - child0.ru_stime, elapsed, None)
    # the proxy URL holds the session's credential: in the child's environment, not on its command line
    env = {**world.env, **({"BENCH_LOAD_PROXY": c.proxy.url()} if c.proxy else {})}
    headers = [x for k, v in world.session.auth.items() for x in ("-H", f"{k}: {v}")]
    proc = subprocess.Popen([BIN / "python", LOAD_SCRIPT, url, "-n", str(n), "-c", str(CONCURRENCY), "--cacert", ca,
                             "--mark", *headers], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    start, doc = None, None
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        try:
            got = json.loads(line)
        except ValueError:
            continue
        if got.get("mark") == "steady":
            start = snapshot(pids, upstream_pid, proc.pid)
        else:
            doc = got
    err = proc.stderr.read()
    proc.wait()
    if doc is None:
        raise SystemExit(f"bench: bench_load.py exited {proc.returncode}: {err.strip()[-300:]}")
    steady = doc.get("steady")
    if start is None or not steady or not steady["requests"]:
        return Result(doc["statuses"], doc["connects"], n, doc["elapsed"], doc["cpu"], doc["elapsed"], None)
    return Result(doc["statuses"], doc["connects"], steady["requests"], steady["elapsed"], steady["cpu"],
                  doc["elapsed"], start)


def run_once(world: World, c: Contender, url: str, n: int, upstream_pid: int, timed: bool = True) -> None:
    roots = [c.proxy.proc.pid] if c.proxy else []
    workers = proxy_processes(roots[0]) if roots else []
    pids = tree(roots[0]) if roots else []
    settled_cpu(roots)
    s0, child0 = snapshot(pids, upstream_pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    with Spread(workers, c.proxy.port if c.proxy else 0) as spread:
        r = drive(world, c, url, n, pids, upstream_pid)
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    settled_cpu(roots)  # what the proxy still does for the run (a dashboard's copies, an audit flush) counts
    s1 = snapshot(pids, upstream_pid)
    if r.statuses != {"200": n}:
        raise SystemExit(f"bench: {CLIENT} through {c.name}: statuses {r.statuses}")
    if not timed:
        return
    a = r.start or s0
    k = r.requests
    proxy = {pid: s1.proxy[pid] - a.proxy[pid] for pid in pids}
    upstream = s1.upstream - a.upstream
    client_all = child1.ru_utime + child1.ru_stime - child0.ru_utime - child0.ru_stime - a.client
    c.rates.append(k / r.elapsed)
    c.whole_rates.append(n / r.whole_elapsed)
    c.client_cpu.append(r.client_cpu / k)
    c.upstream_cpu.append(upstream / k)
    c.connects.append(r.connects)
    c.others.append(max(0.0, s1.busy - a.busy - client_all - upstream - sum(proxy.values()))
                    / ((s1.t - a.t) * (os.cpu_count() or 1)))
    if roots:
        c.proxy_cpu.append(sum(proxy.values()) / k)
        c.busy.append([proxy[p] / r.elapsed for p in workers])
        c.rest_cpu.append(sum(v for p, v in proxy.items() if p not in workers) / k)
        c.spread.append(sorted(spread.best, reverse=True))


def run(world: World, args: argparse.Namespace) -> Section:
    if CLIENT == "curl" and not shutil.which("curl"):
        return Section("workers", skipped="curl is not installed (BENCH_CLIENT=curl)")
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
    steady = CLIENT != "curl"
    client = "curl --parallel" if CLIENT == "curl" else "bench_load.py"
    table = Table(f"workers: {n} HTTPS GETs per run over {CONCURRENCY} keep-alive connections ({client}), "
                  f"upstream {upstream_text}; medians of {args.rounds}, CPU ms per request"
                  + ("; rates and CPU once the connections were open" if steady else ""),
                  [Column("contender", "contender"), Column("req_s", "req/s"), Column("proxy_ms", "proxy CPU", "{:.2f}"),
                   Column("client_ms", f"{CLIENT} CPU", "{:.3f}"), Column("upstream_ms", "upstream CPU", "{:.3f}"),
                   Column("rest_ms", "supervisor+api CPU", "{:.3f}"), Column("busy_pct", "proxy procs busy %"),
                   Column("connects", "connections"), Column("spread", "connections per proxy process, each run"),
                   Column("others_pct", "others' CPU %")], list(rows.values()))
    by_round = [b / a for a, b in zip(one["rates"], two["rates"])]  # the two ran back to back: alike in others' load
    ratios = [Ratio("req/s  --workers 2 / --workers 1", ratio(two["req_s"], one["req_s"]), ">= 1.7"),
              Ratio("req/s  --workers 2 / --workers 1, median of each round's (" +
                    " ".join(f"{r:.2f}" for r in by_round) + ")", median(by_round)),
              *([Ratio("req/s with the connecting (the whole run)  --workers 2 / --workers 1",
                       ratio(two["req_s_whole"], one["req_s_whole"]))] if steady else []),
              Ratio("proxy CPU per request  --workers 2 / --workers 1", ratio(two["proxy_ms"], one["proxy_ms"]))]
    p, c_, u = (two[k] for k in ("proxy_ms", "client_ms", "upstream_ms"))
    cap = 2 * p / (p + c_ + u) if None not in (p, c_, u) else None
    cores1, cores2, per = one["proxy_cores"], two["proxy_cores"], ratio(two["proxy_ms"], one["proxy_ms"])
    why = (f"req/s = proxy cores busy / proxy CPU per request, so the ratio is ({cores2:.2f} / {cores1:.2f} cores) / "
           f"{per:.2f} = {cores2 / cores1 / per:.2f}: --workers 1 keeps a core busy and more (its threads besides "
           f"the event loop run on the other core), --workers 2 gets what the client ({two['client_ms'] * two['req_s'] / 1000:.2f} "
           f"cores), the upstream ({two['upstream_ms'] * two['req_s'] / 1000:.2f}) and the rest of the machine leave"
           ) if cores1 and cores2 and per and None not in (two["client_ms"], two["upstream_ms"]) else None
    return Section("workers", [table], ratios, [
        *([f"bench_load.py measures from the moment its {CONCURRENCY} connections are open (CONNECT and TLS both "
           "ways: 0.3-0.4 s of each run, only partly shortened by a second proxy process) to its last response; "
           "every CPU column is over that same stretch"] if steady else []),
        f"connections: TCP connections {CLIENT} opened per run (reuse works when it is about {CONCURRENCY}); "
        "proxy CPU counts every process of the proxy tree, supervisor+api CPU the ones that are no proxy process; "
        "proxy procs busy %: each proxy process's CPU over the measured time (1 core = 100)",
        "at --workers 2's costs per request two cores carry at most 2p / (p + client + upstream) = "
        + (f"{cap:.2f}x" if cap else "-") + " one proxy process's rate",
        *([why] if why else []),
        "others' CPU %: the share of all cores busy during a run with work that is none of the bench's "
        "(other users of the machine): two workers need both cores, so compare ratios from runs where it is low"])
