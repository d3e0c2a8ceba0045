"""Many proxies, one store: changes everywhere within a second, sessions revoked everywhere, keys
rotated under load, backups that hold nothing in clear, and a database that goes away and comes back.

The proxies are real (in this process, or `sealgate run` processes for the test marked e2e), the
database a throwaway PostgreSQL cluster (tests/pg.py), the clients curl and requests."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import SEALGATE, curl, make_proxy
from test_proxy import assert_problem, leaks
from test_store import Place

from sealgate import backup, crypto, origins, rotation, seals, sessions
from sealgate.store import SecretStore, StoreError

WITHIN = 1.0  # seconds a change may take to reach every proxy


def until(check, limit: float = 5.0, every: float = 0.02) -> float:
    """Seconds until check() is true; fails after limit."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > limit:
            raise AssertionError(f"not true within {limit} s")
        time.sleep(every)
    return time.monotonic() - start


def nodes(tmp_path, pki, url: str, count: int = 2, *, process: bool = False):
    """count proxies on one store, sharing one master key (SEALGATE_MASTER_KEY, as a secret manager gives it)."""
    key = secrets.token_hex(32)
    for i in range(count):
        (tmp_path / f"node{i}").mkdir()
    return [make_proxy(tmp_path / f"node{i}", pki, process=process, SEALGATE_STORE_URL=url,
                       SEALGATE_MASTER_KEY=key) for i in range(count)]


def via(s: dict, issuer, other) -> dict:
    """A session issued on one node, as a worker behind another node uses it."""
    return {**s, "proxy_url": s["proxy_url"].replace(f":{issuer.port}", f":{other.port}"), "ca_cert": str(other.ca_cert)}


def sent(api, s: dict, name: str, path: str = "/x"):
    """A request through a session carrying one placeholder: (what the worker got, what the upstream got)."""
    before = len(api.received)
    r = curl(s, api.url(path), "-H", f"X-Key: {s['env'][name]}")
    return r, (api.received[-1].header("X-Key") if len(api.received) > before else None)


# --- two stores on one database: the mechanism -------------------------------------------------------

def test_a_write_on_one_node_reaches_the_other_within_a_second(pg, tmp_path, user, value):
    url = pg.database()
    a, b = (SecretStore(tmp_path, url, listen=True) for _ in range(2))
    try:
        assert b.secrets_for(user) == {}  # cached: empty
        a.add_secret(user, "K", value, [origins.parse("https://a.example")])
        assert until(lambda: "K" in b.secrets_for(user)) < WITHIN
        a.set_origins(user, "K", [origins.parse("https://b.example")])
        assert until(lambda: str(b.secrets_for(user)["K"].origins[0]) == "https://b.example") < WITHIN
        a.remove_secret(user, "K")
        assert until(lambda: b.secrets_for(user) == {}) < WITHIN
    finally:
        a.close(), b.close()


def test_a_lost_listening_connection_falls_back_to_a_check_every_second(pg, tmp_path, user, value):
    url = pg.database()
    a, b = SecretStore(tmp_path, url), SecretStore(tmp_path, url, listen=True)
    try:
        assert b.secrets_for(user) == {}
        Place(tmp_path, url).sql("select pg_terminate_backend(pid) from pg_stat_activity "
                                 "where query = ? and datname = current_database()", ["LISTEN sealgate_changes"])
        a.add_secret(user, "K", value, [origins.parse("https://a.example")])  # its NOTIFY reaches nobody
        assert until(lambda: "K" in b.secrets_for(user)) < 2 * WITHIN
        until(b.backend._listening)  # and it listens again
    finally:
        a.close(), b.close()


# --- two proxies on one PostgreSQL store --------------------------------------------------------------

