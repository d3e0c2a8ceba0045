"""The red team's findings against the shared store (round 8), each a regression test: someone with
write access to the database but not the key, a database that stops answering, a store URL that
carries a password, a backup aimed at the wrong file."""

from __future__ import annotations

import os
import secrets
import select
import socket
import threading
import time

import pytest

from conftest import curl, make_proxy
from test_shared_store import nodes, sent, until, via
from test_store import Place, place  # noqa: F401 - the fixture

from sealgate import backup, keys, origins, rotation, sessions
from sealgate.store import SecretStore, StoreError


def test_a_schema_set_back_cannot_make_sealgate_seal_a_forged_session(place, user, value):  # noqa: F811
    """With the key in SEALGATE_MASTER_KEY (no key file to carry a mark): forge a session, drop meta, set the
    version back before the sealing migration. The next open must refuse, not seal the forgery."""
    source = keys.EnvKey(secrets.token_hex(32))
    s = SecretStore(place.data_dir, place.url, source)
    s.add_secret(user, "K", value, [origins.parse("https://a.example")])
    real = sessions.issue(s, access="api", runchat="r", instance="i", user=user, author=None, ttl_seconds=600)
    s.close()
    place.sql("update sessions set credential_hash = ?, expires_at = ? where id = ?",
              [sessions._hash("attacker"), time.time() + 86400 * 3650, real.session.id])
    place.sql("drop table meta")
    place.set_schema_version(2)
    with pytest.raises(StoreError, match="the version was set back without the key"):
        SecretStore(place.data_dir, place.url, source)


def test_a_session_seen_revoked_stays_revoked_when_its_row_is_put_back(place, user):  # noqa: F811
    a, b = place.open(), place.open(listen=True)
    issued = sessions.issue(a, access="api", runchat="r", instance="i", user=user, author=None, ttl_seconds=600)
    [row] = place.sql("select * from sessions")
    assert b.session(issued.session.id) is not None  # b has seen it
    a.revoke_session(issued.session.id)
    until(lambda: b.session(issued.session.id) is None)  # and has seen it revoked (a request in between)
    version = b.version()
    place.sql(f"insert into sessions values ({', '.join('?' * len(row))})", list(row))  # put back, seal intact
    sessions.issue(a, access="api", runchat="r", instance="i", user=user, author=None, ttl_seconds=600)
    until(lambda: b.version() != version)  # b reads the store again
    assert b.session(issued.session.id) is None and a.session(issued.session.id) is None


def test_a_write_the_database_drops_is_an_error_not_a_success(place, user, value):  # noqa: F811
    s = place.open()
    s.add_secret(user, "K", value, [origins.parse("https://a.example"), origins.parse("https://old.example")])
    issued = sessions.issue(s, access="api", runchat="r", instance="i", user=user, author=None, ttl_seconds=600)
    if place.url is None:
        place.sql("create trigger keep_sessions before delete on sessions begin select raise(ignore); end")
        place.sql("create trigger keep_secrets before update on secrets begin select raise(ignore); end")
    else:
        place.sql("create rule keep_sessions as on delete to sessions do instead nothing")
        place.sql("create rule keep_secrets as on update to secrets do instead nothing")
    with pytest.raises(StoreError, match="a trigger or rule drops sealgate's writes"):
        s.revoke_session(issued.session.id)
    with pytest.raises(StoreError, match="a trigger or rule drops sealgate's writes"):
        s.set_origins(user, "K", [origins.parse("https://a.example")])


def test_a_data_key_made_current_by_editing_its_time_is_refused(place, user, value):  # noqa: F811
    s = place.open()
    s.add_secret(user, "K", value, [origins.parse("https://a.example")])
    older = rotation.rotate(s)
    rotation.rotate(s)
    place.sql("update data_keys set created_at = created_at + 1000 where key_id = ?", [older])  # older made newest
    with pytest.raises(StoreError, match=f"data key {older} does not open with the master key: it was edited"):
        place.open().add_secret(user, "J", value, [origins.parse("https://a.example")])


