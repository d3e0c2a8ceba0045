"""Red team of the performance change of issue 14 (the dashboard's own copy format, direct hooks, the
store's version read once per event-loop iteration, the audit queue's timer, one-pass header checks,
the cached host normalisation).

Each `test_finding_N_*` shows a weakness found by attacking the change as an outsider who has read the
code: it fails while the weakness is there. Each `test_held_*` is an attack that the change withstood,
kept as a cheap regression guard. Secret values are made per test and searched for in what the worker
and operators see; none is ever printed.
"""

from __future__ import annotations

import base64
import gc
import json
import socket
import threading
import time

import pytest
from conftest import make_proxy
from upstream import RawUpstream, raw_response

# --- helpers --------------------------------------------------------------------------------------------

def credential(s: dict) -> str:
    cred = s["proxy_url"].split("//", 1)[1].split("@", 1)[0]
    return "Proxy-Authorization: Basic " + base64.b64encode(cred.encode()).decode() + "\r\n"


def read_response(sock: socket.socket, timeout: float = 10) -> bytes:
    """One response with a Content-Length body (sealgate's own answers have one)."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return buf
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _host_caches() -> list:
    """The lru_caches behind origins.normalise_host (itself, or the helper it delegates to)."""
    from sealgate import origins
    return [f for f in (origins.normalise_host, getattr(origins, "_normalised", None)) if hasattr(f, "cache_info")]


def host_cache_bytes() -> int:
    """Characters held as keys by normalise_host's lru_caches (in this process: the in-process proxy's)."""
    return sum(len(k) for f in _host_caches() for r in gc.get_referents(f) if isinstance(r, dict)
               for k in r if isinstance(k, str))


# --- 7. origins.normalise_host is lru_cached ---------------------------------------------------------------

def test_finding_1_host_cache_holds_megabytes_a_worker_sends(tmp_path, pki, user, value):
    """normalise_host's lru_cache is bounded in entries (4096), not in bytes. A worker's Host header is
    checked against the destination with normalise_host (decision._claimed_host_mismatch), and the host part
    of "127.0.0.1<60,000 spaces>:port" is trailing white space that normalise_host strips: a valid host, so
    the 60 KB string is cached as a key. 4096 such requests (each refused, nothing reaches an upstream) pin
    some 240 MiB in every proxy process for good; before the cache, nothing was kept. (Fixed in the working
    tree while this red team ran: only hosts of at most HOST_CACHED_MAX characters are cached; this guards it.)"""
    up = RawUpstream(pki, lambda head, body, sock: raw_response(b"ok"))
    p = make_proxy(tmp_path, pki)
    p.add_secret(user, "K", value, up.origin)
    s = p.issue(user=user)
    p.start()
    try:
        for f in _host_caches():
            f.cache_clear()
        before = host_cache_bytes()
        sock = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        n = 200
        for i in range(n):
            host = "127.0.0.1" + " " * (60000 + i) + f":{up.port}"
            sock.sendall((f"GET http://127.0.0.1:{up.port}/x HTTP/1.1\r\nHost: {host}\r\n{credential(s)}"
                          f"X-Key: {s['env']['K']}\r\n\r\n").encode())
            answer = read_response(sock)
            assert answer.startswith(b"HTTP/1.1 403"), answer[:200]  # http:// to an https origin: refused
        sock.close()
        held = host_cache_bytes() - before
        # n requests pinned n * 60 KB; at 4096 (the cache's size) it is some 240 MiB, for the life of the process
        assert held < 1_000_000, f"normalise_host's cache holds {held / 1e6:.0f} MB of worker-sent Host text"
    finally:
        p.stop()


# --- 3. the store's version, read once per event-loop iteration -------------------------------------------

def _noise(s: dict, port: int, target: str, stop) -> None:
    """Injecting requests on one tunnel until stop: the event loop busy, the audit thread writing batches."""
    from wire import tunnel
    t = tunnel(s, port, target, None)
    try:
        while not stop.is_set():
            t.sendall(f"GET /noise HTTP/1.1\r\nHost: {target}\r\nX-Key: {s['env']['K']}\r\n\r\n".encode())
            if not read_response(t):
                return
    except OSError:
        pass
    finally:
        t.close()


def _all_at_once(tunnels, s: dict, target: str, tag: str) -> list[int]:
    """One request carrying K on every tunnel, all released together; the statuses."""
    go, out = threading.Event(), {}

    def one(i, t) -> None:
        go.wait()
        t.sendall(f"GET /{tag}/{i} HTTP/1.1\r\nHost: {target}\r\nX-Key: {s['env']['K']}\r\n\r\n".encode())
        answer = read_response(t)
        out[i] = int(answer.split(b" ", 2)[1]) if answer else 0
    threads = [threading.Thread(target=one, args=(i, t)) for i, t in enumerate(tunnels)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(20)
    return [out.get(i, -1) for i in range(len(tunnels))]


def test_held_a_change_made_by_another_connection_applies_to_the_very_next_request(tmp_path, pki, make_upstream,
                                                                                    user, value):
    """With the store's version read once per event-loop iteration (and taken from the audit thread's write
    as it began), a re-scope, a scope put back and a revocation each apply to the first request every busy
    keep-alive tunnel sends once the command returned, while other tunnels keep the loop and the audit thread
    busy: none is served from a stale cache."""
    from wire import tunnel
    api = make_upstream("127.0.0.1")
    elsewhere = make_upstream("127.0.0.2")
    target = api.origin.split("://", 1)[1]
    p = make_proxy(tmp_path, pki)
    p.add_secret(user, "K", value, api.origin)
    s, noisy = p.issue(user=user), p.issue(user=user, runchat="noise")
    p.start()
    stop = threading.Event()
    noise = [threading.Thread(target=_noise, args=(noisy, p.port, target, stop)) for _ in range(2)]
    tunnels = [tunnel(s, p.port, target, None) for _ in range(6)]
    try:
        for t in noise:
            t.start()
        assert _all_at_once(tunnels, s, target, "warm") == [200] * 6  # every cache warm
        p.cli("secret", "set-origins", "--user", user, "--name", "K", "--origins", elsewhere.origin)
        assert _all_at_once(tunnels, s, target, "rescoped") == [403] * 6
        p.cli("secret", "set-origins", "--user", user, "--name", "K", "--origins", api.origin)
        assert _all_at_once(tunnels, s, target, "back") == [200] * 6
        p.cli("session", "revoke", s["session_id"])
        assert _all_at_once(tunnels, s, target, "revoked") == [407] * 6
        assert not [r.path for r in api.received if r.path.startswith(("/rescoped", "/revoked"))]
    finally:
        stop.set()
        for t in noise:
            t.join(20)
        for t in tunnels:
            t.close()
        p.stop()


# --- 1. the dashboard's copies ------------------------------------------------------------------------------

def dashboard_pid(p) -> int:
    """The dashboard process `sealgate run` started (a child running sealgate.dashboard_web)."""
    from pathlib import Path
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == p.proc.pid and b"sealgate.dashboard_web" in cmd:
                return int(d.name)
    raise AssertionError("no dashboard process")


def bounded(p, name: str) -> float:
    import urllib.request
    text = urllib.request.urlopen(p.metrics_url + "/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(f'sealgate_bounded{{name="{name}"}}'))


def test_held_a_copy_carries_no_value_in_any_field():
    """frame() builds the dashboard's copy field by field: a value (and its base64 form, as in a Basic header)
    in any of them, next to bytes that are not UTF-8, in a compressed body, in trailers, WebSocket messages,
    a close reason or the error text, is in none of the copy's bytes; the copy unframes with the placeholder."""
    import gzip
    import secrets
    import zlib

    from mitmproxy import flow as mflow
    from mitmproxy import http
    from mitmproxy.test import tflow
    from sealgate.dashboard import frame, unframe
    from sealgate.scrub import Scrubber
    value, ph = f"sk-{secrets.token_urlsafe(24)}", "sg.abcdefghijklmnop.K.0123456789abcdef0123"
    v = value.encode()
    scrubber = Scrubber()
    scrubber.add_values([(value, ph)])
    f = tflow.twebsocketflow()
    req, resp = f.request, f.response
    req.data.path = b"/p?k=" + v
    req.data.method = b"GET"
    req.data.authority = v + b".example:443"
    req.host = value.lower() + ".example"
    req.headers.fields += ((b"X-" + v, b"\xff" + v + b"\xfe"),
                           (b"Authorization", b"Basic " + base64.b64encode(b"user:" + v)))
    req.headers["content-encoding"] = "gzip"
    req.raw_content = gzip.compress(b'{"k": "' + v + b'"}')
    req.trailers = http.Headers([(b"x-t", v)])
    resp.reason = value
    resp.headers.fields += ((b"X-R", v),)
    resp.headers["content-encoding"] = "deflate"
    resp.raw_content = zlib.compress(b"echo " + v)
    resp.trailers = http.Headers([(b"x-t", v)])
    f.websocket.messages[0].content = b"auth " + v
    f.websocket.close_reason = value
    f.error = mflow.Error("upstream said " + value)
    copy = frame(f, scrubber)
    for form in (v, base64.b64encode(b"user:" + v)[8:-4], v.hex().encode()):
        assert form not in copy
    shown = unframe(copy[4:])
    assert ph in shown.request.path and ph.encode() in shown.request.content
    assert ph.encode() in shown.websocket.messages[0].content and ph in shown.error.msg


