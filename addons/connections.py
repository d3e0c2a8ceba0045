"""Bounds on connections: how many, for how long, and how a stopping proxy lets them finish.

- Worker connections: at most `max_connections` open (at the limit the oldest connection that has
  shown no credential and has no exchange in flight is closed to make room; without one, a new
  connection gets 503 `proxy_busy` and is closed before a byte is read), at most `max_session_connections` of one session (429
  `too_many_connections`, at its CONNECT or first request), and each must bring a complete request
  head within `header_timeout` of opening or of its previous exchange ending (a trickling client, or
  an idle keep-alive connection, is closed then).
- Upstreams: `upstream_timeout` to connect, and again from the request having gone to the response
  beginning; past it the worker gets 504 `upstream_timeout` and the upstream connection is dropped.
- Draining (SIGTERM): no new connection is taken, idle ones are closed, and each busy one is closed
  once its exchange ends.

Refusals of a request leave by the recorder (the one exit); a connection refused before any request
was read gets the problem+json on the wire, a metric and a log line, and no audit row (no request).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import connection, ctx, http

from . import internals
from .errors import Refusal
from .metrics import Metrics
from .sessions import Session

log = logging.getLogger("sealgate")

DRAIN_IDLE_AFTER = 1.0  # seconds a drained HTTP/2 connection's last answer has to reach the worker
SWEEP_EVERY = 0.25  # seconds between looks at the deadlines (a timer per request cost more than this)


@dataclass
class Limits:
    upstream_timeout: float = 120
    header_timeout: float = 30
    max_connections: int = 2000
    max_session_connections: int = 100
    max_head_bytes: int = 65536


@dataclass
class _Worker:
    """One worker connection: its session (once known), exchanges in flight, the head deadline."""

    session: str | None = None
    in_flight: int = 0
    deadline: float | None = None  # (monotonic) the next head is due by then; None: an exchange is in flight


class Connections:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.limits = Limits()
        self.workers: dict[connection.Client, _Worker] = {}
        self.per_session: Counter[str] = Counter()
        self.flows: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()  # exchanges in flight
        # upstream connections being opened, and flows sent: when sealgate gives up on them, and how (given the
        # key: a closure holding it would keep the key alive)
        self.waiting: weakref.WeakKeyDictionary[object, tuple[float, Callable[[object], bool]]] = \
            weakref.WeakKeyDictionary()
        self.draining = False
        self._sweeper: asyncio.Task | None = None
        self._said_busy = float("-inf")
        metrics.size("connections", lambda: len(self.workers))

    # worker connections ----------------------------------------------------------------------

    def connected(self, client: connection.Client) -> None:
        if not self.draining and len(self.workers) >= self.limits.max_connections:
            self._evict_one_without_session()
        if self.draining or len(self.workers) >= self.limits.max_connections:
            why = "the proxy is stopping" if self.draining else \
                f"the proxy has {len(self.workers)} connections open, its limit (max_connections)"
            refusal = Refusal("proxy_busy", f"{why}; try again shortly")
            internals.refuse_connection(ctx.master, client, refusal.http_response())
            self.metrics.blocks.labels(refusal.code).inc()
            if (now := time.monotonic()) - self._said_busy >= 1:  # a flood is said once a second
                self._said_busy = now
                log.warning("sealgate: connection refused: %s", refusal.detail)
            return
        self.workers[client] = _Worker()
        self._await_head(client)

    def _evict_one_without_session(self) -> None:
        """At the limit, the oldest connection that never showed a credential makes room (anyone can open
        those; a session's own are bounded by max_session_connections)."""
        for client, worker in self.workers.items():
            if worker.session is None and worker.deadline is not None:  # idle between heads, or never sent one
                self.metrics.closed.labels("evicted").inc()
                self.disconnected(client)
                internals.close_client(ctx.master, client)
                return

    def disconnected(self, client: connection.Client) -> None:
        if (worker := self.workers.pop(client, None)) is None:
            return
        if worker.session is not None:
            self.per_session[worker.session] -= 1
            if self.per_session[worker.session] <= 0:
                del self.per_session[worker.session]

    def admit(self, flow: http.HTTPFlow, session: Session) -> Refusal | None:
        """A connection counts against its session from its first authenticated head."""
        worker = self.workers.get(flow.client_conn)
        if worker is None or worker.session is not None:
            return None
        if self.per_session[session.id] >= self.limits.max_session_connections:
            return Refusal("too_many_connections", f"session {session.id} has {self.per_session[session.id]} "
                           "connections open, its limit (max_session_connections); reuse one or close some")
        worker.session = session.id
        self.per_session[session.id] += 1
        return None

    def head_too_large(self) -> bytes:
        """The answer to an HTTP/1 request head over max_head_bytes (`internals.limit_request_heads` sends it)."""
        self.metrics.blocks.labels("request_head_too_large").inc()
        return self._head_too_large().http_response()

    def head_refusal(self, request: http.Request) -> Refusal | None:
        """An HTTP/2 head over max_head_bytes (HTTP/1 ones never get this far: `internals.limit_request_heads`)."""
        if request.is_http2 and sum(len(k) + len(v) + 32 for k, v in request.headers.fields) + \
                len(request.path) > self.limits.max_head_bytes:
            return self._head_too_large()
        return None

    def _head_too_large(self) -> Refusal:
        return Refusal("request_head_too_large",
                       f"a request head may have at most {self.limits.max_head_bytes} bytes (max_head_bytes)")

    def began(self, flow: http.HTTPFlow) -> None:
        """A request head arrived."""
        if (worker := self.workers.get(flow.client_conn)) is None or flow in self.flows:
            return
        self.flows.add(flow)
        worker.in_flight += 1
        worker.deadline = None

    def ended(self, flow: http.HTTPFlow) -> None:
        """An exchange ended (answered, failed, or its WebSocket closed): the next head is due."""
        self._stop_waiting(flow)
        if flow not in self.flows:
            return
        self.flows.discard(flow)
        if (worker := self.workers.get(flow.client_conn)) is None:
            return
        worker.in_flight = max(0, worker.in_flight - 1)
        if self.draining and flow.response is not None and not flow.response.is_http2:
            flow.response.headers["Connection"] = "close"  # mitmproxy closes it once the answer is out
        if not worker.in_flight:
            self._await_head(flow.client_conn)

    def _await_head(self, client: connection.Client) -> None:
        if (worker := self.workers.get(client)) is not None:
            worker.deadline = time.monotonic() + (DRAIN_IDLE_AFTER if self.draining else self.limits.header_timeout)

    # deadlines: numbers set per request, one task that looks every SWEEP_EVERY seconds -----------------

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            try:
                self.sweep(time.monotonic())
            except Exception as e:  # noqa: BLE001 - the deadlines must go on being kept
                log.error("sealgate: %s while keeping connection deadlines", e.__class__.__name__)

    def sweep(self, now: float) -> None:
        """Close the worker connections whose head is overdue; give up on the upstreams that are."""
        for client, worker in [(c, w) for c, w in self.workers.items() if w.deadline is not None and w.deadline <= now]:
            worker.deadline = None
            self.metrics.closed.labels("draining" if self.draining else "header_timeout").inc()
            internals.close_client(ctx.master, client)
        for key, (due, give_up) in [(k, v) for k, v in self.waiting.items() if v[0] <= now]:
            self.waiting.pop(key, None)
            if give_up(key):
                self.metrics.closed.labels("upstream_timeout").inc()

    # upstreams -------------------------------------------------------------------------------

    def dialling(self, client: connection.Client, server: connection.Server) -> None:
        """An upstream connection is being opened: it has upstream_timeout to be."""
        self._wait(server, functools.partial(_give_up_dial, client))

    def dialled(self, server: connection.Server) -> None:
        self._stop_waiting(server)

    def sent(self, flow: http.HTTPFlow) -> None:
        """The request has gone: its answer has upstream_timeout to begin."""
        self._wait(flow, _give_up_answer)

    def answering(self, flow: http.HTTPFlow) -> None:
        self._stop_waiting(flow)

    def _wait(self, key: object, give_up: Callable[[object], bool]) -> None:
        self.waiting[key] = (time.monotonic() + self.limits.upstream_timeout, give_up)

    def _stop_waiting(self, key: object) -> None:
        self.waiting.pop(key, None)

    # stopping --------------------------------------------------------------------------------

    def drain(self) -> None:
        """Take no new connection; close the idle ones now, the busy ones as their exchanges end."""
        self.draining = True
        for client, worker in list(self.workers.items()):
            if not worker.in_flight:
                self._await_head(client)

    @property
    def busy(self) -> int:
        """Worker connections still open."""
        return len(self.workers)


def _give_up_dial(client: connection.Client, server: connection.Server) -> bool:
    return internals.abort_upstream(ctx.master, client, server)


def _give_up_answer(flow: http.HTTPFlow) -> bool:
    return internals.abort_upstream(ctx.master, flow.client_conn, flow.server_conn, flow)


class Undecided:
    """An addon after mitmproxy's NextLayer: mitmproxy holds what a connection sends until it can tell the
    protocol (a whole TLS ClientHello, parsed again on every read, or a tunnel's first head), without bound;
    past max_head_bytes, still undecided, the connection is closed."""

    def __init__(self, connections: Connections) -> None:
        self.connections = connections

    def next_layer(self, nextlayer) -> None:
        if nextlayer.layer is None and len(nextlayer.data_client()) > self.connections.limits.max_head_bytes:
            self.connections.metrics.closed.labels("undecided").inc()
            nextlayer.layer = internals.closing_layer(nextlayer.context)
