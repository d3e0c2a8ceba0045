"""A request sent again, once, after the provider answered 401 to a linked account's token: the
token is refreshed (or the one another request refreshed meanwhile is taken), the request is
released again from its placeholder form (decided, counted and audited like any other), and sent
by sealgate itself to the address the first one was dialled to, over TLS verified as before.

Only a request whose body was held whole can be sent again; its answer replaces the 401 and is
scrubbed like any response.
"""

from __future__ import annotations

import functools
import ssl
import time
from collections.abc import Awaitable, Callable

from mitmproxy import http

from . import outbound
from .errors import Refusal
from .flowstate import FlowState, FlowStates
from .linked import Linked

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade",
              b"trailer", b"proxy-authorization", b"proxy-authenticate"}

Release = Callable[..., Awaitable[Refusal | None]]


class Resender:
    def __init__(self, release: Release, states: FlowStates, linked: Linked) -> None:
        self.release, self.states, self.linked = release, states, linked
        self.context: ssl.SSLContext | None = None  # the upstream trust, with the proxy's bundle (`configure`)

    def wanted(self, flow: http.HTTPFlow, state: FlowState) -> bool:
        """A 401 to a request that carried a linked account's token and whose body was held whole, unless the
        tokens it carried were themselves just got after a 401 (`Linked.worth_sending_again`)."""
        return (flow.response is not None and flow.response.status_code == 401 and bool(state.links)
                and not flow.request.stream and flow.server_conn.peername is not None
                and self.linked.worth_sending_again(state.session.principal, state.links))

    async def resend(self, flow: http.HTTPFlow, state: FlowState) -> Refusal | None:
        """Refresh, fill again and send again; the answer replaces flow.response."""
        peer = flow.server_conn.peername
        assert peer is not None and self.context is not None
        if (refusal := await self.release(flow, state, with_body=True, rejected=dict(state.links))) is not None:
            return refusal
        req = flow.request
        try:
            fields = [(k, v) for k, v in req.headers.fields if k.lower() not in HOP_BY_HOP]
            if "host" not in req.headers:
                fields.insert(0, (b"Host", (req.host_header or req.host).encode()))
            if req.raw_content or req.method in ("POST", "PUT", "PATCH"):
                fields = [(k, v) for k, v in fields if k.lower() != b"content-length"]
                fields.append((b"Content-Length", str(len(req.raw_content or b"")).encode()))
            started = time.time()
            reply = await outbound.off_loop(functools.partial(
                outbound.send, req.method, req.host, req.port, peer[0], req.data.path.decode("utf-8", "surrogateescape"),
                fields, req.raw_content or b"", context=self.context))
        except outbound.OutboundError as e:
            return Refusal("upstream_failed", f"the request sent again after refreshing the token failed: {e}")
        finally:
            self.states.restore_request(flow)
        headers = [(k, v) for k, v in reply.headers if k.lower() not in HOP_BY_HOP]
        if req.method != "HEAD" and not any(k.lower() == b"content-length" for k, _ in headers):
            headers.append((b"Content-Length", str(len(reply.body)).encode()))
        flow.response = http.Response(b"HTTP/1.1", reply.status, reply.reason.encode("latin-1", "replace"),
                                      http.Headers(headers), reply.body, None, started, time.time())
        return None