@pytest.mark.e2e
def test_finding_2_one_copy_for_the_dashboard_exceeds_the_mirror_bound(tmp_path, pki, user):
    """The mirror makes a copy while fewer than QUEUE_BYTES (64 MiB) wait, whatever the copy's size, and the new
    copy format writes the head as JSON text with every byte over 0x7f (or under 0x20) as a 6-byte \\u00XX escape.
    A worker (no secret needed) asks an upstream of its choosing for a response whose head is 12 MiB of such
    bytes (mitmproxy bounds no response head): one copy of over 72 MiB is queued for a stalled dashboard, past
    the bound that is to keep a stalled dashboard from growing the proxy (the old tnetstring copy was 12 MiB)."""
    import os
    import signal

    from conftest import curl
    big = b"\xff" * (12 * 1024 * 1024)
    up = RawUpstream(pki, lambda head, body, sock: b"HTTP/1.1 200 OK\r\nX-Big: " + big + b"\r\nContent-Length: 2\r\n\r\nok")
    p = make_proxy(tmp_path, pki, process=True)
    s = p.issue(user=user)
    p.start(web=True)
    dash = dashboard_pid(p)
    try:
        os.kill(dash, signal.SIGSTOP)  # a dashboard that stalls (or is behind): copies wait in the proxy
        r = curl(s, up.origin + "/big")
        assert r.status == 200
        time.sleep(1)
        queued = bounded(p, "mirror_bytes")
        assert queued <= 64 * 1024 * 1024, f"{queued / 2**20:.0f} MiB wait for the dashboard (bound: 64 MiB)"
    finally:
        os.kill(dash, signal.SIGCONT)
        p.stop()




