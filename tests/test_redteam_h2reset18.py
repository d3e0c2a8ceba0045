"""Red team (helper, session 18): HTTP/2 streams refused at their head and reset alone (e5820c4, Answer.RESET).

What a worker can do with a stream the proxy reset: keep sending on it (DATA small and large, past the
window, END_STREAM, trailers carrying placeholders), open the next ones with tricks (CONTINUATION, PRIORITY,
a RST of its own), and have thousands of them refused in a row on one connection: memory, flows kept, the
connection's other streams, the audit rows, the per-session and rapid-reset limits; HTTP/1 still closes."""

from __future__ import annotations

import gc
import hashlib
import ssl
import time

import pytest
from test_redteam_session17 import _h2_pump_until, h2api  # noqa: F401 - h2api: a fixture
from wire import connect, h2_tunnel, read_all

BIG = b"x" * 3900  # one HPACK table entry (the table holds 4096 bytes): 1 byte on the wire each time again


def _hx(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:12]


def _head(target: bytes, sid: int, method: bytes, auth: str, extra=()):
    return [(b":method", method), (b":scheme", b"https"), (b":authority", target),
            (b":path", f"/echo/{sid}".encode()), (b"authorization", f"Bearer {auth}".encode()), *extra]


def _setup(proxy, h2api, evil, user, value):
    proxy.add_secret(user, "API_KEY", value, h2api.origin)
    proxy.add_secret(user, "ELSEWHERE", value[::-1] + "Q", evil.origin)
    keyed = proxy.issue(user=user)
    return keyed, keyed["env"]["API_KEY"], keyed["env"]["ELSEWHERE"]


def _drain(t, conn, seconds: float, early: bool = False) -> list:
    """Read what arrives for `seconds` (events), answering what h2 wants answered (early: return once some came)."""
    got = []
    t.settimeout(0.2)
    end = time.time() + seconds
    while time.time() < end:
        try:
            data = t.recv(65536)
        except (TimeoutError, ssl.SSLError):
            continue
        if not data:
            got.append("closed")
            break
        try:
            got.extend(conn.receive_data(data))
        except Exception as e:  # noqa: BLE001
            got.append(e)
            break
        if out := conn.data_to_send():
            t.sendall(out)
        if early and got:
            break
    t.settimeout(8)
    return got


def _no_huffman(conn) -> None:
    """This client's HPACK encoder without Huffman coding (pure Python: slow for large heads)."""
    import functools
    conn.encoder.encode = functools.partial(conn.encoder.encode, huffman=False)


def _await_resets(t, conn, have: int, want: int, seconds: float = 10) -> int:
    """Read until `want` streams in all have been reset (have: so far)."""
    end = time.time() + seconds
    while have < want and time.time() < end:
        got = _drain(t, conn, 0.2, early=True)
        have += sum(1 for e in got if type(e).__name__ == "StreamReset")
        if "closed" in got:
            break
    return have


def _http_layers_streams() -> int:
    """HttpStreams that mitmproxy's HttpLayers of this process still hold (each with its flow)."""
    from mitmproxy.proxy.layers.http import HttpLayer
    gc.collect()
    return sum(len(o.streams) for o in gc.get_objects() if isinstance(o, HttpLayer))


def _live_flows() -> int:
    from mitmproxy import http
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, http.HTTPFlow))


