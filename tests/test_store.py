"""The store's schema: versioned migrations that upgrade an old data/ in place."""

from __future__ import annotations

import json
import sqlite3

import pytest

from sealgate import crypto, store
from sealgate.store import SecretStore, StoreError


def make_unversioned_store(data_dir, owner: str, value: str) -> None:
    """A data/ as the first release wrote it: no schema version, audit without a client column."""
    data_dir.mkdir()
    key = bytes(range(32))
    (data_dir / store.KEY_NAME).write_text(key.hex() + "\n")
    (data_dir / store.KEY_NAME).chmod(0o600)
    con = sqlite3.connect(data_dir / store.DB_NAME)
    con.executescript("""
        CREATE TABLE [secrets] ([owner] TEXT, [name] TEXT, [key_id] TEXT, [nonce] BLOB, [ciphertext] BLOB,
            [origins] TEXT, [created_at] FLOAT, [updated_at] FLOAT, PRIMARY KEY ([owner], [name]));
        CREATE TABLE [audit] ([id] INTEGER PRIMARY KEY, [at] FLOAT, [session] TEXT, [runchat] TEXT,
            [instance] TEXT, [principal] TEXT, [secrets] TEXT, [method] TEXT, [origin] TEXT, [path] TEXT,
            [decision] TEXT, [code] TEXT, [status] INTEGER);
        CREATE INDEX [idx_audit_principal_at] ON [audit] ([principal], [at]);
        CREATE INDEX [idx_audit_runchat_at] ON [audit] ([runchat], [at]);
        CREATE TABLE [sessions] ([id] TEXT PRIMARY KEY, [credential_hash] TEXT, [mac_key] BLOB, [access] TEXT,
            [runchat] TEXT, [instance] TEXT, [principal] TEXT, [created_at] FLOAT, [expires_at] FLOAT);
    """)
    env = crypto.seal(key, owner, "K", value)
    con.execute("insert into secrets values (?, ?, ?, ?, ?, ?, ?, ?)",
                (owner, "K", env.key_id, env.nonce, env.ciphertext, json.dumps(["https://api.example"]), 1.0, 1.0))
    con.execute("insert into audit (at, session, runchat, instance, principal, secrets, method, origin, path, "
                "decision, code, status) values (1.0, 's', 'r', 'i', ?, 'K', 'GET', 'https://api.example', '/', "
                "'allow', null, 200)", (owner,))
    con.commit()
    con.close()


def test_an_old_store_opens_and_upgrades(tmp_path, user, value):
    data = tmp_path / "data"
    make_unversioned_store(data, user, value)
    s = SecretStore(data)
    assert s.schema_version() == len(store.MIGRATIONS)
    assert s.secrets_for(user)["K"].value == value  # the sealed value survives the upgrade
    [old] = s.audit(user=user)
    assert old.client is None and old.decision == "allow"
    assert "client" in s.db["audit"].columns_dict
    assert SecretStore(data).schema_version() == len(store.MIGRATIONS)  # opening again changes nothing


def test_a_new_store_starts_at_the_latest_version(tmp_path):
    assert SecretStore(tmp_path / "d").schema_version() == len(store.MIGRATIONS)


def test_a_store_from_a_newer_sealgate_is_refused(tmp_path):
    SecretStore(tmp_path)
    con = sqlite3.connect(tmp_path / store.DB_NAME)
    con.execute(f"PRAGMA user_version = {len(store.MIGRATIONS) + 1}")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="newer than this sealgate knows"):
        SecretStore(tmp_path)


# --- a store that cannot be edited around the key, a key never silently replaced -------------------

def _sql(data_dir, statement: str, params=()) -> None:
    con = sqlite3.connect(data_dir / store.DB_NAME)
    con.execute(statement, params)
    con.commit()
    con.close()


@pytest.fixture
def filled(tmp_path, user, value):
    from sealgate import origins
    s = SecretStore(tmp_path)
    s.add_secret(user, "K", value, [origins.parse("https://api.example")])
    return s


def test_widening_origins_without_the_key_is_refused(filled, tmp_path, user):
    _sql(tmp_path, "update secrets set origins = ?", [json.dumps(["https://evil.example"])])
    fresh = SecretStore(tmp_path)
    for read in (lambda: fresh.secrets_for(user), lambda: fresh.list_secrets(user)):
        with pytest.raises(StoreError, match=f"secret K of user {user} was changed without the master key"):
            read()


def test_moving_a_secret_to_another_owner_without_the_key_is_refused(filled, tmp_path, user):
    _sql(tmp_path, "update secrets set owner = 'mallory'")
    with pytest.raises(StoreError, match="changed without the master key|not the ones last written"):
        SecretStore(tmp_path).secrets_for("mallory")


def test_set_origins_reseals(filled, tmp_path, user, value):
    from sealgate import origins
    filled.set_origins(user, "K", [origins.parse("https://b.example")])
    got = SecretStore(tmp_path).secrets_for(user)["K"]
    assert got.value == value and [str(o) for o in got.origins] == ["https://b.example"]


@pytest.mark.parametrize("column, new", [("principal", "mallory"), ("expires_at", 9e12), ("mac_key", b"k" * 32)])
def test_editing_a_session_without_the_key_is_refused(filled, tmp_path, user, column, new):
    from sealgate import sessions
    issued = sessions.issue(filled, access="signed-in", runchat="r", instance="i", user=user, author=None,
                            ttl_seconds=600)
    _sql(tmp_path, f"update sessions set {column} = ?", [new])
    with pytest.raises(StoreError, match=f"session {issued.session.id} was changed without the master key"):
        SecretStore(tmp_path).session(issued.session.id)


