"""Red team round 13 (issue 11: linked accounts and request signing): each finding, as the test that failed
before its fix. Signatures echoed over WebSocket, kept by the upstream or re-encoded; the answer to a
re-sent request not checked; a refresh undoing `link rm`; slow token endpoints starving DNS; a transient
answer breaking a link; 401s driving refreshes; odd input crashing; unsealed link fields reaching a
terminal."""
from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import secrets
import threading
import time

import pytest
import yaml

import conftest
from conftest import curl, make_proxy
from oauth_server import OAuthServer
from upstream import RawUpstream, header, raw_response
from wire import one_request, read_all, tunnel

from sealgate import signing

SECRET_ENV = "SEALGATE_RT11_CLIENT_SECRET"


# --- signing -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def px(proxy_in_process):
    return proxy_in_process


def _frame(payload: bytes) -> bytes:
    return (bytes([0x81, len(payload)]) if len(payload) < 126 else bytes([0x81, 126]) + len(payload).to_bytes(2, "big")) + payload


def _ws_echo(pki, name: bytes) -> RawUpstream:
    """A WebSocket server that says which value of header `name` it got, in its first text frame."""
    def answer(head, body, sock):
        accept = base64.b64encode(hashlib.sha1(header(head, b"sec-websocket-key")
                                               + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        sock.sendall(_frame(b"you sent " + header(head, name)))
        time.sleep(0.5)
    return RawUpstream(pki, answer)


def _ws_upgrade(s, port, target, extra: str) -> bytes:
    t = tunnel(s, port, target, None)
    t.sendall((f"GET /ws HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n").encode())
    return read_all(t, 3)


def test_F1_hmac_signature_never_reaches_the_worker_in_websocket_frames(px, pki, user):
    key = "whsec-" + secrets.token_urlsafe(24)
    conftest.CREATED_VALUES.append(key)
    up = _ws_echo(pki, b"x-signature")
    px.add_secret(user, "WH", key, up.origin, "--sign", "hmac-sha256", "--sign-header", "X-Signature")
    s = px.issue(user=user)
    out = _ws_upgrade(s, px.port, up.target, f"X-Signature: {s['env']['WH']}\r\n")
    sig = signing.hmac_sha256_hex(key, b"").encode()  # HMAC of the empty body: valid for ever
    assert header(up.received[0][0], b"x-signature") == sig
    assert sig not in out


def test_F1_sigv4_signature_never_reaches_the_worker_in_websocket_frames(px, pki, user):
    key_id = "AKIA" + secrets.token_hex(8).upper()
    value = f"{key_id}:{secrets.token_urlsafe(30)}"
    conftest.CREATED_VALUES.extend([value, *value.split(":")])
    up = _ws_echo(pki, b"authorization")
    px.add_secret(user, "AWS", value, up.origin, "--sign", "aws-sigv4", "--region", "us-east-1",
                  "--service", "execute-api")
    s = px.issue(user=user)
    out = _ws_upgrade(s, px.port, up.target, f"Authorization: {s['env']['AWS']}\r\n")
    sig = header(up.received[0][0], b"authorization").rsplit(b"Signature=", 1)[1]
    assert len(sig) == 64 and key_id.encode() not in out
    assert sig not in out


def test_F2_a_signature_kept_by_the_upstream_is_scrubbed_from_a_later_response(px, pki, user):
    stored: list[bytes] = []

    def answer(head, body, sock):  # a webhook receiver with a delivery log
        if head.startswith(b"POST"):
            stored.append(header(head, b"x-signature"))
            return raw_response(b"ok")
        return raw_response(json.dumps([d.decode() for d in stored]).encode())
    up = RawUpstream(pki, answer)
    key = "whsec-" + secrets.token_urlsafe(24)
    conftest.CREATED_VALUES.append(key)
    px.add_secret(user, "WH", key, up.origin, "--sign", "hmac-sha256", "--sign-header", "X-Signature")
    s = px.issue(user=user)
    body = '{"event": "anything the worker wants signed"}'
    assert curl(s, up.origin + "/deliveries", "-H", f"X-Signature: {s['env']['WH']}", "--data-binary", body).status == 200
    r = curl(s, up.origin + "/deliveries")
    assert signing.hmac_sha256_hex(key, body.encode()).encode() not in r.body


def test_F2_a_signature_echoed_in_base64_is_scrubbed(px, pki, user):
    up = RawUpstream(pki, lambda head, body, sock: raw_response(base64.b64encode(header(head, b"x-signature"))))
    key = "whsec-" + secrets.token_urlsafe(24)
    conftest.CREATED_VALUES.append(key)
    px.add_secret(user, "WH", key, up.origin, "--sign", "hmac-sha256", "--sign-header", "X-Signature")
    s = px.issue(user=user)
    r = curl(s, up.origin + "/x", "-H", f"X-Signature: {s['env']['WH']}", "--data-binary", "hello")
    assert base64.b64decode(r.body) != signing.hmac_sha256_hex(key, b"hello").encode()


# --- linked accounts ---------------------------------------------------------------------------------

class HostileIdP(OAuthServer):
    """tests/oauth_server.OAuthServer whose token endpoint can be told what to answer next."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.next_token_answers: list = []

    def _token(self, rec):
        with self._lock:
            odd = self.next_token_answers.pop(0) if self.next_token_answers else None
        return odd if odd is not None else super()._token(rec)


@pytest.fixture(scope="module")
def client_secret():
    secret = "cs-" + secrets.token_urlsafe(24)
    conftest.CREATED_VALUES.append(secret)
    os.environ[SECRET_ENV] = secret
    yield secret
    os.environ.pop(SECRET_ENV, None)


@pytest.fixture(scope="module")
def box(tmp_path_factory, pki, client_secret):
    """A proxy with provider my-prov: a real OAuth server, and a second origin of the provider's API we script."""
    idp = HostileIdP(pki, client_secret=client_secret)
    script = {"answer": lambda head, body, sock: raw_response(b"{}")}
    raw = RawUpstream(pki, lambda head, body, sock: script["answer"](head, body, sock))
    d = tmp_path_factory.mktemp("rt11links")
    entry = {"origins": [idp.origin, raw.origin], "authorize_url": idp.authorize_url, "token_url": idp.token_url,
             "client_id": idp.client_id, "client_secret_env": SECRET_ENV, "scopes": ["read"]}
    (d / "p.yaml").write_text(yaml.safe_dump({"providers": {"my-prov": entry}}))
    p = make_proxy(d, pki, SEALGATE_PROVIDERS=str(d / "p.yaml"))
    p.start()
    yield p, idp, raw, script
    p.stop()
    idp.close()
    conftest.CREATED_VALUES.extend(idp.access_tokens | idp.refresh_tokens)


def link(p, idp, user, *, due: bool = False):
    idp.expires_in = 30 if due else 3600  # 30 s: within the refresh margin, refreshed before it is sent
    try:
        url = p.cli("link", "start", "--user", user, "--provider", "my-prov",
                    "--redirect-uri", "https://platform.example/cb").stdout.strip()
        code, state = idp.authorize(url)
        p.cli("link", "finish", "--state", state, f"--code={code}")
    finally:
        idp.expires_in = 3600


def use(s, url):
    return curl(s, url, "-H", f"Authorization: Bearer {s['env']['MY_PROV']}")


def first_401_then(then):
    """Provider API: 401 the first time a path is asked for, then `then` (the re-send)."""
    seen, lock = set(), threading.Lock()

    def answer(head, body, sock):
        path = head.split(b" ")[1]
        with lock:
            first = path not in seen
            seen.add(path)
        return raw_response(b"{}", b"401 Unauthorized") if first else then(head, body, sock)
    return answer


def test_F3_the_answer_to_the_resend_is_checked_like_any_other(box, user):
    """Normal path: Transfer-Encoding gzip -> 502 unscrubbable_response. The re-send's answer loses the header."""
    p, idp, raw, script = box

    def echo_te(head, body, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n"
                     + gzip.compress(b"you sent: " + header(head, b"authorization")))
    script["answer"] = first_401_then(echo_te)
    link(p, idp, user)
    s = p.issue(user=user)
    r = use(s, raw.origin + "/echo")
    try:
        got = gzip.decompress(r.body)
    except OSError:
        got = r.body
    assert not [t for t in idp.access_tokens if t.encode() in got], "the worker gunzipped a live access token"


@pytest.mark.e2e  # (slow by design: a provider that takes its time, or many MiB)
def test_F4_link_rm_is_not_undone_by_a_refresh_in_flight(box, user):
    p, idp, raw, _ = box
    link(p, idp, user, due=True)
    s = p.issue(user=user)
    idp.delay = 2.0
    try:
        t = threading.Thread(target=lambda: use(s, idp.origin + "/api/me"))
        t.start()
        time.sleep(0.8)
        p.cli("link", "rm", "--user", user, "--provider", "my-prov")
        t.join()
    finally:
        idp.delay = 0.0
    assert json.loads(p.cli("link", "list", "--user", user, "--json").stdout) == []
    assert "MY_PROV" not in p.issue(user=user)["env"]


@pytest.mark.e2e  # (slow: a token endpoint that takes 8 s)
def test_F5_slow_token_endpoint_does_not_stall_other_tenants(box, make_upstream):
    p, idp, raw, _ = box
    users = [f"slow-{i}-{secrets.token_hex(3)}" for i in range(8)]
    for u in users:
        link(p, idp, u, due=True)
    sessions = [p.issue(user=u) for u in users]
    idp.delay = 8.0
    try:
        threads = [threading.Thread(target=lambda s=s: use(s, idp.origin + "/api/me")) for s in sessions]
        for t in threads:
            t.start()
        time.sleep(1.5)
        victim, s2 = make_upstream("127.0.0.1"), p.issue(user="victim-" + secrets.token_hex(3))
        t0 = time.time()
        r = curl(s2, victim.url("/hello"))  # no placeholder, another user, another upstream
        took = time.time() - t0
        for t in threads:
            t.join()
    finally:
        idp.delay = 0.0
    assert r.status == 200 and took < 2, f"an unrelated request waited {took:.1f} s"


def test_F6_a_transient_token_endpoint_error_does_not_break_the_link(box, user, client_secret):
    p, idp, raw, _ = box
    link(p, idp, user, due=True)
    s = p.issue(user=user)
    idp.fail_next(1, 400)  # 400 {"error": "temporarily_unavailable"}
    assert use(s, idp.origin + "/api/me").status == 200  # the token is still valid: it goes as it is
    idp.client_secret = "rotated"  # the platform's client secret, wrong for a moment: 401 invalid_client
    try:
        use(s, idp.origin + "/api/me")
    finally:
        idp.client_secret = client_secret
    status = json.loads(p.cli("link", "list", "--user", user, "--json").stdout)[0]
    assert status["status"] == "ok", status  # broken: every session of the user refused until relinked


def test_F7_a_provider_that_always_answers_401_costs_one_refresh_not_one_per_request(box, user):
    p, idp, raw, script = box
    script["answer"] = lambda head, body, sock: raw_response(b'{"message":"Bad credentials"}', b"401 Unauthorized")
    link(p, idp, user)
    s = p.issue(user=user)
    calls = idp.refresh_calls
    for _ in range(5):
        assert use(s, raw.origin + "/needs-another-scope").status == 401
    assert idp.refresh_calls - calls <= 1, f"{idp.refresh_calls - calls} refreshes for 5 requests"


@pytest.mark.parametrize("expires_in", [float("inf"), 10 ** 400])
def test_F8_odd_expires_in_is_a_clean_refusal_and_does_not_hold_the_lease(box, user, expires_in):
    p, idp, raw, _ = box
    link(p, idp, user, due=True)
    s = p.issue(user=user)
    idp.next_token_answers.append((200, {}, {"access_token": "acc-" + "a" * 20, "expires_in": expires_in}))
    r = use(s, idp.origin + "/api/me")
    t0 = time.time()
    use(s, idp.origin + "/api/me")
    assert r.headers.get("x-sealgate-error") != "internal_error"
    assert time.time() - t0 < 5, "the lease of the crashed refresh held the next request 15 s"


def test_F8_a_resend_of_a_non_ascii_path_is_not_an_internal_error(box, user):
    p, idp, raw, script = box
    script["answer"] = first_401_then(lambda head, body, sock: raw_response(b"{}"))
    link(p, idp, user)
    s = p.issue(user=user)
    out = one_request(s, p.port, raw.target, None,
                      f"GET /caf\u00e9 HTTP/1.1\r\nHost: {raw.target}\r\nAuthorization: Bearer {s['env']['MY_PROV']}\r\n"
                      "Connection: close\r\n\r\n".encode())
    assert b"internal_error" not in out  # it says "nothing was sent"; the request was sent and the token refreshed


@pytest.mark.parametrize("tokens", ['{"access_token": "acc-aaaaaaaaaaaaaaaa", "expires_in": 1e400}',
                                    "[" * 100000 + "]" * 100000])
def test_F8_link_add_with_odd_json_is_one_line(tmp_path, pki, tokens):
    (tmp_path / "p.yaml").write_text("providers:\n  gh:\n    origins: [https://api.github.com]\n")
    p = make_proxy(tmp_path, pki, SEALGATE_PROVIDERS=str(tmp_path / "p.yaml"))
    r = p.cli("link", "add", "--user", "u1", "--provider", "gh", input=tokens, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-200:]


def test_F9_link_fields_edited_without_the_key_do_not_reach_the_terminal(tmp_path, pki):
    import sqlite3
    (tmp_path / "p.yaml").write_text("providers:\n  gh:\n    origins: [https://api.github.com]\n")
    p = make_proxy(tmp_path, pki, SEALGATE_PROVIDERS=str(tmp_path / "p.yaml"))
    p.cli("link", "add", "--user", "u1", "--provider", "gh", input='{"access_token": "acc-' + "x" * 20 + '"}')
    db = sqlite3.connect(p.data_dir / "sealgate.db")
    db.execute("update links set status = 'broken', detail = ? where owner = 'u1'", ["\x1b[2Jrelink at evil\x1b[0m"])
    db.commit()
    db.close()
    r = p.cli("link", "list", "--user", "u1", check=False)  # status and detail are sealed: the edit is refused
    assert r.returncode == 1 and "was changed without the master key" in r.stderr
    assert "\x1b" not in r.stdout + r.stderr


# --- round 14: attacks on round 13's fixes ----------------------------------------------------------

def _find_b64(out: bytes, needle: bytes) -> bool:
    """Whether needle is in out decoded as base64 from any start/alignment (what a worker would try)."""
    for i in range(len(out)):
        t = out[i:]
        t = t[:len(t) // 4 * 4]
        try:
            if needle in base64.b64decode(t):
                return True
        except Exception:
            pass
    return False


def test_A1_a_signature_next_to_a_value_in_base64_is_scrubbed(px, pki, user):
    """Round 14: `X-Signature: <VAL>:<WH>` echoed as base64 (as in F2): the value's base64 match overlapped the
    signature's 4-char group, Scrubber.matches dropped the overlapping signature match, and the signature
    went to the worker. Overlapping matches are now one span."""
    up = RawUpstream(pki, lambda head, body, sock: raw_response(base64.b64encode(header(head, b"x-signature"))))
    key = "whsec-" + secrets.token_urlsafe(24)
    val = "val-" + secrets.token_urlsafe(20)  # 31 chars: with ":", the signature starts mid base64 group
    conftest.CREATED_VALUES.extend([key, val])
    px.add_secret(user, "WH", key, up.origin, "--sign", "hmac-sha256", "--sign-header", "X-Signature")
    px.add_secret(user, "VAL", val, up.origin)
    s = px.issue(user=user)
    r = curl(s, up.origin + "/x", "-H", f"X-Signature: {s['env']['VAL']}:{s['env']['WH']}", "--data-binary", "hello")
    sig = signing.hmac_sha256_hex(key, b"hello").encode()
    assert header(up.received[-1][0], b"x-signature").endswith(sig)  # it was signed
    assert not _find_b64(r.body, sig[4:]), r.body


@pytest.mark.e2e
def test_A4_a_gzip_bomb_of_hex_after_a_signature_stalls_no_one(px, pki, user, make_upstream):
    """Round 14: a small gzip'd body is held whole and decoded (up to 256 MiB), then searched for signatures on
    the event loop: a lookup at every position of a hex run took ~0.4 s per MiB; now one every 32 bytes."""
    import gzip as gz
    blob = gz.compress(b"0123456789abcdef" * (4 << 20), 9)  # 64 MiB of hex, ~70 KiB on the wire

    def answer(head, body, sock):
        if b"/blob" in head.split(b"\r\n", 1)[0]:
            return raw_response(blob, extra=b"Content-Type: text/plain\r\nContent-Encoding: gzip\r\n")
        return raw_response(b"ok")
    up = RawUpstream(pki, answer)
    key = "whsec-" + secrets.token_urlsafe(24)
    conftest.CREATED_VALUES.append(key)
    px.add_secret(user, "WH4", key, up.origin, "--sign", "hmac-sha256", "--sign-header", "X-Signature")
    s = px.issue(user=user)
    assert curl(s, up.origin + "/sign", "-H", f"X-Signature: {s['env']['WH4']}", "--data-binary", "x").status == 200
    victim, s2 = make_upstream("127.0.0.1"), px.issue(user="victim-" + secrets.token_hex(3))
    t = threading.Thread(target=lambda: curl(s, up.origin + "/blob", "-o", "/dev/null"))
    t.start()
    time.sleep(1.0)
    t0 = time.time()
    curl(s2, victim.url("/hello"))
    waited = time.time() - t0
    t.join()
    # Before: the victim timed out (20 s and more). Now the 64 MiB are scrubbed on the event loop in 1 to 3 s
    # (values included: responses held whole are scrubbed there, issue 13); linear in the data whatever its
    # shape, which test_derived.py checks by counting lookups rather than by time.
    assert waited < 10, f"an unrelated request waited {waited:.1f} s"


@pytest.mark.e2e  # ~70 s
def test_A5_dripping_answers_hold_no_outbound_thread_past_the_deadline(box):
    """Round 14: off_loop's 30 s deadline stopped the wait, not the thread (http.client's 10 s timeout is per
    read): an answer whose head drips a byte every few seconds held an outbound thread for as long as it
    dripped, and 8 of them starved every user's refreshes and re-sends. A watchdog now ends the connection."""
    p, idp, raw, script = box
    stop = threading.Event()

    def drip(head, body, sock):
        if b"/drip" in head.split(b"\r\n", 1)[0]:
            sock.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not stop.wait(3):
                try:
                    sock.sendall(b"a")
                except OSError:
                    return None
            return None
        return raw_response(b'{"ok": true}')
    script["answer"] = first_401_then(drip)
    users = [f"drip-{i}-{secrets.token_hex(3)}" for i in range(8)]
    for u in users:
        link(p, idp, u)
    def quiet(u):
        try:
            use(p.issue(user=u), raw.origin + f"/drip/{u}")
        except AssertionError:
            pass  # curl gives up after 20 s; the proxy's thread does not
    threads = [threading.Thread(target=quiet, args=(u,)) for u in users]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()  # each gets its 502 after 30 s ...
        victim = f"victim-{secrets.token_hex(3)}"
        link(p, idp, victim)
        time.sleep(12)  # past off_loop's 30 s deadline for all of them
        t0 = time.time()
        try:
            r = use(p.issue(user=victim), raw.origin + "/fine")  # ... but their threads are still held
            status = r.status
        except AssertionError as e:
            status = str(e)[:80]
        took = time.time() - t0
    finally:
        stop.set()
    assert status == 200 and took < 5, f"another user's re-send: {status} after {took:.1f} s"



# --- review: what a refusal quotes ---------------------------------------------------------------------

def test_the_refusal_of_a_resent_answer_quotes_nothing_it_sent(box, user):
    """A refusal's detail goes to the worker as sealgate's own text, unscrubbed: the answer to a re-sent request
    named a Transfer-Encoding after the Authorization it got (the live token), and the detail quoted it."""
    p, idp, raw, script = box

    def echo_in_te(head, body, sock):
        token = header(head, b"authorization").split(b" ")[-1]
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + token + b"\r\nConnection: close\r\n\r\nhi")
    script["answer"] = first_401_then(echo_in_te)
    link(p, idp, user)
    s = p.issue(user=user)
    r = use(s, raw.origin + "/te")
    assert r.status == 502
    assert not [t for t in idp.access_tokens if t.lower()[:20].encode() in r.body.lower()], "a token in the detail"


def test_a_token_endpoint_error_is_named_only_when_it_is_an_oauth_error_code(box, user):
    """The `error` of a token response went into the refusal (to the worker) and `link list` when it looked
    like a code: a provider answering with a lower-case refresh token as its error handed it to the worker."""
    p, idp, raw, script = box
    script["answer"] = first_401_then(lambda head, body, sock: raw_response(b"{}"))
    link(p, idp, user)
    s = p.issue(user=user)
    idp.next_token_answers.append((400, {}, {"error": "ref-" + "q" * 30}))  # shaped like a code, but none
    r = use(s, raw.origin + "/refused")  # 401, then a refresh the endpoint refuses
    assert r.status == 502 and b"link_refresh_failed" in r.body
    assert b"ref-qqqq" not in r.body
