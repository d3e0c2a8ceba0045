"""Red team (helper, session 19): commit 9551da8 replaced mitmproxy's Headers.get and Headers.__contains__
(internals.quick_header_lookups), Connection.__eq__ (quick_connection_equality) and Context.fork
(quick_context_forks), and defers each decision's log line to after the event that made it (record.LaterLines).

Probes: the replacements answer as the originals (kept as __wrapped__) for hostile header names and for the framing
and smuggling decisions mitmproxy derives from them; the real proxy, with real TLS to real loopback upstreams, on
mixed-case, duplicated, non-UTF-8 and folded framing headers, Host, Expect, Connection and Proxy-Authorization
variants, over HTTP/1 and HTTP/2 (what the upstream received and what the worker received); and the deferred log
line: once per decision, in order, under concurrency, when the scrub filter raises, and at shutdown of a real
`sealgate run`.

Values are made per test; asserts test booleans and lengths, so no value reaches the output. Each test's docstring
says what it tries."""

from __future__ import annotations

import asyncio
import concurrent.futures
import base64
import contextlib
import io
import logging
import os
import re
import signal
import socket
import time

import pytest
from conftest import make_proxy
from sealgate import internals, record
from upstream import H2Upstream, RawUpstream, raw_response
from wire import (  # noqa: F401
    clean_log,
    connect,
    credential_header,
    h2_received,
    h2_tunnel,
    log_mark,
    read_all,
    read_head,
    tunnel,
)

# --- helpers ------------------------------------------------------------------------------------------------------


def _ok(head, body, sock):
    return raw_response(b"ok")


@pytest.fixture
def up(pki):
    return RawUpstream(pki, _ok)


def _keyed(proxy, user: str, value: str, origin: str, name: str = "K") -> tuple[dict, str]:
    proxy.add_secret(user, name, value, origin)
    s = proxy.issue(user=user)
    return s, s["env"][name]


