"""The mitmproxy addon: sealgate's hooks, in the order mitmproxy calls them.

Each hook gathers what it needs and delegates: `auth` says which session a request
belongs to, `dial` where the proxy may connect, `release` (the only caller of
`decision.decide`) fills a request or says why not, `scrubbing` cleans what comes back,
and `record` is the one exit every refusal leaves by (answer, log line, metric, audit
row). One class rather than one addon per concern: their order is the request path, and
separate addons would make it a hidden coupling in the addon chain.

Every flow hook fails closed: an exception answers the flow with `internal_error` (or
closes it) instead of letting mitmproxy carry on.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
from pathlib import Path

from mitmproxy import ctx, exceptions, http, tcp, tls
from mitmproxy.connection import Server
from mitmproxy.proxy import server_hooks

from . import bodies, internals, keys, oauth, origins, outbound, policy, providers, scrubbing
from .audit import AuditQueue
from .auth import Authenticator
from .connections import Connections, Limits
from .dial import Dialer
from .egress import EgressPolicy, parse_cidrs
from .errors import Refusal, error_page
from .flowstate import FlowStates
from .linked import Linked
from .metrics import Metrics
from .record import Answer, Recorder
from .release import Refused, Releaser, encoded_body_refusal
from .resend import Resender
from .scrub import Scrubber
from .scrubbing import Scrubbers
from .sessions import Session
from .store import KEY_NAME, SecretStore, StoreError
from .streams import StreamFilter

log = logging.getLogger("sealgate")

# Options of stock mitmdump's addons that rewrite or redirect a request after sealgate's
# request hook (or stream it past sealgate): with them, a value could go elsewhere.
_REFUSED_OPTIONS = ("map_remote", "map_local", "modify_headers", "modify_body", "server_replay",
                    "stream_large_bodies", "proxyauth", "upstream_auth", "ignore_hosts", "allow_hosts",
                    # flow files hold WebSocket messages as sent (filled), and flows in flight when it stops
                    "save_stream_file")
_OPTIONS = (  # name, default, help (all text)
    ("sealgate_data_dir", "", "Folder of sealgate's store and master key."),
    ("sealgate_store_url", "", "sqlite:///file or postgresql://user@host:port/db (default: the data dir's file)."),
    ("sealgate_on_disallowed", "block", "A placeholder bound for a destination its secret does not allow, when the "
     "secret does not say: block (refuse the request) or forward (it goes as it is, the value never does)."),
    ("sealgate_allow_private", "", "Comma-separated CIDRs the proxy may reach although loopback or private."),
    ("sealgate_guard_ports", "", "Comma-separated ports of sealgate's own services (dashboard, metrics, API), "
     "never reachable through it."),
    ("sealgate_providers_file", str(Path("config") / providers.FILE_NAME), "The linked-account providers shipped "
     "(absent: none)."),
    ("sealgate_providers", "", "A YAML file of linked-account providers added to (or overriding) those shipped."),
)
_INT_OPTIONS = (  # name, default, help (whole numbers; settings.py validates what users write)
    ("sealgate_audit_queue", 10000, "Audit rows that may wait for the store; past it, injecting requests get 503."),
    ("sealgate_upstream_timeout", 120, "Seconds to connect upstream, and from a request sent to its answer (504)."),
    ("sealgate_header_timeout", 30, "Seconds a worker connection has to bring a complete request head."),
    ("sealgate_max_head_bytes", 65536, "The largest request head taken (431)."),
    ("sealgate_max_connections", 2000, "Worker connections open at once (more: 503)."),
    ("sealgate_max_session_connections", 100, "Worker connections of one session open at once (more: 429)."),
)
H2_RESETS, H2_RESETS_WINDOW = 100, 10.0  # an HTTP/2 worker resetting more streams than this is closed
AUDIT_FLUSH = 10.0  # seconds a stopping proxy waits for the store to take the audit rows still queued
HEAD_REFUSAL_BODY_MAX = 64 * 1024  # a refused request bringing more (or of unknown length) is closed, not answered
WEBSOCKET_HISTORY = 100  # messages a WebSocket flow keeps (mitmproxy would keep all, for the socket's life)


RANGE_HEADERS = frozenset({b"range", b"if-range", b"request-range"})  # (an older name some servers still honour)


def _fail_closed(hook):
    """Run a flow hook; on any exception, refuse the flow with internal_error instead."""
    if inspect.iscoroutinefunction(hook):
        @functools.wraps(hook)
        async def run_async(self: Sealgate, flow) -> None:
            try:
                await hook(self, flow)
            except Exception as e:
                self._internal_error(flow, hook.__name__, e)
        return run_async

    @functools.wraps(hook)
    def run(self: Sealgate, flow) -> None:
        try:
            hook(self, flow)
        except Exception as e:
            self._internal_error(flow, hook.__name__, e)
    return run


class Wiring:
    """sealgate's parts, built once, and the options that configure them (the lifecycle hooks)."""

    def __init__(self, key_source: keys.KeySource | None = None) -> None:
        self.key_source = key_source  # None: the data dir's key file, or SEALGATE_MASTER_KEY / _KEY_HOOK
        self.store: SecretStore | None = None
        self.states = FlowStates()
        self.metrics = Metrics()
        self.dialer = Dialer()
        self.auth = Authenticator(self._store, self.states)
        self.linked = Linked(self._store)
        self.scrubbers = Scrubbers(self._store, self.linked.values)
        self.audit: AuditQueue | None = None
        self.recorder = Recorder(lambda: self.audit, self.metrics, self.states)
        self.connections = Connections(self.metrics)
        self.releaser = Releaser(self._store, self.scrubbers, self.recorder.allowed, self.auth.live, self.linked)
        self.resender = Resender(self.releaser.request, self.states, self.linked)
        self.metrics.size("audit_queue", lambda: self.audit.waiting if self.audit else 0)
        self.metrics.size("scrubbers", lambda: len(self.scrubbers.sessions))
        self.metrics.size("store_cache", lambda: len(self.store.cache) if self.store else 0)
        self.metrics.size("certificates", _certificates)

    # lifecycle ----------------------------------------------------------------------------

    def load(self, loader) -> None:
        for name, default, text in _OPTIONS:
            loader.add_option(name, str, default, text)
        for name, default, text in _INT_OPTIONS:
            loader.add_option(name, int, default, text)

    def configure(self, updated: set[str]) -> None:
        _refuse_unsafe_options()
        if updated & {"sealgate_data_dir", "sealgate_store_url", "sealgate_audit_queue"}:
            self._close_store()
            self.store = _open_store(self.key_source)
            self.audit = AuditQueue(self.store.audit, ctx.options.sealgate_audit_queue, self.metrics.audit_failures.inc)
        if "sealgate_on_disallowed" in updated:
            try:
                self.releaser.on_disallowed = policy.parse_on_disallowed(ctx.options.sealgate_on_disallowed)
            except ValueError as e:
                raise exceptions.OptionsError(f"sealgate_on_disallowed: {e}") from None
        if updated & {"sealgate_allow_private", "sealgate_guard_ports", "listen_port"}:
            self.dialer.policy = _egress_policy()
        self.connections.limits = Limits(*(getattr(ctx.options, f"sealgate_{f}") for f in Limits.__dataclass_fields__))
        if updated & {"sealgate_providers_file", "sealgate_providers"}:
            self.linked.registry = _registry()
        if updated & {"sealgate_allow_private", "sealgate_guard_ports", "listen_port", "ssl_verify_upstream_trusted_ca"}:
            self.resender.context = outbound.trust(ctx.options.ssl_verify_upstream_trusted_ca)
            self.linked.post = oauth.poster(self.dialer.policy, self.resender.context)

    def running(self) -> None:
        self.connections.start()
        for handler in logging.getLogger().handlers:
            handler.addFilter(self.scrubbers.log_filter)
        internals.wrap_websocket_send(
            lambda conn, event: scrubbing.websocket_control_frame(self._connection_scrubber(conn), event))
        internals.replace_error_pages(lambda status: (error_page(status).problem_json(), error_page(status).headers()))
        internals.skip_informational_responses()
        internals.http1_body_readers(lambda: self.connections.limits.max_head_bytes)
        internals.whole_tls_writes()
        internals.note_bodyless_requests()
        internals.forget_killed_streams()
        internals.answer_timeouts()
        internals.limit_request_heads(lambda: self.connections.limits.max_head_bytes, self.connections.head_too_large)
        internals.limit_h2_floods(H2_RESETS, H2_RESETS_WINDOW, lambda kind: self.metrics.closed.labels(f"h2_{kind}").inc())

    def done(self) -> None:
        try:
            self.recorder.lines.stop()  # (while the log and its scrub filter are there)
        finally:  # (a log filter's error keeps no audit row from being written)
            self.connections.stop()
            self._close_store()
            for handler in logging.getLogger().handlers:
                handler.removeFilter(self.scrubbers.log_filter)

    def _close_store(self) -> None:
        """Write what the audit queue holds (for as long as the shutdown grace allows), then close."""
        if self.audit is not None:
            self.audit.close(AUDIT_FLUSH)
            self.audit = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def flow_scrubber(self, flow: http.HTTPFlow) -> Scrubber:
        """The scrubber of the flow's own session (for the dashboard's copy): one principal's values,
        so another principal's many values cost this flow nothing. A flow without a session carried none."""
        state = self.states.get(flow)
        return state.scrubber if state else Scrubber()

    def _connection_scrubber(self, conn) -> Scrubber | None:
        """The current scrubber of the session a client connection (a WebSocket's, a tunnel's) belongs to."""
        session = self.states.websockets.get(conn) or self.states.tunnels.get(conn)
        return self.scrubbers.for_session(session) if session else None

    def _store(self) -> SecretStore:
        if self.store is None:
            raise StoreError("sealgate_data_dir is not set")
        return self.store


