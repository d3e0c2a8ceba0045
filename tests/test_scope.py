"""A secret's scope beyond its origins: methods, path prefixes, where it may be substituted, and what a
request to a destination it does not allow gets (block, or forward the placeholder as it is). Each rule
at its boundary, through the real proxy, checking what the upstream and the worker received."""

from __future__ import annotations

import json

import pytest

from conftest import curl, make_proxy
from test_proxy import assert_problem, leaks
from test_store import Place

from sealgate import policy

# --- the rules, as tables --------------------------------------------------------------------------

PATHS = ("/v1/models", "/v1/chat/")


@pytest.mark.parametrize("raw, allowed", [
    ("/v1/models", True), ("/v1/models/gpt", True), ("/v1/models?x=1", True), ("/v1/%6Dodels/x", True),
    ("/v1/chat/", True), ("/v1/chat/completions", True),
    ("/v1/modelsx", False), ("/v1/chat", False), ("/v2/models", False), ("/", False),
    ("/v1/models/../admin", False), ("/v1/models/%2e%2e/admin", False), ("/v1/models/%2E%2E/admin", False),
    ("/v1/models/./x", False), ("/v1/models//x", False), ("//v1/models", False),
    ("/v1/models/%2F..%2Fadmin", False), ("/v1/models/%2f", False), ("/v1/models\\..\\admin", False),
    ("/v1/models/%5c..%5cadmin", False), ("/v1/models/..", False),
    # the red team's (round 10): path parameters, a fragment, double encoding
    ("/v1/models/..;/admin", False), ("/v1/models/%2e%2e;/admin", False), ("/v1/models;x=1", False),
    ("/v1/models/x#/../../admin", False), ("/v1/models/%252e%252e/admin", False),
])
def test_paths_are_matched_on_the_normalised_path(raw, allowed):
    assert policy.path_allowed(PATHS, raw) is allowed


@pytest.mark.parametrize("parse, text, says", [
    (policy.parse_methods, "GET,P OST", "'P OST' is not an HTTP method"),
    (policy.parse_methods, " , ", "is empty"),
    (policy.parse_paths, "v1/models", "is not a plain path prefix"),
    (policy.parse_paths, "/v1/../admin", "is not a plain path prefix"),
    (policy.parse_paths, "/v1?x=1", "is not a plain path prefix"),
    (policy.parse_inject, "headers,cookies", "'cookies' is not a place to substitute"),
    (policy.parse_on_disallowed, "allow", "must be one of block, forward"),
])
def test_bad_scope_is_a_clear_error(parse, text, says):
    with pytest.raises(ValueError, match=says):
        parse(text)


def test_a_scope_round_trips_and_says_what_it_is():
    s = policy.Scope(frozenset({"GET", "HEAD"}), ("/v1/models",), frozenset({"headers"}), "forward")
    assert policy.Scope.from_json(s.to_json()) == s
    assert s.describe() == "methods=GET,HEAD paths=/v1/models inject=headers on-disallowed=forward"
    assert policy.Scope().to_json() is None and policy.Scope().describe() == "-"


# --- through the proxy ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scoped(tmp_path_factory, pki, make_upstream):
    """A proxy, an upstream, and secrets with one rule each."""
    p = make_proxy(tmp_path_factory.mktemp("scope"), pki)
    api, other = make_upstream("127.0.0.1"), make_upstream("127.0.0.1")
    p.start()
    yield p, api, other
    p.stop()


def _session(p, api, user, value, *flags):
    p.add_secret(user, "K", value, api.origin, *flags)
    return p.issue(user=user)


def _through(api, s, path="/v1/models", *args, header=True):
    before = len(api.received)
    r = curl(s, api.url(path), *(["-H", f"X-Key: {s['env']['K']}"] if header else []), *args)
    got = api.received[before:]
    return r, got


def test_methods_at_their_boundary(scoped, user, value):
    p, api, _ = scoped
    s = _session(p, api, user, value, "--methods", "GET,HEAD")
    r, got = _through(api, s)
    assert r.status == 200 and got[0].header("X-Key") == value
    r, got = _through(api, s, "/v1/models", "-X", "POST", "-d", "x")
    assert_problem(r, 403, "scope_denied", "method POST is not one of GET, HEAD")
    assert got == [] and not leaks(value, r.seen())


