"""sealgate's Prometheus metrics, one registry per proxy (so tests can run several in a
process), with the process collector's memory and CPU for free. Labels are codes only:
never a value, a name a worker chose, or a path."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter("sealgate_requests", "Requests of authenticated sessions.", registry=r)
        self.injections = Counter("sealgate_injections",
                                  "Requests into which at least one secret was injected.", registry=r)
        self.blocks = Counter("sealgate_blocks", "Requests refused, by code.", ["code"], registry=r)
        self.audit_failures = Counter("sealgate_audit_failures", "Audit records that could not be written.",
                                      registry=r)
        self.latency = Histogram("sealgate_request_duration_seconds",
                                 "From the request's first byte to the response's last.", buckets=BUCKETS, registry=r)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