@pytest.mark.e2e  # hundreds of streams, or waits a timeout: seconds
def test_finding_refused_and_reset_streams_are_not_kept_with_their_flow_until_the_connection_ends(
        proxy, h2api, evil, user, value):
    """FINDING, fixed (internals.forget_killed_streams): a stream refused at its head and reset (Answer.RESET) was
    never dropped: mitmproxy's
    HttpStream.check_killed resets it but yields no DropStream, so HttpLayer.streams keeps the HttpStream and
    its HTTPFlow (the request head whole: up to max_head_bytes) until the connection closes. Before e5820c4
    the connection closed with the stream; now it goes on, and a worker refreshes header_timeout with every
    head, and these resets are the proxy's, which limit_h2_floods never counts. Reproduce: CONNECT to an h2
    origin, then on one connection send N streams, each HEADERS (POST, no content-length, not ending the
    stream, a placeholder of another origin, and 12 copies of one 3.9 KB header: about 47 KB decoded for a
    few bytes on the wire through HPACK's table) and one DATA frame; every one is reset, and afterwards the
    process holds N HttpStreams and N HTTPFlows more (N=400: some 19 MB of heads, kept)."""
    keyed, ph, other = _setup(proxy, h2api, evil, user, value)
    target = h2api.target.encode()
    before = len(h2api.received)
    base_streams, base_flows = _http_layers_streams(), _live_flows()
    t, conn = h2_tunnel(keyed, proxy.port, h2api.target)
    n = 400
    resets = 0
    for i in range(n):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, _head(target, sid, b"POST", other, [(b"x-pad", BIG)] * 12))
        conn.send_data(sid, b"part of a body")
        t.sendall(conn.data_to_send())
        if i % 50 == 49:
            resets += sum(1 for e in _drain(t, conn, 0.3) if type(e).__name__ == "StreamReset")
    resets += sum(1 for e in _drain(t, conn, 1.0) if type(e).__name__ == "StreamReset")
    held_streams, held_flows = _http_layers_streams() - base_streams, _live_flows() - base_flows
    status = _allowed_get(t, conn, target, ph)  # the connection is still usable
    t.close()
    assert resets == n, f"{resets} of {n} refused streams were reset"
    assert status == b"200"
    assert len(h2api.received) - before == 1, "a refused stream reached the upstream"
    assert held_streams < n // 10 and held_flows < n // 10, \
        f"{held_streams} HttpStreams and {held_flows} flows held for {n} streams reset and over"


def _allowed_get(t, conn, target: bytes, ph: str) -> bytes | None:
    """The status of an allowed GET on the connection."""
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, _head(target, sid, b"GET", ph), end_stream=True)
    t.sendall(conn.data_to_send())
    streams = {sid: {"got": [], "ended": False, "status": None}}
    _h2_pump_until(t, conn, streams, time.time() + 8)
    return streams[sid]["status"]


def _rss(proxy) -> float:
    import urllib.request
    text = urllib.request.urlopen(proxy.metrics_url + "/metrics", timeout=5).read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("process_resident_memory_bytes"))


@pytest.mark.e2e
def test_finding_a_worker_does_not_grow_the_proxy_by_each_refused_stream_it_has_reset(proxy, h2api, evil, user, value):
    """FINDING, fixed (internals.forget_killed_streams; the process, measured): `sealgate run`; one HTTP/2
    connection; 1000 streams, each HEADERS
    (POST, no content-length, open, a placeholder of another origin, a unique 24 KB header) and a DATA frame,
    in batches of 50 with a read in between. Every stream is refused and reset, the connection stays open,
    and process_resident_memory_bytes (/metrics) grows by about the heads sent (some 30 MB here), never given
    back while the connection lives: mitmproxy keeps each killed stream's HttpStream and flow. One
    connection of a worker can so grow the proxy without bound (a new head every header_timeout is all it
    takes to keep it open); the streams are the proxy's own resets, not counted by limit_h2_floods."""
    keyed, ph, other = _setup(proxy, h2api, evil, user, value)
    target = h2api.target.encode()
    t, conn = h2_tunnel(keyed, proxy.port, h2api.target)
    _no_huffman(conn)
    rss0 = _rss(proxy)
    n, resets = 1000, 0
    for i in range(n):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, _head(target, sid, b"POST", other,
                                     [(b"x-pad", (b"%08d" % i) * 3000)]))  # unique: not from HPACK's table
        conn.send_data(sid, b"part of a body")
        if i % 50 == 49:
            t.sendall(conn.data_to_send())
            resets = _await_resets(t, conn, resets, i + 1)
    assert resets == n
    time.sleep(0.5)
    grown = _rss(proxy) - rss0
    status = _allowed_get(t, conn, target, ph)
    t.close()
    assert resets == n and status == b"200"
    assert grown < 10 * 2**20, f"the proxy grew by {grown / 2**20:.0f} MiB for {n} refused streams on one connection"


