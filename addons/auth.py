"""Proxy authentication: which session a request belongs to, or why none.

The session credential comes in `Proxy-Authorization` (Basic, `session id:credential`): once
per CONNECT tunnel, or on every plain-http request. The header is removed either way, so a
credential is never forwarded upstream nor kept in a flow.
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http

from . import bodies, inject, sessions
from .errors import Refusal
from .flowstate import FlowStates
from .store import SecretStore, StoreError

HINT = "use the proxy_url of `sealgate session issue`"


class Authenticator:
    def __init__(self, store: Callable[[], SecretStore], states: FlowStates) -> None:
        self.store, self.states = store, states

    def tunnel(self, flow: http.HTTPFlow) -> sessions.Session | Refusal:
        """A CONNECT: the session its credentials name, remembered for the whole tunnel."""
        found = self._from_header(flow)
        if isinstance(found, sessions.Session):
            self.states.tunnels[flow.client_conn] = found
        return found

    def request(self, flow: http.HTTPFlow) -> sessions.Session | Refusal:
        """A request: in a tunnel, the tunnel's session while it lives; else its own credentials."""
        session = self.states.tunnels.get(flow.client_conn)
        if session is None:
            return self._from_header(flow)
        take_credentials(flow.request.headers)  # never forward a credential
        return self.live(session)

    def live(self, session: sessions.Session) -> sessions.Session | Refusal:
        """The session, if it has not expired nor been revoked on any node since it was checked (the
        store's cache: no database read unless the store changed). When the store cannot say, refused:
        its response could not be checked against the principal's values either."""
        if session.expired():
            return Refusal("proxy_auth_required", f"this session has expired; {HINT}")
        try:
            current = self.store().session(session.id)
        except StoreError as e:
            return Refusal("store_unavailable", f"cannot check the session: {e}")
        if current is None:
            return Refusal("proxy_auth_required", f"this session was revoked; {HINT}")
        return session

    def _from_header(self, flow: http.HTTPFlow) -> sessions.Session | Refusal:
        header = take_credentials(flow.request.headers)
        decoded = inject.decode_basic(header) or b""
        session_id, _, credential = decoded.decode("utf-8", "replace").partition(":")
        try:
            session = sessions.authenticate(self.store(), session_id, credential)
        except StoreError as e:
            return Refusal("store_unavailable", f"cannot check the proxy credentials: {e}")
        if session is None:
            why = "no proxy credentials were sent" if not header else "the proxy credentials are invalid or expired"
            return Refusal("proxy_auth_required", f"{why}; {HINT}")
        return session


def take_credentials(headers: http.Headers) -> str:
    """Remove every Proxy-Authorization field; their values as `Headers.pop` gives them (joined by ", "),
    "" if none."""
    return b", ".join(bodies.take_headers(headers, CREDENTIALS)).decode("utf-8", "surrogateescape")


CREDENTIALS = frozenset({b"proxy-authorization"})