class Sealgate(Wiring):
    """The hooks, in the order mitmproxy calls them for a request."""

    # connect: who, and where to ---------------------------------------------------------

    def client_connected(self, client) -> None:
        self.connections.connected(client)

    def client_disconnected(self, client) -> None:
        self.connections.disconnected(client)
        # mitmproxy can end a connection's task without closing its socket (a close or an EOF that arrives
        # while the task waits for its event lock): the socket would stay open until garbage collection
        internals.close_client(ctx.master, client)

    @_fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        found = self.auth.tunnel(flow)
        if not isinstance(found, Refusal):
            found = self.connections.admit(flow, found)
        if found is not None:
            return self.recorder.refuse(flow, found)
        self.connections.began(flow)  # the dial is upstream_timeout's; the tunnel's first head is due once open

    def http_connected(self, flow: http.HTTPFlow) -> None:
        self.connections.ended(flow)

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        await self.dialer.server_connect(data)
        if not data.server.error:
            self.connections.dialling(data.client, data.server)

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        server = tls_start.conn
        if isinstance(server, Server) and server.address and not server.via:
            server.sni = server.address[0]  # always verify against the destination itself

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.dialer.dialled(data.server)
        self.connections.dialled(data.server)

    server_connect_error = server_connected

    @_fail_closed
    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self.connections.ended(flow)
        if (refusal := self.dialer.refusal(flow.server_conn)) is not None:
            self.recorder.refuse(flow, refusal)
        elif "sealgate.refusal" not in flow.metadata:  # mitmproxy's own answer (it quotes the target, the address
            # dialled and its advice), not one of ours: ours quotes nothing
            self.recorder.refuse(flow, error_page(504 if flow.server_conn.error == internals.UPSTREAM_TIMED_OUT else 502))

    # the request ----------------------------------------------------------------------------

    @_fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.connections.began(flow)
        found = self.connections.head_refusal(flow.request) or self.auth.request(flow)
        if not isinstance(found, Refusal) and (refusal := self.connections.admit(flow, found)) is not None:
            found = refusal
        if isinstance(found, Refusal):
            return self._refuse_head(flow, found)
        self.metrics.requests.inc()
        try:
            scrubber = self.scrubbers.for_session(found)
        except StoreError as e:
            return self._refuse_head(flow, Refusal("store_unavailable", f"cannot read this session's secrets: {e}"))
        state = self.states.start(flow, found, scrubber)
        flow.metadata["sealgate"] = _who(found)
        framing = bodies.Framing.of(flow.request.headers.fields)
        if (refusal := encoded_body_refusal(framing)) is not None:
            return self._refuse_head(flow, refusal)
        if scrubber:  # slices of a stored value, each too short to scrub, could be joined again
            bodies.take_headers(flow.request.headers, RANGE_HEADERS)
        if scrubbing.streams(framing, unknown_length=_body_of_unknown_length(flow.request)) and not \
                self.releaser.holds_body(flow, state):
            # The head goes out when this hook returns: check URL and headers now, the body as it flows.
            if await self._release(flow, with_body=False, refuse=self._refuse_head):
                flow.request.stream = StreamFilter(
                    self.releaser.stream_body(flow, state), internals.end_of_message,
                    lambda e: self._refuse_streamed(flow, e))
                scrubbing.reframe(flow.request, chunked=flow.server_conn.alpn != b"h2")

    @_fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        state = self.states.get(flow)
        if state is None:
            return self.recorder.refuse(flow, Refusal("proxy_auth_required", "this request has no session"))
        if flow.request.stream:  # head and body were checked as they went; the trailers go now
            if (refusal := self.releaser.trailers(flow, state)) is not None:
                return self.recorder.refuse(flow, refusal, Answer.CUT)
        elif not await self._release(flow, with_body=True):
            return
        self.connections.sent(flow)

    async def _release(self, flow: http.HTTPFlow, *, with_body: bool, refuse=None) -> bool:
        """Check the destination of a request whose connection is not open yet (plain http, absolute-form
        https, a re-dial), then fill the request; False if refused."""
        state = self.states.get(flow)
        assert state is not None
        refusal = None
        if not flow.server_conn.connected:
            refusal = await self.dialer.check_ahead(flow.client_conn, flow.request.host, flow.request.port)
        refusal = refusal or await self.releaser.request(flow, state, with_body=with_body)
        if refusal is not None:
            (refuse or self.recorder.refuse)(flow, refusal)
        return refusal is None

    def _refuse_head(self, flow: http.HTTPFlow, refusal: Refusal) -> None:
        """A refusal before the body is read: mitmproxy would still read and hold the whole body before
        answering, so a request bringing a large body, or one of unknown length, is closed instead (an
        HTTP/2 request: its stream is reset, and the connection's other streams go on)."""
        req = flow.request
        length = req.headers.get("content-length")
        unbounded = length is None and ("chunked" in req.headers.get("transfer-encoding", "").lower()
                                        or _body_of_unknown_length(req))
        large = unbounded or (length is not None and (not length.isdigit() or int(length) > HEAD_REFUSAL_BODY_MAX))
        self.recorder.refuse(flow, refusal, (Answer.RESET if req.is_http2 else Answer.KILL) if large else Answer.RESPOND)
        self.connections.ended(flow)  # a body it still sends (trickled, say) does not hold the connection open

    def _refuse_streamed(self, flow: http.HTTPFlow, e: Exception) -> None:
        """Part of the body has gone: cut the upstream connection, so it never sees a complete request."""
        if isinstance(e, Refused):
            refusal = e.refusal
        else:
            log.error("sealgate: %s while streaming a request body; the connection is cut", e.__class__.__name__)
            refusal = Refusal("internal_error", "sealgate could not check this request body; it was cut off")
        self.recorder.refuse(flow, refusal, Answer.CUT)

    # the response ---------------------------------------------------------------------------

    @_fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.connections.answering(flow)
        self.states.restore_request(flow)
        if (state := self.states.get(flow)) is not None and flow.response is not None:
            state.retry = self.resender.wanted(flow, state)
            if state.retry:
                flow.response.stream = False  # held whole: the answer to the request sent again replaces it
                return
            scrubbing.response_head(flow, lambda: self.scrubbers.for_session(state.session),
                                    lambda e: self._cut_response(flow, e))

    def _cut_response(self, flow: http.HTTPFlow, e: Exception) -> None:
        """Part of a streamed response has gone and the rest cannot be checked: cut both connections, so the
        worker sees a body cut off, never one that looks whole."""
        log.error("sealgate: a streamed response body could not be checked (%s); the connection is cut",
                  e.__class__.__name__)
        why = str(e) if isinstance(e, bodies.BodyError) else e.__class__.__name__  # (only sealgate's own text)
        self.recorder.refuse(flow, Refusal("unscrubbable_response", f"the streamed response cannot be checked: {why}"),
                             Answer.CUT)

    @_fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:
        try:
            await self._response(flow)
        finally:  # the next head is due once this exchange (a re-send included) is over
            if flow.websocket is None:
                self.connections.ended(flow)

    async def _response(self, flow: http.HTTPFlow) -> None:
        self.states.restore_request(flow)
        state = self.states.get(flow)
        if state is None or flow.response is None:
            return
        if state.retry:  # a linked account's token was refused: refresh it, send once more
            state.retry = False
            self.recorder.answered(flow, 401)
            if (refusal := await self.resender.resend(flow, state)) is not None:
                return self.recorder.refuse(flow, refusal)
        self.metrics.latency.observe(time.time() - flow.request.timestamp_start)
        if (refusal := scrubbing.response(flow, lambda: self.scrubbers.for_session(state.session))) is not None:
            return self.recorder.refuse(flow, refusal)  # the rows before it get the status of the refusal
        self.recorder.answered(flow, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        """A failed flow: the worker gets sealgate's error page (internals.replace_error_pages), and
        the error text, which may quote what the upstream sent, is replaced for logs and the dashboard."""
        self.connections.ended(flow)
        self.states.restore_request(flow)
        state = self.states.get(flow)
        if state is None:
            return
        self.recorder.answered(flow, 504 if internals.timed_out(flow) else 0)
        if flow.error is not None and flow.error.msg != flow.error.KILLED_MESSAGE:
            flow.error.msg = "the upstream failed or sent something that is not valid HTTP (details withheld)"

    # after an upgrade -----------------------------------------------------------------------

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.connections.ended(flow)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if (state := self.states.get(flow)) is not None:
            self.states.websockets[flow.client_conn] = state.session  # control frames find it, ws:// too

    @_fail_closed
    def websocket_message(self, flow: http.HTTPFlow) -> None:
        state = self.states.get(flow)
        if state is None or flow.websocket is None:
            return
        if len(flow.websocket.messages) > WEBSOCKET_HISTORY:
            del flow.websocket.messages[:-WEBSOCKET_HISTORY]
        message = flow.websocket.messages[-1]
        if not message.from_client:  # with the principal's values as they are now, not when it opened
            message.content = self.scrubbers.for_session(state.session).scrub(message.content)
        elif (refusal := self.releaser.websocket_message(flow, state, message)) is not None:
            message.drop()
            self.recorder.refuse(flow, refusal, Answer.CLOSE_WEBSOCKET)

    @_fail_closed
    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        scrubber = self._connection_scrubber(flow.client_conn)
        message = flow.messages[-1]
        if scrubber and not message.from_client:
            message.content = scrubber.scrub(message.content)

    def _internal_error(self, flow: http.HTTPFlow | tcp.TCPFlow, hook: str, e: Exception) -> None:
        log.error("sealgate: %s in %s; the flow is blocked", e.__class__.__name__, hook)
        refusal = Refusal("internal_error", "sealgate could not check this request; nothing was sent")
        if isinstance(flow, http.HTTPFlow):
            self.states.restore_request(flow)
            self.recorder.refuse(flow, refusal, Answer.RESPOND if flow.websocket is None else Answer.KILL)
        elif flow.killable:
            flow.kill()


def _certificates() -> int:
    """Certificates mitmproxy made for workers and keeps (its CertStore keeps 100 at most)."""
    tls = ctx.master.addons.get("tlsconfig") if hasattr(ctx, "master") else None
    return len({id(e) for e in tls.certstore.certs.values()}) if tls is not None and getattr(tls, "certstore", None) else 0


def _body_of_unknown_length(request: http.Request) -> bool:
    """An HTTP/2 request without Content-Length whose head did not end the stream: a body of unknown
    length follows (HTTP/1 marks one with chunked framing)."""
    return request.is_http2 and "content-length" not in request.headers and not internals.has_no_body(request)


def _open_store(source: keys.KeySource | None) -> SecretStore:
    """The store the options name, following every node's writes (listen)."""
    if not ctx.options.sealgate_data_dir:
        raise exceptions.OptionsError("sealgate_data_dir must name the folder of sealgate's store")
    data_dir = Path(ctx.options.sealgate_data_dir)
    try:
        source = source or keys.source(data_dir / KEY_NAME, os.environ.get(keys.ENV_VAR), os.environ.get(keys.HOOK_VAR))
        return SecretStore(data_dir, ctx.options.sealgate_store_url or None, source, listen=True)
    except StoreError as e:
        raise exceptions.OptionsError(str(e)) from None


def _refuse_unsafe_options() -> None:
    """Options (of mitmproxy or its stock addons) under which a value could go elsewhere or be shown."""
    try:
        internals.require()
    except internals.InternalsMissing as e:
        raise exceptions.OptionsError(str(e)) from None
    if ctx.options.ssl_insecure:
        raise exceptions.OptionsError("sealgate refuses ssl_insecure: secrets must only go over verified TLS")
    for name in _REFUSED_OPTIONS:
        if getattr(ctx.options, name, None):
            raise exceptions.OptionsError(f"sealgate refuses {name}: it would change requests after sealgate checked them")
    if getattr(ctx.options, "flow_detail", 0) > 2:
        raise exceptions.OptionsError("sealgate refuses flow_detail above 2: it would print WebSocket messages as "
                                      "sent, filled with values")
    if any(not mode.startswith("regular") for mode in getattr(ctx.options, "mode", ["regular"])):
        raise exceptions.OptionsError("sealgate runs only as a regular (forward) proxy")


def _registry() -> providers.Registry:
    base = ctx.options.sealgate_providers_file
    try:
        return providers.load(Path(base) if base else None, Path(p) if (p := ctx.options.sealgate_providers) else None)
    except providers.ProviderError as e:
        raise exceptions.OptionsError(str(e)) from None


def _egress_policy() -> EgressPolicy:
    try:
        allow = parse_cidrs(ctx.options.sealgate_allow_private)
    except ValueError as e:
        raise exceptions.OptionsError(f"sealgate_allow_private: {e}") from None
    guard_text = [p.strip() for p in ctx.options.sealgate_guard_ports.split(",") if p.strip()]
    if bad := [p for p in guard_text if not origins.is_port_text(p)]:
        raise exceptions.OptionsError(f"sealgate_guard_ports: {bad[0]!r} is not a port")
    guard = {int(p) for p in guard_text}
    guard.add(ctx.options.listen_port or 8080)
    return EgressPolicy(tuple(allow), frozenset(guard))


def _who(session: Session) -> dict[str, str]:
    """What the dashboard's comment column shows about a flow's session."""
    r = session.record
    return {"session": r.id, "principal": r.principal, "runchat": r.runchat, "instance": r.instance}
