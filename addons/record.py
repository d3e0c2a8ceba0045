"""The one exit: every decision is answered, logged, counted and audited here.

A refusal leaves by `Recorder.refuse`, whatever found it (proxy authentication, the egress
check at CONNECT, the decision, an unreadable body, an internal error): the worker gets
sealgate's own answer (a problem+json response, or a closed connection where the head has
gone), and the log line, `sealgate_blocks_total{code}` and the audit row follow in the same
call. Everything written is built from the flow's `Summary`, taken before anything was
filled, never from a filled request.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable

from mitmproxy import ctx, http

from . import internals, logfmt, sessions
from .audit import AuditQueue, AuditRecord, Pending
from .decision import Allow
from .errors import Refusal
from .flowstate import FlowStates, Summary
from .metrics import Metrics

log = logging.getLogger("sealgate")
TEXT_MAX = 2048  # characters of a method, origin or path an audit row keeps: the queue's bound is in rows


class Answer(enum.Enum):
    """How a refused flow is answered."""

    RESPOND = "respond"  # a problem+json response; nothing was sent upstream
    CUT = "cut"  # part of a streamed body has gone: cut the upstream connection, close the worker's
    CLOSE_WEBSOCKET = "close_websocket"  # a refusal message, then close code 1008
    KILL = "kill"  # close the connection
    RESET = "reset"  # HTTP/2: reset the stream (its body is not read); the connection's other streams go on


class LaterLines:
    """Log lines written once the event that made them is handled: an allowed request is sent upstream first,
    and the logging (the scrub filter, the formatting, a write: some 3% of the proxy's work per request) is
    done while the upstream answers, not before. A line is made at once (its audit row was queued before:
    that decides whether the request may go), and each is written once, in order. `stop` writes what waits
    as sealgate stops (its `done`, while the log and its scrub filter are there); after it, and with no
    event loop running, a line is written at once."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write
        self._lines: list[str] = []
        self._stopped = False

    def add(self, line: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or self._stopped:
            self.write(line)
            return
        if not self._lines:
            loop.call_soon(self.flush)
        self._lines.append(line)

    def flush(self) -> None:
        """Write the lines made so far; a line whose write raises (a log filter's bug) does not keep the
        others from going, and the first error is raised once they have."""
        lines, self._lines = self._lines, []
        failed: Exception | None = None
        for line in lines:
            try:
                self.write(line)
            except Exception as e:  # noqa: BLE001 - raised below, once the other lines are written
                if failed is None:
                    failed = e
        if failed is not None:
            raise failed

    def stop(self) -> None:
        self._stopped = True
        self.flush()


class Recorder:
    def __init__(self, queue: Callable[[], AuditQueue | None], metrics: Metrics, states: FlowStates) -> None:
        self.queue, self.metrics, self.states = queue, metrics, states
        self.lines = LaterLines(log.info)  # the decisions' lines

    def refuse(self, flow: http.HTTPFlow, refusal: Refusal, answer: Answer = Answer.RESPOND) -> None:
        """Answer the flow with the refusal, then log, count and audit it."""
        flow.metadata["sealgate.refusal"] = str(refusal)
        status = refusal.status
        self.answered(flow, status if answer is Answer.RESPOND else 0)  # rows of what went before it
        if answer is Answer.RESPOND:
            flow.response = http.Response.make(refusal.status, refusal.problem_json(), refusal.headers())
            if flow.request.method == "CONNECT":
                flow.response.headers["Connection"] = "close"  # a refused tunnel is of no further use
        else:
            status = 0
            if answer is Answer.CUT:
                internals.cut_connections(ctx.master, flow.client_conn, flow.server_conn)
            elif answer is Answer.CLOSE_WEBSOCKET and flow.websocket is not None:
                ctx.master.commands.call("inject.websocket", flow, True, refusal.problem_json(), True)
                flow.websocket.close_code, flow.websocket.close_reason = 1008, refusal.code
            if flow.killable:
                flow.kill()
            if answer is Answer.KILL:
                internals.close_client(ctx.master, flow.client_conn)
        self.metrics.blocks.labels(refusal.code).inc()
        self._write(flow, refusal, (), status)

    def allowed(self, flow: http.HTTPFlow, result: Allow) -> Refusal | None:
        """A request may go, filled: log, count and audit it (its status comes later). A value never goes
        unaudited: when the audit trail cannot take the row, the request is refused instead. Placeholders
        forwarded as they are (on-disallowed forward) get a row of their own."""
        if result.forwarded:
            self._write(flow, Refusal("origin_not_allowed", "forwarded as a placeholder"), result.forwarded, None,
                        decision="forward")
        names = result.secret_names
        pending = self._write(flow, None, names, None)
        if pending is None and names:
            return Refusal("store_unavailable", "the audit trail cannot take more rows (the store is not taking "
                           "writes), and no secret goes unaudited")
        if names:
            self.metrics.injections.inc()
        if (state := self.states.get(flow)) is not None and pending is not None and flow.websocket is None:
            state.audit.append(pending)
        return None

    def answered(self, flow: http.HTTPFlow, status: int) -> None:
        """The status the worker got for an allowed request (0: the connection was closed)."""
        state = self.states.get(flow)
        if state is None or not state.audit or (queue := self.queue()) is None:
            return
        pending, state.audit = state.audit, []
        for p in pending:
            queue.set_status(p, status)

    def _write(self, flow: http.HTTPFlow, refusal: Refusal | None, names: tuple[str, ...],
               status: int | None, decision: str | None = None) -> Pending | None:
        state = self.states.get(flow)
        session = self.states.session_of(flow)
        # no state: refused before the flow was taken on (407, CONNECT), so nothing was filled
        summary = state.summary if state else Summary.of(flow.request)
        record = AuditRecord(
            at=time.time(), **_who(session), client=_client(flow), secrets=names, method=summary.method[:TEXT_MAX],
            origin=summary.origin[:TEXT_MAX], path=summary.path[:TEXT_MAX],
            decision=decision or ("block" if refusal else "allow"),
            code=refusal.code if refusal else None,
            status=101 if status is None and flow.websocket is not None else status,  # a message on an open socket
        )
        pending = queue.add(record) if (queue := self.queue()) is not None else None
        if pending is None:
            self.metrics.audit_queue_full.inc()
            if refusal is None and names:
                return None  # refused for it by the caller, which logs that instead
        self.lines.add("sealgate " + " ".join(f"{k}={logfmt.field(v)}" for k, v in (
            ("decision", record.decision), ("code", record.code or "-"), ("session", record.session or "-"),
            ("principal", record.principal or "-"), ("runchat", record.runchat or "-"),
            ("secrets", ",".join(names) or "-"), ("method", record.method), ("origin", record.origin),
            ("path", record.path))))
        return pending


def _who(session: sessions.Session | None) -> dict[str, str]:
    if session is None:
        return {"session": "", "runchat": "", "instance": "", "principal": ""}
    r = session.record
    return {"session": r.id, "runchat": r.runchat, "instance": r.instance, "principal": r.principal}


def _client(flow: http.HTTPFlow) -> str:
    peer = flow.client_conn.peername
    return f"{peer[0]}:{peer[1]}" if peer else ""