def _status(raw: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    return int(m.group(1)) if m else 0


def _raw(s: dict, proxy, target: str, request: bytes, timeout: float = 3) -> bytes:
    t = tunnel(s, proxy.port, target, None)
    t.sendall(request)
    out = read_all(t, timeout)
    t.close()
    return out


def _no_value(proxy, value: str, *seen: bytes) -> bool:
    v = value.encode()
    return all(v not in s for s in seen) and v not in proxy.visible_to_operators()


def _lines(proxy, token: str, want: int, timeout: float = 5) -> list[str]:
    """The proxy's `sealgate decision=` lines that hold token, once there are want of them (or timeout)."""
    deadline = time.time() + timeout
    while True:
        text = proxy.log.read_text(errors="replace") if proxy.log.exists() else ""
        got = [ln for ln in text.splitlines() if "sealgate decision=" in ln and token in ln]
        if len(got) >= want or time.time() > deadline:
            return got
        time.sleep(0.05)


@contextlib.contextmanager
def _originals():
    """mitmproxy's own Headers.get/__contains__, Connection.__eq__ and Context.fork, for the block's length."""
    from mitmproxy import connection, http
    from mitmproxy.proxy import context
    _install()
    H, C, X = http.Headers, connection.Connection, context.Context
    saved = H.get, H.__contains__, C.__eq__, X.fork
    H.get, H.__contains__, C.__eq__, X.fork = (f.__wrapped__ for f in saved)
    try:
        yield
    finally:
        H.get, H.__contains__, C.__eq__, X.fork = saved


def _install() -> None:
    internals.quick_header_lookups()
    internals.quick_connection_equality()
    internals.quick_context_forks()


def _outcome(f, *args):
    try:
        return ("ok", f(*args))
    except Exception as e:  # noqa: BLE001
        return ("raise", type(e).__name__, str(e))


# --- in-process: the replacements answer as the originals ---------------------------------------------------------

_FIELDS = [
    (b"Host", b"a.example"), (b"host", b"b.example"), (b"Content-Length", b"5"), (b"content-LENGTH", b"6"),
    (b"Transfer-Encoding", b"chunked"), (b"TRANSFER-ENCODING", b"identity"), (b"X-Raw", b"\xff\xfe\x80"),
    (b"X-\xc9", b"non-ascii name"), (b"x-\xc9", b"lower non-ascii"), (b"X-\xe9", b"latin-1 lower"), (b"", b"empty name"),
    (b"X-Empty", b""), (b"x-empty", b""), (b"Expect", b"100-continue"), (b"Connection", b"Upgrade, close"),
    (b"Upgrade", b"websocket"), (b"Proxy-Authorization", b"Basic x"), (b"proxy-authorization", b"Basic y"),
    (b"Transfer-Encoding ", b"trailing space"), (b" Content-Length", b"leading space"), (b"K\xc4\xb0", b"dotted I"),
]
_KEYS = [
    "host", "HOST", b"Host", b"hOsT", "content-length", b"CONTENT-LENGTH", "transfer-encoding", "Transfer-Encoding ",
    " content-length", "x-raw", "X-\udcc9", "x-\udcc9", b"X-\xc9", b"x-\xc9", "X-\xc9", "x-\xe9", "X-\xe9", b"X-\xe9",
    "", b"", "x-empty", "expect", "Expect", "connection", "upgrade", "proxy-authorization", "absent", b"absent",
    "KI\u0307", "ki\u0307", "K\u0130", "k\u0130", b"k\xc4\xb0", "\udcff", "x-\x00",
]


def test_header_lookups_answer_as_mitmproxys_for_case_duplicates_non_utf8_surrogates_and_empty_names():
    """Headers.get (with and without a default) and `in` give mitmproxy's (Mapping's) answers for every name
    kind: str and bytes, any case, repeated (joined by ", "), non-UTF-8 bytes and their surrogateescape str,
    non-ASCII case pairs (bytes.lower is ASCII only), empty names and values, names with spaces."""
    from mitmproxy import http
    _install()
    h = http.Headers(_FIELDS)
    get, contains = http.Headers.get, http.Headers.__contains__
    for key in _KEYS:
        assert _outcome(get, h, key) == _outcome(get.__wrapped__, h, key), key
        assert _outcome(get, h, key, "dflt") == _outcome(get.__wrapped__, h, key, "dflt"), key
        assert _outcome(contains, h, key) == _outcome(contains.__wrapped__, h, key), key
    empty = http.Headers()
    for key in ("host", b"x", ""):
        assert get(empty, key) is None and get(empty, key, 7) == 7 and not contains(empty, key)


@pytest.mark.parametrize("key", [1, None, 1.5, bytearray(b"host"), memoryview(b"host"), ("host",), object()])
def test_header_lookups_fail_as_mitmproxys_for_names_that_are_neither_str_nor_bytes(key):
    """An odd key type raises the same exception class as mitmproxy's lookup (or answers the same), for get, get
    with a default, `in`, and `del` (which asks `in` first)."""
    from mitmproxy import http
    _install()
    h = http.Headers(_FIELDS)

    def outcome(f, *a):
        r = _outcome(f, *a)
        return r[:2]
    assert outcome(http.Headers.get, h, key) == outcome(http.Headers.get.__wrapped__, h, key)
    assert outcome(http.Headers.get, h, key, 3) == outcome(http.Headers.get.__wrapped__, h, key, 3)
    assert outcome(http.Headers.__contains__, h, key) == outcome(http.Headers.__contains__.__wrapped__, h, key)
    patched = outcome(lambda: h.copy().__delitem__(key))
    with _originals():
        original = outcome(lambda: h.copy().__delitem__(key))
    assert patched == original


_HEADS = [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\ncontent-length: 5\r\nTRANSFER-ENCODING: Chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ncontent-length: 6\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nCONTENT-LENGTH: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \xff5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunk\xffed\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \xe2\x80\x8bchunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked \r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,chunked\r\n\r\n",
    b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nCONNECTION: close\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\nconnection: KEEP-ALIVE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUPGRADE: WebSocket\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nEXPECT: 100-Continue\r\nContent-Length: 3\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-\xc9: 1\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
]


def _framing(head: bytes):
    from mitmproxy.net.http import http1, validate
    from mitmproxy.proxy.layers.http import _http1
    req = _outcome(http1.read_request_head, head.split(b"\r\n")[:-2])
    if req[0] != "ok":
        return ("head", req[1])
    r = req[1]
    h = r.headers
    return (
        _outcome(validate.validate_headers, r),
        _outcome(http1.expected_http_body_size, r),
        _outcome(http1.connection_close, r.http_version, h),
        _outcome(lambda: (r.host_header, r.authority, r.pretty_host)),
        _outcome(lambda: [(n, h.get(n), n in h) for n in ("expect", "upgrade", "connection", "proxy-authorization",
                                                          "content-encoding", "host", ":authority")]),
        _outcome(getattr(_http1, "expected_http_body_size", lambda *_: None), r),
    )


@pytest.mark.parametrize("head", _HEADS)
def test_framing_and_smuggling_decisions_are_mitmproxys_own(head):
    """What mitmproxy decides from a head's headers (validate_headers: CL with TE, duplicated or conflicting CL,
    TE lists; expected_http_body_size; connection_close; host/authority; the Expect, Upgrade, Connection lookups)
    is the same with the replaced lookups as with mitmproxy's originals, for mixed-case, repeated, non-UTF-8 and
    odd framing headers."""
    _install()
    quick = _framing(head)
    with _originals():
        original = _framing(head)
    assert quick == original


def test_connection_equality_and_context_forks_answer_as_mitmproxys():
    """Connection.__eq__ as mitmproxy's for the same object, another Client/Server with the same or another id,
    a Client against a Server with the same id, a subclass, a duck-typed object with an id, and non-connections;
    the hash is still the id's. Context.fork gives a context with the same client, options, server (the same
    object) and a copy of the layers, and nothing more or less than mitmproxy's fork."""
    from mitmproxy import connection, options
    from mitmproxy.proxy import context
    _install()
    c1 = connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=1)
    c2 = connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=1)
    s1 = connection.Server(address=("127.0.0.1", 3))
    s_same = connection.Server(address=("127.0.0.1", 4))
    s_same.id = c1.id

    class Sub(connection.Server):
        pass
    sub = Sub(address=None)
    sub.id = s1.id

    class Duck:
        id = c1.id
    others = [c1, c2, s1, s_same, sub, Duck(), None, c1.id, 0, object()]
    eq = connection.Connection.__eq__
    for a in (c1, c2, s1, s_same, sub):
        for b in others:
            assert _outcome(eq, a, b) == _outcome(eq.__wrapped__, a, b)
            assert (a == b) == eq.__wrapped__(a, b) and (a != b) == (not eq.__wrapped__(a, b))
    assert hash(c1) == hash(c1.id) and len({c1, s_same}) == 1 and len({s1, sub, c2}) == 2
    ctx = context.Context(c1, options.Options())
    ctx.server = s1
    ctx.layers = ["a", "b"]
    quick = ctx.fork()
    with _originals():
        original = ctx.fork()
    assert type(quick) is type(original) is context.Context
    assert vars(quick).keys() == vars(original).keys()
    assert quick.client is c1 and quick.options is ctx.options and quick.server is s1
    assert quick.layers == ["a", "b"] and quick.layers is not ctx.layers
    quick.layers.append("c")
    assert ctx.layers == ["a", "b"]


