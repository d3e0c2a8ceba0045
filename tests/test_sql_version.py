"""SqliteBackend.version(), the change signal every cache on the request path is keyed by: it changes with
every commit of any other connection or process (a revoked session, a narrowed origin: seen on the next
request), stays put for this process's own audit rows, moves for its own writes, and costs no SQL statement
while nothing was committed (it is read on every request)."""

from __future__ import annotations

import secrets
import sqlite3
import subprocess
import sys

import pytest

from sealgate.sql import SqliteBackend


def backend(tmp_path) -> SqliteBackend:
    b = SqliteBackend(tmp_path / "s.db")
    with b.write() as tx:
        tx.one("create table t (a)")
    return b


def test_every_commit_of_another_connection_changes_the_version(tmp_path):
    b = backend(tmp_path)
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    for i in range(300):
        before = b.version()
        assert b.version() == before
        other.execute("insert into t values (?)", (i,))
        assert b.version() != before, f"commit {i} was not seen"
        if i % 50 == 49:  # a checkpoint restarts the log: the next commits are seen all the same
            other.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_a_commit_of_another_process_changes_the_version(tmp_path):
    b = backend(tmp_path)
    script = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
              "c.execute('insert into t values (1)')")
    for _ in range(3):
        before = b.version()
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "s.db")], check=True)
        assert b.version() != before


def test_own_audit_rows_keep_the_version_and_own_writes_move_it(tmp_path):
    b = backend(tmp_path)
    v = b.version()
    with b.batch() as tx:  # the audit queue's rows: no cache holds them
        tx.one("insert into t values (1)")
    assert b.version() == v
    with b.write() as tx:
        tx.one("insert into t values (2)")
    assert b.version() != v


def test_while_nothing_is_committed_the_version_costs_no_statement(tmp_path):
    b = backend(tmp_path)
    b.version()
    ran: list[str] = []
    b.conn.set_trace_callback(ran.append)
    for _ in range(100):
        b.version()
    assert ran == []
    sqlite3.connect(tmp_path / "s.db", isolation_level=None).execute("insert into t values (1)")
    b.version()
    assert ran == ["PRAGMA data_version"]  # a commit: looked at once, then quiet again
    b.version()
    assert ran == ["PRAGMA data_version"]


# -- on a store as sealgate makes it: what moves the version, and what does not --------------------------


def _store(tmp_path):
    from sealgate.store import SecretStore
    return SecretStore(tmp_path / "data")


def _other_process(db, *statements: str) -> None:
    """Statements committed by another process, one transaction each (as another proxy process's audit batch,
    usage count or CLI write)."""
    script = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "for s in sys.argv[2:]: c.execute(s)")
    subprocess.run([sys.executable, "-c", script, str(db), *statements], check=True)


def test_another_process_s_audit_rows_and_usage_counts_leave_the_version(tmp_path):
    # --workers N: each process's audit batches (some 50 a second) emptied every other process's caches
    s = _store(tmp_path)
    db = s.backend.path
    v = s.version()
    _other_process(db, "insert into audit (at, principal, decision) values (1, 'p', 'allow')",
                   "update audit set status = 200", "insert into secret_usage values ('p', 'K', 'cap', 0, 1)",
                   "update secret_usage set count = count + 1", "delete from audit")
    assert s.version() == v


@pytest.mark.parametrize("statement", [
    "insert into sessions (id, principal) values ('x', 'p')",  # a session issued by the CLI
    "update secrets set origins = '[]' where owner = 'alice'",  # a narrowed scope
    "delete from sessions",  # revoked
])
def test_another_process_s_writes_to_a_cached_table_move_the_version(tmp_path, statement):
    from sealgate import origins
    s = _store(tmp_path)
    s.add_secret("alice", "K", "v-" + secrets.token_hex(8), [origins.parse("https://api.example")])
    _other_process(s.backend.path, "insert into sessions (id, principal) values ('y', 'p')")
    v = s.version()
    _other_process(s.backend.path, statement)
    assert s.version() != v