# --- 6. one-pass header checks ---------------------------------------------------------------------------

def test_held_range_and_override_headers_in_any_case_and_repeated(tmp_path, pki, user, value):
    """bodies.take_headers (Range) and _overrides look at the raw fields once, lower-casing bytes: every spelling and every
    repeat of Range, If-Range and Request-Range is gone before the upstream sees the request, and an override
    header in any case still refuses a method-scoped secret."""
    from wire import tunnel
    got: list[bytes] = []
    up = RawUpstream(pki, lambda head, body, sock: (got.append(head), raw_response(b"ok"))[1])
    p = make_proxy(tmp_path, pki)
    p.add_secret(user, "K", value, up.origin, "--methods", "GET")
    s = p.issue(user=user)
    p.start()
    try:
        t = tunnel(s, p.port, up.target, None)
        t.sendall((f"GET /r HTTP/1.1\r\nHost: {up.target}\r\nrAnGe: bytes=0-3\r\nRANGE: bytes=4-7\r\n"
                   f"if-RANGE: x\r\nREQUEST-range: bytes=0-1\r\nRange: bytes=8-9\r\nX-Key: {s['env']['K']}\r\n\r\n").encode())
        assert read_response(t).startswith(b"HTTP/1.1 200")
        assert got and b"range" not in got[-1].lower() and value.encode() in got[-1]
        t.sendall((f"GET /o HTTP/1.1\r\nHost: {up.target}\r\nx-HTTP-method-OVERRIDE: DELETE\r\n"
                   f"X-Key: {s['env']['K']}\r\n\r\n").encode())
        answer = read_response(t)
        assert answer.startswith(b"HTTP/1.1 403") and b"scope_denied" in answer
        assert len(got) == 1
        t.close()
    finally:
        p.stop()




