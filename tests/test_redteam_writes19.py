"""Red team (helper, session 19): internals.whole_tls_writes now also replaces TLSLayer.event_to_child: the SendData
a TLS layer's child yields for the layer's own connection within one event are held and sent as one send_data; any
other command sends what was held first. (Its in-process findings, now fixed, are in test_internals.py.)

In a CONNECT tunnel the stack is ServerTLSLayer(upstream) / ClientTLSLayer(worker) / HttpLayer: the upstream's TLS
layer is the parent of the worker's, so it sees (and holds) what goes upstream during *every* event of the tunnel,
the worker's included. These probes drive the real proxy with real TLS to real loopback upstreams and check both
sides: what the upstream received and what the worker received (order, completeness, promptness, no value).

Values are made per test; asserts test booleans, lengths and hashes, so no value reaches the output. Each test's
docstring says what it tries."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import random
import select
import socket
import ssl
import threading
import time

import pytest
from upstream import LOOPBACK_SANS, H2Upstream, RawUpstream, header, raw_response
from wire import clean_log, connect, h2_received, h2_tunnel, log_mark, read_all, tunnel  # noqa: F401 - log_mark: autouse

# --- helpers ------------------------------------------------------------------------------------------------------


def _h(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def _no_value(proxy, value: str, *seen: bytes) -> bool:
    v = value.encode()
    return all(v not in s for s in seen) and v not in proxy.visible_to_operators()


def _keyed(proxy, user: str, value: str, origin: str, name: str = "K") -> tuple[dict, str]:
    proxy.add_secret(user, name, value, origin)
    s = proxy.issue(user=user)
    return s, s["env"][name]


class _TLSServer:
    """A TLS server on loopback that runs handler(sock) for each connection in a thread of its own."""

    def __init__(self, pki, handler, alpn=("http/1.1",)) -> None:
        self.handler = handler
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*pki.issue(f"w19-{id(self)}", LOOPBACK_SANS))
        self.ctx.set_alpn_protocols(list(alpn))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.origin, self.target = f"https://127.0.0.1:{self.port}", f"127.0.0.1:{self.port}"
        self.errors: list[BaseException] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(s,), daemon=True).start()

    def _one(self, s) -> None:
        try:
            t = self.ctx.wrap_socket(s, server_side=True)
            t.settimeout(10)
            self.handler(t)
        except Exception as e:  # noqa: BLE001
            self.errors.append(e)
        finally:
            with contextlib.suppress(OSError):
                s.close()


def _read_head_from(sock, buf: bytearray) -> bytes:
    while b"\r\n\r\n" not in buf:
        d = sock.recv(65536)
        if not d:
            raise ConnectionError("closed before a head")
        buf += d
    at = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:at])
    del buf[:at]
    return head


def _read_exactly(sock, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        d = sock.recv(1 << 20)
        if not d:
            raise ConnectionError("closed early")
        buf += d
    out = bytes(buf[:n])
    del buf[:n]
    return out


def _read_chunked(sock, buf: bytearray) -> bytes:
    out = bytearray()
    while True:
        while b"\r\n" not in buf:
            d = sock.recv(65536)
            if not d:
                raise ConnectionError("closed mid-body")
            buf += d
        line, _, rest = bytes(buf).partition(b"\r\n")
        buf[:] = rest
        size = int(line.split(b";")[0], 16)
        if size == 0:
            while not buf.startswith(b"\r\n") and b"\r\n\r\n" not in buf:
                d = sock.recv(65536)
                if not d:
                    break
                buf += d
            if buf.startswith(b"\r\n"):
                del buf[:2]
            else:
                del buf[:buf.index(b"\r\n\r\n") + 4]
            return bytes(out)
        out += _read_exactly(sock, buf, size + 2)[:-2]


def _read_response(sock, buf: bytearray, method: bytes = b"GET") -> tuple[bytes, bytes]:
    """One HTTP/1 response (1xx skipped): its head and body (Content-Length or chunked)."""
    while True:
        head = _read_head_from(sock, buf)
        status = int(head.split(b" ", 2)[1])
        if 100 <= status < 200 and status != 101:
            continue
        break
    if method == b"HEAD" or status in (204, 304):
        return head, b""
    if b"chunked" in header(b"X\r\n" + head, b"transfer-encoding").lower():
        return head, _read_chunked(sock, buf)
    length = header(b"X\r\n" + head, b"content-length")
    return head, _read_exactly(sock, buf, int(length or 0))


class _NoMore:
    def recv(self, n: int) -> bytes:
        return b""


@pytest.fixture
def tls_sends():
    """Every send_data a TLS layer makes in this (in-process) proxy while the test runs: (side, bytes) with
    side "client" or "server". The class attribute is wrapped, and put back after."""
    from mitmproxy.proxy.layers import tls
    original = tls.TLSLayer.send_data
    seen: list[tuple[str, int]] = []

    def send_data(self, data):
        seen.append(("client" if self.conn == self.context.client else "server", len(data)))
        return original(self, data)

    tls.TLSLayer.send_data = send_data
    try:
        yield seen
    finally:
        tls.TLSLayer.send_data = original


# --- 1. HTTP/1.1 responses ----------------------------------------------------------------------------------------


def test_http1_keepalive_and_pipelined_responses_of_every_framing_arrive_whole_in_order_and_scrubbed(
        proxy, pki, user, value):
    """One tunnel, eleven exchanges, the last five pipelined in one TLS write: responses with Content-Length,
    chunked (with trailers), empty, 204, 304, a HEAD, a 1xx before the answer, each echoing the value in head and
    body. The worker gets every response whole, in order, each value back to the placeholder, nothing extra; the
    upstream got each request once, filled."""
    v = value.encode()

    def answer(head, body, sock):
        path = head.split(b" ")[1]
        key = header(head, b"x-key")
        kind = path.split(b"/")[1]
        payload = b"[" + path + b"|" + key + b"|" + body + b"]" * 50
        if kind == b"cl":
            return raw_response(payload, extra=b"X-Echo: " + key + b"\r\n")
        if kind == b"chunked":
            parts = [payload[i:i + 7] for i in range(0, len(payload), 7)]
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Echo: " + key + b"\r\n\r\n"
                    + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nX-T: " + key + b"\r\n\r\n")
        if kind == b"empty":
            return raw_response(b"", extra=b"X-Echo: " + key + b"\r\n")
        if kind == b"204":
            return b"HTTP/1.1 204 No Content\r\nX-Echo: " + key + b"\r\n\r\n"
        if kind == b"304":
            return b"HTTP/1.1 304 Not Modified\r\nX-Echo: " + key + b"\r\n\r\n"
        if kind == b"head":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\nX-Echo: " + key + b"\r\n\r\n"
        if kind == b"early":
            return (b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
                    + raw_response(payload, extra=b"X-Echo: " + key + b"\r\n"))
        return raw_response(b"?")

    up = RawUpstream(pki, answer)
    s, ph = _keyed(proxy, user, value, up.origin)
    kinds = ["cl", "chunked", "empty", "204", "304", "head", "early", "cl", "chunked", "early", "cl"]
    t = tunnel(s, proxy.port, up.target, None)
    t.settimeout(10)
    buf, got = bytearray(), []

    def req(i, kind):
        method = "HEAD" if kind == "head" else ("POST" if kind in ("cl", "chunked", "early") else "GET")
        body = f"b{i}={ph}".encode() if method == "POST" else b""
        length = f"Content-Length: {len(body)}\r\n" if method == "POST" else ""
        return method, (f"{method} /{kind}/{i} HTTP/1.1\r\nHost: {up.target}\r\nX-Key: {ph}\r\n{length}\r\n"
                        .encode() + body)

    for i, kind in enumerate(kinds[:6]):
        method, r = req(i, kind)
        t.sendall(r)
        got.append((kind, i, *_read_response(t, buf, method.encode())))
    batch = [req(i, kind) for i, kind in enumerate(kinds) if i >= 6]
    t.sendall(b"".join(r for _, r in batch))
    for (method, _), i in zip(batch, range(6, len(kinds))):
        got.append((kinds[i], i, *_read_response(t, buf, method.encode())))
    t.settimeout(0.5)
    extra = b""
    with contextlib.suppress(TimeoutError, ssl.SSLError, OSError):
        extra = t.recv(65536)
    t.close()
    seen = b"".join(h + b for _, _, h, b in got) + extra + bytes(buf)
    assert extra == b"" and bytes(buf) == b"", "bytes beyond the last response"
    for kind, i, head, body in got:
        assert b"X-Echo: " + ph.encode() in head, (kind, i)
        if kind in ("cl", "chunked", "early"):
            want = b"[/" + kind.encode() + b"/%d|" % i + ph.encode() + b"|" + f"b{i}={ph}".encode() + b"]" * 50
            assert body == want, (kind, i, _h(body), _h(want))
        else:
            assert body == b"", (kind, i)
    assert [h.split(b" ")[1] for h, _ in up.received] == [f"/{k}/{i}".encode() for i, k in enumerate(kinds)]
    assert all(header(h, b"x-key") == v for h, _ in up.received)
    assert _no_value(proxy, value, seen) and clean_log(proxy)


@pytest.mark.parametrize("size", [1, 70_000, 3 << 20])
def test_a_response_read_until_close_arrives_whole_before_the_worker_sees_the_end(proxy, pki, user, value, size):
    """HTTP/1.0-style: no length, the body runs until the upstream closes, the value in its last bytes (and the
    close arriving in the same segment as the end): the worker gets every byte, scrubbed, then the end. Lost
    bytes at the end of a connection would show as a short body."""
    body = (b"abcdefghij" * (size // 10 + 1))[:size] + b"|" + value.encode() + b"|end"

    def answer(head, _, sock):
        sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + body)
        sock.close()

    up = RawUpstream(pki, answer)
    s, ph = _keyed(proxy, user, value, up.origin)
    t = tunnel(s, proxy.port, up.target, None)
    t.sendall(f"GET /x HTTP/1.1\r\nHost: {up.target}\r\nConnection: close\r\n\r\n".encode())
    raw = bytearray()
    t.settimeout(10)
    with contextlib.suppress(TimeoutError, ssl.SSLError, OSError):
        while d := t.recv(1 << 20):
            raw += d
    t.close()
    head, _, got = bytes(raw).partition(b"\r\n\r\n")
    want = body.replace(value.encode(), ph.encode())
    if b"chunked" in header(b"X\r\n" + head, b"transfer-encoding").lower():
        got = _read_chunked(_NoMore(), bytearray(got))
    ok = got == want
    assert ok, (len(got), len(want))
    assert _no_value(proxy, value, bytes(raw)) and clean_log(proxy)


def test_sse_events_reach_the_worker_one_by_one_before_the_next_is_written(proxy, pki, user, value):
    """Lock-step SSE: the upstream writes one event, then waits until the worker has read it before it writes the
    next (a 1xx-free chunked stream, the value in each event). Anything held past its event (across events) would
    stall this forever: every event must arrive while the upstream waits."""
    acks = [threading.Event() for _ in range(8)]
    v = value.encode()

    def answer(head, _, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i, ack in enumerate(acks):
            ev = b"id: %d\ndata: %s\n\n" % (i, v)
            sock.sendall(b"%x\r\n%s\r\n" % (len(ev), ev))
            if not ack.wait(5):
                return
        sock.sendall(b"0\r\n\r\n")
        time.sleep(0.3)
        return

    up = RawUpstream(pki, answer)
    s, ph = _keyed(proxy, user, value, up.origin)
    t = tunnel(s, proxy.port, up.target, None)
    t.settimeout(4)
    t.sendall(f"GET /events HTTP/1.1\r\nHost: {up.target}\r\nConnection: close\r\n\r\n".encode())
    raw = b""
    for i, ack in enumerate(acks):
        marker = b"id: %d\ndata: %s\n\n" % (i, ph.encode())
        start = time.time()
        while marker not in raw and time.time() - start < 4:
            try:
                d = t.recv(65536)
            except (TimeoutError, ssl.SSLError):
                break
            if not d:
                break
            raw += d
        assert marker in raw, f"event {i} did not reach the worker while the upstream waited for it"
        ack.set()
    raw += read_all(t, 3)
    t.close()
    assert raw.endswith(b"0\r\n\r\n")
    assert _no_value(proxy, value, raw) and clean_log(proxy)


def test_a_refusal_on_a_keepalive_tunnel_is_whole_and_the_next_exchange_is_intact(proxy, pki, user, value):
    """sealgate's own problem+json (a placeholder sent to a destination it is not allowed for), then an allowed
    request on the same tunnel, then a refusal with a body behind it: each answer whole (Content-Length matches),
    the refusal JSON parses, nothing of the refused request upstream, no value anywhere."""
    import json
    up = RawUpstream(pki, lambda head, body, sock: raw_response(b"fine:" + header(head, b"x-key")))
    other = RawUpstream(pki, lambda head, body, sock: raw_response(b"other"))
    s, ph = _keyed(proxy, user, value, other.origin)  # allowed only for `other`
    t = tunnel(s, proxy.port, up.target, None)
    t.settimeout(10)
    buf = bytearray()
    t.sendall(f"GET /a HTTP/1.1\r\nHost: {up.target}\r\nX-Key: {ph}\r\n\r\n".encode())
    h1, b1 = _read_response(t, buf)
    t.sendall(f"GET /b HTTP/1.1\r\nHost: {up.target}\r\nX-Key: plain\r\n\r\n".encode())
    h2, b2 = _read_response(t, buf)
    body3 = f"k={ph}&z=1".encode()
    t.sendall(f"POST /c HTTP/1.1\r\nHost: {up.target}\r\nContent-Length: {len(body3)}\r\n\r\n".encode() + body3)
    h3, b3 = _read_response(t, buf)
    t.close()
    assert b" 403 " in h1.split(b"\r\n")[0] and json.loads(b1)["code"] == "origin_not_allowed"
    assert b" 200 " in h2.split(b"\r\n")[0] and b2 == b"fine:plain"
    assert b" 403 " in h3.split(b"\r\n")[0] and json.loads(b3)["status"] == 403
    assert [h.split(b" ")[1] for h, _ in up.received] == [b"/b"]
    assert _no_value(proxy, value, h1 + b1 + h2 + b2 + h3 + b3) and clean_log(proxy)


# --- 2. uploads: what the upstream receives -----------------------------------------------------------------------


def test_a_streamed_upload_reaches_the_upstream_piece_by_piece_in_lock_step(proxy, pki, user, value):
    """A chunked upload sent a chunk at a time, the next only once the upstream has read the one before (the
    upstream acknowledges out of band): the upstream's TLS layer holds what goes upstream during the worker's
    events, so anything kept past its event would stall. Each piece carries the placeholder: the upstream gets
    exactly the filled pieces, in order; the worker's echo is scrubbed."""
    n = 6
    acks = [threading.Event() for _ in range(n)]
    got: list[bytes] = []

    def handler(t):
        buf = bytearray()
        head = _read_head_from(t, buf)
        assert b"chunked" in header(head, b"transfer-encoding").lower()
        body = bytearray()
        i = 0
        while True:
            while b"\r\n" not in buf:
                buf += t.recv(65536)
            line, _, rest = bytes(buf).partition(b"\r\n")
            buf[:] = rest
            size = int(line.split(b";")[0], 16)
            if size == 0:
                break
            body += _read_exactly(t, buf, size + 2)[:-2]
            while i < n and b"|%d|%s|" % (i, value.encode()) in body:
                acks[i].set()
                i += 1
        got.append(bytes(body))
        t.sendall(raw_response(bytes(body)))

    up = _TLSServer(pki, handler)
    s, ph = _keyed(proxy, user, value, up.origin)
    t = tunnel(s, proxy.port, up.target, None)
    t.settimeout(10)
    t.sendall(f"POST /up HTTP/1.1\r\nHost: {up.target}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    pieces = [f"|{i}|{ph}|{'p' * (4000 + i * 3000)}#".encode() for i in range(n)]  # (a tail is held back)
    for i, p in enumerate(pieces):
        t.sendall(b"%x\r\n%s\r\n" % (len(p), p))
        assert acks[i].wait(5), f"piece {i} did not reach the upstream while the worker waited"
    t.sendall(b"0\r\n\r\n")
    buf = bytearray()
    head, echo = _read_response(t, buf, b"POST")
    t.close()
    want = b"".join(pieces).replace(ph.encode(), value.encode())
    assert got and got[0] == want, "the upstream did not get exactly the filled pieces in order"
    assert echo == b"".join(pieces)
    assert not up.errors
    assert _no_value(proxy, value, head + echo) and clean_log(proxy)


def test_large_uploads_reach_the_upstream_exactly_and_each_tls_write_stays_bounded(
        proxy, pki, user, value, tls_sends):
    """A 6 MiB chunked upload and a 900 KiB Content-Length upload (held whole), the placeholder every 4 KiB and
    at piece boundaries: the upstream gets exactly the filled body; no single TLS send_data of the proxy is larger
    than a few MiB (holding never grows with the body)."""
    echo = RawUpstream(pki, lambda head, body, sock: raw_response(b"got"), keep_bodies=False)
    s, ph = _keyed(proxy, user, value, echo.origin)
    unit = (b"x" * 4000 + ph.encode())
    big = unit * ((6 << 20) // len(unit))
    t = tunnel(s, proxy.port, echo.target, None)
    t.settimeout(20)
    t.sendall(f"POST /a HTTP/1.1\r\nHost: {echo.target}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    rng = random.Random(19)
    pos = 0
    while pos < len(big):
        k = rng.choice([1, 100, 4097, 65536, 300_000])
        piece = big[pos:pos + k]
        t.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        pos += k
    t.sendall(b"0\r\n\r\n")
    buf = bytearray()
    _, r1 = _read_response(t, buf, b"POST")
    small = unit * ((900 << 10) // len(unit))
    t.sendall(f"POST /b HTTP/1.1\r\nHost: {echo.target}\r\nContent-Length: {len(small)}\r\n\r\n".encode() + small)
    _, r2 = _read_response(t, buf, b"POST")
    t.close()
    filled_big, filled_small = big.replace(ph.encode(), value.encode()), small.replace(ph.encode(), value.encode())
    assert echo.body_hashes[-2:] == [hashlib.sha256(filled_big).hexdigest(), hashlib.sha256(filled_small).hexdigest()]
    assert r1 == r2 == b"got" and echo.body_sizes[-2:] == [len(filled_big), len(filled_small)]
    largest = max(n for side, n in tls_sends if side == "server")
    assert largest <= (3 << 20), largest
    assert _no_value(proxy, value, r1 + r2) and clean_log(proxy)


# --- 3. large downloads and a worker that goes away ---------------------------------------------------------------


def test_a_24_mib_download_is_exact_and_no_tls_write_holds_more_than_a_few_mib(proxy, pki, user, value, tls_sends):
    """24 MiB with a Content-Length from an upstream that writes it in one go (streamed by sealgate: > 1 MiB), the
    value at the start, in the middle and in the last bytes: the worker gets exactly the scrubbed body, and no
    send_data toward the worker is larger than a few MiB (a streamed body is not merged into one event)."""
    v = value.encode()
    rng = random.Random(24)
    body = bytearray(rng.randbytes(24 << 20).replace(b"\n", b"-"))
    for at in (0, 12 << 20, len(body) - len(v)):
        body[at:at + len(v)] = v
    body = bytes(body)

    up = RawUpstream(pki, lambda head, _, sock: raw_response(body))
    s, ph = _keyed(proxy, user, value, up.origin)
    t = tunnel(s, proxy.port, up.target, None)
    t.settimeout(20)
    t.sendall(f"GET /big HTTP/1.1\r\nHost: {up.target}\r\n\r\n".encode())
    buf = bytearray()
    _, got = _read_response(t, buf)
    t.close()
    want = body.replace(v, ph.encode())
    assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest() and v not in got
    largest = max(n for side, n in tls_sends if side == "client")
    assert largest <= (3 << 20), largest
    assert clean_log(proxy)


def test_workers_that_vanish_mid_response_leave_the_proxy_serving(proxy, pki, user, value):
    """Workers that close (or reset) their socket while a 8 MiB response streams to them, or right after the
    head, or after sending a TLS close_notify: no crash in the proxy's log, and the next exchange is whole."""
    body = b"q" * (8 << 20)
    up = RawUpstream(pki, lambda head, _, sock: raw_response(body if b"/big" in head else b"ok"))
    s, _ = _keyed(proxy, user, value, up.origin)
    for k in range(6):
        t = tunnel(s, proxy.port, up.target, None)
        t.sendall(f"GET /big/{k} HTTP/1.1\r\nHost: {up.target}\r\n\r\n".encode())
        t.settimeout(5)
        with contextlib.suppress(OSError, ssl.SSLError):
            read = 0
            while read < [0, 100, 70_000, 1 << 20, 4 << 20, 100][k]:
                read += len(t.recv(65536))
        if k == 5:
            t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        t.close()
    time.sleep(0.5)
    t = tunnel(s, proxy.port, up.target, None)
    t.settimeout(10)
    t.sendall(f"GET /small HTTP/1.1\r\nHost: {up.target}\r\nConnection: close\r\n\r\n".encode())
    out = read_all(t, 5)
    t.close()
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"\r\n\r\nok")
    assert clean_log(proxy)


def test_a_worker_that_sends_close_notify_after_its_request_still_gets_the_whole_answer(proxy, pki, user, value):
    """The worker sends its request, then a TLS close_notify (its half of the TLS session ends; TCP stays open),
    and reads on: the answer (the value echoed, 300 KiB) comes whole and scrubbed, or not at all; never cut
    short, never the value."""
    from OpenSSL import SSL
    v = value.encode()
    up = RawUpstream(pki, lambda head, _, sock: raw_response(header(head, b"x-key") + b"." * (300 << 10) + b"end"))
    s, ph = _keyed(proxy, user, value, up.origin)
    sock, head = connect(s, proxy.port, up.target)
    assert b" 200 " in head.split(b"\r\n")[0]
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.load_verify_locations(s["ca_cert"])
    ctx.set_alpn_protos([b"http/1.1"])
    c = SSL.Connection(ctx, sock)
    c.set_connect_state()
    sock.settimeout(10)
    while True:
        try:
            c.do_handshake()
            break
        except SSL.WantReadError:
            select.select([sock], [], [], 1)
    c.sendall(f"GET /x HTTP/1.1\r\nHost: {up.target}\r\nX-Key: {ph}\r\n\r\n".encode())
    time.sleep(0.2)
    c.shutdown()  # close_notify only
    raw = bytearray()
    end = time.time() + 10
    with contextlib.suppress(SSL.ZeroReturnError, SSL.SysCallError, OSError):
        while time.time() < end:
            try:
                d = c.recv(1 << 20)
            except SSL.WantReadError:
                select.select([sock], [], [], 1)
                continue
            if not d:
                break
            raw += d
    sock.close()
    raw = bytes(raw)
    if raw:
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"end"), (len(raw), raw[:80])
        assert raw.partition(b"\r\n\r\n")[2] == ph.encode() + b"." * (300 << 10) + b"end"
    assert _no_value(proxy, value, raw) and v not in raw and clean_log(proxy)


# --- 4. HTTP/2 ----------------------------------------------------------------------------------------------------


def _h2_big_answer(headers, body, conn, sid, sock):
    """An answer of `x-size` bytes: the authorization echoed every 5000 bytes; sent in frames as allowed."""
    size = int(headers.get(b"x-size", b"1000"))
    unit = headers.get(b"authorization", b"") + b"\n" + b"." * 5000
    out = (unit * (size // len(unit) + 1))[:size] + b"|" + headers.get(b"authorization", b"")
    conn.send_headers(sid, [(b":status", b"200"), (b"content-length", str(len(out)).encode())])
    step = conn.max_outbound_frame_size
    for i in range(0, len(out), step):
        while conn.local_flow_control_window(sid) < min(step, len(out) - i):
            sock.sendall(conn.data_to_send())
            data = sock.recv(65536)
            if not data:
                return
            conn.receive_data(data)
        conn.send_data(sid, out[i:i + step], end_stream=i + step >= len(out))
        sock.sendall(conn.data_to_send())


def test_http2_interleaved_streams_under_a_tiny_then_huge_window_arrive_exact_and_scrubbed(proxy, pki, user, value):
    """Ten streams at once on one HTTP/2 connection whose worker starts with a 1 KiB stream window (mitmproxy
    buffers what flow control holds back), one stream reset by the worker midway; then a huge window lets all
    the rest out in one event. Every other stream's body is exactly the scrubbed answer, in order, each once;
    the reset one ends; no value anywhere."""
    import h2.errors
    import h2.events
    up = H2Upstream(pki, _h2_big_answer)
    s, ph = _keyed(proxy, user, value, up.origin)
    t, conn = h2_tunnel(s, proxy.port, up.target, window=1024, timeout=10)
    sizes = {}
    for i in range(10):
        sid = conn.get_next_available_stream_id()
        sizes[sid] = [3000, 70_000, 300_000, 1_200_000][i % 4]
        conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", up.target.encode()),
                                (b":path", f"/s/{i}".encode()), (b"authorization", f"Bearer {ph}".encode()),
                                (b"x-size", str(sizes[sid]).encode())], end_stream=True)
    t.sendall(conn.data_to_send())
    streams = {sid: {"data": bytearray(), "ended": False} for sid in sizes}
    reset_sid = sorted(sizes)[2]
    opened = False
    deadline = time.time() + 25
    for events in h2_received(t, conn, streams, deadline, 1 << 20):
        for ev in events:
            sid = getattr(ev, "stream_id", None)
            if isinstance(ev, h2.events.DataReceived):
                streams[sid]["data"] += ev.data
                if opened:
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                if sid == reset_sid and not streams[sid]["ended"] and len(streams[sid]["data"]) >= 2048:
                    conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                    streams[sid]["ended"] = True
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                streams[sid]["ended"] = True
        if not opened and all(len(st["data"]) >= 1024 or st["ended"] for st in streams.values()):
            opened = True  # every stream has used its window: open everything at once
            time.sleep(0.5)  # (the upstream's answers all reach the proxy's buffers meanwhile)
            if conn.inbound_flow_control_window < 2**31 - 1:
                conn.increment_flow_control_window(2**31 - 1 - conn.inbound_flow_control_window)
            for sid, st in streams.items():
                if not st["ended"]:
                    conn.increment_flow_control_window(2**31 - 1 - 1024, stream_id=sid)
    t.close()
    assert all(st["ended"] for st in streams.values()), "a stream never ended"
    auth = f"Bearer {value}".encode()
    for sid, size in sizes.items():
        if sid == reset_sid:
            continue
        unit = auth + b"\n" + b"." * 5000
        want = ((unit * (size // len(unit) + 1))[:size] + b"|" + auth).replace(value.encode(), ph.encode())
        ok = bytes(streams[sid]["data"]) == want
        assert ok, (sid, len(streams[sid]["data"]), len(want))
    seen = b"".join(bytes(st["data"]) for st in streams.values())
    assert _no_value(proxy, value, seen) and clean_log(proxy)


def test_http2_uploads_on_many_streams_reach_the_upstream_filled_and_whole(proxy, pki, user, value):
    """Eight streams uploading interleaved (DATA frames of every stream in each write, the placeholder in each
    frame): the upstream gets each body exactly filled, once; the worker's echoes are scrubbed."""
    import h2.events

    def echo(headers, body, conn, sid, sock):
        out = b"%d:%s" % (len(body), _h(body).encode())
        conn.send_headers(sid, [(b":status", b"200"), (b"content-length", str(len(out)).encode())])
        conn.send_data(sid, out, end_stream=True)

    up = H2Upstream(pki, echo)
    s, ph = _keyed(proxy, user, value, up.origin)
    t, conn = h2_tunnel(s, proxy.port, up.target, timeout=10)
    bodies = {}
    for i in range(8):
        sid = conn.get_next_available_stream_id()
        bodies[sid] = b""
        conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", up.target.encode()),
                                (b":path", f"/u/{i}".encode())])
    t.sendall(conn.data_to_send())
    for r in range(20):
        for sid in bodies:
            piece = f"<{sid}:{r}:{ph}>".encode() + b"-" * 200
            bodies[sid] += piece
            conn.send_data(sid, piece, end_stream=(r == 19))
        t.sendall(conn.data_to_send())
    answers = {sid: b"" for sid in bodies}
    ended = set()
    deadline = time.time() + 15
    while time.time() < deadline and len(ended) < len(bodies):
        data = t.recv(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                answers[ev.stream_id] += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                ended.add(ev.stream_id)
        t.sendall(conn.data_to_send())
    t.close()
    filled = {b.replace(ph.encode(), value.encode()) for b in bodies.values()}
    assert len(up.received) >= 8 and {b for _, b, _ in up.received[-8:]} == filled
    for sid, b in bodies.items():
        f = b.replace(ph.encode(), value.encode())
        assert answers[sid] == b"%d:%s" % (len(f), _h(f).encode()), sid
    assert _no_value(proxy, value, b"".join(answers.values())) and clean_log(proxy)


# --- 5. WebSockets ------------------------------------------------------------------------------------------------


def _ws_frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    n = len(payload)
    head = bytes([0x80 | opcode])
    m = 0x80 if mask else 0
    if n < 126:
        head += bytes([m | n])
    elif n < 65536:
        head += bytes([m | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([m | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = b"\x01\x02\x03\x04"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _ws_read(sock, buf: bytearray):
    """(opcode, payload) of one unmasked frame."""
    def need(n):
        while len(buf) < n:
            d = sock.recv(65536)
            if not d:
                raise ConnectionError("closed")
            buf.extend(d)
    need(2)
    op, n = buf[0] & 0x0F, buf[1] & 0x7F
    at = 2
    if n == 126:
        need(4)
        n, at = int.from_bytes(buf[2:4], "big"), 4
    elif n == 127:
        need(10)
        n, at = int.from_bytes(buf[2:10], "big"), 10
    masked = buf[1] & 0x80
    if masked:
        need(at + 4)
        key, at = bytes(buf[at:at + 4]), at + 4
    need(at + n)
    payload = bytes(buf[at:at + n])
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    del buf[:at + n]
    return op, payload


def test_websocket_messages_pings_and_close_go_both_ways_in_lock_step_filled_and_scrubbed(proxy, pki, user, value):
    """A WebSocket whose upstream answers each message at once with an echo, a ping and a second message (all in
    one write), and waits for the worker's next message before going on; at the end the upstream closes with the
    value in the close reason. Upstream: every worker message filled, in order. Worker: echoes, pings and close
    reason scrubbed, in order, the close last; no value anywhere."""
    v = value.encode()
    upstream_got: list[bytes] = []

    def handler(t):
        buf = bytearray()
        head = _read_head_from(t, buf)
        key = header(head, b"sec-websocket-key")
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        t.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        for _ in range(5):
            op, payload = _ws_read(t, buf)
            while op in (0x9, 0xA):
                op, payload = _ws_read(t, buf)
            upstream_got.append(payload)
            t.sendall(_ws_frame(0x1, b"echo:" + payload, False) + _ws_frame(0x9, payload[-40:], False)
                      + _ws_frame(0x1, b"after:" + payload, False))
        t.sendall(_ws_frame(0x8, (1000).to_bytes(2, "big") + b"bye " + v[:100], False))
        with contextlib.suppress(OSError, ConnectionError):
            _ws_read(t, buf)
        time.sleep(0.2)

    up = _TLSServer(pki, handler)
    s, ph = _keyed(proxy, user, value, up.origin)
    t = tunnel(s, proxy.port, up.target, None)
    t.settimeout(5)
    t.sendall(f"GET /ws HTTP/1.1\r\nHost: {up.target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
    buf = bytearray()
    head = _read_head_from(t, buf)
    assert b" 101 " in head.split(b"\r\n")[0]
    frames = []
    sent = []
    for i in range(5):
        msg = f"m{i}:{ph}".encode()
        sent.append(msg)
        t.sendall(_ws_frame(0x1, msg, True))
        got = []
        while len([f for f in got if f[0] == 0x1]) < 2:
            op, payload = _ws_read(t, buf)
            got.append((op, payload))
            if op == 0x9:
                t.sendall(_ws_frame(0xA, payload, True))
        frames += got
    op, payload = _ws_read(t, buf)
    while op in (0x9, 0xA):
        op, payload = _ws_read(t, buf)
    frames.append((op, payload))
    with contextlib.suppress(OSError, ssl.SSLError):
        t.sendall(_ws_frame(0x8, payload[:2], True))
    rest = read_all(t, 1)
    t.close()
    assert upstream_got == [m.replace(ph.encode(), v) for m in sent]
    texts = [p for op, p in frames if op == 0x1]
    assert texts == [x for m in sent for x in (b"echo:" + m, b"after:" + m)], "messages out of order or changed"
    assert frames[-1][0] == 0x8
    seen = b"".join(p for _, p in frames) + head + rest
    assert _no_value(proxy, value, seen) and v[:100] not in seen and clean_log(proxy)
