"""Hostile bytes: garbage, broken TLS hellos, half-sent CONNECTs, oversized heads, broken
framing and HTTP/2 abuse, sent on raw sockets to a real `sealgate run` process (the module's
`proxy_process`; one test starts its own, with a 2 s header timeout).

After each hostile exchange (or batch), the same checks: the process still runs; a real client
(another principal's session, through the proxy) is served promptly, its placeholder filled
upstream and scrubbed from the echo; no secret value is in any byte a hostile socket got back;
every answer sealgate makes itself is problem+json with a known code and quotes nothing of the
request (a marker in the hostile header values), and no other error answer exists; at the end
of each test, no value in the proxy's output or files and no traceback in its log. The HTTP/2
abuse also watches the proxy: real clients (curl, processes of their own) every 0.25 s, its RSS,
and the CPU it spends until it is idle again.

The fuzzing is hypothesis over raw sockets (random bytes; near-HTTP requests with up to four
hostile parts; broken ClientHellos; odd CONNECT targets), bounded: few examples, no shrinking,
no example database, socket timeouts everywhere. The file takes about 45 s.

A weakness still open is a test marked `xfail(strict=True, reason="FINDING n: ...")`: it fails
today, and turns the suite red (XPASS) once fixed, so the marker goes with the fix. Findings
already fixed say so in their test's docstring.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Self

import conftest
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
import pytest
import requests
from conftest import make_proxy
from hyperframe import frame as hf
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from sealgate.errors import CODES
from upstream import LOOPBACK_SANS, H2Upstream, RawUpstream, Upstream, raw_response
from wire import credential_header

pytestmark = pytest.mark.e2e  # fuzzing and floods: about 45 s, in the full suite (CI), not the fast tier

PROMPT = 3.0  # seconds a real client may take while (or just after) the proxy is abused
# no shrinking: a failure is reported as found, so even a failing run stays bounded in time
FUZZ = settings(deadline=None, database=None, print_blob=True, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example, HealthCheck.filter_too_much])
PROBLEM_CODES = {code.encode() for code in CODES}  # sealgate's refusal codes, as the tree defines them


# --- the scene: one proxy process, upstreams, a hostile session and a real client's session ----

@dataclass
class Scene:
    proxy: conftest.Proxy
    api: Upstream  # https (http.server), the real client's destination; /echo answers with what it got
    mirror: RawUpstream  # https, the hostile bytes' destination: answers 200 with the whole request
    plain: RawUpstream  # the same in plain http
    h2up: H2Upstream  # https with ALPN h2 only, for the HTTP/2 abuse
    hostile: dict  # the session the hostile bytes use (their placeholder is in many of them)
    client: dict  # the real client's session
    values: list[str]  # the values of both principals: never in what a hostile socket gets
    marker: bytes  # put in hostile header values: sealgate's own answers must never quote it
    _http: requests.Session = field(default=None, repr=False)
    _checks: int = 0

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def pid(self) -> int:
        return self.proxy.proc.pid

    def ph(self) -> bytes:
        """The hostile session's placeholder."""
        return self.hostile["env"]["K"].encode()

    def cred(self) -> bytes:
        """The hostile session's Proxy-Authorization line."""
        return credential_header(self.hostile).encode()

    # -- the checks after each hostile exchange -----------------------------------------------

    def alive(self) -> None:
        code = self.proxy.proc.poll()
        assert code is None, f"sealgate run exited ({code}): {self.log_tail()}"

    def served(self, *, fresh: bool = False) -> float:
        """A real client is served: its placeholder filled upstream, the answer scrubbed, within
        PROMPT seconds. fresh: a new curl process and connection; else a keep-alive requests
        session (cheap enough for every example). Returns the seconds it took."""
        self.alive()
        nonce = secrets.token_hex(6)
        url = self.api.url(f"/echo?n={nonce}")
        ph = self.client["env"]["K"]
        start = time.monotonic()
        if fresh:
            got = conftest.curl(self.client, url, "-H", f"Authorization: Bearer {ph}")
            status, seen = got.status, got.seen()
        else:
            if self._http is None:
                self._http = requests.Session()
                self._http.trust_env = False
                self._http.proxies = {"https": self.client["proxy_url"]}
                self._http.verify = self.client["ca_cert"]
            r = self._http.get(url, headers={"Authorization": f"Bearer {ph}"}, timeout=PROMPT + 5)
            status, seen = r.status_code, repr(r.headers).encode() + r.content
        took = time.monotonic() - start
        assert status == 200, f"the real client got {status}"
        leaked = any(v.encode() in seen for v in self.values)
        assert not leaked, "the real client got a value back"
        assert ph.encode() in seen, "the echo lost the real client's placeholder"
        sent = [r for r in self.api.received if r.path.endswith(nonce)]
        filled = bool(sent) and sent[-1].header("Authorization") == f"Bearer {self.client_value}"
        assert filled, "the real client's placeholder was not filled upstream"
        assert took < PROMPT, f"the real client waited {took:.2f} s"
        return took

    def check(self, got: bytes, *, tls: bool = False) -> None:
        """After one exchange: nothing a hostile socket got holds a value, sealgate's own answers
        quote nothing of the request (tls: got is TLS records, not HTTP), and the real client is
        served (a fresh curl every 25th time)."""
        no_value(self, got)
        if not tls:
            own_answers_quote_nothing(self, got)
        self._checks += 1
        self.served(fresh=self._checks % 25 == 0)

    def log_size(self) -> int:
        return self.proxy.log.stat().st_size

    def log_tail(self, start: int = 0) -> str:
        """The end of the proxy's log since start, for a failure message; values blanked out."""
        text = self.proxy.log.read_bytes()[start:][-3000:].decode("utf-8", "replace")
        for v in self.values:
            text = text.replace(v, "<value>")
        return text

    def finish(self, log_start: int) -> None:
        """The end of a test: still alive and serving (a fresh client), no value in the proxy's
        output or files, and no traceback in what it logged meanwhile."""
        self.served(fresh=True)
        operators = self.proxy.visible_to_operators()
        leaked = any(v.encode() in operators for v in self.values)
        assert not leaked, "a value is in sealgate's output or files"
        new = self.proxy.log.read_bytes()[log_start:]
        assert b"Traceback" not in new, f"sealgate logged a traceback: {self.log_tail(log_start)}"

    @property
    def client_value(self) -> str:
        return self.values[1]


def no_value(scene: Scene, got: bytes) -> None:
    leaked = any(v.encode() in got for v in scene.values)
    assert not leaked, "a hostile socket got a value back"  # never print got: it holds the value


def answers(got: bytes):
    """The HTTP/1 answers at the start of got, one after another: (status, head, body)."""
    while got.startswith(b"HTTP/1."):
        head, sep, rest = got.partition(b"\r\n\r\n")
        status = int(head[9:12]) if head[9:12].isdigit() else 0
        length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
        if not sep:
            n = 0
        elif length:
            n = int(length.group(1))
        elif re.search(rb"(?im)^transfer-encoding:.*chunked", head):
            n = rest.find(b"0\r\n\r\n") + 5 if b"0\r\n\r\n" in rest else len(rest)
        elif status == 200 and b"connection established" in head[:40].lower() or status == 100:
            n = 0  # (100 Continue: mitmproxy's interim answer to Expect: 100-continue)
        else:
            n = len(rest)
        yield status, head, rest[:n]
        got = rest[n:]


