"""Secrets that sign requests (HMAC-SHA256 of the body, AWS Signature Version 4) and never go in one: through
the real proxy, each signature checked by a verifier that recomputes it from what the upstream received,
and the key (and, for AWS, either half of it) searched for in everything the worker and the operator see.
The signing rules themselves are pinned by AWS's published vectors in test_signing.py."""

from __future__ import annotations

import json
import re
import secrets
import string

import pytest

import conftest
from conftest import curl, make_proxy, node_fetch
from test_proxy import assert_clean, assert_problem

from sealgate import signing


@pytest.fixture(scope="module")
def signer(tmp_path_factory, pki, make_upstream):
    p = make_proxy(tmp_path_factory.mktemp("sign"), pki)
    api = make_upstream("127.0.0.1")
    p.start()
    yield p, api
    p.stop()


@pytest.fixture
def aws_value() -> str:
    key_id = "AKIA" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16))
    value = f"{key_id}:{secrets.token_urlsafe(30)}"
    conftest.CREATED_VALUES.extend([value, *value.split(":")])
    return value


def add_aws(p, api, user: str, value: str, region: str = "us-east-1", service: str = "s3", name: str = "AWS"):
    p.add_secret(user, name, value, api.origin, "--sign", "aws-sigv4", "--region", region, "--service", service)
    return p.issue(user=user)


def _got(api, before: int):
    return api.received[before:]


def verify_hmac(key: str, received, header: str = "X-Signature", prefix: str = "sha256=") -> None:
    """What a webhook receiver does: recompute the HMAC over the body as received."""
    assert received.header(header) == prefix + signing.hmac_sha256_hex(key, received.body)


def verify_sigv4(value: str, received, region: str, service: str) -> str:
    """What AWS does: recompute the signature from the request as received; the signature."""
    auth = received.header("Authorization")
    m = re.fullmatch(r"AWS4-HMAC-SHA256 Credential=([A-Z0-9]+)/(\d{8})/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request, "
                     r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})", auth or "")
    assert m, auth
    key = signing.parse_sigv4_value(value)
    assert (m[1], m[3], m[4]) == (key.access_key_id, region, service)
    assert received.header("X-Amz-Date").startswith(m[2])
    payload = received.header("X-Amz-Content-Sha256")
    assert payload == signing.payload_hash(received.body) or payload == signing.UNSIGNED_PAYLOAD
    expected, signature = signing.sigv4_authorization(
        key, method=received.method, target=received.path, headers=received.headers, payload_hash=payload,
        region=region, service=service, amz_date=received.header("X-Amz-Date"), signed_headers=m[5].split(";"))
    assert auth == expected
    assert {"host", "x-amz-date", "x-amz-content-sha256"} <= set(m[5].split(";"))
    return signature


def test_hmac_signs_the_body_as_sent_after_every_other_substitution(signer, user, value):
    p, api = signer
    key = "whsec-" + secrets.token_urlsafe(24)
    conftest.CREATED_VALUES.append(key)
    p.add_secret(user, "HOOK", key, api.origin, "--sign", "hmac-sha256", "--sign-header", "X-Signature")
    p.add_secret(user, "K", value, api.origin)
    s = p.issue(user=user)
    body = json.dumps({"token": s["env"]["K"], "event": "ping"})
    before = len(api.received)
    r = curl(s, api.url("/echo/hook"), "-X", "POST", "-H", "Content-Type: application/json",
             "-H", f"X-Signature: sha256={s['env']['HOOK']}", "--data-binary", body)
    assert r.status == 200
    [got] = _got(api, before)
    assert value in got.body.decode()  # filled first, then signed
    verify_hmac(key, got)
    signature = got.header("X-Signature")
    assert signature[len("sha256="):].encode() not in r.seen(), "the worker got the signature back"
    assert s["env"]["HOOK"] in r.body.decode()  # the echo shows the placeholder instead
    assert key.encode() not in got.dump()
    assert_clean(p, key, r.seen())
    assert_clean(p, value, r.seen())


def test_hmac_with_node_fetch_and_without_a_named_header(signer, user):
    p, api = signer
    key = "whsec-" + secrets.token_urlsafe(24)
    conftest.CREATED_VALUES.append(key)
    p.add_secret(user, "HOOK", key, api.origin, "--sign", "hmac-sha256")
    s = p.issue(user=user)
    before = len(api.received)
    r = node_fetch(s, api.url("/hook"), method="POST", headers={"X-Hub-Signature-256": f"sha256={s['env']['HOOK']}"},
                   body="payload=1")
    assert r.status == 200
    [got] = _got(api, before)
    verify_hmac(key, got, "X-Hub-Signature-256")
    assert_clean(p, key, r.seen())


