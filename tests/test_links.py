"""Linked accounts: the provider registry, the OAuth client, the store, and the proxy keeping tokens fresh,
against a real OAuth 2.0 server on loopback over TLS (tests/oauth_server.py: authorization code with PKCE,
refresh, rotation, revocation, stale tokens). Every token the server issues, and the client secret, are
searched for in what the worker received and in everything sealgate wrote."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import yaml

import conftest
from conftest import curl, make_proxy, node_fetch
from oauth_server import OAuthServer
from test_api import Api, problem
from test_core import session  # noqa: F401 - a fixture
from test_proxy import assert_problem

from sealgate import decision, oauth, origins, placeholders, providers
from sealgate.errors import StoreError
from sealgate.links import Link, LinkInfo, Tokens
from sealgate.linked import LinkCredential
from sealgate.outbound import Reply
from sealgate.store import SecretStore

SECRET_ENV = "SEALGATE_TEST_CLIENT_SECRET"
SHIPPED = Path(__file__).parent.parent / "config" / providers.FILE_NAME


# --- the registry ---------------------------------------------------------------------------------

def test_the_shipped_providers_load_and_the_generic_one_says_what_to_fill_in():
    reg = providers.load(SHIPPED, None)
    assert {"github", "google", "slack", "generic"} <= set(reg.providers)
    assert reg.get("github").env_name == "GITHUB" and reg.get("github").header == "Authorization"
    assert reg.get("slack").scope_separator == "," and reg.get("google").authorize_params
    with pytest.raises(providers.ProviderError, match=r"provider generic .* has no origins: set it in the file "
                                                      "SEALGATE_PROVIDERS names"):
        reg.get("generic").usable()
    with pytest.raises(providers.ProviderError, match="provider github .* has no client_id"):
        reg.get("github").usable()


def test_an_extra_file_adds_providers_and_overrides_only_the_fields_it_gives(tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text("providers:\n  github:\n    client_id: abc123\n  my-prov:\n    origins: https://api.my.example\n"
                     "    authorize_url: https://my.example/auth\n    token_url: https://my.example/token\n"
                     "    client_id: x\n    prefix: 'token '\n")
    reg = providers.load(SHIPPED, extra)
    gh = reg.get("github")
    assert gh.client_id == "abc123" and gh.token_url == "https://github.com/login/oauth/access_token"
    assert gh.usable() is gh and str(extra) in gh.where
    mine = reg.get("my-prov")
    assert (mine.env_name, mine.prefix, [str(o) for o in mine.origins]) == ("MY_PROV", "token ",
                                                                            ["https://api.my.example"])
    with pytest.raises(providers.ProviderError, match=r"there is no provider 'nope' \(known: .*github"):
        reg.get("nope")


@pytest.mark.parametrize("text, says", [
    ("providers:\n  x:\n    token_url: http://t.example/token\n", "provider x, field token_url: 'http://t.example/token' "
                                                                  "must be an https:// URL"),
    ("providers:\n  x:\n    origins: [https://a.example/path]\n", "provider x, field origins:"),
    ("providers:\n  x:\n    origins: [http://a.example]\n", "provider x, field origins:"),
    ("providers:\n  x:\n    colour: blue\n", "provider x: unknown field 'colour'"),
    ("providers:\n  x:\n    client_secret_env: 'a b'\n", "provider x, field client_secret_env: 'a b' is not an "
                                                         "environment variable name"),
    ("providers:\n  x:\n    header: 'X Bad'\n", "provider x, field header: 'X Bad' is not a header name"),
    ("providers:\n  x:\n    scopes: 3\n", "provider x, field scopes: must be a list"),
    ("providers:\n  X-Up: {}\n", "provider name 'X-Up' is invalid"),
    ("providers:\n  a-b: {}\n  a_b: {}\n", "providers a-b and a_b would both appear as A_B"),
    ("providers:\n  x: [1]\n", "provider x: must be a mapping of fields"),
    ("providers: [x]\n", "must hold one key, providers"),
    ("providers:\n  x: {origins: [\n", "not valid YAML at line"),
    ("providers:\n  x:\n    prefix: \"Bearer\\n\"\n", "provider x, field prefix: holds a control character"),
    # the red team's: the master key (or any sealgate setting) sent to a token endpoint as the client secret
    ("providers:\n  x:\n    client_secret_env: SEALGATE_MASTER_KEY\n", "'SEALGATE_MASTER_KEY' is one of sealgate's "
                                                                       "own settings"),
    ("providers:\n  x:\n    client_secret_env: sealgate_store_url\n", "one of sealgate's own settings"),
])
def test_a_bad_entry_names_the_file_the_provider_and_the_field(tmp_path, text, says):
    extra = tmp_path / "bad.yaml"
    extra.write_text(text)
    with pytest.raises(providers.ProviderError) as e:
        providers.load(None, extra)
    assert str(e.value).startswith(f"{extra}:") and says in str(e.value), str(e.value)


def test_a_missing_extra_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(providers.ProviderError, match="nope.yaml: providers file not found"):
        providers.load(SHIPPED, tmp_path / "nope.yaml")


# --- the OAuth client, pure ----------------------------------------------------------------------

def _reply(status: int, body: object, content_type: str = "application/json") -> Reply:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Reply(status, "", [(b"Content-Type", content_type.encode())], raw)


@pytest.mark.parametrize("reply, expect", [
    (_reply(200, {"access_token": "acc-12345678", "refresh_token": "ref-12345678", "expires_in": 60}),
     ("acc-12345678", "ref-12345678", 1060.0)),
    (_reply(200, {"access_token": "acc-12345678", "expires_in": "60"}), ("acc-12345678", "old-refresh", 1060.0)),
    (_reply(200, {"access_token": "acc-12345678"}), ("acc-12345678", "old-refresh", None)),
    (_reply(200, b"access_token=acc-12345678&scope=repo", "application/x-www-form-urlencoded"),
     ("acc-12345678", "old-refresh", None)),  # GitHub without Accept: application/json
    (_reply(400, {"error": "invalid_grant"}), oauth.TokenRefused("invalid_grant")),
    (_reply(401, {"error": "invalid_client"}), oauth.TokenRefused("invalid_client")),
    (_reply(200, {"ok": False, "error": "invalid_refresh_token"}), oauth.TokenRefused("invalid_refresh_token")),
    (_reply(400, {"error": "<script>alert(1)</script>"}), oauth.TokenRefused("refused")),  # never quoted as sent
    (_reply(400, {"error": ["invalid_grant"]}), oauth.TokenRefused("refused")),
    (_reply(503, {"error": "temporarily_unavailable"}), oauth.TokenUnavailable),
    (_reply(200, b"<html>"), oauth.TokenUnavailable),
    (_reply(200, {"access_token": "short"}), oauth.TokenUnavailable),
    (_reply(200, {"access_token": "acc-12345678\r\nX: y"}), oauth.TokenUnavailable),
    (_reply(200, {"access_token": "acc-12345678", "expires_in": "soon"}), oauth.TokenUnavailable),
    (_reply(200, {"access_token": "acc-12345678", "refresh_token": 5}), oauth.TokenUnavailable),
])
def test_token_responses(reply, expect):
    if isinstance(expect, tuple):
        t = oauth.parse_tokens(reply, 1000.0, "old-refresh")
        assert (t.access_token, t.refresh_token, t.expires_at) == expect
        assert "acc-" not in repr(t) and "ref-" not in repr(t)
        return
    with pytest.raises(type(expect) if isinstance(expect, Exception) else expect) as e:
        oauth.parse_tokens(reply, 1000.0, "old-refresh")
    if isinstance(expect, oauth.TokenRefused):
        assert e.value.code == expect.code
    assert "script" not in str(e.value)


def test_the_authorization_url_carries_state_pkce_scopes_and_extra_parameters():
    p = providers.Provider("slack", authorize_url="https://slack.com/oauth/v2/authorize?team=T1", client_id="c1",
                           scopes=("chat:write", "channels:read"), scope_separator=",",
                           authorize_params=(("user_scope", "identify"),))
    verifier, challenge = oauth.pkce()
    url = oauth.authorization_url(p, "https://platform.example/cb", "st4te", challenge)
    assert url.startswith("https://slack.com/oauth/v2/authorize?team=T1&response_type=code&client_id=c1&")
    assert "code_challenge_method=S256" in url and f"code_challenge={challenge}" in url and "state=st4te" in url
    assert "scope=chat%3Awrite%2Cchannels%3Aread" in url and "user_scope=identify" in url
    assert verifier not in url and len(verifier) >= 43


# --- the decision, with a linked account --------------------------------------------------------------

def _credential(origin: str, *, expires_in: float | None = 3600, status: str = "ok", refresh: str | None = "r" * 9):
    now = time.time()
    tokens = Tokens("tok-" + secrets.token_hex(8), refresh, None if expires_in is None else now + expires_in)
    info = LinkInfo("u1", "my-prov", status, "the provider refused the refresh: invalid_grant", tokens.expires_at,
                    now, now)
    return LinkCredential(providers.Provider("my-prov", origins=(origins.parse(origin),)), Link(info, tokens))


def _facts(session, url_host: str, ph: str, **kw) -> decision.RequestFacts:
    return decision.RequestFacts(decision.Destination("https", url_host, 443), (url_host,), url_host, None,
                                 (placeholders.find(ph.encode())[0].placeholder,),
                                 locations={"MY_PROV": frozenset({"headers"})},
                                 sites={"MY_PROV": frozenset({("authorization", True)})}, **kw)


@pytest.mark.parametrize("expires_in, status, can_refresh, expect", [
    (3600, "ok", True, ("allow", ())),
    (30, "ok", True, ("allow", ("MY_PROV",))),  # due within the minute: refreshed first
    (30, "ok", False, ("allow", ())),  # due, still valid, and this part cannot wait: it goes as it is
    (-1, "ok", False, ("block", "link_refresh_failed")),  # expired, cannot wait
    (-1, "ok", True, ("allow", ("MY_PROV",))),
    (3600, "broken", True, ("block", "link_refresh_failed")),
])
def test_a_linked_account_in_the_decision(session, expires_in, status, can_refresh, expect):
    cred = _credential("https://api.my.example", expires_in=expires_in, status=status)
    ph = session.placeholder("MY_PROV")
    result = decision.decide(_facts(session, "api.my.example", ph, can_refresh=can_refresh), session,
                             lambda names: {"MY_PROV": cred})
    if expect[0] == "allow":
        assert isinstance(result, decision.Allow) and result.refresh == expect[1]
        assert result.values == {ph: cred.value} and result.header_forms == {ph: ("Authorization", "Bearer ")}
    else:
        assert isinstance(result, decision.Block) and result.refusal.code == expect[1]
        assert cred.value not in result.refusal.detail


def test_a_linked_account_goes_only_to_its_provider(session):
    cred = _credential("https://api.my.example")
    ph = session.placeholder("MY_PROV")
    result = decision.decide(_facts(session, "evil.example", ph), session, lambda names: {"MY_PROV": cred})
    assert isinstance(result, decision.Block) and result.refusal.code == "origin_not_allowed"
    assert "MY_PROV may not go to https://evil.example" in result.refusal.detail


# --- the store ---------------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    s = SecretStore(tmp_path)
    yield s
    s.close()


def _tokens() -> Tokens:
    t = Tokens("acc-" + secrets.token_urlsafe(16), "ref-" + secrets.token_urlsafe(16), time.time() + 3600)
    conftest.CREATED_VALUES.extend([t.access_token, t.refresh_token])
    return t


def test_links_are_sealed_listed_and_removed(store, tmp_path):
    t = _tokens()
    store.links.put("u1", "my-prov", t)
    [info] = store.links.list("u1")
    assert (info.provider, info.status) == ("my-prov", "ok") and store.links.providers("u1") == ["my-prov"]
    assert store.links.read("u1")["my-prov"].tokens == t
    raw = b"".join(f.read_bytes() for f in tmp_path.iterdir() if f.is_file())
    assert t.access_token.encode() not in raw and t.refresh_token.encode() not in raw
    assert store.links.broken(store.links.read("u1")["my-prov"], "the provider refused the refresh: invalid_grant")
    assert store.links.list("u1")[0].status == "broken"
    store.links.put("u1", "my-prov", _tokens())  # linked again: ok again
    assert store.links.list("u1")[0].status == "ok"
    store.links.remove("u1", "my-prov")
    assert store.links.list("u1") == [] and store.links.read("u1") == {}


@pytest.mark.parametrize("edit, reader", [
    ("update links set owner = 'u3' where owner = 'u1'", "u3"),  # another user's tokens
    ("update links set owner = 'u3' where owner = 'u1'", "u1"),
    ("update links set provider = 'other' where owner = 'u1'", "u1"),  # another provider's origins
    ("delete from links where owner = 'u1'", "u1"),  # a link removed behind the key's back
    ("update links set ciphertext = (select ciphertext from links where owner = 'u2') where owner = 'u1'", "u1"),
])
def test_a_link_changed_without_the_key_is_refused(store, tmp_path, edit, reader):
    store.links.put("u1", "my-prov", _tokens())
    store.links.put("u2", "my-prov", _tokens())
    with sqlite3.connect(tmp_path / "sealgate.db") as db:
        db.execute(edit)
    with pytest.raises(StoreError, match="changed without the master key|not the ones last written"):
        store.links.read(reader)
    assert store.links.read("u2")["my-prov"]  # the others' are untouched


def test_a_link_put_back_from_an_old_backup_is_refused(store, tmp_path):
    store.links.put("u1", "my-prov", _tokens())
    with sqlite3.connect(tmp_path / "sealgate.db") as db:
        old = db.execute("select * from links").fetchone()
    store.links.put("u1", "my-prov", _tokens())  # a refresh
    with sqlite3.connect(tmp_path / "sealgate.db") as db:
        db.execute("delete from links")
        db.execute(f"insert into links values ({','.join('?' * len(old))})", old)
    with pytest.raises(StoreError, match="not the ones last written"):
        store.links.read("u1")


def test_a_linking_begun_is_used_once_and_expires(store, monkeypatch):
    state = store.links.begin("u1", "my-prov", "https://platform.example/cb", "verifier-" + "v" * 40)
    pending = store.links.take(state)
    assert (pending.owner, pending.provider, pending.verifier) == ("u1", "my-prov", "verifier-" + "v" * 40)
    assert "verifier" not in repr(pending)
    with pytest.raises(StoreError, match="no linking was begun with this state, or it expired"):
        store.links.take(state)
    state = store.links.begin("u1", "my-prov", "https://platform.example/cb", "v" * 43)
    monkeypatch.setattr(time, "time", lambda: 1e12)
    with pytest.raises(StoreError, match="or it expired"):
        store.links.take(state)


def test_the_lease_lets_one_node_refresh_the_tokens_it_read(store):
    store.links.put("u1", "my-prov", _tokens())
    other = SecretStore(store.data_dir)
    try:
        read_here, read_there = store.links.read("u1")["my-prov"], other.links.read("u1")["my-prov"]
        assert store.links.lease(read_here, 10) is True
        assert other.links.lease(read_there, 10) is False
        store.links.release("u1", "my-prov")
        assert other.links.lease(read_there, 10) is True
        other.links.release("u1", "my-prov")
        store.links.put("u1", "my-prov", _tokens())  # refreshed here after the other node read it
        assert other.links.lease(read_there, 10) is False  # its refresh token may be spent: read again
        assert other.links.broken(read_there, "refused") is False and store.links.list("u1")[0].status == "ok"
    finally:
        other.close()


def test_key_rotation_moves_links_and_linkings_begun_and_the_old_key_retires(store):
    from sealgate import rotation
    t = _tokens()
    store.links.put("u1", "my-prov", t)
    state = store.links.begin("u1", "my-prov", "https://platform.example/cb", "v" * 43)
    first = {k.key_id for k in rotation.list_keys(store) if k.kind == "data"}
    new = rotation.rotate(store, batch=1)
    with store.read() as tx:
        assert {r["key_id"] for r in tx.rows("select key_id from links union all select key_id from link_states")} \
            == {new}
    for old in first:
        rotation.retire(store, old)
    assert store.links.read("u1")["my-prov"].tokens == t and store.links.take(state).verifier == "v" * 43


def test_backup_and_restore_keep_links(store, tmp_path):
    from sealgate import backup
    t = _tokens()
    store.links.put("u1", "my-prov", t)
    backup.backup(store, tmp_path / "b.jsonl")
    fresh = SecretStore(tmp_path / "restored", source=store.source)
    try:
        counts = backup.restore(fresh, tmp_path / "b.jsonl")
        assert counts["links"] == 1 and fresh.links.read("u1")["my-prov"].tokens == t
    finally:
        fresh.close()


# --- the proxy, against a real OAuth server -------------------------------------------------------------

@pytest.fixture(scope="module")
def client_secret() -> str:
    secret = "cs-" + secrets.token_urlsafe(24)
    conftest.CREATED_VALUES.append(secret)
    os.environ[SECRET_ENV] = secret  # what `sealgate run` and the CLI read it from
    yield secret
    os.environ.pop(SECRET_ENV, None)


def _provider_file(path: Path, idp: OAuthServer, name: str = "my-prov", **extra) -> Path:
    entry = {"origins": [idp.origin], "authorize_url": idp.authorize_url, "token_url": idp.token_url,
             "client_id": idp.client_id, "client_secret_env": SECRET_ENV, "scopes": ["read", "write"], **extra}
    path.write_text(yaml.safe_dump({"providers": {name: entry}}))
    return path


@pytest.fixture(scope="module")
def linked(tmp_path_factory, pki, client_secret, make_upstream):
    """A proxy whose registry holds my-prov (a real OAuth server), and an upstream that is not my-prov."""
    idp = OAuthServer(pki, client_secret=client_secret)
    d = tmp_path_factory.mktemp("linked")
    p = make_proxy(d, pki, SEALGATE_PROVIDERS=str(_provider_file(d / "providers.yaml", idp)))
    p.start()
    yield p, idp, make_upstream("127.0.0.2")
    p.stop()
    idp.close()
    conftest.CREATED_VALUES.extend(idp.access_tokens | idp.refresh_tokens)
    seen = p.visible_to_operators()
    assert not [t for t in (*idp.access_tokens, *idp.refresh_tokens, client_secret) if t.encode() in seen], \
        "a token or the client secret is in sealgate's files or output"


def link(p, idp: OAuthServer, user: str, provider: str = "my-prov") -> None:
    """The consent, as a platform runs it: link start, the user's browser, link finish."""
    url = p.cli("link", "start", "--user", user, "--provider", provider,
                "--redirect-uri", "https://platform.example/oauth/callback").stdout.strip()
    code, state = idp.authorize(url)
    out = p.cli("link", "finish", "--state", state, f"--code={code}").stdout
    assert f"linked {provider} for {user}" in out


