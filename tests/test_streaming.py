"""Streaming: large and chunked bodies flow through with flat memory while placeholders
are filled (also when split across chunks), SSE responses arrive as they come and are
scrubbed, WebSocket messages follow the same rules; and the pure rewriter under hypothesis."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time

import pytest
from hypothesis import assume, given, settings, strategies as st

from sealgate import inject, placeholders
from sealgate.inject import Context
from sealgate.scrub import Scrubber
from sealgate.streams import StreamRewriter
from conftest import curl
from upstream import RawUpstream, header, raw_response
from wire import read_all, read_until, tunnel

KEY = os.urandom(32)
SID = "abcdefghijklmnop"


# --- the pure rewriter ---------------------------------------------------------------------------

def _fill_find(values: dict[str, str], context: Context):
    def find(buf: bytes):
        for f in placeholders.find(buf):
            yield f.start, f.end, inject.escape(values[f.placeholder.text], context)
    return find


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def _run(rewriter: StreamRewriter, chunks: list[bytes]) -> bytes:
    return b"".join(rewriter.feed(c) for c in chunks) + rewriter.finish()


names = st.sampled_from(["A", "B_2", "LONG_" + "N" * 59])
values = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=8, max_size=30)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.binary(max_size=40), names), max_size=6), st.binary(max_size=40),
       st.lists(st.integers(0, 2000), max_size=12), values, st.sampled_from(list(Context)))
def test_streamed_filling_equals_whole(parts, tail, cuts, value, context):
    tokens = {n: placeholders.mint(KEY, SID, n) for n in ("A", "B_2", "LONG_" + "N" * 59)}
    vals = {t: value + n for n, t in tokens.items()}
    data = b"".join(filler + tokens[n].encode() for filler, n in parts) + tail
    expected = inject.substitute(data, placeholders.find(data), vals, context)
    got = _run(StreamRewriter(_fill_find(vals, context), lambda: placeholders.MAX_LEN), _chunked(data, cuts))
    assert got == expected


@settings(max_examples=300)
@given(values, st.lists(st.tuples(st.binary(max_size=30), st.sampled_from(list(Context))), max_size=5),
       st.binary(max_size=30), st.lists(st.integers(0, 1000), max_size=12))
def test_streamed_scrubbing_equals_whole_and_leaves_no_value(value, parts, tail, cuts):
    p = placeholders.mint(KEY, SID, "K")
    pairs = inject.derived_forms(value, p)
    assume(all(needle not in p.encode() for needle, _ in pairs))
    scrubber = Scrubber(pairs)
    data = b"".join(filler + inject.escape(value, c) for filler, c in parts) + tail
    got = _run(scrubber.stream(), _chunked(data, cuts))
    assert got == scrubber.scrub(data)
    assert all(needle not in got for needle, _ in pairs)


def test_rewriter_holds_back_only_a_tail():
    r = StreamRewriter(lambda buf: [], lambda: 10)
    assert r.feed(b"0123456789abcdef") == b"0123456"  # 9 bytes held: a 10-byte match could start there
    assert r.feed(b"") == b""
    assert r.finish() == b"789abcdef"


# --- through the proxy -----------------------------------------------------------------------------

def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_placeholder_split_across_chunks_is_filled(proxy, pki, user, value):
    up = RawUpstream(pki, lambda head, body, sock: raw_response(b"stored " + body))
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    ph = s["env"]["K"].encode()
    target = f"127.0.0.1:{up.port}"
    t = tunnel(s, proxy.port, target, None)
    t.sendall(f"POST /upload HTTP/1.1\r\nHost: {target}\r\nTransfer-Encoding: chunked\r\n"
              f"Content-Type: application/json\r\nConnection: close\r\n\r\n".encode())
    body = b'{"key": "' + ph + b'", "again": "' + ph + b'"}'
    for piece in (body[:12], body[12:40], body[40:95], body[95:]):  # both placeholders cut apart
        t.sendall(_chunk(piece))
        time.sleep(0.05)
    t.sendall(b"0\r\n\r\n")
    out = read_all(t)
    assert json.loads(up.received[0][1]) == {"key": value, "again": value}
    assert out.partition(b"\r\n\r\n")[2].endswith(b'{"key": "' + ph + b'", "again": "' + ph + b'"}')
    assert value.encode() not in out and value.encode() not in proxy.visible_to_operators()


def _rss_kib(pid: int) -> int:
    return int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")).split()[1])


@pytest.mark.e2e  # the memory of the proxy process
def test_one_gib_upload_streams_with_flat_memory(proxy, pki, user, value):
    up = RawUpstream(pki, lambda head, body, sock: raw_response(b"ok"), keep_bodies=False)
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    ph = s["env"]["K"].encode()
    target = f"127.0.0.1:{up.port}"
    block = os.urandom(1 << 20).replace(b"sg.", b"xx.")
    total = 1 << 30
    before = _rss_kib(proxy.proc.pid)
    t = tunnel(s, proxy.port, target, None)
    # placeholders at the start, across the 1 MiB block boundary in the middle, and at the end
    first, last = b"key=" + ph + b"&", b"&end=" + ph
    middle_at = 512 * len(block) - 50
    t.sendall(f"POST /big HTTP/1.1\r\nHost: {target}\r\nContent-Length: {total}\r\n"
              f"Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n".encode())
    expected = hashlib.sha256()
    sent, peak = 0, before
    while sent < total:
        piece = block if sent else first + block[len(first):]
        if sent <= middle_at < sent + len(piece):
            off = middle_at - sent
            piece = piece[:off] + ph + piece[off + len(ph):]
        piece = piece[: total - sent]
        if sent + len(piece) == total:
            piece = piece[: -len(last)] + last
        t.sendall(piece)
        expected.update(piece.replace(ph, value.encode()))
        sent += len(piece)
        if sent % (64 << 20) == 0:
            peak = max(peak, _rss_kib(proxy.proc.pid))
    out = read_all(t, 30)
    peak = max(peak, _rss_kib(proxy.proc.pid))
    assert out.startswith(b"HTTP/1.1 200")
    assert up.body_sizes[-1] == total + 3 * (len(value) - len(ph))
    assert up.body_hashes[-1] == expected.hexdigest()  # every placeholder filled, nothing else changed
    print(f"1 GiB upload: proxy RSS {before // 1024} MiB before, peak {peak // 1024} MiB")
    assert (peak - before) < 64 * 1024, f"proxy grew by {(peak - before) // 1024} MiB"


def test_refused_placeholder_in_streamed_body_cuts_the_upstream(proxy, pki, make_upstream, user, value):
    api = make_upstream("127.0.0.1")
    evil = RawUpstream(pki, lambda head, body, sock: raw_response(b"got it"), host="127.0.0.2")
    proxy.add_secret(user, "K", value, api.origin)
    s = proxy.issue(user=user)
    target = f"127.0.0.2:{evil.port}"
    t = tunnel(s, proxy.port, target, None)
    t.sendall(f"POST /steal HTTP/1.1\r\nHost: {target}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
              .encode())
    t.sendall(_chunk(b"harmless start; "))
    time.sleep(0.2)
    t.sendall(_chunk(b"key=" + s["env"]["K"].encode()) + b"0\r\n\r\n")
    out = read_all(t, 5)
    time.sleep(0.5)
    assert evil.received == []  # the upstream never saw a complete request
    assert value.encode() not in out and value.encode() not in evil.seen()
    assert "decision=block code=origin_not_allowed" in proxy.log.read_text()


def test_a_request_refused_while_its_body_arrives_is_closed_at_once(proxy, pki, make_upstream, user, value, tmp_path):
    """Regression: a request refused at its head whose large body the client sends without waiting (no
    `Expect: 100-continue`, as Node's fetch sends) had its flow killed but its connection left open: the worker
    waited for an answer until its own timeout. Now the connection is closed at once."""
    api = make_upstream("127.0.0.1")
    proxy.add_secret(user, "K", value, "https://elsewhere.example")
    s = proxy.issue(user=user)
    (tmp_path / "big").write_bytes(b"x" * (3 << 20))
    before = len(api.received)
    with pytest.raises(AssertionError) as e:
        curl(s, api.url("/x"), "-X", "PUT", "-H", f"X-Key: {s['env']['K']}", "-H", "Expect:",
             "--data-binary", f"@{tmp_path / 'big'}")
    assert "timed out" not in str(e.value) and ("reset" in str(e.value) or "Empty reply" in str(e.value)), e.value
    assert len(api.received) == before


@pytest.mark.e2e  # (slow by design: it times when each event arrives)
def test_sse_events_arrive_as_they_come_and_are_scrubbed(proxy, pki, user, value):
    def answer(head, body, sock):
        key = header(head, b"x-key")
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        event = b"data: echo " + key + b"\n\n"
        for piece in (event[:15], event[15:]):  # the value split across two chunks
            sock.sendall(_chunk(piece))
            time.sleep(0.2)
        time.sleep(2)  # the stream stays open: the first event must already be at the worker
        sock.sendall(_chunk(b"data: done\n\n") + b"0\r\n\r\n")
    up = RawUpstream(pki, answer)
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    target = f"127.0.0.1:{up.port}"
    t = tunnel(s, proxy.port, target, None)
    t.sendall(f"GET /events HTTP/1.1\r\nHost: {target}\r\nX-Key: {s['env']['K']}\r\nConnection: close\r\n\r\n"
              .encode())
    early = read_all(t, 1.2)
    assert s["env"]["K"].encode() in early and b"done" not in early  # the first event, before the stream ends
    rest = read_all(t, 4)
    whole = early + rest
    assert b"data: done" in whole
    assert value.encode() not in whole and value.encode() not in proxy.visible_to_operators()


def _ws_frame(payload: bytes, mask: bool) -> bytes:
    head = bytes([0x81, (0x80 if mask else 0) | len(payload)])
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _ws_upstream(pki, host="127.0.0.1"):
    """Answers the upgrade, then echoes the first client frame back as 'you sent ...'."""
    def answer(head, body, sock):
        key = header(head, b"sec-websocket-key")
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        sock.settimeout(5)
        frame = sock.recv(4096)
        n, mask = frame[1] & 0x7F, frame[2:6]
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(frame[6:6 + n]))
        up.frames.append(payload)
        sock.sendall(_ws_frame(b"you sent " + payload, mask=False))
        time.sleep(0.4)  # the socket stays open while the frames reach the worker
    up = RawUpstream(pki, answer, host=host)
    up.frames = []
    return up


def _ws_open(s, proxy_port, target):
    t = tunnel(s, proxy_port, target, None)
    t.sendall(f"GET /ws HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += t.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return t


def test_websocket_client_message_is_filled_and_echo_scrubbed(proxy, pki, user, value):
    up = _ws_upstream(pki)
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    t = _ws_open(s, proxy.port, f"127.0.0.1:{up.port}")
    t.sendall(_ws_frame(json.dumps({"auth": s["env"]["K"]}).encode(), mask=True))
    out = read_all(t, 3)
    assert json.loads(up.frames[0]) == {"auth": value}
    assert s["env"]["K"].encode() in out and value.encode() not in out


def test_websocket_message_to_other_origin_closes_with_reason(proxy, pki, make_upstream, user, value):
    api = make_upstream("127.0.0.1")
    evil = _ws_upstream(pki, host="127.0.0.2")
    proxy.add_secret(user, "K", value, api.origin)
    s = proxy.issue(user=user)
    t = _ws_open(s, proxy.port, f"127.0.0.2:{evil.port}")
    t.sendall(_ws_frame(f"key={s['env']['K']}".encode(), mask=True))
    out = read_until(t, b"origin_not_allowed", 3)
    assert evil.frames == []
    assert b"origin_not_allowed" in out
    assert value.encode() not in out


def test_streamed_json_context_is_decided_by_the_first_real_bytes(proxy, pki, user):
    value = f'sk-{os.urandom(6).hex()}","admin":true,"x":"y'
    up = RawUpstream(pki, lambda head, body, sock: raw_response(b"ok"))
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    t = tunnel(s, proxy.port, up.target, None)
    t.sendall(f"POST / HTTP/1.1\r\nHost: {up.target}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
              .encode() + _chunk(b"\n  "))
    time.sleep(0.3)
    t.sendall(_chunk(b'{"key": "' + s["env"]["K"].encode() + b'"}') + b"0\r\n\r\n")
    read_all(t, 3)
    assert json.loads(up.received[0][1]) == {"key": value}  # the value stayed inside its string


def test_error_page_after_streamed_injection_is_withheld(proxy, pki, user):
    value = f"sk-\u00e9t\u00e9-{os.urandom(8).hex()}"
    up = RawUpstream(pki, lambda head, body, sock: b"HTTP/1.1 2" + body + b" OK\r\nContent-Length: 0\r\n\r\n")
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    t = tunnel(s, proxy.port, up.target, None)
    t.sendall(f"POST / HTTP/1.1\r\nHost: {up.target}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
              .encode() + _chunk(b"k=" + s["env"]["K"].encode()) + b"0\r\n\r\n")
    out = read_all(t, 3)
    assert up.received[0][1] == b"k=" + value.encode()
    escaped = repr(value.encode())[2:-1].encode()  # how an error page would quote the bytes
    assert escaped not in out and value.encode() not in out


def test_a_broken_response_stream_is_recorded_without_the_text_of_an_unexpected_exception(value):
    """The refusal of a streamed response that could not be checked reaches the dashboard (the flow's metadata):
    a BodyError's text is sealgate's own, another exception's (raised over the upstream's bytes) is not quoted."""
    from types import SimpleNamespace

    from sealgate.addon import Sealgate
    from sealgate.bodies import BodyError
    refused = []
    fake = SimpleNamespace(recorder=SimpleNamespace(refuse=lambda flow, refusal, answer: refused.append(refusal)))
    Sealgate._cut_response(fake, None, ValueError(f"bad byte near {value}"))
    Sealgate._cut_response(fake, None, BodyError("the body is not valid gzip: BadGzipFile"))
    assert [r.code for r in refused] == ["unscrubbable_response"] * 2
    assert value not in str(refused[0]) and "ValueError" in str(refused[0])
    assert "not valid gzip" in str(refused[1])
