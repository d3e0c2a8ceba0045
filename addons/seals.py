"""What each stored row's seal covers: a MAC under the master key over the fields that decide where,
how or for whom a value may go, so that an edit made without the key (a database write, a row
put back from an old backup) does not verify and is refused.
"""

from __future__ import annotations

import hashlib

from . import crypto
from .errors import StoreError
from .sql import Tx


def secret_fields(row: dict) -> list:
    """What decides where a secret's value may go, and which ciphertext it goes with (an older value
    cannot be put back under a newer row's seal)."""
    fields = [row["owner"], row["name"], row["origins"], row["key_id"], _sealed(row)]
    return fields + [row["policy"]] if row.get("policy") else fields  # (a row sealed before scopes has none)


def session_fields(row: dict) -> list:
    """What decides for whom a session's placeholders resolve, and until when."""
    return [row["id"], row["credential_hash"], bytes(row["mac_key"]).hex(), row["access"], row["runchat"],
            row["instance"], row["principal"], row["created_at"], row["expires_at"]]


def link_fields(row: dict) -> list:
    """Whose tokens a link holds and for which provider (whose origins they may go to), until when they
    are good, and whether the link is broken (and why, which `link list` shows). Not its lease: any node
    takes that, and a lease no node would take is ignored (`links.Links.lease`)."""
    return [row["owner"], row["provider"], row["key_id"], _sealed(row), row["expires_at"], row["status"],
            row["detail"]]


def link_state_fields(row: dict) -> list:
    """Who a linking begun with `link start` links, to which provider, and where its code was sent."""
    return [row["state"], row["owner"], row["provider"], row["redirect_uri"], row["key_id"], _sealed(row),
            row["expires_at"]]


def _sealed(row: dict) -> str:
    return hashlib.sha256(bytes(row["nonce"]) + bytes(row["ciphertext"])).hexdigest()


def secret_seal(key: bytes, row: dict) -> str:
    return crypto.row_seal(key, "secret", secret_fields(row))


def session_seal(key: bytes, row: dict) -> str:
    return crypto.row_seal(key, "session", session_fields(row))


def _matches(key: bytes, kind: str, fields, seal) -> bool:
    try:
        return crypto.seal_matches(key, kind, fields(), seal)
    except (TypeError, ValueError, KeyError):  # a column of another type than sealgate writes
        return False


def link_seal(key: bytes, row: dict) -> str:
    return crypto.row_seal(key, "link", link_fields(row))


def link_state_seal(key: bytes, row: dict) -> str:
    return crypto.row_seal(key, "link_state", link_state_fields(row))


def verified_link(key: bytes, row: dict) -> dict:
    return _verified(key, "link", link_fields, row, lambda: f"the link of user {row['owner']} to {row['provider']} "
                     "was changed without the master key; it is refused")


def verified_link_state(key: bytes, row: dict) -> dict:
    return _verified(key, "link_state", link_state_fields, row,
                     lambda: "this linking was changed without the master key; it is refused (start it again)")


def verified_secret(key: bytes, row: dict) -> dict:
    return _verified(key, "secret", secret_fields, row, lambda: f"secret {row['name']} of user {row['owner']} was "
                     "changed without the master key (its owner, name or origins do not match their seal); it is "
                     "refused")


def verified_session(key: bytes, row: dict) -> dict:
    return _verified(key, "session", session_fields, row, lambda: f"session {row['id']} was changed without the "
                     "master key (its principal, expiry or placeholder key do not match their seal); it is refused")


def _verified(key: bytes, kind: str, fields, row: dict, refusal) -> dict:
    if not _matches(key, kind, lambda: fields(row), row.get("seal")):
        raise StoreError(refusal())
    return row


def _owner_pairs(tx: Tx, owner: str, links: bool = True) -> list[list[str]]:
    """The owner's secrets by name and their links as `link:provider` (no secret name holds a colon).
    links False: a store migrating to row seals, which has no links table yet."""
    if not links:
        return sorted([r["name"], r["seal"]] for r in tx.rows("select name, seal from secrets where owner = ?", [owner]))
    return sorted([r["name"], r["seal"]] for r in tx.rows(
        "select name, seal from secrets where owner = ? union all "
        "select 'link:' || provider as name, seal from links where owner = ?", [owner, owner]))


def reseal_owner(tx: Tx, key: bytes, owner: str, links: bool = True) -> None:
    """Seal which rows (by name and seal) an owner has, secrets and links: a row put back, removed or added
    without the key then no longer matches, though each row's own seal would."""
    seal = crypto.row_seal(key, "owner", [owner, _owner_pairs(tx, owner, links)])
    tx.one("insert into owners (owner, seal) values (?, ?) on conflict(owner) do update set seal = excluded.seal",
           [owner, seal])


def verify_owner(tx: Tx, key: bytes, owner: str) -> None:
    """The owner's rows are the ones last written with the key: none put back, removed or added."""
    pairs = _owner_pairs(tx, owner)
    row = tx.one("select seal from owners where owner = ?", [owner])
    if not pairs and row is None:
        return  # never had a secret
    if row is None or not _matches(key, "owner", lambda: [owner, pairs], row[0]):
        raise StoreError(f"the secrets of user {owner} are not the ones last written with the master key "
                         "(a row was put back, removed or added without it); they are refused")
