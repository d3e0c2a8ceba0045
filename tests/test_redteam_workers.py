"""Red team: `sealgate run --workers N` (the supervisor, its proxy processes, the probe port they share).

Findings are `test_finding_N_...` (they fail until fixed); attacks that held are `test_held_...`.
Every secret is made per test and only searched for, never printed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import socket
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import SEALGATE, _cli_in_process, free_port, make_proxy
from test_proxy import leaks
from test_workers import fetch, many, pids, scrape, start_gateway, wait_ready

from sealgate import settings, workers
from sealgate.metrics import Metrics

# --- helpers -------------------------------------------------------------------------------------------


def proxy_auth(s: dict) -> str:
    u = urlsplit(s["proxy_url"])
    return "Basic " + base64.b64encode(f"{u.username}:{u.password}".encode()).decode()


def raw_connect(p, s: dict, target: str, timeout: float = 10) -> tuple[int, bytes, socket.socket]:
    """A CONNECT of its own (a fresh source port: the kernel picks a process); (status, head, the open socket)."""
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=timeout)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {proxy_auth(s)}\r\n\r\n"
                 .encode())
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        status = int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        status = 0
    return status, data, sock


def raw_absolute(p, s: dict, url: str) -> tuple[int, bytes]:
    """A plain-http absolute-form GET through the proxy, on a connection of its own."""
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as sock:
        host = urlsplit(url).netloc
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: {proxy_auth(s)}\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                data += chunk
    try:
        return int(data.split(b" ", 2)[1]), data
    except (IndexError, ValueError):
        return 0, data


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, pki):
    p = start_gateway(tmp_path_factory.mktemp("rt-gateway"), pki)
    yield p
    p.stop()


# --- findings --------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_finding_1_proxy_processes_import_modules_from_the_working_directory(tmp_path, pki):
    """Each proxy process is started as `python -m sealgate.runner`, and `-m` puts the working directory first on
    sys.path: a `yaml.py` (or `mitmproxy/`, `sealgate/`, ...) in the directory `sealgate run --workers N` is started
    from runs inside every proxy process, which holds the master key (SEALGATE_MASTER_KEY in its environment) and
    every secret it fills. `sealgate run` alone (the console script) never imports from there, so the same command
    with --workers 2 turns a file in the working directory into code in the proxy. (The API and dashboard children,
    also started with `-m`, share it.)"""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    marker = tmp_path / "imported-from-cwd"
    (workdir / "yaml.py").write_text(
        "import os, pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text(str(bool(os.environ.get('SEALGATE_MASTER_KEY'))))\n"
        "raise SystemExit(3)\n")
    p = make_proxy(tmp_path, pki, process=True, SEALGATE_WORKERS="2", SEALGATE_MASTER_KEY=secrets.token_hex(32))
    with p.log.open("ab") as out:
        proc = subprocess.Popen([str(SEALGATE), "run", "--no-web", "--no-api"], env=p.env, cwd=workdir,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        end = time.time() + 60
        while proc.poll() is None and time.time() < end and not marker.exists():
            with contextlib.suppress(OSError):
                if fetch(p.metrics_url + "/readyz")[0] == 200:
                    break
            time.sleep(0.2)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not marker.exists(), ("a module in the working directory ran inside a proxy process "
                                 f"(master key in its environment: {marker.read_text()})")


def test_finding_2_the_session_connection_limit_split_exceeds_the_limit_set():
    """README: each process takes ceil(limit / N) 'so the gateway stays within the limits as set'. With
    max_session_connections (or max_connections) smaller than, or not a multiple of, N the shares add up to more
    than the limit: 1 with --workers 2 allows 2 connections of one session, 3 allows 4, 100 with 64 allows 128."""
    with pytest.raises(settings.ConfigError):  # (fixed: a limit below N is refused, the shares are limit // N)
        settings.load({"workers": "2"}, env={"SEALGATE_MAX_SESSION_CONNECTIONS": "1"})
    for limit, n in ((3, 2), (100, 64)):
        s = settings.load({"workers": str(n)}, env={"SEALGATE_MAX_SESSION_CONNECTIONS": str(limit),
                                                   "SEALGATE_MAX_CONNECTIONS": str(limit)})
        shared = workers.Supervisor(s, Path("/nonexistent"), None).shared
        assert shared.max_session_connections * n <= limit, (limit, n, shared.max_session_connections)
        assert shared.max_connections * n <= limit, (limit, n, shared.max_connections)


@pytest.mark.e2e
def test_finding_2_e2e_one_session_holds_more_connections_than_max_session_connections(tmp_path, pki, api, user):
    """The same on the running gateway: max_session_connections=3, --workers 2 (ceil gave each process 2); a
    session opens tunnels on fresh connections (the kernel spreads them by hash) and held four open at once.
    (Fixed: each process takes 3 // 2 = 1.)"""
    p = start_gateway(tmp_path, pki, SEALGATE_MAX_SESSION_CONNECTIONS="3")
    held: list[socket.socket] = []
    try:
        s = p.issue(user=user)
        accepted = 0
        for _ in range(8):  # (all 8 on one process: 1 in 128)
            status, _, sock = raw_connect(p, s, f"127.0.0.1:{urlsplit(api.origin).port}")
            held.append(sock)
            accepted += status == 200
        assert accepted <= 3, f"{accepted} tunnels of one session open at once; max_session_connections is 3"
    finally:
        for sock in held:
            sock.close()
        p.stop()


class _HostileProbe:
    """A Unix socket answering /metrics with a body of its choosing (a proxy process that misbehaves)."""

    def __init__(self, path: str, body: str) -> None:
        self.path, self.body = path, body

    async def start(self) -> None:
        async def serve(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            data = self.body.encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(data) + data)
            await writer.drain()
            writer.close()
        self.server = await asyncio.start_unix_server(serve, self.path)


def test_finding_3_one_process_metrics_can_duplicate_and_shadow_the_supervisors_series(tmp_path):
    """The supervisor merges each process's /metrics by family name and then appends its own per-process families
    (sealgate_worker_up/_pid/_restarts). A process whose /metrics carries a family of one of those names, or an
    untyped `sealgate_requests_total` beside the counter `sealgate_requests`, gets a second HELP/TYPE block and a
    duplicate series with its own worker label into the gateway's /metrics. Its copy comes first, so a scraper that
    keeps the first of duplicate samples (Prometheus) records the process's value: it can hide its own restarts
    or report its own pid. The merge should drop (or refuse) families it owns and keep one family per name."""
    honest = Metrics().render()
    hostile = honest + ("# HELP sealgate_worker_restarts_total x\n# TYPE sealgate_worker_restarts_total counter\n"
                        "sealgate_worker_restarts_total 0\n"
                        "# TYPE sealgate_worker_pid gauge\nsealgate_worker_pid 1\n"
                        "sealgate_requests_total 123456\n")
    s = settings.load({"workers": "2"}, env={})
    short = Path(f"/tmp/rtw-{secrets.token_hex(4)}")  # (Unix socket paths are short)
    short.mkdir()
    try:
        sup = workers.Supervisor(s, short, None)
        sup.slots[1].restarts = 7

        async def scrape_once() -> str:
            servers = [_HostileProbe(sup.slots[0].probes, honest), _HostileProbe(sup.slots[1].probes, hostile)]
            for srv in servers:
                await srv.start()
            try:
                return await sup.metrics()
            finally:
                for srv in servers:
                    srv.server.close()
        text = asyncio.run(scrape_once())
    finally:
        for f in short.iterdir():
            f.unlink()
        short.rmdir()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    twice = sorted({t for t in types if types.count(t) > 1})
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]
    dup = sorted({x for x in series if series.count(x) > 1})
    assert not twice and not dup, f"families typed twice: {twice}; series given twice: {dup}"
    restarts = [f for f in text_string_to_metric_families(text) if f.name == "sealgate_worker_restarts"]
    assert [s.value for f in restarts for s in f.samples
            if s.labels.get("worker") == "1" and s.name.endswith("_total")] == [7.0]