# --- 5. the audit queue ------------------------------------------------------------------------------------

def test_finding_4_an_injection_whose_answer_is_refused_is_audited_with_the_upstream_status(tmp_path, pki, user,
                                                                                            value):
    """The audit row of an injection should carry the status the worker got. When sealgate refuses the
    upstream's answer (here 502 unscrubbable_response: a Content-Encoding it cannot decode), Sealgate._response
    sets the allow row's status to the upstream's 200 first (recorder.answered), then refuses: the refusal's
    own `answered` finds no row left, so the trail says the injection was answered 200 while the worker got
    502. (Not made by issue 14: the same order was there before; found while checking Pending.status.)"""
    from conftest import curl
    up = RawUpstream(pki, lambda head, body, sock: raw_response(b"zz", extra=b"Content-Encoding: bogus\r\n"))
    p = make_proxy(tmp_path, pki)
    p.add_secret(user, "K", value, up.origin)
    s = p.issue(user=user)
    p.start()
    try:
        r = curl(s, up.origin + "/x", "-H", f"X-Key: {s['env']['K']}")
        assert r.status == 502 and r.headers["x-sealgate-error"] == "unscrubbable_response"
        rows = json.loads(p.cli("audit", "--user", user, "--json").stdout)
        allow = next(row for row in rows if row["decision"] == "allow")
        assert allow["status"] == 502, f"the injection's row says {allow['status']}; the worker got 502"
    finally:
        p.stop()


