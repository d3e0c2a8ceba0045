"""`sealgate run --workers N`: several proxy processes on one port, supervised by `sealgate run`.

Through real processes and real TLS, over many fresh connections (the kernel spreads each new connection
across the processes): every process serves and fills, a cap holds exactly across them under concurrent
load, every served request is audited, a revoked session is refused by each, the probe port answers for
the whole gateway, a process that dies is started again, SIGTERM drains them all (exit 0), and kill -9 of
the supervisor takes every process with it. The fast tier checks the setting, the merge of the metrics and
the private part of mitmproxy that lets several processes listen on one port.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import types
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import SEALGATE, _cli_in_process, curl, free_port, make_proxy
from test_proxy import assert_clean, leaks
from upstream import RawUpstream, raw_response

from sealgate import internals, settings, workers
from sealgate.metrics import Metrics

# --- helpers -------------------------------------------------------------------------------------------


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(p) -> dict[tuple[str, tuple], float]:
    """The gateway's /metrics: (sample name, sorted labels) -> value."""
    status, text = fetch(p.metrics_url + "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def per_worker(samples: dict, metric: str, /, **labels: str) -> dict[str, float]:
    """One sample's value for each proxy process (label worker)."""
    return {dict(key)["worker"]: v for (n, key), v in samples.items()
            if n == metric and all(dict(key).get(k) == want for k, want in labels.items())}


def grew(before: dict, after: dict, metric: str, /, **labels: str) -> dict[str, float]:
    b, a = per_worker(before, metric, **labels), per_worker(after, metric, **labels)
    return {w: a[w] - b.get(w, 0.0) for w in a}


def wait_ready(p, timeout: float = 60) -> dict:
    """Until /readyz says every proxy process is ready; the metrics then."""
    end = time.time() + timeout
    while True:
        assert p.proc.poll() is None, f"sealgate run exited: {p.log.read_text()[-3000:]}"
        with contextlib.suppress(OSError):
            status, body = fetch(p.metrics_url + "/readyz")
            if status == 200:
                return scrape(p)
        assert time.time() < end, f"the gateway did not get ready: {p.log.read_text()[-3000:]}"
        time.sleep(0.1)


def audit_written(p, timeout: float = 10) -> None:
    """Until every proxy process's audit queue is empty (conftest's looks for one process's line)."""
    end = time.time() + timeout
    while time.time() < end:
        queues = per_worker(scrape(p), "sealgate_bounded", name="audit_queue")
        if queues and not any(queues.values()):
            return
        time.sleep(0.05)
    raise AssertionError("the audit queues did not drain")


def through(s: dict, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """One request on a connection of its own (a new source port: the kernel picks a process for it); the
    status and everything the worker got."""
    r = curl(s, url, *(a for k, v in headers.items() for a in ("-H", f"{k}: {v}")))
    return r.status, r.seen()


def many(s: dict, url: str, headers: dict[str, str], count: int, threads: int = 8) -> list[tuple[int, bytes]]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: through(s, url, headers), range(count)))


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a parent that is gone counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def pids(samples: dict) -> dict[str, int]:
    return {w: int(v) for w, v in per_worker(samples, "sealgate_worker_pid").items()}


def start_gateway(tmp: Path, pki, *, web: bool = False, **env: str):
    p = make_proxy(tmp, pki, process=True, SEALGATE_WORKERS="2", SEALGATE_MASTER_KEY=secrets.token_hex(32), **env)
    p.audit_written = functools.partial(audit_written, p)  # (Proxy.cli waits for it before `audit`)
    p.start(web=web)
    wait_ready(p)
    return p


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, pki):
    p = start_gateway(tmp_path_factory.mktemp("gateway"), pki)
    yield p
    p.stop()


# --- the setting -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, env, shown", [
    ({"workers": "0"}, {}, "--workers: must be a whole number of processes from 1 to 64"),
    ({"workers": "abc"}, {}, "--workers: must be a whole number of processes from 1 to 64"),
    ({"workers": "65"}, {}, "--workers: must be a whole number of processes from 1 to 64"),
    ({}, {"SEALGATE_WORKERS": "-2"}, "environment variable SEALGATE_WORKERS: must be a whole number"),
])
def test_workers_is_a_whole_number_from_1_to_64(flags, env, shown):
    with pytest.raises(settings.ConfigError) as e:
        settings.load(flags, env=env)
    assert str(e.value).startswith(shown)


