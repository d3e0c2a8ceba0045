"""The audit trail: one row per decision (never a value, a query string or a credential).

The proxy writes it through an `AuditQueue`: rows (and the status, once the response is known)
wait in memory and go to the store in one transaction every few tens of milliseconds, on a thread
of their own, so a store that is locked, full or slow never holds up the event loop. The queue is
bounded: past `bound` rows waiting, `add` says no, and the caller refuses to send a value it cannot
audit. Read by `sealgate audit` and the platform API.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import StoreBusy
from .sql import Backend, Tx

log = logging.getLogger("sealgate")

BATCH_EVERY = 0.02  # seconds rows gather before one transaction writes them
# after a batch of BUSY_ROWS or more, the next gathers for BATCH_EVERY_BUSY: a batch costs its writer thread
# some 0.7 ms of CPU whatever its size (much of it winning the GIL back from the event loop)
BATCH_EVERY_BUSY = 0.05
BUSY_ROWS = 8
BATCH_MAX = 500  # rows in one transaction
RETRY_MAX = 1.0  # seconds between tries at most, while the store refuses the writes
REFUSED_MAX = 5  # passes a row may be refused while later ones are taken, before it is dropped
BUSY_PATIENCE = 1.0  # seconds other processes' writes may keep the store busy before it counts as a failure


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


_AUDIT_COLUMNS = tuple(AuditRecord.__dataclass_fields__)
_SIZES = (64, 16, 4, 1)  # rows per statement: a batch is written in few statements, each text compiled once


def _sized(items: list) -> Iterator[list]:
    """items in runs of the sizes of _SIZES, the largest first."""
    start = 0
    while start < len(items):
        size = next(s for s in _SIZES if s <= len(items) - start)
        yield items[start:start + size]
        start += size


def _row(record: AuditRecord, status: int | None) -> list:
    row = {**record.__dict__, "secrets": ",".join(record.secrets), "status": status}
    return [row[c] for c in _AUDIT_COLUMNS]


@functools.lru_cache(maxsize=2 * len(_SIZES))
def _insert(n: int, given_ids: bool) -> str:
    """The statement that writes n rows: with the ids given (SQLite), or returning them (PostgreSQL)."""
    columns = ("id",) * given_ids + _AUDIT_COLUMNS
    row = "(" + ", ".join("?" * len(columns)) + ")"
    return (f"insert into audit ({', '.join(columns)}) values {', '.join([row] * n)}"
            + ("" if given_ids else " returning id"))


class AuditTrail:
    """Written in batches of statements of many rows: at each statement the writing thread lets go of the GIL
    and must win it back from the event loop's, which under load cost it some 100 us of CPU a row when
    each row was a statement of its own."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def insert(self, tx: Tx, rows: list[tuple[AuditRecord, int | None]]) -> list[int]:
        """Write decisions in tx, each with the status known by now (the proxy's rows come through an
        `AuditQueue`); their row ids, in order."""
        ids: list[int] = []
        # SQLite: ids given from the largest on (the write lock is held), where RETURNING costs a step (and the
        # GIL) a row; PostgreSQL's identity numbers the rows in the order they are listed
        next_id = tx.one("select coalesce(max(id), 0) + 1 from audit")[0] if self.backend.dialect == "sqlite" else None
        for run in _sized(rows):
            values = [_row(record, status) for record, status in run]
            if next_id is None:
                ids += [r["id"] for r in tx.rows(_insert(len(run), False), [v for row in values for v in row])]
            else:
                given = range(next_id, next_id + len(run))
                tx.one(_insert(len(run), True), [v for i, row in zip(given, values, strict=True) for v in (i, *row)])
                ids += given
                next_id += len(run)
        return ids

    @staticmethod
    def set_statuses(tx: Tx, statuses: list[tuple[int, float, int | None]]) -> None:
        """(row id, its `at`, status) of rows written before their status was known. A row is found by both:
        an id may have been given anew (SQLite numbers from the largest id, and the trail may have been
        cleared meanwhile), and a status must never land on another row. (The cast: PostgreSQL types a
        CASE of NULLs alone as text.)"""
        for run in _sized(statuses):
            cases = " ".join(["when ? then cast(? as integer)"] * len(run))
            rows = ", ".join(["(?, ?)"] * len(run))
            tx.one(f"update audit set status = case id {cases} end where (id, at) in (values {rows})",
                   [v for row_id, _, status in run for v in (row_id, status)]
                   + [v for row_id, at, _ in run for v in (row_id, at)])

    def __call__(self, *, user: str | None = None, runchat: str | None = None, since: float | None = None,
              limit: int = 1000) -> list[AuditRecord]:
        """The newest decisions first, filtered."""
        where, params = ["1 = 1"], []
        for clause, value in (("principal = ?", user), ("runchat = ?", runchat), ("at >= ?", since)):
            if value is not None:
                where.append(clause)
                params.append(value)
        with self.backend.read() as tx:
            rows = tx.rows(f"select * from audit where {' and '.join(where)} order by at desc, id desc limit ?",
                           [*params, limit])
        return [AuditRecord(**{**{k: r[k] for k in _AUDIT_COLUMNS},
                               "secrets": tuple(filter(None, (r["secrets"] or "").split(",")))}) for r in rows]