def own_answers_quote_nothing(scene: Scene, got: bytes) -> None:
    """Every answer sealgate makes itself (X-Sealgate-Error) is problem+json with a known code and
    quotes nothing of the request; the hostile bytes' upstreams only ever answer 200, so any other
    answer must be sealgate's: never a traceback or mitmproxy's own error page."""
    fuzzing = currently_in_test_context()  # then tally what came back (--hypothesis-show-statistics)
    if fuzzing and not got:
        event("answer: none")
    for status, head, body in answers(got):
        code = re.search(rb"(?im)^x-sealgate-error: *([a-z_]+)", head)
        if fuzzing:
            event(f"answer: {status} {code.group(1).decode() if code else 'upstream' if status == 200 else '?'}")
        if code:
            assert code.group(1) in PROBLEM_CODES, head
            assert b"content-type: application/problem+json" in head.lower(), head
            quoted = scene.marker in head + body or b"Traceback" in body or b"mitmproxy" in body.lower()
            assert not quoted, f"sealgate's answer quotes the request: {head + body!r}"
        else:
            assert status in (100, 200), f"an answer from neither sealgate nor an upstream: {(head + body)[:400]!r}"


def filled_upstream(scene: Scene) -> int:
    """How many requests the hostile bytes' upstreams got with the hostile principal's value filled in."""
    v = scene.values[0].encode()
    return sum(v in head + body for up in (scene.mirror, scene.plain) for head, body in up.received)


def mirror_answer(head: bytes, body: bytes, sock) -> bytes:
    """The whole request back, as a careless upstream might: a filled value comes back too, and
    sealgate must scrub it."""
    return raw_response(head + b"\r\n\r\n" + body)


@pytest.fixture(scope="module")
def scene(proxy_process, api, pki) -> Scene:
    # the hostile bytes go to upstreams that handshake on a thread per connection: the `api`
    # upstream (http.server) does its TLS handshakes in its accept loop, so a tunnel that never
    # sends a hello would stall it for the real client, which is not what these tests are about
    mirror, plain = RawUpstream(pki, mirror_answer), RawUpstream(pki, mirror_answer, tls=False)

    def h2_ok(headers, body, conn, sid, sock):
        conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"2")])
        conn.send_data(sid, b"ok", end_stream=True)
    h2up = H2Upstream(pki, h2_ok)
    origins = f"{api.origin},{mirror.origin},{plain.origin},{h2up.origin}"
    values, sessions = [], []
    for _ in range(2):  # the hostile principal, then the real client's
        user, value = f"user-{secrets.token_hex(4)}", f"sk-test-{secrets.token_urlsafe(24)}"
        conftest.CREATED_VALUES.append(value)  # the suite-end scan of every file looks for it too
        proxy_process.add_secret(user, "K", value, origins, "--allow-http")
        values.append(value)
        sessions.append(proxy_process.issue(user=user))
    s = Scene(proxy_process, api, mirror, plain, h2up, sessions[0], sessions[1], values,
              b"hostile-" + secrets.token_hex(6).encode())
    s.served(fresh=True)
    return s


# --- raw exchanges -------------------------------------------------------------------------------

def _head_complete(data: bytes) -> bool:
    return b"\n\n" in data or b"\n\r\n" in data


def _answer_complete(buf: bytes) -> bool:
    """One whole answer is in buf: a tunnel's 200, or a head and its Content-Length or chunked body."""
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    if head.lower().startswith(b"http/1.1 200 connection established"):
        return True
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    if length:
        return len(body) >= int(length.group(1))
    if re.search(rb"(?im)^transfer-encoding:.*chunked", head):
        return body.endswith(b"0\r\n\r\n")
    return False


def _read(sock: socket.socket, *, quiet: float, total: float, until=None) -> tuple[bytes, bool]:
    """What arrives until the peer closes (True), until(got) holds, or nothing for quiet seconds,
    or total seconds have passed (False)."""
    got, end = b"", time.monotonic() + total
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return got, False
        sock.settimeout(min(quiet, left))
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):  # quiet, not closed
            return got, False
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError):
            return got, True
        if not chunk:
            return got, True
        got += chunk
        if until is not None and until(got):
            return got, False


def send_raw(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send data on a new connection to port; read an answer if a head is complete; then send
    EOF and read until the proxy closes. Returns (everything received, whether it closed within
    3 s of our EOF)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=3)
    try:
        with contextlib.suppress(OSError):  # the proxy may cut us off mid-send: that is allowed
            sock.sendall(data)
        got = b""
        if _head_complete(data):  # an answer may come
            got, closed = _read(sock, quiet=0.3, total=2, until=_answer_complete)
            if closed:
                return got, True
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        rest, closed = _read(sock, quiet=3, total=3)
        return got + rest, closed
    finally:
        sock.close()