# --- what a worker sends on a stream once it is reset ---------------------------------------------------------

def _frames(t, *frames) -> None:
    t.sendall(b"".join(f.serialize() for f in frames))


def _data(sid: int, data: bytes, end: bool = False):
    from hyperframe.frame import DataFrame
    return DataFrame(sid, data=data, flags=["END_STREAM"] if end else [])


def _headers_frame(conn, sid: int, headers, end_stream: bool = True):
    """A HEADERS frame encoded with this connection's own HPACK state (so the proxy's stays in step)."""
    from hyperframe.frame import HeadersFrame
    return HeadersFrame(sid, data=conn.encoder.encode(headers), flags=["END_HEADERS"] + (["END_STREAM"] if end_stream else []))


def _refused_stream(t, conn, target: bytes, other: str, extra=(), body: bytes = b"part of a body") -> int:
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, _head(target, sid, b"POST", other, extra))
    if body:
        conn.send_data(sid, body)
    t.sendall(conn.data_to_send())
    return sid


def _allowed_post(t, conn, target: bytes, ph: str, body: bytes) -> dict:
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, _head(target, sid, b"POST", ph, [(b"content-length", str(len(body)).encode())]))
    streams = {sid: {"got": [], "ended": False, "status": None}}
    sent = 0
    deadline = time.time() + 15
    while sent < len(body) and time.time() < deadline:  # within the windows the proxy grants
        room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(body) - sent)
        if room > 0:
            conn.send_data(sid, body[sent:sent + room], end_stream=sent + room == len(body))
            sent += room
            t.sendall(conn.data_to_send())
        else:
            _drain(t, conn, 0.05)
    _h2_pump_until(t, conn, streams, time.time() + 10)
    return {"sid": sid, **streams[sid], "sent": sent}


def test_data_past_the_windows_and_trailers_with_placeholders_on_a_reset_stream_go_nowhere(proxy, h2api, evil,
                                                                                             user, value):
    """After the reset, the worker goes on sending DATA on the refused stream (small, then 256 KiB in 16 KiB
    frames, past the stream's and the connection's 64 KiB windows, then END_STREAM), and trailers carrying a
    placeholder of the origin and one of another on a second reset stream. The connection stays, its window
    is given back (a later allowed POST of 100 KB goes through), nothing of the reset streams reaches the
    upstream, and the allowed stream is filled and its echo scrubbed."""
    keyed, ph, other = _setup(proxy, h2api, evil, user, value)
    target = h2api.target.encode()
    before = len(h2api.received)
    t, conn = h2_tunnel(keyed, proxy.port, h2api.target)
    r1 = _refused_stream(t, conn, target, other)
    r2 = _refused_stream(t, conn, target, other)
    assert _await_resets(t, conn, 0, 2) == 2
    _frames(t, _data(r1, b"small " + ph.encode()))
    _frames(t, *[_data(r1, b"y" * 16384) for _ in range(16)])
    _frames(t, _data(r1, b"", end=True))
    _frames(t, _headers_frame(conn, r2, [(b"x-trailer", ph.encode()), (b"x-other", other.encode())]))
    got = _drain(t, conn, 0.8)
    assert "closed" not in got and not any(type(e).__name__ == "ConnectionTerminated" for e in got), got
    body = (b'{"k": "' + ph.encode() + b'", "pad": "' + b"z" * 100_000 + b'"}')
    a = _allowed_post(t, conn, target, ph, body)
    t.close()
    assert a["sent"] == len(body) and a["status"] == b"200", (a["sent"], a["status"])
    seen = b"".join(a["got"])
    assert value.encode() not in seen, "the worker received the secret value"
    mine = h2api.received[before:]
    assert [h[b":path"] for h, _, _ in mine] == [f"/echo/{a['sid']}".encode()], "a reset stream reached the upstream"
    h, b, tr = mine[0]
    assert h[b"authorization"] == f"Bearer {value}".encode() and value.encode() in b and ph.encode() not in b
    assert tr is None


