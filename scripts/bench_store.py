"""The store at scale: a SQLite store of 101,000 secrets (1000 users with 100 each, and `alice` with 1000),
filled in process through `SecretStore.put`, one transaction per user, against a store holding one
secret. For each: the request path's lookup (`SecretStore.secrets_for`, cached until the store changes;
"on a loop": the store's version already read in this event-loop iteration, as for most calls on the
proxy; else each call reads it too, as the first call of an iteration does), opening all
of a principal's secrets uncached (a scrubber's first load), `session issue` in process
(`commands.issue_session`, what the API runs) and as the CLI, and `sealgate run --no-web` start-up
(process start to the proxy port accepting)."""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from collections.abc import Callable

from bench_common import ROOT, Column, Procs, Ratio, Section, Table, free_port, ratio, timed, wait_listening
from bench_world import SEALGATE, World, cli
from sealgate import commands, settings
from sealgate.store import SecretStore

USERS, PER_USER, PRINCIPAL, PRINCIPAL_SECRETS = 1000, 100, "alice", 1000
ORIGINS = json.dumps(["https://api.example.com"])
STARTS, CLI_ISSUES, ISSUES = 3, 5, 20


def fill(store: SecretStore, owner: str, count: int) -> None:
    now = time.time()
    with store.write() as tx:
        for i in range(count):
            store.put(tx, {"owner": owner, "name": f"S{i:04d}", "origins": ORIGINS, "created_at": now,
                           "updated_at": now, "policy": None}, f"sk-{secrets.token_urlsafe(24)}")


def per_call(fn: Callable[[], object], n: int) -> float:
    """Median seconds per call over 3 timings of n calls."""
    return statistics.median(timed(lambda: [fn() for _ in range(n)]) / n for _ in range(3))


def lookups(store: SecretStore, s: settings.Settings, owner: str) -> dict[str, float]:
    store.secrets_for(owner, {"S0000"})
    store.secrets_for(owner)

    def uncached() -> None:
        store.cache.clear()
        store.secrets_for(owner)

    def issue() -> None:
        commands.issue_session(store, s, access="signed-in", runchat="r", instance="i", user=owner, author=None,
                               ttl=None)
    async def on_loop() -> float:  # the store's version read once for the loop iteration, as on the proxy
        return per_call(lambda: store.secrets_for(owner, {"S0000"}), 20000)

    return {"loop_us": asyncio.run(on_loop()) * 1e6,
            "one_us": per_call(lambda: store.secrets_for(owner, {"S0000"}), 20000) * 1e6,
            "all_us": per_call(lambda: store.secrets_for(owner), 20000) * 1e6,
            "uncached_ms": per_call(uncached, 3) * 1e3, "issue_s": 1 / per_call(issue, ISSUES)}


def cli_issue_ms(env: dict[str, str], owner: str) -> float:
    cmd = [str(SEALGATE), "session", "issue", "--access", "signed-in", "--user", owner, "--runchat", "r",
           "--instance", "i"]
    return statistics.median(timed(lambda: cli(cmd, env, ROOT)) for _ in range(CLI_ISSUES)) * 1e3


def start_up_s(procs: Procs, env: dict[str, str]) -> float:
    times = []
    for _ in range(STARTS):
        port = free_port()
        proc = procs.start([SEALGATE, "run", "--no-web"], {**env, "SEALGATE_LISTEN_PORT": str(port),
                                                            "SEALGATE_API_PORT": str(free_port()),
                                                            "SEALGATE_METRICS_PORT": str(free_port())}, cwd=ROOT)
        times.append(wait_listening(proc, port, poll=0.01))
        procs.stop(proc)
    return statistics.median(times)


def run(world: World, args: argparse.Namespace) -> Section:
    small_dir, big_dir = world.tmp / "store-1", world.tmp / "store-101k"
    envs = {d: {**world.env, "SEALGATE_DATA_DIR": str(d)} for d in (small_dir, big_dir)}
    for env in envs.values():
        env.pop("SEALGATE_STORE_URL", None)
    small, big = SecretStore(small_dir), SecretStore(big_dir)
    fill(small, PRINCIPAL, 1)
    t0 = time.perf_counter()
    for u in range(USERS):
        fill(big, f"u{u:04d}", PER_USER)
    fill(big, PRINCIPAL, PRINCIPAL_SECRETS)
    filled = USERS * PER_USER + PRINCIPAL_SECRETS
    fill_rate = filled / (time.perf_counter() - t0)
    print(f"store: {filled} secrets stored ({fill_rate:.0f}/s)", file=sys.stderr, flush=True)
    cols = {"one": (small, small_dir, PRINCIPAL), "u100": (big, big_dir, "u0001"), "p1000": (big, big_dir, PRINCIPAL)}
    measured = {k: {**lookups(store, settings.load({}, envs[d]), owner), "cli_ms": cli_issue_ms(envs[d], owner)}
                for k, (store, d, owner) in cols.items()}
    starts = {"one": start_up_s(world.procs, envs[small_dir]), "u100": start_up_s(world.procs, envs[big_dir])}
    small.close()
    big.close()
    rows = [{"what": what, **{k: m[key] for k, m in measured.items()}} for what, key in (
        ("cached secrets_for(principal, {one name}) on a loop, µs", "loop_us"),
        ("cached secrets_for(principal, {one name}), µs", "one_us"), ("cached secrets_for(principal), µs", "all_us"),
        ("uncached secrets_for(principal), ms", "uncached_ms"), ("session issue in process, /s", "issue_s"),
        ("session issue, CLI, ms", "cli_ms"))]
    rows.append({"what": "sealgate run --no-web start-up, s", **starts})
    table = Table(f"store: SQLite, {filled} secrets ({USERS} users x {PER_USER}, {PRINCIPAL} x {PRINCIPAL_SECRETS}) "
                  "vs a store of 1 secret; medians",
                  [Column("what", "what"), Column("one", "store of 1: alice (1)", "{:.2f}"),
                   Column("u100", "101k: a user with 100", "{:.2f}"),
                   Column("p1000", f"101k: {PRINCIPAL} ({PRINCIPAL_SECRETS})", "{:.2f}")], rows)
    one, p1000 = measured["one"], measured["p1000"]
    ratios = [Ratio("cached one-name lookup on a loop: alice in 101k store / in store of 1",
                    ratio(p1000["loop_us"], one["loop_us"])),
              Ratio("session issue/s: alice (1000) in 101k / alice (1)", ratio(p1000["issue_s"], one["issue_s"])),
              Ratio("start-up: 101k store / store of 1", ratio(starts["u100"], starts["one"]))]
    return Section("store", [table], ratios,
                   [f"filled in process at {fill_rate:.0f} secrets/s (SecretStore.put, one transaction per user); "
                    "start-up is per store (the 101k figure is in the second column)"])
