"""Red team, session 15: the speed changes since 69f0c4a (the SQLite version read from the -shm file's
WAL-index header, the joined scan of a response head, lean hooks, gc.freeze, whole_lines).

1. SqliteBackend.version() mapped the -shm file by opening it and closing the descriptor at once. Closing
   any descriptor of a file drops every POSIX lock the process holds on it (SQLite's "How To Corrupt An
   SQLite Database File", 2.2): SQLite's own lock on the -shm file, which tells a process opening the store
   that the WAL-index is in use, went with it. Every process that opened the store afterwards (each `sealgate
   session issue`, `session revoke`...) then took itself for the first, truncated the WAL-index and rebuilt it
   under the proxy's live connection.
2. A response's reason phrase was scanned as mitmproxy's Latin-1 decoding of it re-encoded as UTF-8, not as
   the bytes the worker receives: a value with a character beyond ASCII, echoed in the reason phrase, reached
   the worker whole (the joined scan kept the mistake of the per-field one).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time

import pytest
from mitmproxy.net.http.http1 import assemble
from mitmproxy.test import tflow, tutils
from sealgate.scrub import Scrubber
from sealgate.scrubbing import scrub_head
from sealgate.sql import SqliteBackend

DMS = 128  # SQLite's unix VFS: the byte of the -shm file every connection holds a read lock on while open
_FLOCK = "hhqqi4x"  # struct flock on Linux (x86-64, aarch64)

_PROBE = r'''
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
got = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(sys.argv[3], fcntl.F_WRLCK, os.SEEK_SET, int(sys.argv[2]), 1, 0))
print("locked" if struct.unpack(sys.argv[3], got)[0] != fcntl.F_UNLCK else "free")
'''

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="struct flock as Linux lays it out")


def _store(tmp_path) -> SqliteBackend:
    b = SqliteBackend(tmp_path / "s.db")
    with b.write() as tx:
        tx.one("create table t (a)")
        tx.one("insert into t values (1)")
    return b


def _wal_index_in_use(tmp_path) -> bool:
    """What a process opening the store asks (another process: F_GETLK does not report the asker's own locks):
    whether some process holds the lock that says the WAL-index is in use."""
    out = subprocess.run([sys.executable, "-c", _PROBE, f"{tmp_path / 's.db'}-shm", str(DMS), _FLOCK],
                         capture_output=True, text=True, check=True).stdout.strip()
    return out == "locked"


def _read_in_another_process(tmp_path) -> None:
    script = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
              "assert c.execute('select count(*) from t').fetchone() == (1,)")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "s.db")], check=True)


@linux_only
def test_the_version_keeps_sqlite_s_lock_on_the_wal_index(tmp_path):
    b = _store(tmp_path)
    assert _wal_index_in_use(tmp_path)
    for _ in range(3):
        b.version()
        assert _wal_index_in_use(tmp_path), "version() dropped SQLite's lock on the -shm file"


def test_a_process_that_only_reads_the_store_leaves_its_wal_index_and_the_version_alone(tmp_path):
    b = _store(tmp_path)
    v = b.version()
    _read_in_another_process(tmp_path)  # (with the lock gone: it rebuilt the WAL-index, the version moved)
    _read_in_another_process(tmp_path)
    assert b.version() == v


@linux_only
def test_a_backend_closed_or_dropped_leaves_the_lock_of_another_on_the_same_store(tmp_path):
    b = _store(tmp_path)
    b.version()
    other = SqliteBackend(tmp_path / "s.db")
    other.version()
    other.close()
    assert _wal_index_in_use(tmp_path)
    dropped = SqliteBackend(tmp_path / "s.db")
    dropped.version()
    del dropped
    assert _wal_index_in_use(tmp_path)
    v = b.version()
    _read_in_another_process(tmp_path)
    assert b.version() == v
    with b.write() as tx:  # and the backend still sees writes, its own and others'
        tx.one("insert into t values (2)")
    assert b.version() != v
    v = b.version()
    script = ("import sqlite3, sys; "
              "sqlite3.connect(sys.argv[1], isolation_level=None).execute('delete from t where a = 2')")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "s.db")], check=True)
    assert b.version() != v


def test_a_closed_backend_maps_nothing_again(tmp_path):
    b = _store(tmp_path)
    b.version()
    other = SqliteBackend(tmp_path / "s.db")  # (keeps the -shm file there)
    other.version()
    b.close()
    with pytest.raises(Exception):  # noqa: B017 - a closed backend refuses; what it must not do is map again
        b.version()
    assert b._shm is None and b._held == []
    assert other.version() == other.version()


def test_a_value_beyond_ascii_echoed_in_the_reason_phrase_is_scrubbed_as_the_worker_gets_it():
    value = f"pässwört-{secrets.token_urlsafe(18)}"
    scrubber = Scrubber()
    scrubber.add_values([(value, "sg.s.K.mac")])
    flow = tflow.tflow(resp=tutils.tresp())
    flow.response.data.reason = b"caf\xe9 echo " + value.encode() + b" \xff"  # as the upstream sent it
    scrub_head(scrubber, flow.response)
    head = assemble.assemble_response_head(flow.response)
    assert value.encode() not in head
    assert flow.response.data.reason == b"caf\xe9 echo sg.s.K.mac \xff"  # the rest byte for byte


def test_an_ascii_value_in_a_reason_phrase_with_latin1_bytes_is_scrubbed_and_the_bytes_kept():
    value = f"sk-{secrets.token_urlsafe(20)}"
    scrubber = Scrubber()
    scrubber.add_values([(value, "sg.s.K.mac")])
    flow = tflow.tflow(resp=tutils.tresp())
    flow.response.data.reason = b"\xe9\xff " + value.encode()
    scrub_head(scrubber, flow.response)
    assert flow.response.data.reason == b"\xe9\xff sg.s.K.mac"


_READER = r'''
import sys, time
from sealgate.sql import SqliteBackend
b = SqliteBackend(__import__("pathlib").Path(sys.argv[1]))
b.conn.execute("PRAGMA wal_autocheckpoint=0")  # the rows stay in the WAL: every read looks them up in its index
with b.write() as tx:
    tx.one("create table r (a integer, pad blob)")
    for _ in range(3000):
        tx.one("insert into r values (0, zeroblob(200))")
with b.write() as tx:
    tx.one("update r set a = 1")
b.version()
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    b.version()
    with b.read() as tx:
        assert tx.one("select sum(a), count(*) from r") == (3000, 3000)
print("done", flush=True)
'''


@pytest.mark.e2e
def test_a_proxy_reading_its_store_survives_other_processes_opening_it(tmp_path):
    """What the lost lock did: each process opening the store truncated the -shm file under the reader, which
    died of SIGBUS (or read a half-built index) within a minute or so of `session issue`s."""
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(tmp_path / "r.db"), "25"], stdout=subprocess.PIPE,
                              text=True)
    assert reader.stdout.readline().strip() == "ready"
    opener = "import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('select 1 from sqlite_master').fetchall()"
    stop = time.monotonic() + 25

    def open_again_and_again() -> None:
        while time.monotonic() < stop and reader.poll() is None:
            subprocess.run([sys.executable, "-c", opener, str(tmp_path / "r.db")], check=False)

    threads = [threading.Thread(target=open_again_and_again) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        out, _ = reader.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        reader.kill()
        pytest.fail("the reader hung")
    assert reader.returncode == 0 and "done" in out, f"the reader died (exit {reader.returncode})"


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_wal_index_removed_or_replaced_under_the_store_fails_closed(tmp_path, monkeypatch, how):
    """SQLite's connection keeps the -shm file it opened: once it is removed or replaced, the other processes'
    commits go to another WAL-index, which this connection never reads (a session revoked by `sealgate session
    revoke` stayed valid until a restart, before and after the header check). As for the store file replaced:
    refused until sealgate restarts."""
    from sealgate import sql
    from sealgate.errors import StoreError

    monkeypatch.setattr(sql, "FILE_CHECK_EVERY", 0.0)
    b = _store(tmp_path)
    b.version()
    shm = f"{tmp_path / 's.db'}-shm"
    if how == "removed":
        os.unlink(shm)
    else:
        with open(f"{shm}.new", "wb") as f:
            f.write(bytes(32768))
        os.replace(f"{shm}.new", shm)
    script = "import sqlite3, sys; sqlite3.connect(sys.argv[1], isolation_level=None).execute('delete from t')"
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "s.db")], check=True)
    with pytest.raises(StoreError, match="restart"):
        b.version()
    with pytest.raises(StoreError, match="restart"):
        b.check()
    with pytest.raises(StoreError, match="restart"):
        b.version()  # and stays refused
