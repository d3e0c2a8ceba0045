"""Red team, session 17: the numpy word filter of the scanner (scrub._WordFilter), HookCompleted handled
inline within its own event (internals.inline_hook_completions), and pooled flow/connection ids
(internals.pooled_ids). Values are made per test; asserts test booleans, so no value reaches the output."""

from __future__ import annotations

import random
import socket
import sys
import time

import pytest

from wire import connect, h2_received, h2_tunnel, read_all, read_head, tunnel


def _clean_log(proxy) -> bool:
    text = proxy.log.read_text(errors="replace") if proxy.log.exists() else ""
    return "has crashed" not in text and "Traceback" not in text


@pytest.fixture
def keyed(proxy, api, evil, user, value):
    proxy.add_secret(user, "API_KEY", value, api.origin)
    proxy.add_secret(user, "ELSEWHERE", value[::-1] + "Q", evil.origin)
    return proxy.issue(user=user)


def _h2_pump_until(t, conn, streams: dict[int, dict], deadline: float) -> None:
    import h2.events

    for events in h2_received(t, conn, streams, deadline):
        for ev in events:
            sid = getattr(ev, "stream_id", None)
            if isinstance(ev, h2.events.ResponseReceived):
                streams[sid]["status"] = dict(ev.headers)[b":status"]
                streams[sid]["got"].append(repr(ev.headers).encode())
            elif isinstance(ev, h2.events.DataReceived):
                streams[sid]["got"].append(ev.data)
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                streams[sid]["ended"] = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                for s in streams.values():
                    s["ended"] = True


def _h2_echo(headers, body, conn, sid, sock):
    out = headers.get(b"authorization", b"") + b"\n" + body
    conn.send_headers(sid, [(b":status", b"200"), (b"content-length", str(len(out)).encode())])
    conn.send_data(sid, out, end_stream=True)


@pytest.fixture(scope="module")
def h2api(pki):
    from upstream import H2Upstream
    return H2Upstream(pki, _h2_echo)


def test_http2_many_concurrent_streams_each_filled_refused_or_scrubbed_once(proxy, h2api, evil, user, value):
    """Twelve streams opened at once on one HTTP/2 connection: allowed ones filled once each upstream and
    their echo scrubbed; those carrying a secret of another origin refused; none lost, none duplicated."""
    proxy.add_secret(user, "API_KEY", value, h2api.origin)
    proxy.add_secret(user, "ELSEWHERE", value[::-1] + "Q", evil.origin)
    keyed = proxy.issue(user=user)
    ph, other = keyed["env"]["API_KEY"], keyed["env"]["ELSEWHERE"]
    api = h2api
    target = h2api.target
    before = len(api.received)
    t, conn = h2_tunnel(keyed, proxy.port, target)
    streams: dict[int, dict] = {}
    tag = random.randrange(10**9)
    for i in range(12):
        sid = conn.get_next_available_stream_id()
        refused = i % 4 == 3
        auth = f"Bearer {other if refused else ph}".encode()
        body = (b'{"k": "' + ph.encode() + b'"}') * (1 + i)
        conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", target.encode()),
                                (b":path", f"/echo/{tag}/{i}".encode()), (b"authorization", auth),
                                (b"content-length", str(len(body)).encode())])  # (a refusal answers, not kills)
        conn.send_data(sid, body, end_stream=True)
        streams[sid] = {"i": i, "refused": refused, "got": [], "ended": False, "status": None}
    t.sendall(conn.data_to_send())
    _h2_pump_until(t, conn, streams, time.time() + 15)
    t.close()
    all_ended = all(s["ended"] for s in streams.values())
    statuses = sorted((s["i"], s["status"]) for s in streams.values())
    seen = b"".join(b for s in streams.values() for b in s["got"])
    assert all_ended, f"a stream never ended: {statuses}"
    assert all(st == (b"403" if i % 4 == 3 else b"200") for i, st in statuses), statuses
    assert value.encode() not in seen, "the worker received the secret value"
    mine = [(h, b) for h, b, _ in api.received[before:] if h[b":path"].startswith(f"/echo/{tag}/".encode())]
    paths = sorted(h[b":path"].decode() for h, _ in mine)
    assert paths == sorted(f"/echo/{tag}/{i}" for i in range(12) if i % 4 != 3), "a request lost or duplicated"
    filled = all(h[b"authorization"] == f"Bearer {value}".encode() and ph.encode() not in b for h, b in mine)
    assert filled, "a request went upstream unfilled"
    assert _clean_log(proxy)


