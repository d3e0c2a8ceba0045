"""Named attacks found by red-teaming the core proxy; each was a real failure once and is a
regression test now. Each checks what the upstream received and what the worker received."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import time
import zlib

import brotli
import pytest

from conftest import curl
from upstream import RawUpstream, header, raw_response
from wire import connect, one_request, read_all, tunnel

try:
    from compression import zstd
except ImportError:
    from backports import zstd


def no_value(value: str, *seen: bytes) -> bool:
    return all(value.encode() not in s for s in seen)


@pytest.fixture
def echo_raw(pki):
    """An upstream that answers with the raw request body, byte for byte, and no Content-Encoding."""
    return RawUpstream(pki, lambda head, body, sock: raw_response(body))


def _request(target: str, path: str, extra: str = "", body: bytes = b"", method: str = "GET") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    return (f"{method} {path} HTTP/1.1\r\nHost: {target}\r\n{extra}{length}Connection: close\r\n\r\n").encode() + body


# --- the worker must not get the value back ---------------------------------------------------

def test_websocket_frames_from_upstream_are_scrubbed(proxy, pki, user, value):
    def answer(head, body, sock):
        key = header(head, b"sec-websocket-key")
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        payload = b"you sent " + header(head, b"x-key")
        sock.sendall(bytes([0x81, len(payload)]) + payload)
        time.sleep(0.4)  # the socket stays open while the frames reach the worker
    up = RawUpstream(pki, answer)
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    target = f"127.0.0.1:{up.port}"
    t = tunnel(s, proxy.port, target, None)
    t.sendall(_request(target, "/ws", "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                       f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Key: {s['env']['K']}\r\n")
             .replace(b"Connection: close\r\n", b""))
    out = read_all(t, 3)
    assert header(up.received[0][0], b"x-key") == value.encode()  # the upstream got the value
    assert s["env"]["K"].encode() in out  # the worker got the frame, scrubbed back to the placeholder
    assert no_value(value, out, proxy.visible_to_operators())


def test_raw_tcp_after_other_upgrade_is_closed(proxy, pki, user, value):
    def answer(head, body, sock):
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\n")
        sock.sendall(b"raw: " + header(head, b"x-key"))
        time.sleep(0.4)  # the socket stays open while the frames reach the worker
    up = RawUpstream(pki, answer)
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    target = f"127.0.0.1:{up.port}"
    out = one_request(s, proxy.port, target, None,
                      _request(target, "/x", f"Upgrade: foo\r\nX-Key: {s['env']['K']}\r\n"))
    assert no_value(value, out, proxy.visible_to_operators())


@pytest.mark.parametrize("coding, compress", [
    ("gzip", gzip.compress), ("deflate", zlib.compress), ("br", brotli.compress), ("zstd", zstd.compress),
])
def test_compressed_request_body_echoed_raw(coding, compress, proxy, echo_raw, user, value):
    proxy.add_secret(user, "K", value, echo_raw.origin)
    s = proxy.issue(user=user)
    target = f"127.0.0.1:{echo_raw.port}"
    body = compress(f"data={s['env']['K']}".encode())
    out = one_request(s, proxy.port, target, None, _request(
        target, "/blob", f"Content-Encoding: {coding}\r\nContent-Type: text/plain\r\n", body, "POST"))
    head, body_sent = echo_raw.received[-1]
    assert body_sent == f"data={value}".encode() and header(head, b"content-encoding") == b""
    returned = out.partition(b"\r\n\r\n")[2]
    assert returned == f"data={s['env']['K']}".encode()
    assert no_value(value, out, proxy.visible_to_operators())


@pytest.mark.parametrize("coding", ["base64", "hex", "bz2", "compress", "gzip, rot13"])
def test_unsupported_request_encoding_is_refused(coding, proxy, echo_raw, user, value):
    proxy.add_secret(user, "K", value, echo_raw.origin)
    s = proxy.issue(user=user)
    target = f"127.0.0.1:{echo_raw.port}"
    body = base64.b64encode(f"data={s['env']['K']}".encode())
    out = one_request(s, proxy.port, target, None, _request(
        target, "/blob", f"Content-Encoding: {coding}\r\n", body, "POST"))
    assert out.startswith(b"HTTP/1.1 400") and b"unreadable_body" in out and b"not supported" in out
    assert echo_raw.received == []


@pytest.mark.e2e  # the memory of the proxy process
def test_decompression_bomb_is_refused_with_flat_memory(proxy, echo_raw, user):
    s = proxy.issue(user=user)
    target = f"127.0.0.1:{echo_raw.port}"
    bomb = gzip.compress(b"\0" * (512 * 1024 * 1024), compresslevel=9)
    rss = lambda: int(next(l for l in open(f"/proc/{proxy.proc.pid}/status") if l.startswith("VmRSS")).split()[1])
    before = rss()
    out = one_request(s, proxy.port, target, None, _request(
        target, "/bomb", "Content-Encoding: gzip\r\n", bomb, "POST"))
    assert out.startswith(b"HTTP/1.1 400") and b"larger than" in out
    assert echo_raw.received == []
    assert rss() - before < 200 * 1024  # KiB: far below the 512 MiB the bomb expands to


@pytest.mark.parametrize("reply", [
    lambda key: b"HTTP/1.1 2" + key + b" OK\r\nContent-Length: 0\r\n\r\n",
    lambda key: b"HTTP/1.1 200 OK\r\nX-Echo: " + key + b"\r\nContent-Length: zz" + key + b"\r\n\r\n",
], ids=["bad-status-line", "bad-content-length"])
def test_malformed_upstream_reply_quoting_the_value(reply, proxy, pki, user, value):
    up = RawUpstream(pki, lambda head, body, sock: reply(header(head, b"x-key")))
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    target = f"127.0.0.1:{up.port}"
    out = one_request(s, proxy.port, target, None, _request(target, "/x", f"X-Key: {s['env']['K']}\r\n"))
    assert header(up.received[0][0], b"x-key") == value.encode()
    assert no_value(value, out, proxy.visible_to_operators())


@pytest.mark.parametrize("coding", ["gzip, gzip", "x-unknown", "gzip"])
def test_response_that_cannot_be_decoded_is_withheld(coding, proxy, pki, user, value):
    up = RawUpstream(pki, lambda head, body, sock: raw_response(
        b"not really compressed " + header(head, b"x-key"), extra=f"Content-Encoding: {coding}\r\n".encode()))
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    target = f"127.0.0.1:{up.port}"
    out = one_request(s, proxy.port, target, None, _request(target, "/x", f"X-Key: {s['env']['K']}\r\n"))
    assert out.startswith(b"HTTP/1.1 502") and b"unscrubbable_response" in out
    assert no_value(value, out, proxy.visible_to_operators())


@pytest.mark.parametrize("coding, compress", [("gzip", gzip.compress), ("br", brotli.compress),
                                              ("zstd", zstd.compress), ("identity", lambda b: b)])
def test_echo_in_compressed_response_is_scrubbed(coding, compress, proxy, pki, user, value):
    up = RawUpstream(pki, lambda head, body, sock: raw_response(
        compress(b'{"echo": "' + header(head, b"x-key") + b'"}'), extra=f"Content-Encoding: {coding}\r\n".encode()))
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    r = curl(s, up.origin + "/x", "--compressed", "-H", f"X-Key: {s['env']['K']}")
    assert r.status == 200 and json.loads(r.body) == {"echo": s["env"]["K"]}
    assert no_value(value, r.seen(), proxy.visible_to_operators())


def test_non_ascii_value_echoed_as_json_escapes(proxy, pki, user):
    value = f"sk-\u00fc\u00f1\u00ef-{os.urandom(8).hex()}"
    up = RawUpstream(pki, lambda head, body, sock: raw_response(json.dumps({"v": json.loads(body)["k"]}).encode()))
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    target = f"127.0.0.1:{up.port}"
    body = json.dumps({"k": s["env"]["K"]}).encode()
    out = one_request(s, proxy.port, target, None, _request(
        target, "/x", "Content-Type: application/json\r\n", body, "POST"))
    assert json.loads(up.received[0][1]) == {"k": value}
    assert json.dumps(value)[1:-1].encode() not in out and s["env"]["K"].encode() in out


# --- the value must not go anywhere else ---------------------------------------------------------

def test_unicode_digit_port_in_host_header(proxy, make_upstream, user, value):
    api, evil = make_upstream("127.0.0.1"), make_upstream("127.0.0.2")
    proxy.add_secret(user, "K", value, api.origin)
    s = proxy.issue(user=user)
    target = f"127.0.0.2:{evil.port}"
    out = one_request(s, proxy.port, target, None,
                      f"GET /x HTTP/1.1\r\nHost: 127.0.0.2:\u00b2\r\nX-Key: {s['env']['K']}\r\n"
                      f"Connection: close\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 403") and b"host_mismatch" in out
    assert evil.received == [] and no_value(value, out, evil.seen())
    assert "Traceback" not in proxy.log.read_text()


def test_unresolvable_destination_is_refused(proxy, user):
    s = proxy.issue(user=user)
    sock, out = connect(s, proxy.port, "no-such-host.invalid:443")
    out += read_all(sock, 3)
    assert out.startswith(b"HTTP/1.1 502") and b"destination_unresolved" in out


def test_dns_is_resolved_once_and_the_checked_address_dialled(monkeypatch):
    """DNS rebinding: whatever a second lookup would say, the dial goes to the address that was checked."""
    import asyncio
    import socket as _socket

    from mitmproxy import connection
    from mitmproxy.proxy import server_hooks

    from sealgate.dial import Dialer
    from sealgate.egress import EgressPolicy

    answers = [["93.184.215.14"], ["127.0.0.1"]]  # a public address first, loopback on any later lookup
    calls = []

    async def getaddrinfo(host, port, **kw):
        calls.append(host)
        return [(_socket.AF_INET, _socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[min(len(calls) - 1, 1)]]

    async def run():
        asyncio.get_running_loop().getaddrinfo = getaddrinfo
        dialer = Dialer(EgressPolicy())
        server = connection.Server(address=("rebind.example", 443))
        data = server_hooks.ServerConnectionHookData(server=server, client=connection.Client(
            peername=("127.0.0.1", 5555), sockname=("127.0.0.1", 8080)))
        await dialer.server_connect(data)
        return dialer, server, data

    dialer, server, data = asyncio.run(run())
    assert calls == ["rebind.example"]  # one lookup
    assert server.address == ("93.184.215.14", 443) and server.error is None  # dialled: what was checked
    dialer.dialled(data.server)
    assert server.address == ("rebind.example", 443)  # and named again for mitmproxy's bookkeeping


def test_rebinding_to_a_blocked_address_is_refused():
    import asyncio
    import socket as _socket

    from mitmproxy import connection
    from mitmproxy.proxy import server_hooks

    from sealgate.dial import Dialer

    async def getaddrinfo(host, port, **kw):
        return [(_socket.AF_INET, _socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]

    async def run():
        asyncio.get_running_loop().getaddrinfo = getaddrinfo
        server = connection.Server(address=("metadata.example", 80))
        await Dialer().server_connect(server_hooks.ServerConnectionHookData(server=server, client=connection.Client(
            peername=("127.0.0.1", 5555), sockname=("127.0.0.1", 8080))))
        return server
    server = asyncio.run(run())
    assert server.error.startswith("destination_blocked") and server.address == ("metadata.example", 80)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.e2e  # the memory of the proxy process
@pytest.mark.parametrize("credentials", [True, False])
def test_a_200_mib_compressed_upload_is_refused_before_it_is_held(proxy, pki, user, credentials):
    """A compressed body is held whole to be decoded, and mitmproxy reads a whole body before it sends
    an answer set early: a large one (with or without credentials) is closed at its head instead."""
    import socket
    import threading
    up = RawUpstream(pki, lambda h, b, s: raw_response(b"ok"), host="127.0.0.2", keep_bodies=False)
    size = 200 << 20
    head = (f"POST /up HTTP/1.1\r\nHost: {up.target}\r\nContent-Encoding: gzip\r\nContent-Length: {size}\r\n\r\n"
            .encode())
    if credentials:
        sock = tunnel(proxy.issue(user=user), proxy.port, up.target, None)
    else:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
        head = head.replace(b"POST /up", f"POST http://{up.target}/up".encode())
    base, peak, stop = _rss(proxy.proc.pid), [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss(proxy.proc.pid))
            time.sleep(0.05)
    threading.Thread(target=watch, daemon=True).start()
    sock.settimeout(30)
    chunk = os.urandom(1 << 20)
    try:
        sock.sendall(head)
        for _ in range(size >> 20):
            sock.sendall(chunk)
    except OSError:
        pass  # closed at its head, as it should be
    stop.set()
    sock.close()
    assert peak[0] - base < 64 << 20, f"the proxy grew by {(peak[0] - base) >> 20} MiB"
    assert up.body_sizes == []
    audit = proxy.cli("audit", "--json").stdout
    assert ("unreadable_body" if credentials else "proxy_auth_required") in audit
