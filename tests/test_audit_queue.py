"""The audit queue's thread: asleep while no row waits (an idle proxy's thread looked for rows 50 times a
second), woken by the first row or status of a batch, and every row and status written all the same."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sealgate.audit import AuditQueue, AuditRecord
from sealgate.store import SecretStore


def record(path: str) -> AuditRecord:
    return AuditRecord(at=time.time(), session="s", runchat="r", instance="i", principal="p", client="127.0.0.1:1",
                       secrets=("K",), method="GET", origin="https://api.example", path=path, decision="allow",
                       code=None, status=None)


def switches(native_id: int) -> int:
    """How many times the thread has given up the CPU of its own accord (a sleep, a wait that blocked)."""
    for line in Path(f"/proc/self/task/{native_id}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


@pytest.fixture
def queue(tmp_path):
    store = SecretStore(tmp_path)
    store.key  # noqa: B018 - schema and key
    q = AuditQueue(store.audit, 1000)
    yield q, store
    q.close(5)
    store.close()


def written(store: SecretStore) -> list[tuple]:
    with store.backend.read() as tx:
        return [tuple(r.values()) for r in tx.rows("select path, status from audit order by id")]


def wait_written(store: SecretStore, want: list[tuple]) -> None:
    end = time.monotonic() + 10
    while written(store) != want:
        assert time.monotonic() < end, written(store)
        time.sleep(0.01)


def test_an_idle_queue_s_thread_sleeps_and_wakes_for_the_first_row(queue):
    q, store = queue
    time.sleep(0.1)  # (started, and found nothing to write)
    before = switches(q._thread.native_id)
    time.sleep(0.5)
    assert switches(q._thread.native_id) - before <= 1  # looking every 20 ms: some 25
    p = q.add(record("/a"))
    q.set_status(p, 200)
    wait_written(store, [("/a", 200)])
    time.sleep(0.1)
    before = switches(q._thread.native_id)
    time.sleep(0.5)
    assert switches(q._thread.native_id) - before <= 1  # asleep again once it is all written


def test_a_status_known_after_its_row_was_written_wakes_the_idle_thread(queue):
    q, store = queue
    p = q.add(record("/late"))
    wait_written(store, [("/late", None)])
    time.sleep(0.1)  # (idle again)
    q.set_status(p, 502)
    wait_written(store, [("/late", 502)])


def test_an_idle_queue_closes_at_once(queue):
    q, _ = queue
    time.sleep(0.1)
    t0 = time.monotonic()
    assert q.close(5) == 0
    assert not q._thread.is_alive() and time.monotonic() - t0 < 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_rows_written_in_statements_of_many_keep_their_order_ids_and_statuses(request, tmp_path, backend):
    """AuditTrail.insert writes a batch in runs of 64, 16, 4 and 1 rows (SQLite: ids given from the largest
    on; PostgreSQL: the identity's, in the order listed); set_statuses fills the statuses of rows written
    before theirs was known, in runs as well."""
    store = SecretStore(tmp_path, None if backend == "sqlite" else request.getfixturevalue("pg").database())
    try:
        store.key  # noqa: B018 - schema and key
        trail = store.audit
        first = [(record(f"/a{i}"), 200 + i % 3) for i in range(3)]
        many = [(record(f"/b{i}"), None) for i in range(87)]  # 64 + 16 + 4 + 1 + 1 + 1
        with store.backend.batch() as tx:
            ids = trail.insert(tx, first)
        with store.backend.batch() as tx:
            ids += trail.insert(tx, many)
            trail.set_statuses(tx, [(row_id, r.at, 500 + n) for n, (row_id, (r, _)) in enumerate(zip(ids[3:], many))])
        with store.backend.batch() as tx:
            assert trail.insert(tx, []) == []
        assert len(set(ids)) == 90 and ids == sorted(ids)
        with store.backend.read() as tx:
            rows = tx.rows("select id, path, status, secrets, principal from audit order by id")
        assert [r["id"] for r in rows] == ids
        assert [(r["path"], r["status"]) for r in rows] == (
            [(f"/a{i}", 200 + i % 3) for i in range(3)] + [(f"/b{i}", 500 + i) for i in range(87)])
        assert {(r["secrets"], r["principal"]) for r in rows} == {("K", "p")}
    finally:
        store.close()


def test_after_a_batch_of_many_rows_the_next_waits_longer_and_after_a_few_as_before(queue, monkeypatch):
    """A batch costs its thread the same whatever its size: a busy proxy's (BUSY_ROWS or more) gathers for
    BATCH_EVERY_BUSY, a quiet one's rows still go within BATCH_EVERY."""
    import threading

    from sealgate import audit as audit_mod
    q, store = queue
    slept, real_sleep = [], time.sleep

    def sleep(seconds):
        if threading.current_thread().name == "sealgate-audit":
            slept.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(audit_mod.time, "sleep", sleep)
    for batch in (audit_mod.BUSY_ROWS, 1, 1):
        for i in range(batch):
            q.add(record(f"/{batch}/{i}"))
        assert q.flush(5)
    assert slept == [audit_mod.BATCH_EVERY, audit_mod.BATCH_EVERY_BUSY, audit_mod.BATCH_EVERY]

