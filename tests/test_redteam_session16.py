"""Red team, session 16: the store version on SQLite (`changes`, migration 8) and the shared accept queue of
`sealgate run --workers N`."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sealgate import origins, workers
from sealgate.sql import SqliteBackend
from test_workers import _children, pids, scrape, wait_ready
from upstream import RawUpstream, raw_response

# --- the store version ---------------------------------------------------------------------------------


def _store(tmp_path):
    from sealgate.store import SecretStore
    return SecretStore(tmp_path / "data")


def _other_process(db, *statements: str) -> None:
    script = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "for s in sys.argv[2:]: c.execute(s)")
    subprocess.run([sys.executable, "-c", script, str(db), *statements], check=True)


def _with_secret(tmp_path):
    s = _store(tmp_path)
    s.add_secret("alice", "K", "v-" + secrets.token_hex(8), [origins.parse("https://api.example")])
    s.add_secret("alice", "L", "v-" + secrets.token_hex(8), [origins.parse("https://api.example")])
    _other_process(s.backend.path, "insert into sessions (id, principal) values ('s1', 'alice')",
                   "insert into sessions (id, principal) values ('s2', 'alice')")
    return s


@pytest.mark.parametrize("statement", [
    "insert or replace into sessions (id, principal) values ('s1', 'mallory')",
    "replace into sessions (id, principal) values ('s1', 'mallory')",
    "insert into sessions (id, principal) values ('s1', 'mallory') on conflict(id) do update set principal = excluded.principal",
    "update or replace sessions set id = 's1' where id = 's2'",  # deletes s1 by conflict: no delete trigger
    "delete from sessions",  # no WHERE: SQLite's truncate optimisation (off with triggers)
    "delete from secrets",
    "update secrets set origins = origins",  # a row written with the same values
    "insert or replace into api_tokens (name, token_hash) values ('t', 'h')",
])
def test_every_kind_of_write_to_a_cached_table_moves_the_version(tmp_path, statement):
    s = _with_secret(tmp_path)
    v = s.version()
    _other_process(s.backend.path, statement)
    assert s.version() != v, statement


def test_a_backup_api_restore_over_the_live_store_moves_the_version(tmp_path):
    """sqlite3's `.restore` (the backup API) into the file a proxy has open: every page replaced, the number
    in `changes` may well be the one the proxy last read (here: the same store's copy, taken before a change
    that the restore undoes)."""
    s = _with_secret(tmp_path)
    snap = tmp_path / "snap.db"
    with contextlib.closing(sqlite3.connect(s.backend.path)) as c, contextlib.closing(sqlite3.connect(snap)) as d:
        c.backup(d)
    _other_process(s.backend.path, "delete from sessions where id = 's1'")
    v = s.version()
    with contextlib.closing(sqlite3.connect(snap)) as src, contextlib.closing(sqlite3.connect(s.backend.path)) as dst:
        src.backup(dst)
    assert s.version() != v


def test_a_changes_table_with_two_rows_still_moves(tmp_path):
    s = _with_secret(tmp_path)
    _other_process(s.backend.path, "insert into changes (n) values (1000)")
    v = s.version()
    _other_process(s.backend.path, "delete from sessions where id = 's1'")
    assert s.version() != v


def test_a_changes_table_emptied_does_not_freeze_the_version(tmp_path):
    """`changes` without its row (emptied by hand, a tool that clears tables, a partial copy): the triggers'
    `update changes` then updates nothing and `select n ... from changes` gives no row, so version() was the
    same (None) for ever: a session revoked afterwards by the CLI or another process stayed valid in every
    proxy that had it cached, and a narrowed scope was never seen."""
    from sealgate.store import SessionRecord
    s = _with_secret(tmp_path)
    now = time.time()
    sid = secrets.token_hex(8)
    s.add_session(SessionRecord(sid, "", os.urandom(32), "signed-in", "rc", "in", "alice", now, now + 600))
    _other_process(s.backend.path, "delete from changes")
    assert s.session(sid) is not None  # cached by the proxy
    assert set(s.secrets_for("alice")) == {"K", "L"}
    _other_process(s.backend.path, f"delete from sessions where id = '{sid}'")  # `sealgate session revoke`
    assert s.session(sid) is None, "a revoked session was still served from the cache"
    _other_process(s.backend.path, "delete from secrets where name = 'L'")  # (the owner's seal: refused, read again)
    with pytest.raises(Exception):  # noqa: B017  (read again: the tampered owner seal is refused)
        s.secrets_for("alice")


@pytest.mark.parametrize("dropped, statement", [
    ("changes_sessions_delete", "delete from sessions where id = 's1'"),  # revoked
    ("changes_secrets_update", "update secrets set origins = '[]' where name = 'K'"),  # narrowed
])
def test_a_watching_trigger_dropped_does_not_freeze_what_it_watched(tmp_path, dropped, statement):
    """A trigger gone (dropped by hand or by a tool, a copy of the schema without them): its table's writes no
    longer move `changes`; the drop moves the schema cookie once, and from then on a revoked session or a
    narrowed scope was never seen by a proxy that had it cached."""
    s = _with_secret(tmp_path)
    _other_process(s.backend.path, f"drop trigger {dropped}")
    v = s.version()
    _other_process(s.backend.path, statement)
    assert s.version() != v


def test_a_store_migrated_to_8_by_another_process_under_an_open_backend_moves_the_version(tmp_path):
    """A backend that opened the store before migration 8 (data_version then), and another process that
    upgrades it: the upgrade, and every later write, still move the version."""
    s = _with_secret(tmp_path)
    db = s.backend.path
    s.close()
    _other_process(db, *(f"drop trigger [{r[0]}]" for r in sqlite3.connect(db).execute(
        "select name from sqlite_master where type = 'trigger'")), "drop table changes", "PRAGMA user_version = 7")
    b = SqliteBackend(db)
    try:
        v = b.version()
        assert v[0][0] == "data_version"
        _store(tmp_path).close()  # another process's sealgate: migrates to 8
        assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 8
        v2 = b.version()
        assert v2 != v
        _other_process(db, "delete from sessions where id = 's1'")
        assert b.version() != v2
    finally:
        b.close()


# --- the shared accept queue of `sealgate run --workers N` ----------------------------------------------



def _listening_inodes(port: int) -> set[str]:
    """The socket inodes listening on port (any loopback or wildcard address, IPv4 and IPv6)."""
    return {f[9] for table in ("/proc/net/tcp", "/proc/net/tcp6")
            for f in (line.split() for line in Path(table).read_text().splitlines()[1:])
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port}


def _sockets_of(pid: int) -> set[str]:
    found = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if (link := os.readlink(fd)).startswith("socket:["):
                    found.add(link[8:-1])
    return found


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def test_bind_on_localhost_and_port_0_gives_one_port_on_both_families():
    bound = workers.bind("localhost", 0)
    try:
        names = [s.getsockname() for s in bound]
        assert {n[0] for n in names} <= {"127.0.0.1", "::1"} and len({n[1] for n in names}) == 1, names
        for host, _port, *_ in names:
            with socket.create_connection((host, names[0][1]), timeout=2):
                pass
    finally:
        for s in bound:
            s.close()


@pytest.mark.e2e
def test_only_the_supervisor_and_the_proxy_processes_hold_the_listening_socket(webgateway):
    """The dashboard (mitmweb) and the API are started after the port is bound: they must not hold it (a
    dashboard holding it would keep the port after the gateway stopped, and could accept proxy traffic)."""
    p = webgateway
    listening = _listening_inodes(p.port)
    assert listening
    proxies = set(pids(scrape(p)).values())
    others = [c for c in _descendants(p.proc.pid) if c not in proxies]
    assert len(others) >= 2  # the dashboard and the API
    for pid in others:
        assert not _sockets_of(pid) & listening, Path(f"/proc/{pid}/cmdline").read_bytes()
    for pid in proxies | {p.proc.pid}:
        assert _sockets_of(pid) & listening


def _cloexec(pid: int, inodes: set[str]) -> dict[int, bool]:
    """Each descriptor of pid on one of the sockets: whether it is closed on exec (O_CLOEXEC)."""
    found = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd)[8:-1] in inodes:
                flags = int(Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split("flags:")[1].split()[0], 8)
                found[int(fd.name)] = bool(flags & 0o2000000)
    return found


@pytest.mark.e2e
def test_the_listening_socket_is_closed_on_exec_in_every_process(webgateway):
    """pass_fds hands the sockets to the proxy processes (it makes them inheritable in the child, whatever they
    were). Left inheritable there (and in the supervisor), anything those processes start other than by
    Popen's default close_fds (os.system, os.posix_spawn, close_fds=False: a key hook calling a KMS tool, say)
    inherits the proxy port: a helper that outlives the gateway keeps the port, queueing connections that
    nobody answers and refusing the next `sealgate run`."""
    p = webgateway
    listening = _listening_inodes(p.port)
    for pid in [p.proc.pid, *pids(scrape(p)).values()]:
        held = _cloexec(pid, listening)
        assert held and all(held.values()), (pid, held)


@pytest.mark.e2e
def test_another_local_process_cannot_join_or_take_the_port(webgateway):
    p = webgateway
    for opts in ((socket.SO_REUSEADDR,), (socket.SO_REUSEPORT,), (socket.SO_REUSEADDR, socket.SO_REUSEPORT)):
        with socket.socket() as s:
            for o in opts:
                s.setsockopt(socket.SOL_SOCKET, o, 1)
            with pytest.raises(OSError):
                s.bind(("127.0.0.1", p.port))
                s.listen()


@pytest.mark.e2e
def test_a_connection_made_while_every_proxy_process_is_dead_waits_and_is_served(webgateway, api, user, value):
    p = webgateway
    p.add_secret(user, "K", value, api.origin)
    s = p.issue(user=user)
    old = pids(wait_ready(p))
    for pid in old.values():
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    from conftest import curl
    r = curl(s, api.url("/while-down"), "-H", f"X-Key: {s['env']['K']}")
    assert r.status == 200
    now = pids(wait_ready(p))
    assert set(now.values()).isdisjoint(old.values())


@pytest.mark.e2e
def test_idle_connections_flooding_the_queue_do_not_starve_a_request(webgateway, api, user, value):
    p = webgateway
    p.add_secret(user, "F", value, api.origin)
    s = p.issue(user=user)
    flood = [socket.create_connection(("127.0.0.1", p.port)) for _ in range(300)]
    try:
        from conftest import curl
        start = time.monotonic()
        r = curl(s, api.url("/flood"), "-H", f"X-Key: {s['env']['F']}")
        assert r.status == 200 and time.monotonic() - start < 10
    finally:
        for c in flood:
            c.close()


@pytest.mark.e2e
def test_one_proxy_process_drained_by_sigterm_leaves_the_port_to_the_others_and_is_started_again(
        webgateway, api, user, value):
    """A process that drains lets go of its copies of the port; the supervisor's keep it open for the others
    and for the process started in its place."""
    from conftest import curl
    p = webgateway
    p.add_secret(user, "T", value, api.origin)
    s = p.issue(user=user)
    old = pids(wait_ready(p))
    os.kill(old["0"], signal.SIGTERM)
    statuses = [curl(s, api.url("/one-drains"), "-H", f"X-Key: {s['env']['T']}").status for _ in range(6)]
    end = time.time() + 60
    while (now := pids(scrape(p)))["0"] == old["0"]:
        assert time.time() < end, p.log.read_text()[-2000:]
        time.sleep(0.2)
    wait_ready(p)
    assert now["1"] == old["1"] and _listening_inodes(p.port)
    statuses += [curl(s, api.url("/one-drains"), "-H", f"X-Key: {s['env']['T']}").status for _ in range(6)]
    assert statuses == [200] * 12


@pytest.mark.e2e
def test_a_draining_gateway_stops_taking_connections(webgateway, pki, api, user, value):
    """SIGTERM: each process stops accepting, but the port stays open in the supervisor (and, unused, in every
    proxy process) until the last has drained: a connection made meanwhile is taken by the kernel and waits
    for up to shutdown_grace with nothing to answer it, then is reset. A single proxy (and the gateway before
    the shared queue) stopped listening at once: refused, so a client or balancer goes elsewhere."""
    p = webgateway
    slow = RawUpstream(pki, lambda head, body, sock: time.sleep(4) or raw_response(b"slow and done"))
    p.add_secret(user, "S", value, slow.origin)
    s = p.issue(user=user)
    wait_ready(p)
    from conftest import curl
    slow_one = ThreadPoolExecutor(1).submit(curl, s, slow.origin + "/slow", "-H", f"X-Key: {s['env']['S']}")
    end = time.time() + 20
    while not slow.received:
        assert time.time() < end
        time.sleep(0.05)
    p.proc.send_signal(signal.SIGTERM)
    end = time.time() + 10
    while "sealgate: stopping:" not in p.log.read_text() or p.log.read_text().count("sealgate: stopping:") < 2:
        assert time.time() < end, p.log.read_text()[-2000:]
        time.sleep(0.05)
    time.sleep(0.3)
    assert slow_one.running()  # still draining
    try:
        c = socket.create_connection(("127.0.0.1", p.port), timeout=2)
    except ConnectionRefusedError:
        pass
    else:
        c.close()
        pytest.fail("a connection made while the gateway drains was taken, and nothing will answer it")
    assert slow_one.result(30).status == 200
    assert p.proc.wait(40) == 0
