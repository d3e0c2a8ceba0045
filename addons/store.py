"""The encrypted store: secrets and sessions in SQLite, values sealed by `crypto`.

Values go in through `add_secret` and come out only through `secrets_for`, which the
addon calls to fill a request. Listing never decrypts. The master key lives in its own
file (mode 0600) beside the database; it is created on first use.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from . import crypto, masterkey
from .errors import StoreError
from .origins import Origin
from .origins import parse as parse_origin

DB_NAME = "sealgate.db"
KEY_NAME = "master.key"
KeyLoader = Callable[[], bytes]


def _v1_tables(db: sqlite_utils.Database, key: KeyLoader) -> None:
    """secrets, audit and sessions, as the first release made them (before versions were kept)."""
    db["secrets"].create(
        {"owner": str, "name": str, "key_id": str, "nonce": bytes, "ciphertext": bytes,
         "origins": str, "created_at": float, "updated_at": float},
        pk=("owner", "name"), if_not_exists=True,
    )
    db["audit"].create(
        {"id": int, "at": float, "session": str, "runchat": str, "instance": str, "principal": str,
         "secrets": str, "method": str, "origin": str, "path": str, "decision": str, "code": str,
         "status": int},
        pk="id", if_not_exists=True,
    )
    db["audit"].create_index(["principal", "at"], if_not_exists=True)
    db["audit"].create_index(["runchat", "at"], if_not_exists=True)
    db["sessions"].create(
        {"id": str, "credential_hash": str, "mac_key": bytes, "access": str, "runchat": str,
         "instance": str, "principal": str, "created_at": float, "expires_at": float},
        pk="id", if_not_exists=True,
    )


def _v2_audit_client(db: sqlite_utils.Database, key: KeyLoader) -> None:
    """audit.client: the worker's address, for refusals that have no session (a bad credential)."""
    if "client" not in db["audit"].columns_dict:
        db["audit"].add_column("client", str)


def _v3_row_seals(db: sqlite_utils.Database, key: KeyLoader) -> None:
    """Seal every row's deciding fields under the master key, and keep a key check (the canary).

    Rows written before this version are sealed here, once, after the key is shown to open
    every secret: an old store needs its key to upgrade."""
    for table in ("secrets", "sessions"):
        if "seal" not in db[table].columns_dict:
            db[table].add_column("seal", str)
    db["meta"].create({"name": str, "key_id": str, "nonce": bytes, "ciphertext": bytes}, pk="name",
                      if_not_exists=True)
    db["owners"].create({"owner": str, "seal": str}, pk="owner", if_not_exists=True)
    secrets_rows = list(db.query("select * from secrets"))
    session_rows = list(db.query("select * from sessions"))
    if not secrets_rows and not session_rows:
        return  # an empty store: the canary is written with the key, when it is made
    k = key()
    for row in secrets_rows:
        crypto.open_envelope({crypto.key_id(k): k}, row["owner"], row["name"],
                             crypto.Envelope(row["key_id"], row["nonce"], row["ciphertext"]))
        db.execute("update secrets set seal = ? where owner = ? and name = ?",
                   [_secret_seal(k, row), row["owner"], row["name"]])
    for row in session_rows:
        db.execute("update sessions set seal = ? where id = ?", [_session_seal(k, row), row["id"]])
    for (owner,) in db.execute("select distinct owner from secrets").fetchall():
        _reseal_owner(db, k, owner)
    masterkey.write_canary(db, k)


# Schema migrations, in order: the store's version (PRAGMA user_version) is how many have run.
MIGRATIONS = (_v1_tables, _v2_audit_client, _v3_row_seals)
SEALING_VERSION = 3  # from this version on rows are sealed; the key file then says so
FILE_CHECK_EVERY = 1.0  # seconds between looks at whether the store file was replaced
OPENED_MAX = 4096  # (owner, names) lookups kept opened between writes to the store


