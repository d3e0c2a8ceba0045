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