def test_later_lines_run_once_in_order_and_at_once_outside_a_loop():
    """The deferred log lines: outside an event loop written at once; inside, after the running callback, each
    line exactly once and in the order the decisions were made, even when one write raises (it is reported
    to the loop once the others are written)."""
    got: list[str] = []

    def boom(line):
        if line == "2":
            raise RuntimeError("write failed")
        got.append(line)

    lines = record.LaterLines(boom)
    lines.add("now")
    assert got == ["now"]
    got.clear()

    async def main():
        loop = asyncio.get_running_loop()
        errors: list = []
        loop.set_exception_handler(lambda loop, context: errors.append(context))
        for i in range(5):
            lines.add(str(i))
        assert got == []  # not while the event runs
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return errors
    errors = asyncio.run(main())
    assert got == ["0", "1", "3", "4"] and len(errors) == 1


# --- the real proxy: HTTP/1 framing, Host, Expect, Connection, Proxy-Authorization ----------------------------------

_SMUGGLE = [
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
    b"content-length: 4\r\ntransfer-ENCODING: Chunked\r\n",
    b"Transfer-Encoding: chunked\r\nCONTENT-LENGTH: 4\r\n",
    b"Content-Length: 4\r\ncontent-length: 60\r\n",
    b"Content-Length: 60\r\nContent-Length: 4\r\n",
    b"Content-Length: 4, 60\r\n",
    b"Transfer-Encoding: chunked\r\ntransfer-encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
    b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunk\xffed\r\nContent-Length: 4\r\n",
    b"Transfer-Encoding: \xc2\xa0chunked\r\nContent-Length: 4\r\n",
    b"Transfer-Encoding: xchunked\r\nContent-Length: 4\r\n",
    b"Transfer-Encoding:\r\n chunked\r\nContent-Length: 4\r\n",
    b"Content-Length: 4\r\nTransfer-Encoding:\r\n chunked\r\n",
    b"Transfer-Encoding : chunked\r\nContent-Length: 4\r\n",
    b"Transfer-Encoding\t: chunked\r\nContent-Length: 4\r\n",
    b"Transfer_Encoding: chunked\r\nContent-Length: 4\r\n",
    b"Content-Length: 0x4\r\n",
    b"Content-Length: \xd9\xa4\r\n",
]