def test_paths_at_their_boundary_and_their_tricks(scoped, user, value):
    p, api, _ = scoped
    s = _session(p, api, user, value, "--paths", "/v1/models,/v1/chat/")
    for path in ("/v1/models", "/v1/models/x", "/v1/chat/completions"):
        r, got = _through(api, s, path)
        assert r.status == 200 and got[0].header("X-Key") == value, path
    for path in ("/v1/modelsx", "/v1/chat", "/v1/models/../admin", "/v1/models/%2e%2e/admin", "/v1/models//x",
                 "/v1/models/%2F..%2Fadmin"):
        r, got = _through(api, s, path, "--path-as-is")
        assert_problem(r, 403, "scope_denied", "the path is not under /v1/models, /v1/chat/")
        assert got == [], path


def test_inject_only_in_headers(scoped, user, value):
    """A value that may only go in headers cannot be posted into a body on an allowed origin and published."""
    p, api, _ = scoped
    s = _session(p, api, user, value, "--inject", "headers")
    r, got = _through(api, s)
    assert r.status == 200 and got[0].header("X-Key") == value
    ph = s["env"]["K"]
    r, got = _through(api, s, "/post", "-d", json.dumps({"text": ph}), "-H", "Content-Type: application/json",
                      header=False)
    assert_problem(r, 403, "scope_denied", "only in headers, not in body")
    r2, got2 = _through(api, s, f"/q?k={ph}", header=False)
    assert_problem(r2, 403, "scope_denied", "not in query")
    assert got == got2 == [] and not leaks(value, r.seen(), r2.seen())


def test_forward_sends_the_placeholder_as_it_is_and_audits_it(scoped, user, value):
    p, api, other = scoped
    s = _session(p, api, user, value, "--on-disallowed", "forward")
    r, got = _through(other, s, "/chat")
    assert r.status == 200 and got[0].header("X-Key") == s["env"]["K"]  # the placeholder, not the value
    assert not leaks(value, *(g.dump() for g in got), r.seen())
    rows = json.loads(p.cli("audit", "--user", user, "--json").stdout)
    assert any(a["decision"] == "forward" and a["code"] == "origin_not_allowed" and a["secrets"] == ["K"]
               for a in rows)
    r, got = _through(api, s)  # the allowed origin still gets the value
    assert got[0].header("X-Key") == value


def test_the_default_policy_comes_from_the_config(tmp_path, pki, make_upstream, user, value):
    api, other = make_upstream("127.0.0.1"), make_upstream("127.0.0.1")
    p = make_proxy(tmp_path, pki, SEALGATE_ON_DISALLOWED="forward")
    p.add_secret(user, "K", value, api.origin)
    p.add_secret(user, "STRICT", value + "-s", api.origin, "--on-disallowed", "block")
    s = p.issue(user=user)
    p.start()
    try:
        r, got = _through(other, s, "/x")
        assert r.status == 200 and got[0].header("X-Key") == s["env"]["K"]
        r = curl(s, other.url("/y"), "-H", f"X-Key: {s['env']['STRICT']}")
        assert_problem(r, 403, "origin_not_allowed")
    finally:
        p.stop()
    p.env["SEALGATE_ON_DISALLOWED"] = "allow"
    r = p.cli("secret", "list", "--user", user, check=False)
    assert r.returncode == 1 and "SEALGATE_ON_DISALLOWED: 'allow' must be one of block, forward" in r.stderr


def test_the_cli_sets_lists_and_clears_a_scope_and_the_scope_is_sealed(tmp_path, pki, user, value):
    p = make_proxy(tmp_path, pki)
    p.add_secret(user, "K", value, "https://api.example")
    assert "methods=GET paths=/v1/ inject=headers" in p.cli(
        "secret", "set-scope", "--user", user, "--name", "K", "--methods", "get", "--paths", "/v1/",
        "--inject", "headers").stdout
    assert "\tmethods=GET paths=/v1/ inject=headers\t" in p.cli("secret", "list", "--user", user).stdout
    listed = json.loads(p.cli("secret", "list", "--user", user, "--json").stdout)[0]
    assert (listed["methods"], listed["paths"], listed["inject"]) == (["GET"], ["/v1/"], ["headers"])
    p.add_secret(user, "K", value + "-2", "https://api.example", "--replace")  # a new value keeps the scope
    assert "methods=GET" in p.cli("secret", "list", "--user", user).stdout
    Place(p.data_dir, None).sql("update secrets set policy = ?", ['{"methods": ["GET", "POST"]}'])
    r = p.cli("secret", "list", "--user", user, check=False)
    assert r.returncode == 1 and "changed without the master key" in r.stderr
    Place(p.data_dir, None).sql("update secrets set policy = null")  # a scope dropped without the key: refused too
    assert "changed without the master key" in p.cli("secret", "list", "--user", user, check=False).stderr
    r = p.cli("secret", "set-scope", "--user", user, "--name", "K", "--paths", "v1", check=False)
    assert r.returncode == 1 and r.stderr.startswith("sealgate: error: --paths: 'v1' is not a plain path prefix")