def _api(p, idp, s: dict, header: str, path: str = "/api/me", *args: str):
    return curl(s, idp.origin + path, "-H", header, *args)


def no_token_in(idp: OAuthServer, *seen: bytes) -> bool:
    return not any(t.encode() in s for t in (*idp.access_tokens, *idp.refresh_tokens) for s in seen)


def test_link_then_use_the_token_only_at_the_provider(linked, user):
    p, idp, other = linked
    link(p, idp, user)
    [shown] = json.loads(p.cli("link", "list", "--user", user, "--json").stdout)
    assert (shown["provider"], shown["env"], shown["status"]) == ("my-prov", "MY_PROV", "ok")
    s = p.issue(user=user)
    ph = s["env"]["MY_PROV"]
    before = len(idp.api_tokens_seen)
    r = _api(p, idp, s, f"Authorization: Bearer {ph}")
    assert r.status == 200, r.body
    sent = idp.api_tokens_seen[before]
    assert sent in idp.access_tokens
    echo = r.json()
    assert ["Authorization", f"Bearer {ph}"] in echo["headers"]  # the echo comes back in placeholder form
    r2 = _api(p, idp, s, f"Authorization: {ph}")  # alone in the header: the provider's prefix is added
    assert r2.status == 200 and idp.api_tokens_seen[-1] == sent
    r3 = node_fetch(s, idp.origin + "/api/me", headers={"Authorization": f"Bearer {ph}"})
    assert r3.status == 200 and idp.api_tokens_seen[-1] == sent
    r4 = curl(s, other.url("/steal"), "-H", f"Authorization: Bearer {ph}")
    assert_problem(r4, 403, "origin_not_allowed", "MY_PROV may not go to https://127.0.0.2")
    assert other.received == []
    assert no_token_in(idp, r.seen(), r2.seen(), r3.seen(), r4.seen())


