"""Throughput side by side, in one run: small HTTPS GETs over keep-alive through
(1) nothing, (2) plain `mitmdump -q`, (3) `sealgate run` without placeholders,
(4) `sealgate run` injecting a header, (5) the same with the dashboard mirror on,
(6) the dashboard as a chain instead: a second mitmproxy in upstream mode in front of
sealgate, (7) stock mitmdump carrying the sealgate addon.

Rounds interleave the setups so that the machine's noise hits them alike; the report
gives the median rate, the proxy's CPU per request, and ratios against plain mitmdump.
With --baseline DIR (another checkout with its own .venv, e.g. a `git worktree` of an earlier
commit), that checkout's `sealgate run` is measured beside this one's, for before/after ratios
of a change to the request path. Only loopback addresses are used.
Usage: scripts/bench [--requests N] [--rounds R] [--baseline DIR] [--store-url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from upstream import TestPKI, serve  # noqa: E402

BIN = ROOT / ".venv" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: a proxy exited early: {proc.args}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("bench: a proxy did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Setup:
    name: str
    proxy_url: str | None
    ca: str
    headers: dict[str, str]
    pids: tuple[int, ...]  # whose CPU the setup costs


def run_round(setup: Setup, url: str, n: int) -> tuple[float, float | None]:
    ctx = ssl.create_default_context(cafile=setup.ca)
    with httpx.Client(proxy=setup.proxy_url, verify=ctx, trust_env=False, timeout=30) as c:
        for _ in range(20):  # warm the connection and TLS
            c.get(url, headers=setup.headers).raise_for_status()
        cpu0 = sum(map(cpu_seconds, setup.pids))
        t0 = time.perf_counter()
        for _ in range(n):
            c.get(url, headers=setup.headers).raise_for_status()
        elapsed = time.perf_counter() - t0
        cpu = (sum(map(cpu_seconds, setup.pids)) - cpu0) / n if setup.pids else None
    return n / elapsed, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", help="comma-separated words: measure only the setups whose name has one (and mitmdump)")
    ap.add_argument("--baseline", type=Path, help="another checkout whose .venv/bin/sealgate to measure beside this one")
    ap.add_argument("--store-url", help="this checkout's store (e.g. postgresql://...; the baseline keeps its own SQLite)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="sealgate-bench-") as d:  # holds a store, a key and a CA: removed after
        bench(Path(d), args)


def bench(tmp: Path, args: argparse.Namespace) -> None:
    pki = TestPKI.create(tmp)
    up, _ = serve(pki)
    url = up.url("/bench")
    value = f"sk-bench-{secrets.token_urlsafe(24)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEALGATE_") and "PROXY" not in k.upper()}
    sg_port, md_port, mds_port, web_sg_port, chain_port, base_port = (free_port() for _ in range(6))
    env.update(SEALGATE_DATA_DIR=str(tmp / "data"), SEALGATE_CERTS_DIR=str(tmp / "certs"),
               SEALGATE_LISTEN_PORT=str(sg_port), SEALGATE_UPSTREAM_CA=str(pki.ca_pem),
               SEALGATE_ALLOW_PRIVATE="127.0.0.1/32", SEALGATE_METRICS_PORT=str(free_port()),
               **({"SEALGATE_STORE_URL": args.store_url} if args.store_url else {}))
    sealgate = str(BIN / "sealgate")
    subprocess.run([sealgate, "secret", "add", "--user", "bench", "--name", "K", "--origins", up.origin],
                   input=value, text=True, env=env, check=True, capture_output=True)
    session = json.loads(subprocess.run([sealgate, "session", "issue", "--access", "signed-in", "--user", "bench",
                                         "--runchat", "r", "--instance", "i"], env=env, check=True,
                                        capture_output=True, text=True).stdout)
    ca, ph = session["ca_cert"], session["env"]["K"]
    cred = session["proxy_url"].split("//", 1)[1].split("@", 1)[0]
    procs = [
        subprocess.Popen([sealgate, "run", "--no-web"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([str(BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "-p", str(md_port),
                          "--set", f"confdir={tmp / 'certs'}", "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem}"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([str(BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "-p", str(mds_port),
                          "-s", str(ROOT / "scripts" / "mitmdump_addon.py"), "--set", f"sealgate_data_dir={tmp / 'data'}",
                          "--set", f"confdir={tmp / 'certs'}", "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem}",
                          "--set", "sealgate_allow_private=127.0.0.1/32"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sealgate, "run"], env={**env, "SEALGATE_LISTEN_PORT": str(web_sg_port),
                                                 "SEALGATE_WEB_PORT": str(free_port()),
                                                 "SEALGATE_METRICS_PORT": str(free_port())},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        # the chain: a front mitmproxy (standing in for mitmweb's proxy) forwarding to sealgate
        subprocess.Popen([str(BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "-p", str(chain_port),
                          "--mode", f"upstream:http://127.0.0.1:{sg_port}", "--set", f"upstream_auth={cred}",
                          "--set", f"confdir={tmp / 'front-certs'}", "--set", f"ssl_verify_upstream_trusted_ca={ca}"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    ports = [sg_port, md_port, mds_port, web_sg_port, chain_port]
    if args.baseline:  # its own store (an older sealgate may not read this one's) and session
        base_bin = str(args.baseline / ".venv" / "bin" / "sealgate")
        base_env = {**env, "SEALGATE_LISTEN_PORT": str(base_port), "SEALGATE_METRICS_PORT": str(free_port()),
                    "SEALGATE_DATA_DIR": str(tmp / "baseline-data")}
        base_env.pop("SEALGATE_STORE_URL", None)
        subprocess.run([base_bin, "secret", "add", "--user", "bench", "--name", "K", "--origins", up.origin],
                       input=value, text=True, env=base_env, check=True, capture_output=True, cwd=args.baseline)
        base_session = json.loads(subprocess.run(
            [base_bin, "session", "issue", "--access", "signed-in", "--user", "bench", "--runchat", "r",
             "--instance", "i"], env=base_env, check=True, capture_output=True, text=True, cwd=args.baseline).stdout)
        procs.append(subprocess.Popen([base_bin, "run", "--no-web"], cwd=args.baseline, env=base_env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        ports.append(base_port)
    try:
        for port, proc in zip(ports, procs, strict=True):
            wait_listening(port, proc)
        front_ca = str(tmp / "front-certs" / "mitmproxy-ca-cert.pem")
        inject = {"Authorization": f"Bearer {ph}"}
        web_url = session["proxy_url"].rsplit(":", 1)[0] + f":{web_sg_port}"
        dashboard_pids = tuple(int(p) for p in subprocess.run(["pgrep", "-P", str(procs[3].pid)],
                                                              capture_output=True, text=True).stdout.split())
        setups = [
            Setup("direct", None, str(pki.ca_pem), {}, ()),
            Setup("mitmdump -q (no addon)", f"http://127.0.0.1:{md_port}", ca, {}, (procs[1].pid,)),
            Setup("sealgate run, no placeholder", session["proxy_url"], ca, {}, (procs[0].pid,)),
            Setup("sealgate run, injecting", session["proxy_url"], ca, inject, (procs[0].pid,)),
            Setup("sealgate + mirror dashboard, injecting", web_url, ca, inject, (procs[3].pid, *dashboard_pids)),
            Setup("chain: front proxy -> sealgate, injecting", f"http://127.0.0.1:{chain_port}", front_ca, inject,
                  (procs[4].pid, procs[0].pid)),
            Setup("mitmdump -s sealgate, injecting", f"http://{cred}@127.0.0.1:{mds_port}", ca, inject,
                  (procs[2].pid,)),
        ]
        if args.baseline:
            base_inject = {"Authorization": f"Bearer {base_session['env']['K']}"}
            setups += [Setup("baseline sealgate run, no placeholder", base_session["proxy_url"], ca, {}, (procs[5].pid,)),
                       Setup("baseline sealgate run, injecting", base_session["proxy_url"], ca, base_inject,
                             (procs[5].pid,))]
        if args.only:
            words = [w.strip() for w in args.only.split(",") if w.strip()]
            setups = [s for s in setups if s.name.startswith("mitmdump -q") or any(w in s.name for w in words)]
        rates: dict[str, list[float]] = {s.name: [] for s in setups}
        cpus: dict[str, list[float]] = {s.name: [] for s in setups}
        for r in range(args.rounds):
            for s in setups:
                rate, cpu = run_round(s, url, args.requests)
                rates[s.name].append(rate)
                if cpu is not None:
                    cpus[s.name].append(cpu)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        assert value.encode() not in up.seen() or up.received[-1].header("Authorization") == f"Bearer {value}"
        base = statistics.median(rates["mitmdump -q (no addon)"])
        base_cpu = statistics.median(cpus["mitmdump -q (no addon)"])
        print(f"{args.requests} keep-alive HTTPS GETs per round, {args.rounds} rounds, medians:")
        print(f"{'setup':42} {'req/s':>8} {'x mitmdump':>11} {'CPU ms/req':>11} {'x CPU':>7}")
        for s in setups:
            rate = statistics.median(rates[s.name])
            cpu = statistics.median(cpus[s.name]) if cpus[s.name] else None
            cpu_txt = f"{cpu * 1000:11.2f} {cpu / base_cpu:7.2f}" if cpu else f"{'-':>11} {'-':>7}"
            print(f"{s.name:42} {rate:8.0f} {rate / base:11.2f} {cpu_txt}")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


if __name__ == "__main__":
    main()