def test_head_body_and_trailers_of_a_refused_stream_sent_in_one_write_go_nowhere(proxy, h2api, evil, user, value):
    """HEADERS (open), DATA with placeholders, and trailers carrying a placeholder (END_STREAM) of a refused
    stream, and an allowed GET, all in one write (the body and trailers arrive while the refusal is being
    made): the refused stream is reset or answered 403, never forwarded; the GET is answered and filled."""
    keyed, ph, other = _setup(proxy, h2api, evil, user, value)
    target = h2api.target.encode()
    before = len(h2api.received)
    t, conn = h2_tunnel(keyed, proxy.port, h2api.target)
    r = conn.get_next_available_stream_id()
    conn.send_headers(r, _head(target, r, b"POST", other))
    conn.send_data(r, b'{"a": "' + ph.encode() + b'"}' * 100)
    conn.send_headers(r, [(b"x-trailer", ph.encode())], end_stream=True)
    g = conn.get_next_available_stream_id()
    conn.send_headers(g, _head(target, g, b"GET", ph), end_stream=True)
    t.sendall(conn.data_to_send())
    streams = {s: {"got": [], "ended": False, "status": None} for s in (r, g)}
    _h2_pump_until(t, conn, streams, time.time() + 8)
    t.close()
    assert streams[g]["status"] == b"200" and streams[r]["ended"] and streams[r]["status"] in (None, b"403")
    assert value.encode() not in b"".join(b for s in streams.values() for b in s["got"])
    assert [h[b":path"] for h, _, _ in h2api.received[before:]] == [f"/echo/{g}".encode()]


def test_a_large_content_length_refused_stream_is_reset_and_its_declared_body_goes_nowhere(proxy, h2api, evil,
                                                                                          user, value):
    """content-length 2 MiB (over HEAD_REFUSAL_BODY_MAX and STREAM_OVER: checked at its head) and a placeholder of another origin: reset at its head;
    the worker then sends the whole declared body on the reset stream: the connection and its other
    streams go on and nothing of it reaches the upstream."""
    keyed, ph, other = _setup(proxy, h2api, evil, user, value)
    target = h2api.target.encode()
    before = len(h2api.received)
    t, conn = h2_tunnel(keyed, proxy.port, h2api.target)
    r = _refused_stream(t, conn, target, other, [(b"content-length", b"2097152")], body=b"")
    assert _await_resets(t, conn, 0, 1) == 1
    for i in range(128):
        _frames(t, _data(r, b"w" * 16384, end=i == 127))
    _drain(t, conn, 0.5)
    a = _allowed_post(t, conn, target, ph, b"hello " + ph.encode())
    t.close()
    assert a["status"] == b"200" and value.encode() not in b"".join(a["got"])
    assert [h[b":path"] for h, _, _ in h2api.received[before:]] == [f"/echo/{a['sid']}".encode()]