# --- what held -------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_held_probe_api_and_proxy_ports_unreachable_through_every_process(gateway, user):
    """CONNECT and absolute-form requests to the probe port, the API port and the proxy port itself, by several
    names, over fresh connections (both processes) are refused; no probe answer reaches the worker."""
    p = gateway
    s = p.issue(user=user)
    ports = [p.env["SEALGATE_METRICS_PORT"], p.env["SEALGATE_API_PORT"], str(p.port)]
    for port in ports:
        for host in ("127.0.0.1", "localhost", "[::1]", "127.0.0.2", "0.0.0.0", "[::ffff:127.0.0.1]"):
            for _ in range(3):
                status, head, sock = raw_connect(p, s, f"{host}:{port}")
                sock.close()
                assert status != 200, (host, port, head[:200])
            status, body = raw_absolute(p, s, f"http://{host}:{port}/metrics")
            assert status in (403, 400, 502), (host, port, body[:200])
            assert b"sealgate_worker_up" not in body and b"process_resident" not in body


@pytest.mark.e2e
def test_held_no_secret_in_logs_probes_environs_or_workdir(gateway, api, user, value):
    """After filled requests through both processes, neither the master key, the session credential nor the value
    is in the supervisor's log, /metrics, /readyz, any command line, or any file of the gateway's work folder; each
    proxy process's environment (which holds the master key by design) is readable by its owner only."""
    p = gateway
    p.add_secret(user, "K", value, api.origin)
    s = p.issue(user=user)
    cred = urlsplit(s["proxy_url"]).password
    assert [st for st, _ in many(s, api.url("/echo/rt"), {"X-Key": s["env"]["K"]}, 12, threads=4)] == [200] * 12
    wait_ready(p)
    seen = [p.log.read_bytes(), fetch(p.metrics_url + "/metrics")[1].encode(),
            fetch(p.metrics_url + "/readyz")[1].encode()]
    procs = [p.proc.pid, *pids(scrape(p)).values()]
    seen += [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in procs]
    workdirs = set()
    for pid in procs[1:]:
        environ = Path(f"/proc/{pid}/environ")
        mode = environ.stat()
        assert stat.S_IMODE(mode.st_mode) & 0o077 == 0 and mode.st_uid == os.getuid()
        spec = next(v for v in environ.read_bytes().split(b"\0") if v.startswith(b"SEALGATE_WORKER="))
        spec = json.loads(spec.split(b"=", 1)[1])
        assert not leaks(p.env["SEALGATE_MASTER_KEY"], json.dumps(spec).encode())
        workdirs.add(Path(spec["probes"]).parent)
    for d in workdirs:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        seen += [f.read_bytes() for f in d.rglob("*") if f.is_file()]
    for secret in (p.env["SEALGATE_MASTER_KEY"], cred, value):
        assert not leaks(secret, *seen)