def _secret_fields(row: dict) -> list:
    """What decides where a secret's value may go (and each field a later version adds), and which
    ciphertext it goes with (an older value cannot be put back under a newer row's seal)."""
    sealed = hashlib.sha256(bytes(row["nonce"]) + bytes(row["ciphertext"])).hexdigest()
    return [row["owner"], row["name"], row["origins"], row["key_id"], sealed]


def _session_fields(row: dict) -> list:
    """What decides for whom a session's placeholders resolve, and until when."""
    return [row["id"], row["credential_hash"], bytes(row["mac_key"]).hex(), row["access"], row["runchat"],
            row["instance"], row["principal"], row["created_at"], row["expires_at"]]


def _secret_seal(key: bytes, row: dict) -> str:
    return crypto.row_seal(key, "secret", _secret_fields(row))


def _session_seal(key: bytes, row: dict) -> str:
    return crypto.row_seal(key, "session", _session_fields(row))


def _owner_pairs(db: sqlite_utils.Database, owner: str) -> list[list[str]]:
    return sorted([name, seal] for name, seal in db.execute("select name, seal from secrets where owner = ?", [owner]))


def _reseal_owner(db: sqlite_utils.Database, key: bytes, owner: str) -> None:
    """Seal which rows (by name and seal) an owner has: a row put back, removed or added without the key
    then no longer matches, though each row's own seal would."""
    seal = crypto.row_seal(key, "owner", [owner, _owner_pairs(db, owner)])
    db.execute("insert into owners (owner, seal) values (?, ?) on conflict(owner) do update set seal = excluded.seal",
               [owner, seal])


@dataclass(frozen=True)
class SecretInfo:
    """What may be shown about a secret: never its value."""

    owner: str
    name: str
    origins: tuple[Origin, ...]
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Secret:
    info: SecretInfo
    value: str

    @property
    def origins(self) -> tuple[Origin, ...]:
        return self.info.origins

    def __repr__(self) -> str:  # keep values out of tracebacks and debug output
        return f"Secret({self.info.owner}/{self.info.name})"


@dataclass(frozen=True)
class AuditRecord:
    """One decision: never a value, never a query string, never a credential."""

    at: float
    session: str  # "" for a refusal before any session was known (407)
    runchat: str
    instance: str
    principal: str
    client: str  # the worker's address
    secrets: tuple[str, ...]
    method: str
    origin: str
    path: str
    decision: str  # allow | block
    code: str | None
    status: int | None  # the status the worker got (0: the connection was closed)


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


_AUDIT_COLUMNS = tuple(AuditRecord.__dataclass_fields__)
_AUDIT_INSERT = f"insert into audit ({', '.join(_AUDIT_COLUMNS)}) values ({', '.join('?' * len(_AUDIT_COLUMNS))})"


@functools.lru_cache(maxsize=4096)
def _origins(stored: str) -> tuple[Origin, ...]:
    """Stored origins, parsed once per distinct list (they were validated when written)."""
    return tuple(parse_origin(o, allow_http=True) for o in json.loads(stored))


def _verify_owner(db: sqlite_utils.Database, key: bytes, owner: str) -> None:
    """The owner's rows are the ones last written with the key: none put back, removed or added."""
    pairs = _owner_pairs(db, owner)
    row = db.execute("select seal from owners where owner = ?", [owner]).fetchone()
    if not pairs and row is None:
        return  # never had a secret
    if row is None or not crypto.seal_matches(key, "owner", [owner, pairs], row[0]):
        raise StoreError(f"the secrets of user {owner} are not the ones last written with the master key "
                         "(a row was put back, removed or added without it); they are refused")

def _verified(key: bytes, row: dict) -> dict:
    """row, if its deciding fields carry the seal the master key gives them; else StoreError."""
    try:
        sealed = crypto.seal_matches(key, "secret", _secret_fields(row), row.get("seal"))
    except (TypeError, ValueError):  # a column of another type than sealgate writes
        sealed = False
    if not sealed:
        raise StoreError(f"secret {row['name']} of user {row['owner']} was changed without the master key "
                         "(its owner, name or origins do not match their seal); it is refused")
    return row