@pytest.mark.e2e  # hundreds of streams, or waits a timeout: seconds
def test_continuation_and_priority_tricks_around_reset_streams(proxy, h2api, evil, user, value):
    """A refused head split over HEADERS (with a priority, no END_HEADERS) and CONTINUATION frames of 7 bytes,
    the placeholder's bytes across them; PRIORITY frames on the reset stream, on an idle stream depending on
    it, and the reset stream made to depend on that; then an allowed stream exclusively dependent on the reset
    one. The split head is refused and reset, never forwarded; the allowed stream is answered and filled."""
    from hyperframe.frame import ContinuationFrame, HeadersFrame, PriorityFrame
    keyed, ph, other = _setup(proxy, h2api, evil, user, value)
    target = h2api.target.encode()
    before = len(h2api.received)
    t, conn = h2_tunnel(keyed, proxy.port, h2api.target)
    w = conn.get_next_available_stream_id()  # (this client's h2 takes frames once a stream of its own went)
    conn.send_headers(w, _head(target, w, b"GET", ph), end_stream=True)
    t.sendall(conn.data_to_send())
    warm = {w: {"got": [], "ended": False, "status": None}}
    _h2_pump_until(t, conn, warm, time.time() + 8)
    r = conn.get_next_available_stream_id()
    block = conn.encoder.encode(_head(target, r, b"POST", other))
    parts = [block[i:i + 7] for i in range(0, len(block), 7)]
    frames = [HeadersFrame(r, data=parts[0], flags=["PRIORITY"], depends_on=0, stream_weight=200)]
    frames += [ContinuationFrame(r, data=p) for p in parts[1:-1]]
    frames.append(ContinuationFrame(r, data=parts[-1], flags=["END_HEADERS"]))
    frames.append(_data(r, b"part of a body"))
    _frames(t, *frames)
    conn.highest_outbound_stream_id = r  # (h2 here did not see it go)
    _drain(t, conn, 1.0)
    _frames(t, PriorityFrame(r, depends_on=0, stream_weight=1), PriorityFrame(r + 100, depends_on=r),
            PriorityFrame(r, depends_on=r + 100, exclusive=True), _data(r, b"more", end=True))
    g = conn.get_next_available_stream_id()
    conn.send_headers(g, _head(target, g, b"GET", ph), end_stream=True, priority_depends_on=r, priority_exclusive=True,
                      priority_weight=256)
    t.sendall(conn.data_to_send())
    streams = {g: {"got": [], "ended": False, "status": None}}
    _h2_pump_until(t, conn, streams, time.time() + 8)
    t.close()
    assert streams[g]["status"] == b"200"
    assert value.encode() not in b"".join(streams[g]["got"])
    assert warm[w]["status"] == b"200"
    assert [h[b":path"] for h, _, _ in h2api.received[before:]] == [f"/echo/{w}".encode(), f"/echo/{g}".encode()]
    proxy.audit_written()
    log = proxy.log.read_text()
    assert "decision=block code=origin_not_allowed" in log and f"path=/echo/{r}\n" in log


# --- audit rows, sealgate's own counts, the limits ---------------------------------------------------------------

def test_refused_and_reset_streams_get_one_block_row_each_with_status_0_and_leave_no_count_behind(proxy, h2api,
                                                                                                  evil, user, value):
    """Six refused streams reset on one connection (two with trailers sent after the reset, one reset by the
    worker too) and one allowed: the audit trail has exactly six block rows (origin_not_allowed, status 0) and
    one allow row (status 200); sealgate's exchanges in flight for the connection go back to 0 and its
    Connections.flows holds none of them."""
    import json
    import uuid
    runchat = f"rc-h2reset-{uuid.uuid4().hex[:8]}"
    proxy.add_secret(user, "API_KEY", value, h2api.origin)
    proxy.add_secret(user, "ELSEWHERE", value[::-1] + "Q", evil.origin)
    keyed = proxy.issue(user=user, runchat=runchat)
    ph, other = keyed["env"]["API_KEY"], keyed["env"]["ELSEWHERE"]
    target = h2api.target.encode()
    t, conn = h2_tunnel(keyed, proxy.port, h2api.target)
    refused = [_refused_stream(t, conn, target, other) for _ in range(6)]
    assert _await_resets(t, conn, 0, 6) == 6
    _frames(t, *[_headers_frame(conn, r, [(b"x-t", ph.encode())]) for r in refused[:2]])
    from hyperframe.frame import RstStreamFrame
    _frames(t, RstStreamFrame(refused[2], error_code=8))
    _drain(t, conn, 0.3)
    a = _allowed_post(t, conn, target, ph, b"x")
    sg = proxy._master.addons.get("sealgate")
    in_flight = [w.in_flight for w in sg.connections.workers.values()]
    mine = [f for f in list(sg.connections.flows) if f.request.path.startswith("/echo/")]
    t.close()
    assert a["status"] == b"200"
    proxy.audit_written()
    rows = json.loads(proxy.cli("audit", "--runchat", runchat, "--json").stdout)
    got = sorted((r["path"], r["decision"], r["code"], r["status"]) for r in rows)
    want = sorted([(f"/echo/{r}", "block", "origin_not_allowed", 0) for r in refused] +
                  [(f"/echo/{a['sid']}", "allow", None, 200)])
    assert got == want, got
    assert not mine, "sealgate keeps refused exchanges in flight"
    assert max(in_flight, default=0) == 0