@pytest.mark.parametrize("where, args, code, says", [
    ("body", ["-X", "POST", "--data-binary", "k={HOOK}"], "scope_denied", "only signs requests; its placeholder may "
                                                                         "stand in a header, not in the body"),
    ("query", ["-G", "--data-urlencode", "k={HOOK}"], "scope_denied", "not in the query"),
    ("another header", ["-H", "X-Other: {HOOK}"], "scope_denied", "may stand only in X-Signature, not in x-other"),
    ("basic auth", ["-u", "me:{HOOK}"], "scope_denied", "not in (basic auth)"),
])
def test_an_hmac_key_goes_nowhere_but_into_a_signature(signer, user, where, args, code, says):
    p, api = signer
    key = "whsec-" + secrets.token_urlsafe(24)
    conftest.CREATED_VALUES.append(key)
    p.add_secret(user, "HOOK", key, api.origin, "--sign", "hmac-sha256", "--sign-header", "X-Signature")
    s = p.issue(user=user)
    before = len(api.received)
    r = curl(s, api.url("/echo"), *(a.replace("{HOOK}", s["env"]["HOOK"]) for a in args))
    assert_problem(r, 403, code, says)
    assert _got(api, before) == [], where
    assert_clean(p, key, r.seen())


@pytest.mark.e2e  # (slow by design: a provider that takes its time, or many MiB)
def test_a_large_body_is_held_whole_to_be_signed_and_one_of_unknown_length_is_refused(signer, user, tmp_path):
    """Up to 16 MiB with a Content-Length: held whole (not streamed), then signed. Chunked, of unknown length:
    refused before anything goes out; the connection is closed (its body is never read), and the refusal is
    audited."""
    p, api = signer
    key = "whsec-" + secrets.token_urlsafe(24)
    conftest.CREATED_VALUES.append(key)
    p.add_secret(user, "HOOK", key, api.origin, "--sign", "hmac-sha256")
    s = p.issue(user=user)
    big = secrets.token_hex(1024 * 1024)  # 2 MiB
    (tmp_path / "big").write_text(big)
    before = len(api.received)
    r = curl(s, api.url("/hook"), "-X", "POST", "-H", f"X-Signature: {s['env']['HOOK']}", "--data-binary",
             f"@{tmp_path / 'big'}", "-H", "Expect:")
    assert r.status == 200
    [got] = _got(api, before)
    assert len(got.body) == len(big) and got.header("X-Signature") == signing.hmac_sha256_hex(key, big.encode())
    with pytest.raises(AssertionError, match="Empty reply from server|reset by peer"):
        curl(s, api.url("/hook"), "-X", "POST", "-H", f"X-Signature: {s['env']['HOOK']}", "-H",
             "Transfer-Encoding: chunked", "--data-binary", "x")
    assert len(api.received) == before + 1
    [row] = [a for a in json.loads(p.cli("audit", "--user", user, "--json").stdout) if a["decision"] == "block"]
    assert row["code"] == "unsignable_request"


def test_sigv4_signs_what_the_upstream_receives(signer, user, aws_value):
    p, api = signer
    s = add_aws(p, api, user, aws_value, "eu-west-1", "execute-api")
    before = len(api.received)
    r = curl(s, api.url("/echo/prod/items?b=2&a=1"), "-X", "PUT", "-H", f"Authorization: {s['env']['AWS']}",
             "-H", "X-Amz-Meta-Colour: blue", "-H", "Content-Type: application/json", "--data-binary", '{"n":1}')
    assert r.status == 200, r.body
    [got] = _got(api, before)
    signature = verify_sigv4(aws_value, got, "eu-west-1", "execute-api")
    assert "x-amz-meta-colour" in got.header("Authorization")
    for half in aws_value.split(":"):
        assert half.encode() not in r.seen() and half.encode() not in p.visible_to_operators()
    assert signature.encode() not in r.seen()
    assert aws_value.split(":")[1].encode() not in got.dump()  # the secret half never travels


def test_sigv4_keeps_a_date_the_worker_set_and_works_from_python(signer, user, aws_value):
    import requests
    p, api = signer
    s = add_aws(p, api, user, aws_value)
    before = len(api.received)
    r = requests.get(api.url("/bucket/key.txt"), headers={"Authorization": s["env"]["AWS"],
                                                          "X-Amz-Date": "20261130T120000Z"},
                     proxies={"https": s["proxy_url"]}, verify=s["ca_cert"], timeout=20)
    assert r.status_code == 200
    [got] = _got(api, before)
    assert got.header("X-Amz-Date") == "20261130T120000Z"
    verify_sigv4(aws_value, got, "us-east-1", "s3")