# --- caps and rates ------------------------------------------------------------------------------------

def test_a_cap_at_its_boundary_with_retry_after(scoped, user, value):
    p, api, _ = scoped
    s = _session(p, api, user, value, "--cap", "3/minute")
    for _ in range(3):
        r, got = _through(api, s)
        assert r.status == 200 and got[0].header("X-Key") == value
    r, got = _through(api, s)
    problem = assert_problem(r, 429, "rate_limited", "K may be used 3/minute (cap)")
    assert problem and got == [] and 1 <= int(r.headers["retry-after"]) <= 60
    listed = json.loads(p.cli("secret", "list", "--user", user, "--json").stdout)[0]
    assert listed["cap"] == "3/minute" and listed["used"] == {"cap": "4/3/minute"}


def test_a_rate_counts_per_window(tmp_path, user, value):
    from sealgate import origins
    from sealgate.store import SecretStore
    store = SecretStore(tmp_path)
    store.add_secret(user, "K", value, [origins.parse("https://a.example")], scope=policy.Scope(
        rate=policy.parse_limit("2/s")))
    limit = store.secrets_for(user)["K"].scope.rate
    counts = [store.usage.count(user, "K", "rate", limit, now=t)[0] for t in (100.1, 100.5, 100.9, 101.0, 99.5)]
    assert counts == [1, 2, 3, 1, 2]  # a new second starts again; a node whose clock is behind counts in the newest


def test_no_more_requests_pass_than_the_cap_under_concurrent_load(scoped, user, value):
    """Six connections at once, thirty requests: exactly the cap goes out."""
    from concurrent.futures import ThreadPoolExecutor

    import requests
    p, api, _ = scoped
    s = _session(p, api, user, value, "--cap", "10/day")
    before = len(api.received)

    def run(_: int) -> list[int]:
        with requests.Session() as http:
            http.trust_env = False
            return [http.get(api.url("/c"), headers={"X-Key": s["env"]["K"]}, proxies={"https": s["proxy_url"]},
                             verify=s["ca_cert"], timeout=20).status_code for _ in range(5)]
    with ThreadPoolExecutor(6) as pool:
        statuses = [st for got in pool.map(run, range(6)) for st in got]
    assert sorted(statuses).count(200) == 10 and statuses.count(429) == 20
    assert [r.header("X-Key") for r in api.received[before:]] == [value] * 10


@pytest.mark.e2e  # (slow by design: proxies stopped and started again)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_counts_survive_a_restart_and_are_shared_by_every_proxy(request, backend, tmp_path, pki, make_upstream,
                                                                user, value):
    from test_shared_store import nodes, via
    api = make_upstream("127.0.0.1")
    if backend == "postgresql":  # a second proxy on the store counts on the same counters
        a, b = nodes(tmp_path, pki, request.getfixturevalue("pg").database())
    else:  # a SQLite store serves one machine: the same proxy, started again
        a = b = make_proxy(tmp_path, pki)
    a.add_secret(user, "K", value, api.origin, "--cap", "3/day")
    s = a.issue(user=user)
    a.start()
    try:
        assert _through(api, s)[0].status == 200
    finally:
        a.stop()
    a.start()  # restarted: the count is kept
    try:
        assert _through(api, s)[0].status == 200
    finally:
        a.stop()
    b.start()
    try:
        sb = via(s, a, b) if b is not a else s
        assert _through(api, sb)[0].status == 200
        assert_problem(_through(api, sb)[0], 429, "rate_limited")
    finally:
        b.stop()


# --- secret check ------------------------------------------------------------------------------------