def connect(scene: Scene, target: bytes) -> tuple[socket.socket, bytes]:
    """An authenticated CONNECT (the hostile session's); the socket and the proxy's whole answer."""
    sock = socket.create_connection(("127.0.0.1", scene.port), timeout=5)
    sock.sendall(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n" + scene.cred() + b"\r\n")
    head, _ = _read(sock, quiet=5, total=5, until=_answer_complete)
    return sock, head


def tls_tunnel(scene: Scene, target: str, alpn: str = "http/1.1") -> ssl.SSLSocket:
    sock, head = connect(scene, target.encode())
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    ctx = ssl.create_default_context(cafile=scene.hostile["ca_cert"])
    ctx.check_hostname = False
    ctx.set_alpn_protocols([alpn])
    t = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    t.settimeout(5)
    return t


def client_hello(alpn: tuple[str, ...] = ("h2", "http/1.1"), sni: str | None = "127.0.0.1") -> bytes:
    """A real TLS ClientHello, as Python's ssl would send it."""
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


HELLO = client_hello()


# --- strategies ----------------------------------------------------------------------------------

def near_http(scene: Scene, *, tunnel: bool) -> st.SearchStrategy[bytes]:
    """Requests that are almost HTTP/1: odd methods, targets and versions; header lines with NUL,
    bare CR or LF, obs-fold, many of them; bad Content-Length (negative, duplicate, against
    Transfer-Encoding) and broken chunked framing; the hostile session's placeholder in places."""
    ph, cred, mark = scene.ph(), scene.cred(), scene.marker
    up = f"127.0.0.1:{scene.mirror.port}".encode()
    plain = f"127.0.0.1:{scene.plain.port}".encode()
    paths = st.sampled_from([b"/", b"/echo", b"/echo?k=" + ph, b"*", b"", b"/%00", b"/\x00", b"//x/../..",
                             b"/" + b"a" * 4000, b"/?" + ph * 3, b"/%zz", b"/\xff\xfe", b"/ /", b"/\t"])
    if tunnel:
        targets = paths | st.sampled_from([b"https://" + up + b"/echo", b"http://" + up + b"/", b"https://127.0.0.2:1/"])
        host = up
    else:
        targets = st.sampled_from([b"http://" + plain + b"/echo", b"http://" + plain + b"/echo?k=" + ph,
                                   b"http://" + up + b"/", b"https://" + up + b"/echo", b"http://127.0.0.3:80/",
                                   b"http://" + plain, b"http://[::1]:" + str(scene.plain.port).encode() + b"/",
                                   b"http://" + plain + b"@127.0.0.2/", b"http://a%00b/", b"http://:0/", b"/echo",
                                   b"*", up, b"http://" + b"x" * 300 + b".invalid/", b"http://127.0.0.1:" +
                                   str(scene.port).encode() + b"/", b"ftp://" + plain + b"/"]) | paths
        host = plain
    methods = st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"TRACE", b"CONNECT", b"PRI", b"DELETE",
                               b"get", b"G\x00T", b"GET ", b"", b"\x16\x03\x01", b"M" * 300]) | st.binary(max_size=10)
    versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/9.9", b"http/1.1",
                                b"HTTP/1.1 ", b"HTTP/1.10", b"", b"HTTP/", b"HTTP/1.1\x00"])
    eol = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])
    header_lines = [
        b"Host: " + host, b"Host: " + host, b"Host: evil.invalid", b"Host:", b"Host: " + host + b"\x00x",
        cred.rstrip(b"\r\n"), cred.rstrip(b"\r\n"), b"Proxy-Authorization: Basic !!!",
        b"Proxy-Authorization: Basic " + b"A" * 3000, b"X-Key: " + ph, b"Authorization: Bearer " + ph,
        b"X-Mark: " + mark, b"X-Mark: " + mark + b"\x00" + ph, b"X-Fold: " + mark + b"\r\n " + ph,
        b"X-Fold: a\r\n\tb", b" X-Leading-Space: " + mark, b"X-A : " + mark, b": " + mark, b"X-Nul\x00: " + mark,
        b"X-Cr: a\rb" + mark, b"X-Lf: a\nX-Injected: " + mark, b"Content-Length: 5", b"Content-Length: -1",
        b"Content-Length: 0", b"Content-Length: 5, 6", b"Content-Length: +5", b"Content-Length: 0x10",
        b"Content-Length: 99999999999999999999999", b"Content-Length:  7 ", b"Content-Length: 3\x00",
        b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked",
        b"Transfer-Encoding: chunked, gzip", b"Transfer-Encoding: Chunked", b"Transfer-Encoding:\tchunked",
        b"Transfer-Encoding: identity", b"Transfer-Encoding: xchunked", b"Content-Encoding: gzip",
        b"Expect: 100-continue", b"Connection: close", b"Connection: keep-alive, Upgrade", b"Upgrade: h2c",
        b"Upgrade: websocket", b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA", b"Range: bytes=0-1",
        b"Te: trailers", b"Trailer: X-Key", b"X-" + b"n" * 2000 + b": v", b"X-Big: " + b"v" * 8000,
    ]
    header = st.sampled_from(header_lines)
    framing = st.sampled_from([h for h in header_lines if h.startswith((b"Content-Length", b"Transfer-Encoding"))])
    repeated = st.tuples(st.sampled_from([b"X-Many: " + mark, b"Content-Length: 1", b"Transfer-Encoding: chunked",
                                          b"Host: " + host]), st.integers(1, 600))
    chunk_size = st.sampled_from([b"5", b"zz", b"-1", b"0x5", b"5 ", b" 5", b"5;ext=" + mark, b"5;" + b"e" * 5000,
                                  b"0" * 9000 + b"5", b"ffffffffffffffffffff", b"", b"\x00", b"5\r", b"+5", b"05"])
    bodies = st.one_of(
        st.just(b""), st.binary(max_size=64), st.just(b"k=" + ph),
        st.builds(lambda size, data, end, tail: size + b"\r\n" + data + end + tail, chunk_size,
                  st.sampled_from([b"hello", ph, b"hel"]), st.sampled_from([b"\r\n", b"", b"\n", b"XX"]),
                  st.sampled_from([b"0\r\n\r\n", b"0\r\nX-Key: " + ph + b"\r\n\r\n", b"", b"0\r\n", b"1\r\n",
                                   b"0\r\n\r\nGET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"])),
    )

    @st.composite
    def request(draw) -> bytes:
        """A well-formed request that fills the placeholder and has it echoed back, with up to four
        of its parts made hostile."""
        broken = draw(st.sets(st.sampled_from(["method", "space", "target", "version", "eol", "headers", "repeat",
                                               "framing", "cut"]), max_size=4))
        method = draw(methods) if "method" in broken else draw(st.sampled_from([b"GET", b"POST"]))
        space = (lambda: draw(st.sampled_from([b" ", b"  ", b"\t", b"", b"\x00"]))) if "space" in broken else (lambda: b" ")
        if "target" in broken:
            target = draw(targets)
        else:
            target = b"/echo?k=" + ph if tunnel else b"http://" + plain + b"/echo?k=" + ph
        version = draw(versions) if "version" in broken else b"HTTP/1.1"
        end = draw(eol) if "eol" in broken else b"\r\n"
        lines = [method + space() + target + space() + version, b"Host: " + host]
        if not tunnel:
            lines.append(cred.rstrip(b"\r\n"))
        lines += [b"X-Key: " + ph, b"X-Mark: " + mark]
        if "headers" in broken:
            lines[1:1] = draw(st.lists(header, min_size=1, max_size=8))
        if "repeat" in broken:
            name, count = draw(repeated)
            lines += [name] * count
        if "framing" in broken:
            lines += draw(st.lists(framing, min_size=1, max_size=3))
            body = draw(bodies)
        elif method == b"POST":
            body = b"k=" + ph
            lines.append(b"Content-Length: %d" % len(body))
        else:
            body = b""
        raw = end.join(lines) + end + end + body
        if "cut" in broken:
            raw = raw[:draw(st.integers(0, len(raw)))]
        return raw[:60_000]  # below the head limit being added (64 KiB): that one has its own test

    return request()


def broken_hellos() -> st.SearchStrategy[bytes]:
    """A real ClientHello, broken: cut short, bytes flipped, lengths lied about, split into tiny
    records, or with garbage after it."""
    n = len(HELLO)

    def flip(positions_values):
        b = bytearray(HELLO)
        for pos, val in positions_values:
            b[pos % n] = val
        return bytes(b)

    def set_u16(at, v):
        return HELLO[:at] + v.to_bytes(2, "big") + HELLO[at + 2:]

    def split_records(size):
        body = HELLO[5:]
        return b"".join(b"\x16\x03\x01" + len(c).to_bytes(2, "big") + c for c in
                        (body[i:i + size] for i in range(0, len(body), size)))

    return st.one_of(
        st.integers(0, n - 1).map(lambda k: HELLO[:k]),
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8).map(flip),
        st.sampled_from([3, 6, 7]).flatmap(  # record length, handshake length (high), (low)
            lambda at: st.integers(0, 65535).map(lambda v: set_u16(at, v))),
        st.integers(1, 40).map(split_records),
        st.binary(min_size=1, max_size=300).map(lambda g: HELLO + g),
        st.binary(max_size=300).map(lambda g: b"\x16\x03\x01" + g),
        st.just(b"\x16\x03\x01\xff\xff" + b"\x01" * 200),  # a record that promises 64 KiB, then stops
        st.just(b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x00" * 37),  # an SSLv2 hello
        st.just(b"\x15\x03\x03\x00\x02\x02\x28"),  # an alert instead of a hello
        st.just(b"\x17\x03\x03\x00\x05hello"),  # application data before any handshake
    )


# --- HTTP/1 and garbage on the proxy port --------------------------------------------------------

def test_random_garbage_on_the_proxy_port(scene):
    start = scene.log_size()

    @settings(FUZZ, max_examples=100)
    @given(st.one_of(st.binary(max_size=2048), st.binary(max_size=256).map(lambda b: b + b"\r\n\r\n"),
                     st.binary(max_size=256).map(lambda b: b"GET " + b + b" HTTP/1.1\r\n\r\n")))
    def one(data):
        got, closed = send_raw(scene.port, data)
        assert closed, "the proxy kept the connection open after the client's EOF"
        scene.check(got)

    one()
    scene.finish(start)


