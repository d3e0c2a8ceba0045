"""Reliability: timeouts, limits, a store that will not take writes, shutdown. Each bound is pushed
past with real clients, and both sides are checked: what the worker got, what the upstream got."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from conftest import curl, make_proxy
from test_proxy import assert_clean, assert_problem
from upstream import RawUpstream, raw_response
from wire import connect, full_listener, read_head


def sent(api, s: dict, path: str = "/x", name: str = "K"):
    """A request carrying one placeholder: (what the worker got, what the upstream got in X-Key)."""
    before = len(api.received)
    r = curl(s, api.url(path), "-H", f"X-Key: {s['env'][name]}")
    return r, (api.received[-1].header("X-Key") if len(api.received) > before else None)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the proxy closes the socket within seconds (what it sends meanwhile is read and dropped)."""
    sock.settimeout(seconds)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            if not sock.recv(65536):
                return True
    except (TimeoutError, socket.timeout):
        return False
    except OSError:
        return True
    return False


def metric(p, name: str) -> float:
    import urllib.request
    text = urllib.request.urlopen(p.metrics_url + "/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture
def world(tmp_path, pki, make_upstream, user, value):
    """A proxy (in this process) with tight bounds, an upstream, a secret for it and a session."""
    def start(**env: str):
        api = make_upstream("127.0.0.1")
        p = make_proxy(tmp_path, pki, **env)
        p.add_secret(user, "K", value, api.origin)
        s = p.issue(user=user)
        p.start()
        started.append(p)
        return p, api, s
    started: list = []
    yield start
    for p in started:
        p.stop()
        assert_clean(p, value)


# --- upstream timeouts -----------------------------------------------------------------------------

@pytest.mark.e2e  # waits out a timeout by design
def test_an_upstream_that_never_answers_gets_the_worker_a_504_after_the_timeout(world, pki, value):
    p, _, s = world(SEALGATE_UPSTREAM_TIMEOUT="1")
    silent = RawUpstream(pki, lambda head, body, sock: time.sleep(30))  # takes the request, says nothing
    began = time.monotonic()
    r = curl(s, silent.origin + "/wait", "-H", "X-Plain: 1")
    took = time.monotonic() - began
    assert_problem(r, 504, "upstream_timeout", "did not answer in time")
    assert 0.9 < took < 6, took
    assert len(silent.received) == 1  # it did get the request
    assert metric(p, 'sealgate_connections_closed_total{reason="upstream_timeout"}') >= 1


@pytest.mark.e2e  # waits out a timeout by design
def test_an_injecting_request_to_a_silent_upstream_is_audited_with_the_504(tmp_path, pki, user, value):
    silent = RawUpstream(pki, lambda head, body, sock: time.sleep(30))
    p = make_proxy(tmp_path, pki, SEALGATE_UPSTREAM_TIMEOUT="1")
    p.add_secret(user, "K", value, silent.origin)
    s = p.issue(user=user)
    p.start()
    try:
        r = curl(s, silent.origin + "/filled", "-H", f"X-Key: {s['env']['K']}")
        assert_problem(r, 504, "upstream_timeout")
        assert silent.received and value.encode() in silent.received[0][0]  # it went, filled
        rows = json.loads(p.cli("audit", "--user", user, "--json").stdout)
        assert [(a["decision"], a["status"]) for a in rows if a["path"] == "/filled"] == [("allow", 504)]
    finally:
        p.stop()
    assert_clean(p, value, r.body)


@pytest.mark.e2e  # waits out a timeout by design
def test_an_upstream_that_does_not_accept_is_given_up_on_at_connect(world):
    p, _, s = world(SEALGATE_UPSTREAM_TIMEOUT="1")
    full, fillers = full_listener()
    began = time.monotonic()
    sock, head = connect(s, p.port, f"127.0.0.1:{full.getsockname()[1]}")
    took = time.monotonic() - began
    assert head.startswith(b"HTTP/1.1 504"), head
    assert b"x-sealgate-error: upstream_timeout" in head.lower()
    assert 0.9 < took < 6, took
    sock.close()
    for c in fillers:
        c.close()
    full.close()


@pytest.mark.e2e  # waits out a timeout by design
def test_an_upstream_that_stalls_mid_body_is_cut_after_the_idle_timeout(world, pki):
    def stall(head, body, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        time.sleep(30)
    p, api, s = world(SEALGATE_IDLE_TIMEOUT="2")
    staller = RawUpstream(pki, stall)
    began = time.monotonic()
    with pytest.raises(AssertionError):  # the worker gets the head, part of the body, then a closed connection
        curl(s, staller.origin + "/stall")
    assert time.monotonic() - began < 10
    assert curl(s, api.url("/after")).status == 200  # and the proxy goes on


def test_an_upstream_that_resets_mid_body_disturbs_nobody_else(world, pki, value):
    def reset(head, body, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # RST
    p, api, s = world()
    resetter = RawUpstream(pki, reset)
    assert_problem(curl(s, resetter.origin + "/reset"), 502, "upstream_failed")  # held whole: never half-sent
    r, got = sent(api, s)
    assert r.status == 200 and got == value


# --- worker connections: head timeout, head size, how many -----------------------------------------

@pytest.mark.e2e  # waits out a timeout by design
def test_a_trickling_client_is_closed_at_the_header_timeout_while_real_workers_are_served(world, value):
    p, api, s = world(SEALGATE_HEADER_TIMEOUT="2")
    tricklers = []
    for _ in range(200):  # slowloris: heads that never end
        t = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        t.sendall(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nX-a: ")
        tricklers.append(t)
    latencies = []
    for i in range(5):
        for t in tricklers[:50]:
            t.sendall(b"a")  # each byte resets an idle timer; the head timeout still runs
        began = time.monotonic()
        r, got = sent(api, s, f"/real{i}")
        latencies.append(time.monotonic() - began)
        assert r.status == 200 and got == value
    assert max(latencies) < 2, latencies
    time.sleep(1.5)
    assert all(closed_within(t, 1.5) for t in tricklers)
    assert metric(p, 'sealgate_connections_closed_total{reason="header_timeout"}') >= 200


@pytest.mark.e2e  # waits out a timeout by design
def test_a_tunnel_must_bring_its_first_request_within_the_header_timeout(world):
    p, api, s = world(SEALGATE_HEADER_TIMEOUT="1")
    sock, head = connect(s, p.port, api.origin.split("//")[1])
    assert head.startswith(b"HTTP/1.1 200")
    assert closed_within(sock, 4)  # no TLS hello, no request: closed


@pytest.mark.e2e  # waits out a timeout by design
def test_an_idle_keep_alive_connection_is_closed_at_the_header_timeout(world):
    import requests
    p, api, s = world(SEALGATE_HEADER_TIMEOUT="1")
    with requests.Session() as http:
        http.trust_env = False  # this environment's CA bundle would win over verify
        http.proxies = {"https": s["proxy_url"]}
        http.verify = s["ca_cert"]
        assert http.get(api.url("/one")).status_code == 200
        time.sleep(2.5)
        assert http.get(api.url("/two")).status_code == 200  # urllib3 notices the closed one, opens another


def test_a_request_head_over_the_limit_gets_431_before_it_is_read_whole(world):
    p, api, s = world(SEALGATE_MAX_HEAD_BYTES="8192")
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    sock.sendall(b"CONNECT " + api.origin.split("//")[1].encode() + b" HTTP/1.1\r\n")
    try:
        for _ in range(1000):  # a head that goes on and on: 10 MB if the proxy kept reading
            sock.sendall(b"X-Pad: " + b"a" * 10000 + b"\r\n")
    except OSError:
        pass  # closed on us: the point
    head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 431"), head[:200]
    assert b"x-sealgate-error: request_head_too_large" in head.lower()
    assert closed_within(sock, 3)
    r = curl(s, api.url("/big-but-fine"), "-H", "X-Pad: " + "a" * 6000)  # under the limit: served
    assert r.status == 200
    assert metric(p, 'sealgate_blocks_total{code="request_head_too_large"}') == 1


def test_one_session_cannot_take_every_connection(world, tmp_path):
    p, api, s = world(SEALGATE_MAX_SESSION_CONNECTIONS="3")
    other = p.issue(user="u-other")
    target = api.origin.split("//")[1]
    held = [connect(s, p.port, target) for _ in range(3)]
    assert all(h.startswith(b"HTTP/1.1 200") for _, h in held)
    sock, head = connect(s, p.port, target)
    assert head.startswith(b"HTTP/1.1 429") and b"x-sealgate-error: too_many_connections" in head.lower()
    sock.close()
    assert curl(other, api.url("/other")).status == 200  # another session is served
    held[0][0].close()
    time.sleep(0.3)
    sock, head = connect(s, p.port, target)
    assert head.startswith(b"HTTP/1.1 200")  # one closed: one more may open
    rows = json.loads(p.cli("audit", "--json").stdout)
    assert [a["code"] for a in rows if a["decision"] == "block"] == ["too_many_connections"]


def test_past_max_connections_a_connection_gets_503_and_is_closed(world):
    p, api, s = world(SEALGATE_MAX_CONNECTIONS="4")
    held = [connect(s, p.port, api.origin.split("//")[1])[0] for _ in range(4)]  # tunnels of a session, open
    extra = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    head = read_head(extra)
    assert head.startswith(b"HTTP/1.1 503") and b"x-sealgate-error: proxy_busy" in head.lower()
    assert json.loads(head.split(b"\r\n\r\n", 1)[1] or extra.recv(4096))["code"] == "proxy_busy"
    for h in held:
        h.close()
    time.sleep(0.3)
    assert curl(s, api.url("/after")).status == 200
    assert metric(p, 'sealgate_blocks_total{code="proxy_busy"}') == 1


def test_at_max_connections_one_without_a_credential_makes_room(world, value):
    """Anyone can open connections that never show a credential: at the limit the oldest of them is closed
    for a new one, so they cannot lock the sessions out."""
    p, api, s = world(SEALGATE_MAX_CONNECTIONS="4")
    squatters = [socket.create_connection(("127.0.0.1", p.port), timeout=5) for _ in range(4)]
    time.sleep(0.3)
    r, got = sent(api, s, "/served")
    assert r.status == 200 and got == value
    assert closed_within(squatters[0], 2)
    assert metric(p, 'sealgate_connections_closed_total{reason="evicted"}') >= 1


# --- the store: locked by another process, a full disk, kill -9 --------------------------------------

LOCKER = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
c.execute("create table if not exists held (x)")
print("locked", flush=True)
sys.stdin.read()
c.execute("ROLLBACK")
"""


def hold_lock(path):
    """A second process holding an exclusive lock on the store until the returned process's stdin closes."""
    import subprocess
    import sys
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    return locker


def timed(call):
    began = time.monotonic()
    result = call()
    return result, time.monotonic() - began


def test_a_locked_store_holds_rows_in_the_queue_then_refuses_and_recovers_losing_none(world, value, user):
    p, api, s = world(SEALGATE_AUDIT_QUEUE="5")
    assert sent(api, s, "/before")[1] == value
    deadline = time.monotonic() + 5  # its row written (a batch waits audit.BATCH_EVERY): the queue is empty
    while "/before" not in {a["path"] for a in json.loads(p.cli("audit", "--user", user, "--json").stdout)}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    locker = hold_lock(p.data_dir / "sealgate.db")
    try:
        for i in range(5):  # the queue takes them: served, at once
            (r, got), took = timed(lambda: sent(api, s, f"/queued{i}"))
            assert r.status == 200 and got == value and took < 1.5, (r.status, took)
        (r, got), took = timed(lambda: sent(api, s, "/refused"))
        assert_problem(r, 503, "store_unavailable", "cannot take more rows")
        assert got is None and took < 1.5
        (r, took) = timed(lambda: curl(s, api.url("/plain")))  # nothing to inject: unaffected
        assert r.status == 200 and took < 1.5
    finally:
        locker.stdin.close()
        locker.wait(10)
    deadline = time.monotonic() + 10  # the queue drains by itself
    while time.monotonic() < deadline and sent(api, s, "/after")[0].status != 200:
        time.sleep(0.2)
    rows = json.loads(p.cli("audit", "--user", user, "--json").stdout)
    served = {a["path"] for a in rows if a["decision"] == "allow" and a["status"] == 200}
    assert {"/before", "/after", *(f"/queued{i}" for i in range(5))} <= served  # not one row lost
    assert "/refused" not in served
    assert metric(p, "sealgate_audit_queue_full_total") >= 1


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MiB filesystem (tmpfs) mounted for the test and removed after it."""
    import subprocess
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.e2e
def test_a_full_disk_holds_rows_in_the_queue_then_refuses_and_recovers_losing_none(tiny_disk, tmp_path, pki,
                                                                                  make_upstream, user, value):
    api = make_upstream("127.0.0.1")
    p = make_proxy(tmp_path, pki, SEALGATE_DATA_DIR=str(tiny_disk / "data"), SEALGATE_AUDIT_QUEUE="20",
                   process=True)
    p.add_secret(user, "K", value, api.origin)
    s = p.issue(user=user)
    p.start()
    try:
        assert sent(api, s, "/before")[1] == value
        filler = tiny_disk / "filler"
        with filler.open("wb") as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        statuses = []
        for i in range(40):
            (r, got), took = timed(lambda: sent(api, s, f"/full{i}"))
            assert took < 2, took
            statuses.append(r.status)
            assert (got == value) == (r.status == 200)
        assert 200 in statuses and 503 in statuses  # some held in the queue, then refused
        assert statuses == sorted(statuses)  # served until the bound, refused after: never served unaudited
        served = [f"/full{i}" for i, st in enumerate(statuses) if st == 200]
        assert curl(s, api.url("/plain")).status == 200
        filler.unlink()  # room again: everything recovers by itself
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and sent(api, s, "/after")[0].status != 200:
            time.sleep(0.3)
        rows = json.loads(p.cli("audit", "--user", user, "--json").stdout)
        written = {a["path"] for a in rows if a["decision"] == "allow" and a["status"] == 200}
        assert {"/before", "/after", *served} <= written
    finally:
        p.stop()
    assert_clean(p, value)


@pytest.mark.e2e
def test_kill_9_at_any_moment_loses_no_committed_secret_and_corrupts_nothing(tmp_path, pki, make_upstream, user):
    import random
    import secrets as pysecrets
    import signal
    import sqlite3
    import subprocess

    from conftest import SEALGATE
    api = make_upstream("127.0.0.1")
    p = make_proxy(tmp_path, pki, process=True)
    first = "v-" + pysecrets.token_urlsafe(20)
    p.add_secret(user, "K0", first, api.origin)
    s = p.issue(user=user)
    committed: dict[str, str] = {"K0": first}
    rng = random.Random(7)
    for round_ in range(3):
        p.start()
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                try:
                    sent(api, s, "/load", "K0")
                except AssertionError:
                    pass  # the proxy was killed under it
        load = threading.Thread(target=traffic)
        load.start()
        adds = []
        for i in range(6):  # adds from the CLI, some killed mid-write
            name, v = f"K{round_}_{i}", "v-" + pysecrets.token_urlsafe(20)
            proc = subprocess.Popen([str(SEALGATE), "secret", "add", "--user", user, "--name", name, "--origins",
                                     api.origin], env=p.env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            proc.stdin.write((v + "\n").encode())
            proc.stdin.close()
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0.05, 0.6))
                proc.send_signal(signal.SIGKILL)
            adds.append((proc, name, v))
        time.sleep(rng.uniform(0.2, 1.0))
        p.proc.send_signal(signal.SIGKILL)  # the proxy, mid-traffic
        p.proc.wait(10)
        api_port = int(p.env["SEALGATE_API_PORT"])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # its API child dies with it, and lets go of its port
            try:
                socket.create_connection(("127.0.0.1", api_port), timeout=1).close()
                time.sleep(0.1)
            except OSError:
                break
        else:
            raise AssertionError("the API process outlived `sealgate run` killed with -9")
        stop.set()
        load.join(30)
        for proc, name, v in adds:
            if proc.wait(30) == 0:
                committed[name] = v
        db = sqlite3.connect(p.data_dir / "sealgate.db")
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        db.close()
    listed = p.cli("secret", "list", "--user", user).stdout
    assert all(name in listed for name in committed)
    p.start()
    try:
        s2 = p.issue(user=user)
        for name, v in committed.items():  # each one opens and is injected
            r = curl(s2, api.url(f"/check/{name}"), "-H", f"X-Key: {s2['env'][name]}")
            assert r.status == 200 and api.received[-1].header("X-Key") == v
    finally:
        p.stop()


# --- shutdown -----------------------------------------------------------------------------------------

def slow_upstream(pki, seconds: float) -> RawUpstream:
    def answer(head, body, sock):
        time.sleep(seconds)
        return raw_response(b"slow and done")
    return RawUpstream(pki, answer)


@pytest.mark.e2e
def test_sigterm_stops_taking_connections_lets_requests_finish_writes_the_audit_and_exits_0(tmp_path, pki, user,
                                                                                           value):
    import signal
    import urllib.request
    slow = slow_upstream(pki, 2)
    p = make_proxy(tmp_path, pki, SEALGATE_SHUTDOWN_GRACE="10", process=True)
    p.add_secret(user, "K", value, slow.origin)
    s = p.issue(user=user)
    p.start()
    results: list = []
    worker = threading.Thread(target=lambda: results.append(
        curl(s, slow.origin + "/in-flight", "-H", f"X-Key: {s['env']['K']}")))
    worker.start()
    time.sleep(0.7)  # the request is with the upstream
    began = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(OSError):  # no new connection is taken
        socket.create_connection(("127.0.0.1", p.port), timeout=2).recv(1)
    with pytest.raises(urllib.error.HTTPError) as not_ready:
        urllib.request.urlopen(p.metrics_url + "/readyz", timeout=2)
    assert not_ready.value.code == 503 and b"stopping" in not_ready.value.read()
    worker.join(20)
    assert results and results[0].status == 200 and results[0].body == b"slow and done"
    assert p.proc.wait(15) == 0
    took = time.monotonic() - began
    assert took < 5, took  # it left once the request was done, not at the end of the grace
    assert slow.received and value.encode() in slow.received[0][0]
    rows = json.loads(p.cli("audit", "--user", user, "--json").stdout)
    assert [(a["path"], a["status"]) for a in rows] == [("/in-flight", 200)]  # flushed before it exited
    assert_clean(p, value, results[0].body)


@pytest.mark.e2e
def test_sigterm_gives_up_on_requests_past_the_grace(tmp_path, pki, user, value):
    import signal
    slow = slow_upstream(pki, 30)
    p = make_proxy(tmp_path, pki, SEALGATE_SHUTDOWN_GRACE="1", process=True)
    s = p.issue(user=user)
    p.start()
    failed: list = []

    def request() -> None:
        try:
            curl(s, slow.origin + "/too-slow")
        except AssertionError as e:
            failed.append(str(e))
    worker = threading.Thread(target=request)
    worker.start()
    time.sleep(0.7)
    began = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(15) == 0
    assert 0.9 < time.monotonic() - began < 5
    worker.join(20)
    assert failed  # the worker's connection was closed: it knows its request did not finish


def test_every_queue_and_cache_reports_its_size(world, value):
    p, api, s = world()
    assert sent(api, s)[1] == value
    import urllib.request
    text = urllib.request.urlopen(p.metrics_url + "/metrics", timeout=5).read().decode()
    sizes = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
             if line.startswith("sealgate_bounded{")}
    assert {"audit_queue", "scrubbers", "store_cache", "certificates", "connections"} <= set(sizes)
    assert sizes["scrubbers"] == 1 and sizes["certificates"] >= 1 and sizes["store_cache"] >= 1


def test_scrubbers_are_bounded_expired_first(monkeypatch):
    from sealgate import scrubbing
    monkeypatch.setattr(scrubbing, "SCRUBBERS_MAX", 8)
    scrubbers = scrubbing.Scrubbers(lambda: None)
    now = time.time()
    for i in range(8):
        scrubbers.sessions[f"s{i}"] = scrubbing._Entry(now - 10 * scrubbing.SCRUBBER_GRACE if i % 2 else now + 60,
                                                       scrubbing.Scrubber())
    scrubbers._prune()
    assert list(scrubbers.sessions) == ["s0", "s2", "s4", "s6"]  # the expired went
    for i in range(8, 12):
        scrubbers.sessions[f"s{i}"] = scrubbing._Entry(now + 60, scrubbing.Scrubber())
    scrubbers._prune()
    assert list(scrubbers.sessions) == ["s4", "s6", "s8", "s9", "s10", "s11"]  # then the oldest quarter


def test_empty_lines_before_a_request_are_ignored(world, value):
    """RFC 9112 2.2: a server ignores empty lines before the request line (mitmproxy waited for more bytes:
    the request went unanswered until the header timeout)."""
    p, api, s = world()
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    sock.sendall(b"\r\n\n\r\nGET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
    head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 407")  # answered at once (no credential), not after 30 s