def test_workers_defaults_to_one_and_is_read_from_each_place(tmp_path):
    assert settings.load({}, env={}).workers == 1 == settings.DEFAULTS["workers"]
    assert settings.load({}, env={"SEALGATE_WORKERS": "4"}).workers == 4
    config = tmp_path / "sealgate.yaml"
    config.write_text("workers: 3\n")
    assert settings.load({}, env={"SEALGATE_CONFIG": str(config)}).workers == 3
    assert settings.load({"workers": "2"}, env={"SEALGATE_CONFIG": str(config)}).workers == 2
    config.write_text("workers: many\n")
    with pytest.raises(settings.ConfigError, match="key 'workers': must be a whole number"):
        settings.load({}, env={"SEALGATE_CONFIG": str(config)})


@pytest.mark.parametrize("given", ["0", "abc", "1.5", "65"])
def test_run_with_a_bad_workers_is_one_line_and_starts_nothing(tmp_path, given):
    env = {"SEALGATE_DATA_DIR": str(tmp_path / "data"), "SEALGATE_CERTS_DIR": str(tmp_path / "certs")}
    r = _cli_in_process(("run", "--workers", given), env, None)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "sealgate: error: --workers: must be a whole number of processes from 1 to 64\n"
    assert not (tmp_path / "data").exists()  # nothing made, nothing started


def test_a_proxy_process_gets_exactly_the_settings_but_the_password_and_the_key(tmp_path):
    s = settings.load({"workers": "2", "metrics": "127.0.0.1:9999", "web_password": "pw-" + secrets.token_hex(8)},
                      env={"SEALGATE_MASTER_KEY": "ab" * 32, "SEALGATE_UPSTREAM_CA": str(tmp_path / "ca.pem")})
    text = s.to_json()
    assert s.web_password not in text and "ab" * 32 not in text
    again = settings.Settings.from_json(text, s.master_key)
    assert again == settings.Settings(**{**s.__dict__, "web_password": None})


def test_each_process_takes_its_share_of_the_connection_limits(tmp_path):
    s = settings.load({"workers": "3"}, env={"SEALGATE_MAX_CONNECTIONS": "2000", "SEALGATE_MAX_SESSION_CONNECTIONS": "100"})
    shared = workers.Supervisor(s, tmp_path, None, []).shared
    assert (shared.max_connections, shared.max_session_connections) == (666, 33)  # never more than set, together
    with pytest.raises(settings.ConfigError, match="max_session_connections .1. is below workers .2."):
        settings.load({"workers": "2"}, env={"SEALGATE_MAX_SESSION_CONNECTIONS": "1"})  # a process would get 0


def test_the_port_must_be_free_and_unshared(tmp_path):
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # even a listener that would share it
    held.bind(("127.0.0.1", 0))
    held.listen()
    env = {"SEALGATE_DATA_DIR": str(tmp_path / "data"), "SEALGATE_CERTS_DIR": str(tmp_path / "certs"),
           "SEALGATE_LISTEN_PORT": str(held.getsockname()[1]), "SEALGATE_METRICS_PORT": str(free_port())}
    try:
        r = _cli_in_process(("run", "--workers", "2", "--no-web", "--no-api"), env, None)
    finally:
        held.close()
    assert r.returncode == 1
    assert r.stderr == f"sealgate: error: cannot listen on 127.0.0.1:{env['SEALGATE_LISTEN_PORT']}: " \
                       "Address already in use\n"


# --- mitmproxy's private part, and the merge of the metrics -------------------------------------------------

def test_every_proxy_listener_accepts_on_the_supervisor_s_sockets_with_the_internal(monkeypatch):
    from mitmproxy.proxy import mode_servers

    assert internals.listen_problems() == []
    cls = mode_servers.AsyncioServerInstance
    monkeypatch.setattr(cls, "listen", cls.listen)  # put back after the test: other proxies of this process
    shared = workers.bind("127.0.0.1", 0)
    port = shared[0].getsockname()[1]
    internals.listen_on(shared)

    async def two() -> tuple[list[int], list[str]]:
        taken: list[str] = []
        fake = types.SimpleNamespace(mode=types.SimpleNamespace(transport_protocol="tcp"),
                                     handle_stream=lambda r, w: (taken.append("accepted"), w.close()))
        servers = [*await cls.listen(fake, "127.0.0.1", port), *await cls.listen(fake, "127.0.0.1", port)]
        other = await cls.listen(fake, "127.0.0.1", free_port())  # another address: mitmproxy's own bind
        ports = [s.sockets[0].getsockname()[1] for s in [*servers, *other]]
        queue = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout.split()
        assert queue[2] == str(internals.BACKLOG), queue  # (asyncio's listen(1) as it starts serving is not kept)
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.read()  # closed by the server
            writer.close()
        for s in [*servers, *other]:
            s.close()
        return ports, taken
    ports, taken = asyncio.run(two())
    assert ports[:2] == [port, port] and ports[2] != port and taken == ["accepted"] * 3
    assert shared[0].fileno() >= 0  # the supervisor's sockets outlive the listeners that accepted on them
    for s in shared:
        s.close()


