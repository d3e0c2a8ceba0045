"""Red team of 8f4ff44 (audit rows written in statements of 64/16/4/1 rows, ids given from max(id) + 1 on SQLite,
RETURNING on PostgreSQL, late statuses in one CASE update per run) and aac3010 (h11 body readers bounded by
max_head_bytes; a streamed response that cannot be checked is cut, `unscrubbable_response`).

Each test whose docstring starts with FINDING failed while its weakness was there (fixed: set_statuses casts each
status, and finds a row by its id and its `at`); the others are attacks that held, kept as guards. No secret value is printed or stored: tests assert booleans and hashes only.
"""

from __future__ import annotations

import gzip
import json
import time

import pytest
from test_redteam_session18 import _chunk, _chunked, _until_eof, _worker_body, allowed_at
from upstream import RawUpstream
from wire import tunnel


@pytest.fixture
def keyed(proxy, pki, user, value):
    """make(answer) -> (upstream, session, placeholder): a RawUpstream answering with answer(head, body, sock)
    (None after writing itself), the value allowed for it."""
    def make(answer):
        up = RawUpstream(pki, answer)
        return (up, *allowed_at(proxy, user, value, up))
    return make


def _audit(proxy, runchat: str) -> list[dict]:
    return json.loads(proxy.cli("audit", "--runchat", runchat, "--json").stdout)


def _writing(data: bytes, keep: float):
    def answer(head, body, sock):
        sock.sendall(data)
        time.sleep(keep)
    return answer


GZ_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")


def test_a_gzip_stream_truncated_at_its_end_never_reaches_the_worker_as_a_complete_response(proxy, keyed, value):
    """The upstream's chunked framing is complete (terminating chunk sent), but the gzip stream in it is cut short:
    StreamDecoder.finish raises at the end of the message, in the stream callable mitmproxy calls for
    ResponseEndOfMessage, and `broken` cuts both connections. The worker must not get the terminating chunk."""
    v = value.encode()
    comp = gzip.compress(b"".join(b"data: %d %s\n\n" % (i, v) for i in range(200)))
    up, s, ph = keyed(_writing(GZ_SSE_HEAD + _chunked([comp[:200], comp[200:-30]]), 3))
    t = tunnel(s, proxy.port, up.target, None)
    t.sendall(f"GET /trunc HTTP/1.1\r\nHost: {up.target}\r\nX-K: {ph}\r\n\r\n".encode())
    out, closed = _until_eof(t, 2.5)
    t.close()
    clean = v not in out
    _head, _body, complete = _worker_body(out)
    assert clean
    assert closed and not complete, "the worker got a complete-looking response for a body that could not be checked"
    rows = [(r["decision"], r["code"], r["status"]) for r in _audit(proxy, s["runchat"])]
    assert sorted(rows, key=str) == sorted([("allow", None, 0), ("block", "unscrubbable_response", 0)], key=str), rows


@pytest.mark.e2e  # a slow reader: seconds
def test_a_truncated_gzip_stream_to_a_slow_reading_worker_never_looks_complete(proxy, keyed, value):
    """As above, with 8 MiB decoded and a worker that reads only after the upstream finished: the worker's socket
    holds a backlog when `broken` cuts (asyncio's transport sends what it buffered before it closes), so anything
    queued after the cut, the terminating chunk, would reach the worker."""
    import os
    v = value.encode()
    events = b"".join(b"data: %s %s\n\n" % (os.urandom(2000).hex().encode(), v if i % 50 == 0 else b"")
                      for i in range(2048))
    comp = gzip.compress(events)
    pieces = [comp[i:i + 65536] for i in range(0, len(comp) - 30, 65536)]
    pieces[-1] = pieces[-1][:-30]
    up, s, ph = keyed(_writing(GZ_SSE_HEAD + _chunked(pieces), 4))
    t = tunnel(s, proxy.port, up.target, None)
    t.sendall(f"GET /slow HTTP/1.1\r\nHost: {up.target}\r\nX-K: {ph}\r\n\r\n".encode())
    time.sleep(1.5)
    from test_redteam_session18 import _read_all_fast
    out = _read_all_fast(t, 2.5)
    t.close()
    clean = v not in out
    _head, _body, complete = _worker_body(out)
    assert clean
    assert not complete, "the worker got a complete-looking response for a body that could not be checked"
    rows = [(r["decision"], r["code"], r["status"]) for r in _audit(proxy, s["runchat"])]
    assert sorted(rows, key=str) == sorted([("allow", None, 0), ("block", "unscrubbable_response", 0)], key=str), rows