class Pending:
    """A row handed to the queue: its status may be set before or after it is written."""

    __slots__ = ("record", "status", "row_id", "dirty", "refused")

    def __init__(self, record: AuditRecord) -> None:
        self.record = record
        self.status = record.status  # once known (set here: no copy of the record for it)
        self.row_id: int | None = None  # once written
        self.dirty = False  # a status set after it was written (or while it was being written)
        self.refused = 0  # passes in which the store took a later row but not this one


class AuditQueue:
    """Audit rows on their way to the store, written in batches by a thread of their own.

    Nothing waits on the store but that thread: while the store refuses (locked by another process,
    a full disk, a database that is down), rows wait here and the thread tries again, backing off to
    RETRY_MAX; when the store is back they are written in order, and none is lost. At most `bound`
    rows wait: `add` returns None past it (the caller refuses to inject), and says so once in a log
    line until the queue drains."""

    def __init__(self, trail: AuditTrail, bound: int, on_failure=lambda: None) -> None:
        self.trail, self.bound, self.on_failure = trail, bound, on_failure
        self._lock = threading.Condition()
        self._new: list[Pending] = []  # not written yet
        self._dirty: list[Pending] = []  # written; their status changed since
        self._updating = 0  # statuses taken from _dirty by the batch being written
        self._closed = False
        self._said_full = False  # (once, until the queue drains)
        self._thread = threading.Thread(target=self._write_forever, name="sealgate-audit", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._new) + len(self._dirty) + self._updating

    def add(self, record: AuditRecord) -> Pending | None:
        """Queue a row; None if `bound` rows wait already (nothing is queued then). A refusal's row takes only
        the first half: refusals anyone can cause (no credential needed) never crowd out a value's row."""
        with self._lock:
            if self.waiting >= (self.bound // 2 if record.decision == "block" else self.bound) or self._closed:
                if not self._said_full:
                    self._said_full = True
                    log.error("sealgate: the audit queue is full (%d rows wait for the store); requests that "
                              "would inject are refused until it drains", self.bound)
                return None
            pending = Pending(record)
            self._wake_if_idle()
            self._new.append(pending)
            return pending

    def set_status(self, pending: Pending, status: int) -> None:
        """The status the worker got; written with the row, or after it."""
        with self._lock:
            pending.status = status
            if pending.row_id is not None and not pending.dirty:  # else the row is still to be written
                pending.dirty = True
                self._wake_if_idle()
                self._dirty.append(pending)

    def flush(self, timeout: float) -> bool:
        """Wait until every queued row is written (True), or timeout seconds have passed."""
        end = time.monotonic() + timeout
        with self._lock:
            while self.waiting and (left := end - time.monotonic()) > 0:
                self._lock.wait(min(left, 0.05))
            return not self.waiting

    def close(self, timeout: float) -> int:
        """Flush within timeout, then stop; the number of rows that could not be written."""
        self.flush(timeout)
        with self._lock:
            self._closed = True
            self._lock.notify_all()  # (the thread, if it waits for rows)
            lost = self.waiting
        self._thread.join(timeout=1)
        if lost:
            log.error("sealgate: %d audit rows could not be written before sealgate stopped", lost)
        return lost

    def _wake_if_idle(self) -> None:
        """Under the lock, before a row or status is queued: the thread waits for the first of a batch (an idle
        proxy's thread sleeps, where one that looked every BATCH_EVERY woke 50 times a second), and only for
        that one (a wake-up per row would cost a futex call and a hand-off of the GIL per request)."""
        if not self.waiting:
            self._lock.notify_all()  # (all: `flush` may wait on the same condition)

    def _write_forever(self) -> None:
        delay, said, busy_since = BATCH_EVERY, float("-inf"), None
        while True:
            with self._lock:
                while not self.waiting and not self._closed:
                    self._lock.wait()
            time.sleep(delay)  # rows gather meanwhile: one transaction for many, and no wake-up per request
            with self._lock:
                if self._closed:
                    return
            try:
                written = self._write_batch()
            except Exception as e:  # noqa: BLE001 - whatever it is, the rows wait and the thread goes on
                if isinstance(e, StoreBusy):  # another process's write (--workers, the CLI): ours comes next
                    busy_since = busy_since or time.monotonic()
                    if time.monotonic() - busy_since < BUSY_PATIENCE:
                        delay = BATCH_EVERY
                        continue
                self.on_failure()
                if time.monotonic() - said >= 1:  # said once a second at most: it is tried again
                    said = time.monotonic()
                    log.error("sealgate: audit rows wait (%d): %s", self.waiting, e)
                delay = min(RETRY_MAX, max(0.1, delay * 2))
                if self._drop_refused_rows():
                    delay = BATCH_EVERY
            else:
                delay, busy_since = BATCH_EVERY_BUSY if written >= BUSY_ROWS else BATCH_EVERY, None

    def _drop_refused_rows(self) -> bool:
        """After a failed batch: write its new rows one at a time. A row that fails although the store took a
        row after it may be one the store refuses for what it holds, which would hold up every row behind it
        for good: after REFUSED_MAX such passes it is dropped, with a log line. Rows that fail after the last
        one taken wait (an outage)."""
        with self._lock:
            rows = list(self._new[:BATCH_MAX])
        outcomes: list[int | None] = []
        busy: set[int] = set()  # rows that met another process's lock: nothing said about what they hold
        for p in rows:
            row_id = None
            try:
                with self.trail.backend.batch(wait=False) as tx:
                    [inserted] = self.trail.insert(tx, [(p.record, p.status)])
                row_id = inserted  # only once committed
            except StoreBusy:
                busy.add(id(p))
            except Exception:  # noqa: BLE001
                pass
            outcomes.append(row_id)
        taken = [i for i, row_id in enumerate(outcomes) if row_id is not None]
        if not taken:
            return False
        with self._lock:
            gone = set()
            for p, row_id in zip(rows[:taken[-1] + 1], outcomes, strict=False):
                if row_id is not None:
                    gone.add(id(p))
                    p.row_id, p.dirty = row_id, True
                    self._dirty.append(p)  # its status, if set meanwhile, goes with the next batch
                    continue
                if id(p) in busy:
                    continue
                p.refused += 1
                if p.refused >= REFUSED_MAX:
                    gone.add(id(p))
                    self.on_failure()
                    log.error("sealgate: an audit row the store refuses was dropped (%s %s %s)", p.record.decision,
                              p.record.method, p.record.origin)
            self._new = [p for p in self._new if id(p) not in gone]
            self._lock.notify_all()
        return True

    def _write_batch(self) -> int:
        """One transaction of what waits; the number of new rows it wrote."""
        with self._lock:
            rows = [(p, p.status) for p in self._new[:BATCH_MAX]]
            updates, self._dirty = self._dirty[:BATCH_MAX], self._dirty[BATCH_MAX:]
            for p in updates:
                p.dirty = False
            statuses = [p.status for p in updates]
            self._updating = len(updates)  # still waiting (for `flush`) until committed
        try:
            with self.trail.backend.batch(wait=False) as tx:
                ids = self.trail.insert(tx, [(p.record, status) for p, status in rows])
                self.trail.set_statuses(tx, [(p.row_id, p.record.at, status)
                                             for p, status in zip(updates, statuses, strict=True)])
        except BaseException:
            with self._lock:
                self._updating = 0
                again = [p for p in updates if not p.dirty]
                for p in again:
                    p.dirty = True
                self._dirty[:0] = again
            raise
        with self._lock:
            self._updating = 0
            del self._new[:len(rows)]
            for (p, status), row_id in zip(rows, ids, strict=True):
                p.row_id = row_id
                if p.status != status:  # a status set while it was being written
                    p.dirty = True
                    self._dirty.append(p)
            if self._said_full and self.waiting < max(1, self.bound // 2):  # (bound 1: a refusal's half is 0 rows)
                log.warning("sealgate: the audit queue drains (%d rows wait)", self.waiting)
                self._said_full = False
            self._lock.notify_all()
        return len(rows)
