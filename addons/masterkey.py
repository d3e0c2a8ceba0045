"""The master key file and the store's key check: a key is made only for a store that holds
nothing sealed, and never silently replaced.

The file holds the key in hex and, on a second line, a mark that its store seals rows: a store
that then claims an older schema was set back by someone without the key, who cannot rewrite
this file and keep the key. The key check (the canary) is a value sealed under the key in the
store's `meta` table: a key that does not open it is another store's key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import sqlite_utils

from . import crypto
from .errors import StoreError

CANARY = ("sealgate", "canary")  # the owner and name the key check is sealed under


def read(path: Path) -> bytes | None:
    """The master key in path, or None if there is no such file; refuses a key others can read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"master key {path} cannot be read: {e.__class__.__name__}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StoreError(f"master key {path} is readable by others (mode {oct(mode & 0o777)}); run chmod 600 on it")
    try:
        key = bytes.fromhex(path.read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError) as e:
        raise StoreError(f"master key {path} cannot be read: {e.__class__.__name__}") from None
    if len(key) != crypto.KEY_BYTES:
        raise StoreError(f"master key {path} is not a {crypto.KEY_BYTES}-byte key")
    return key


SEALED_MARK = "sealed-rows"  # second line of a key file whose store seals its rows (schema 3 and later)


def marks_sealed(path: Path) -> bool:
    """Whether the key file says its store seals rows: then a store that claims an older schema was
    set back by someone without the key (who cannot rewrite this file and keep the key)."""
    try:
        return SEALED_MARK in path.read_text().split("\n")[1:]
    except OSError:
        return False


def create(path: Path, key: bytes | None = None) -> bytes:
    """A master key in path (0600), marked as sealing rows; never over an existing file, unless key
    is given: then the file is rewritten atomically with that same key and the mark."""
    key = key or os.urandom(crypto.KEY_BYTES)
    target, path = path, (path.with_name(path.name + ".new") if key else path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(f"{key.hex()}\n{SEALED_MARK}\n".encode())
        if path != target:
            path.replace(target)
    except OSError as e:
        raise StoreError(f"master key {target} cannot be written: {e.__class__.__name__}") from None
    return key


def write_canary(db: sqlite_utils.Database, key: bytes) -> None:
    env = crypto.seal(key, *CANARY, os.urandom(16).hex())
    db["meta"].upsert({"name": "canary", "key_id": env.key_id, "nonce": env.nonce, "ciphertext": env.ciphertext},
                      pk="name")




def existing(path: Path, db_path: Path) -> bytes:
    """The key file's key; a store with sealed rows and no key is refused, never given a new one."""
    key = read(path)
    if key is None:
        raise StoreError(f"master key {path} is missing, and the store {db_path} holds sealed "
                         "rows: restore the key file (a new key would leave them unreadable for good)")
    return key


def load(db: sqlite_utils.Database, path: Path, db_path: Path) -> bytes:
    """The key, shown to open the store; made (with the key check) only for a store that holds nothing sealed."""
    canary = db.execute("select key_id, nonce, ciphertext from meta where name = 'canary'").fetchone()
    sealed = db.execute("select (select count(*) from secrets) + (select count(*) from sessions)").fetchone()[0]
    if canary is None and not sealed and not path.exists():
        key = create(path)  # an empty store: its first key
    else:
        key = existing(path, db_path)
    if canary is None:
        if db.execute("select count(*) from secrets").fetchone()[0]:
            raise StoreError(f"store {db_path} has secrets but no key check: it was edited")
        write_canary(db, key)
    else:
        open_canary(key, canary, path, db_path)
    return key


def open_canary(key: bytes, canary: tuple, path: Path, db_path: Path) -> None:
    try:
        crypto.open_envelope({crypto.key_id(key): key}, *CANARY, crypto.Envelope(*canary))
    except crypto.EnvelopeError:
        raise StoreError(f"master key {path} does not open the store {db_path}: it is another store's key, "
                         "or the store was edited") from None