# --- the audit trail's batches ------------------------------------------------------------------------------------

from sealgate import audit as audit_mod
from sealgate.audit import AuditQueue, AuditRecord
from sealgate.store import SecretStore


def _record(path: str, decision: str = "allow", status: int | None = None) -> AuditRecord:
    return AuditRecord(at=time.time(), session="s", runchat="r", instance="i", principal="p", client="127.0.0.1:1",
                       secrets=("K",) if decision == "allow" else (), method="GET", origin="https://api.example",
                       path=path, decision=decision, code=None if decision == "allow" else "x", status=status)


def _rows(store: SecretStore) -> list[tuple]:
    with store.backend.read() as tx:
        return [(r["id"], r["path"], r["status"]) for r in tx.rows("select id, path, status from audit order by id")]


def _until(check, timeout: float = 5) -> bool:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_store(request, tmp_path):
    url = request.getfixturevalue("pg").database() if request.param == "postgresql" else None
    made = []

    def make(sub: str = "data") -> SecretStore:
        store = SecretStore(tmp_path / sub, url)
        store.key  # noqa: B018 - schema and key
        made.append(store)
        return store
    yield make
    for s in made:
        s.close()


def test_late_statuses_still_go_in_after_rows_were_written_one_at_a_time(backend_store):
    """FINDING, fixed (PostgreSQL; 8f4ff44): after a batch the store refused (here a row holding a lone surrogate, which
    no store takes; any error that is not the connection's), `_drop_refused_rows` writes the other rows one at a
    time and puts each in `_dirty` (status still None for a request whose response has not come). The next batch's
    `set_statuses` writes `case id when %s then %s end` with that None, and where a run holds only NULLs (a run of
    one, as every remainder past the runs of 64, 16 and 4 is, or a run all NULL) PostgreSQL types the CASE as text
    (DatatypeMismatch: column "status" is of type integer but expression is of type text), so the whole batch fails,
    and goes on failing while any such request is in flight; every other row's late status waits meanwhile (before
    8f4ff44, `set status = ? where id = ?` took a NULL). Reproduce: AuditQueue on a PostgreSQL store; add a row the
    store refuses, then rows (status 403) until it was refused REFUSED_MAX - 1 times, then a row p1 whose status
    stays unknown (its pass drops the refused row and writes p1 alone: a run of one, NULL); add p2, let it be
    written, set_status(p2, 200): p2's status never reaches the store while p1 is unanswered (with requests coming
    all the time, there always is one: the batches never succeed again)."""
    store = backend_store()
    failures = []
    q = AuditQueue(store.audit, 1000, on_failure=lambda: failures.append(1))
    try:
        poison = q.add(_record("/poison\udcff", "block", 403))  # (a lone surrogate: neither store takes it)
        i = 0
        while poison.refused < audit_mod.REFUSED_MAX - 1:  # rows taken after it, one pass each
            q.add(_record(f"/after-{i}", "block", 403))
            assert _until(lambda i=i: any(path == f"/after-{i}" for _, path, _ in _rows(store)))
            i += 1
        p1 = q.add(_record("/in-flight"))  # its pass drops the refused row, and writes it one at a time
        assert _until(lambda: any(path == "/in-flight" for _, path, _ in _rows(store)))
        assert _until(lambda: all(p is not poison for p in q._new))
        p2 = q.add(_record("/late"))
        assert _until(lambda: any(path == "/late" for _, path, _ in _rows(store)))
        q.set_status(p2, 200)
        landed = _until(lambda: any(path == "/late" and status == 200 for _, path, status in _rows(store)), 4)
        failed_since = len(failures)
        q.set_status(p1, 502)
        assert q.flush(10)
        assert {(path, status) for _, path, status in _rows(store)} == {
            ("/in-flight", 502), ("/late", 200), *((f"/after-{j}", 403) for j in range(i))}
        assert landed, f"a late status waited on another request's (batches failed {failed_since} times)"
    finally:
        q.close(5)


def _expected_status(path: str) -> int:
    return 200 + int(path.rsplit("-", 1)[1]) % 300


