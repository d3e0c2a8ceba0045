"""The encrypted store: secrets, sessions and the audit trail, on SQLite or PostgreSQL (`sql`).

Values go in through `add_secret` and come out only through `secrets_for`, which the addon calls
to fill a request. Listing never decrypts. What the request path reads (opened secrets, sessions)
is kept in memory until the backend's `version()` says some node wrote: the database is read
again then, and only then. Every row's deciding fields carry a seal (`seals`); values are sealed
under data keys wrapped by the master key (`keys`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from . import crypto, keys, schema, seals
from .audit import AuditTrail
from .errors import Conflict, NotFound, StoreError
from .links import Links
from .origins import Origin
from .origins import parse as parse_origin
from .policy import Scope
from .sql import Backend, Tx, open_backend
from .usage import UsageCounters

DB_NAME = "sealgate.db"
KEY_NAME = "master.key"
MIGRATIONS = schema.MIGRATIONS
CACHED_MAX = 4096  # (owner, names) lookups and sessions kept between changes to the store


@dataclass(frozen=True)
class SecretInfo:
    """What may be shown about a secret: never its value."""

    owner: str
    name: str
    origins: tuple[Origin, ...]
    created_at: float
    updated_at: float
    key_id: str = ""
    scope: Scope = Scope()


@dataclass(frozen=True)
class Secret:
    info: SecretInfo
    value: str
    header_form = None  # goes as written (a linked account's token may get a prefix: `linked`)
    refresh_due = expired = False
    broken = None

    @property
    def origins(self) -> tuple[Origin, ...]:
        return self.info.origins

    @property
    def scope(self) -> Scope:
        return self.info.scope

    def __repr__(self) -> str:  # keep values out of tracebacks and debug output
        return f"Secret({self.info.owner}/{self.info.name})"


@dataclass(frozen=True)
class SessionRecord:
    id: str
    credential_hash: str
    mac_key: bytes
    access: str
    runchat: str
    instance: str
    principal: str
    created_at: float
    expires_at: float


_SECRET_COLUMNS = ("owner", "name", "key_id", "nonce", "ciphertext", "origins", "created_at", "updated_at", "policy",
                   "seal")
_SECRET_UPSERT = (f"insert into secrets ({', '.join(_SECRET_COLUMNS)}) "
                  f"values ({', '.join('?' * len(_SECRET_COLUMNS))}) on conflict(owner, name) do update set "
                  + ", ".join(f"{c} = excluded.{c}" for c in _SECRET_COLUMNS[2:]))
_SESSION_COLUMNS = (*SessionRecord.__dataclass_fields__, "seal")


def _changed(rows: int) -> None:
    """A write the database did not take (a trigger or rule that drops it) is an error, never a success."""
    if rows != 1:
        raise StoreError(f"the store changed {rows} rows where it had to change 1: a trigger or rule drops "
                         "sealgate's writes; nothing was changed")


@functools.lru_cache(maxsize=4096)
def _origins(stored: str) -> tuple[Origin, ...]:
    """Stored origins, parsed once per distinct list (they were validated when written)."""
    return tuple(parse_origin(o, allow_http=True) for o in json.loads(stored))


def _info(row: dict) -> SecretInfo:
    return SecretInfo(row["owner"], row["name"], _origins(row["origins"]), row["created_at"], row["updated_at"],
                      row["key_id"], _scope(row.get("policy")))


@functools.lru_cache(maxsize=4096)
def _scope(stored: str | None) -> Scope:
    return Scope.from_json(stored)


def open_store(settings, *, listen: bool = False) -> SecretStore:
    """The store the settings name (SEALGATE_STORE_URL, else the data dir's file), with their key source."""
    return SecretStore(settings.data_dir, settings.store_url, settings.key_source(), listen=listen)


class SecretStore:
    def __init__(self, data_dir: Path, url: str | None = None, source: keys.KeySource | None = None, *,
                 listen: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.source = source or keys.FileKey(self.data_dir / KEY_NAME)
        self.backend: Backend = open_backend(url or f"sqlite://{(self.data_dir / DB_NAME).absolute()}", listen=listen)
        self.where = self.backend.where
        self._key: bytes | None = None
        self._ring: dict[str, bytes] = {}
        self.cache: dict[tuple, tuple[object, object]] = {}  # secrets_for and session, by what was asked (bounded)
        # changes whenever any node commits a change (this process's own writes included): the request path's
        # cache key, read several times per request (a few attribute reads while nothing was committed)
        self.version = self.backend.version
        self.audit = AuditTrail(self.backend)  # store.audit(user=...) reads it; .add and .set_status write it
        self.usage = UsageCounters(self.backend)  # requests counted against caps and rates
        self.links = Links(self)  # linked accounts' tokens
        self._revoked: dict[str, float] = {}  # sessions seen revoked by this process, until they would expire
        try:
            schema.migrate(self.backend, self.source, self._existing_key)
        except BaseException:
            self.backend.close()
            raise

    def close(self) -> None:
        self.backend.close()

    def schema_version(self) -> int:
        with self.backend.read() as tx:
            return self.backend.schema_version(tx)

    @property
    def key(self) -> bytes:
        """The master key, shown to open this store; made only for a store that holds nothing sealed."""
        if self._key is None:
            self._key = self._load_key()
        return self._key

    def _existing_key(self) -> bytes:
        key = self.source.read()
        if key is None:
            raise StoreError(f"{self.source.where} is missing, and the store {self.where} holds sealed rows: "
                             "restore the key (a new key would leave them unreadable for good)")
        return key

    def _load_key(self) -> bytes:
        with self.backend.write() as tx:
            canary = tx.one("select key_id, nonce, ciphertext from meta where name = 'canary'")
            sealed = tx.one("select (select count(*) from secrets) + (select count(*) from sessions) "
                            "+ (select count(*) from links)")[0]
            key = self.source.create() if canary is None and not sealed and self.source.read() is None \
                else self._existing_key()
            if canary is None:
                if sealed:
                    raise StoreError(f"store {self.where} has sealed rows but no key check: it was edited")
                c = keys.canary_row(key)
                tx.one("insert into meta (name, key_id, nonce, ciphertext) values (?, ?, ?, ?)",
                       [c["name"], c["key_id"], c["nonce"], c["ciphertext"]])
            else:
                keys.open_canary(key, canary, self.source.where, self.where)
        return key

    def read(self):
        """A read transaction, the key loaded first (loading it may write the key check)."""
        self.key  # noqa: B018
        return self.backend.read()

    @contextlib.contextmanager
    def write(self):
        """A write transaction (one writer at a time, on every node), the key loaded first."""
        self.key  # noqa: B018
        with self.backend.write() as tx:
            yield tx

    def check(self) -> None:
        """Raise StoreError unless the store is the one opened and readable, the key source still gives
        the key in use, and that key opens the store (for /readyz)."""
        self.backend.check()
        if self._key is not None and self.source.read() != self._key:
            raise StoreError(f"{self.source.where} was removed or replaced while sealgate ran: the next start "
                             "would be refused; put the key back")
        with self.read() as tx:
            canary = tx.one("select key_id, nonce, ciphertext from meta where name = 'canary'")
            tx.one("select count(*) from secrets")
        if canary is None:
            raise StoreError(f"store {self.where} has no key check: it was edited or replaced")
        keys.open_canary(self.key, canary, self.source.where, self.where)

    # secrets ------------------------------------------------------------------------

    def add_secret(self, owner: str, name: str, value: str, origins: list[Origin], *, replace: bool = False,
                   scope: Scope | None = None) -> None:
        """scope None: none for a new secret, the one it had for a replaced one."""
        with self.write() as tx:
            existing = self._row(tx, owner, name)
            if existing and not replace:
                raise Conflict(f"secret {name} of user {owner} exists already; use --replace to change its value")
            now = time.time()
            policy = scope.to_json() if scope is not None else existing.get("policy") if existing else None
            self.put(tx, {"owner": owner, "name": name, "origins": json.dumps([str(o) for o in origins]),
                           "created_at": existing["created_at"] if existing else now, "updated_at": now,
                           "policy": policy}, value)

    def put(self, tx: Tx, row: dict, value: str) -> None:
        """Write a secret's row with value sealed under the current data key, and reseal its owner."""
        key_id, data_key = self.current_key(tx)
        env = crypto.seal(data_key, row["owner"], row["name"], value)
        row = {**row, "key_id": key_id, "nonce": env.nonce, "ciphertext": env.ciphertext}
        row["seal"] = seals.secret_seal(self.key, row)
        _changed(tx.count(_SECRET_UPSERT, [row[c] for c in _SECRET_COLUMNS]))
        seals.reseal_owner(tx, self.key, row["owner"])

    def set_origins(self, owner: str, name: str, origins: list[Origin]) -> None:
        self._update(owner, name, origins=json.dumps([str(o) for o in origins]))

    def set_scope(self, owner: str, name: str, scope: Scope) -> None:
        self._update(owner, name, policy=scope.to_json())

    def _update(self, owner: str, name: str, **fields: str | None) -> None:
        """Change a secret's deciding fields (never its value), resealed."""
        with self.write() as tx:
            row = self._row(tx, owner, name)
            if not row:
                raise NotFound(f"user {owner} has no secret named {name}")
            seals.verified_secret(self.key, row)
            row = {**row, **fields, "updated_at": time.time()}
            _changed(tx.count("update secrets set origins = ?, policy = ?, updated_at = ?, seal = ? "
                              "where owner = ? and name = ?", [row["origins"], row["policy"], row["updated_at"],
                                                               seals.secret_seal(self.key, row), owner, name]))
            seals.reseal_owner(tx, self.key, owner)

    def remove_secret(self, owner: str, name: str) -> None:
        with self.write() as tx:
            if not self._row(tx, owner, name):
                raise NotFound(f"user {owner} has no secret named {name}")
            seals.verify_owner(tx, self.key, owner)
            _changed(tx.count("delete from secrets where owner = ? and name = ?", [owner, name]))
            seals.reseal_owner(tx, self.key, owner)

    def owners(self) -> list[str]:
        with self.read() as tx:
            return [r["owner"] for r in tx.rows("select distinct owner from secrets order by owner")]

    def list_secrets(self, owner: str) -> list[SecretInfo]:
        with self.read() as tx:
            seals.verify_owner(tx, self.key, owner)
            rows = tx.rows("select * from secrets where owner = ? order by name", [owner])
        return [_info(seals.verified_secret(self.key, r)) for r in rows]

    def secrets_for(self, owner: str, names: set[str] | None = None) -> dict[str, Secret]:
        """Decrypt the named secrets of owner (all of them for None); a missing name is simply absent.
        On the request path: what was opened is kept until some node writes to the store."""
        if names is not None and not names:
            return {}
        return dict(self.cached(("secrets", owner, None if names is None else frozenset(names)),
                                lambda: self._open_secrets(owner, names)))

    def _open_secrets(self, owner: str, names: set[str] | None) -> dict[str, Secret]:
        with self.read() as tx:
            seals.verify_owner(tx, self.key, owner)
            if names is None:
                rows = tx.rows("select * from secrets where owner = ?", [owner])
            else:
                rows = tx.rows(f"select * from secrets where owner = ? and name in ({','.join('?' * len(names))})",
                               [owner, *sorted(names)])
            if any(r["key_id"] not in self._ring for r in rows):
                self._ring = keys.open_data_keys(self.key, tx.rows("select * from data_keys"))
        try:
            return {r["name"]: Secret(_info(seals.verified_secret(self.key, r)), crypto.open_envelope(
                self._ring, owner, r["name"], crypto.Envelope(r["key_id"], r["nonce"], r["ciphertext"])))
                for r in rows}
        except crypto.EnvelopeError as e:
            raise StoreError(str(e)) from None

    def cached(self, what: tuple, load):
        """What load() gives, kept until the store's version changes (read before loading, so a change
        committed meanwhile is loaded again next time)."""
        version = self.version()
        if (hit := self.cache.get(what)) is not None and hit[0] == version:
            return hit[1]
        found = load()
        if len(self.cache) >= CACHED_MAX:
            self.cache.clear()
        self.cache[what] = (version, found)
        return found

    def secrets_signature(self, owner: str) -> tuple:
        """Changes whenever owner's secrets or linked accounts do (added, replaced, refreshed, removed): cheap,
        no decryption."""
        with self.backend.read() as tx:
            return tuple(tx.one("select count(*), max(updated_at), min(seal), max(seal), (select count(*) from links "
                                "where owner = ?), (select max(updated_at) from links where owner = ?) from secrets "
                                "where owner = ?", [owner, owner, owner]))

    def _row(self, tx: Tx, owner: str, name: str) -> dict | None:
        return next(iter(tx.rows("select * from secrets where owner = ? and name = ?", [owner, name])), None)

    # data keys ------------------------------------------------------------------------

    def current_key(self, tx: Tx) -> tuple[str, bytes]:
        """The newest data key, which new writes use (the first is made with the first write)."""
        rows = tx.rows("select * from data_keys order by created_at desc, key_id limit 1")
        if not rows:
            rows = [keys.new_data_key(self.key)]
            tx.one("insert into data_keys (key_id, nonce, wrapped, created_at) values (?, ?, ?, ?)",
                   [rows[0][c] for c in ("key_id", "nonce", "wrapped", "created_at")])
        ring = keys.open_data_keys(self.key, rows)
        return rows[0]["key_id"], ring[rows[0]["key_id"]]

    def keyring(self, tx: Tx) -> dict[str, bytes]:
        return keys.open_data_keys(self.key, tx.rows("select * from data_keys"))

    # sessions -----------------------------------------------------------------------

    def add_session(self, record: SessionRecord) -> None:
        row = {**record.__dict__, "seal": seals.session_seal(self.key, record.__dict__)}
        with self.write() as tx:
            tx.one(f"insert into sessions ({', '.join(_SESSION_COLUMNS)}) values ({', '.join('?' * len(row))})",
                   [row[c] for c in _SESSION_COLUMNS])

    def session(self, session_id: str) -> SessionRecord | None:
        """The session, as last written by any node (a revoked one is None within a change's notice)."""
        return self.cached(("session", session_id), lambda: self._read_session(session_id))

    def _read_session(self, session_id: str) -> SessionRecord | None:
        """A session once seen gone stays gone in this process (its row put back is not honoured here)."""
        if session_id in self._revoked:
            return None
        with self.read() as tx:
            row = next(iter(tx.rows("select * from sessions where id = ?", [session_id])), None)
        if row is None:
            if (seen := self.cache.get(("session", session_id), (None, None))[1]) is not None:
                self._gone(session_id, seen.expires_at)
            return None
        seals.verified_session(self.key, row)
        return SessionRecord(**{k: row[k] for k in SessionRecord.__dataclass_fields__})

    def _gone(self, session_id: str, expires_at: float) -> None:
        if len(self._revoked) >= CACHED_MAX:
            now = time.time()
            self._revoked = {k: v for k, v in self._revoked.items() if v > now}
        self._revoked[session_id] = expires_at

    def revoke_session(self, session_id: str) -> None:
        with self.write() as tx:
            if (found := tx.one("select expires_at from sessions where id = ?", [session_id])) is None:
                raise NotFound(f"there is no session {session_id}")
            (expires_at,) = found
            _changed(tx.count("delete from sessions where id = ?", [session_id]))
        self._gone(session_id, expires_at)