def test_near_http_requests_on_the_proxy_port(scene):
    start = scene.log_size()

    filled = filled_upstream(scene)

    @settings(FUZZ, max_examples=80)
    @given(near_http(scene, tunnel=False))
    def one(data):
        got, closed = send_raw(scene.port, data)
        assert closed, "the proxy kept the connection open after the client's EOF"
        scene.check(got)

    one()
    # the fuzz is worth something only if some of it got through, filled, and echoed back to be scrubbed
    assert filled_upstream(scene) > filled, "no fuzzed request had its placeholder filled: the strategy is off"
    scene.finish(start)


def test_near_http_requests_inside_an_authenticated_tunnel(scene):
    start = scene.log_size()
    target = f"127.0.0.1:{scene.mirror.port}"
    filled = filled_upstream(scene)

    @settings(FUZZ, max_examples=40)
    @given(near_http(scene, tunnel=True))
    def one(data):
        t = tls_tunnel(scene, target)
        try:
            with contextlib.suppress(OSError):
                t.sendall(data)
            got, _ = _read(t, quiet=0.3, total=2, until=_answer_complete) if _head_complete(data) else (b"", False)
        finally:
            t.close()
        scene.check(got)

    one()
    assert filled_upstream(scene) > filled, "no fuzzed request had its placeholder filled: the strategy is off"
    scene.finish(start)


# --- TLS hellos: after an authenticated CONNECT, and straight to the proxy port -----------------

def test_broken_client_hellos_after_connect(scene):
    start = scene.log_size()
    target = f"127.0.0.1:{scene.mirror.port}".encode()

    @settings(FUZZ, max_examples=40)
    @given(broken_hellos(), st.booleans())
    def one(hello, half_close_at_once):
        sock, head = connect(scene, target)
        try:
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
            with contextlib.suppress(OSError):
                sock.sendall(hello)
                if not half_close_at_once:
                    time.sleep(0.05)
                sock.shutdown(socket.SHUT_WR)
            got, closed = _read(sock, quiet=3, total=3)
            assert closed, "the proxy kept a tunnel with a broken hello open after the client's EOF"
        finally:
            sock.close()
        scene.check(got, tls=True)

    one()
    scene.finish(start)


def test_broken_client_hellos_straight_to_the_proxy_port(scene):
    start = scene.log_size()

    @settings(FUZZ, max_examples=40)
    @given(broken_hellos())
    def one(hello):
        got, closed = send_raw(scene.port, hello)
        assert closed, "the proxy kept the connection open after the client's EOF"
        scene.check(got, tls=True)

    one()
    scene.finish(start)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_an_unparseable_hello_followed_by_eof_is_closed(scene):
    """20 connections (10 straight to the proxy port, 10 after an authenticated CONNECT) each send
    a ClientHello whose handshake length is 0, and EOF at once: each must be closed within 2 s.

    Finding 5 (fixed in 64e1e1f): mitmproxy logged 'client disconnect' but never closed such a
    socket (its fd stayed until Python's cyclic GC collected the handler; 3000 of them: 844 fds at
    once): ConnectionHandler.handle_connection was cancelled inside server_event(ConnectionClosed),
    which skips writer.close()."""
    start = scene.log_size()
    bad = HELLO[:5] + b"\x01\x00\x00\x00" + HELLO[9:]  # 'Cannot parse ClientHello'
    socks = []
    for i in range(20):
        if i % 2:
            sock, head = connect(scene, f"127.0.0.1:{scene.mirror.port}".encode())
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
        else:
            sock = socket.create_connection(("127.0.0.1", scene.port), timeout=5)
        sock.sendall(bad)
        sock.shutdown(socket.SHUT_WR)
        sock.setblocking(False)
        socks.append(sock)
    open_ = set(range(20))
    end = time.monotonic() + 2
    while open_ and time.monotonic() < end:
        time.sleep(0.05)
        for i in list(open_):
            try:
                if socks[i].recv(65536) == b"":
                    open_.discard(i)
            except BlockingIOError:
                pass
            except OSError:
                open_.discard(i)
    fds = _fds(scene.pid)
    for s in socks:
        s.close()
    scene.served()
    assert not open_, f"{len(open_)} of 20 connections still open 2 s after the client's EOF (the proxy has {fds} fds)"
    scene.finish(start)


@pytest.mark.e2e  # the memory and CPU time of the proxy process
def test_a_client_hello_that_claims_16_mib_is_cut_early(scene):
    """A ClientHello whose header claims 16 MiB, sent as 16 KiB records, straight to the proxy port
    (no credentials needed) and after an authenticated CONNECT: each connection is closed within 3 s,
    and the proxy spends little CPU and memory on them.

    Finding 8 (fixed in e10c777, ClientHellos bounded by max_head_bytes):
    mitmproxy buffered the hello until whole and parsed the whole buffer again on every read
    (get_client_hello concatenates every record each time: quadratic): one connection of 6 MiB
    cost more than a minute of CPU and +54 MiB, with no credentials."""
    start = scene.log_size()
    body = b"\x01" + (0xFFFFFF).to_bytes(3, "big") + b"\x03\x03" + bytes(16384 - 6)
    first = b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body
    record = b"\x16\x03\x01\x40\x00" + bytes(16384)
    rss, cpu = rss_kib(scene.pid), cpu_seconds(scene.pid)
    results = []
    for via_connect in (False, False, True, True):
        if via_connect:
            sock, head = connect(scene, scene.mirror.target.encode())
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
        else:
            sock = socket.create_connection(("127.0.0.1", scene.port), timeout=5)
        sent, cut, began = 0, False, time.monotonic()
        sock.settimeout(1)
        with sock:
            try:
                sock.sendall(first)
                while sent < 4 * 1024 * 1024 and time.monotonic() - began < 3:
                    sock.sendall(record * 4)
                    sent += len(record) * 4
            except TimeoutError:  # it stopped reading: then it must close
                pass
            except OSError:
                cut = True
            if not cut:
                cut = _read(sock, quiet=3, total=3)[1]
        results.append((via_connect, sent >> 10, cut, round(time.monotonic() - began, 1)))
    grown, spent = (rss_kib(scene.pid) - rss) >> 10, cpu_seconds(scene.pid) - cpu
    facts = f"(connect?, KiB sent, closed?, s) {results}; the proxy spent {spent:.1f} s of CPU and grew by {grown} MiB"
    assert all(cut for _, _, cut, _ in results), facts
    assert spent < 1.5 and grown < 64, facts
    scene.finish(start)


def test_a_whole_client_hello_straight_to_the_proxy_port_gets_no_tunnel(scene):
    """TLS to the proxy port itself (no CONNECT): whatever mitmproxy makes of it, no request
    without credentials goes anywhere, and nothing hangs."""
    start = scene.log_size()
    before = len(scene.mirror.received)
    ctx = ssl.create_default_context(cafile=scene.hostile["ca_cert"])
    ctx.check_hostname = False
    got = b""
    with socket.create_connection(("127.0.0.1", scene.port), timeout=5) as sock:
        try:
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as t:
                t.sendall(f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:{scene.mirror.port}\r\nX-Key: ".encode() + scene.ph() +
                          b"\r\nConnection: close\r\n\r\n")
                got, _ = _read(t, quiet=3, total=5)
        except (ssl.SSLError, OSError):
            pass
    assert len(scene.mirror.received) == before, "a request without credentials reached the upstream"
    scene.check(got)
    scene.finish(start)


# --- CONNECT: odd targets, half-sent heads, stalls ------------------------------------------------

