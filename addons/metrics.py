"""sealgate's Prometheus metrics, one registry per proxy (so tests can run several in a
process), with the process collector's memory and CPU for free. Labels are codes only:
never a value, a name a worker chose, or a path."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
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
        self.audit_queue_full = Counter(
            "sealgate_audit_queue_full", "Audit rows the full queue could not take (each injecting one refused).",
            registry=r)
        self.closed = Counter("sealgate_connections_closed", "Worker connections sealgate closed, by reason.",
                              ["reason"], registry=r)
        self.sizes = Gauge("sealgate_bounded", "How full each bounded queue and cache is, by name.", ["name"],
                           registry=r)
        self.latency = Histogram("sealgate_request_duration_seconds",
                                 "From the request's first byte to the response's last.", buckets=BUCKETS, registry=r)

    def size(self, name: str, read: Callable[[], float]) -> None:
        """Report a queue's or a cache's size as sealgate_bounded{name}, read when scraped."""
        self.sizes.labels(name).set_function(read)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
