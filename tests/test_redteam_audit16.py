"""Red team of e49e6ab: the audit queue's thread waits on its Condition while no row waits, woken by the
first row or status of a batch (`_wake_if_idle`) and by `close`. Attacked for lost wake-ups (a row or a
status queued while the thread is between a batch and its wait), the idle edge hit over and over, a busy
store (another connection holding BEGIN IMMEDIATE, past BUSY_PATIENCE), a failing store (backoff to
RETRY_MAX), `close` while idle / mid-sleep / while the store is busy, the bounded queue's log lines, and a
real proxy going idle between requests and shutting down. Each `test_finding_*` fails while its weakness is
there; each `test_held_*` is an attack the change withstood, kept as a guard. No secret value is printed.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sqlite3
import threading
import time

import pytest
from conftest import curl
from sealgate import audit as audit_mod
from sealgate.audit import AuditQueue, AuditRecord
from sealgate.store import SecretStore, StoreError


def record(path: str, decision: str = "allow") -> AuditRecord:
    return AuditRecord(at=time.time(), session="s", runchat="r", instance="i", principal="p", client="127.0.0.1:1",
                       secrets=("K",) if decision == "allow" else (), method="GET", origin="https://api.example",
                       path=path, decision=decision, code=None if decision == "allow" else "x", status=None)


def written(store: SecretStore) -> dict[str, list]:
    with store.backend.read() as tx:
        rows = tx.rows("select path, status from audit order by id")
    got: dict[str, list] = {}
    for r in rows:
        path, status = tuple(r.values())
        got.setdefault(path, []).append(status)
    return got


def idle(q: AuditQueue, timeout: float = 5) -> None:
    """Until nothing waits and the thread is back in its wait (not merely between a batch and it)."""
    end = time.monotonic() + timeout
    while True:
        with q._lock:
            if not q.waiting and q._lock._waiters:  # (the thread, the only one who waits with nothing queued)
                return
        assert time.monotonic() < end, "the audit thread never went idle"
        time.sleep(0.005)


@pytest.fixture
def made(tmp_path):
    made: list = []

    def make(bound: int = 1000, **kw) -> tuple[AuditQueue, SecretStore]:
        store = SecretStore(tmp_path / "data")
        store.key  # noqa: B018 - schema and key
        q = AuditQueue(store.audit, bound, **kw)
        made.append((q, store))
        return q, store
    yield make
    for q, store in made:
        q.close(2)
        store.close()


@contextlib.contextmanager
def busy(store: SecretStore):
    """Another process's write transaction (a second connection holding SQLite's write lock)."""
    other = sqlite3.connect(store.backend.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield other
    finally:
        with contextlib.suppress(sqlite3.Error):
            other.execute("COMMIT")
        other.close()


# --- lost wake-ups ----------------------------------------------------------------------------------------

def test_held_a_row_and_a_status_queued_between_a_batch_and_the_wait_are_written(made):
    """Right after each batch commits, before the thread is back at its predicate, another thread queues a
    row and sets the status of the row just written: their notify_all finds no waiter (it is lost), and the
    thread must still see them under the lock before it waits."""
    q, store = made()
    real = q._write_batch
    n, last = [0], []

    def between():
        if last:
            q.set_status(last[-1], 299)  # a status after its row was written (the _dirty path)
        p = q.add(record(f"/between{len(last)}"))
        assert p is not None
        last.append(p)

    def batch():
        written = real()
        if n[0] < 20:
            n[0] += 1
            t = threading.Thread(target=between)
            t.start()
            t.join()  # queued and notified before this thread gets back to its wait
        return written
    q._write_batch = batch
    q.add(record("/first"))
    assert q.flush(10), f"rows left waiting: {q.waiting}"
    idle(q)
    assert q.flush(5)
    got = written(store)
    assert n[0] == 20
    assert got["/first"] == [None]
    assert all(got[f"/between{i}"] == [299] for i in range(19)), got
    assert got["/between19"] == [None]  # (no status set for the last one)
    q.set_status(last[-1], 204)  # and from idle
    assert q.flush(5) and written(store)["/between19"] == [204]


def test_held_the_idle_edge_hit_two_hundred_times_from_several_threads(made):
    """Rows and statuses queued from several threads at random moments around the thread's going idle
    (just after `flush` says all is written, when the thread may be between its batch and its wait): every
    `flush` completes, every row is written once with its last status."""
    q, store = made()
    want: dict[str, int] = {}
    lock = threading.Lock()
    errors: list = []

    def worker(k: int) -> None:
        rng = random.Random(k)
        try:
            for i in range(50):
                p = q.add(record(f"/t{k}/{i}"))
                assert p is not None
                if rng.random() < 0.5:
                    assert q.flush(10), "a row waited for a thread that never woke"
                status = rng.choice([200, 201, 404, 0])
                time.sleep(rng.uniform(0, 0.025))
                q.set_status(p, status)
                if rng.random() < 0.5:
                    assert q.flush(10), "a status waited for a thread that never woke"
                with lock:
                    want[f"/t{k}/{i}"] = status
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert q.flush(10)
    got = written(store)
    assert {k: v for k, v in got.items() if len(v) != 1} == {}
    assert {k: v[0] for k, v in got.items()} == want


# --- a busy or failing store ------------------------------------------------------------------------------

def test_held_a_store_busy_past_patience_is_retried_then_the_thread_sleeps_and_wakes_again(made):
    """Another connection holds the write lock past BUSY_PATIENCE while rows and a status (for a row written
    before) wait: the thread keeps retrying (a failure, counted), writes all once the lock goes, goes back to
    its wait and is woken by the next row."""
    failures: list[int] = []
    q, store = made(on_failure=lambda: failures.append(1))
    before = q.add(record("/before"))
    assert q.flush(5)
    idle(q)
    with busy(store):
        q.set_status(before, 200)  # wakes the idle thread into a busy store
        for i in range(5):
            q.set_status(q.add(record(f"/busy{i}")), 201)
        time.sleep(BUSY := audit_mod.BUSY_PATIENCE + 0.8)
        assert q.waiting == 6 and q._thread.is_alive() and failures, (q.waiting, BUSY, len(failures))
    assert q.flush(10), f"rows left after the lock went: {q.waiting}"
    idle(q)
    q.add(record("/after"))
    assert q.flush(5)
    assert written(store) == {"/before": [200], **{f"/busy{i}": [201] for i in range(5)}, "/after": [None]}


def test_held_a_failing_store_is_retried_with_backoff_and_rows_and_statuses_survive(made, monkeypatch):
    """A store that fails every write (not busy: a full disk, say) for a while: rows, and a status for a row
    written before, wait; `_drop_refused_rows` takes nothing (no row is dropped for an outage); the thread
    keeps trying with backoff, writes all once the store is back, and sleeps and wakes as before."""
    monkeypatch.setattr(audit_mod, "RETRY_MAX", 0.2)
    q, store = made()
    first = q.add(record("/first"))
    assert q.flush(5)
    idle(q)
    backend = store.audit.backend
    real_batch = backend.batch
    failing = [True]
    tries = [0]

    @contextlib.contextmanager
    def batch(**kw):
        tries[0] += 1
        if failing[0]:
            raise StoreError("disk full, say")
        with real_batch(**kw) as tx:
            yield tx
    backend.batch = batch
    q.set_status(first, 200)
    for i in range(3):
        q.set_status(q.add(record(f"/out{i}")), 503)
    time.sleep(1.5)
    assert q._thread.is_alive() and q.waiting == 4 and tries[0] >= 4, (q.waiting, tries[0])
    failing[0] = False
    assert q.flush(10)
    idle(q)
    q.add(record("/later"))
    assert q.flush(5)
    assert written(store) == {"/first": [200], **{f"/out{i}": [503] for i in range(3)}, "/later": [None]}


# --- close ------------------------------------------------------------------------------------------------

def test_held_close_right_after_a_row_wakes_the_thread_writes_it(made):
    """`close` while the thread has been woken and sleeps its BATCH_EVERY: the row is written, none lost."""
    q, store = made()
    idle(q)
    q.add(record("/last"))
    assert q.close(5) == 0
    q._thread.join(2)
    assert not q._thread.is_alive() and written(store) == {"/last": [None]}


def test_held_close_while_the_store_is_busy_counts_the_rows_and_does_not_hang(made):
    """`close` while another connection holds the lock: it gives up after its timeout, says how many rows
    are lost (not 0), the thread ends, and nothing is written behind the closed queue's back."""
    q, store = made()
    idle(q)
    with busy(store):
        q.set_status(q.add(record("/lost")), 200)
        t0 = time.monotonic()
        assert q.close(0.5) == 1
        assert time.monotonic() - t0 < 4
        q._thread.join(3)
        assert not q._thread.is_alive()
        assert q.add(record("/after-close")) is None  # a closed queue takes nothing (the caller refuses)
    time.sleep(0.2)
    assert written(store) == {}