def test_a_tampered_key_check_or_data_key_is_one_line(tmp_path, pki, user, value):
    p = make_proxy(tmp_path, pki)
    p.add_secret(user, "K", value, "https://a.example")
    p.cli("key", "rotate")
    Place(p.data_dir, None).sql("update data_keys set wrapped = x'00'")
    r = p.cli("key", "rotate", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "was edited" in r.stderr
    Place(p.data_dir, None).sql("update meta set nonce = null")
    r = p.cli("secret", "list", "--user", user, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "does not open the store" in r.stderr


@pytest.mark.parametrize("shape", [
    "postgresql://u:{pw}%zz@127.0.0.1:1/db",  # a bad percent-escape: libpq quotes the token
    "postgresql://u:{pw}@[::1/db",  # an unclosed bracket: libpq quotes the URL
    "postgresql://u:{pw}@127.0.0.1:1/db",
    "postgresql://u@127.0.0.1:1/db?password={pw}&sslmode=nope",
])
def test_a_store_url_password_is_never_shown(tmp_path, pki, user, shape):
    pw = "PW" + secrets.token_hex(8)
    p = make_proxy(tmp_path, pki, SEALGATE_STORE_URL=shape.format(pw=pw))
    r = p.cli("secret", "list", "--user", user, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr.replace(pw, "<pw>")
    assert pw not in r.stderr + r.stdout


def test_a_backup_never_replaces_what_is_not_a_file_and_is_never_readable_by_others(tmp_path, user, value):
    s = SecretStore(tmp_path / "d")
    s.add_secret(user, "K", value, [origins.parse("https://a.example")])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(StoreError, match="is not a regular file"):
        backup.backup(s, fifo)
    assert fifo.is_fifo()
    target = tmp_path / "b.jsonl"
    planted = tmp_path / "b.jsonl.partial"
    planted.write_text("")
    planted.chmod(0o644)
    backup.backup(s, target)
    assert oct(target.stat().st_mode & 0o777) == "0o600" and planted.read_text() == ""


class Relay:
    """A TCP relay to PostgreSQL that can go silent (stops relaying, keeps its sockets open): a partition
    that no socket error reveals."""

    def __init__(self, port: int) -> None:
        self.target, self.silent = ("127.0.0.1", port), False
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url: str) -> str:
        return url.replace(f":{self.target[1]}/", f":{self.port}/")

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        while True:
            ready, _, _ = select.select([a, b], [], [], 0.1)
            if self.silent:
                continue
            for s in ready:
                data = s.recv(65536) if s.fileno() >= 0 else b""
                if not data:
                    a.close(), b.close()
                    return
                (b if s is a else a).sendall(data)


@pytest.mark.e2e  # a fault held for seconds
def test_a_database_that_stops_answering_hangs_nothing(pg, tmp_path, pki, make_upstream, user, value):
    """Node a reaches PostgreSQL through a relay that goes silent; node b reaches it directly. No request on a
    waits more than the statement timeout; a session revoked on b meanwhile is refused on a once it is back,
    and nothing that waited goes out afterwards."""
    api = make_upstream("127.0.0.1")
    url = pg.database()
    relay = Relay(int(url.split(":")[2].split("/")[0]))
    a, b = nodes(tmp_path, pki, url)
    a.env["SEALGATE_STORE_URL"] = relay.url(url)
    b.add_secret(user, "K", value, api.origin)
    s = via(b.issue(user=user), b, a)
    a.start()
    try:
        assert sent(api, s, "K")[1] == value
        relay.silent = True
        time.sleep(2.5)  # the heartbeat goes stale
        received = len(api.received)
        for path in ("/partitioned", "/again"):
            started = time.monotonic()
            r, got = sent(api, s, "K", path)
            assert r.status == 503 and r.headers["x-sealgate-error"] == "store_unavailable"
            assert time.monotonic() - started < 4
        b.cli("session", "revoke", s["session_id"])
        relay.silent = False
        until(lambda: curl(s, api.url("/after")).status == 407, limit=10)
        assert [rec.path for rec in api.received[received:]] == []  # nothing that waited went out later
    finally:
        relay.silent = False
        a.stop()
    assert value.encode() not in a.visible_to_operators()
