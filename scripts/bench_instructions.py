"""Instructions per request: the main table's small keep-alive HTTPS GETs, counted by valgrind's callgrind
instead of timed. This machine's CPU time per request moves by 15-25% from one run to the next of the same
tree; an instruction count repeats to some 0.3% (a few % with other work running beside it), so a change of a
few % to the request path can be seen here and not in the main table.

Each contender runs under `valgrind --tool=callgrind --instr-atstart=no` (start-up uninstrumented, some 20x
slower than native), is warmed with WARM requests, then counted (`callgrind_control -i on`, `-z`) over
--requests requests and dumped (`-d`); the count is the proxy process's, all its threads (the audit
thread's rows included), user space only: the kernel's work (send calls, TLS on loopback) is not in it.
"""

from __future__ import annotations

import argparse
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import httpx
from bench_common import Column, Ratio, Section, Table, ratio
from bench_world import Proxy, World

WARM = 30  # requests before the count: connections, TLS and caches are up
START_WAIT = 600  # seconds a contender may take to start under valgrind


def _count(world: World, proxy: Proxy, out: Path, n: int) -> float:
    """The proxy's instructions over n requests, once warmed (callgrind's totals of its dump)."""
    url = world.recording.url("/bench")
    headers = (proxy.session or world.session).auth
    ctx = ssl.create_default_context(cafile=proxy.ca)
    with httpx.Client(proxy=proxy.url(), verify=ctx, trust_env=False, timeout=120) as client:
        for _ in range(WARM):
            client.get(url, headers=headers).raise_for_status()
        pid = str(proxy.proc.pid)
        for step in ("-i", "on"), ("-z",):
            subprocess.run(["callgrind_control", *step, pid], capture_output=True, check=True)
        for _ in range(n):
            client.get(url, headers=headers).raise_for_status()
        subprocess.run(["callgrind_control", "-d", pid], capture_output=True, check=True)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        for dump in sorted(out.parent.glob(f"{out.name}.*")):
            totals = [line for line in dump.read_text().splitlines() if line.startswith("totals:")]
            if totals:
                return int(totals[0].split()[1])
        time.sleep(0.2)
    raise SystemExit(f"bench: callgrind wrote no dump for {proxy.name}")


def run(world: World, args: argparse.Namespace) -> Section:
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        return Section("instructions", skipped="valgrind is not installed (Debian: apt-get install valgrind)")
    n = args.requests

    def launcher(name: str) -> tuple[list[str], Path]:
        out = world.tmp / f"callgrind-{name}"
        return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"], out

    starts = {"mitmdump -q": lambda lc: world.mitmdump("mitmdump -q (callgrind)", launcher=lc, wait=START_WAIT),
              "sealgate run --no-web": lambda lc: world.sealgate("sealgate --no-web (callgrind)", launcher=lc,
                                                                 wait=START_WAIT)}
    if args.baseline:
        starts["baseline sealgate --no-web"] = lambda lc: world.baseline(args.baseline, launcher=lc, wait=START_WAIT)
    rows: dict[str, dict] = {}
    for i, (name, start) in enumerate(starts.items()):
        lc, out = launcher(str(i))
        proxy = start(lc)
        try:
            rows[name] = {"contender": name, "minstr": _count(world, proxy, out, n) / n / 1e6}
        finally:
            world.procs.stop(proxy.proc)
    per = {k: r["minstr"] for k, r in rows.items()}
    ours = per["sealgate run --no-web"]
    return Section("instructions", [Table(
        f"instructions: {n} keep-alive HTTPS GETs per contender, as in main, counted by callgrind after {WARM} "
        "(the proxy process, all its threads, user space)",
        [Column("contender", "contender"), Column("minstr", "M instructions per request", "{:.3f}")],
        list(rows.values()))],
        [Ratio("instructions  sealgate run --no-web / mitmdump -q", ratio(ours, per["mitmdump -q"])),
         *([Ratio("instructions  sealgate run --no-web / baseline", ratio(ours, per["baseline sealgate --no-web"]))]
           if args.baseline else [])],
        ["the count repeats to some 0.3% on a quiet machine: compare trees here, and CPU time in main"])