def test_a_mitmproxy_that_listens_another_way_is_named(monkeypatch):
    from mitmproxy.proxy import mode_servers

    async def listen(self, host, port):
        return []
    monkeypatch.setattr(mode_servers.AsyncioServerInstance, "listen", listen)
    found = internals.listen_problems()
    assert len(found) == 1 and "AsyncioServerInstance.listen" in found[0] and "checked against" in found[0]
    with pytest.raises(internals.InternalsMissing, match="AsyncioServerInstance.listen"):
        internals.listen_on([])


def test_every_process_metrics_are_merged_under_a_worker_label():
    a, b = Metrics(), Metrics()
    a.requests.inc(3)
    b.requests.inc(5)
    b.blocks.labels("rate_limited").inc()
    a.latency.observe(0.01)
    text = workers.merged([(w, text_string_to_metric_families(m.render())) for w, m in (("0", a), ("1", b))])
    assert text.count("# TYPE sealgate_requests_total counter") == 1
    assert 'sealgate_requests_total{worker="0"} 3.0' in text and 'sealgate_requests_total{worker="1"} 5.0' in text
    assert 'sealgate_blocks_total{code="rate_limited",worker="1"} 1.0' in text
    assert 'sealgate_request_duration_seconds_count{worker="0"} 1.0' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # Prometheus can read it
    assert {s.labels["worker"] for s in families["process_resident_memory_bytes"].samples} == {"0", "1"}


# --- the gateway, as processes ----------------------------------------------------------------------------

def held_by(pid: int, port: int) -> int:
    """How many established TCP connections to port the process holds (/proc/net/tcp, by socket inode)."""
    established = {f[9] for table in ("/proc/net/tcp", "/proc/net/tcp6")
                   for f in (line.split() for line in Path(table).read_text().splitlines()[1:])
                   if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port}
    mine = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if (link := os.readlink(fd)).startswith("socket:["):
                mine.add(link[8:-1])
    return len(mine & established)


@pytest.mark.e2e
def test_a_burst_of_new_connections_is_shared_by_the_processes(gateway):
    """One accept queue for all: asyncio's accept loop takes up to its backlog per wake-up, so the first process
    woken for a burst took all of it (31 of 32, measured); one accept per wake-up lets each take its turn."""
    p = gateway
    workers_ = pids(wait_ready(p))
    for _ in range(3):
        conns = [socket.create_connection(("127.0.0.1", p.port)) for _ in range(32)]
        try:
            end = time.time() + 10
            while sum(held := [held_by(pid, p.port) for pid in workers_.values()]) < 32 and time.time() < end:
                time.sleep(0.05)
            assert sum(held) == 32 and min(held) >= 8, held
        finally:
            for c in conns:
                c.close()


@pytest.mark.e2e
def test_fresh_connections_reach_every_process_and_every_request_is_filled_and_audited(gateway, api, user, value):
    p = gateway
    p.add_secret(user, "K", value, api.origin)
    s = p.issue(user=user, runchat="rc-workers")
    before, received = wait_ready(p), len(api.received)
    got = many(s, api.url("/echo/w"), {"X-Key": s["env"]["K"]}, 40)
    assert [status for status, _ in got] == [200] * 40
    assert [r.header("X-Key") for r in api.received[received:]] == [value] * 40
    served = grew(before, scrape(p), "sealgate_injections_total")
    assert set(served) == {"0", "1"} and all(served.values()) and sum(served.values()) == 40, served
    records = json.loads(p.cli("audit", "--runchat", "rc-workers", "--json").stdout)
    assert len(records) == 40 and {(r["decision"], r["status"], r["session"]) for r in records} == {
        ("allow", 200, s["session_id"])}
    assert_clean(p, value, *(seen for _, seen in got))  # the echoes were scrubbed by whichever process
    lines = [line for line in p.log.read_text().splitlines() if "runchat=rc-workers" in line]
    assert len(lines) == 40 and all(line.count("decision=") == 1 for line in lines)  # one write() per line