def test_secret_check_lints_and_explains(tmp_path, pki, make_upstream, user, value):
    api = make_upstream("127.0.0.1")
    p = make_proxy(tmp_path, pki)
    p.add_secret(user, "WIDE", value, "https://*.example.com,http://plain.example,https://10.1.2.3,"
                 "https://a.example,https://b.example,https://c.example", "--allow-http")
    p.add_secret(user, "GOOD", value + "-g", api.origin, "--inject", "headers", "--cap", "100/day")
    r = p.cli("secret", "check", "--user", user, check=False)
    assert r.returncode == 1
    says = r.stdout
    for text in ("WIDE: https://*.example.com allows every subdomain", "WIDE: http://plain.example is http",
                 "WIDE: https://10.1.2.3 is an IP address", "WIDE: 6 allowed origins",
                 "WIDE: no scope beyond its origins", "WIDE: no cap or rate"):
        assert text in says, says
    good = [line for line in says.splitlines() if "/GOOD:" in line]
    assert good == [f"warning: {user}/GOOD: {api.origin} is an IP address: it names no one, and its owner may "
                    "change; use the API's host name"]  # (the test's upstream); no trail yet: no judgement on use
    s = p.issue(user=user)
    p.start()
    try:
        assert curl(s, api.url("/x"), "-H", f"X-Key: {s['env']['GOOD']}").status == 200  # GOOD's origin is used
    finally:
        p.stop()
    r = p.cli("secret", "check", "--user", user, check=False)
    assert "no request used" not in "".join(line for line in r.stdout.splitlines() if "/GOOD:" in line)
    assert "WIDE: https://a.example: no request used it in 30 days" in r.stdout
    assert not leaks(value, r.stdout.encode(), r.stderr.encode())
    p.cli("secret", "rm", "--user", user, "--name", "WIDE")
    p.cli("secret", "rm", "--user", user, "--name", "GOOD")
    p.add_secret(user, "FINE", value + "-f", "https://api.example", "--inject", "headers", "--rate", "5/s")
    p.cli("audit")  # (the trail holds GOOD's use; FINE's origin, never used, is warned of)
    r = p.cli("secret", "check", check=False)  # every user's
    assert r.returncode == 1 and r.stdout.strip() == (f"warning: {user}/FINE: https://api.example: no request used "
                                                      "it in 30 days; remove it if nothing needs it")


def test_the_api_sets_a_scope_and_shows_the_use(tmp_path, pki, user, value):
    from test_api import Api
    a = Api(make_proxy(tmp_path, pki))
    try:
        path = f"/v1/users/{user}/secrets"
        r = a.call("POST", path, json={"name": "K", "value": value, "origins": ["https://a.example"],
                                       "methods": ["get"], "cap": "5/day"})
        assert r.status_code == 201 and (r.json()["methods"], r.json()["cap"]) == (["GET"], "5/day")
        r = a.call("PUT", f"{path}/K/scope", json={"inject": ["headers"], "rate": "2/s"})
        assert (r.json()["inject"], r.json()["rate"], r.json()["cap"], r.json()["used"]) == (
            ["headers"], "2/s", None, {"rate": "0/2/s"})
        r = a.call("PUT", f"{path}/K/scope", json={"paths": ["v1"]})
        assert r.status_code == 422 and r.json()["field"] == "paths"
        r = a.call("PUT", f"{path}/K/scope", json={"cap": "lots"})
        assert r.status_code == 422 and r.json()["field"] == "cap"
        assert not leaks(value, *a.seen)
    finally:
        a.stop()



@pytest.mark.parametrize("args", [
    ("-X", "POST", "-H", "X-HTTP-Method-Override: DELETE", "-d", "x"),
    ("-X", "POST", "-H", "X-HTTP-Method: DELETE", "-d", "x"),
    ("-X", "POST", "-H", "X-Method-Override: DELETE", "-d", "x"),
    ("-H", "X-Original-URL: /admin/delete-all"),
    ("-H", "X-Rewrite-URL: /admin/delete-all"),
], ids=["x-http-method-override", "x-http-method", "x-method-override", "x-original-url", "x-rewrite-url"])
def test_a_method_or_path_override_never_carries_a_scoped_secret(scoped, user, value, args):
    """(red team, round 10) The upstream would take the override for the method or path."""
    p, api, _ = scoped
    s = _session(p, api, user, value, "--methods", "GET,POST", "--paths", "/v1/models")
    r, got = _through(api, s, "/v1/models", *args)
    assert_problem(r, 403, "scope_denied", "which could make it another method or path")
    assert got == []
    r, got = _through(api, s, "/v1/models?_method=DELETE", "-X", "POST", "-d", "x")
    assert_problem(r, 403, "scope_denied", "_method=")
    r, got = _through(api, s, "/v1/models", "-X", "POST", "-d", "x")
    assert r.status == 200 and got[0].header("X-Key") == value  # without one, as scoped
