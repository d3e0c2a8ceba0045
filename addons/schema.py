"""The store's schema: versioned migrations, the same on SQLite and PostgreSQL (but v8, SQLite's change
counter), each in its own transaction; the version is how many have run. A store from a newer sealgate, or one whose version
was set back below the sealing migration, is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import crypto, keys, seals
from .errors import StoreError
from .sql import TYPES, UNWATCHED, Backend, Tx, watch

KeyLoader = Callable[[], bytes]


@dataclass(frozen=True)
class Step:
    """What a migration works with: its transaction, the engine's column types, the key (loaded only
    when rows must be sealed) and the columns a table has."""

    tx: Tx
    t: dict[str, str]
    key: KeyLoader
    backend: Backend

    def columns(self, table: str) -> set[str]:
        return self.backend.columns(self.tx, table)


def _v1_tables(m: Step) -> None:
    """secrets, audit and sessions, as the first release made them (before versions were kept)."""
    m.tx.one(f"""create table if not exists secrets (owner TEXT, name TEXT, key_id TEXT, nonce {m.t['blob']},
               ciphertext {m.t['blob']}, origins TEXT, created_at {m.t['real']}, updated_at {m.t['real']},
               PRIMARY KEY (owner, name))""")
    m.tx.one(f"""create table if not exists audit (id {m.t['serial']}, at {m.t['real']}, session TEXT, runchat TEXT,
               instance TEXT, principal TEXT, secrets TEXT, method TEXT, origin TEXT, path TEXT, decision TEXT,
               code TEXT, status INTEGER)""")
    m.tx.one("create index if not exists idx_audit_principal_at on audit (principal, at)")
    m.tx.one("create index if not exists idx_audit_runchat_at on audit (runchat, at)")
    m.tx.one(f"""create table if not exists sessions (id TEXT PRIMARY KEY, credential_hash TEXT, mac_key {m.t['blob']},
               access TEXT, runchat TEXT, instance TEXT, principal TEXT, created_at {m.t['real']},
               expires_at {m.t['real']})""")


def _v2_audit_client(m: Step) -> None:
    """audit.client: the worker's address, for refusals that have no session (a bad credential)."""
    if "client" not in m.columns("audit"):
        m.tx.one("alter table audit add column client TEXT")


def _v3_row_seals(m: Step) -> None:
    """Seal every row's deciding fields under the master key, and keep a key check (the canary).

    Rows written before this version are sealed here, once, after the key is shown to open
    every secret: an old store needs its key to upgrade."""
    for table in ("secrets", "sessions"):
        if "seal" not in m.columns(table):
            m.tx.one(f"alter table {table} add column seal TEXT")
    m.tx.one(f"create table if not exists meta (name TEXT PRIMARY KEY, key_id TEXT, nonce {m.t['blob']}, "
           f"ciphertext {m.t['blob']})")
    m.tx.one("create table if not exists owners (owner TEXT PRIMARY KEY, seal TEXT)")
    secret_rows = m.tx.rows("select * from secrets")
    session_rows = m.tx.rows("select * from sessions")
    if not secret_rows and not session_rows:
        return  # an empty store: the canary is written with the key, when it is made
    k = m.key()
    for row in secret_rows:
        try:
            crypto.open_envelope({crypto.key_id(k): k}, row["owner"], row["name"],
                                 crypto.Envelope(row["key_id"], row["nonce"], row["ciphertext"]))
        except crypto.EnvelopeError as e:
            raise StoreError(f"the store cannot be upgraded: {e}") from None
        m.tx.one("update secrets set seal = ? where owner = ? and name = ?",
               [seals.secret_seal(k, row), row["owner"], row["name"]])
    # sessions are not sealed as found (nothing shows who wrote them): they end; workers get new ones
    m.tx.one("delete from sessions")
    for owner in sorted({r["owner"] for r in secret_rows}):
        seals.reseal_owner(m.tx, k, owner, links=False)
    c = keys.canary_row(k)
    m.tx.one("insert into meta (name, key_id, nonce, ciphertext) values (?, ?, ?, ?)",
           [c["name"], c["key_id"], c["nonce"], c["ciphertext"]])


def _v4_data_keys(m: Step) -> None:
    """data_keys: the keys values are sealed under, each wrapped by the master key (rotation)."""
    m.tx.one(f"create table if not exists data_keys (key_id TEXT PRIMARY KEY, nonce {m.t['blob']}, "
           f"wrapped {m.t['blob']}, created_at {m.t['real']})")