# --- the bounded queue's log lines -------------------------------------------------------------------------

def test_held_the_full_queue_refuses_says_so_once_and_drains_then_says_so_again(made, caplog):
    q, store = made(bound=4)
    caplog.set_level(logging.INFO, logger="sealgate")
    idle(q)
    for outage in range(2):
        with busy(store):
            assert all(q.add(record(f"/o{outage}/{i}")) is not None for i in range(4))
            assert q.add(record(f"/o{outage}/refused")) is None
            assert q.add(record(f"/o{outage}/refused2")) is None
        assert q.flush(10)
        idle(q)
    full = [r for r in caplog.records if "audit queue is full" in r.getMessage()]
    drains = [r for r in caplog.records if "audit queue drains" in r.getMessage()]
    assert (len(full), len(drains)) == (2, 2)
    assert sorted(written(store)) == sorted(f"/o{o}/{i}" for o in range(2) for i in range(4))


def test_finding_1_with_a_queue_of_one_row_the_first_refusal_silences_the_full_log_for_good(made, caplog):
    """audit_queue=1 (allowed: 1..10,000,000): a refusal's row may take half, 0 rows, so the first refusal
    (any 407) sets `_said_full` and logs "the audit queue is full" with the queue empty; the "drains" check
    (waiting < bound // 2, i.e. < 0) can never pass, so `_said_full` stays set: when the store later stops
    taking writes and injections are refused for a really full queue, no log line ever says so."""
    q, store = made(bound=1)
    caplog.set_level(logging.INFO, logger="sealgate")
    idle(q)
    assert q.add(record("/anon", decision="block")) is None  # (by design: half of one row is none)
    assert q.add(record("/ok")) is not None
    assert q.flush(5)
    idle(q)
    caplog.clear()
    with busy(store):  # an outage: the one slot fills, the next injection is refused
        assert q.add(record("/waits")) is not None
        assert q.add(record("/refused")) is None
        said = [r.getMessage() for r in caplog.records if "audit queue is full" in r.getMessage()]
    assert q.flush(10)
    assert said, "injections refused for a full audit queue, and no log line said so"