def test_connect_to_odd_targets(scene):
    """CONNECT to odd authorities (IPv4 in odd notations, IPv6, userinfo, schemes, empty or huge parts,
    odd ports, Unicode digits) and to sealgate's own ports and blocked ranges, then a hello or a request:
    only known answers, never a tunnel to the proxy itself or a blocked address."""
    start = scene.log_size()
    port, up = scene.port, scene.mirror.port
    metrics = int(scene.proxy.env["SEALGATE_METRICS_PORT"])
    own = [f"127.0.0.1:{port}", f"127.0.0.1:{metrics}", f"localhost:{port}", f"[::1]:{port}", f"127.0.0.3:{up}",
           f"10.0.0.1:{up}", "169.254.169.254:80", f"0.0.0.0:{port}", f"[::ffff:127.0.0.1]:{port}",
           f"[::ffff:127.0.0.3]:{up}", f"2130706435:{up}", f"127.3:{up}"]  # sealgate's own ports, blocked ranges
    hosts = st.sampled_from(["127.0.0.1", "localhost", "[::1]", "::1", "127.1", "0x7f.0.0.1", "2130706433", "0",
                             "[::ffff:127.0.0.1]", "127.0.0.1.", "LOCALHOST", "%31%32%37.0.0.1", "127.0.0.1%00",
                             "xn--", "xn--zz", "ex\u00e4mple.invalid", "a" * 300, "", "[", "[::1", "[]", "user@127.0.0.1",
                             "http://127.0.0.1", "*"])
    ports = st.sampled_from([str(up), str(up), "0", "65536", "-1", "99999999999999999999", "", " 80", "+443",
                             "0" + str(up), str(up) + "/x", str(up) + ":1", "\u0661\u0662"])
    odd = st.builds(lambda h, p, sep: f"{h}{sep}{p}", hosts, ports, st.sampled_from([":", ":", "::", " : "]))
    allowed_answers = {b"200", b"400", b"403", b"407", b"502", b"504"}

    @settings(FUZZ, max_examples=60)
    @given(st.one_of(odd, st.sampled_from(own)), st.booleans())
    def one(target, then_hello):
        sock, head = connect(scene, target.encode("utf-8", "surrogateescape"))
        try:
            status = head[9:12]
            assert not head or head.startswith(b"HTTP/1.1 ") and status in allowed_answers, head[:200]
            if target in own:
                assert status != b"200", f"CONNECT {target!r}, one of sealgate's own ports or a blocked address, got a tunnel"
            got = head
            if status == b"200":
                with contextlib.suppress(OSError):
                    sock.sendall(HELLO if then_hello else b"GET / HTTP/1.1\r\nX-Key: " + scene.ph() + b"\r\n\r\n")
                more, _ = _read(sock, quiet=0.5, total=1)
                got += b"" if then_hello else more  # TLS records, or an HTTP answer
                no_value(scene, more)
        finally:
            sock.close()
        scene.check(got)

    one()
    scene.finish(start)


