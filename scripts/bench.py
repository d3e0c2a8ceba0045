"""sealgate's benchmark, in one run, on loopback only. What it measures and how to read it:

main     small keep-alive HTTPS GETs (one client, one connection) to a local HTTPS upstream through: nothing
         (`direct`, the floor), plain `mitmdump -q`, plain `mitmweb`, `sealgate run --no-web` and `sealgate run`
         with its dashboard (as ./scripts/run starts it), both sealgate filling a placeholder into
         `Authorization: Bearer`. The dashboards also with one browser tab open (a websocket client on
         `/updates`). Medians of req/s and of the proxy's CPU per request (all its processes). Ratios:
         sealgate --no-web vs mitmdump, sealgate with dashboard vs mitmweb; targets rate >= 1.3x, CPU <= 0.75x.
upload   a 100 MiB POST (streamed by the client), a placeholder in a header (and, for sealgate, one inside the
         body), through sealgate --no-web vs mitmdump with stream_large_bodies=1m: MB/s and the proxy's peak RSS.
sse      a long text/event-stream response (512 B and 16 KiB events), fetched by curl, through sealgate
         (which scrubs every chunk) vs mitmdump with stream_large_bodies=1m: MB/s.
scanner  in process: placeholders.find and the scrubber over bodies of 64 KiB, 1 MiB and 8 MiB with 1 to 1000
         secrets of the principal: MB/s per cell; is the cost flat in the secret count and linear in size?
store    a SQLite store of 101,000 secrets: the request path's cached lookup, `session issue` (in process and
         CLI) and `sealgate run` start-up, against a store of one secret.
workers  `sealgate run --no-web --workers 1` vs `--workers 2` under 32 concurrent keep-alive connections (curl),
         upstream nginx when installed; the client's and the upstream's CPU per request are shown too, and how
         much of the cores other users of the machine took (two workers need both cores).
instructions  main's requests through sealgate --no-web, mitmdump -q (and the baseline) under valgrind's
         callgrind: instructions per request, which repeat where CPU time does not (not in `all`: minutes).

Every contender runs in every round, the order rotated each round, so the machine's noise hits all alike;
trust ratios from one run, not absolute numbers across runs. Results go to --json (bench-results.json).
With --baseline DIR (another checkout with its own .venv, e.g. a `git worktree` of an earlier commit), that
checkout's `sealgate run --no-web` is measured beside this one's in the main table.

Usage: scripts/bench [--sections main,upload,sse,scanner,store,workers,instructions|all] [--requests N] [--rounds R]
                     [--only WORDS] [--baseline DIR] [--store-url URL] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bench_bodies
import bench_instructions
import bench_main
import bench_scanner
import bench_store
import bench_workers
from bench_common import Procs, Section, machine, machine_text
from bench_world import World

SECTIONS: dict[str, Callable[[World, argparse.Namespace], Section]] = {
    "main": bench_main.run, "upload": bench_bodies.upload, "sse": bench_bodies.sse, "scanner": bench_scanner.run,
    "store": bench_store.run, "workers": bench_workers.run, "instructions": bench_instructions.run,
}
EVERY = ("main", "upload", "sse", "scanner", "store", "workers")  # `all` (instructions takes minutes more)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\nUsage:")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sections", default="main",
                    help=f"comma-separated: {','.join(SECTIONS)}; or all: {','.join(EVERY)} (main)")
    ap.add_argument("--requests", type=int, default=200, help="requests per timed run (main; workers: 5x) (200)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each runs every contender once (5)")
    ap.add_argument("--only", help="comma-separated words: main measures only the contenders whose name has one")
    ap.add_argument("--baseline", type=Path, help="another checkout whose .venv/bin/sealgate to measure beside this one")
    ap.add_argument("--store-url", help="this checkout's store (e.g. postgresql://...; the baseline keeps its own SQLite)")
    ap.add_argument("--json", type=Path, default=Path("bench-results.json"), help="where results go (bench-results.json)")
    args = ap.parse_args()
    names = list(EVERY) if args.sections == "all" else [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := [s for s in names if s not in SECTIONS]:
        ap.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}, all")
    args.sections = names
    return args


def main() -> None:
    args = parse_args()
    about = machine()
    print(machine_text(about), flush=True)
    started, results = time.time(), {}
    procs = Procs()
    try:
        with tempfile.TemporaryDirectory(prefix="sealgate-bench-") as d:  # a store, a key, CAs: removed after
            world = World(Path(d), procs, args.store_url)
            for name in args.sections:
                results[name] = SECTIONS[name](world, args)
                print(f"{name}: done in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
            procs.close()  # before the folder goes
    finally:
        procs.close()
    about["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc = {"machine": about, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "seconds": round(time.time() - started), "sections": {n: s.to_json() for n, s in results.items()}}
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print("\n" + machine_text(about))
    for section in results.values():
        print("\n" + section.render())
    print(f"\nresults: {args.json.absolute()}  ({doc['seconds']} s)")


if __name__ == "__main__":
    main()