@pytest.mark.parametrize("framing", _SMUGGLE)
def test_ambiguous_framing_smuggles_no_request_past_the_check(proxy, up, user, value, framing):
    """A POST whose framing headers are mixed-case, duplicated, conflicting, non-UTF-8, folded or misspelt, with
    a second request hidden in what one reading calls the body (it carries a placeholder the upstream's origin may
    not have). Whatever the proxy makes of it, the upstream never sees the hidden request, the placeholder or the
    value, and the worker sees no value; every request the upstream receives is one the proxy framed itself."""
    s, ph = _keyed(proxy, user, value, "https://allowed.example")
    hidden = (f"GET /smuggled?k={ph} HTTP/1.1\r\nHost: {up.target}\r\nAuthorization: Bearer {ph}\r\n"
              "Content-Length: 0\r\n\r\n").encode()
    body = b"0\r\n\r\n" + hidden
    req = (f"POST /front HTTP/1.1\r\nHost: {up.target}\r\n".encode() + framing
           + b"Connection: close\r\n\r\n" + body)
    got = _raw(s, proxy, up.target, req, timeout=2)
    seen = up.seen()
    assert b"/smuggled" not in b"\n".join(h for h, _ in up.received)
    assert ph.encode() not in seen and _no_value(proxy, value, seen, got)
    for head, _ in up.received:  # what went upstream was framed by the proxy: one length, no TE beside it
        names = [ln.split(b":", 1)[0].strip().lower() for ln in head.split(b"\r\n")[1:]]
        assert not (b"content-length" in names and b"transfer-encoding" in names)
        assert names.count(b"content-length") <= 1 and names.count(b"transfer-encoding") <= 1
    assert _status(got) != 0 or not up.received
    assert clean_log(proxy)


@pytest.mark.parametrize("hosts", [
    b"Host: {up}\r\nhost: evil.example\r\n",
    b"host: evil.example\r\nHOST: {up}\r\n",
    b"HOST: evil.example\r\n",
    b"Host: {up}, evil.example\r\n",
    b"Host: {up}\r\nHost: {up}\r\n",
    b"Host: \xffevil\r\n",
    b"",
])
def test_host_header_variants_never_carry_a_value_elsewhere(proxy, up, user, value, hosts):
    """The value is allowed for this upstream; the request's Host header(s) disagree in case, count or bytes
    (or are missing). A placeholder-bearing request goes only when the Host the proxy reads is the upstream's own
    (one header, same origin): otherwise host_mismatch, nothing sent. The worker never sees the value."""
    s, ph = _keyed(proxy, user, value, up.origin)
    head = hosts.replace(b"{up}", up.target.encode())
    req = (b"GET /h HTTP/1.1\r\n" + head + f"X-Key: {ph}\r\nConnection: close\r\n\r\n".encode())
    got = _raw(s, proxy, up.target, req)
    names_values = [ln.split(b":", 1) for ln in head.split(b"\r\n") if ln]
    one_good = all(v.strip() == up.target.encode() for _, v in names_values)  # (the same Host twice is the same)
    if one_good:
        assert _status(got) == 200 and len(up.received) == 1
    else:
        assert _status(got) in (400, 403) and not up.received, got[:200]
    assert _no_value(proxy, value, got)