@pytest.mark.e2e
def test_a_cap_holds_exactly_across_processes_under_concurrent_load(gateway, api, user, value):
    p = gateway
    p.add_secret(user, "K", value, api.origin, "--cap", "10/day")
    s = p.issue(user=user, runchat="rc-cap")
    before, received = scrape(p), len(api.received)
    got = many(s, api.url("/c"), {"X-Key": s["env"]["K"]}, 40)
    statuses = sorted(status for status, _ in got)
    assert statuses.count(200) == 10 and statuses.count(429) == 30, statuses
    assert [r.header("X-Key") for r in api.received[received:]] == [value] * 10
    refused = grew(before, scrape(p), "sealgate_blocks_total", code="rate_limited")
    served = grew(before, scrape(p), "sealgate_requests_total")
    assert sum(refused.values()) == 30 and set(served) == {"0", "1"} and all(served.values()), (refused, served)
    records = json.loads(p.cli("audit", "--runchat", "rc-cap", "--json").stdout)
    assert sorted((r["decision"], r["code"]) for r in records) == [("allow", None)] * 10 + [
        ("block", "rate_limited")] * 30
    assert_clean(p, value, *(seen for _, seen in got))


@pytest.mark.e2e
def test_a_revoked_session_is_refused_by_every_process(gateway, api, user, value):
    p = gateway
    p.add_secret(user, "K", value, api.origin)
    s = p.issue(user=user)
    assert [status for status, _ in many(s, api.url("/x"), {"X-Key": s["env"]["K"]}, 8)] == [200] * 8
    p.cli("session", "revoke", s["session_id"])
    before, received = scrape(p), len(api.received)
    got = many(s, api.url("/x"), {"X-Key": s["env"]["K"]}, 30)
    assert [status for status, _ in got] == [407] * 30  # (refused at CONNECT: requests sees the tunnel fail)
    assert len(api.received) == received
    refused = grew(before, scrape(p), "sealgate_blocks_total", code="proxy_auth_required")
    assert set(refused) == {"0", "1"} and all(refused.values()) and sum(refused.values()) == 30, refused
    assert_clean(p, value, *(seen for _, seen in got))


@pytest.mark.e2e
def test_the_probe_port_answers_for_the_whole_gateway(gateway):
    p = gateway
    assert fetch(p.metrics_url + "/healthz") == (200, "ok\n")
    assert fetch(p.metrics_url + "/readyz") == (200, '{"ready": true}\n')
    assert fetch(p.metrics_url + "/nope")[0] == 404
    samples = scrape(p)
    assert per_worker(samples, "sealgate_worker_up") == {"0": 1.0, "1": 1.0}
    assert set(per_worker(samples, "process_resident_memory_bytes")) == {"supervisor", "0", "1"}
    assert set(per_worker(samples, "sealgate_bounded", name="connections")) == {"0", "1"}
    workers_pids = pids(samples)
    assert len(set(workers_pids.values())) == 2 and p.proc.pid not in workers_pids.values()
    # the gateway's probe port is guarded by every process, as the probe port is by a single one
    s = p.issue(user="probe-user")
    for _ in range(6):
        status, seen = through(s, f"http://127.0.0.1:{p.env['SEALGATE_METRICS_PORT']}/metrics", {})
        assert status == 403 and b"destination_blocked" in seen


@pytest.mark.e2e
def test_no_secret_is_on_any_command_line(gateway):
    p = gateway
    shown = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in (p.proc.pid, *pids(scrape(p)).values())]
    shown += [Path(f"/proc/{c}/cmdline").read_bytes() for c in _children(p.proc.pid)]  # the API too
    assert len(shown) >= 4
    assert not leaks(p.env["SEALGATE_MASTER_KEY"], *shown)
    assert all(b"sealgate.runner" in c for c in shown[1:3])


