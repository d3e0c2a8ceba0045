"""The OAuth test server itself (tests/oauth_server.py), spoken to directly over verified TLS."""

from __future__ import annotations

import ssl
import threading
from urllib.parse import urlencode

import httpx
import pytest

from oauth_server import OAuthServer, pkce_pair

SECRET = "s3cret-client"
REDIRECT = "http://127.0.0.1:1/callback"


@pytest.fixture
def make_oauth(pki):
    servers = []

    def make(**kw) -> OAuthServer:
        servers.append(OAuthServer(pki, client_secret=SECRET, **kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def http(pki):
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
    with httpx.Client(verify=ctx, trust_env=False, timeout=10) as c:
        yield c


def code_for(oauth: OAuthServer, challenge: str, **extra: str) -> str:
    query = {"response_type": "code", "client_id": "test-client", "redirect_uri": REDIRECT, "state": "st-1",
             "code_challenge": challenge, "code_challenge_method": "S256", "scope": "read", **extra}
    code, state = oauth.authorize(f"{oauth.authorize_url}?{urlencode(query)}")
    assert state == "st-1"
    return code


def exchange(http: httpx.Client, oauth: OAuthServer, code: str, verifier: str, **extra) -> httpx.Response:
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
            "code_verifier": verifier, "client_id": "test-client", "client_secret": SECRET, **extra}
    return http.post(oauth.token_url, data=form)


def refresh(http: httpx.Client, oauth: OAuthServer, token: str) -> httpx.Response:
    """A refresh with client_secret_basic."""
    return http.post(oauth.token_url, data={"grant_type": "refresh_token", "refresh_token": token},
                     auth=("test-client", SECRET))


def tokens(http: httpx.Client, oauth: OAuthServer) -> dict:
    verifier, challenge = pkce_pair()
    r = exchange(http, oauth, code_for(oauth, challenge), verifier)
    assert r.status_code == 200, r.text
    return r.json()


def test_code_flow_with_pkce_then_api(make_oauth, http):
    oauth = make_oauth()
    verifier, challenge = pkce_pair()
    code = code_for(oauth, challenge)
    r = exchange(http, oauth, code, verifier)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600 and body["scope"] == "read"
    assert oauth.access_tokens == {body["access_token"]} and oauth.refresh_tokens == {body["refresh_token"]}
    assert oauth.code_calls == 1

    api = http.post(oauth.origin + "/api/things?x=1", content=b"hello",
                    headers={"Authorization": f"Bearer {body['access_token']}"})
    assert api.status_code == 200
    echo = api.json()
    assert echo["method"] == "POST" and echo["path"] == "/api/things?x=1" and echo["body"] == "hello"
    assert ["Authorization", f"Bearer {body['access_token']}"] in echo["headers"]
    assert oauth.api_tokens_seen == [body["access_token"]]
    assert body["access_token"].encode() in oauth.seen() and SECRET.encode() in oauth.seen()

    again = exchange(http, oauth, code, verifier)
    assert again.status_code == 400 and again.json() == {"error": "invalid_grant"}


@pytest.mark.parametrize("bad", [{"code_verifier": "not-the-verifier"}, {"redirect_uri": REDIRECT + "x"}])
def test_bad_verifier_or_redirect_refused(make_oauth, http, bad):
    oauth = make_oauth()
    verifier, challenge = pkce_pair()
    r = exchange(http, oauth, code_for(oauth, challenge), verifier, **bad)
    assert r.status_code == 400 and r.json() == {"error": "invalid_grant"}
    assert not oauth.access_tokens


def test_authorize_requires_pkce_s256(make_oauth, http):
    oauth = make_oauth()
    r = http.get(oauth.authorize_url, params={"response_type": "code", "client_id": "test-client",
                                              "redirect_uri": REDIRECT, "state": "s", "code_challenge": "c",
                                              "code_challenge_method": "plain"})
    assert r.status_code == 400 and r.json() == {"error": "invalid_request"}


def test_client_authentication(make_oauth, http):
    oauth = make_oauth()
    verifier, challenge = pkce_pair()
    wrong = exchange(http, oauth, code_for(oauth, challenge), verifier, client_secret="wrong")
    assert wrong.status_code == 401 and wrong.json() == {"error": "invalid_client"}
    basic = http.post(oauth.token_url, auth=("test-client", SECRET),
                      data={"grant_type": "authorization_code", "code": code_for(oauth, challenge),
                            "redirect_uri": REDIRECT, "code_verifier": verifier})
    assert basic.status_code == 200, basic.text


def test_refresh_keeps_token_without_rotation(make_oauth, http):
    oauth = make_oauth()
    first = tokens(http, oauth)
    r = refresh(http, oauth, first["refresh_token"])
    assert r.status_code == 200 and r.json()["refresh_token"] == first["refresh_token"]
    assert r.json()["access_token"] != first["access_token"]
    assert refresh(http, oauth, first["refresh_token"]).status_code == 200
    assert oauth.refresh_calls == 2


def test_rotation_invalidates_the_old_refresh_token(make_oauth, http):
    oauth = make_oauth(rotate_refresh=True)
    old = tokens(http, oauth)["refresh_token"]
    new = refresh(http, oauth, old).json()["refresh_token"]
    assert new != old
    r = refresh(http, oauth, old)
    assert r.status_code == 400 and r.json() == {"error": "invalid_grant"}
    assert refresh(http, oauth, new).status_code == 200


def test_concurrent_refreshes_with_rotation_one_wins(make_oauth, http):
    oauth = make_oauth(rotate_refresh=True, delay=0.3)
    old = tokens(http, oauth)["refresh_token"]
    statuses = []
    threads = [threading.Thread(target=lambda: statuses.append(refresh(http, oauth, old).status_code))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200, 400] and oauth.refresh_calls == 2


def test_revoke_and_revoke_all(make_oauth, http):
    oauth = make_oauth()
    a, b = tokens(http, oauth)["refresh_token"], tokens(http, oauth)["refresh_token"]
    oauth.revoke(a)
    assert refresh(http, oauth, a).json() == {"error": "invalid_grant"}
    assert refresh(http, oauth, b).status_code == 200
    oauth.revoke_all()
    assert refresh(http, oauth, b).status_code == 400


def test_expire_access_tokens(make_oauth, http):
    oauth = make_oauth()
    first = tokens(http, oauth)
    url = oauth.origin + "/api/me"
    assert http.get(url, headers={"Authorization": f"Bearer {first['access_token']}"}).status_code == 200
    oauth.expire_access_tokens()
    stale = http.get(url, headers={"Authorization": f"Bearer {first['access_token']}"})
    assert stale.status_code == 401 and stale.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    fresh = refresh(http, oauth, first["refresh_token"]).json()["access_token"]
    assert http.get(url, headers={"Authorization": f"Bearer {fresh}"}).status_code == 200
    assert http.get(url).status_code == 401
    assert oauth.api_tokens_seen == [first["access_token"]] * 2 + [fresh, None]


def test_access_token_expires_in_time(make_oauth, http):
    oauth = make_oauth(expires_in=0)
    token = tokens(http, oauth)["access_token"]
    assert http.get(oauth.origin + "/api/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_fail_next(make_oauth, http):
    oauth = make_oauth()
    token = tokens(http, oauth)["refresh_token"]
    oauth.fail_next(2, status=502)
    assert [refresh(http, oauth, token).status_code for _ in range(3)] == [502, 502, 200]
    assert oauth.refresh_calls == 3