def test_every_row_written_to_a_watched_table_moves_the_version_whoever_writes_it(tmp_path):
    """Straight to the file, as someone without sealgate would (a tampered row is read again, and refused)."""
    from sealgate import schema
    s = _store(tmp_path)
    con = sqlite3.connect(s.backend.path, isolation_level=None)
    tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
    watched = sorted(tables - schema.UNWATCHED - {"changes"})
    assert {"secrets", "sessions", "links", "data_keys", "meta", "owners", "api_tokens"} <= set(watched)
    for table in watched:
        columns = [r[1] for r in con.execute(f"PRAGMA table_info([{table}])")]
        for statement in (f"insert into [{table}] ([{columns[0]}]) values ('zz-{table}')",
                          f"update [{table}] set [{columns[0]}] = 'zy-{table}' where [{columns[0]}] = 'zz-{table}'",
                          f"delete from [{table}] where [{columns[0]}] = 'zy-{table}'"):
            v = s.version()
            con.execute(statement)
            assert s.version() != v, f"{statement!r} left the version as it was"


def test_a_table_a_later_migration_adds_is_watched_or_named_unwatched(tmp_path):
    """Every table but the ones written on every request is watched (`sql.watch`): a migration that adds one
    and forgets it would leave caches stale across processes."""
    from sealgate import schema
    s = _store(tmp_path)
    con = sqlite3.connect(s.backend.path)
    tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")} - {"changes"}
    triggers = {r[0] for r in con.execute("select tbl_name from sqlite_master where type = 'trigger'")}
    assert tables - schema.UNWATCHED == triggers
    assert schema.UNWATCHED <= tables  # (a name there that is no table would hide nothing, but says wrong)


def test_a_table_dropped_or_altered_moves_the_version(tmp_path):
    """Schema changes fire no trigger: a store whose secrets table is gone must be read again (and fail)."""
    s = _store(tmp_path)
    for statement in ("alter table links add column extra TEXT", "drop table link_states", "drop table changes"):
        v = s.version()
        _other_process(s.backend.path, statement)
        assert s.version() != v, statement


def test_a_backend_let_go_by_the_garbage_collector_while_another_maps_its_shm_file_does_not_deadlock(
        tmp_path, monkeypatch):
    """Seen in CI: a SqliteBackend dropped without close() (in a reference cycle) is let go by its finalizer
    whenever the collector runs, on any allocation: once, inside another backend's _hold_shm, which held the
    module's lock that the finalizer then waited for, in the same thread: the test run hung. The collector runs
    here under that lock (as a new _ShmFile is made)."""
    import gc
    import threading

    from sealgate import sql

    dropped = SqliteBackend(tmp_path / "a.db")
    store = dropped._store
    with dropped.batch() as tx:
        tx.one("create table t (x)")
    assert dropped.version() is not None  # (its -shm file is held)
    dropped.cycle = dropped  # freed by the collector only
    del dropped

    class Collecting(sql._ShmFile):
        __slots__ = ()

        def __init__(self) -> None:
            gc.collect()
            super().__init__()

    monkeypatch.setattr(sql, "_ShmFile", Collecting)
    done = threading.Event()

    def open_other() -> None:
        other = SqliteBackend(tmp_path / "b.db")
        with other.batch() as tx:
            tx.one("create table t (x)")
        other.version()
        other.close()
        done.set()

    threading.Thread(target=open_other, daemon=True).start()
    assert done.wait(10), "opening a store deadlocked on the -shm files' lock"
    assert store not in sql._SHM_FILES and not sql._LET_GO  # (let go of, once the lock was free)


def test_mapping_the_shm_file_of_a_store_closed_meanwhile_finds_nothing_and_raises_nothing(tmp_path):
    """version() of one thread may map the -shm file (`_hold_shm`) as another thread closes the backend, its
    store's last user: the entry is gone by then; nothing is mapped, and no KeyError reaches the request."""
    from sealgate import sql

    b = SqliteBackend(tmp_path / "s.db")
    with b.batch() as tx:
        tx.one("create table t (x)")
    del tx
    store = b._store
    b.close()
    assert store not in sql._SHM_FILES
    assert sql._hold_shm(f"{tmp_path / 's.db'}-shm", store, []) is None