# --- a real proxy -----------------------------------------------------------------------------------------

def test_held_a_real_proxy_idle_between_requests_audits_each_with_its_status(tmp_path, pki, make_upstream, user,
                                                                            value):
    """A proxy whose audit thread goes back to its wait between requests (idle seconds) audits each request
    with the status the worker got, and its shutdown (the addon's `done`) writes out a row queued last."""
    from conftest import make_proxy
    from test_proxy import assert_clean
    api = make_upstream("127.0.0.1")
    p = make_proxy(tmp_path, pki)
    p.add_secret(user, "K", value, api.origin)
    s = p.issue(user=user)
    p.start()
    try:
        queue = p._master.addons.get("sealgate").audit
        for i in range(3):
            idle(queue)
            r = curl(s, api.url(f"/idle{i}"), "-H", f"X-Key: {s['env']['K']}")
            assert r.status == 200 and api.received[-1].header("X-Key") == value
        r = curl(s, api.url("/last"), "-H", f"X-Key: {s['env']['K']}")
        assert r.status == 200
    finally:
        p.stop()
    store = SecretStore(p.data_dir)
    try:
        rows = sorted((a.path, a.status, a.decision) for a in store.audit(user=user))
    finally:
        store.close()
    assert rows == sorted([(f"/idle{i}", 200, "allow") for i in range(3)] + [("/last", 200, "allow")])
    assert_clean(p, value)


def test_held_two_processes_queues_on_one_store_each_wake_for_their_own_rows(tmp_path):
    """`--workers 2`: each process has its queue and connection on one SQLite file; their batches meet each
    other's lock. Rows queued to both, around both threads' idle edges, are all written, none twice."""
    stores = [SecretStore(tmp_path / "data") for _ in range(2)]
    stores[0].key  # noqa: B018 - schema and key
    queues = [AuditQueue(s.audit, 1000) for s in stores]
    try:
        for i in range(60):
            for k, q in enumerate(queues):
                q.set_status(q.add(record(f"/w{k}/{i}")), 200)
            if i % 3 == 0:
                assert all(q.flush(10) for q in queues)
            else:
                time.sleep(0.03 * (i % 2))  # (one batch in flight, or both threads just back at their wait)
        assert all(q.flush(10) for q in queues)
        got = written(stores[0])
    finally:
        for q, s in zip(queues, stores, strict=True):
            q.close(2)
            s.close()
    assert got == {f"/w{k}/{i}": [200] for k in range(2) for i in range(60)}