def test_two_writers_on_one_store_with_late_statuses_give_every_row_its_own_id_and_status(backend_store):
    """Two processes' queues (two connections) on one store, plus a third connection inserting rows the old way
    (no id: a restore, an older sealgate) meanwhile; bursts past 64 rows (runs of 64, 16, 4 and 1), each row's
    status set before it was written, while it was being written, or after. Every row is there once, under an id
    of its own, with its own status (a wrong RETURNING order or a reused max(id) would put a status on another
    row)."""
    import random
    import threading
    a, b = backend_store(), backend_store()
    third = backend_store()
    qa, qb = AuditQueue(a.audit, 5000), AuditQueue(b.audit, 5000)
    stop = threading.Event()
    olds = []

    def old_writer():
        n = 0
        while not stop.is_set():
            with third.backend.batch() as tx:
                tx.one("insert into audit (at, session, runchat, instance, principal, client, secrets, method, origin, "
                       "path, decision, code, status) values (?, '', '', '', '', '', '', 'GET', 'o', ?, 'block', 'x', ?)",
                       [time.time(), f"/old-{n}", _expected_status(f"/old-{n}")])
            olds.append(n)
            n += 1
            time.sleep(0.003)

    added = {"a": 0, "b": 0}

    def writer(q: AuditQueue, name: str, seed: int):
        rng = random.Random(seed)
        pend = []
        for burst in range(6):
            for k in range(rng.choice((1, 3, 63, 64, 65, 150))):
                path = f"/{name}-{burst}-{k}-{len(pend)}"
                p = q.add(_record(path))
                assert p is not None
                added[name] += 1
                if rng.random() < 0.3:
                    q.set_status(p, _expected_status(path))
                else:
                    pend.append((p, path))
            time.sleep(rng.choice((0, 0.005, 0.03)))
            rng.shuffle(pend)
            for p, path in pend[:len(pend) // 2]:
                q.set_status(p, _expected_status(path))
            pend = pend[len(pend) // 2:]
        for p, path in pend:
            q.set_status(p, _expected_status(path))

    threads = [threading.Thread(target=old_writer), threading.Thread(target=writer, args=(qa, "a", 1)),
               threading.Thread(target=writer, args=(qb, "b", 2))]
    try:
        for t in threads:
            t.start()
        threads[1].join(60)
        threads[2].join(60)
        stop.set()
        threads[0].join(10)
        assert qa.flush(20) and qb.flush(20)
        rows = _rows(a)
        ids = [r[0] for r in rows]
        paths = [r[1] for r in rows]
        assert len(set(ids)) == len(ids) and len(set(paths)) == len(paths)
        wrong = [(path, status) for _, path, status in rows if status != _expected_status(path)]
        assert not wrong, wrong[:5]
        assert sum(1 for p in paths if p.startswith("/old-")) == len(olds)
        assert sum(1 for p in paths if p.startswith("/a-")) == added["a"] > 50
        assert sum(1 for p in paths if p.startswith("/b-")) == added["b"] > 50
    finally:
        stop.set()
        qa.close(5)
        qb.close(5)


# --- the bound on what a chunked body's reader leaves unread -------------------------------------------------------

from test_redteam_session18 import _drive


def _reader():
    from mitmproxy.proxy.layers.http import _http1
    from sealgate import internals
    internals.http1_body_readers(lambda: 65536)  # (the default max_head_bytes, as the in-process proxy has)
    return _http1.make_body_reader(None)


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 7, 4096, 1 << 20])
def test_legitimate_long_extensions_and_trailers_arriving_in_any_pieces_are_taken(size):
    """Chunk extensions of 60 KiB, a trailer section of 60 KiB (many fields), 1 MiB of chunks in one arrival, a
    line cut between CR and LF: each under the bound, so read whole, however it arrives."""
    import h11
    ext = b";e=" + b"x" * (60 << 10)
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 50) for i in range(1000))
    assert len(trailers) < 65536 - 4
    n = 1024 if size >= 4096 else 16  # (1 MiB one byte at a time: a million calls)
    data = (_chunk(b"hello", ext) + b"".join(_chunk(b"y" * 1000) for _ in range(n)) + _chunk(b"bye", ext)
            + b"0" + ext + b"\r\n" + trailers + b"\r\nNEXT")
    body, end, left = _drive(_reader, _pieces(data, size))
    assert isinstance(end, h11.EndOfMessage) and body == b"hello" + b"y" * (1000 * n) + b"bye" and b"NEXT".startswith(left)