def _read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, whole."""
    got = read_head(sock)
    head, _, body = got.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def test_http1_keepalive_refused_then_allowed_then_body_on_one_tunnel(proxy, api, keyed, value):
    """403 by the decision, then two allowed requests (one with a 2 MiB chunked body) on the same tunnel:
    each answered in order, the allowed ones upstream once each, filled."""
    ph, other = keyed["env"]["API_KEY"], keyed["env"]["ELSEWHERE"]
    target = f"127.0.0.1:{api.port}"
    before = len(api.received)
    tag = random.randrange(10**9)
    t = tunnel(keyed, proxy.port, target, None)
    t.settimeout(10)
    t.sendall(f"GET /echo/{tag}/a HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {other}\r\n\r\n".encode())
    first = _read_response(t)
    t.sendall(f"GET /echo/{tag}/b HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {ph}\r\n\r\n".encode())
    second = _read_response(t)  # (not pipelined: a 2 MiB body behind a waiting request closes the connection)
    piece = (b"x" * 1000 + ph.encode()) * 64
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(32)) + b"0\r\n\r\n"
    t.sendall(f"POST /echo/{tag}/c HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {ph}\r\n"
              f"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode() + chunks)
    rest = read_all(t, 10)
    t.close()
    seen = first + second + rest
    assert b" 403 " in first.split(b"\r\n")[0], first[:200]
    assert seen.count(b"HTTP/1.1 200") == 2, seen[:300]
    assert value.encode() not in seen
    mine = [r for r in api.received[before:] if r.path.startswith(f"/echo/{tag}/")]
    assert sorted(r.path for r in mine) == [f"/echo/{tag}/b", f"/echo/{tag}/c"]
    assert all(r.header("Authorization") == f"Bearer {value}" for r in mine)
    assert mine[-1].body.count(value.encode()) == 64 * 32 and ph.encode() not in mine[-1].body
    assert _clean_log(proxy)


def test_a_client_that_closes_mid_body_sends_nothing_upstream_and_the_proxy_goes_on(proxy, api, keyed, value):
    ph = keyed["env"]["API_KEY"]
    target = f"127.0.0.1:{api.port}"
    tag = random.randrange(10**9)
    before = len(api.received)
    for k in range(6):
        t = tunnel(keyed, proxy.port, target, None)
        t.sendall(f"POST /echo/{tag}/{k} HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {ph}\r\n"
                  f"Content-Length: 3000000\r\n\r\n".encode() + b"y" * (k * 100000))
        if k % 2:
            t.shutdown(socket.SHUT_WR)
        t.close()
    time.sleep(0.5)
    t = tunnel(keyed, proxy.port, target, None)
    t.settimeout(10)
    t.sendall(f"GET /echo/{tag}/ok HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {ph}\r\n"
              f"Connection: close\r\n\r\n".encode())
    out = read_all(t, 10)
    t.close()
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    assert value.encode() not in out
    mine = [r.path for r in api.received[before:] if r.path.startswith(f"/echo/{tag}/")]
    assert mine == [f"/echo/{tag}/ok"], mine
    assert _clean_log(proxy)


def test_407_then_403_connect_refusals_do_not_wedge_the_next_tunnel(proxy, api, keyed, value):
    target = f"127.0.0.1:{api.port}"
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert b" 407 " in read_head(s).split(b"\r\n")[0]
        s.close()
        s, head = connect(keyed, proxy.port, "127.0.0.3:443")  # blocked address
        assert b" 403 " in head.split(b"\r\n")[0] or b" 502 " in head.split(b"\r\n")[0], head[:100]
        s.close()
    ph = keyed["env"]["API_KEY"]
    t = tunnel(keyed, proxy.port, target, None)
    t.settimeout(10)
    t.sendall(f"GET /echo/x HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {ph}\r\nConnection: close\r\n\r\n"
              .encode())
    out = read_all(t, 10)
    assert out.startswith(b"HTTP/1.1 200") and value.encode() not in out
    assert _clean_log(proxy)


# -- scrub._WordFilter: bodies around the 8 KiB threshold (probes; nothing found) ----------------------------


@pytest.mark.parametrize("lengths", [(6,), (20,), (40, 300), (10, 25, 60, 90)])
def test_forms_of_values_of_several_lengths_around_the_8_kib_threshold_match_the_full_scan(lengths):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_scrub import base64_forms, every_form, new_value, reference, run_stream

    from sealgate.scrub import Scrubber

    rng = random.Random(hash(lengths))
    values = [new_value(n, rng) for n in lengths]
    s = Scrubber()
    s.add_values((v, f"[V{i}]") for i, v in enumerate(values))
    ok = stream_ok = True
    for trial in range(8):
        v = rng.choice(values)
        form = rng.choice(every_form(v, rng) + [t for t, _ in base64_forms(v, rng)])
        size = rng.choice([8184, 8191, 8192, 8193, 8199, 16390]) - len(form) - 2
        pos = rng.randrange(0, size)
        filler = rng.randbytes(size)
        data = filler[:pos] + b" " + form + b" " + filler[pos:]
        for kind in (bytes, bytearray, memoryview):
            ok &= s.matches(kind(data)) == reference(s, data)
        cuts = [rng.randrange(len(data)) for _ in range(rng.randint(1, 6))] + [8192, len(data) - 8192]
        stream_ok &= run_stream(s, data, cuts) == s.scrub(data)
    assert ok, "a match missed near the 8 KiB threshold"
    assert stream_ok, "streaming differs from the whole"