def test_placeholders_in_headers_of_any_case_and_repeats_are_filled_only_for_the_allowed_origin(
        proxy, pki, user, value):
    """The same placeholder in X-Key, x-key, X-KEY and an AUTHORIZATION header, and in a Basic credential: filled in
    every one for the allowed upstream (which receives each header as sent, in order); refused with nothing sent for
    another upstream; the worker sees no value in either answer."""
    allowed, other = RawUpstream(pki, _ok), RawUpstream(pki, _ok)
    s, ph = _keyed(proxy, user, value, allowed.origin)
    basic = base64.b64encode(f"u:{ph}".encode()).decode()
    hdrs = f"X-Key: {ph}\r\nx-key: a{ph}\r\nX-KEY: {ph}b\r\nAUTHORIZATION: Bearer {ph}\r\nproxy-connection: x\r\n"
    for target, ok in ((allowed, True), (other, False)):
        req = (f"GET /p HTTP/1.1\r\nHost: {target.target}\r\n{hdrs}X-B: Basic {basic}\r\n"
               "Connection: close\r\n\r\n").encode()
        got = _raw(s, proxy, target.target, req)
        assert _no_value(proxy, value, got) and ph.encode() not in target.seen()
        if ok:
            assert _status(got) == 200 and len(target.received) == 1
            head = target.received[0][0]
            v = value.encode()
            assert head.count(v) == 4
            assert b"x-key: a" + v.lower() in head.lower()  # (the name in whatever case it is sent on)
        else:
            assert _status(got) == 403 and not target.received


def test_expect_100_continue_in_any_case_sends_no_body_that_is_refused(proxy, up, user, value):
    """`EXPECT: 100-Continue` with a body holding a placeholder not allowed for the upstream: refused (403), the
    upstream gets nothing, before or after any 100; the same head for the allowed origin: the filled body arrives
    once, whole."""
    s, ph = _keyed(proxy, user, value, "https://allowed.example")
    body = f'{{"k":"{ph}"}}'.encode()
    t = tunnel(s, proxy.port, up.target, None)
    t.sendall(f"POST /e HTTP/1.1\r\nHost: {up.target}\r\nEXPECT: 100-Continue\r\ncontent-LENGTH: {len(body)}\r\n"
              "Connection: close\r\n\r\n".encode())
    first = read_all(t, 1)
    t.sendall(body)
    got = first + read_all(t, 2)
    t.close()
    assert b" 403 " in got and not up.received and _no_value(proxy, value, got)
    s2, ph2 = _keyed(proxy, user, value, up.origin, "K2")
    body2 = f'{{"k":"{ph2}"}}'.encode()
    t = tunnel(s2, proxy.port, up.target, None)
    t.sendall(f"POST /e HTTP/1.1\r\nHost: {up.target}\r\nexpect: 100-CONTINUE\r\nContent-Length: {len(body2)}\r\n"
              "Connection: close\r\n\r\n".encode())
    read_all(t, 0.5)
    t.sendall(body2)
    got2 = read_all(t, 2)
    t.close()
    assert b" 200 " in got2 and len(up.received) == 1 and up.received[0][1] == f'{{"k":"{value}"}}'.encode()
    assert _no_value(proxy, value, got2)


@pytest.mark.parametrize("close", [b"CONNECTION: close", b"connection: close", b"Connection: keep-alive, close",
                                   b"Connection: keep-alive\r\nconnection: close"])
def test_connection_close_in_any_case_ends_the_exchange_and_nothing_pipelined_after_goes(proxy, up, user, value,
                                                                                         close):
    """A request saying Connection: close (the name in any case, in a list, or in a repeated header) followed at once by a
    pipelined second request with a placeholder (allowed for this upstream): the first is answered, the second is
    never sent upstream (the connection ends after the first)."""
    s, ph = _keyed(proxy, user, value, up.origin)
    first = f"GET /one HTTP/1.1\r\nHost: {up.target}\r\n".encode() + close + b"\r\n\r\n"
    second = f"GET /two?k={ph} HTTP/1.1\r\nHost: {up.target}\r\n\r\n".encode()
    got = _raw(s, proxy, up.target, first + second)
    assert got.count(b"HTTP/1.1 ") == 1 and _status(got) == 200
    assert [h.split(b" ")[1] for h, _ in up.received] == [b"/one"]
    assert _no_value(proxy, value, got)