def test_connect_to_a_closed_port_gets_sealgates_own_answer(scene):
    """Finding 4 (fixed in 64e1e1f): a CONNECT to an allowed address whose port refuses got mitmproxy's
    own 502, text/plain, quoting the target, the address dialled and mitmproxy's advice ('Cannot connect
    to [::1]:44393: [Errno 111] Connect call failed ('::1', 44393, 0, 0) If you plan to redirect requests
    ... `connection_strategy` ...'), and no log line or audit row."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    for target in (f"127.0.0.1:{closed_port}", f"[::1]:{scene.mirror.port}"):  # the mirror listens on 127.0.0.1 only
        sock, head = connect(scene, target.encode())
        rest, _ = _read(sock, quiet=0.5, total=1)
        sock.close()
        got = head + rest
        assert got.startswith(b"HTTP/1.1 502"), got[:300]
        own_answers_quote_nothing(scene, got)  # mitmproxy's own page fails here
        assert b"Errno" not in got and b"connection_strategy" not in got, got


def test_connect_to_the_proxy_itself_cannot_loop(scene):
    start = scene.log_size()
    for target in (f"127.0.0.1:{scene.port}", f"localhost:{scene.port}"):
        sock, head = connect(scene, target.encode())
        with sock:
            if head.startswith(b"HTTP/1.1 200"):  # then a CONNECT through it to itself again
                sock.sendall(f"CONNECT {target} HTTP/1.1\r\n".encode() + scene.cred() + b"\r\n")
                head += _read(sock, quiet=2, total=2)[0]
        assert not head.startswith(b"HTTP/1.1 200"), f"CONNECT {target} to the proxy's own port was tunnelled"
        scene.check(head)
    scene.finish(start)


HALF_CONNECTS = [
    b"C", b"CONNECT", b"CONNECT ", b"CONNECT 127.0.0.1:{up}", b"CONNECT 127.0.0.1:{up} HTTP/1.1",
    b"CONNECT 127.0.0.1:{up} HTTP/1.1\r\n", b"CONNECT 127.0.0.1:{up} HTTP/1.1\r\nHost: 127.0.0.1",
    b"CONNECT 127.0.0.1:{up} HTTP/1.1\r\n{cred}", b"CONNECT 127.0.0.1:{up} HTTP/1.1\r\n{cred}\r",
    b"CONNECT 127.0.0.1:{up} HTTP/1.1\r\nProxy-Authorization: Basic ",
]


def _half(scene: Scene, template: bytes) -> bytes:
    return template.replace(b"{up}", str(scene.mirror.port).encode()).replace(b"{cred}", scene.cred())


def test_half_sent_connects_closed_at_once(scene):
    """Each half-sent CONNECT head, then EOF: the proxy closes too, answering nothing (or a 400)."""
    start = scene.log_size()
    for template in HALF_CONNECTS:
        got, closed = send_raw(scene.port, _half(scene, template))
        assert closed, f"the proxy kept {template!r} open after the client's EOF"
        assert got == b"" or got.startswith(b"HTTP/1.1 400"), got[:200]
        scene.check(got)
    scene.finish(start)


def test_many_stalled_half_sent_connects_do_not_disturb_others(scene):
    """200 connections stall at every point of a CONNECT (head cut short; tunnel open but no
    hello; hello cut short), all at once: other clients are served meanwhile, and after the
    stallers go (half of them with a reset) the proxy serves as before."""
    start = scene.log_size()
    stallers = []
    tunnel_head = f"CONNECT 127.0.0.1:{scene.mirror.port} HTTP/1.1\r\n".encode() + scene.cred() + b"\r\n"
    stalls = [_half(scene, t) for t in HALF_CONNECTS] + [tunnel_head, tunnel_head + HELLO[:40], tunnel_head + HELLO[:5]]
    try:
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", scene.port), timeout=5)
            stallers.append(s)
            s.sendall(stalls[i % len(stalls)])
        time.sleep(0.3)
        for _ in range(2):
            scene.served(fresh=True)
    finally:
        for i, s in enumerate(stallers):
            if i % 2:  # a reset, not a FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
    time.sleep(0.3)
    scene.served()
    scene.finish(start)


@pytest.mark.e2e  # a proxy of its own, with a 2-second header timeout; waits on purpose
def test_a_half_sent_head_is_cut_at_the_header_timeout(tmp_path, pki):
    """Two connections that never complete a head: one sends half a CONNECT and waits, one drips a
    byte every 0.4 s into a header line. With a 2 s header timeout both are cut by about 4 s.

    Finding 2 (fixed in 69b2407, the header timeout): both were held as long as the client liked
    (mitmproxy's own inactivity timeout is 10 minutes, and a byte now and then resets it)."""
    p = make_proxy(tmp_path, pki, process=True, SEALGATE_HEADER_TIMEOUT="2")
    p.start()
    try:
        quiet = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        quiet.sendall(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nProxy-Authorization: Basic ")
        drip = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        drip.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\nX-Drip: ")
        began, cut = time.monotonic(), {}
        for sock in (quiet, drip):
            sock.setblocking(False)
        while time.monotonic() - began < 4.5 and len(cut) < 2:
            with contextlib.suppress(OSError):
                drip.send(b"a")
            time.sleep(0.4)
            for name, sock in (("quiet", quiet), ("drip", drip)):
                if name in cut:
                    continue
                try:
                    if sock.recv(4096) == b"":
                        cut[name] = time.monotonic() - began
                except BlockingIOError:
                    pass
                except OSError:
                    cut[name] = time.monotonic() - began
        quiet.close()
        drip.close()
        assert set(cut) == {"quiet", "drip"}, f"not cut after 4.5 s with a 2 s header timeout: only {cut}"
        assert max(cut.values()) < 4.5, cut
        assert p.proc.poll() is None
    finally:
        p.stop()


# --- oversized heads --------------------------------------------------------------------------

def test_a_head_that_never_ends_is_refused_quickly(scene):
    """A header line that never ends: once the head passes 64 KiB, sealgate answers 431 (problem+json)
    or closes, within a few seconds; it does not keep reading.

    Finding 1 (fixed in 69b2407, max_head_bytes): the head was buffered without bound (mitmproxy's
    'FIXME: protect against header size DoS'): 32 MiB in 1.4 s, RSS +32 MiB, and still reading."""
    start = scene.log_size()
    rss_before = rss_kib(scene.pid)
    sock = socket.create_connection(("127.0.0.1", scene.port), timeout=5)
    got, sent, stopped = b"", 0, None
    try:
        sock.sendall(f"GET http://127.0.0.1:{scene.plain.port}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + scene.cred() +
                     b"X-Long: ")
        began = time.monotonic()
        chunk = b"a" * 65536
        while sent < 32 * 1024 * 1024 and time.monotonic() - began < 6:
            try:
                sock.sendall(chunk)
                sent += len(chunk)
            except (TimeoutError, BlockingIOError):  # it stopped reading, but holds the connection: not enough
                break
            except OSError:  # reset, or a broken pipe: it closed
                stopped = "cut"
                break
            if sent % (1024 * 1024) == 0:  # anything back yet?
                more, closed = _read(sock, quiet=0.01, total=0.05)
                got += more
                if got or closed:
                    stopped = "answered" if got else "closed"
                    break
        if stopped is None:
            more, closed = _read(sock, quiet=1, total=1)
            got += more
            stopped = "answered" if got else ("closed" if closed else None)
    finally:
        sock.close()
    grown = rss_kib(scene.pid) - rss_before
    no_value(scene, got)
    assert stopped is not None, f"no 431 and no close after {sent >> 20} MiB of one head (RSS +{grown >> 10} MiB)"
    if got:
        assert got.startswith(b"HTTP/1.1 431") and b"application/problem+json" in got, got[:300]
    assert sent <= 8 * 1024 * 1024, f"the proxy read {sent >> 20} MiB of a head before refusing it"
    scene.finish(start)


def test_a_complete_head_over_64_kib_gets_431(scene):
    """Finding 1, the other half (fixed in 69b2407): a complete 96 KiB head was read whole and forwarded."""
    start = scene.log_size()
    before = len(scene.plain.received)
    head = (f"GET http://127.0.0.1:{scene.plain.port}/big HTTP/1.1\r\nHost: 127.0.0.1:{scene.plain.port}\r\n".encode() +
            scene.cred() + b"".join(b"X-Many-%d: %s\r\n" % (i, b"v" * 90) for i in range(1000)) +
            b"Connection: close\r\n\r\n")
    assert 64 * 1024 < len(head) < 128 * 1024
    with socket.create_connection(("127.0.0.1", scene.port), timeout=5) as sock:
        with contextlib.suppress(OSError):  # refused before the whole head is in: allowed
            sock.sendall(head)
        got, closed = _read(sock, quiet=5, total=5, until=_answer_complete)  # the answer, or the close
    scene.check(got)
    reached = [h for h, _ in scene.plain.received[before:] if h.startswith(b"GET /big")]
    assert not reached, "a head over 64 KiB reached the upstream"
    refused = got.startswith(b"HTTP/1.1 431") and b"application/problem+json" in got or got == b"" and closed
    assert refused, got[:300]
    scene.finish(start)


def test_a_head_just_under_the_limit_still_works(scene):
    """The other side of the limit: a head of 60 KiB with a placeholder is served, filled, and the
    upstream's echo of it scrubbed."""
    start = scene.log_size()
    t = tls_tunnel(scene, f"127.0.0.1:{scene.mirror.port}")
    filler = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 1000) for i in range(60))
    req = (f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:{scene.mirror.port}\r\n".encode() + filler + b"X-Key: " +
           scene.ph() + b"\r\nConnection: close\r\n\r\n")
    assert 56 * 1024 < len(req) < 63 * 1024
    before = len(scene.mirror.received)
    t.sendall(req)
    got, _ = _read(t, quiet=3, total=5, until=_answer_complete)
    t.close()
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    assert scene.ph() in got  # the echo, scrubbed back to the placeholder
    sent = scene.mirror.received[before:]
    assert sent and b"X-Key: " + scene.values[0].encode() in sent[-1][0], "the placeholder was not filled"
    scene.check(got)
    scene.finish(start)


# --- HTTP/2 abuse through an authenticated tunnel ------------------------------------------------

def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _curl_time(scene: Scene) -> tuple[int, float]:
    """A real client in a process of its own (so this test's own work cannot slow it): status and
    curl's own time_total."""
    ph = scene.client["env"]["K"]
    p = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "--proxy",
                        scene.client["proxy_url"], "--cacert", scene.client["ca_cert"], "--max-time", "20",
                        "-H", f"Authorization: Bearer {ph}", scene.api.url("/echo")],
                       capture_output=True, text=True, timeout=30, check=False)
    code, took = (p.stdout.split() + ["0", "99"])[:2]
    return int(code), float(took)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(scene: Scene, within: float = 30) -> float:
    """Wait (bounded) until the proxy is idle: under 10 % CPU for 0.3 s. Returns the seconds
    waited. An attack's work left queued in the proxy shows up here, and does not land on the
    next test."""
    began = time.monotonic()
    while time.monotonic() - began < within:
        cpu = cpu_seconds(scene.pid)
        time.sleep(0.3)
        if cpu_seconds(scene.pid) - cpu < 0.03:
            break
    scene.alive()
    return time.monotonic() - began


class Watch:
    """While an attack runs and until the proxy is idle again (at most 30 s): a real client (curl,
    a process of its own) every 0.25 s, the proxy's RSS every 0.05 s, and the CPU time it used."""

    def __init__(self, scene: Scene) -> None:
        self.scene, self.stop = scene, threading.Event()
        wait_idle(scene)  # what came before is not counted
        self.base = rss_kib(scene.pid)
        self.peak = self.base
        self.cpu = cpu_seconds(scene.pid)
        self.busy = 0.0  # seconds from the end of the attack until the proxy was idle
        self.clients: list[tuple[int, float]] = []
        self.threads = [threading.Thread(target=self._clients), threading.Thread(target=self._rss)]

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.busy = wait_idle(self.scene)
        self.stop.set()
        for t in self.threads:
            t.join()
        self.cpu = cpu_seconds(self.scene.pid) - self.cpu

    def _clients(self) -> None:
        while not self.stop.is_set():
            self.clients.append(_curl_time(self.scene))
            self.stop.wait(0.25)

    def _rss(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError, StopIteration):
                self.peak = max(self.peak, rss_kib(self.scene.pid))
            self.stop.wait(0.05)

    def facts(self, name: str) -> str:
        slowest = max((t for _, t in self.clients), default=0.0)
        return (f"{name}: the proxy spent {self.cpu:.1f} s of CPU, was busy {self.busy:.1f} s after the attack, grew "
                f"by {(self.peak - self.base) >> 10} MiB; the slowest of {len(self.clients)} real clients waited "
                f"{slowest:.2f} s")

    def verdict(self, name: str, *, cpu: float = 2.0) -> None:
        """Every real client served, none waiting FAIR seconds or more; the proxy grew by under 200 MiB
        and spent under cpu seconds on the attack (and on the real clients meanwhile)."""
        assert self.clients, "no real client ran during the attack"
        bad = [c for c in self.clients if c[0] != 200]
        assert not bad, f"{name}: real clients failed during the attack: {bad}"
        facts = self.facts(name)
        assert max(t for _, t in self.clients) < FAIR, facts
        assert (self.peak - self.base) >> 10 < 200, facts
        assert self.cpu < cpu, facts


