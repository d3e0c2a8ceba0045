"""Red team (final, round 17) of four fresh changes: placeholders.find's dot-first search, the scanner's
two-hash word filter and its small-table threshold, and the SQLite -shm let-go queued past a held lock.

Findings are failing tests; the rest are cheap probes of what held."""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import threading
import time

import pytest
from sealgate import placeholders, scrub, sql
from sealgate.sql import SqliteBackend
from upstream import RawUpstream, raw_response
from wire import read_all, tunnel

KEY = os.urandom(32)
SID = "abcdefghijklmnop"


# --- 1. placeholders.find: a dot first, then `sg.` from two bytes before it -------------------------------------

def test_find_equals_the_grammar_around_dots_for_bytes_and_bytearray():
    """Placeholders whose first dot is or is not the one after `sg`, dots 0-2 bytes before one, `sg.` split by
    other pieces, non-ASCII bytes: find gives exactly what PATTERN.finditer does (bytes and bytearray)."""
    phs = [placeholders.mint(KEY, SID, n).encode() for n in ("A", "B_2", "X" * 64)]
    pieces = [b".", b"..", b"s", b"g", b"sg", b"sg.", b"g.", b".sg.", b"\xff.", b"\xe2\x80.", b"s\x00g.",
              *phs, *(p[:-1] for p in phs), *(p[1:] for p in phs)]
    rng = random.Random(17)
    for _ in range(20000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 8)))
        expected = [(m.start(), m.end()) for m in placeholders.PATTERN.finditer(data)]
        for d in (data, bytearray(data)):
            assert [(f.start, f.end) for f in placeholders.find(d)] == expected, data


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.e2e
def test_streamed_upload_cut_at_every_byte_around_the_dots_of_placeholders_is_filled(proxy, pki, user, value):
    """A chunked body over 1 MiB, full of dots, with placeholders each cut by a chunk boundary at another
    byte around `sg.` and its other dots (and right after a lone dot): upstream gets every value, no
    placeholder left."""
    up = RawUpstream(pki, lambda head, body, sock: raw_response(b"ok"))
    proxy.add_secret(user, "K", value, up.origin)
    s = proxy.issue(user=user)
    ph = s["env"]["K"].encode()
    target = f"127.0.0.1:{up.port}"
    filler = (b"a.b..c...d " * 12000)  # some 130 KB of dots
    body, cuts = bytearray(), []
    dots = [0, 1, 2, 3, ph.index(b".", 3), ph.rindex(b".")]
    for k, at in enumerate(dots + [d + 1 for d in dots] + [d - 1 for d in dots[1:]]):
        body += filler[: 1000 + 7919 * k % 50000] + b"." * (k % 3)
        cuts.append(len(body) + at)
        body += ph
    body += filler * 8
    assert len(body) > 1 << 20
    t = tunnel(s, proxy.port, target, None)
    t.sendall(f"POST /up HTTP/1.1\r\nHost: {target}\r\nTransfer-Encoding: chunked\r\n"
              f"Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n".encode())
    pos = 0
    for cut in cuts + [len(body)]:
        t.sendall(_chunk(bytes(body[pos:cut])))
        time.sleep(0.01)
        pos = cut
    t.sendall(b"0\r\n\r\n")
    out = read_all(t, 30)
    assert out.startswith(b"HTTP/1.1 200")
    got = up.received[-1][1]
    filled = got == bytes(body).replace(ph, value.encode())
    assert filled, "a placeholder cut at a dot was not filled, or something else changed"


# --- 2. the word filter: around 8 KiB / 32 KiB with tables just below and above 4096 words ----------------------

