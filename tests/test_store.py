"""The store on both backends: versioned migrations, rows that cannot be edited around the key,
a key never silently replaced. Every test here runs on SQLite and on a throwaway PostgreSQL."""

from __future__ import annotations

import json
import types
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sealgate import crypto, origins, store
from sealgate.store import SecretStore, StoreError


@dataclass
class Place:
    """Where a store lives: its data dir (the key file) and URL (None: the data dir's SQLite file)."""

    data_dir: Path
    url: str | None
    opened: list[SecretStore] = field(default_factory=list)

    def open(self, **kw) -> SecretStore:
        """A store here (closed when the test ends: a PostgreSQL one holds a pool and threads)."""
        store = SecretStore(self.data_dir, self.url, **kw)
        self.opened.append(store)
        return store

    def sql(self, statement: str, params=()) -> list[tuple]:
        """A statement run straight on the database, as someone without the key would."""
        if self.url is None:
            con = sqlite3.connect(self.data_dir / store.DB_NAME)
            try:
                rows = con.execute(statement, params).fetchall()
                con.commit()
                return rows
            finally:
                con.close()
        import psycopg
        with psycopg.connect(self.url, autocommit=True) as con:
            cur = con.execute(statement.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []

    def set_schema_version(self, number: int) -> None:
        if self.url is None:
            self.sql(f"PRAGMA user_version = {number}")
        else:
            self.sql("update sealgate_schema set version = ?", [number])


@pytest.fixture(params=["sqlite", "postgresql"])
def place(request, tmp_path):
    where = Place(tmp_path, None if request.param == "sqlite" else request.getfixturevalue("pg").database())
    yield where
    for store in where.opened:
        store.close()


def make_unversioned_store(place: Place, owner: str, value: str) -> None:
    """A store as the first release wrote it: no schema version, audit without a client column."""
    place.data_dir.mkdir(exist_ok=True)
    key = bytes(range(32))
    (place.data_dir / store.KEY_NAME).write_text(key.hex() + "\n")
    (place.data_dir / store.KEY_NAME).chmod(0o600)
    blob, real, serial = (("BLOB", "FLOAT", "INTEGER PRIMARY KEY") if place.url is None else
                          ("BYTEA", "DOUBLE PRECISION", "BIGSERIAL PRIMARY KEY"))
    for statement in (
        f"""CREATE TABLE secrets (owner TEXT, name TEXT, key_id TEXT, nonce {blob}, ciphertext {blob},
            origins TEXT, created_at {real}, updated_at {real}, PRIMARY KEY (owner, name))""",
        f"""CREATE TABLE audit (id {serial}, at {real}, session TEXT, runchat TEXT,
            instance TEXT, principal TEXT, secrets TEXT, method TEXT, origin TEXT, path TEXT,
            decision TEXT, code TEXT, status INTEGER)""",
        "CREATE INDEX idx_audit_principal_at ON audit (principal, at)",
        "CREATE INDEX idx_audit_runchat_at ON audit (runchat, at)",
        f"""CREATE TABLE sessions (id TEXT PRIMARY KEY, credential_hash TEXT, mac_key {blob}, access TEXT,
            runchat TEXT, instance TEXT, principal TEXT, created_at {real}, expires_at {real})""",
    ):
        place.sql(statement)
    env = crypto.seal(key, owner, "K", value)
    place.sql("insert into secrets values (?, ?, ?, ?, ?, ?, ?, ?)",
              (owner, "K", env.key_id, env.nonce, env.ciphertext, json.dumps(["https://api.example"]), 1.0, 1.0))
    place.sql("insert into audit (at, session, runchat, instance, principal, secrets, method, origin, path, "
              "decision, code, status) values (1.0, 's', 'r', 'i', ?, 'K', 'GET', 'https://api.example', '/', "
              "'allow', null, 200)", (owner,))


def test_an_old_store_opens_and_upgrades(place, user, value):
    make_unversioned_store(place, user, value)
    s = place.open()
    assert s.schema_version() == len(store.MIGRATIONS)
    assert s.secrets_for(user)["K"].value == value  # the sealed value survives the upgrade
    [old] = s.audit(user=user)
    assert old.client is None and old.decision == "allow"
    assert place.open().schema_version() == len(store.MIGRATIONS)  # opening again changes nothing
    s.add_secret(user, "NEW", value + "-new", [origins.parse("https://api.example")])  # new writes: a data key
    assert {k: v.value for k, v in place.open().secrets_for(user).items()} == {"K": value, "NEW": value + "-new"}


def test_a_new_store_starts_at_the_latest_version(place):
    assert place.open().schema_version() == len(store.MIGRATIONS)


def test_a_store_from_a_newer_sealgate_is_refused(place):
    place.open()
    place.set_schema_version(len(store.MIGRATIONS) + 1)
    with pytest.raises(StoreError, match="newer than this sealgate knows"):
        place.open()


# --- a store that cannot be edited around the key, a key never silently replaced -------------------

@pytest.fixture
def filled(place, user, value):
    s = place.open()
    s.add_secret(user, "K", value, [origins.parse("https://api.example")])
    return s


def test_widening_origins_without_the_key_is_refused(filled, place, user):
    place.sql("update secrets set origins = ?", [json.dumps(["https://evil.example"])])
    fresh = place.open()
    for read in (lambda: fresh.secrets_for(user), lambda: fresh.list_secrets(user)):
        with pytest.raises(StoreError, match=f"secret K of user {user} was changed without the master key"):
            read()


def test_moving_a_secret_to_another_owner_without_the_key_is_refused(filled, place, user):
    place.sql("update secrets set owner = 'mallory'")
    with pytest.raises(StoreError, match="changed without the master key|not the ones last written"):
        place.open().secrets_for("mallory")


def test_set_origins_reseals(filled, place, user, value):
    filled.set_origins(user, "K", [origins.parse("https://b.example")])
    got = place.open().secrets_for(user)["K"]
    assert got.value == value and [str(o) for o in got.origins] == ["https://b.example"]


@pytest.mark.parametrize("column, new", [("principal", "mallory"), ("expires_at", 9e12), ("mac_key", b"k" * 32)])
def test_editing_a_session_without_the_key_is_refused(filled, place, user, column, new):
    from sealgate import sessions
    issued = sessions.issue(filled, access="signed-in", runchat="r", instance="i", user=user, author=None,
                            ttl_seconds=600)
    place.sql(f"update sessions set {column} = ?", [new])
    with pytest.raises(StoreError, match=f"session {issued.session.id} was changed without the master key"):
        place.open().session(issued.session.id)


def test_a_missing_key_is_never_replaced_when_the_store_holds_secrets(filled, place):
    (place.data_dir / store.KEY_NAME).unlink()
    with pytest.raises(StoreError, match="is missing, and the store .* holds sealed rows: restore the key"):
        place.open().key  # noqa: B018
    assert not (place.data_dir / store.KEY_NAME).exists()


def test_a_wrong_key_is_refused(filled, place):
    (place.data_dir / store.KEY_NAME).write_text(bytes(32).hex() + "\n")
    with pytest.raises(StoreError, match="does not open the store"):
        place.open().key  # noqa: B018


def test_a_store_file_replaced_under_a_running_store_fails_closed(tmp_path, user, value):
    filled = SecretStore(tmp_path)
    other = tmp_path / "other"
    SecretStore(other)
    filled.check()
    (other / store.DB_NAME).replace(tmp_path / store.DB_NAME)
    filled.backend._file_checked_at = float("-inf")  # (a second later: it is looked at once a second)
    for call in (filled.version, filled.check):
        with pytest.raises(StoreError, match="was replaced or removed while sealgate ran"):
            call()


def test_readiness_says_when_the_key_does_not_open_the_store(filled, place):
    """/readyz checks that the key opens the store, not only that a key loads."""
    from sealgate.runner import _readiness

    class Addon:
        store = place.open()
        connections = types.SimpleNamespace(draining=False)
    certs = place.data_dir / "certs"
    certs.mkdir()
    (certs / "mitmproxy-ca-cert.pem").write_text("x")
    assert _readiness(Addon, certs)() is None
    Addon.connections.draining = True  # SIGTERM: the proxy stops taking work
    assert _readiness(Addon, certs)() == "the proxy is stopping"
    Addon.connections.draining = False
    (place.data_dir / store.KEY_NAME).write_text(bytes(32).hex() + "\n")
    Addon.store = place.open()
    assert "does not open the store" in _readiness(Addon, certs)()


@pytest.mark.parametrize("drop_meta", [False, True])
def test_a_schema_version_set_back_is_refused(filled, place, drop_meta):
    """Setting the version back would make the sealing migration seal rows edited without the key."""
    place.sql("update secrets set origins = ?", [json.dumps(["https://evil.example"])])
    if drop_meta:
        place.sql("drop table meta")
    place.set_schema_version(2)
    with pytest.raises(StoreError, match="the version was set back without the key"):
        place.open()


def test_an_older_value_cannot_be_put_back_under_a_newer_seal(filled, place, user, value):
    [old] = place.sql("select nonce, ciphertext from secrets")
    filled.add_secret(user, "K", value + "-rotated", [origins.parse("https://api.example")], replace=True)
    place.sql("update secrets set nonce = ?, ciphertext = ?", list(old))
    with pytest.raises(StoreError, match="changed without the master key"):
        place.open().secrets_for(user)


@pytest.mark.parametrize("how", ["remove", "replace"])
def test_readiness_notices_the_key_file_removed_or_replaced_under_a_running_store(filled, place, how):
    filled.check()
    key = place.data_dir / store.KEY_NAME
    key.unlink() if how == "remove" else key.write_text(bytes(32).hex() + "\n")
    with pytest.raises(StoreError, match="was removed or replaced while sealgate ran"):
        filled.check()


def test_a_column_of_another_type_is_a_clear_refusal(tmp_path, user, value):
    """(SQLite only: its columns take any type; PostgreSQL's do not.)"""
    SecretStore(tmp_path).add_secret(user, "K", value, [origins.parse("https://api.example")])
    Place(tmp_path, None).sql("update secrets set origins = cast(origins as blob)")
    with pytest.raises(StoreError, match="changed without the master key"):
        SecretStore(tmp_path).list_secrets(user)


def _row_of(place: Place, name: str) -> list:
    [row] = place.sql("select owner, name, key_id, nonce, ciphertext, origins, created_at, updated_at, seal "
                      "from secrets where name = ?", [name])
    return list(row)


def _put_back(place: Place, row: list) -> None:
    place.sql("delete from secrets where owner = ? and name = ?", row[:2])
    place.sql("insert into secrets (owner, name, key_id, nonce, ciphertext, origins, created_at, updated_at, seal) "
              "values (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)


def test_an_old_sealed_row_put_back_is_refused(filled, place, user):
    """A row copied while its origins were wide, written back after they were narrowed."""
    filled.set_origins(user, "K", [origins.parse("https://api.example"), origins.parse("https://old.example")])
    wide = _row_of(place, "K")
    filled.set_origins(user, "K", [origins.parse("https://api.example")])
    _put_back(place, wide)
    with pytest.raises(StoreError, match="not the ones last written with the master key"):
        place.open().secrets_for(user)


def test_a_removed_secret_put_back_is_refused(filled, place, user, value):
    filled.add_secret(user, "GONE", value + "-gone", [origins.parse("https://api.example")])
    gone = _row_of(place, "GONE")
    filled.remove_secret(user, "GONE")
    _put_back(place, gone)
    with pytest.raises(StoreError, match="not the ones last written with the master key"):
        place.open().list_secrets(user)


def test_a_store_reads_its_own_writes(filled, user, value):
    """What secrets_for keeps opened is dropped on every write of the same store (whose own commits
    leave SQLite's data_version as it is, and whose NOTIFY comes back a moment later)."""
    assert [str(o) for o in filled.secrets_for(user)["K"].origins] == ["https://api.example"]
    filled.set_origins(user, "K", [origins.parse("https://b.example")])
    assert [str(o) for o in filled.secrets_for(user)["K"].origins] == ["https://b.example"]
    filled.add_secret(user, "K", value + "-2", [origins.parse("https://b.example")], replace=True)
    assert filled.secrets_for(user)["K"].value == value + "-2"
    filled.remove_secret(user, "K")
    assert filled.secrets_for(user) == {}