@pytest.mark.parametrize("auth", ["proxy-authorization", "PROXY-AUTHORIZATION", "Proxy-authorization"])
def test_proxy_authorization_in_any_case_authenticates_and_is_never_forwarded(proxy, up, user, auth):
    """The session credential under a header name of any case: the tunnel opens and the plain request through it
    is answered; the credential never reaches the upstream."""
    s = proxy.issue(user=user)
    cred = credential_header(s).split(":", 1)[1].strip()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.sendall(f"GET http://{up.target}/a HTTP/1.1\r\nHost: {up.target}\r\n{auth}: {cred}\r\n"
                 "Connection: close\r\n\r\n".encode())
    got = read_all(sock, 2)
    sock.close()
    t, head = connect(s, proxy.port, up.target)
    t.close()
    assert b" 200 " in head.split(b"\r\n")[0]
    assert cred.encode() not in up.seen() and b"proxy-authorization" not in up.seen().lower()
    assert _status(got) not in (0, 407)  # (plain http to an https upstream: a 502, but never a 407)


@pytest.mark.parametrize("second", ["Basic Z2FyYmFnZQ==", "{cred}", "Bearer x"])
def test_repeated_proxy_authorization_headers_open_no_tunnel_for_a_bad_one_and_are_logged_once(proxy, user, second):
    """Two Proxy-Authorization headers (a valid credential and garbage, or the same twice, or another scheme): the
    proxy answers 200 or 407 (never a 5xx), and a 407 is logged exactly once."""
    s = proxy.issue(user=user)
    cred = credential_header(s).split(":", 1)[1].strip()
    target = f"q{os.getpid()}-{time.time_ns()}.example:443"
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {cred}\r\n"
                 f"proxy-authorization: {second.replace('{cred}', cred)}\r\n\r\n".encode())
    head = read_head(sock)
    sock.close()
    code = _status(head)
    assert code in (200, 407, 403), head[:100]
    if code == 407:
        assert len(_lines(proxy, target.split(":")[0], 1)) == 1
        time.sleep(0.3)
        assert len(_lines(proxy, target.split(":")[0], 2, timeout=0.2)) == 1


# --- HTTP/2 ---------------------------------------------------------------------------------------------------------


def _h2_ok(headers, body, conn, stream_id, sock):
    conn.send_headers(stream_id, [(b":status", b"200"), (b"content-length", b"2")])
    conn.send_data(stream_id, b"ok", end_stream=True)


def test_http2_duplicated_headers_and_authority_disagreement_leak_nothing(proxy, pki, user, value):
    """HTTP/2: a placeholder in repeated headers to the allowed upstream is filled; on streams of the same
    connection, a Host header that disagrees with :authority, or an :authority of another origin, is refused and
    the upstream gets nothing for them; the worker never sees the value."""
    import h2.events
    up = H2Upstream(pki, _h2_ok)
    s, ph = _keyed(proxy, user, value, up.origin)
    tgt, p = up.target.encode(), ph.encode()
    plans = [
        [(b":authority", tgt), (b"x-key", p), (b"x-key", b"b" + p)],
        [(b":authority", tgt), (b"host", b"evil.example"), (b"x-key", p)],
        [(b":authority", b"evil.example"), (b"x-key", p)],
        [(b":authority", tgt), (b"host", tgt), (b"host", b"evil.example"), (b"x-key", p)],
        [(b":authority", tgt), (b"HOST", b"evil.example"), (b"x-key", p)],
    ]
    streams, got = {}, []
    for i, extra in enumerate(plans):  # each on a connection of its own (a bad head may end the connection)
        t, conn = h2_tunnel(s, proxy.port, up.target)
        conn.config.validate_outbound_headers = False  # (h2 would refuse to send what an attacker sends)
        conn.config.normalize_outbound_headers = False
        sid = conn.get_next_available_stream_id()
        streams[i] = st = {"ended": False, "status": None, "i": i}
        conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"), (b":path", f"/h2/{i}".encode())]
                          + extra, end_stream=True)
        t.sendall(conn.data_to_send())
        for events in h2_received(t, conn, {sid: st}, time.time() + 4):
            for ev in events:
                if isinstance(ev, h2.events.ResponseReceived):
                    st["status"] = dict(ev.headers)[b":status"]
                    got.append(repr(ev.headers).encode())
                elif isinstance(ev, h2.events.DataReceived):
                    got.append(ev.data)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    st["ended"] = True
        t.close()
    statuses = [st["status"] for st in sorted(streams.values(), key=lambda x: x["i"])]
    assert statuses[0] == b"200" and all(x in (b"403", b"400", None) for x in statuses[1:]), statuses
    assert [h[b":path"] for h, _, _ in up.received] == [b"/h2/0"]
    assert value.encode() in up.seen() and p not in up.seen()
    assert _no_value(proxy, value, *got)
    assert clean_log(proxy)


