"""What sealgate knows about each flow and each client connection, kept beside mitmproxy's
objects (weakly: it goes when they do), never inside `flow.metadata`, which flow files and
the dashboard copy."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from mitmproxy import connection, http

from . import origins, sessions
from .audit import Pending
from .scrub import Scrubber

Fields = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class Summary:
    """A request as logs, metrics and the audit trail show it: taken before anything is
    filled, so they are built from the placeholder form by construction. No query string."""

    method: str
    origin: str
    path: str

    @classmethod
    def of(cls, request: http.Request) -> Summary:
        return cls(_text(request.method), _text(origins.serialise(request.scheme, request.host, request.port)),
                   _text(request.path.split("?", 1)[0]))


_CONTROLS = {i: f"\\x{i:02x}" for i in (*range(32), 127)}


def _text(raw: str) -> str:
    """Valid text, whatever bytes a worker sent (mitmproxy keeps a non-UTF-8 byte as a lone surrogate,
    which no store or log accepts), and no control character (PostgreSQL refuses a NUL in text: one such
    row would hold up the audit trail): such a byte is written as \\xNN."""
    return raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").translate(_CONTROLS)


@dataclass
class Sent:
    """The placeholder form of a filled request, put back once the request has gone out."""

    path: bytes
    fields: Fields
    raw_content: bytes | None
    trailers: Fields | None


@dataclass
class FlowState:
    """One flow of an authenticated session."""

    session: sessions.Session
    scrubber: Scrubber  # the session's: shared, so values it learns reach every flow of it
    summary: Summary
    sent: Sent | None = None  # the placeholder form, until the request has gone out
    injected: bool = False  # a value went out with this flow
    audit: list[Pending] = field(default_factory=list)  # rows of its allows (head, body, trailers) awaiting the status
    links: dict[str, str] = field(default_factory=dict, repr=False)  # linked accounts filled: env name -> token
    retry: bool = False  # answered 401 with a linked account's token: refresh and send again once


class FlowStates:
    """sealgate's state per flow and per client connection (a CONNECT tunnel's or a WebSocket's session)."""

    def __init__(self) -> None:
        self.flows: weakref.WeakKeyDictionary[http.HTTPFlow, FlowState] = weakref.WeakKeyDictionary()
        self.tunnels: weakref.WeakKeyDictionary[connection.Client, sessions.Session] = weakref.WeakKeyDictionary()
        self.websockets: weakref.WeakKeyDictionary[connection.Client, sessions.Session] = weakref.WeakKeyDictionary()

    def get(self, flow: http.HTTPFlow) -> FlowState | None:
        return self.flows.get(flow)

    def start(self, flow: http.HTTPFlow, session: sessions.Session, scrubber: Scrubber) -> FlowState:
        state = self.flows[flow] = FlowState(session, scrubber, Summary.of(flow.request))
        return state

    def session_of(self, flow: http.HTTPFlow) -> sessions.Session | None:
        """The session a flow belongs to, known from the flow or from its tunnel."""
        state = self.flows.get(flow)
        return state.session if state else self.tunnels.get(flow.client_conn)

    def restore_request(self, flow: http.HTTPFlow) -> None:
        """Put the placeholder form back: what the dashboard, flow files and errors may show."""
        state = self.flows.get(flow)
        if state is not None and (sent := state.sent) is not None:
            state.sent = None
            flow.request.data.path = sent.path
            flow.request.headers.fields = sent.fields
            flow.request.raw_content = sent.raw_content
            if sent.trailers is not None and flow.request.trailers is not None:
                flow.request.trailers.fields = sent.trailers
