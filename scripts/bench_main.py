"""The main table: small keep-alive HTTPS GETs, one client, one connection, through each contender in
every round (the order rotated each round), the proxy's CPU counted over all its processes."""

from __future__ import annotations

import argparse
import contextlib
import os
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
from bench_common import (
    BIN, ROOT, Column, Procs, Ratio, Section, Table, median, process_cpu, ratio, read_until, rotated, settled_cpu,
)
from bench_world import Proxy, World

WARM = 20  # requests before each timed run: the connection and TLS are up, caches are warm
TARGET_RATE, TARGET_CPU = ">= 1.3", "<= 0.75"


@dataclass
class Contender:
    name: str
    proxy: Proxy | None  # None: direct
    tab: bool = False  # one dashboard tab open while it is measured
    rates: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)  # s per request, the proxy's processes
    child_cpus: list[float] = field(default_factory=list)  # of it, the processes it started
    tab_messages: list[float] = field(default_factory=list)  # per request


@contextlib.contextmanager
def open_tab(proxy: Proxy, procs: Procs, counts: list[int]) -> Iterator[None]:
    """A browser tab on the proxy's dashboard for the block's duration; its message count into counts."""
    assert proxy.web_port and proxy.web_token
    tab = procs.start([BIN / "python", ROOT / "scripts" / "bench_tab.py", f"ws://127.0.0.1:{proxy.web_port}/updates"],
                      {**os.environ, "BENCH_TAB_TOKEN": proxy.web_token}, output=True)
    assert tab.stdout is not None
    if tab.stdout.readline().strip() != "open":
        raise SystemExit(f"bench: the tab could not open {proxy.name}'s /updates websocket")
    try:
        yield
    finally:
        tab.terminate()
        counts.append(int(read_until(tab, r"^messages (\d+)", timeout=15).group(1)))
        procs.stop(tab)


def run_once(c: Contender, world: World, n: int) -> None:
    """One timed run of n requests (every contender sends the same placeholder: sealgate fills it in)."""
    url, procs = world.recording.url("/bench"), world.procs
    headers = (c.proxy.session if c.proxy and c.proxy.session else world.session).auth
    roots = [c.proxy.proc.pid] if c.proxy else []
    ctx = ssl.create_default_context(cafile=c.proxy.ca if c.proxy else world.pki.ca_pem)
    counts: list[int] = []
    with contextlib.ExitStack() as stack:
        if c.tab and c.proxy:
            stack.enter_context(open_tab(c.proxy, procs, counts))
        client = stack.enter_context(httpx.Client(proxy=c.proxy.url() if c.proxy else None, verify=ctx,
                                                  trust_env=False, timeout=30))
        for _ in range(WARM):
            client.get(url, headers=headers).raise_for_status()
        cpu0, own0 = settled_cpu(roots), sum(map(process_cpu, roots))
        t0 = time.perf_counter()
        for _ in range(n):
            client.get(url, headers=headers).raise_for_status()
        c.rates.append(n / (time.perf_counter() - t0))
        if roots:
            cpu, own = settled_cpu(roots) - cpu0, sum(map(process_cpu, roots)) - own0
            c.cpus.append(cpu / n)
            c.child_cpus.append((cpu - own) / n)
    if counts:
        c.tab_messages.append(counts[0] / (n + WARM))


def contenders(world: World, args: argparse.Namespace) -> list[Contender]:
    """direct, the four contenders (the dashboards also with a tab open), the baseline: those --only names
    (a proxy is started only when one of its contenders is wanted)."""
    words = [w.strip() for w in (args.only or "").split(",") if w.strip()]

    def wanted(*names: str) -> list[str]:
        return [n for n in names if not words or any(w in n for w in words)]

    def each(names: list[str], start: Callable[[], Proxy]) -> list[Contender]:
        proxy = start() if names else None
        return [Contender(n, proxy, tab=n.endswith("+ tab")) for n in names]

    web = ("sealgate run (dashboard)", "sealgate run (dashboard) + tab")
    return [*(Contender(n, None) for n in wanted("direct")),
            *each(wanted("mitmdump -q"), lambda: world.mitmdump("mitmdump -q")),
            *each(wanted("mitmweb", "mitmweb + tab"), lambda: world.mitmweb("mitmweb")),
            *each(wanted("sealgate run --no-web"), lambda: world.sealgate("sealgate run --no-web")),
            *each(wanted(*web), lambda: world.sealgate("sealgate run (dashboard)", web=True)),
            *each(wanted("baseline sealgate --no-web") if args.baseline else [], lambda: world.baseline(args.baseline))]