@pytest.mark.parametrize("opening,filler", [
    (b"1;", b"a"),  # a chunk-size line
    (b"1\n", b"a\n"),  # bare LF: h11 looks for CRLF
    (b"1;a\r", b"\r"),  # CR after CR, never LF
    (b"0\r\n", b"X: y\r\n"),  # a trailer section
    (b"0\r\n", b"X: y\r"),  # trailer lines without LF
    (b"0\r\n", b"X: y\n"),  # bare-LF trailer lines
])
@pytest.mark.parametrize("size", [1, 1000, 70000])
def test_the_bound_cannot_be_dodged_by_line_endings_or_tiny_arrivals(opening, filler, size):
    import h11
    data = _chunk(b"ok") + opening + filler * ((70 << 10) // len(filler))
    body, end, left = _drive(_reader, _pieces(data, size))
    assert isinstance(end, h11.ProtocolError) and body == b"ok" and len(left) <= 65536 + size + len(filler)


def test_a_request_tripping_the_bound_reaches_no_upstream_whole_and_its_row_says_so(proxy, pki, user, value):
    """A filled chunked upload (placeholder in a header and in the body) whose next chunk-size line never ends:
    the worker's connection closes, the upstream never sees the end of the request (so never acts on it), and
    the allow row gets status 0 (the worker got no answer), not a status of a response."""
    got = {}

    def answer(head, body, sock):
        got["body"] = body
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    up = RawUpstream(pki, answer)
    proxy.add_secret(user, "KB", value, up.origin)
    runchat = f"rc-bound-req-{id(up)}"
    s = proxy.issue(user=user, runchat=runchat)
    ph = s["env"]["KB"]
    t = tunnel(s, proxy.port, up.target, None)
    t.sendall(f"POST /up HTTP/1.1\r\nHost: {up.target}\r\nX-K: {ph}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
              + _chunk(f"v={ph}".encode()) + b"1;")
    closed = False
    try:
        for _ in range(8):
            t.sendall(b"a" * 16384)
            time.sleep(0.01)
    except OSError:
        closed = True
    out, eof = _until_eof(t, 3)
    t.close()
    assert closed or eof
    assert b" 200 " not in out.split(b"\r\n")[0]
    assert "body" not in got  # (RawUpstream answers only a request it read whole)
    time.sleep(0.3)
    rows = [(r["decision"], r["code"], r["status"]) for r in _audit(proxy, runchat)]
    assert rows and all(r == ("allow", None, 0) for r in rows), rows


def test_a_response_tripping_the_bound_is_cut_short_for_the_worker_and_its_row_says_so(proxy, keyed, value):
    """An event stream whose next chunk-size line never ends: the worker got the head and the first event, then
    the connection ends without the terminating chunk (never a complete-looking body), no value in it."""
    v = value.encode()
    sse = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    up, s, ph = keyed(_writing(sse + _chunk(b"data: " + v + b"\n\n") + b"1;" + b"a" * (80 << 10), 3))
    t = tunnel(s, proxy.port, up.target, None)
    t.sendall(f"GET /sse HTTP/1.1\r\nHost: {up.target}\r\nX-K: {ph}\r\n\r\n".encode())
    out, eof = _until_eof(t, 2.5)
    t.close()
    _head, body, complete = _worker_body(out)
    clean = v not in out
    assert clean and eof and not complete and body.startswith(b"data: ")
    time.sleep(0.3)
    rows = [(r["decision"], r["code"], r["status"]) for r in _audit(proxy, s["runchat"])]
    assert rows == [("allow", None, 0)], rows


def test_a_late_status_never_lands_on_another_row_after_the_trail_was_cleared(backend_store):
    """FINDING, fixed (SQLite; pre-existing, not made by 8f4ff44: `audit.id` is an INTEGER PRIMARY KEY without
    AUTOINCREMENT, so SQLite's own numbering was max(id) + 1 as well; 8f4ff44 now writes that rule out itself).
    An operator clears the audit trail (or a retention job deletes every row older than now) while a proxy has
    a row written whose status is not known yet (a long request). The next row written, by this proxy or another
    process, takes the same id; when the long request ends, `set_statuses` (`... where id in (?)`) writes its
    status onto that other row, and the one it belongs to is gone. Reproduce: queue A writes row /long (status
    None); another connection runs `delete from audit`; queue B writes /other with status 403 and is flushed;
    A.set_status(/long, 502): /other now reads 502. On PostgreSQL the identity never hands an id out twice."""
    a, b = backend_store(), backend_store()
    qa, qb = AuditQueue(a.audit, 100), AuditQueue(b.audit, 100)
    try:
        long = qa.add(_record("/long"))
        assert _until(lambda: long.row_id is not None)
        with b.backend.batch() as tx:  # the operator, with the store's own tools
            tx.one("delete from audit")
        qb.add(_record("/other", "block", 403))
        assert qb.flush(5)
        qa.set_status(long, 502)
        assert qa.flush(5)
        assert [(path, status) for _, path, status in _rows(a)] == [("/other", 403)]
    finally:
        qa.close(5)
        qb.close(5)