class H2Attack:
    """An HTTP/2 connection through an authenticated CONNECT to the h2 upstream (ALPN h2, the
    proxy's CA trusted); frames are written raw (hyperframe, hpack) so nothing checks them first."""

    def __init__(self, scene: Scene, target: str | None = None) -> None:
        self.scene, self.target = scene, target or scene.h2up.target
        self.sock = tls_tunnel(scene, self.target, alpn="h2")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_inbound_headers=False))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.encoder = hpack.Encoder()
        self.events: list = []
        self.closed = False

    def headers(self, sid: int, extra=()) -> list:
        return [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", self.target.encode()),
                (b":path", b"/s%d" % sid), *extra]

    def headers_frame(self, sid: int, *, end_stream: bool = True, extra=()) -> bytes:
        flags = ["END_HEADERS"] + (["END_STREAM"] if end_stream else [])
        return hf.HeadersFrame(sid, self.encoder.encode(self.headers(sid, extra)), flags=flags).serialize()

    def send(self, data: bytes, *, within: float = 10) -> bool:
        """Send data; False when the proxy stops reading (backpressure) for `within` seconds, or closes."""
        self.sock.settimeout(within)
        try:
            self.sock.sendall(data)
            return True
        except (TimeoutError, OSError):
            return False

    def pump(self, seconds: float) -> None:
        """Read (and answer, as a client must) for up to seconds, or until the proxy closes."""
        end = time.monotonic() + seconds
        while not self.closed and time.monotonic() < end:
            self.sock.settimeout(max(0.01, min(0.2, end - time.monotonic())))
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except (ssl.SSLError, OSError):
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            try:
                self.events += self.conn.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                self.events.append(e)
            with contextlib.suppress(OSError):
                self.sock.sendall(self.conn.data_to_send())
            if any(isinstance(e, h2.events.ConnectionTerminated) for e in self.events):
                self.closed = True

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def received_bytes(self) -> bytes:
        return b"".join(repr(e).encode() for e in self.events)


FAIR = 2.0  # seconds: a real client's longest wait while one connection abuses HTTP/2


@pytest.mark.e2e  # floods, and the memory and CPU time of the proxy process
@pytest.mark.parametrize("end_stream", [
    pytest.param(True, id="whole-requests"),  # FINDING 3 (fixed): END_STREAM on each HEADERS: mitmproxy dropped
    # the stream and ignored its reset, so 3000 pairs (100 KB) all went upstream at 3-8 s of CPU
    pytest.param(False, id="open-requests"),
])
def test_h2_rapid_reset(scene, end_stream):
    """HEADERS (a whole GET with END_STREAM, or the head of a request whose body would follow) then
    RST_STREAM, 3000 times, sent at once: the proxy closes the connection early (GOAWAY), sends few
    of the reset requests upstream, and spends little."""
    start = scene.log_size()
    a = H2Attack(scene)
    n = 3000
    frames = []
    for i in range(n):
        sid = 1 + 2 * i
        frames.append(a.headers_frame(sid, end_stream=end_stream))
        rst = hf.RstStreamFrame(sid)
        rst.error_code = 8  # CANCEL
        frames.append(rst.serialize())
    data = b"".join(frames)
    w = Watch(scene)
    before = len(scene.h2up.received)
    try:
        with w:
            a.send(data)
            a.pump(2)
        no_value(scene, a.received_bytes())
    finally:
        a.close()
    forwarded = len(scene.h2up.received) - before
    assert forwarded < n // 10, f"{forwarded} of {n} reset streams were still sent upstream; {w.facts('rapid reset')}"
    w.verdict(f"rapid reset of {n} streams ({forwarded} went upstream anyway)")
    scene.finish(start)


@pytest.mark.e2e
def test_h2_header_flood_is_refused(scene):
    """One header block of 480 KB (5000 headers in HEADERS + CONTINUATION frames): the connection is
    closed with a GOAWAY at once, nothing goes upstream, nobody else notices."""
    start = scene.log_size()
    a = H2Attack(scene)
    block = a.encoder.encode(a.headers(1, [(b"x-flood-%d" % i, scene.marker + b"v" * 80) for i in range(5000)]))
    parts = [block[i:i + 16384] for i in range(0, len(block), 16384)]
    data = hf.HeadersFrame(1, parts[0], flags=["END_STREAM"]).serialize() + b"".join(
        hf.ContinuationFrame(1, p, flags=["END_HEADERS"] if i == len(parts) - 2 else []).serialize()
        for i, p in enumerate(parts[1:]))
    w = Watch(scene)
    before = len(scene.h2up.received)
    try:
        with w:
            began = time.monotonic()
            a.send(data)
            a.pump(5)
            took = time.monotonic() - began
        assert a.closed and a.of(h2.events.ConnectionTerminated), "the flooding connection was not closed"
        assert took < 5
        flooded = [h for h, _, _ in scene.h2up.received[before:] if b"x-flood-0" in h]
        assert not flooded, "the flooded header block went upstream"
        assert scene.marker not in a.received_bytes()
        no_value(scene, a.received_bytes())
    finally:
        a.close()
    w.verdict("header flood")
    scene.finish(start)


@pytest.mark.e2e
def test_h2_continuation_without_end_headers_is_cut(scene):
    """HEADERS, then CONTINUATION frames that never say END_HEADERS (the 2024 CONTINUATION flood):
    the proxy closes (or stops reading) after a bounded amount, with flat memory."""
    start = scene.log_size()
    a = H2Attack(scene)
    first = hf.HeadersFrame(1, a.encoder.encode(a.headers(1)), flags=["END_STREAM"]).serialize()
    cont = hf.ContinuationFrame(1, b"\x40\x01a\x01b" * 3000).serialize()  # literal headers, ~15 KB a frame
    sent = 0
    try:
        with Watch(scene) as w:
            a.send(first)
            began = time.monotonic()
            while time.monotonic() - began < 4 and sent < 64 * 1024 * 1024:
                if not a.send(cont * 16, within=2):
                    break
                sent += len(cont) * 16
            a.pump(2)
        assert a.closed, f"the connection was still open after {sent >> 20} MiB of CONTINUATION frames"
        assert sent < 32 * 1024 * 1024, f"the proxy read {sent >> 20} MiB of one header block"
    finally:
        a.close()
    w.verdict("CONTINUATION flood")
    scene.finish(start)