@pytest.mark.e2e  # hundreds of streams, or waits a timeout: seconds
def test_rapid_reset_still_closes_a_worker_whose_own_resets_are_mixed_with_refused_streams(proxy, h2api, evil,
                                                                                           user, value):
    """Refused streams the proxy resets, interleaved with streams the worker opens (allowed heads) and resets
    itself at once (RST_STREAM CANCEL): past 100 of its own resets within 10 s it gets GOAWAY
    ENHANCE_YOUR_CALM and the connection closes; nothing it reset reached the upstream more than once each."""
    keyed, ph, other = _setup(proxy, h2api, evil, user, value)
    target = h2api.target.encode()
    t, conn = h2_tunnel(keyed, proxy.port, h2api.target)
    terminated = None
    for i in range(130):
        _refused_stream(t, conn, target, other)
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, _head(target, sid, b"POST", ph))  # open: it never reaches the upstream whole
        conn.reset_stream(sid, 8)
        try:
            t.sendall(conn.data_to_send())
        except OSError:
            break
        if i % 10 == 9:
            got = _drain(t, conn, 0.2)
            terminated = next((e for e in got if type(e).__name__ == "ConnectionTerminated"), None)
            if terminated or "closed" in got:
                break
    t.close()
    assert terminated is not None and terminated.error_code == 11, "no GOAWAY ENHANCE_YOUR_CALM"


@pytest.mark.e2e  # hundreds of streams, or waits a timeout: seconds
def test_refused_streams_after_the_proxy_reset_them_then_reset_by_the_worker_do_not_close_it_wrongly(proxy, h2api,
                                                                                                     evil, user,
                                                                                                     value):
    """150 refused streams, each reset by the proxy and only then by the worker too (a RST on a closed stream):
    whether or not these count, the connection ends in GOAWAY ENHANCE_YOUR_CALM or goes on answering; it never
    hangs, and nothing reaches the upstream."""
    from hyperframe.frame import RstStreamFrame
    keyed, ph, other = _setup(proxy, h2api, evil, user, value)
    target = h2api.target.encode()
    before = len(h2api.received)
    t, conn = h2_tunnel(keyed, proxy.port, h2api.target)
    have, ended = 0, None
    for i in range(15):
        sids = [_refused_stream(t, conn, target, other) for _ in range(10)]
        have = _await_resets(t, conn, have, 10 * (i + 1), seconds=5)
        _frames(t, *[RstStreamFrame(sid, error_code=8) for sid in sids])
    got = _drain(t, conn, 0.5)
    ended = next((e for e in got if type(e).__name__ == "ConnectionTerminated"), None)
    if ended is None and "closed" not in got:
        g = conn.get_next_available_stream_id()
        conn.send_headers(g, _head(target, g, b"GET", ph), end_stream=True)
        t.sendall(conn.data_to_send())
        streams = {g: {"got": [], "ended": False, "status": None}}
        _h2_pump_until(t, conn, streams, time.time() + 8)
        assert streams[g]["status"] == b"200"
        assert len(h2api.received) - before == 1
    else:
        assert ended is not None and ended.error_code == 11
        assert len(h2api.received) == before
    t.close()
    print("RST-after-reset outcome:", "GOAWAY" if ended else "closed" if "closed" in got else "goes on")
    assert have == 150


