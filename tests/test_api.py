"""The platform API: every endpoint, every scope boundary, the CLI's validation with the CLI's sentences,
bounded bodies, and no value in any response, log or data file. The API runs as `sealgate run` would
run it (uvicorn serving `api.create_app`), here in a thread of this process against a real store; the
proxy it issues sessions for is real too. The tests marked e2e start `sealgate run` and a browser."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import uvicorn

from conftest import curl, free_port, make_proxy
from test_proxy import assert_problem, leaks
from test_shared_store import sent, until

from sealgate import api, settings, tokens
from sealgate.store import open_store

ALL = ",".join(tokens.SCOPES)


class Api:
    """The API of a proxy's store, on a free port, with a token per scope and one with all of them."""

    def __init__(self, proxy) -> None:
        self.proxy = proxy
        port = free_port()
        proxy.env["SEALGATE_API_PORT"] = f"127.0.0.1:{port}"
        s = settings.load({}, env=dict(proxy.env))
        self.store = open_store(s)
        self.token = {scope: self.issue(f"only-{scope.replace(':', '-')}", scope) for scope in tokens.SCOPES}
        self.token["all"] = self.issue("all", ALL)
        self.server = uvicorn.Server(uvicorn.Config(api.create_app(s, self.store), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        until(lambda: self.server.started)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        self.seen: list[bytes] = []  # every response, to search for values

    def issue(self, name: str, scopes: str) -> str:
        return tokens.issue(self.store, name, tokens.parse_scopes(scopes))

    def call(self, method: str, path: str, token: str | None = "all", **kw) -> httpx.Response:
        headers = kw.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {self.token.get(token, token)}"
        r = self.http.request(method, path, headers=headers, **kw)
        self.seen.append(json.dumps(dict(r.headers)).encode() + r.content)
        return r

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.store.close()


@pytest.fixture
def platform(tmp_path, pki):
    a = Api(make_proxy(tmp_path, pki))
    yield a
    a.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory, pki):
    """One API for the tests that only read what they get back."""
    a = Api(make_proxy(tmp_path_factory.mktemp("api"), pki))
    yield a
    a.stop()


def problem(r: httpx.Response, status: int, code: str, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == code and body["status"] == status and body["type"].endswith(code)
    assert body.get("field") == field, body
    return body


def test_every_endpoint(platform, user, value):
    secrets_path = f"/v1/users/{user}/secrets"
    r = platform.call("POST", secrets_path, json={"name": "K", "value": value, "origins": ["https://api.example"]})
    assert r.status_code == 201 and r.json()["name"] == "K" and "value" not in r.json()
    problem(platform.call("POST", secrets_path, json={"name": "K", "value": value, "origins": ["https://a.example"]}),
            409, "conflict")
    r = platform.call("GET", secrets_path)
    assert [(s["name"], s["origins"]) for s in r.json()] == [("K", ["https://api.example"])]
    assert set(r.json()[0]) == {"name", "origins", "created_at", "updated_at", "warnings", "methods", "paths",
                                "inject", "on_disallowed", "cap", "rate", "used", "sign"}
    r = platform.call("PUT", f"{secrets_path}/K", json={"value": value + "-2", "origins": ["https://b.example"]})
    assert r.status_code == 200 and r.json()["origins"] == ["https://b.example"]
    assert platform.store.secrets_for(user)["K"].value == value + "-2"
    r = platform.call("PUT", f"{secrets_path}/K/origins", json={"origins": ["https://c.example", "https://*.d.example"]})
    assert r.json()["origins"] == ["https://c.example", "https://*.d.example"]
    assert r.json()["warnings"] == ["https://*.d.example allows every subdomain of d.example; list exact hosts where you can"]
    assert platform.call("DELETE", f"{secrets_path}/K").status_code == 204
    problem(platform.call("DELETE", f"{secrets_path}/K"), 404, "not_found")
    assert platform.call("GET", secrets_path).json() == []
    r = platform.call("POST", "/v1/sessions", json={"access": "api", "user": user, "runchat": "rc", "instance": "i"})
    assert r.status_code == 201
    assert set(r.json()) == set(json.loads(platform.proxy.cli(
        "session", "issue", "--access", "api", "--user", user, "--runchat", "rc", "--instance", "i").stdout))
    assert platform.call("DELETE", f"/v1/sessions/{r.json()['session_id']}").status_code == 204
    problem(platform.call("DELETE", f"/v1/sessions/{r.json()['session_id']}"), 404, "not_found")
    assert isinstance(platform.call("GET", "/v1/audit", params={"user": user, "since": "1h"}).json(), list)
    doc = platform.call("GET", "/openapi.json", token=None).json()
    assert doc["openapi"].startswith("3.") and {"/v1/users/{user}/secrets", "/v1/sessions", "/v1/audit",
                                                 "/v1/users/{user}/secrets/{name}/origins"} <= set(doc["paths"])
    page = platform.call("GET", "/", token=None)
    assert page.status_code == 200 and "<title>sealgate: Secrets</title>" in page.text
    assert not leaks(value, *platform.seen)


ENDPOINTS = [  # (method, path, body, scope)
    ("POST", "/v1/users/u/secrets", {"name": "K", "value": "sk-01234567", "origins": ["https://a.example"]},
     "secrets:write"),
    ("PUT", "/v1/users/u/secrets/K", {"value": "sk-01234567", "origins": ["https://a.example"]}, "secrets:write"),
    ("GET", "/v1/users/u/secrets", None, "secrets:read"),
    ("PUT", "/v1/users/u/secrets/K/origins", {"origins": ["https://a.example"]}, "secrets:write"),
    ("DELETE", "/v1/users/u/secrets/K", None, "secrets:write"),
    ("POST", "/v1/sessions", {"access": "api", "user": "u", "runchat": "r", "instance": "i"}, "sessions:write"),
    ("DELETE", "/v1/sessions/nope", None, "sessions:write"),
    ("GET", "/v1/audit", None, "audit:read"),
]


@pytest.mark.parametrize("method, path, body, needed", ENDPOINTS, ids=[f"{m} {p}" for m, p, _, _ in ENDPOINTS])
def test_every_scope_boundary(shared, method, path, body, needed):
    kw = {"json": body} if body else {}
    for token in (None, "sgt_not-a-token", "Basic xyz"):
        problem(shared.call(method, path, token=token, **kw), 401, "unauthorized")
    for scope in tokens.SCOPES:
        r = shared.call(method, path, token=scope, **kw)
        if scope == needed:
            assert r.status_code not in (401, 403), r.text
        else:
            assert "lacks the scope " + needed in problem(r, 403, "forbidden")["detail"]
    name = f"only-{needed.replace(':', '-')}"
    shared.proxy.cli("token", "revoke", name)
    problem(shared.call(method, path, token=needed, **kw), 401, "unauthorized")
    shared.token[needed] = shared.issue(name, needed)  # for the next endpoint


BAD = [  # (field, body) for POST /v1/users/{user}/secrets; the CLI's flags and stdin for the same mistake
    ("name", {"name": "1bad", "value": "sk-01234567", "origins": ["https://a.example"]},
     ["--name", "1bad", "--origins", "https://a.example"], "sk-01234567"),
    ("value", {"name": "K", "value": "q7Zx9", "origins": ["https://a.example"]},
     ["--name", "K", "--origins", "https://a.example"], "q7Zx9"),
    ("value", {"name": "K", "value": "sk-0123\n4567", "origins": ["https://a.example"]},
     ["--name", "K", "--origins", "https://a.example"], "sk-0123\x074567"),
    ("origins", {"name": "K", "value": "sk-01234567", "origins": ["http://a.example"]},
     ["--name", "K", "--origins", "http://a.example"], "sk-01234567"),
    ("origins", {"name": "K", "value": "sk-01234567", "origins": ["https://a.example/path"]},
     ["--name", "K", "--origins", "https://a.example/path"], "sk-01234567"),
]


@pytest.mark.parametrize("field, body, flags, stdin", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gets_the_clis_sentence_naming_the_field(shared, user, field, body, flags, stdin):
    detail = problem(shared.call("POST", f"/v1/users/{user}/secrets", json=body), 422, "invalid", field)["detail"]
    cli = shared.proxy.cli("secret", "add", "--user", user, *flags, input=stdin, check=False)
    if field != "value" or "\n" not in body["value"]:
        assert cli.stderr.strip().endswith(detail), (cli.stderr, detail)
    assert body["value"] not in detail and body["value"] not in json.dumps(shared.seen[-1].decode())


def test_bad_input_elsewhere(shared, user, value):
    platform = shared
    secrets_path = f"/v1/users/{user}/secrets"
    problem(platform.call("GET", "/v1/users/bad user!/secrets"), 422, "invalid", "user")
    problem(platform.call("POST", secrets_path, json={"name": "K", "value": value}), 422, "invalid", "origins")
    problem(platform.call("POST", secrets_path, json={"name": "K", "value": 12345678, "origins": []}), 422,
            "invalid", "value")
    problem(platform.call("POST", secrets_path, json={"name": "K", "value": value, "origins": ["https://a.example"],
                                                      "extra": value}), 422, "invalid", "extra")
    problem(platform.call("POST", secrets_path, json={"name": "K", "value": value,
                                                      "origins": ["https://a.example,https://b.example"]}),
            422, "invalid", "origins")
    problem(platform.call("POST", secrets_path, content=b'{"name": "K", "value": "' + value.encode() + b'"',
                          headers={"content-type": "application/json"}), 400, "bad_request")
    for field, body in (("user", {"access": "api", "runchat": "r", "instance": "i"}),
                        ("access", {"access": "root", "user": user, "runchat": "r", "instance": "i"}),
                        ("runchat", {"access": "api", "user": user, "runchat": "r r", "instance": "i"}),
                        ("ttl", {"access": "api", "user": user, "runchat": "r", "instance": "i", "ttl": 5})):
        problem(platform.call("POST", "/v1/sessions", json=body), 422, "invalid", field)
    problem(platform.call("GET", "/v1/audit", params={"since": "yesterday"}), 422, "invalid", "since")
    assert not leaks(value, *platform.seen)


def test_a_body_over_a_mebibyte_is_refused_before_it_is_read(platform, user, value):
    big = b'{"name": "K", "value": "' + value.encode() + b'", "origins": [' + b'"https://a.example",' * 60000 + b"]}"
    problem(platform.call("POST", f"/v1/users/{user}/secrets", content=big,
                          headers={"content-type": "application/json"}), 413, "too_large")

    def chunks():
        yield big[:1000]
        for _ in range(12):
            yield b" " * 100_000
    problem(platform.call("POST", f"/v1/users/{user}/secrets", content=chunks(),
                          headers={"content-type": "application/json"}), 413, "too_large")
    assert platform.store.list_secrets(user) == []


def test_an_api_session_injects_through_the_proxy_and_once_revoked_is_refused(platform, make_upstream, user, value):
    upstream = make_upstream("127.0.0.1")
    platform.call("POST", f"/v1/users/{user}/secrets", json={"name": "K", "value": value, "origins": [upstream.origin]})
    s = platform.call("POST", "/v1/sessions", json={"access": "signed-in", "user": user, "runchat": "r",
                                                     "instance": "i"}).json()
    platform.proxy.start()
    try:
        r, got = sent(upstream, s, "K")
        assert r.status == 200 and got == value
        assert platform.call("DELETE", f"/v1/sessions/{s['session_id']}").status_code == 204
        started = time.monotonic()
        until(lambda: curl(s, upstream.url("/")).status == 407)
        assert time.monotonic() - started < 1.0
        assert_problem(curl(s, upstream.url("/"), "-H", f"X-Key: {s['env']['K']}"), 407, "proxy_auth_required")
        audit = platform.call("GET", "/v1/audit", params={"user": user}).json()
        assert any(a["decision"] == "allow" and a["secrets"] == ["K"] for a in audit)
    finally:
        platform.proxy.stop()
    assert not leaks(value, *platform.seen, platform.proxy.visible_to_operators())


def test_a_token_is_shown_once_and_kept_as_a_hash(platform):
    r = platform.proxy.cli("token", "issue", "--name", "once", "--scopes", "secrets:read")
    token = json.loads(r.stdout)["token"]
    assert token.startswith("sgt_") and token.encode() not in platform.proxy.visible_to_operators()
    listed = platform.proxy.cli("token", "list").stdout
    assert "once\tsecrets:read" in listed and token not in listed
    assert "exists already" in platform.proxy.cli("token", "issue", "--name", "once", "--scopes", "audit:read",
                                                  check=False).stderr
    assert "'admin' is not a scope" in platform.proxy.cli("token", "issue", "--name", "x", "--scopes", "admin",
                                                          check=False).stderr
    platform.store.backend.one("update api_tokens set scopes = ? where name = 'once'", [",".join(tokens.SCOPES)])
    problem(platform.call("GET", "/v1/audit", token=token), 503, "store_unavailable")  # widened: refused


@pytest.mark.e2e
def test_sealgate_run_serves_the_api_and_the_proxy_refuses_its_port(tmp_path, pki, user, value):
    p = make_proxy(tmp_path, pki, process=True)
    port = free_port()
    p.env["SEALGATE_API_PORT"] = f"127.0.0.1:{port}"
    token = json.loads(p.cli("token", "issue", "--name", "ui", "--scopes", ALL).stdout)["token"]
    p.start()
    try:
        base = f"http://127.0.0.1:{port}"
        until(lambda: _up(base), limit=20)
        r = httpx.post(f"{base}/v1/users/{user}/secrets", headers={"Authorization": f"Bearer {token}"},
                       json={"name": "K", "value": value, "origins": ["https://api.example"]})
        assert r.status_code == 201
        s = p.issue(user=user)
        assert_problem(curl(s, f"http://127.0.0.1:{port}/openapi.json"), 403, "destination_blocked")
        assert_problem(curl(s, f"https://127.0.0.1:{port}/openapi.json"), 403, "destination_blocked")
    finally:
        p.stop()
    assert not leaks(value, p.visible_to_operators())


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/openapi.json").status_code == 200
    except httpx.HTTPError:
        return False


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.e2e
def test_the_reference_page_in_a_real_browser(platform, user, value):
    """Add a secret on the page, see it listed without its value, remove it (headless Chromium)."""
    from playwright.sync_api import sync_playwright
    url = str(platform.http.base_url).rstrip("/") + "/"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(url)
            page.fill("#token", platform.token["all"])
            page.fill("#user", user)
            page.click("#load")
            page.wait_for_selector("#status:has-text('No secrets yet')")
            page.fill("#name", "OPENAI_KEY")
            page.fill("#value", value)
            page.fill("#origins", "https://api.openai.com")
            page.click("#add")
            page.wait_for_selector("#secrets tr:has-text('OPENAI_KEY')")
            row = page.inner_text("#secrets tr")
            assert "https://api.openai.com" in row and value not in page.content()
            assert page.input_value("#value") == ""  # not kept on the page
            assert platform.store.secrets_for(user)["OPENAI_KEY"].value == value
            page.fill("#name", "BAD NAME")
            page.fill("#value", value)
            page.click("#add")
            page.wait_for_selector("#status:has-text('name: secret name')")
            page.click("#secrets button[data-name='OPENAI_KEY']")
            page.wait_for_selector("#status:has-text('Removed OPENAI_KEY')")
            assert page.locator("#secrets tr").count() == 0 and platform.store.list_secrets(user) == []
        finally:
            browser.close()


# --- the red team's findings (round 9) ---------------------------------------------------------------

def test_many_origins_are_refused_in_linear_time(shared, user, value):
    many = [f"https://h{i}.example" for i in range(101)]
    detail = problem(shared.call("POST", f"/v1/users/{user}/secrets", json={"name": "K", "value": value,
                                                                              "origins": many}), 422, "invalid",
                     "origins")["detail"]
    assert "101 origins are too many (at most 100)" in detail
    started = time.monotonic()
    r = shared.call("POST", f"/v1/users/{user}/secrets", json={"name": "K", "value": value, "origins": many[:100]})
    assert r.status_code == 201 and time.monotonic() - started < 2


def test_parallel_calls_never_collide_on_the_store(shared, user, value):
    """Token checks and handlers used one SQLite connection from two threads: spurious 503s."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> int:
        token = "all" if i % 2 else "sgt_wrong"
        return shared.call("POST", f"/v1/users/{user}/secrets", token=token,
                           json={"name": f"K{i}", "value": value, "origins": ["https://a.example"]}).status_code
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(80)))
    assert sorted(set(statuses)) == [201, 401], statuses
    assert len(shared.store.list_secrets(user)) == 40


def test_odd_requests_get_problem_json_and_no_token_is_401_first(shared, user):
    path = f"/v1/users/{user}/secrets"
    problem(shared.call("GET", "/v1/audit", params={"since": "1" + "0" * 400 + "d"}), 422, "invalid", "since")
    problem(shared.call("POST", path, content=b'{"name": "\xff\xfe"}', headers={"content-type": "application/json"}),
            400, "bad_request")
    problem(shared.call("POST", path, content=b"[" * 100000, headers={"content-type": "application/json"}),
            400, "bad_request")
    problem(shared.call("POST", path, token=None, content=b"{bad", headers={"content-type": "application/json"}),
            401, "unauthorized")
    problem(shared.call("GET", "/v1/nothing-here"), 404, "not_found")
    problem(shared.call("PATCH", path), 405, "method_not_allowed")
    r = shared.call("GET", path + "/")  # no redirect built from the Host header
    assert r.status_code == 404 and "location" not in r.headers


@pytest.mark.parametrize("auth, framing, status", [
    (True, f"Content-Length: {2 ** 30}", b"413"), (False, "Transfer-Encoding: chunked", b"401")])
def test_an_answer_before_the_body_closes_the_connection(shared, user, auth, framing, status):
    """A 413 or a 401 is sent before the body is read: the rest of it must never be read (or drained)."""
    import socket
    port = shared.http.base_url.port
    token = f"Authorization: Bearer {shared.token['all']}\r\n" if auth else ""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"POST /v1/users/{user}/secrets HTTP/1.1\r\nHost: x\r\n{token}"
                  f"Content-Type: application/json\r\n{framing}\r\n\r\n".encode())
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 " + status) and b"connection: close" in head.lower()
        s.settimeout(5)
        sent = 0
        with pytest.raises(OSError):
            while sent < 64 * 2 ** 20:  # the server stops reading: the socket errors long before 64 MiB
                s.sendall(b"10000\r\n" + b" " * 65536 + b"\r\n" if not auth else b" " * 65536)
                sent += 65536
                if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    raise ConnectionResetError


def test_the_page_runs_no_inline_script(shared):
    r = shared.call("GET", "/", token=None)
    csp = r.headers["content-security-policy"]  # scripts: only 'self', by default-src
    assert csp.startswith("default-src 'self';") and "script-src" not in csp
    assert "<script>" not in r.text and '<script src="app.js">' in r.text
    assert shared.call("GET", "/app.js", token=None).headers["content-type"].startswith("text/javascript")