@pytest.mark.e2e
def test_h2_more_streams_than_advertised_are_refused(scene):
    """Open 500 streams at once (HEADERS without END_STREAM, so each stays open) where the proxy
    advertises at most 100: streams beyond the limit are refused (RST_STREAM) or the connection
    is closed, within a bounded time."""
    start = scene.log_size()
    a = H2Attack(scene)
    a.pump(0.5)  # the proxy's SETTINGS
    limit = a.conn.remote_settings.max_concurrent_streams
    assert limit <= 1000, f"the proxy advertises {limit} concurrent streams"
    try:
        with Watch(scene) as w:
            began = time.monotonic()
            a.send(b"".join(a.headers_frame(1 + 2 * i, end_stream=False) for i in range(500)))
            while not a.closed and time.monotonic() - began < 5:
                a.pump(0.5)
                if len({e.stream_id for e in a.of(h2.events.StreamReset)}) >= 500 - limit:
                    break
            took = time.monotonic() - began
        refused = {e.stream_id for e in a.of(h2.events.StreamReset)}
        assert a.closed or len(refused) >= 500 - limit, f"500 streams against a limit of {limit}: none refused"
        assert took < 5
        no_value(scene, a.received_bytes())
    finally:
        a.close()
    w.verdict("too many streams")
    scene.finish(start)


@pytest.mark.e2e
def test_h2_settings_and_ping_flood(scene):
    """FINDING 6 (fixed): nothing limited control frames per connection (2 MiB cost 4 s of CPU and others waited
    as long). 2 MiB of SETTINGS and PING frames as fast as they go, never reading the ACKs: the proxy
    pushes back or closes the connection early, spends little on it, and others are served."""
    start = scene.log_size()
    a = H2Attack(scene)
    ping = hf.PingFrame(0)
    ping.opaque_data = b"12345678"
    settings_frame = hf.SettingsFrame(0, settings={hf.SettingsFrame.HEADER_TABLE_SIZE: 4096,
                                                   hf.SettingsFrame.INITIAL_WINDOW_SIZE: 65535})
    burst = (ping.serialize() + settings_frame.serialize()) * 2048  # 80 KiB
    sent, refused = 0, False
    try:
        with Watch(scene) as w:
            while sent < 2 * 1024 * 1024:
                if not a.send(burst, within=1):
                    refused = True  # it stopped reading us, or closed
                    break
                sent += len(burst)
    finally:
        a.close()
    w.verdict(f"SETTINGS/PING flood ({sent >> 10} KiB sent, {'refused' if refused else 'all read'})")
    scene.finish(start)


class StubbornH2Upstream:
    """An HTTP/2 TLS server on loopback that takes a request's first 64 KiB and never opens its
    flow-control window again: an upstream that reads slowly, or not at all."""

    def __init__(self, pki) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*pki.issue(f"stubborn-{id(self)}", LOOPBACK_SANS))
        self.ctx.set_alpn_protocols(["h2"])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.target = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.got = 0  # body bytes received, over every connection
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            s, _ = self.sock.accept()
            threading.Thread(target=self._one, args=(s,), daemon=True).start()

    def _one(self, s: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            t = self.ctx.wrap_socket(s, server_side=True)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            conn.initiate_connection()
            t.sendall(conn.data_to_send())
            while data := t.recv(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.DataReceived):
                        self.got += len(ev.data)  # and never acknowledged: the window stays shut
                t.sendall(conn.data_to_send())


@pytest.mark.e2e  # sends up to 64 MiB; the memory of the proxy process
@pytest.mark.xfail(strict=True, reason="FINDING 7: an HTTP/2 request body to an HTTP/2 upstream that does not read is "
                   "buffered without bound: mitmproxy opens the worker's window to 2 GiB a stream (BufferedH2Connection) "
                   "and keeps what the upstream's window refuses in stream_buffers; 300 MiB went in within 4.4 s "
                   "(RSS +336 MiB) while the upstream took 64 KiB")
def test_h2_upload_to_an_upstream_that_does_not_read_is_bounded(scene, pki):
    """A POST of unknown length through HTTP/2 to an HTTP/2 upstream whose window stays shut after
    64 KiB: the proxy must stop taking the body (its own window to the worker stays shut) or reset
    the stream, long before it holds 16 MiB the upstream has not taken."""
    start = scene.log_size()
    up = StubbornH2Upstream(pki)
    a = H2Attack(scene, up.target)
    sid, sent, chunk = 1, 0, b"x" * 16384
    try:
        with Watch(scene) as w:
            a.conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", up.target.encode()),
                                      (b":path", b"/upload")])
            a.sock.sendall(a.conn.data_to_send())
            began = time.monotonic()
            shut_since = None
            while sent < 64 * 1024 * 1024 and not a.closed and time.monotonic() - began < 8:
                room = min(a.conn.local_flow_control_window(sid), a.conn.max_outbound_frame_size)
                if room < len(chunk):  # the proxy's window to us is shut: does it open again?
                    shut_since = shut_since or time.monotonic()
                    if time.monotonic() - shut_since > 2:
                        break
                    a.pump(0.2)
                    continue
                shut_since = None
                a.conn.send_data(sid, chunk)
                if not a.send(a.conn.data_to_send(), within=2):
                    break
                sent += len(chunk)
            a.pump(0.2)
        held = sent - up.got
        no_value(scene, a.received_bytes())
    finally:
        a.close()
    reset = any(e.stream_id == sid for e in a.of(h2.events.StreamReset))
    assert reset or a.closed or held < 16 * 1024 * 1024, \
        f"the proxy took {sent >> 20} MiB of the body while the upstream took {up.got >> 10} KiB; {w.facts('upload')}"
    w.verdict("upload to an upstream that does not read")
    scene.finish(start)


@pytest.mark.e2e
def test_h2_a_normal_request_still_works_after_the_abuse(scene):
    """The h2 path itself still works: a request with a placeholder is filled and answered."""
    a = H2Attack(scene)
    nonce = secrets.token_hex(6).encode()
    try:
        sid = 1
        a.conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"),
                                  (b":authority", scene.h2up.target.encode()), (b":path", b"/after-" + nonce),
                                  (b"x-key", scene.ph())], end_stream=True)
        a.sock.sendall(a.conn.data_to_send())
        began = time.monotonic()
        while not a.of(h2.events.StreamEnded) and time.monotonic() - began < PROMPT:
            a.pump(0.2)
    finally:
        a.close()
    assert a.of(h2.events.ResponseReceived) and a.of(h2.events.StreamEnded)
    got = dict(a.of(h2.events.ResponseReceived)[0].headers)
    assert got[b":status"] == b"200"
    ours = [h for h, _, _ in scene.h2up.received if h.get(b":path") == b"/after-" + nonce]
    assert ours and ours[-1].get(b"x-key") == scene.values[0].encode(), "the placeholder was not filled"
    no_value(scene, a.received_bytes())


def test_h2_window_updates_of_a_reading_worker_are_not_a_flood(scene):
    """A worker reading a large response sends a WINDOW_UPDATE every few frames: 3000 of them, then a
    request, on one connection: the request is answered, the connection stays open (the control-frame
    limit counts SETTINGS, PING and PRIORITY, never WINDOW_UPDATE)."""
    a = H2Attack(scene)
    update = hf.WindowUpdateFrame(0)
    update.window_increment = 1
    try:
        assert a.send(update.serialize() * 3000)
        a.conn.send_headers(1, a.headers(1), end_stream=True)
        a.sock.sendall(a.conn.data_to_send())
        began = time.monotonic()
        while not a.of(h2.events.StreamEnded) and not a.closed and time.monotonic() - began < PROMPT:
            a.pump(0.2)
        assert not a.of(h2.events.ConnectionTerminated), "a reading worker's WINDOW_UPDATEs closed its connection"
        assert [e for e in a.of(h2.events.ResponseReceived) if e.stream_id == 1], "the request was not answered"
    finally:
        a.close()