# --- the deferred log line -------------------------------------------------------------------------------------------


def test_each_decision_is_logged_once_in_order_on_one_keepalive_connection(proxy, up, user, value):
    """Allowed, refused, allowed, refused (on one keep-alive tunnel, each waiting for its answer): four decision
    lines, one each, in the order the requests were made, each naming its own path and decision."""
    s, ph = _keyed(proxy, user, value, up.origin)
    tag = f"ord{time.time_ns()}"
    t = tunnel(s, proxy.port, up.target, None)
    plan = [("allow", f"/{tag}/a?k={ph}", up.target), ("block", f"/{tag}/b?k={ph}", "evil.example"),
            ("allow", f"/{tag}/c?k={ph}", up.target), ("block", f"/{tag}/d?k={ph}", "evil.example")]
    for _, path, host in plan:
        t.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = read_head(t)
        n = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        rest = head.split(b"\r\n\r\n", 1)[1]
        while len(rest) < n:
            rest += t.recv(65536)
    t.close()
    lines = _lines(proxy, tag, 4)
    assert [re.search(r"decision=(\w+)", ln).group(1) for ln in lines] == [d for d, _, _ in plan]
    assert [f"/{tag}/{x}" in ln for x, ln in zip("abcd", lines)] == [True] * 4
    time.sleep(0.3)
    assert len(_lines(proxy, tag, 5, timeout=0.1)) == 4
    assert _no_value(proxy, value)


def test_concurrent_decisions_are_each_logged_exactly_once(proxy, up, user, value):
    """24 workers at once, half allowed and half refused: 24 decision lines, one per request path, none lost or
    doubled; the upstream got the 12 allowed ones."""
    s, ph = _keyed(proxy, user, value, up.origin)
    tag = f"con{time.time_ns()}"

    def one(i: int) -> None:
        host = up.target if i % 2 == 0 else "evil.example"
        _raw(s, proxy, up.target, f"GET /{tag}/{i}/x?k={ph} HTTP/1.1\r\nHost: {host}\r\nConnection: close"
             "\r\n\r\n".encode(), timeout=3)
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        list(pool.map(one, range(24)))  # (an error in one is raised here)
    lines = _lines(proxy, tag, 24)
    time.sleep(0.3)
    lines = _lines(proxy, tag, 25, timeout=0.1)
    per = {i: [ln for ln in lines if f"/{tag}/{i}/x" in ln] for i in range(24)}
    assert all(len(v) == 1 for v in per.values()), {i: len(v) for i, v in per.items()}
    assert all(("decision=allow" in per[i][0]) == (i % 2 == 0) for i in range(24))
    assert len([h for h, _ in up.received if tag.encode() in h]) == 12
    assert _no_value(proxy, value)


def test_a_proxy_whose_log_filter_raises_on_a_decision_line_goes_on_serving(tmp_path, pki, user, value):
    """The scrub filter (on every handler of the root logger) raises for a decision line. Before the change that
    raised inside the request hook (the flow failed closed, the proxy went on); now the line is written by a loop
    callback. The proxy must go on serving: a second request, made after, is answered."""
    p = make_proxy(tmp_path, pki)
    p.start()
    try:
        upstream = RawUpstream(pki, _ok)
        s, ph = _keyed(p, user, value, upstream.origin)

        def failing(rec: logging.LogRecord) -> bool:  # as the scrub filter would if it raised on this line
            if "/boom" in rec.getMessage():
                raise RuntimeError("the scrub filter failed")
            return True
        p._handler.addFilter(failing)
        try:
            first = _raw(s, p, upstream.target, f"GET /boom?k={ph} HTTP/1.1\r\nHost: {upstream.target}\r\n"
                         "Connection: close\r\n\r\n".encode(), timeout=2)
            time.sleep(0.5)
            alive = p._thread is not None and p._thread.is_alive()
            second = b""
            with contextlib.suppress(OSError, AssertionError):
                second = _raw(s, p, upstream.target, f"GET /after HTTP/1.1\r\nHost: {upstream.target}\r\n"
                              "Connection: close\r\n\r\n".encode(), timeout=2)
        finally:
            p._handler.removeFilter(failing)
        assert _no_value(p, value, first, second)
        assert alive, "the proxy's event loop died: " + p.log.read_text(errors="replace")[-600:]
        assert _status(second) == 200
    finally:
        p.stop()