@pytest.mark.e2e
def test_two_proxy_processes_on_one_store(pg, tmp_path, pki, make_upstream, user, value):
    """A secret added through one node's CLI is injected by the other within a second; an origin change
    blocks on both; a session issued on one is honoured by the other, and once revoked refused by both."""
    api, other = make_upstream("127.0.0.1"), make_upstream("127.0.0.1")
    a, b = nodes(tmp_path, pki, pg.database(), process=True)
    a.start(), b.start()
    try:
        s_a = a.issue(user=user)
        s_b = via(s_a, a, b)  # issued on a, used on b
        assert curl(s_b, api.url("/")).status == 200
        a.add_secret(user, "K", value, api.origin)
        s_a = a.issue(user=user)  # a session that knows K
        s_b = via(s_a, a, b)
        started = time.monotonic()
        until(lambda: sent(api, s_b, "K")[1] == value, limit=WITHIN + 2)  # b had cached "no K" before
        assert time.monotonic() - started < WITHIN + 2  # (curl's own start-up counted in)
        started = time.monotonic()
        a.cli("secret", "set-origins", "--user", user, "--name", "K", "--origins", other.origin)
        for s in (s_a, s_b):
            until(lambda s=s: sent(api, s, "K")[0].status == 403, limit=WITHIN + 2)
        assert time.monotonic() - started < WITHIN + 2  # (curl's own start-up counted in)
        r, got = sent(other, s_b, "K")
        assert r.status == 200 and got == value
        b.cli("session", "revoke", s_a["session_id"])
        for s in (s_a, s_b):
            until(lambda s=s: curl(s, other.url("/")).status == 407, limit=WITHIN + 2)
        assert_problem(curl(s_b, other.url("/"), "-H", f"X-Key: {s_b['env']['K']}"), 407, "proxy_auth_required")
    finally:
        a.stop(), b.stop()
    for p in (a, b):
        assert not leaks(value, p.visible_to_operators())


def test_a_session_revoked_on_another_node_is_refused_on_an_open_tunnel(pg, tmp_path, pki, api, user, value):
    a, b = nodes(tmp_path, pki, pg.database())
    a.start()
    try:
        b.add_secret(user, "K", value, api.origin)
        s = via(b.issue(user=user), b, a)
        with requests.Session() as http:
            http.trust_env = False
            kw = {"proxies": {"https": s["proxy_url"]}, "verify": s["ca_cert"], "timeout": 10}
            r = http.get(api.url("/t"), headers={"X-Key": s["env"]["K"]}, **kw)
            assert r.status_code == 200 and api.received[-1].header("X-Key") == value
            b.cli("session", "revoke", s["session_id"])
            started = time.monotonic()
            until(lambda: http.get(api.url("/t"), headers={"X-Key": s["env"]["K"]}, **kw).status_code == 407)
            assert time.monotonic() - started < WITHIN
        refused = b.cli("session", "revoke", s["session_id"], check=False)
        assert refused.returncode == 1 and f"there is no session {s['session_id']}" in refused.stderr
    finally:
        a.stop()


def test_revocation_on_sqlite_reaches_an_open_tunnel(tmp_path, pki, api, user, value):
    p = make_proxy(tmp_path, pki)
    p.start()
    try:
        p.add_secret(user, "K", value, api.origin)
        s = p.issue(user=user)
        with requests.Session() as http:
            http.trust_env = False
            kw = {"proxies": {"https": s["proxy_url"]}, "verify": s["ca_cert"], "timeout": 10}
            assert http.get(api.url("/t"), headers={"X-Key": s["env"]["K"]}, **kw).status_code == 200
            p.cli("session", "revoke", s["session_id"])
            r = http.get(api.url("/t"), headers={"X-Key": s["env"]["K"]}, **kw)
            assert r.status_code == 407 and "revoked" in r.json()["detail"]
    finally:
        p.stop()


# --- keys -----------------------------------------------------------------------------------------------

