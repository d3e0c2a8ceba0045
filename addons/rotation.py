"""`sealgate key rotate / retire / list`: data keys replaced while proxies keep serving.

A rotation adds a data key (it is the newest, so new writes use it at once), then re-encrypts
the values under older keys in batches, each batch one short transaction: between batches the
proxies read and write as usual, and a value they find under the new key makes them load it.
A rotation stopped part way (a kill) leaves every row readable under one key or the other;
running it again finishes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import crypto, keys, seals
from .errors import NotFound, StoreError
from .sql import Tx
from .store import SecretStore

BATCH = 100  # secrets (then linked accounts) re-encrypted per transaction


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    kind: str  # master | data
    created_at: float | None
    current: bool  # the key new writes use
    secrets: int  # values (and linked accounts' tokens) sealed under it


def rotate(store: SecretStore, *, batch: int = BATCH, progress: Callable[[int], None] | None = None) -> str:
    """Add a data key, make it current, move every value under it; its id."""
    with store.write() as tx:
        row = keys.new_data_key(store.key)
        tx.one("insert into data_keys (key_id, nonce, wrapped, created_at) values (?, ?, ?, ?)",
               [row["key_id"], row["nonce"], row["wrapped"], row["created_at"]])
    return finish(store, row["key_id"], batch=batch, progress=progress)


def finish(store: SecretStore, key_id: str, *, batch: int = BATCH, progress: Callable[[int], None] | None = None) -> str:
    """Move every value not under key_id (the current key) under it, batch by batch."""
    moved = 0
    while True:
        with store.write() as tx:
            current, _ = store.current_key(tx)
            if current != key_id:
                raise StoreError(f"a newer key {current} was added meanwhile; run `sealgate key rotate` again")
            rows = tx.rows("select * from secrets where key_id <> ? order by owner, name limit ?", [key_id, batch])
            ring = store.keyring(tx)
            for r in rows:
                _reseal(store, tx, r, ring)
            count = len(rows) + (store.links.rekey(tx, key_id, batch - len(rows)) if len(rows) < batch else 0)
        moved += count
        if progress:
            progress(moved)
        if count < batch:
            return key_id


def _reseal(store: SecretStore, tx: Tx, row: dict, ring: dict[str, bytes]) -> None:
    """One secret's value opened and sealed again under the current data key."""
    seals.verified_secret(store.key, row)
    try:
        value = crypto.open_envelope(ring, row["owner"], row["name"],
                                     crypto.Envelope(row["key_id"], row["nonce"], row["ciphertext"]))
    except crypto.EnvelopeError as e:
        raise StoreError(str(e)) from None
    store.put(tx, {c: row[c] for c in ("owner", "name", "origins", "created_at", "updated_at", "policy")}, value)


def retire(store: SecretStore, key_id: str) -> None:
    """Remove an old data key once no value is sealed under it; refuse otherwise."""
    with store.write() as tx:
        if key_id == crypto.key_id(store.key):
            raise StoreError(f"key {key_id} is the master key itself: it wraps the data keys and cannot be retired "
                             "(values under it move to a data key with `sealgate key rotate`)")
        if tx.one("select key_id from data_keys where key_id = ?", [key_id]) is None:
            raise NotFound(f"there is no data key {key_id} (see `sealgate key list`)")
        current, _ = store.current_key(tx)
        if key_id == current:
            raise StoreError(f"key {key_id} is the current key, which new writes use; rotate to a new one first")
        (using,) = tx.one("select (select count(*) from secrets where key_id = ?) + (select count(*) from links "
                          "where key_id = ?) + (select count(*) from link_states where key_id = ?)", [key_id] * 3)
        if using:
            raise StoreError(f"key {key_id} still seals {using} secret(s) or linked account(s); run `sealgate key rotate` to move them "
                             "first (or finish the one that was stopped)")
        if tx.count("delete from data_keys where key_id = ?", [key_id]) != 1:
            raise StoreError(f"data key {key_id} was not removed: a trigger or rule drops sealgate's writes")


def list_keys(store: SecretStore) -> list[KeyInfo]:
    with store.read() as tx:
        data = tx.rows("select key_id, created_at from data_keys order by created_at desc, key_id")
        counts = {r["key_id"]: r["n"] for r in tx.rows(
            "select key_id, count(*) as n from (select key_id from secrets union all select key_id from links) as sealed "
            "group by key_id")}
    master = crypto.key_id(store.key)
    current = data[0]["key_id"] if data else master
    found = [KeyInfo(master, "master", None, current == master, counts.get(master, 0))]
    found += [KeyInfo(r["key_id"], "data", r["created_at"], r["key_id"] == current, counts.get(r["key_id"], 0))
              for r in data]
    return found
