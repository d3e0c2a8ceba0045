"""The audit trail: one row per decision (never a value, a query string or a credential).

Written on the request path (one statement per row, and one for the status once the response is
known), read by `sealgate audit` and the platform API.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sql import Backend


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
_AUDIT_INSERT = (f"insert into audit ({', '.join(_AUDIT_COLUMNS)}) values ({', '.join('?' * len(_AUDIT_COLUMNS))}) "
                 "returning id")


class AuditTrail:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def add(self, record: AuditRecord) -> int:
        """Write one decision; its row id, for the status once the response is known."""
        row = {**record.__dict__, "secrets": ",".join(record.secrets)}
        return self.backend.one(_AUDIT_INSERT, [row[c] for c in _AUDIT_COLUMNS])[0]

    def set_status(self, row_id: int, status: int) -> None:
        self.backend.one("update audit set status = ? where id = ?", [status, row_id])

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