def _v5_api_tokens(m: Step) -> None:
    """api_tokens: the platform API's bearer tokens, as hashes, their scopes sealed."""
    m.tx.one(f"create table if not exists api_tokens (name TEXT PRIMARY KEY, token_hash TEXT UNIQUE, scopes TEXT, "
             f"created_at {m.t['real']}, seal TEXT)")


def _v6_secret_scope(m: Step) -> None:
    """secrets.policy: a secret's scope beyond its origins (methods, paths, where, what a disallowed request
    gets), sealed with the row when set (a row without one keeps its seal)."""
    if "policy" not in m.columns("secrets"):
        m.tx.one("alter table secrets add column policy TEXT")
    # requests counted against each secret's cap and rate, per fixed window: shared by every node on the store
    m.tx.one(f"create table if not exists secret_usage (owner TEXT, name TEXT, kind TEXT, start {m.t['real']}, "
             "count INTEGER, PRIMARY KEY (owner, name, kind))")


def _v7_links(m: Step) -> None:
    """links: each user's OAuth tokens per provider, sealed like values; link_states: linkings begun
    (`link start`) and not finished yet, their PKCE verifiers sealed."""
    m.tx.one(f"create table if not exists links (owner TEXT, provider TEXT, key_id TEXT, nonce {m.t['blob']}, "
             f"ciphertext {m.t['blob']}, expires_at {m.t['real']}, status TEXT, detail TEXT, "
             f"created_at {m.t['real']}, updated_at {m.t['real']}, lease_until {m.t['real']}, seal TEXT, "
             "PRIMARY KEY (owner, provider))")
    m.tx.one(f"create table if not exists link_states (state TEXT PRIMARY KEY, owner TEXT, provider TEXT, "
             f"redirect_uri TEXT, key_id TEXT, nonce {m.t['blob']}, ciphertext {m.t['blob']}, "
             f"expires_at {m.t['real']}, seal TEXT)")


def _v8_changes(m: Step) -> None:
    """SQLite: `changes`, one number that a trigger on every table a cache reads moves with every row written,
    by any connection or process (the cache version, `sql.SqliteBackend.version`). SQLite's own data_version
    moves with every commit, audit rows and usage counts too: with N proxy processes on one store each one's
    caches were emptied by every other's audit batch, some 50 times a second each. PostgreSQL has no need:
    only `write()` notifies there."""
    if m.backend.dialect != "sqlite":
        return
    m.tx.one("create table if not exists changes (n INTEGER NOT NULL)")
    if m.tx.one("select count(*) from changes")[0] == 0:
        m.tx.one("insert into changes (n) values (0)")
    for table in sorted(t for t in m.backend.tables(m.tx) - UNWATCHED - {"changes"} if not t.startswith("sqlite_")):
        watch(m.tx, table)


MIGRATIONS = (_v1_tables, _v2_audit_client, _v3_row_seals, _v4_data_keys, _v5_api_tokens, _v6_secret_scope,
              _v7_links, _v8_changes)
SEALING_VERSION = 3  # from this version on rows are sealed; the key source then says so


def migrate(backend: Backend, source: keys.KeySource, existing_key: KeyLoader) -> None:
    """Bring the schema up to date, one migration at a time, each in a transaction (another node
    migrating at the same moment waits, then finds the work done). A database with no tables at all is
    new (a restore's target, say), whatever the key source says."""
    with backend.read() as tx:
        version = backend.schema_version(tx)
        tables = backend.tables(tx)
    if version > len(MIGRATIONS):
        raise StoreError(f"store {backend.where} has schema version {version}, newer than this "
                         f"sealgate knows ({len(MIGRATIONS)}); upgrade sealgate")
    if version < SEALING_VERSION and tables and (not source.may_seal_old_rows() or "meta" in tables):
        raise StoreError(f"store {backend.where} claims schema version {version}, but its rows were "
                         "sealed already: the version was set back without the key; refusing it (a store from before row "
                         "seals is upgraded once with its own key file)")
    types = TYPES[backend.dialect]
    for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
        with backend.write() as tx:
            if backend.schema_version(tx) >= number:
                continue  # another process ran it meanwhile
            migration(Step(tx, types, existing_key, backend))
            backend.set_schema_version(tx, number)
        if number == SEALING_VERSION and (key := source.read()) is not None:
            source.mark_sealed(key)  # from now on a set-back version is noticed