@pytest.mark.e2e  # (slow by design: a provider that takes its time, or many MiB)
def test_sigv4_streams_to_s3_unsigned_and_refuses_elsewhere(signer, user, aws_value, tmp_path):
    p, api = signer
    add_aws(p, api, user, aws_value)
    s = add_aws(p, api, user, aws_value.replace(":", ":x"), service="execute-api", name="API")
    big = "x" * (17 * 1024 * 1024)
    (tmp_path / "big").write_text(big)
    before = len(api.received)
    r = curl(s, api.url("/bucket/big"), "-X", "PUT", "-H", f"Authorization: {s['env']['AWS']}",
             "--data-binary", f"@{tmp_path / 'big'}", "-H", "Expect:")
    assert r.status == 200, r.body
    [got] = _got(api, before)
    assert got.header("X-Amz-Content-Sha256") == signing.UNSIGNED_PAYLOAD and len(got.body) == len(big)
    verify_sigv4(aws_value, got, "us-east-1", "s3")
    with pytest.raises(AssertionError, match="Empty reply from server|reset by peer"):  # closed: its body is never read
        curl(s, api.url("/api/big"), "-X", "PUT", "-H", f"Authorization: {s['env']['API']}", "--data-binary",
             f"@{tmp_path / 'big'}", "-H", "Expect:")
    assert len(api.received) == before + 1
    [row] = [a for a in json.loads(p.cli("audit", "--user", user, "--json").stdout) if a["decision"] == "block"]
    assert row["code"] == "unsignable_request" and row["secrets"] == []


@pytest.mark.parametrize("header", ["Bearer {AWS}", "{AWS} ", "x{AWS}"])
def test_sigv4_needs_the_whole_authorization_header(signer, user, aws_value, header):
    p, api = signer
    s = add_aws(p, api, user, aws_value)
    before = len(api.received)
    r = curl(s, api.url("/b/k"), "-H", "Authorization: " + header.replace("{AWS}", s["env"]["AWS"]))
    if header.endswith(" "):  # curl trims the trailing space: then it is the whole header
        assert r.status == 200
        return
    assert_problem(r, 403, "scope_denied", "must be the whole Authorization header")
    assert _got(api, before) == []


def test_how_a_secret_signs_is_set_when_added_and_kept(signer, user, aws_value):
    p, api = signer
    add_aws(p, api, user, aws_value)
    listed = json.loads(p.cli("secret", "list", "--user", user, "--json").stdout)[0]
    assert listed["sign"] == {"kind": "aws-sigv4", "region": "us-east-1", "service": "s3"}
    p.cli("secret", "set-scope", "--user", user, "--name", "AWS", "--methods", "GET")  # no --sign: kept
    p.add_secret(user, "AWS", aws_value, api.origin, "--replace")  # kept
    assert json.loads(p.cli("secret", "list", "--user", user, "--json").stdout)[0]["sign"]["kind"] == "aws-sigv4"
    r = p.cli("secret", "add", "--user", user, "--name", "AWS", "--origins", api.origin, "--replace", "--sign",
              "hmac-sha256", input=aws_value, check=False)
    assert r.returncode == 1 and "--sign: how AWS signs is set when it is added" in r.stderr
    s = p.issue(user=user)
    before = len(api.received)
    r = curl(s, api.url("/b/k"), "-H", f"Authorization: {s['env']['AWS']}")
    assert r.status == 200 and _got(api, before)[0].header("Authorization").startswith("AWS4-HMAC-SHA256 ")


@pytest.mark.parametrize("args, value, says", [
    (["--sign", "rsa"], "v" * 20, "argument --sign: invalid choice (not shown)"),
    (["--sign", "aws-sigv4", "--region", "us-east-1"], "AKIAAAAAAAAAAAAAAAAA:s" * 2, "--sign: aws-sigv4 needs --service"),
    (["--sign", "aws-sigv4", "--region", "US EAST", "--service", "s3"], "x" * 20, "aws-sigv4 needs --region"),
    (["--sign", "aws-sigv4", "--region", "us-east-1", "--service", "s3"], "no-colon-in-this-value", "--value:"),
    (["--sign", "hmac-sha256", "--region", "us-east-1"], "v" * 20, "--region and --service are for aws-sigv4"),
    (["--sign-header", "X-Sig"], "v" * 20, "--sign-header, --region and --service go with --sign"),
    (["--sign", "hmac-sha256", "--sign-header", "X Sig"], "v" * 20, "'X Sig' is not a header name"),
])
def test_bad_signing_flags_are_one_clear_line(signer, user, args, value, says):
    p, api = signer
    r = p.cli("secret", "add", "--user", user, "--name", "S", "--origins", api.origin, *args, input=value,
              check=False)
    assert r.returncode in (1, 2) and says in r.stderr and value not in r.stderr, r.stderr
