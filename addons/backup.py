"""`sealgate backup FILE` / `sealgate restore FILE`: the store's rows, values still sealed.

A backup is JSON lines: a header (format, schema version, the master key's id), then one line per
row. Nothing in it is opened: without the master key it gives no value, and a restore is refused
unless the target store's key is the one the backup was made under, and every row still verifies
under it. A restore goes into an empty store of either backend, in one transaction.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from pathlib import Path

from . import crypto, keys, seals, tokens
from .errors import StoreError
from .sql import Tx
from .store import SecretStore

FORMAT = "sealgate-backup-1"
TABLES = ("meta", "data_keys", "owners", "secrets", "links", "sessions", "api_tokens", "audit")  # in the order a restore writes them
SKIPPED = {"audit": {"id"}}  # columns a restore lets the target number anew


def _encode(v: object) -> object:
    return {"b64": base64.b64encode(v).decode()} if isinstance(v, (bytes, memoryview)) else v


def _decode(v: object) -> object:
    return base64.b64decode(v["b64"]) if isinstance(v, dict) else v


def backup(store: SecretStore, path: Path) -> dict[str, int]:
    """Write every row to path (0600, written whole then moved in place); rows per table."""
    counts: dict[str, int] = {}
    if path.exists() and not path.is_file():
        raise StoreError(f"backup {path} exists and is not a regular file; name a new file")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")  # made here, 0600, nobody else's
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f, store.read() as tx:
            version = store.backend.schema_version(tx)
            f.write(json.dumps({"format": FORMAT, "schema": version, "master_key_id": crypto.key_id(store.key)}) + "\n")
            for table in TABLES:
                rows = tx.rows(f"select * from {table}")
                counts[table] = len(rows)
                for r in rows:
                    f.write(json.dumps({"table": table, "row": {k: _encode(v) for k, v in r.items()}}) + "\n")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"backup {path} cannot be written: {e.__class__.__name__}: {e.strerror}") from None
    return counts


def restore(store: SecretStore, path: Path) -> dict[str, int]:
    """Put a backup's rows into an empty store whose master key made it; rows per table."""
    lines = _read(path)
    header = lines[0]
    if header.get("format") != FORMAT:
        raise StoreError(f"{path} is not a sealgate backup (line 1 has no format {FORMAT!r})")
    if header.get("master_key_id") != crypto.key_id(store.key):
        raise StoreError(f"{path} was made under master key {header.get('master_key_id')}, and this store's key is "
                         f"{crypto.key_id(store.key)}: give the store the key that made the backup")
    counts = dict.fromkeys(TABLES, 0)
    with store.write() as tx:
        if header.get("schema") != store.backend.schema_version(tx):
            raise StoreError(f"{path} has schema version {header.get('schema')}, and the store "
                             f"{store.backend.schema_version(tx)}: restore it with the sealgate that made it")
        (used,) = tx.one("select (select count(*) from secrets) + (select count(*) from sessions) + "
                         "(select count(*) from data_keys)")
        if used:
            raise StoreError(f"store {store.where} is not empty: a backup is restored into an empty store only")
        tx.one("delete from meta")
        tx.one("delete from owners")
        for number, line in enumerate(lines[1:], start=2):
            table, row = line.get("table"), line.get("row")
            if table not in TABLES or not isinstance(row, dict):
                raise StoreError(f"{path} line {number}: not a row of a sealgate table")
            row = {k: _decode(v) for k, v in row.items() if k not in SKIPPED.get(table, ())}
            columns = store.backend.columns(tx, table)
            if unknown := set(row) - columns:
                raise StoreError(f"{path} line {number}: table {table} has no column {sorted(unknown)[0]}")
            tx.one(f"insert into {table} ({', '.join(row)}) values ({', '.join('?' * len(row))})", list(row.values()))
            counts[table] += 1
        _verify(store, tx)  # raises (and rolls everything back) unless every row holds under the key
    return counts


def _read(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except (OSError, UnicodeError) as e:
        raise StoreError(f"backup {path} cannot be read: {e.__class__.__name__}") from None
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            parsed = json.loads(line)
        except ValueError:
            raise StoreError(f"{path} line {number}: not JSON") from None
        if not isinstance(parsed, dict):
            raise StoreError(f"{path} line {number}: not a JSON object")
        lines.append(parsed)
    if not lines:
        raise StoreError(f"{path} is empty")
    return lines


def _verify(store: SecretStore, tx: Tx) -> None:
    canary = tx.one("select key_id, nonce, ciphertext from meta where name = 'canary'")
    if canary is None:
        raise StoreError("the backup has no key check: it was edited")
    keys.open_canary(store.key, canary, store.source.where, store.where)
    ring = store.keyring(tx)
    for r in tx.rows("select * from secrets"):
        seals.verified_secret(store.key, r)
        if r["key_id"] not in ring:
            raise StoreError(f"secret {r['name']} of user {r['owner']} is under key {r['key_id']}, "
                             "which the backup does not hold")
    for r in tx.rows("select distinct owner from secrets"):
        seals.verify_owner(tx, store.key, r["owner"])
    for r in tx.rows("select * from sessions"):
        seals.verified_session(store.key, r)
    for r in tx.rows("select * from api_tokens"):
        tokens.verified(store.key, r)