@pytest.mark.e2e
def test_a_proxy_process_that_dies_is_started_again(gateway, api, user, value):
    p = gateway
    p.add_secret(user, "K", value, api.origin)
    s = p.issue(user=user)
    old = pids(scrape(p))
    bundle = Path(p.env["SEALGATE_CERTS_DIR"]) / "upstream-trust.pem"
    written = bundle.stat().st_mtime_ns
    os.kill(old["1"], signal.SIGKILL)
    end = time.time() + 60
    while (now := pids(scrape(p)))["1"] == old["1"] or fetch(p.metrics_url + "/readyz")[0] != 200:
        assert time.time() < end, p.log.read_text()[-2000:]
        time.sleep(0.2)
    assert now["0"] == old["0"]
    assert bundle.stat().st_mtime_ns == written  # written once, by the supervisor: never under a process reading it
    samples = scrape(p)
    assert per_worker(samples, "sealgate_worker_restarts_total") == {"0": 0.0, "1": 1.0}
    assert f"sealgate: proxy process 1 (pid {old['1']}) was killed by SIGKILL; starting another" in p.log.read_text()
    before = samples
    assert [status for status, _ in many(s, api.url("/x"), {"X-Key": s["env"]["K"]}, 20)] == [200] * 20
    assert all(grew(before, scrape(p), "sealgate_injections_total").values())
    assert_clean(p, value)


@pytest.mark.e2e
def test_sigterm_drains_every_process_and_exits_0_and_both_feed_the_dashboard(tmp_path, pki, api, user, value):
    slow = RawUpstream(pki, lambda head, body, sock: time.sleep(2) or raw_response(b"slow and done"))
    p = start_gateway(tmp_path, pki, web=True)
    try:
        p.add_secret(user, "K", value, f"{api.origin},{slow.origin}")
        s = p.issue(user=user)
        before = scrape(p)
        assert [status for status, _ in many(s, api.url("/echo"), {"X-Key": s["env"]["K"]}, 16)] == [200] * 16
        assert all(grew(before, scrape(p), "sealgate_injections_total").values())
        dashboard = requests.Session()
        dashboard.trust_env = False
        dashboard.headers["Authorization"] = f"Bearer {p.env['SEALGATE_WEB_PASSWORD']}"
        end = time.time() + 20
        while len(flows := dashboard.get(f"http://127.0.0.1:{p.env['SEALGATE_WEB_PORT']}/flows", timeout=5).json()) < 16:
            assert time.time() < end, len(flows)
            time.sleep(0.2)
        assert not leaks(value, json.dumps(flows).encode())
        workers_pids, children = pids(scrape(p)), _children(p.proc.pid)
        for pid in workers_pids.values():  # the proxy processes never get the dashboard's password
            assert not leaks(p.env["SEALGATE_WEB_PASSWORD"], Path(f"/proc/{pid}/environ").read_bytes())
        slow_one = ThreadPoolExecutor(1).submit(through, s, slow.origin + "/slow", {"X-Key": s["env"]["K"]})
        end = time.time() + 20
        while not slow.received:
            assert time.time() < end
            time.sleep(0.05)
        p.proc.send_signal(signal.SIGTERM)
        status, seen = slow_one.result(30)
        assert status == 200 and seen.endswith(b"slow and done")  # the request in flight finished
        assert p.proc.wait(40) == 0
        assert all(gone(pid) for pid in [*workers_pids.values(), *children])
        assert "sealgate: stopping: 1 connections open" in p.log.read_text()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", p.port), timeout=2).close()
    finally:
        p.stop()
    assert_clean(p, value)


@pytest.mark.e2e
def test_kill_9_of_the_supervisor_takes_every_process_with_it(tmp_path, pki):
    p = start_gateway(tmp_path, pki)
    try:
        everyone = [*pids(scrape(p)).values(), *_children(p.proc.pid)]
        assert len(everyone) >= 3  # two proxy processes and the API
        p.proc.kill()
        p.proc.wait()
        end = time.time() + 30
        while not all(gone(pid) for pid in everyone):
            assert time.time() < end, [pid for pid in everyone if not gone(pid)]
            time.sleep(0.1)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", p.port), timeout=2).close()
    finally:
        p.stop()


@pytest.mark.e2e
def test_a_bad_workers_from_the_real_executable_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEALGATE_")}
    env.update(SEALGATE_DATA_DIR=str(tmp_path / "data"), SEALGATE_CERTS_DIR=str(tmp_path / "certs"))
    for given in ("0", "abc"):
        r = subprocess.run([str(SEALGATE), "run", "--workers", given], env=env, capture_output=True, text=True,
                           timeout=60)
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr == "sealgate: error: --workers: must be a whole number of processes from 1 to 64\n"


