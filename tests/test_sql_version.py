"""SqliteBackend.version(), the change signal every cache on the request path is keyed by: it changes with
every commit of any other connection or process (a revoked session, a narrowed origin: seen on the next
request), stays put for this process's own audit rows, moves for its own writes, and costs no SQL statement
while nothing was committed (it is read on every request)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

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
