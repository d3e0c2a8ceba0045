"""Linked accounts in the store: each user's OAuth tokens per provider, sealed like secret values
(AES-GCM under the current data key, bound to owner and `link:<provider>`), each row sealed under the
master key and counted in its owner's seal, so a row put back from an old backup is refused.

Also the linkings begun by `link start` and not finished yet (`link_states`: the PKCE verifier
sealed, single use, ten minutes), and the lease by which one node of many refreshes a token while
the others wait for its result instead of spending the refresh token a second time.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import crypto, seals
from .errors import NotFound, StoreError
from .sql import Tx

if TYPE_CHECKING:
    from .store import SecretStore

STATE_TTL = 600  # seconds a linking begun may be finished in
REFRESH_MARGIN = 60  # seconds before expiry from which a token is refreshed before it is sent
OK, BROKEN = "ok", "broken"


@dataclass(frozen=True)
class Tokens:
    access_token: str
    refresh_token: str | None = None
    expires_at: float | None = None  # None: the provider did not say (a token that does not expire)

    def __repr__(self) -> str:  # keep tokens out of tracebacks and debug output
        return f"Tokens(expires_at={self.expires_at}, refreshable={self.refresh_token is not None})"

    def due(self, now: float) -> bool:
        """Expiring within the margin: refreshed before it is sent."""
        return self.expires_at is not None and self.expires_at - now <= REFRESH_MARGIN

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@dataclass(frozen=True)
class LinkInfo:
    """What may be shown about a link: never its tokens."""

    owner: str
    provider: str
    status: str  # ok | broken
    detail: str  # why it is broken
    expires_at: float | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Link:
    info: LinkInfo
    tokens: Tokens


@dataclass(frozen=True)
class Pending:
    """A linking begun: whose, to which provider, where the code goes, and its PKCE verifier."""

    owner: str
    provider: str
    redirect_uri: str
    verifier: str

    def __repr__(self) -> str:
        return f"Pending({self.owner}/{self.provider})"


class Links:
    def __init__(self, store: SecretStore) -> None:
        self.store = store

    def put(self, owner: str, provider: str, tokens: Tokens) -> None:
        """Store tokens for owner's link to provider (a new link, a relink): it is ok again."""
        with self.store.write() as tx:
            seals.verify_owner(tx, self.store.key, owner)
            existing = tx.one("select created_at from links where owner = ? and provider = ?", [owner, provider])
            row = self._row(tx, owner, provider, tokens, existing[0] if existing else time.time())
            tx.one(f"insert into links ({', '.join(row)}) values ({', '.join('?' * len(row))}) "
                   "on conflict(owner, provider) do update set "
                   + ", ".join(f"{c} = excluded.{c}" for c in row if c not in ("owner", "provider")),
                   list(row.values()))
            seals.reseal_owner(tx, self.store.key, owner)

    def refreshed(self, link: Link, tokens: Tokens) -> bool:
        """Store refreshed tokens in place of link's, if it is still the link that was read; False when it was
        removed or linked again meanwhile (then nothing is written: a refresh never brings a link back)."""
        owner, provider = link.info.owner, link.info.provider
        with self.store.write() as tx:
            seals.verify_owner(tx, self.store.key, owner)
            row = self._row(tx, owner, provider, tokens, link.info.created_at)
            changed = tx.count(f"update links set {', '.join(f'{c} = ?' for c in row)} where owner = ? and "
                               "provider = ? and updated_at = ?", [*row.values(), owner, provider, link.info.updated_at])
            if changed:
                seals.reseal_owner(tx, self.store.key, owner)
        return changed == 1

    def _row(self, tx: Tx, owner: str, provider: str, tokens: Tokens, created_at: float) -> dict:
        """A link's row with tokens sealed under the current data key, ok, unleased, sealed."""
        key_id, data_key = self.store.current_key(tx)
        env = crypto.seal(data_key, owner, _name(provider), json.dumps(
            {"access_token": tokens.access_token, "refresh_token": tokens.refresh_token}))
        row = {"owner": owner, "provider": provider, "key_id": key_id, "nonce": env.nonce, "ciphertext": env.ciphertext,
               "expires_at": tokens.expires_at, "status": OK, "detail": "", "created_at": created_at,
               "updated_at": time.time(), "lease_until": None}
        row["seal"] = seals.link_seal(self.store.key, row)
        return row

    def remove(self, owner: str, provider: str) -> None:
        with self.store.write() as tx:
            seals.verify_owner(tx, self.store.key, owner)
            if tx.count("delete from links where owner = ? and provider = ?", [owner, provider]) != 1:
                raise NotFound(f"user {owner} has no link to {provider}")
            seals.reseal_owner(tx, self.store.key, owner)

    def list(self, owner: str) -> list[LinkInfo]:
        with self.store.read() as tx:
            seals.verify_owner(tx, self.store.key, owner)
            rows = tx.rows("select * from links where owner = ? order by provider", [owner])
        return [_info(seals.verified_link(self.store.key, r)) for r in rows]

    def providers(self, owner: str) -> list[str]:
        """The providers owner has linked (for a session's env: no decryption)."""
        with self.store.read() as tx:
            return [r["provider"] for r in tx.rows("select provider from links where owner = ? order by provider",
                                                   [owner])]

    def open(self, owner: str) -> dict[str, Link]:
        """owner's links with their tokens, by provider; on the request path: kept until some node writes."""
        return self.store.cached(("links", owner), lambda: self.read(owner))

    def read(self, owner: str, provider: str | None = None) -> dict[str, Link]:
        """owner's links (or the one to provider) as the store holds them now."""
        with self.store.read() as tx:
            seals.verify_owner(tx, self.store.key, owner)
            rows = tx.rows("select * from links where owner = ?" + (" and provider = ?" if provider else ""),
                           [owner, provider] if provider else [owner])
            ring = self.store.keyring(tx) if rows else {}
        return {r["provider"]: Link(_info(seals.verified_link(self.store.key, r)), _open(ring, r)) for r in rows}

    def broken(self, link: Link, detail: str) -> bool:
        """The provider refused to refresh the tokens of link (as read): `link list` shows it, and its placeholder
        is refused until relinked. False when the link changed meanwhile (another node refreshed it)."""
        owner, provider = link.info.owner, link.info.provider
        with self.store.write() as tx:
            row = next(iter(tx.rows("select * from links where owner = ? and provider = ? and updated_at = ?",
                                    [owner, provider, link.info.updated_at])), None)
            if row is None:
                return False
            row = {**seals.verified_link(self.store.key, row), "status": BROKEN, "detail": detail}
            tx.count("update links set status = ?, detail = ?, lease_until = null, seal = ? where owner = ? and "
                     "provider = ?", [BROKEN, detail, seals.link_seal(self.store.key, row), owner, provider])
            seals.reseal_owner(tx, self.store.key, owner)
        return True

    def lease(self, link: Link, seconds: float) -> bool:
        """Take the right to refresh the tokens of link (as read) for some seconds. False: another node holds
        it, or has changed the link since it was read (its refresh token may be spent: read it again)."""
        now = time.time()
        with self.store.write() as tx:  # (a lease further ahead than any node takes one was not written by one)
            return tx.count("update links set lease_until = ? where owner = ? and provider = ? and updated_at = ? "
                            "and (lease_until is null or lease_until < ? or lease_until > ?)",
                            [now + seconds, link.info.owner, link.info.provider, link.info.updated_at, now,
                             now + 2 * seconds]) == 1

    def release(self, owner: str, provider: str) -> None:
        with self.store.write() as tx:
            tx.count("update links set lease_until = null where owner = ? and provider = ?", [owner, provider])

    def rekey(self, tx: Tx, key_id: str, batch: int) -> int:
        """Seal up to batch links and linkings begun that are under another key than key_id (the current one)
        again under it (`key rotate`); how many were."""
        ring = self.store.keyring(tx)
        _, data_key = self.store.current_key(tx)
        rows = tx.rows("select * from links where key_id <> ? order by owner, provider limit ?", [key_id, batch])
        for r in rows:
            seals.verified_link(self.store.key, r)
            env = crypto.seal(data_key, r["owner"], _name(r["provider"]), _opened(ring, r, _name(r["provider"])))
            r = {**r, "key_id": key_id, "nonce": env.nonce, "ciphertext": env.ciphertext}
            tx.count("update links set key_id = ?, nonce = ?, ciphertext = ?, seal = ? where owner = ? and provider = ?",
                     [key_id, env.nonce, env.ciphertext, seals.link_seal(self.store.key, r), r["owner"], r["provider"]])
            seals.reseal_owner(tx, self.store.key, r["owner"])
        states = tx.rows("select * from link_states where key_id <> ? limit ?", [key_id, batch - len(rows)])
        for r in states:
            seals.verified_link_state(self.store.key, r)
            env = crypto.seal(data_key, r["owner"], _state_name(r["state"]), _opened(ring, r, _state_name(r["state"])))
            r = {**r, "key_id": key_id, "nonce": env.nonce, "ciphertext": env.ciphertext}
            tx.count("update link_states set key_id = ?, nonce = ?, ciphertext = ?, seal = ? where state = ?",
                     [key_id, env.nonce, env.ciphertext, seals.link_state_seal(self.store.key, r), r["state"]])
        return len(rows) + len(states)

    # linkings begun -------------------------------------------------------------------

    def begin(self, owner: str, provider: str, redirect_uri: str, verifier: str) -> str:
        """Keep a linking begun; its state (the value of `state` in the authorization URL)."""
        state = secrets.token_hex(24)  # (never starting with "-", which a command line would take for a flag)
        now = time.time()
        with self.store.write() as tx:
            tx.count("delete from link_states where expires_at < ?", [now])
            key_id, data_key = self.store.current_key(tx)
            env = crypto.seal(data_key, owner, _state_name(state), verifier)
            row = {"state": state, "owner": owner, "provider": provider, "redirect_uri": redirect_uri,
                   "key_id": key_id, "nonce": env.nonce, "ciphertext": env.ciphertext, "expires_at": now + STATE_TTL}
            row["seal"] = seals.link_state_seal(self.store.key, row)
            tx.one(f"insert into link_states ({', '.join(row)}) values ({', '.join('?' * len(row))})",
                   list(row.values()))
        return state

    def take(self, state: str) -> Pending:
        """The linking a state names, removed (a state is used once); NotFound when unknown or expired."""
        with self.store.write() as tx:
            row = next(iter(tx.rows("select * from link_states where state = ?", [state])), None)
            if row is None or row["expires_at"] < time.time():
                raise NotFound("no linking was begun with this state, or it expired (a linking must be finished "
                               f"within {STATE_TTL // 60} minutes, once): run `sealgate link start` again")
            seals.verified_link_state(self.store.key, row)
            tx.count("delete from link_states where state = ?", [state])
            ring = self.store.keyring(tx)
        return Pending(row["owner"], row["provider"], row["redirect_uri"], _opened(ring, row, _state_name(state)))


def _name(provider: str) -> str:
    """The name a link's tokens are sealed under: no secret name holds a colon."""
    return f"link:{provider}"


def _state_name(state: str) -> str:
    return f"link-state:{state}"


def _opened(ring: dict[str, bytes], row: dict, name: str) -> str:
    try:
        return crypto.open_envelope(ring, row["owner"], name,
                                    crypto.Envelope(row["key_id"], bytes(row["nonce"]), bytes(row["ciphertext"])))
    except crypto.EnvelopeError as e:
        raise StoreError(str(e)) from None


def _open(ring: dict[str, bytes], row: dict) -> Tokens:
    data = json.loads(_opened(ring, row, _name(row["provider"])))
    return Tokens(data["access_token"], data.get("refresh_token"), row["expires_at"])


def _info(row: dict) -> LinkInfo:
    return LinkInfo(row["owner"], row["provider"], row["status"], row["detail"], row["expires_at"],
                    row["created_at"], row["updated_at"])