def test_a_token_due_is_refreshed_before_it_is_sent(linked, user):
    p, idp, _ = linked
    idp.expires_in = 30  # within the minute: due at once
    try:
        link(p, idp, user)
    finally:
        idp.expires_in = 3600
    s = p.issue(user=user)
    calls = idp.refresh_calls
    r = _api(p, idp, s, f"Authorization: Bearer {s['env']['MY_PROV']}")
    assert r.status == 200 and idp.refresh_calls == calls + 1
    refreshed = idp.api_tokens_seen[-1]
    [row] = [x for x in idp.received if x.path == "/token"][-1:]
    assert refreshed in idp.access_tokens and json.loads(r.body)["path"] == "/api/me"
    assert b"client_secret=" in row.body and no_token_in(idp, r.seen())
    r = _api(p, idp, s, f"Authorization: Bearer {s['env']['MY_PROV']}")  # fresh for an hour now
    assert r.status == 200 and idp.refresh_calls == calls + 1 and idp.api_tokens_seen[-1] == refreshed


@pytest.mark.e2e  # (slow by design: a provider that takes its time, or many MiB)
def test_concurrent_requests_share_one_refresh(linked, user):
    p, idp, _ = linked
    idp.expires_in = 30
    try:
        link(p, idp, user)
        s = p.issue(user=user)
        idp.expires_in, idp.delay = 3600, 1.0
        calls = idp.refresh_calls
        results: list = []
        threads = [threading.Thread(target=lambda: results.append(_api(p, idp, s, f"Authorization: Bearer "
                                                                               f"{s['env']['MY_PROV']}")))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        idp.expires_in, idp.delay = 3600, 0.0
    assert [r.status for r in results] == [200] * 6
    assert idp.refresh_calls == calls + 1
    assert len(set(idp.api_tokens_seen[-6:])) == 1


def test_a_rotated_refresh_token_is_stored_and_used_next(linked, user):
    p, idp, _ = linked
    idp.expires_in, idp.rotate_refresh = 30, True
    try:
        link(p, idp, user)
        s = p.issue(user=user)
        calls = idp.refresh_calls
        for _ in range(3):  # each refresh spends the refresh token and gets a new one
            r = _api(p, idp, s, f"Authorization: Bearer {s['env']['MY_PROV']}")
            assert r.status == 200, r.body
    finally:
        idp.expires_in, idp.rotate_refresh = 3600, False
    assert idp.refresh_calls == calls + 3


def test_a_refused_refresh_answers_502_and_the_link_shows_broken(linked, user):
    p, idp, _ = linked
    idp.expires_in = 30
    try:
        before = set(idp.refresh_tokens)
        link(p, idp, user)
        [refresh] = set(idp.refresh_tokens) - before
        idp.revoke(refresh)
        s = p.issue(user=user)
        r = _api(p, idp, s, f"Authorization: Bearer {s['env']['MY_PROV']}")
        assert_problem(r, 502, "link_refresh_failed", "my-prov refused to refresh the token (invalid_grant)")
        [shown] = json.loads(p.cli("link", "list", "--user", user, "--json").stdout)
        assert shown["status"] == "broken" and "invalid_grant" in shown["detail"]
        calls = idp.refresh_calls
        r = _api(p, idp, s, f"Authorization: Bearer {s['env']['MY_PROV']}")
        assert_problem(r, 502, "link_refresh_failed", "the link to my-prov is broken")
        assert idp.refresh_calls == calls  # not tried again until linked again
        link(p, idp, user)
        assert json.loads(p.cli("link", "list", "--user", user, "--json").stdout)[0]["status"] == "ok"
    finally:
        idp.expires_in = 3600
    rows = json.loads(p.cli("audit", "--user", user, "--json").stdout)
    assert [r["code"] for r in rows if r["decision"] == "block"] == ["link_refresh_failed"] * 2


def test_a_401_refreshes_and_sends_the_request_once_more(linked, user):
    p, idp, _ = linked
    link(p, idp, user)
    s = p.issue(user=user)
    ph = s["env"]["MY_PROV"]
    assert _api(p, idp, s, f"Authorization: Bearer {ph}").status == 200
    stale = idp.api_tokens_seen[-1]
    idp.expire_access_tokens()  # not by time: the proxy learns it from the 401
    calls, before = idp.refresh_calls, len(idp.received)
    body = json.dumps({"text": "hello", "n": 1})
    r = _api(p, idp, s, f"Authorization: Bearer {ph}", "/api/post", "-X", "POST", "-H",
             "Content-Type: application/json", "--data-binary", body)
    assert r.status == 200, r.body
    assert r.json()["body"] == body and idp.refresh_calls == calls + 1
    posts = [x for x in idp.received[before:] if x.path == "/api/post"]
    assert [x.body.decode() for x in posts] == [body, body]
    assert idp.api_tokens_seen[-2] == stale and idp.api_tokens_seen[-1] != stale
    rows = [a for a in json.loads(p.cli("audit", "--user", user, "--json").stdout) if a["path"] == "/api/post"]
    assert [(a["decision"], a["status"]) for a in rows] == [("allow", 200), ("allow", 401)]  # newest first
    assert no_token_in(idp, r.seen())


def test_a_401_after_a_fresh_refresh_goes_to_the_worker_as_it_is(linked, user):
    """A token the provider refuses although just refreshed: sent once more, never in a loop."""
    p, idp, _ = linked
    link(p, idp, user)
    s = p.issue(user=user)
    idp.expires_in = 0  # every token it issues is stale at once
    try:
        idp.expire_access_tokens()
        calls, before = idp.refresh_calls, len(idp.api_tokens_seen)
        r = _api(p, idp, s, f"Authorization: Bearer {s['env']['MY_PROV']}")
    finally:
        idp.expires_in = 3600
    assert r.status == 401 and len(idp.api_tokens_seen) == before + 2 and idp.refresh_calls == calls + 1


def test_link_add_takes_a_token_response_on_stdin(linked, user):
    p, idp, _ = linked
    from oauth_server import pkce_pair
    verifier, challenge = pkce_pair()
    code, _ = idp.authorize(f"{idp.authorize_url}?response_type=code&client_id={idp.client_id}&redirect_uri="
                            f"https://platform.example/cb&state=s1&code_challenge={challenge}"
                            "&code_challenge_method=S256")
    import requests
    answer = requests.post(idp.token_url, data={"grant_type": "authorization_code", "code": code,
                                                "redirect_uri": "https://platform.example/cb",
                                                "code_verifier": verifier, "client_id": idp.client_id,
                                                "client_secret": os.environ[SECRET_ENV]},
                           verify=str(idp.pki.ca_pem), proxies={"https": None}, timeout=10)
    out = p.cli("link", "add", "--user", user, "--provider", "my-prov", input=answer.text)
    assert "linked my-prov for" in out.stdout and answer.json()["access_token"] not in out.stdout + out.stderr
    s = p.issue(user=user)
    assert _api(p, idp, s, f"Authorization: Bearer {s['env']['MY_PROV']}").status == 200
    assert idp.api_tokens_seen[-1] == answer.json()["access_token"]


@pytest.mark.parametrize("args, says", [
    (["start", "--provider", "nope", "--redirect-uri", "https://p.example/cb"], "--provider: there is no provider "
                                                                                 "'nope' (known: generic, github, google, my-prov, slack)"),
    (["start", "--provider", "my-prov", "--redirect-uri", "http://p.example/cb"], "--redirect-uri: the redirect URI "
                                                                                   "must be an https:// URL"),
    (["start", "--provider", "my-prov", "--redirect-uri", "https://p.example/cb#x"], "without a fragment"),
    (["finish", "--state", "unknown-state", "--code", "c"], "no linking was begun with this state"),
    (["finish", "--state", "bad state", "--code", "c"], "--state: the state must be 1 to 2048 printable ASCII"),
    (["add", "--provider", "my-prov"], "--tokens: not a usable token response"),
    (["rm", "--provider", "my-prov"], "has no link to my-prov"),
    (["rm", "--provider", "\x1b[2J" + "x" * 100], "--provider: provider name '\\x1b[2Jxxxxxxxxxxx"),  # quoted, cut
])
def test_bad_link_input_is_one_clear_line(linked, user, args, says):
    p, _, _ = linked
    if args[0] != "finish":
        args = [args[0], "--user", user, *args[1:]]
    r = p.cli("link", *args, check=False, input='{"access_token": "short"}')
    assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_code_refused_by_the_provider_is_a_clear_error(linked, user):
    p, idp, _ = linked
    url = p.cli("link", "start", "--user", user, "--provider", "my-prov", "--redirect-uri",
                "https://platform.example/cb").stdout.strip()
    code, state = idp.authorize(url)
    r = p.cli("link", "finish", "--state", state, f"--code={code}x", check=False)
    assert r.returncode == 1 and "--code: my-prov refused the code (invalid_grant)" in r.stderr


def test_a_secret_and_a_link_never_share_a_name(linked, user, value):
    p, idp, _ = linked
    p.add_secret(user, "MY_PROV", value, idp.origin)
    r = p.cli("link", "start", "--user", user, "--provider", "my-prov", "--redirect-uri", "https://p.example/cb",
              check=False)
    assert r.returncode == 1 and f"user {user} has a secret named MY_PROV" in r.stderr
    p.cli("secret", "rm", "--user", user, "--name", "MY_PROV")
    link(p, idp, user)
    r = p.cli("secret", "add", "--user", user, "--name", "MY_PROV", "--origins", idp.origin, input=value, check=False)
    assert r.returncode == 1 and "--name: user" in r.stderr and "has linked my-prov, which appears as MY_PROV" in r.stderr


def test_the_token_endpoint_is_reached_only_as_the_egress_policy_and_trust_allow(tmp_path, pki, client_secret,
                                                                                   make_upstream, user):
    """link finish posts the code through the same checks as any request: a token URL on a blocked address, or
    one whose certificate no trusted CA signed, is refused (and the client secret never sent)."""
    idp = OAuthServer(pki, client_secret=client_secret)
    try:
        blocked = make_upstream("127.0.0.3")
        untrusted = make_upstream("127.0.0.1", cert=pki.issue("self", ["127.0.0.1"], self_signed=True))
        for token_url, says in ((blocked.url("/token"), "127.0.0.3 is loopback"),
                                (untrusted.url("/token"), "could not be verified")):
            p = make_proxy(tmp_path / says[:5], pki,
                           SEALGATE_PROVIDERS=str(_provider_file(tmp_path / "p.yaml", idp, token_url=token_url)))
            url = p.cli("link", "start", "--user", user, "--provider", "my-prov", "--redirect-uri",
                        "https://platform.example/cb").stdout.strip()
            code, state = idp.authorize(url)
            r = p.cli("link", "finish", "--state", state, f"--code={code}", check=False)
            assert r.returncode == 1 and says in r.stderr, r.stderr
        assert blocked.received == [] and not [x for x in untrusted.received if client_secret.encode() in x.dump()]
    finally:
        idp.close()


def test_a_provider_that_is_not_configured_any_more_gets_nothing(tmp_path, pki, client_secret, user):
    idp = OAuthServer(pki, client_secret=client_secret)
    try:
        providers_file = _provider_file(tmp_path / "p.yaml", idp)
        p = make_proxy(tmp_path, pki, SEALGATE_PROVIDERS=str(providers_file))
        link(p, idp, user)
        s = p.issue(user=user)
        _provider_file(providers_file, idp, name="renamed")
        p.start()
        try:
            r = _api(p, idp, s, f"Authorization: Bearer {s['env']['MY_PROV']}")
        finally:
            p.stop()
        assert_problem(r, 403, "origin_not_allowed")
        assert idp.api_tokens_seen == []
    finally:
        idp.close()
        conftest.CREATED_VALUES.extend(idp.access_tokens | idp.refresh_tokens)


def test_a_bad_providers_file_stops_run_and_the_cli_naming_file_provider_and_field(tmp_path, pki):
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  x:\n    token_url: http://t.example/token\n")
    p = make_proxy(tmp_path, pki, SEALGATE_PROVIDERS=str(bad))
    r = p.cli("link", "start", "--user", "u1", "--provider", "x", "--redirect-uri", "https://p.example/cb",
              check=False)
    assert r.returncode == 1 and f"{bad}: provider x, field token_url" in r.stderr
    with pytest.raises(AssertionError, match=f"{bad}: provider x, field token_url"):
        p.start()


def test_the_api_links_lists_and_removes(linked, user):
    p, idp, _ = linked
    a = Api(p)
    try:
        r = a.call("POST", f"/v1/users/{user}/links/my-prov/start", json={"redirect_uri": "https://p.example/cb"})
        assert r.status_code == 200 and r.json()["provider"] == "my-prov"
        code, state = idp.authorize(r.json()["authorization_url"])
        problem(a.call("POST", "/v1/links/finish", json={"state": "nope", "code": code}), 404, "not_found")
        problem(a.call("POST", "/v1/links/finish", json={"state": state, "code": code}, token="secrets:read"),
                403, "forbidden")
        r = a.call("POST", "/v1/links/finish", json={"state": state, "code": code})
        assert r.status_code == 200 and (r.json()["env"], r.json()["status"]) == ("MY_PROV", "ok")
        [shown] = a.call("GET", f"/v1/users/{user}/links", token="secrets:read").json()
        assert shown["provider"] == "my-prov"
        problem(a.call("PUT", f"/v1/users/{user}/links/my-prov", json={"access_token": "short"}), 422, "invalid",
                "tokens")
        assert a.call("DELETE", f"/v1/users/{user}/links/my-prov").status_code == 204
        assert a.call("GET", f"/v1/users/{user}/links").json() == []
        assert no_token_in(idp, *a.seen)
    finally:
        a.stop()


@pytest.mark.e2e
def test_two_proxy_processes_on_one_store_spend_a_refresh_token_once(pg, tmp_path, pki, client_secret, user):
    """`sealgate run` twice on one PostgreSQL store, the client secret from each one's environment: requests
    through both at once for a token that is due make one refresh between them (the lease), even when the
    provider rotates refresh tokens, which a second refresh with the same token would find spent."""
    from test_shared_store import nodes, via
    idp = OAuthServer(pki, client_secret=client_secret, expires_in=30, rotate_refresh=True)
    providers_file = _provider_file(tmp_path / "p.yaml", idp)
    a, b = nodes(tmp_path, pki, pg.database(), process=True)
    for node in (a, b):
        node.env.update(SEALGATE_PROVIDERS=str(providers_file), **{SECRET_ENV: client_secret})
    try:
        link(a, idp, user)
        a.start(), b.start()
        s_a = a.issue(user=user)
        s_b = via(s_a, a, b)
        idp.delay, idp.expires_in = 1.0, 3600
        calls = idp.refresh_calls
        results: list = []
        threads = [threading.Thread(target=lambda s=s: results.append(_api(None, idp, s, "Authorization: Bearer "
                                                                           + s["env"]["MY_PROV"])))
                   for s in (s_a, s_b, s_a, s_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status for r in results] == [200] * 4, [r.body for r in results]
        assert idp.refresh_calls == calls + 1
        assert json.loads(b.cli("link", "list", "--user", user, "--json").stdout)[0]["status"] == "ok"
    finally:
        a.stop(), b.stop()
        idp.close()
        conftest.CREATED_VALUES.extend(idp.access_tokens | idp.refresh_tokens)
    for node in (a, b):
        seen = node.visible_to_operators()
        assert not [t for t in (*idp.access_tokens, *idp.refresh_tokens, client_secret) if t.encode() in seen]


def test_a_client_secret_missing_from_the_environment_stops_link_start_before_any_state_is_spent(tmp_path, pki):
    idp = OAuthServer(pki)
    try:
        p = make_proxy(tmp_path, pki, SEALGATE_PROVIDERS=str(_provider_file(
            tmp_path / "p.yaml", idp, client_secret_env="NOT_SET_ANYWHERE_CLIENT_SECRET")))
        r = p.cli("link", "start", "--user", "u1", "--provider", "my-prov", "--redirect-uri", "https://p.example/cb",
                  check=False)
        assert r.returncode == 1 and ("--provider: provider my-prov: the environment variable "
                                      "NOT_SET_ANYWHERE_CLIENT_SECRET (client_secret_env) is not set") in r.stderr
        assert idp.received == []
    finally:
        idp.close()


@pytest.mark.parametrize("target, headers", [("/a b", []), ("/a\x01b", []), ("/ok", [(b"X-Bad", b"a\r\nInjected: 1")]),
                                             ("/ok", [(b"Bad Name", b"v")])])
def test_a_request_http1_cannot_carry_is_refused_before_a_byte_is_sent(pki, target, headers):
    """The 401 re-send speaks HTTP/1.1 through http.client, which refuses (ValueError) what it cannot write: a
    clean OutboundError, never an internal error, and nothing reaches the upstream."""
    from sealgate import outbound
    received: list = []
    from upstream import RawUpstream, raw_response
    up = RawUpstream(pki, lambda head, body, sock: received.append(head) or raw_response(b"{}"))
    with pytest.raises(outbound.OutboundError, match="cannot be written as HTTP/1.1"):
        outbound.send("GET", "127.0.0.1", up.port, "127.0.0.1", target, [(b"Host", up.target.encode()), *headers],
                      b"", context=outbound.trust(pki.ca_pem))
    assert received == []