def test_http1_refusals_of_a_chunked_body_still_close_the_connection(proxy, api, evil, user, value):
    """HTTP/1.1 in a tunnel: a chunked POST carrying a placeholder of another origin is refused at its head and
    the connection is closed (Answer.KILL), no answer on it; a second request pipelined behind never goes."""
    from wire import tunnel
    proxy.add_secret(user, "API_KEY", value, api.origin)
    proxy.add_secret(user, "ELSEWHERE", value[::-1] + "Q", evil.origin)
    keyed = proxy.issue(user=user)
    ph, other = keyed["env"]["API_KEY"], keyed["env"]["ELSEWHERE"]
    host = api.origin.split("//", 1)[1]
    before = api.seen()
    t = tunnel(keyed, proxy.port, host, None)
    t.sendall(f"POST /h1chunk HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {other}\r\n"
              f"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".encode())
    time.sleep(0.3)
    try:
        t.sendall(f"0\r\n\r\nGET /h1after HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ph}\r\n\r\n".encode())
    except OSError:
        pass
    out = read_all(t, 3)
    t.close()
    assert out == b"", _hx(out)
    assert b"/h1chunk" not in api.seen()[len(before):] and b"/h1after" not in api.seen()[len(before):]


@pytest.fixture(scope="module")
def tight(tmp_path_factory, pki):
    """A sealgate of its own: two connections a session, a head due within 2 s."""
    from conftest import make_proxy
    p = make_proxy(tmp_path_factory.mktemp("sealgate-h2reset"), pki, SEALGATE_MAX_SESSION_CONNECTIONS="2",
                   SEALGATE_HEADER_TIMEOUT="2")
    p.start()
    yield p
    p.stop()


def test_per_session_connection_limit_holds_and_is_given_back_when_refusals_reset_streams(tight, h2api, evil, user,
                                                                                         value):
    """Two HTTP/2 connections of one session (its limit), each with 20 streams refused and reset: a third
    CONNECT gets 429 too_many_connections; sealgate counts exactly 2 for the session, and once both close, 0,
    and a new connection is served."""
    keyed, ph, other = _setup(tight, h2api, evil, user, value)
    target = h2api.target.encode()
    sg = tight._master.addons.get("sealgate")
    conns = [h2_tunnel(keyed, tight.port, h2api.target) for _ in range(2)]
    for t, conn in conns:
        for _ in range(20):
            _refused_stream(t, conn, target, other)
    for t, conn in conns:
        assert _await_resets(t, conn, 0, 20) == 20
    sock, head = connect(keyed, tight.port, h2api.target)
    sock.close()
    counted = dict(sg.connections.per_session)
    for t, _ in conns:
        t.close()
    time.sleep(0.5)
    after = dict(sg.connections.per_session)
    t, conn = h2_tunnel(keyed, tight.port, h2api.target)
    g = conn.get_next_available_stream_id()
    conn.send_headers(g, _head(target, g, b"GET", ph), end_stream=True)
    t.sendall(conn.data_to_send())
    streams = {g: {"got": [], "ended": False, "status": None}}
    _h2_pump_until(t, conn, streams, time.time() + 8)
    t.close()
    assert head.startswith(b"HTTP/1.1 429") and b"too_many_connections" in head.lower()
    assert sorted(counted.values()) == [2] and after == {}, (counted, after)
    assert streams[g]["status"] == b"200"


@pytest.mark.e2e  # hundreds of streams, or waits a timeout: seconds
def test_data_trickled_on_a_reset_stream_does_not_hold_the_connection_past_header_timeout(tight, h2api, evil, user,
                                                                                         value):
    """After its refused stream is reset, a worker keeps sending DATA on it every 0.25 s and nothing else: the
    connection is closed once header_timeout (2 s) has passed without a head, as any idle connection."""
    keyed, _, other = _setup(tight, h2api, evil, user, value)
    target = h2api.target.encode()
    t, conn = h2_tunnel(keyed, tight.port, h2api.target)
    r = _refused_stream(t, conn, target, other)
    assert _await_resets(t, conn, 0, 1) == 1
    start, closed_at = time.time(), None
    while time.time() - start < 6:
        try:
            _frames(t, _data(r, b"trickle"))
        except OSError:
            closed_at = time.time() - start
            break
        got = _drain(t, conn, 0.25)
        if "closed" in got or any(type(e).__name__ == "ConnectionTerminated" for e in got):
            closed_at = time.time() - start
            break
    t.close()
    assert closed_at is not None and closed_at < 4, closed_at