def _children(pid: int) -> list[int]:
    """The processes pid started (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _two_processes_sharing(loads: internals.Loads):
    """A listening socket and, for the gateway's slots 0 and 1, a process's copy of it with its counts, in
    this one test process: (the socket, its port, the two _Owns, the two copies)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    owns = [internals._Own(loads, slot) for slot in (0, 1)]
    copies = []
    for own in owns:
        copy = internals._Shared(fileno=os.dup(server.fileno()))
        copy.setblocking(False)
        copy.own = own
        copies.append(copy)
    return server, server.getsockname()[1], owns, copies


def test_a_process_that_stepped_back_steps_back_again_for_a_later_connection(monkeypatch):
    """A process stepped back and another took the connection; asyncio did not ask this one again, so when it
    began to step back stayed set. A connection that came later found that wait long over and was taken at once
    by the process with more than its share. The last step back is over once none came for STEP_BACK_OVER."""
    monkeypatch.setattr(internals, "STEP_BACK_OVER", 0.05)
    server, port, owns, copies = _two_processes_sharing(internals.Loads.create(2))
    clients, accepted = [], []
    try:
        for _ in range(internals.STEP_BACK_SLACK + 1):
            clients.append(socket.create_connection(("127.0.0.1", port)))
            accepted.append(copies[0].accept()[0])
        clients.append(socket.create_connection(("127.0.0.1", port)))
        with pytest.raises(BlockingIOError):
            copies[0].accept()  # 3 against 0: left to process 1, which takes it
        copies[1].accept()[0].close()  # (it took it, and it closed)
        time.sleep(0.1)  # (longer than STEP_BACK_MOST and STEP_BACK_OVER)
        clients.append(socket.create_connection(("127.0.0.1", port)))
        with pytest.raises(BlockingIOError):
            copies[0].accept()  # 3 against 0 again: left to process 1 again
        accepted.append(copies[1].accept()[0])
        assert [o.count for o in owns] == [3, 1]
    finally:
        for c in [*clients, *accepted, *copies, server]:
            c.close()


def test_a_process_with_more_connections_than_another_leaves_new_ones_to_it_for_a_while():
    """internals._Shared with the gateway's counts: two processes' copies of one listening socket, in one test
    process. The one that holds STEP_BACK_SLACK more than the other steps back (BlockingIOError: asyncio waits
    for the next wake-up); the other takes the connection; a connection that closes stops counting at once; a
    process that is not running (IDLE_SLOT) or one that does not take it (wedged) holds no connection back
    longer than STEP_BACK_MOST."""
    loads = internals.Loads.create(3)
    assert loads.fewest_but(0) == internals.Loads.IDLE_SLOT  # none running yet: no one to leave them to
    server, port, owns, copies = _two_processes_sharing(loads)
    accepted: list[list[socket.socket]] = [[], []]

    def take(slot: int) -> None:
        accepted[slot].append(copies[slot].accept()[0])

    clients = []
    try:
        for _ in range(internals.STEP_BACK_SLACK + 1):
            clients.append(socket.create_connection(("127.0.0.1", port)))
            take(0)
        clients.append(socket.create_connection(("127.0.0.1", port)))
        with pytest.raises(BlockingIOError):
            take(0)  # 3 against 0: left to process 1
        take(1)
        assert [o.count for o in owns] == [3, 1] and loads.fewest_but(0) == 1
        for c in accepted[0][:2]:
            c.close()  # closed connections stop counting at once (as asyncio's transport closes them)
            c.close()  # (once)
        assert owns[0].count == 1 and loads.fewest_but(1) == 1
        clients.append(socket.create_connection(("127.0.0.1", port)))
        take(0)
        assert owns[0].count == 2 and loads.fewest_but(1) == 2
        for _ in range(3):  # process 1 stops taking connections (wedged): 0 waits STEP_BACK_MOST, then takes them
            clients.append(socket.create_connection(("127.0.0.1", port)))
        end = time.monotonic() + 5
        while owns[0].count < 5 and time.monotonic() < end:
            with contextlib.suppress(BlockingIOError):
                take(0)
        assert owns[0].count == 5
        loads.set(1, internals.Loads.IDLE_SLOT)  # process 1 died: 0 takes every connection at once
        clients.append(socket.create_connection(("127.0.0.1", port)))
        take(0)
    finally:
        for c in [*clients, *accepted[0], *accepted[1], *copies, server]:
            c.close()