def _info(row: dict) -> SecretInfo:
    return SecretInfo(row["owner"], row["name"], _origins(row["origins"]), row["created_at"], row["updated_at"])


class SecretStore:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._key: bytes | None = None
        try:
            if not self.data_dir.exists():
                self.data_dir.mkdir(parents=True, mode=0o700)
            db_path = self.data_dir / DB_NAME
            if not db_path.exists():
                os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT, 0o600))  # SQLite gives -wal/-shm its mode
            self._inode = db_path.stat().st_ino  # a file replaced under a running proxy is noticed
            self._file_checked_at = float("-inf")
            self._opened: dict[tuple, tuple[int, dict[str, Secret]]] = {}  # secrets_for, by owner and names
            conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # with WAL: survives a crash of the process, fsyncs less
            conn.execute("PRAGMA busy_timeout=5000")
            self.db = sqlite_utils.Database(conn)
            self._migrate()
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"store {self.data_dir / DB_NAME} cannot be opened: {e}") from None

    def _migrate(self) -> None:
        """Bring the schema up to date, one versioned migration at a time, each in a transaction."""
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(f"store {self.data_dir / DB_NAME} has schema version {version}, newer than this "
                             f"sealgate knows ({len(MIGRATIONS)}); upgrade sealgate")
        key_path = self.data_dir / KEY_NAME
        if version < SEALING_VERSION and (masterkey.marks_sealed(key_path) or "meta" in self.db.table_names()):
            raise StoreError(f"store {self.data_dir / DB_NAME} claims schema version {version}, but its rows were "
                             "sealed already: the version was set back without the key; refusing it")
        for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.db.conn:
                self.db.execute("BEGIN IMMEDIATE")
                if self.db.execute("PRAGMA user_version").fetchone()[0] >= number:
                    continue  # another process ran it meanwhile
                migration(self.db, self._existing_key)
                self.db.execute(f"PRAGMA user_version = {number}")
            if number == SEALING_VERSION and key_path.exists() and not masterkey.marks_sealed(key_path):
                masterkey.create(key_path, self._existing_key())  # from now on a set-back version is noticed

    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    @property
    def key(self) -> bytes:
        """The master key, shown to open this store; made only for a store that holds nothing sealed."""
        if self._key is None:
            self._key = self._load_key()
        return self._key

    def _existing_key(self) -> bytes:
        return masterkey.existing(self.data_dir / KEY_NAME, self.data_dir / DB_NAME)

    def _load_key(self) -> bytes:
        return masterkey.load(self.db, self.data_dir / KEY_NAME, self.data_dir / DB_NAME)

    def check(self) -> None:
        """Raise StoreError unless the store file is the one opened, the key file still holds the key in
        use, and that key opens the store (for /readyz)."""
        self._check_file(force=True)
        path = self.data_dir / KEY_NAME
        if self._key is not None and masterkey.read(path) != self._key:
            raise StoreError(f"master key {path} was removed or replaced while sealgate ran: the next start "
                             "would be refused; put the key back")
        try:
            canary = self.db.execute("select key_id, nonce, ciphertext from meta where name = 'canary'").fetchone()
        except sqlite3.Error as e:
            raise self._unreadable(e) from None
        if canary is None:
            raise StoreError(f"store {self.data_dir / DB_NAME} has no key check: it was edited or replaced")
        masterkey.open_canary(self.key, canary, self.data_dir / KEY_NAME, self.data_dir / DB_NAME)

    def _check_file(self, *, force: bool = False) -> None:
        """The store file is still the one opened (looked at most once a second: it is on every request)."""
        now = time.monotonic()
        if not force and now - self._file_checked_at < FILE_CHECK_EVERY:
            return
        path = self.data_dir / DB_NAME
        try:
            same = os.stat(path).st_ino == self._inode
        except OSError:
            same = False
        if same:
            self._file_checked_at = now
        else:
            raise StoreError(f"store {path} was replaced or removed while sealgate ran; restart it")

    # secrets ------------------------------------------------------------------------

    def add_secret(self, owner: str, name: str, value: str, origins: list[Origin], *, replace: bool = False) -> None:
        existing = self._row(owner, name)
        if existing and not replace:
            raise StoreError(f"secret {name} of user {owner} exists already; use --replace to change its value")
        env = crypto.seal(self.key, owner, name, value)
        now = time.time()
        row = {
            "owner": owner, "name": name, "key_id": env.key_id, "nonce": env.nonce,
            "ciphertext": env.ciphertext, "origins": json.dumps([str(o) for o in origins]),
            "created_at": existing["created_at"] if existing else now, "updated_at": now,
        }
        self.db["secrets"].upsert({**row, "seal": _secret_seal(self.key, row)}, pk=("owner", "name"))
        _reseal_owner(self.db, self.key, owner)
        self._opened.clear()  # this connection's own writes leave data_version as it is

    def set_origins(self, owner: str, name: str, origins: list[Origin]) -> None:
        row = self._row(owner, name)
        if not row:
            raise StoreError(f"user {owner} has no secret named {name}")
        _verified(self.key, row)
        row = {**row, "origins": json.dumps([str(o) for o in origins]), "updated_at": time.time()}
        self.db["secrets"].update((owner, name), {"origins": row["origins"], "updated_at": row["updated_at"],
                                                  "seal": _secret_seal(self.key, row)})
        _reseal_owner(self.db, self.key, owner)
        self._opened.clear()  # this connection's own writes leave data_version as it is

    def remove_secret(self, owner: str, name: str) -> None:
        if not self._row(owner, name):
            raise StoreError(f"user {owner} has no secret named {name}")
        _verify_owner(self.db, self.key, owner)
        self.db["secrets"].delete((owner, name))
        _reseal_owner(self.db, self.key, owner)
        self._opened.clear()  # this connection's own writes leave data_version as it is

    def list_secrets(self, owner: str) -> list[SecretInfo]:
        try:
            _verify_owner(self.db, self.key, owner)
            rows = self._query("select * from secrets where owner = ? order by name", [owner])
        except sqlite3.Error as e:
            raise self._unreadable(e) from None
        return [_info(_verified(self.key, r)) for r in rows]

    def secrets_for(self, owner: str, names: set[str] | None = None) -> dict[str, Secret]:
        """Decrypt the named secrets of owner (all of them for None); a missing name is simply absent.
        On the request path: what was opened is kept until the store is written (data_version, or here)."""
        if names is not None and not names:
            return {}
        version = self.data_version()
        cache_key = (owner, None if names is None else frozenset(names))
        if (hit := self._opened.get(cache_key)) is not None and hit[0] == version:
            return dict(hit[1])
        found = self._open_secrets(owner, names)
        if len(self._opened) >= OPENED_MAX:
            self._opened.clear()
        self._opened[cache_key] = (version, found)
        return dict(found)

    def _open_secrets(self, owner: str, names: set[str] | None) -> dict[str, Secret]:
        try:
            _verify_owner(self.db, self.key, owner)
            if names is None:
                rows = self._query("select * from secrets where owner = ?", [owner])
            else:
                marks = ",".join("?" * len(names))
                rows = self._query(f"select * from secrets where owner = ? and name in ({marks})",
                                   [owner, *sorted(names)])
            keys = {crypto.key_id(self.key): self.key}
            return {
                r["name"]: Secret(
                    _info(_verified(self.key, r)),
                    crypto.open_envelope(keys, owner, r["name"], crypto.Envelope(r["key_id"], r["nonce"], r["ciphertext"])),
                )
                for r in rows
            }
        except crypto.EnvelopeError as e:
            raise StoreError(str(e)) from None
        except (sqlite3.Error, ValueError, KeyError) as e:
            raise self._unreadable(e) from None

    def data_version(self) -> int:
        """Changes when another connection (the CLI, another sidecar) commits; nearly free to read."""
        self._check_file()
        try:
            return self.db.conn.execute("PRAGMA data_version").fetchone()[0]  # (not through sqlite-utils: every request)
        except sqlite3.Error as e:
            raise self._unreadable(e) from None

    def secrets_signature(self, owner: str) -> tuple:
        """Changes whenever owner's secrets do (added, replaced, removed): cheap, no decryption."""
        try:
            return tuple(self.db.execute(
                "select count(*), max(updated_at), total(rowid) from secrets where owner = ?", [owner]).fetchone())
        except sqlite3.Error as e:
            raise self._unreadable(e) from None

    def _row(self, owner: str, name: str) -> dict | None:
        return next(iter(self._query("select * from secrets where owner = ? and name = ?", [owner, name])), None)

    def _unreadable(self, e: Exception) -> StoreError:
        return StoreError(f"store {self.data_dir / DB_NAME} cannot be read: {e.__class__.__name__}: {e}")

    def _query(self, sql: str, params: list) -> list[dict]:
        """Rows as dicts (sqlite-utils' query: unlike rows_where, a missing table is an error, not no rows)."""
        return list(self.db.query(sql, params))

    # audit --------------------------------------------------------------------------

    def add_audit(self, record: AuditRecord) -> int:
        """Write one decision; its row id, for the status once the response is known. One prepared
        statement: sqlite-utils' insert looks the table up on every call (250 us a row against 93 us)."""
        row = {**record.__dict__, "secrets": ",".join(record.secrets)}
        try:
            return self.db.execute(_AUDIT_INSERT, [row[c] for c in _AUDIT_COLUMNS]).lastrowid
        except (sqlite3.Error, UnicodeError) as e:
            raise StoreError(f"audit trail in {self.data_dir / DB_NAME} cannot be written: {e}") from None

    def set_audit_status(self, row_id: int, status: int) -> None:
        try:
            self.db.execute("update audit set status = ? where id = ?", [status, row_id])
        except sqlite3.Error as e:
            raise StoreError(f"audit trail in {self.data_dir / DB_NAME} cannot be written: {e}") from None

    def audit(self, *, user: str | None = None, runchat: str | None = None, since: float | None = None,
              limit: int = 1000) -> list[AuditRecord]:
        """The newest decisions first, filtered."""
        where, params = ["1 = 1"], []
        for clause, value in (("principal = ?", user), ("runchat = ?", runchat), ("at >= ?", since)):
            if value is not None:
                where.append(clause)
                params.append(value)
        try:
            rows = self._query(f"select * from audit where {' and '.join(where)} order by at desc, id desc limit ?",
                               [*params, limit])
        except sqlite3.Error as e:
            raise self._unreadable(e) from None
        return [AuditRecord(**{**{k: v for k, v in r.items() if k != "id"},
                               "secrets": tuple(filter(None, (r["secrets"] or "").split(",")))}) for r in rows]

    # sessions -----------------------------------------------------------------------

    def add_session(self, record: SessionRecord) -> None:
        self.db["sessions"].insert({**record.__dict__, "seal": _session_seal(self.key, record.__dict__)})

    def session(self, session_id: str) -> SessionRecord | None:
        try:
            row = next(iter(self._query("select * from sessions where id = ?", [session_id])), None)
        except sqlite3.Error as e:
            raise self._unreadable(e) from None
        if row is None:
            return None
        try:
            sealed = crypto.seal_matches(self.key, "session", _session_fields(row), row.get("seal"))
        except (TypeError, ValueError):
            sealed = False
        if not sealed:
            raise StoreError(f"session {session_id} was changed without the master key (its principal, expiry or "
                             "placeholder key do not match their seal); it is refused")
        return SessionRecord(**{k: v for k, v in row.items() if k != "seal"})
