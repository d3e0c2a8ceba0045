"""The platform API's bearer tokens: shown once when issued, stored as a SHA-256 hash, their scopes
sealed under the master key (an edit that widens a token's scopes without the key is refused).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from . import crypto, validate
from .errors import Conflict, NotFound, StoreError
from .store import SecretStore

SCOPES = ("secrets:read", "secrets:write", "sessions:write", "audit:read")
PREFIX = "sgt_"  # a token is recognisable (secret scanners, logs) and never a placeholder


@dataclass(frozen=True)
class Token:
    name: str
    scopes: tuple[str, ...]
    created_at: float


def parse_scopes(text: str) -> tuple[str, ...]:
    scopes = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not scopes:
        raise ValueError(f"--scopes is empty: give one or more of {', '.join(SCOPES)}")
    if unknown := [s for s in scopes if s not in SCOPES]:
        raise ValueError(f"--scopes: {unknown[0]!r} is not a scope (known: {', '.join(SCOPES)})")
    return scopes


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _seal(key: bytes, row: dict) -> str:
    return crypto.row_seal(key, "api_token", [row["name"], row["token_hash"], row["scopes"], row["created_at"]])


def verified(key: bytes, row: dict) -> Token:
    if not crypto.seal_matches(key, "api_token", [row["name"], row["token_hash"], row["scopes"], row["created_at"]],
                               row["seal"]):
        raise StoreError(f"API token {row['name']} was changed without the master key; it is refused")
    return Token(row["name"], tuple(row["scopes"].split(",")), row["created_at"])


def issue(store: SecretStore, name: str, scopes: tuple[str, ...]) -> str:
    """A new token (the only time it is seen)."""
    validate.token_name(name)
    token = PREFIX + secrets.token_urlsafe(32)
    row = {"name": name, "token_hash": _hash(token), "scopes": ",".join(scopes), "created_at": time.time()}
    with store.write() as tx:
        if tx.one("select name from api_tokens where name = ?", [name]) is not None:
            raise Conflict(f"API token {name} exists already; revoke it first")
        tx.one("insert into api_tokens (name, token_hash, scopes, created_at, seal) values (?, ?, ?, ?, ?)",
               [row["name"], row["token_hash"], row["scopes"], row["created_at"], _seal(store.key, row)])
    return token


def list_tokens(store: SecretStore) -> list[Token]:
    with store.read() as tx:
        rows = tx.rows("select * from api_tokens order by name")
    return [verified(store.key, r) for r in rows]


def revoke(store: SecretStore, name: str) -> None:
    with store.write() as tx:
        if tx.count("delete from api_tokens where name = ?", [name]) != 1:
            raise NotFound(f"there is no API token named {name}")


def check(store: SecretStore, token: str) -> Token | None:
    """The token's record, or None for a token that is not (or no longer) issued."""
    if not token.startswith(PREFIX):
        return None
    with store.read() as tx:
        rows = tx.rows("select * from api_tokens where token_hash = ?", [_hash(token)])
    return verified(store.key, rows[0]) if rows else None
