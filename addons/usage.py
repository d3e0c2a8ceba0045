"""Requests counted against secrets' caps and rates, per fixed window, in the store: one atomic statement
per request (an upsert that returns the new count), so every proxy on the store shares the count and a
restart keeps it.
"""

from __future__ import annotations

import math
import time

from .policy import Limit
from .sql import Backend

_COUNT_USE = ("insert into secret_usage (owner, name, kind, start, count) values (?, ?, ?, ?, 1) "
              "on conflict(owner, name, kind) do update set "
              "count = case when secret_usage.start >= excluded.start then secret_usage.count + 1 else 1 end, "
              "start = case when secret_usage.start >= excluded.start then secret_usage.start else excluded.start end "
              "returning count")  # a node whose clock is behind counts in the newest window, never resets it


class UsageCounters:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def count(self, owner: str, name: str, kind: str, limit: Limit, now: float | None = None) -> tuple[int, int]:
        """One more request against a secret's limit: (the count in this window, seconds until the next)."""
        start, left = limit.window(time.time() if now is None else now)
        (count,) = self.backend.one(_COUNT_USE, [owner, name, kind, start])
        return count, max(1, math.ceil(left))

    def of(self, owner: str) -> dict[tuple[str, str], tuple[float, int]]:
        """(name, kind) -> (window start, count): what `secret list` shows against the limits."""
        with self.backend.read() as tx:
            return {(r["name"], r["kind"]): (r["start"], r["count"])
                    for r in tx.rows("select * from secret_usage where owner = ?", [owner])}