@pytest.mark.e2e  # contends for the store's lock for some 6 s by design
def test_finding_5_rows_of_injections_are_dropped_when_another_process_keeps_the_store_busy(tmp_path):
    """The audit queue writes with wait=False. While another process holds SQLite's write lock (another proxy
    process of --workers, the CLI, a backup), a batch fails with StoreBusy; after BUSY_PATIENCE (1 s) it goes
    to _drop_refused_rows, which inserts the rows one at a time and counts a row that failed *because the store
    was busy at that instant* while a later one got in as "refused for what it holds": five such passes and the
    row is dropped. busy_since is reset only by a whole batch that succeeds, so once patience ran out every
    busy batch makes another pass, 20 ms apart. Here: the other connection holds the lock 1.2 s, then takes it
    19 ms in every 20 ms for 1.5 s, twice. Rows of allowed injections (their requests went out) are lost: "no value goes
    unaudited" does not hold. (The drop logic predates issue 14; BUSY_PATIENCE narrows it, and --workers makes
    a busy store the normal case.)"""
    import sqlite3

    from sealgate.audit import AuditQueue, AuditRecord
    from sealgate.store import SecretStore
    store = SecretStore(tmp_path)
    store.key  # noqa: B018 - schema and key
    queue = AuditQueue(store.audit, 100_000)
    other = sqlite3.connect(tmp_path / "sealgate.db", isolation_level=None, check_same_thread=False)
    other.execute("PRAGMA busy_timeout=5000")
    stop = threading.Event()

    def busy() -> None:  # another process's writes: one long, then many short, twice
        while not stop.is_set():
            other.execute("BEGIN IMMEDIATE")
            stop.wait(1.2)
            other.execute("COMMIT")
            until = time.monotonic() + 1.5
            while time.monotonic() < until and not stop.is_set():
                other.execute("BEGIN IMMEDIATE")
                time.sleep(0.019)
                other.execute("COMMIT")
                time.sleep(0.001)
    contender = threading.Thread(target=busy)
    contender.start()
    added, end = 0, time.monotonic() + 5.4
    try:
        while time.monotonic() < end:
            for _ in range(20):  # rows of injections: each one's request was let go once add() took it
                assert queue.add(AuditRecord(time.time(), "s", "r", "i", "p", "127.0.0.1:1", ("K",), "GET",
                                             "https://api.example", f"/{added}", "allow", None, None)) is not None
                added += 1
            time.sleep(0.01)
    finally:
        stop.set()
        contender.join()
        other.close()
    assert queue.flush(20)
    with store.read() as tx:
        written = tx.one("select count(*) from audit")[0]
    queue.close(1)
    store.close()
    assert written == added, f"{added - written} of {added} injections' audit rows were dropped"


def _copy(head_change) -> bytes:
    """A copy as the proxy frames it, its JSON head changed by head_change(dict)."""
    import struct

    from mitmproxy.test import tflow
    from sealgate.dashboard import frame
    from sealgate.scrub import Scrubber
    f = tflow.tflow(resp=True)
    data = frame(f, Scrubber())[4:]
    (n,) = struct.unpack_from(">I", data)
    head = json.loads(data[4:4 + n])
    head_change(head)
    encoded = json.dumps(head).encode()
    copy = struct.pack(">I", len(encoded)) + encoded + data[4 + n:]
    return struct.pack(">I", len(copy)) + copy


@pytest.mark.e2e
def test_finding_3_one_malformed_copy_blinds_the_dashboard_for_good():
    """unframe builds the flow with mitmproxy's constructors and their type checks off
    (internals.unchecked_messages), checks no field's type, and `keep` (view.add, outside the per-copy
    try) sorts every new flow against those shown. A copy whose `created` is text is shown; from then on
    every copy (the proxy's too) fails in view.add with TypeError, which ends the receiving connection: the
    dashboard shows no new flow until an operator clears it, and the proxy's batches are lost. Only a process
    of the proxy's user can reach the socket (its folder is 0700), so this is defence in depth: a copy is
    not checked field by field."""
    from sealgate.dashboard import frame
    from sealgate.scrub import Scrubber
    from test_dashboard import _tflows, dashboard_process
    with dashboard_process(max_flows=50) as (_, socket_path, board):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(socket_path)
            s.sendall(_copy(lambda h: h.update(created="soon")))
            time.sleep(0.5)
        good = _tflows(3)
        with socket.socket(socket.AF_UNIX) as s:  # as the proxy's Mirror connects and sends
            s.connect(socket_path)
            try:
                for f in good:
                    s.sendall(frame(f, Scrubber()))
                    time.sleep(0.1)
            except OSError:
                pass  # the dashboard closed the connection
        end = time.time() + 5
        while {f.id for f in good} - {f["id"] for f in board.flows()} and time.time() < end:
            time.sleep(0.2)
        missing = {f.id for f in good} - {f["id"] for f in board.flows()}
        assert not missing, f"{len(missing)} of {len(good)} well-formed copies never shown after one malformed copy"