def _wait_for(pred, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_last_decision_before_a_signal_is_logged_by_a_real_sealgate_run(tmp_path, pki, user, value, sig):
    """A real `sealgate run`: a refused request and an allowed one, then at once SIGTERM (drain) or SIGINT (stop now).
    Both decision lines are in its output, once each, and the process exits cleanly."""
    p = make_proxy(tmp_path, pki, process=True)
    p.start()
    upstream = RawUpstream(pki, _ok)
    try:
        s, ph = _keyed(p, user, value, upstream.origin)
        tag = f"sig{time.time_ns()}"
        _raw(s, p, upstream.target, f"GET /{tag}/blocked?k={ph} HTTP/1.1\r\nHost: evil.example\r\n"
             "Connection: close\r\n\r\n".encode(), timeout=2)
        t = tunnel(s, p.port, upstream.target, None)
        t.sendall(f"GET /{tag}/allowed?k={ph} HTTP/1.1\r\nHost: {upstream.target}\r\nConnection: close\r\n\r\n".encode())
        got = read_all(t, 2)
        p.proc.send_signal(sig)
        t.close()
        p.proc.wait(20)
        lines = _lines(p, tag, 2, timeout=1)
        assert [("blocked" in ln, "allowed" in ln) for ln in lines] == [(True, False), (False, True)], lines
        assert _status(got) == 200 and _no_value(p, value, got)
    finally:
        p.stop()


def test_a_decision_made_in_the_loop_turn_sigint_lands_is_still_logged(tmp_path, pki):
    """Found (low; fixed: Sealgate.done writes the lines still waiting). `sealgate run` on SIGINT calls
    master.shutdown(), which sets should_exit from a loop callback; if a worker's
    request is decided in the same loop turn after it (the socket was ready in that turn), its line is now deferred
    with call_soon behind the master's wake-up, which runs done() and then uninstalls termlog (sealgate's stdout) in
    one go (no done hook yields: the probe server's wait_closed returns at once). The line is never written; its
    audit row is (queued at once, flushed by done). Before 9551da8 the line was written in the deciding event, while
    termlog was still installed. Reproduced deterministically with the real master of `sealgate run` (build_master,
    termlog captured): the line logged at once in that turn is written, the deferred one is lost."""
    from conftest import _mitmproxy_ctx_per_thread
    from sealgate import runner, settings
    from sealgate.store import open_store

    p = make_proxy(tmp_path, pki)
    st = settings.load({"no_web": True}, env=dict(p.env))
    store = open_store(st)
    store.key  # noqa: B018 - as `sealgate run`: the store and key first
    store.close()
    _mitmproxy_ctx_per_thread()
    out = io.StringIO()
    tag = f"sigint{time.time_ns()}"
    log = logging.getLogger("sealgate")
    logging.getLogger().setLevel(logging.INFO)  # as runner._output: one line per decision

    async def main() -> None:
        m = runner.build_master(st, with_termlog=True)
        m._termlog_addon.logger.file = out
        task = asyncio.get_running_loop().create_task(m.run())
        deadline = time.time() + 20
        while time.time() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", p.port), timeout=0.2).close()
                break
            await asyncio.sleep(0.05)

        def shutdown_then_a_decision() -> None:  # one loop turn: SIGINT's should_exit.set, then a request decided
            m.should_exit.set()
            log.info("sealgate decision=block code=host_mismatch path=/%s/at-once", tag)  # as before 9551da8
            m.addons.get("sealgate").recorder.lines.add(f"sealgate decision=block code=host_mismatch path=/{tag}/deferred")
        asyncio.get_running_loop().call_soon(shutdown_then_a_decision)
        await asyncio.wait_for(task, 30)
        with contextlib.suppress(Exception):
            await m.addons.get("proxyserver").servers.update([])
    try:
        asyncio.run(main())
    finally:
        root = logging.getLogger()
        for h in list(root.handlers):
            if getattr(h, "file", None) is out:
                root.removeHandler(h)
    text = out.getvalue()
    assert f"/{tag}/at-once" in text  # termlog was there when the request was decided
    assert f"/{tag}/deferred" in text, "the deferred decision line was never written"