def test_scrubbing_around_the_word_filters_thresholds_equals_the_full_regex():
    """29 values of 60 characters make some 4060 words (looked up one by one up to 32 KiB), 31 some 4320 (numpy
    from 8 KiB): bodies of noise and forms of the values right around both thresholds, whole and streamed at
    random cuts, scrub exactly as the one regex finds."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_scrub import new_value, noise, reference, run_stream, scrubber
    seen = set()
    for n in (29, 31):
        rng = random.Random(n)
        values = [new_value(60, rng) for _ in range(n)]
        s = scrubber(*values)
        seen.add(len(s._matcher.words) <= scrub._SMALL_TABLE)
        for size in (8191, 8192, 8200, 32767, 32768, 32776):
            parts: list[bytes] = []
            while sum(map(len, parts)) < size:
                parts.append(noise(rng, values))
            data = b"".join(parts)[-size:]
            same = s.matches(data) == reference(s, data)
            cuts = [rng.randrange(size + 1) for _ in range(rng.randrange(1, 10))]
            streamed = run_stream(s, data, cuts) == s.scrub(data)
            assert same and streamed, f"{n} values, {size} bytes: the word filter lost a match"
    assert seen == {True, False}, "the tables did not straddle _SMALL_TABLE"


# --- 3. the -shm let-go -----------------------------------------------------------------------------------------

_DMS_HELD = r'''
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
r = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 128, 1, 0))
print(struct.unpack("hhqqi", r)[0] != fcntl.F_UNLCK)
'''


def _dms_held(path) -> bool:
    """Whether some process holds SQLite's lock on the -shm file's DMS byte (128): the lock that tells a
    process opening the store that the WAL-index is in use (else it truncates and rebuilds it)."""
    out = subprocess.run([sys.executable, "-c", _DMS_HELD, str(path)], capture_output=True, text=True, timeout=30,
                         check=False)
    return out.stdout.strip() == "True"


def test_a_backend_closed_while_another_of_its_store_opens_leaves_the_other_its_sqlite_locks(tmp_path, monkeypatch):
    """Thread 1 closes backend A of a store while thread 2 opens backend B of the same store: B's connection has
    opened the -shm file (SQLite shares one lock state a process for it, with A's), B has not yet held it
    (`_hold_shm`): A's let-go finds itself the last user and closes its descriptor of the file, which drops
    every POSIX lock of the process on it, B's connection's DMS lock among them. The _ShmFile docstring's
    very case: the next process to open the store takes itself for the first and rebuilds the WAL-index
    under B. (The interleaving is made here by running A.close() where thread 1 would have.)"""
    path = tmp_path / "s.db"
    a = SqliteBackend(path)
    with a.batch() as tx:
        tx.one("create table t (x)")
    a.version()
    assert _dms_held(f"{path}-shm")
    real = sql._hold_shm

    def interleaved(*args):
        if not a._closed:
            a.close()  # thread 1, between B's connect and B's _hold_shm
        return real(*args)

    monkeypatch.setattr(sql, "_hold_shm", interleaved)
    b = SqliteBackend(path)
    monkeypatch.setattr(sql, "_hold_shm", real)
    try:
        with b.read() as tx:
            tx.one("select count(*) from t")
        assert _dms_held(f"{path}-shm"), "B's connection is open but its locks on the -shm file were dropped"
    finally:
        b.close()


def test_a_let_go_left_queued_does_not_drop_the_locks_of_the_next_backend_of_its_store(tmp_path):
    """A backend dropped without close() while another thread holds the -shm lock is queued (`_LET_GO`); if
    the holder is past its last `_release_let_go` (between it and the release), the entry stays until the
    next `_hold_shm`: that of the next backend of the same store, after its connection opened the -shm file
    (kept, same inode, by another process's connection). Releasing the old entry then closes the old
    descriptor of that very file and drops the new connection's locks. (The holder is played by the test.)"""
    path = tmp_path / "s.db"
    a = SqliteBackend(path)
    with a.batch() as tx:
        tx.one("create table t (x)")
    del tx  # (a Tx holds the connection)
    holder = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
              "c.execute('select count(*) from t').fetchone(); print('ok', flush=True); sys.stdin.read()")
    other = subprocess.Popen([sys.executable, "-c", holder, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    b = None
    try:
        assert other.stdout.readline().strip() == b"ok"  # another process keeps the -shm file (its inode)
        a.version()
        inode = os.stat(f"{path}-shm").st_ino
        with sql._SHM_LOCK:  # another thread's _hold_shm, past its last _release_let_go
            a.cycle = a
            del a
            gc.collect()  # A's finalizer: queued, the lock being held
        assert sql._LET_GO, "(the let-go was not queued)"
        b = SqliteBackend(path)
        assert os.stat(f"{path}-shm").st_ino == inode
        other.stdin.close()
        other.wait(10)  # (its lock on the DMS byte gone: only this process's remain)
        assert _dms_held(f"{path}-shm"), "B's connection is open but a late let-go dropped its -shm locks"
    finally:
        if other.poll() is None:
            other.kill()
        if b is not None:
            b.close()


def test_backends_opened_and_dropped_across_threads_while_collecting_leak_no_shm_descriptor(tmp_path):
    """Four threads open backends of one store (and each of its own), close a third and drop the rest in
    cycles, while a fifth collects in a loop: no hang, nothing left queued, one _ShmFile (the kept backend's)
    with one descriptor, and the -shm descriptors of the process back to what they were."""
    path = tmp_path / "s.db"
    keep = SqliteBackend(path)
    with keep.batch() as tx:
        tx.one("create table t (x)")
    keep.version()

    def shm_fds() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}") == f"{path}-shm"
            except OSError:
                pass
        return n

    before = shm_fds()
    stop = threading.Event()

    def collect():
        while not stop.is_set():
            gc.collect(1)  # (the young generations, where the dropped backends are: a full one scans every test's heap)

    def work(i):
        for k in range(40):
            b = SqliteBackend(path if k % 2 else tmp_path / f"o{i}.db")
            b.version()
            if k % 3 == 0:
                b.close()
            else:
                b.cycle = b
            del b

    threads = [threading.Thread(target=collect, daemon=True)]
    threads += [threading.Thread(target=work, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join(60)
    stop.set()
    threads[0].join(10)
    assert not any(t.is_alive() for t in threads), "hung"
    gc.collect()
    with sql._SHM_LOCK:
        sql._release_let_go()  # (what is queued, counted)
    mine = {k: s for k, s in sql._SHM_FILES.items() if k == keep._store}
    try:
        assert shm_fds() == before
        assert not sql._LET_GO and len(mine) == 1 and mine[keep._store].users == 1
    finally:
        keep.close()


def test_a_backend_dropped_without_close_leaves_the_next_backend_of_its_store_its_sqlite_locks(tmp_path):
    """A SqliteBackend dropped without close() is let go by its finalizer, which runs as the backend is freed,
    while its sqlite3.Connection is still open: CPython's Connection is in a cycle with its own statement cache
    (an lru_cache wrapping it), so it outlives the backend until the next collection. The let-go closes the
    last descriptor of the -shm file and drops every POSIX lock of the process on it, that still-open
    connection's DMS lock among them; a backend of the same store opened before the collector runs shares
    SQLite's per-process state of the -shm file, which believes the lock held, and never takes it again: this
    process then reads the WAL-index with no lock on it, and the next process to open the store takes itself
    for the first and truncates and rebuilds it under us (_ShmFile's docstring). No monkeypatching: the
    collector is only kept from running early, as it is between any two of its runs."""
    path = tmp_path / "s.db"
    was = gc.isenabled()
    gc.disable()
    b = None
    try:
        a = SqliteBackend(path)
        with a.batch() as tx:
            tx.one("create table t (x)")
        del tx
        a.version()
        assert _dms_held(f"{path}-shm")
        del a  # (its finalizer runs now; its connection waits for the collector)
        b = SqliteBackend(path)
        b.version()
        gc.collect()  # A's connection goes
        with b.batch() as tx:
            tx.one("insert into t values (1)")
        del tx
        assert _dms_held(f"{path}-shm"), "B's connection is open but holds no lock on the -shm file"
    finally:
        if b is not None:
            b.close()
        if was:
            gc.enable()