def _row(c: Contender) -> dict:
    cpu, child = median(c.cpus), median(c.child_cpus)
    return {"contender": c.name, "req_s": median(c.rates), "cpu_ms": cpu * 1000 if cpu else None,
            "child_cpu_ms": child * 1000 if child is not None else None, "tab_msgs_per_req": median(c.tab_messages),
            "rates": c.rates, "cpus_ms": [x * 1000 for x in c.cpus]}


def _pair(rows: dict[str, dict], ours: str, theirs: str, targets: bool = True) -> list[Ratio]:
    if ours not in rows or theirs not in rows:
        return []
    a, b = rows[ours], rows[theirs]
    out = []
    for what, key, each, target in (("req/s", "req_s", "rates", TARGET_RATE), ("CPU  ", "cpu_ms", "cpus_ms", TARGET_CPU)):
        out.append(Ratio(f"{what}  {ours} / {theirs}", ratio(a[key], b[key]), target if targets else None))
        # the two ran a few seconds apart in each round, alike in the machine's drift: a steadier reading
        by_round = [x / y for x, y in zip(a[each], b[each], strict=True) if x and y]
        if by_round:
            out.append(Ratio(f"{what}  {ours} / {theirs}, median of each round's ("
                             + " ".join(f"{r:.2f}" for r in by_round) + ")", median(by_round)))
    return out


def run(world: World, args: argparse.Namespace) -> Section:
    cs = contenders(world, args)
    for r in range(args.rounds):
        for c in rotated(cs, r):
            try:
                run_once(c, world, args.requests)
            except httpx.HTTPStatusError as e:
                raise SystemExit(f"bench: {c.name} answered {e.response.status_code} "
                                 f"{e.response.headers.get('x-sealgate-error', '')}") from None
        print(f"main: round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    if any(c.proxy and c.proxy.session for c in cs) and f"Bearer {world.value}".encode() not in world.recording.seen():
        raise SystemExit("bench: the upstream never got the value through sealgate")  # (nothing secret shown)
    for proc in {c.proxy.proc for c in cs if c.proxy}:
        world.procs.stop(proc)
    rows = {c.name: _row(c) for c in cs}
    table = Table(f"main: {args.requests} keep-alive HTTPS GETs per run, {args.rounds} rounds, rotated; medians",
                  [Column("contender", "contender"), Column("req_s", "req/s"),
                   Column("cpu_ms", "CPU ms/req", "{:.2f}"), Column("child_cpu_ms", "of it children", "{:.2f}"),
                   Column("tab_msgs_per_req", "tab msgs/req", "{:.1f}")],
                  list(rows.values()))
    ratios = [*_pair(rows, "sealgate run --no-web", "mitmdump -q"),
              *_pair(rows, "sealgate run (dashboard)", "mitmweb"),
              *_pair(rows, "sealgate run (dashboard) + tab", "mitmweb + tab"),
              *_pair(rows, "sealgate run --no-web", "baseline sealgate --no-web", targets=False)]
    notes = ["CPU: user+system of the proxy process and every process it started (found via /proc children), "
             "read once the work left behind by the run (copies to the dashboard, websocket sends) settled; "
             "children: sealgate's dashboard and API processes"]
    if any(c.tab for c in cs):
        notes.append("tab: a websocket client on the dashboard's /updates reading and discarding every message "
                     "(scripts/bench_tab.py); its own CPU is not counted")
    return Section("main", [table], ratios, notes)