class Load:
    """Injecting requests in a loop on a thread, each with a timeout: what each got, and how long it took."""

    def __init__(self, s: dict, api, name: str = "K") -> None:
        self.s, self.api, self.name = s, api, name
        self.results: list[tuple[int, str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        until(lambda: len(self.results) >= 3)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with requests.Session() as http:
            http.trust_env = False
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    r = http.get(self.api.url("/load"), headers={"X-Key": self.s["env"][self.name]}, timeout=15,
                                 proxies={"https": self.s["proxy_url"]}, verify=self.s["ca_cert"])
                    code = r.headers.get("x-sealgate-error", "")
                    self.results.append((r.status_code, code, time.monotonic() - started))
                except requests.RequestException as e:
                    self.results.append((0, e.__class__.__name__, time.monotonic() - started))


@pytest.mark.e2e  # a load test
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_key_rotation_under_load_loses_no_request(request, backend, tmp_path, pki, make_upstream, user, value):
    api = make_upstream("127.0.0.1")
    url = request.getfixturevalue("pg").database() if backend == "postgresql" else None
    p = make_proxy(tmp_path, pki, **({"SEALGATE_STORE_URL": url} if url else {}))
    for i in range(30):
        p.add_secret(user, f"K{i}", f"{value}-{i}", api.origin)
    p.add_secret(user, "K", value, api.origin)
    s = p.issue(user=user)
    p.start()
    try:
        with Load(s, api) as load:
            first = p.cli("key", "rotate", "--batch", "4").stdout
            second = p.cli("key", "rotate", "--batch", "4").stdout
            time.sleep(0.3)
        assert load.results and all(status == 200 for status, _, _ in load.results), load.results[-5:]
        assert all(r.header("X-Key") == value for r in api.received if r.path == "/load")
        listed = p.cli("key", "list").stdout.splitlines()
        first_id, second_id = first.split()[3], second.split()[3]
        assert any(line.startswith(f"{second_id}\tdata\tcurrent\t31 secret(s)") for line in listed), listed
        assert any(line.startswith(f"{first_id}\tdata\t-\t0 secret(s)") for line in listed), listed
        retired = p.cli("key", "retire", second_id, check=False)
        assert retired.returncode == 1 and "is the current key" in retired.stderr
        p.cli("key", "retire", first_id)
        assert first_id not in p.cli("key", "list").stdout
        r, got = sent(api, s, "K5")
        assert r.status == 200 and got == f"{value}-5"
    finally:
        p.stop()
    if url:
        dump = request.getfixturevalue("pg").dump(url)
        assert user.encode() in dump  # the rows are in it
        assert not leaks(value, dump) and s["proxy_url"].split("@")[0].split(":")[-1].encode() not in dump


def test_retire_refuses_a_key_still_in_use_and_the_master_key(tmp_path, user, value):
    store = SecretStore(tmp_path)
    store.add_secret(user, "K", value, [origins.parse("https://a.example")])
    [master, data] = rotation.list_keys(store)
    assert (master.kind, master.current, master.secrets) == ("master", False, 0)
    assert (data.kind, data.current, data.secrets) == ("data", True, 1)
    newer = rotation.rotate(store)
    with pytest.raises(StoreError, match="is the master key itself"):
        rotation.retire(store, master.key_id)
    with pytest.raises(StoreError, match="there is no data key nope"):
        rotation.retire(store, "nope")
    with store.write() as tx:  # a value written under the old key (by a node that had not seen the rotation)
        ring = store.keyring(tx)
        env = crypto.seal(ring[data.key_id], user, "K", value)
        row = {**tx.rows("select * from secrets")[0], "key_id": data.key_id, "nonce": env.nonce,
               "ciphertext": env.ciphertext}
        tx.one("update secrets set key_id = ?, nonce = ?, ciphertext = ?, seal = ?",
               [data.key_id, env.nonce, env.ciphertext, seals.secret_seal(store.key, row)])
        seals.reseal_owner(tx, store.key, user)
    with pytest.raises(StoreError, match="still seals 1 secret"):
        rotation.retire(store, data.key_id)
    rotation.finish(store, newer)
    rotation.retire(store, data.key_id)
    assert SecretStore(tmp_path).secrets_for(user)["K"].value == value


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_rotation_killed_mid_write_corrupts_nothing(request, backend, tmp_path, user, value):
    url = request.getfixturevalue("pg").database() if backend == "postgresql" else None
    store = SecretStore(tmp_path, url)
    values = {f"K{i}": f"{value}-{i}" for i in range(400)}
    for name, v in values.items():
        store.add_secret(user, name, v, [origins.parse("https://a.example")])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEALGATE_")}
    env.update(SEALGATE_DATA_DIR=str(tmp_path), **({"SEALGATE_STORE_URL": url} if url else {}))
    proc = subprocess.Popen([str(SEALGATE), "key", "rotate", "--batch", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    until(lambda: len({k.key_id for k in rotation.list_keys(store)}) == 3 and
          0 < [k for k in rotation.list_keys(store) if k.current][0].secrets, limit=30, every=0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fresh = SecretStore(tmp_path, url)
    moved = [k for k in rotation.list_keys(fresh) if k.current][0].secrets
    assert 0 < moved < len(values)  # killed part way
    assert {n: s.value for n, s in fresh.secrets_for(user).items()} == values
    rotation.rotate(fresh)  # a later rotation finishes the job
    assert {n: s.value for n, s in SecretStore(tmp_path, url).secrets_for(user).items()} == values


# --- key sources ---------------------------------------------------------------------------------------

def served(p, api, s: dict) -> tuple[int, str | None]:
    """Start the proxy, send K through it, stop it: (the worker's status, what the upstream got)."""
    p.start()
    try:
        r, got = sent(api, s, "K")
        return r.status, got
    finally:
        p.stop()


def refused(p, user: str) -> str:
    """`secret list` must fail, in one line: what it said."""
    r = p.cli("secret", "list", "--user", user, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_the_master_key_from_the_environment(tmp_path, pki, api, user, value):
    key = secrets.token_hex(32)
    p = make_proxy(tmp_path, pki, SEALGATE_MASTER_KEY=key)
    p.add_secret(user, "K", value, api.origin)
    s = p.issue(user=user)
    assert not (p.data_dir / "master.key").exists()  # nothing on disk
    assert served(p, api, s) == (200, value)
    p.env["SEALGATE_MASTER_KEY"] = secrets.token_hex(32)
    assert "master key in SEALGATE_MASTER_KEY does not open the store" in refused(p, user)
    p.env["SEALGATE_MASTER_KEY"] = "abcd"
    said = refused(p, user)
    assert "SEALGATE_MASTER_KEY is not a 32-byte key" in said and "abcd" not in said
    p.env["SEALGATE_MASTER_KEY"] = "xyz"
    assert "SEALGATE_MASTER_KEY cannot be read: it is not hex" in refused(p, user)


def test_a_key_hook_wraps_the_master_key(tmp_path, pki, api, user, value, monkeypatch):
    """The KMS hook: the file holds the key wrapped by the hook; without the hook it opens nothing."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    p = make_proxy(tmp_path, pki, SEALGATE_KEY_HOOK="fake_kms:KMS")
    p.add_secret(user, "K", value, api.origin)
    s = p.issue(user=user)
    import fake_kms
    wrapped = bytes.fromhex((p.data_dir / "master.key").read_text().split()[0])
    master = fake_kms.KMS.unwrap(wrapped)
    assert len(wrapped) > 32 and master.hex() not in (p.data_dir / "master.key").read_text()
    assert served(p, api, s) == (200, value)
    del p.env["SEALGATE_KEY_HOOK"]
    assert "is not a 32-byte key" in refused(p, user)
    p.env["SEALGATE_KEY_HOOK"] = "fake_kms:Nothing"
    assert "SEALGATE_KEY_HOOK='fake_kms:Nothing' cannot be loaded" in refused(p, user)


# --- backup and restore -----------------------------------------------------------------------------------

@pytest.mark.parametrize("source, target", [("sqlite", "postgresql"), ("postgresql", "sqlite")])
def test_backup_and_restore_across_backends(request, source, target, tmp_path, user, value):
    urls = {kind: (request.getfixturevalue("pg").database() if kind == "postgresql" else None)
            for kind in (source, target)}
    a = SecretStore(tmp_path / "a", urls[source])
    a.add_secret(user, "K", value, [origins.parse("https://a.example")])
    rotation.rotate(a)
    a.add_secret(user, "J", value + "-j", [origins.parse("https://b.example")])
    issued = sessions.issue(a, access="api", runchat="r", instance="i", user=user, author=None, ttl_seconds=600)
    file = tmp_path / "backup.jsonl"
    counts = backup.backup(a, file)
    assert counts["secrets"] == 2 and counts["sessions"] == 1 and oct(file.stat().st_mode)[-3:] == "600"
    assert not leaks(value, file.read_bytes()) and issued.credential.encode() not in file.read_bytes()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "master.key").write_bytes((tmp_path / "a" / "master.key").read_bytes())
    (tmp_path / "b" / "master.key").chmod(0o600)
    b = SecretStore(tmp_path / "b", urls[target])
    assert backup.restore(b, file)["secrets"] == 2
    b = SecretStore(tmp_path / "b", urls[target])
    assert {n: s.value for n, s in b.secrets_for(user).items()} == {"K": value, "J": value + "-j"}
    assert b.session(issued.session.id) is not None
    with pytest.raises(StoreError, match="is not empty"):
        backup.restore(b, file)


def test_a_restore_is_refused_under_another_key_or_when_a_row_was_edited(tmp_path, user, value):
    a = SecretStore(tmp_path / "a")
    a.add_secret(user, "K", value, [origins.parse("https://a.example")])
    file = tmp_path / "backup.jsonl"
    backup.backup(a, file)
    with pytest.raises(StoreError, match="was made under master key .* give the store the key that made"):
        backup.restore(SecretStore(tmp_path / "other"), file)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "master.key").write_bytes((tmp_path / "a" / "master.key").read_bytes())
    (tmp_path / "b" / "master.key").chmod(0o600)
    file.write_text(file.read_text().replace("https://a.example", "https://evil.example"))
    b = SecretStore(tmp_path / "b")
    with pytest.raises(StoreError, match="was changed without the master key"):
        backup.restore(b, file)
    assert b.list_secrets(user) == []  # nothing of it was kept
    file.write_text("not json\n")
    with pytest.raises(StoreError, match="line 1: not JSON"):
        backup.restore(b, file)


# --- the database goes away and comes back -----------------------------------------------------------------

@pytest.mark.e2e
def test_postgresql_restarted_under_load(pg, tmp_path, pki, api, user, value):
    """Meanwhile requests that need the store get 503 store_unavailable (none hang); all recover by themselves."""
    url = pg.database()
    [p] = nodes(tmp_path, pki, url, count=1)
    p.add_secret(user, "K", value, api.origin)
    s = p.issue(user=user)
    p.start()
    try:
        with Load(s, api) as load:
            pg.pg_ctl("stop", "-m", "fast")
            time.sleep(2)
            down = len(load.results)
            pg.pg_ctl("start")
            until(lambda: load.results[-1][0] == 200, limit=15)
            time.sleep(0.5)
        during = load.results[:down]
        assert {(st, code) for st, code, _ in during} <= {(200, ""), (503, "store_unavailable")}, set(during)
        assert (503, "store_unavailable") in {(st, code) for st, code, _ in during}
        assert max(took for _, _, took in load.results) < 5  # none hung
        assert load.results[-1][0] == 200
    finally:
        p.stop()
    assert not leaks(value, p.visible_to_operators())


@pytest.mark.e2e  # waits out the audit flush at shutdown (10 s) by design
def test_a_value_never_goes_unaudited(tmp_path, pki, make_upstream, user, value):
    """The audit trail cannot take a row (here: its table is gone): rows wait in the queue, up to its bound;
    past it an injecting request is refused and its value goes nowhere; a request that fills nothing is
    unaffected."""
    api = make_upstream("127.0.0.1")
    p = make_proxy(tmp_path, pki, SEALGATE_AUDIT_QUEUE="3")
    p.add_secret(user, "K", value, api.origin)
    s = p.issue(user=user)
    p.start()
    try:
        assert sent(api, s, "K")[1] == value  # the secret is opened and cached
        p.audit_written()
        Place(p.data_dir, None).sql("drop table audit")
        assert [sent(api, s, "K", f"/queued{i}")[1] for i in range(3)] == [value] * 3  # the queue holds them
        r, got = sent(api, s, "K", "/unaudited")
        assert_problem(r, 503, "store_unavailable", "the audit trail cannot take more rows")
        assert got is None and not any(rec.path == "/unaudited" for rec in api.received)
        assert curl(s, api.url("/plain")).status == 200
    finally:
        p.stop()
    lines = [line for line in p.log.read_text().splitlines() if "path=/unaudited" in line]
    assert lines and not any("decision=allow" in line for line in lines)  # logged as refused, never as allowed
    assert "3 audit rows could not be written before sealgate stopped" in p.log.read_text()


def test_the_cli_backs_up_and_restores_and_names_a_bad_store_url(tmp_path, pki, user, value):
    a = make_proxy(tmp_path / "a", pki)
    a.add_secret(user, "K", value, "https://api.example")
    file = tmp_path / "backup.jsonl"
    assert "backed up" in a.cli("backup", str(file)).stdout
    b = make_proxy(tmp_path / "b", pki)
    b.data_dir.mkdir(parents=True)
    (b.data_dir / "master.key").write_bytes((a.data_dir / "master.key").read_bytes())
    (b.data_dir / "master.key").chmod(0o600)
    assert "restored" in b.cli("restore", str(file)).stdout
    assert b.cli("secret", "list", "--user", user).stdout.startswith("K\thttps://api.example")
    assert "is not empty" in b.cli("restore", str(file), check=False).stderr
    b.env["SEALGATE_STORE_URL"] = "mysql://db/x"
    assert "SEALGATE_STORE_URL: must be sqlite:///path/to/file.db or postgresql://" in refused(b, user)
    b.env["SEALGATE_STORE_URL"] = "postgresql://u:hunter2@127.0.0.1:1/db"
    said = refused(b, user)
    assert "postgresql://u@127.0.0.1:1/db cannot be opened" in said and "hunter2" not in said
