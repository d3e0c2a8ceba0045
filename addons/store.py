"""The encrypted store: secrets and sessions in SQLite, values sealed by `crypto`.

Values go in through `add_secret` and come out only through `secrets_for`, which the
addon calls to fill a request. Listing never decrypts. The master key lives in its own
file (mode 0600) beside the database; it is created on first use.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from . import crypto
from .origins import Origin
from .origins import parse as parse_origin

DB_NAME = "sealgate.db"
KEY_NAME = "master.key"


def _v1_tables(db: sqlite_utils.Database) -> None:
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


def _v2_audit_client(db: sqlite_utils.Database) -> None:
    """audit.client: the worker's address, for refusals that have no session (a bad credential)."""
    if "client" not in db["audit"].columns_dict:
        db["audit"].add_column("client", str)


# Schema migrations, in order: the store's version (PRAGMA user_version) is how many have run.
MIGRATIONS = (_v1_tables, _v2_audit_client)


class StoreError(Exception):
    """The store, its key or a record in it cannot be read or written; says which."""


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


def load_or_create_key(data_dir: Path) -> bytes:
    """The master key, created (0600) on first use; refuses a key file others can read."""
    path = data_dir / KEY_NAME
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(crypto.KEY_BYTES).hex().encode() + b"\n")
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StoreError(f"master key {path} is readable by others (mode {oct(mode & 0o777)}); run chmod 600 on it")
        key = bytes.fromhex(path.read_text().strip())
    except StoreError:
        raise
    except (OSError, ValueError) as e:
        raise StoreError(f"master key {path} cannot be read: {e.__class__.__name__}") from None
    if len(key) != crypto.KEY_BYTES:
        raise StoreError(f"master key {path} is not a {crypto.KEY_BYTES}-byte key")
    return key


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
        for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.db.conn:
                self.db.execute("BEGIN IMMEDIATE")
                if self.db.execute("PRAGMA user_version").fetchone()[0] >= number:
                    continue  # another process ran it meanwhile
                migration(self.db)
                self.db.execute(f"PRAGMA user_version = {number}")

    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = load_or_create_key(self.data_dir)
        return self._key

    # secrets ------------------------------------------------------------------------

    def add_secret(self, owner: str, name: str, value: str, origins: list[Origin], *, replace: bool = False) -> None:
        existing = self._row(owner, name)
        if existing and not replace:
            raise StoreError(f"secret {name} of user {owner} exists already; use --replace to change its value")
        env = crypto.seal(self.key, owner, name, value)
        now = time.time()
        self.db["secrets"].upsert(
            {
                "owner": owner, "name": name, "key_id": env.key_id, "nonce": env.nonce,
                "ciphertext": env.ciphertext, "origins": json.dumps([str(o) for o in origins]),
                "created_at": existing["created_at"] if existing else now, "updated_at": now,
            },
            pk=("owner", "name"),
        )

    def set_origins(self, owner: str, name: str, origins: list[Origin]) -> None:
        if not self._row(owner, name):
            raise StoreError(f"user {owner} has no secret named {name}")
        self.db["secrets"].update(
            (owner, name), {"origins": json.dumps([str(o) for o in origins]), "updated_at": time.time()}
        )

    def remove_secret(self, owner: str, name: str) -> None:
        if not self._row(owner, name):
            raise StoreError(f"user {owner} has no secret named {name}")
        self.db["secrets"].delete((owner, name))

    def list_secrets(self, owner: str) -> list[SecretInfo]:
        try:
            rows = self._query("select * from secrets where owner = ? order by name", [owner])
        except sqlite3.Error as e:
            raise self._unreadable(e) from None
        return [self._info(r) for r in rows]

    def secrets_for(self, owner: str, names: set[str] | None = None) -> dict[str, Secret]:
        """Decrypt the named secrets of owner (all of them for None); a missing name is simply absent."""
        if names is not None and not names:
            return {}
        try:
            if names is None:
                rows = self._query("select * from secrets where owner = ?", [owner])
            else:
                marks = ",".join("?" * len(names))
                rows = self._query(f"select * from secrets where owner = ? and name in ({marks})",
                                   [owner, *sorted(names)])
            keys = {crypto.key_id(self.key): self.key}
            return {
                r["name"]: Secret(
                    self._info(r),
                    crypto.open_envelope(keys, owner, r["name"], crypto.Envelope(r["key_id"], r["nonce"], r["ciphertext"])),
                )
                for r in rows
            }
        except crypto.EnvelopeError as e:
            raise StoreError(str(e)) from None
        except (sqlite3.Error, ValueError, KeyError) as e:
            raise self._unreadable(e) from None

    def data_version(self) -> int:
        """Changes when another connection (the CLI, another sidecar) commits: nearly free to read."""
        try:
            return self.db.execute("PRAGMA data_version").fetchone()[0]
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

    @staticmethod
    def _info(row: dict) -> SecretInfo:
        return SecretInfo(row["owner"], row["name"], _origins(row["origins"]), row["created_at"], row["updated_at"])

    # audit --------------------------------------------------------------------------

    def add_audit(self, record: AuditRecord) -> int:
        """Write one decision; its row id, for the status once the response is known.

        On the request path, so one prepared statement: sqlite-utils' insert looks the table up
        on every call (measured: 250 us a row against 93 us)."""
        row = {**record.__dict__, "secrets": ",".join(record.secrets)}
        try:
            return self.db.execute(_AUDIT_INSERT, [row[c] for c in _AUDIT_COLUMNS]).lastrowid
        except sqlite3.Error as e:
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
        self.db["sessions"].insert(record.__dict__)

    def session(self, session_id: str) -> SessionRecord | None:
        try:
            row = next(iter(self._query("select * from sessions where id = ?", [session_id])), None)
        except sqlite3.Error as e:
            raise self._unreadable(e) from None
        return SessionRecord(**row) if row else None
