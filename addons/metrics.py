"""Counters and a latency histogram, rendered in Prometheus' text format (pure)."""

from __future__ import annotations

import bisect
from collections import Counter

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.requests = 0
        self.injections = 0
        self.blocks: Counter[str] = Counter()
        self.audit_failures = 0
        self._latency_counts = [0] * (len(BUCKETS) + 1)
        self._latency_sum = 0.0

    def observe_latency(self, seconds: float) -> None:
        self._latency_counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._latency_sum += seconds

    def render(self) -> str:
        lines = [
            "# HELP sealgate_requests_total Requests of authenticated sessions.",
            "# TYPE sealgate_requests_total counter",
            f"sealgate_requests_total {self.requests}",
            "# HELP sealgate_injections_total Requests into which at least one secret was injected.",
            "# TYPE sealgate_injections_total counter",
            f"sealgate_injections_total {self.injections}",
            "# HELP sealgate_blocks_total Requests refused, by code.",
            "# TYPE sealgate_blocks_total counter",
            *(f'sealgate_blocks_total{{code="{code}"}} {n}' for code, n in sorted(self.blocks.items())),
            "# HELP sealgate_audit_failures_total Audit records that could not be written.",
            "# TYPE sealgate_audit_failures_total counter",
            f"sealgate_audit_failures_total {self.audit_failures}",
            "# HELP sealgate_request_duration_seconds From the request's first byte to the response's last.",
            "# TYPE sealgate_request_duration_seconds histogram",
        ]
        total = 0
        for bound, n in zip((*BUCKETS, float("inf")), self._latency_counts, strict=True):
            total += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'sealgate_request_duration_seconds_bucket{{le="{le}"}} {total}')
        lines += [f"sealgate_request_duration_seconds_sum {self._latency_sum}",
                  f"sealgate_request_duration_seconds_count {total}"]
        return "\n".join(lines) + "\n"