def test_a_missing_key_is_never_replaced_when_the_store_holds_secrets(filled, tmp_path):
    (tmp_path / store.KEY_NAME).unlink()
    with pytest.raises(StoreError, match="is missing, and the store .* holds sealed rows: restore the key"):
        SecretStore(tmp_path).key  # noqa: B018
    assert not (tmp_path / store.KEY_NAME).exists()


def test_a_wrong_key_is_refused(filled, tmp_path):
    (tmp_path / store.KEY_NAME).write_text(bytes(32).hex() + "\n")
    with pytest.raises(StoreError, match="does not open the store"):
        SecretStore(tmp_path).key  # noqa: B018


def test_a_store_file_replaced_under_a_running_store_fails_closed(filled, tmp_path, user):
    other = tmp_path / "other"
    SecretStore(other)
    filled.check()
    (other / store.DB_NAME).replace(tmp_path / store.DB_NAME)
    filled._file_checked_at = float("-inf")  # (a second later: it is looked at once a second)
    for call in (filled.data_version, filled.check):
        with pytest.raises(StoreError, match="was replaced or removed while sealgate ran"):
            call()


def test_readiness_says_when_the_key_does_not_open_the_store(filled, tmp_path):
    """/readyz checks that the key opens the store, not only that a key loads."""
    from sealgate.runner import _readiness

    class Addon:
        store = SecretStore(tmp_path)
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "mitmproxy-ca-cert.pem").write_text("x")
    assert _readiness(Addon, certs)() is None
    (tmp_path / store.KEY_NAME).write_text(bytes(32).hex() + "\n")
    Addon.store = SecretStore(tmp_path)
    assert "does not open the store" in _readiness(Addon, certs)()


@pytest.mark.parametrize("drop_meta", [False, True])
def test_a_schema_version_set_back_is_refused(filled, tmp_path, drop_meta):
    """Setting the version back would make the sealing migration seal rows edited without the key."""
    _sql(tmp_path, "update secrets set origins = ?", [json.dumps(["https://evil.example"])])
    if drop_meta:
        _sql(tmp_path, "drop table meta")
    _sql(tmp_path, "PRAGMA user_version = 2")
    with pytest.raises(StoreError, match="the version was set back without the key"):
        SecretStore(tmp_path)


def test_an_older_value_cannot_be_put_back_under_a_newer_seal(filled, tmp_path, user, value):
    from sealgate import origins
    old = sqlite3.connect(tmp_path / store.DB_NAME).execute("select nonce, ciphertext from secrets").fetchone()
    filled.add_secret(user, "K", value + "-rotated", [origins.parse("https://api.example")], replace=True)
    _sql(tmp_path, "update secrets set nonce = ?, ciphertext = ?", list(old))
    with pytest.raises(StoreError, match="changed without the master key"):
        SecretStore(tmp_path).secrets_for(user)


@pytest.mark.parametrize("how", ["remove", "replace"])
def test_readiness_notices_the_key_file_removed_or_replaced_under_a_running_store(filled, tmp_path, how):
    filled.check()
    key = tmp_path / store.KEY_NAME
    key.unlink() if how == "remove" else key.write_text(bytes(32).hex() + "\n")
    with pytest.raises(StoreError, match="was removed or replaced while sealgate ran"):
        filled.check()


def test_a_column_of_another_type_is_a_clear_refusal(filled, tmp_path, user):
    _sql(tmp_path, "update secrets set origins = cast(origins as blob)")
    with pytest.raises(StoreError, match="changed without the master key"):
        SecretStore(tmp_path).list_secrets(user)


def _row_of(tmp_path, name: str) -> dict:
    con = sqlite3.connect(tmp_path / store.DB_NAME)
    con.row_factory = sqlite3.Row
    row = dict(con.execute("select * from secrets where name = ?", [name]).fetchone())
    con.close()
    return row


def _put_back(tmp_path, row: dict) -> None:
    cols = list(row)
    _sql(tmp_path, f"insert or replace into secrets ({', '.join(cols)}) values ({', '.join('?' * len(cols))})",
         [row[c] for c in cols])


def test_an_old_sealed_row_put_back_is_refused(filled, tmp_path, user):
    """A row copied while its origins were wide, written back after they were narrowed."""
    from sealgate import origins
    filled.set_origins(user, "K", [origins.parse("https://api.example"), origins.parse("https://old.example")])
    wide = _row_of(tmp_path, "K")
    filled.set_origins(user, "K", [origins.parse("https://api.example")])
    _put_back(tmp_path, wide)
    with pytest.raises(StoreError, match="not the ones last written with the master key"):
        SecretStore(tmp_path).secrets_for(user)


def test_a_removed_secret_put_back_is_refused(filled, tmp_path, user, value):
    from sealgate import origins
    filled.add_secret(user, "GONE", value + "-gone", [origins.parse("https://api.example")])
    gone = _row_of(tmp_path, "GONE")
    filled.remove_secret(user, "GONE")
    _put_back(tmp_path, gone)
    with pytest.raises(StoreError, match="not the ones last written with the master key"):
        SecretStore(tmp_path).list_secrets(user)


def test_a_store_reads_its_own_writes(filled, user, value):
    """What secrets_for keeps opened is dropped on every write of the same store, whose own commits leave
    data_version as it is."""
    from sealgate import origins
    assert [str(o) for o in filled.secrets_for(user)["K"].origins] == ["https://api.example"]
    filled.set_origins(user, "K", [origins.parse("https://b.example")])
    assert [str(o) for o in filled.secrets_for(user)["K"].origins] == ["https://b.example"]
    filled.add_secret(user, "K", value + "-2", [origins.parse("https://b.example")], replace=True)
    assert filled.secrets_for(user)["K"].value == value + "-2"
    filled.remove_secret(user, "K")
    assert filled.secrets_for(user) == {}