@pytest.mark.e2e
def test_held_a_second_gateway_or_single_proxy_on_the_same_port_is_refused(gateway):
    """While the gateway runs, `sealgate run --workers 2` and plain `sealgate run` on its port exit 1 with one
    line, and the gateway keeps serving."""
    p = gateway
    for extra in (["--workers", "2"], []):
        env = {**p.env, "SEALGATE_DATA_DIR": str(p.dir / "second-data"), "SEALGATE_METRICS_PORT": str(free_port())}
        r = subprocess.run([str(SEALGATE), "run", "--no-web", "--no-api", *extra], env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0, extra
        assert "already in use" in r.stderr.lower() or "address in use" in r.stderr.lower(), r.stderr[-500:]
    assert fetch(p.metrics_url + "/readyz")[0] == 200


@pytest.mark.e2e
def test_held_a_revoked_session_is_refused_inside_tunnels_already_open_on_every_process(gateway, api, user, value):
    """Tunnels opened (and used) before the revocation, spread over both processes: the next request on each is
    refused and nothing reaches the upstream."""
    p = gateway
    p.add_secret(user, "K", value, api.origin)
    s = p.issue(user=user)
    clients = []
    for _ in range(6):
        c = requests.Session()
        c.trust_env = False
        c.proxies = {"https": s["proxy_url"]}
        c.verify = s["ca_cert"]
        assert c.get(api.url("/before"), headers={"X-Key": s["env"]["K"]}, timeout=20).status_code == 200
        clients.append(c)
    p.cli("session", "revoke", s["session_id"])
    received = len(api.received)
    for c in clients:
        try:
            r = c.get(api.url("/after"), headers={"X-Key": s["env"]["K"]}, timeout=20)
            assert r.status_code in (403, 407), r.status_code
            assert not leaks(value, r.content)
        except requests.exceptions.RequestException:
            pass  # closed: refused too
        finally:
            c.close()
    assert len(api.received) == received


@pytest.mark.parametrize("where", ["env", "config"])
@pytest.mark.parametrize("given", ["0", "65", "abc"])
def test_held_bad_workers_from_env_or_config_is_one_line_and_starts_nothing(tmp_path, where, given):
    env = {"SEALGATE_DATA_DIR": str(tmp_path / "data"), "SEALGATE_CERTS_DIR": str(tmp_path / "certs")}
    if where == "env":
        env["SEALGATE_WORKERS"] = given
    else:
        (tmp_path / "c.yaml").write_text(f"workers: {given}\n")
        env["SEALGATE_CONFIG"] = str(tmp_path / "c.yaml")
    r = _cli_in_process(("run",), env, None)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "must be a whole number of processes from 1 to 64" in r.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "certs").exists()


def test_held_a_worker_gets_the_validated_settings_not_the_environment(tmp_path, monkeypatch):
    """The proxy process's settings are the supervisor's, as JSON: SEALGATE_* variables in the environment it
    inherits (allow_private, on_disallowed, ...) are not read again, and a SEALGATE_WORKER already in the
    supervisor's environment is replaced."""
    s = settings.load({"workers": "2"}, env={"SEALGATE_ALLOW_PRIVATE": "", "SEALGATE_METRICS_PORT": "9555"})
    sup = workers.Supervisor(s, tmp_path, None)
    monkeypatch.setenv("SEALGATE_ALLOW_PRIVATE", "0.0.0.0/0")
    monkeypatch.setenv("SEALGATE_ON_DISALLOWED", "forward")
    monkeypatch.setenv("SEALGATE_WORKER", json.dumps({"index": 0, "settings": "{}", "probes": "/x"}))
    got = {}

    class FakePopen:
        def __init__(self, cmd, **kw):
            got.update(kw["env"])
    monkeypatch.setattr(workers.subprocess, "Popen", FakePopen)
    sup.start(sup.slots[0])
    spec = json.loads(got["SEALGATE_WORKER"])
    again = settings.Settings.from_json(spec["settings"], None)
    assert again.allow_private == "" and again.on_disallowed == "block" and 9555 in again.own_ports()
