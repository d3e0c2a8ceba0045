"""The mitmproxy addon: wires identity, egress, the decision and scrubbing into hooks.

Hooks gather facts and apply results; `decision.decide` is the only place that allows
or denies. Every hook fails closed: an exception blocks the flow rather than letting
mitmproxy carry on. mitmproxy types stay here; `addons/script.py` loads this into a
stock mitmdump.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import socket
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import connection, ctx, exceptions, http, tcp, tls, websocket
from mitmproxy.proxy import server_hooks

from addons import bodies, decision, inject, origins, placeholders, sessions
from addons.egress import EgressPolicy, parse_cidrs
from addons.errors import Refusal
from addons.inject import Context
from addons.metrics import Metrics
from addons.placeholders import Found
from addons.scrub import Scrubber
from addons.store import AuditRecord, SecretStore, StoreError
from addons.streams import StreamRewriter

log = logging.getLogger("sealgate")

REQUEST_BODY_LIMIT = 64 * 1024 * 1024  # decoded bytes scanned for placeholders
RESPONSE_BODY_LIMIT = 256 * 1024 * 1024  # decoded bytes scrubbed of values
STREAM_OVER = 1024 * 1024  # identity bodies larger than this (or of unknown length) stream through
SCRUBBER_GRACE = 3600  # seconds a session's scrubber outlives the session, for slow responses

Fields = tuple[tuple[bytes, bytes], ...]
# Options of stock mitmdump's addons that rewrite or redirect a request after sealgate's
# request hook (or stream it past sealgate): with them, a value could go elsewhere.
_REFUSED_OPTIONS = ("map_remote", "map_local", "modify_headers", "modify_body", "server_replay",
                    "stream_large_bodies", "proxyauth", "upstream_auth", "ignore_hosts", "allow_hosts")


def _fail_closed(hook):
    """Run a flow hook; on any exception, answer the flow with internal_error instead."""
    if inspect.iscoroutinefunction(hook):
        @functools.wraps(hook)
        async def run_async(self: Sealgate, flow: http.HTTPFlow) -> None:
            try:
                await hook(self, flow)
            except Exception as e:
                self._internal_error(flow, hook.__name__, e)
        return run_async

    @functools.wraps(hook)
    def run(self: Sealgate, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception as e:
            self._internal_error(flow, hook.__name__, e)
    return run


@dataclass
class _Sent:
    """The placeholder form of a request, put back once the request has gone out."""

    path: bytes
    fields: Fields
    raw_content: bytes | None


@dataclass
class _FlowState:
    """What sealgate knows about one flow of a session."""

    session: sessions.Session
    scrubber: Scrubber  # the session's: shared, so values it learns reach every flow
    sent: _Sent | None = None  # the placeholder form, until the request has gone out
    injected: bool = False  # a value went out with this flow
    audit_id: int | None = None  # the audit row of its latest allow, awaiting the status


@dataclass
class _SessionScrub:
    expires_at: float
    scrubber: Scrubber
    signature: tuple = ()  # of the principal's secrets when last loaded
    data_version: int | None = None  # of the store when the signature was last checked


class Sealgate:
    def __init__(self) -> None:
        self.store: SecretStore | None = None
        self.policy = EgressPolicy()
        self.tunnel_sessions: weakref.WeakKeyDictionary[connection.Client, sessions.Session] = (
            weakref.WeakKeyDictionary()
        )
        self.flows: weakref.WeakKeyDictionary[http.HTTPFlow, _FlowState] = weakref.WeakKeyDictionary()
        self.refused: weakref.WeakKeyDictionary[connection.Server, Refusal] = weakref.WeakKeyDictionary()
        self.dialled_from: weakref.WeakKeyDictionary[connection.Server, tuple[str, int]] = (
            weakref.WeakKeyDictionary()
        )
        self.scrubbers: dict[str, _SessionScrub] = {}  # by session id
        self.log_scrubber = Scrubber()  # every value ever injected, kept out of every log line
        self.metrics = Metrics()

    # options ------------------------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option("sealgate_data_dir", str, "", "Folder of sealgate's store and master key.")
        loader.add_option(
            "sealgate_allow_private", str, "",
            "Comma-separated CIDRs the proxy may reach although loopback or private.",
        )
        loader.add_option(
            "sealgate_guard_ports", str, "",
            "Comma-separated ports of sealgate's own services (dashboard, metrics), never reachable through it.",
        )

    def configure(self, updated: set[str]) -> None:
        if ctx.options.ssl_insecure:
            raise exceptions.OptionsError("sealgate refuses ssl_insecure: secrets must only go over verified TLS")
        for name in _REFUSED_OPTIONS:
            if getattr(ctx.options, name, None):
                raise exceptions.OptionsError(
                    f"sealgate refuses {name}: it would change requests after sealgate checked them")
        if any(not mode.startswith("regular") for mode in getattr(ctx.options, "mode", ["regular"])):
            raise exceptions.OptionsError("sealgate runs only as a regular (forward) proxy")
        if "sealgate_data_dir" in updated:
            if not ctx.options.sealgate_data_dir:
                raise exceptions.OptionsError("sealgate_data_dir must name the folder of sealgate's store")
            try:
                self.store = SecretStore(Path(ctx.options.sealgate_data_dir))
            except StoreError as e:
                raise exceptions.OptionsError(str(e)) from None
        if updated & {"sealgate_allow_private", "sealgate_guard_ports", "listen_port"}:
            try:
                allow = parse_cidrs(ctx.options.sealgate_allow_private)
            except ValueError as e:
                raise exceptions.OptionsError(f"sealgate_allow_private: {e}") from None
            guard_text = [p.strip() for p in ctx.options.sealgate_guard_ports.split(",") if p.strip()]
            if bad := [p for p in guard_text if not origins.is_port_text(p)]:
                raise exceptions.OptionsError(f"sealgate_guard_ports: {bad[0]!r} is not a port")
            guard = {int(p) for p in guard_text}
            guard.add(ctx.options.listen_port or 8080)
            self.policy = EgressPolicy(tuple(allow), frozenset(guard))

    def running(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.addFilter(self._scrub_log_record)
        _scrub_websocket_control_frames(self._client_scrubber)

    def done(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._scrub_log_record)

    def _scrub_log_record(self, record: logging.LogRecord) -> bool:
        """Whatever any addon logs, no injected value reaches the log."""
        if self.log_scrubber:
            record.msg, record.args = self.log_scrubber.scrub_text(record.getMessage()), None
            if record.exc_info:
                record.exc_text = self.log_scrubber.scrub_text(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True

    # identity -----------------------------------------------------------------------

    @_fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        session = self._authenticate(flow)
        if session is not None:
            self.tunnel_sessions[flow.client_conn] = session

    @_fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.client_conn in self.tunnel_sessions:
            session = self.tunnel_sessions[flow.client_conn]
            if session.expired():
                self._respond(flow, Refusal("proxy_auth_required", "this session has expired"))
                return
            flow.request.headers.pop("Proxy-Authorization", None)  # never forward a credential
        else:
            session = self._authenticate(flow)
        if session is None:
            return
        self.metrics.requests += 1
        try:
            self.flows[flow] = _FlowState(session, self._scrubber(session))
        except StoreError as e:
            return self._respond(flow, Refusal("store_unavailable", f"cannot read this session's secrets: {e}"))
        flow.metadata["sealgate"] = {
            "session": session.id, "principal": session.principal,
            "runchat": session.record.runchat, "instance": session.record.instance,
        }
        if _streams(flow.request.headers, unknown_length=False):
            # The head goes out when this hook returns: check URL and headers now, then the body as it flows.
            await self._check(flow, session, with_body=False)
            if flow.response is None:
                self._stream_request_body(flow, session)

    def _authenticate(self, flow: http.HTTPFlow) -> sessions.Session | None:
        """The session named by Proxy-Authorization (removed from the request), or a 407/503."""
        header = flow.request.headers.pop("Proxy-Authorization", "")
        decoded = inject.decode_basic(header)
        session_id, _, credential = (decoded or b"").decode("utf-8", "replace").partition(":")
        try:
            session = sessions.authenticate(self._store(), session_id, credential)
        except StoreError as e:
            self._respond(flow, Refusal("store_unavailable", f"cannot check the proxy credentials: {e}"))
            return None
        if session is None:
            why = "no proxy credentials were sent" if not header else "the proxy credentials are invalid or expired"
            self._respond(flow, Refusal("proxy_auth_required", f"{why}; use the proxy_url of `sealgate session issue`"))
        return session

    def _store(self) -> SecretStore:
        if self.store is None:
            raise StoreError("sealgate_data_dir is not set")
        return self.store

    # egress -------------------------------------------------------------------------

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Resolve once, check the address, and dial exactly that address."""
        server = data.server
        if server.error or not server.address or server.via:
            return
        host, port = server.address
        try:
            ip, refusal = await self._checked_address(host, port)
        except Exception as e:
            ip, refusal = None, Refusal("internal_error", f"egress check failed ({e.__class__.__name__})")
        if refusal is not None:
            self.refused[server] = refusal
            server.error = str(refusal)
            return
        self.dialled_from[server] = (host, port)
        server.address = (ip, port)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._restore_address(data.server)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._restore_address(data.server)

    def _restore_address(self, server: connection.Server) -> None:
        # The dial is done; mitmproxy matches connections and request hosts by name,
        # so give the connection its name back. Its guard forbids changing `address`
        # on an open connection, which this only undoes, hence object.__setattr__.
        if (original := self.dialled_from.pop(server, None)) is not None:
            object.__setattr__(server, "address", original)

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        server = tls_start.conn
        if isinstance(server, connection.Server) and server.address and not server.via:
            server.sni = server.address[0]  # always verify against the destination itself

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        if (refusal := self.refused.get(flow.server_conn)) is not None:
            self._respond(flow, refusal)

    async def _checked_address(self, host: str, port: int) -> tuple[str, None] | tuple[None, Refusal]:
        """The first address of host that policy allows, or the refusal."""
        shown = f"{origins.bracketed(host)}:{port}"
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            return None, Refusal("destination_unresolved", f"{shown} could not be resolved ({e.__class__.__name__})")
        reasons = []
        for *_, sockaddr in infos:
            why = self.policy.refusal_reason(sockaddr[0], port)
            if why is None:
                return sockaddr[0], None
            reasons.append(why)
        return None, Refusal("destination_blocked", f"{shown} is not reachable through sealgate: {reasons[0]}")

    # the request path ---------------------------------------------------------------

    @_fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        state = self.flows.get(flow)
        if state is None:
            return self._respond(flow, Refusal("proxy_auth_required", "this request has no session"))
        if flow.request.stream:  # head and body were checked as they went; the trailers go now
            return self._check_streamed_trailers(flow, state.session)
        await self._check(flow, state.session, with_body=True)

    async def _check(self, flow: http.HTTPFlow, session: sessions.Session, *, with_body: bool) -> None:
        """Find the placeholders, ask `decide`, and fill the request or answer it with the refusal."""
        if flow.request.scheme == "http" and not flow.server_conn.connected:
            _, refusal = await self._checked_address(flow.request.host, flow.request.port)
            if refusal is not None:
                return self._block(flow, session, refusal)
        try:
            scan = _Scan.of(flow.request, with_body=with_body)
        except bodies.BodyError as e:
            return self._block(flow, session, Refusal("unreadable_body", str(e)))
        if not scan.found:
            return
        result = decision.decide(_facts(flow, scan.placeholders), session, self._lookup(session.principal))
        if isinstance(result, decision.Block):
            return self._block(flow, session, result.refusal)
        self._decided(flow, session, None, result.secret_names)
        self.flows[flow].sent = _Sent(flow.request.data.path, flow.request.headers.fields, flow.request.raw_content)
        self._remember(flow, result, scan.apply(flow.request, result.values))

    def _remember(self, flow: http.HTTPFlow, result: decision.Allow, produced: list[tuple[bytes, bytes]]) -> None:
        """Scrub every form of the injected values from this session's responses and from logs.

        The session's scrubber knew its principal's values when it was made; this adds what is
        new since then (a secret added later, a Basic header this request produced)."""
        state = self.flows[flow]
        state.injected = state.injected or bool(result.secret_names)
        scrubber = state.scrubber
        pairs = produced + [
            pair
            for text, value in result.values.items()
            if value.encode() not in scrubber and placeholders.find(text.encode())[0].placeholder.name in result.secret_names
            for pair in inject.derived_forms(value, text)
        ]
        if pairs:
            scrubber.add(pairs)
            self.log_scrubber.add(pairs)

    def _stream_request_body(self, flow: http.HTTPFlow, session: sessions.Session) -> None:
        """Fill placeholders in a body as it streams; a refused one cuts the upstream connection."""
        req = flow.request
        content_type = req.headers.get("content-type", "")
        filled: dict[str, bytes] = {}
        context: list[Context] = []  # decided by the first bytes that are not white space
        lookup = self._lookup(session.principal)

        def find(buf: bytes):
            for f in placeholders.find(buf):
                text = f.placeholder.text
                if text not in filled:
                    result = decision.decide(_facts(flow, (f.placeholder,)), session, lookup)
                    if isinstance(result, decision.Block):
                        raise _Refused(result.refusal)
                    self._decided(flow, session, None, result.secret_names)
                    self._remember(flow, result, [])
                    filled[text] = inject.escape(result.values[text], context[0])
                yield f.start, f.end, filled[text]

        def first_bytes(chunk: bytes) -> None:
            if not context and chunk.strip():
                context.append(inject.body_context(content_type, chunk.lstrip()))

        req.stream = _StreamFilter(StreamRewriter(find, lambda: placeholders.MAX_LEN), first_bytes,
                                   lambda refusal: self._block_stream(flow, session, refusal))
        _reframe(req, chunked=flow.server_conn.alpn != b"h2")

    def _check_streamed_trailers(self, flow: http.HTTPFlow, session: sessions.Session) -> None:
        """Trailers of a streamed request go out after this hook: fill or refuse their placeholders."""
        trailers = flow.request.trailers
        found = _find_in_fields(trailers.fields) if trailers else {}
        if not found:
            return
        phs = _distinct([f for fs in found.values() for f in fs])
        result = decision.decide(_facts(flow, phs), session, self._lookup(session.principal))
        if isinstance(result, decision.Block):
            return self._block_stream(flow, session, result.refusal)
        self._decided(flow, session, None, result.secret_names)
        self._remember(flow, result, [])
        trailers.fields = _fill_fields(trailers.fields, found, result.values)

    def _block_stream(self, flow: http.HTTPFlow, session: sessions.Session, refusal: Refusal) -> None:
        """Part of the body has gone: cut the upstream connection so it never sees a complete request."""
        self._decided(flow, session, refusal, status=0)
        flow.metadata["sealgate.refusal"] = str(refusal)
        server = ctx.master.addons.get("proxyserver")
        handler = server.connections.get(flow.client_conn.id) if server else None
        if handler is None or flow.server_conn not in handler.transports:
            raise RuntimeError("cannot cut the upstream connection")  # mitmproxy then drops them all
        handler.transports[flow.server_conn].writer.close()  # at once: nothing queued after this is written
        handler.close_connection(flow.server_conn)
        if flow.killable:
            flow.kill()

    @_fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._restore_request(flow)
        state = self.flows.get(flow)
        resp = flow.response
        if resp is None or state is None:
            return
        scrubber = state.scrubber
        has_body = flow.request.method != "HEAD" and resp.status_code >= 200 and resp.status_code not in (204, 304)
        if has_body and _streams(resp.headers, unknown_length=True):
            # SSE, chunked, large: pass it on as it comes, scrubbed; the head goes out after this hook
            resp.headers.fields = _scrub_fields(scrubber, resp.headers.fields)
            resp.reason = scrubber.scrub_text(resp.reason)
            resp.stream = _StreamFilter(scrubber.stream())
            _reframe(resp, chunked=flow.request.http_version.startswith("HTTP/1"))
        elif resp.stream:
            resp.stream = False  # someone asked to stream an encoded body: buffer it, so it can be scrubbed

    @_fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        self._restore_request(flow)
        state = self.flows.get(flow)
        resp = flow.response
        if state is None or resp is None:
            return
        self.metrics.observe_latency(time.time() - flow.request.timestamp_start)
        self._audit_status(flow, resp.status_code)
        if not state.scrubber:
            return
        scrubber = state.scrubber
        resp.headers.fields = _scrub_fields(scrubber, resp.headers.fields)
        resp.reason = scrubber.scrub_text(resp.reason)
        if resp.trailers:
            resp.trailers.fields = _scrub_fields(scrubber, resp.trailers.fields)
        if resp.raw_content and not resp.stream:
            try:
                body = bodies.decode(resp.raw_content, resp.headers.get("content-encoding", ""), RESPONSE_BODY_LIMIT)
            except bodies.BodyError as e:
                refusal = Refusal("unscrubbable_response", f"the upstream response cannot be checked: {e}")
                self._decided(flow, state.session, refusal)
                return self._respond(flow, refusal)
            scrubbed = scrubber.scrub(body)
            if scrubbed != body:
                resp.headers.pop("content-encoding", None)  # send it decoded: no re-encoded copy to reason about
                resp.content = scrubbed

    def error(self, flow: http.HTTPFlow) -> None:
        self._restore_request(flow)
        state = self.flows.get(flow)
        if state is None:
            return
        self._audit_status(flow, 0)
        message = flow.error.msg if flow.error else ""
        # mitmproxy answers a failed flow with an error page quoting what went wrong, which
        # may quote what the upstream sent back: after an injection, send nothing at all.
        if flow.killable and (state.injected or state.scrubber.scrub_text(message) != message):
            log.warning("sealgate: closed %s after an upstream error; the error text is withheld",
                        origins.serialise(flow.request.scheme, flow.request.host, flow.request.port))
            flow.kill()

    @_fail_closed
    def websocket_message(self, flow: http.HTTPFlow) -> None:
        state = self.flows.get(flow)
        if state is None or flow.websocket is None:
            return
        session, scrubber = state.session, state.scrubber
        message: websocket.WebSocketMessage = flow.websocket.messages[-1]
        if not message.from_client:
            message.content = scrubber.scrub(message.content)
            return
        found = placeholders.find(message.content)
        if not found:
            return
        facts = _facts(flow, _distinct(found))
        result = decision.decide(facts, session, self._lookup(session.principal))
        if isinstance(result, decision.Block):
            self._decided(flow, session, result.refusal)
            message.drop()
            ctx.master.commands.call("inject.websocket", flow, True, result.refusal.problem_json(), True)
            flow.websocket.close_code, flow.websocket.close_reason = 1008, result.refusal.code
            flow.kill()
            return
        self._remember(flow, result, [])
        self._decided(flow, session, None, result.secret_names)
        message.content = inject.substitute(message.content, found, result.values,
                                            inject.body_context("", message.content))

    @_fail_closed
    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        scrubber = self._client_scrubber(flow.client_conn)
        message = flow.messages[-1]
        if scrubber and not message.from_client:
            message.content = scrubber.scrub(message.content)

    def _restore_request(self, flow: http.HTTPFlow) -> None:
        state = self.flows.get(flow)
        if state is not None and (sent := state.sent) is not None:
            state.sent = None
            flow.request.data.path = sent.path
            flow.request.headers.fields = sent.fields
            flow.request.raw_content = sent.raw_content

    def _client_scrubber(self, client: connection.Connection) -> Scrubber | None:
        """The scrubber of the session a client connection belongs to, if any."""
        session = self.tunnel_sessions.get(client) if isinstance(client, connection.Client) else None
        entry = self.scrubbers.get(session.id) if session else None
        return entry.scrubber if entry else None

    # helpers ------------------------------------------------------------------------

    def _lookup(self, principal: str) -> decision.SecretLookup:
        def lookup(names: set[str]):
            try:
                return self._store().secrets_for(principal, names)
            except StoreError as e:
                raise decision.LookupFailed(str(e)) from None
        return lookup

    def _scrubber(self, session: sessions.Session) -> Scrubber:
        """The session's scrubber, knowing every value of its principal: a value stored at an
        allowed origin by one session comes back scrubbed in any other, and after a restart.
        Reloaded when the principal's secrets change (never forgetting an old value); flows
        hold their own reference, so pruning never strands one. StoreError if unreadable."""
        store = self._store()
        entry = self.scrubbers.get(session.id)
        if entry is None:
            now = time.time()
            for sid in [sid for sid, e in self.scrubbers.items() if e.expires_at + SCRUBBER_GRACE < now]:
                del self.scrubbers[sid]
            entry = self.scrubbers[session.id] = _SessionScrub(session.record.expires_at, Scrubber())
        version = store.data_version()
        if entry.data_version == version:
            return entry.scrubber  # nothing was written to the store since the last look
        signature = store.secrets_signature(session.principal)
        if entry.signature != signature:
            pairs = [
                pair
                for name, secret in store.secrets_for(session.principal).items()
                for pair in inject.derived_forms(secret.value, session.placeholder(name))
            ]
            entry.scrubber.add(pairs)
            self.log_scrubber.add(pairs)
            entry.signature = signature
        entry.data_version = version  # only once loaded: a failure is tried again, and refused again
        return entry.scrubber

    def _block(self, flow: http.HTTPFlow, session: sessions.Session, refusal: Refusal) -> None:
        self._respond(flow, refusal)
        self._decided(flow, session, refusal)

    def _internal_error(self, flow: http.HTTPFlow | tcp.TCPFlow, hook: str, e: Exception) -> None:
        log.error("sealgate: %s in %s; the flow is blocked", e.__class__.__name__, hook)
        if isinstance(flow, http.HTTPFlow) and flow.websocket is None:
            self._restore_request(flow)
            self._respond(flow, Refusal("internal_error", "sealgate could not check this request; nothing was sent"))
        elif flow.killable:
            flow.kill()

    @staticmethod
    def _respond(flow: http.HTTPFlow, refusal: Refusal) -> None:
        flow.response = http.Response.make(refusal.status, refusal.problem_json(), refusal.headers())
        flow.metadata["sealgate.refusal"] = str(refusal)

    def _decided(self, flow: http.HTTPFlow, session: sessions.Session, refusal: Refusal | None,
                 names: tuple[str, ...] = (), *, status: int | None = None) -> None:
        """Record a decision: one log line, the metrics, and a row of the audit trail."""
        r = flow.request
        record = AuditRecord(
            at=time.time(), session=session.id, runchat=session.record.runchat, instance=session.record.instance,
            principal=session.principal, secrets=names, method=r.method,
            origin=origins.serialise(r.scheme, r.host, r.port), path=r.path.split("?", 1)[0],
            decision="block" if refusal else "allow", code=refusal.code if refusal else None,
            status=status if status is not None else (refusal.status if refusal else None),
        )
        log.info(
            "sealgate decision=%s code=%s session=%s principal=%s runchat=%s secrets=%s method=%s origin=%s path=%s",
            record.decision, record.code or "-", record.session, record.principal, record.runchat,
            ",".join(names) or "-", record.method, record.origin, record.path,
        )
        if refusal:
            self.metrics.blocks[refusal.code] += 1
        elif names:
            self.metrics.injections += 1
        try:
            row_id = self._store().add_audit(record)
        except StoreError as e:
            self.metrics.audit_failures += 1
            log.error("sealgate: %s", e)
            return
        if refusal is None and (state := self.flows.get(flow)) is not None:
            state.audit_id = row_id

    def _audit_status(self, flow: http.HTTPFlow, status: int) -> None:
        state = self.flows.get(flow)
        if state is None or state.audit_id is None:
            return
        try:
            self._store().set_audit_status(state.audit_id, status)
        except StoreError as e:
            self.metrics.audit_failures += 1
            log.error("sealgate: %s", e)
        state.audit_id = None


@dataclass
class _Scan:
    """Where placeholders sit in a request: URL, header values, Basic auth, body."""

    path: list[Found]
    headers: dict[int, list[Found]]
    basic: dict[int, tuple[bytes, list[Found]]]
    trailers: dict[int, list[Found]]
    body: bytes | None
    body_found: list[Found]

    @classmethod
    def of(cls, req: http.Request, *, with_body: bool) -> _Scan:
        headers = _find_in_fields(req.headers.fields)
        basic = {
            i: b for i, (name, value) in enumerate(req.headers.fields)
            if i not in headers and name.lower() == b"authorization"
            and (b := inject.find_in_basic(value.decode("latin-1"))) is not None
        }
        body: bytes | None = None
        body_found: list[Found] = []
        if with_body and req.raw_content:
            body = bodies.decode(req.raw_content, req.headers.get("content-encoding", ""), REQUEST_BODY_LIMIT)
            body_found = placeholders.find(body)
        trailers = _find_in_fields(req.trailers.fields) if req.trailers else {}
        return cls(placeholders.find(req.data.path), headers, basic, trailers, body, body_found)

    @property
    def found(self) -> list[Found]:
        out = self.path + self.body_found
        for f in [*self.headers.values(), *self.trailers.values()]:
            out += f
        for _, f in self.basic.values():
            out += f
        return out

    @property
    def placeholders(self) -> tuple[placeholders.Placeholder, ...]:
        return _distinct(self.found)

    def apply(self, req: http.Request, values: dict[str, str]) -> list[tuple[bytes, bytes]]:
        """Fill the request; return the forms this produced that only exist because of it."""
        produced: list[tuple[bytes, bytes]] = []
        if self.path:
            req.data.path = inject.substitute(req.data.path, self.path, values, Context.URL)
        if self.trailers and req.trailers:
            req.trailers.fields = _fill_fields(req.trailers.fields, self.trailers, values)
        if self.headers or self.basic:
            fields = list(_fill_fields(req.headers.fields, self.headers, values))
            for i, (decoded, found) in self.basic.items():
                filled = inject.encode_basic(inject.substitute(decoded, found, values, Context.RAW)).encode()
                produced.append((filled[6:], fields[i][1].split(b" ", 1)[-1].strip()))
                fields[i] = (fields[i][0], filled)
            req.headers.fields = tuple(fields)
        if self.body_found and self.body is not None:
            ctx_ = inject.body_context(req.headers.get("content-type", ""), self.body)
            # Forward the filled body decoded: a compressed copy would be one more derived form of the value.
            req.headers.pop("content-encoding", None)
            req.content = inject.substitute(self.body, self.body_found, values, ctx_)
        return produced


def _distinct(found: list[Found]) -> tuple[placeholders.Placeholder, ...]:
    return tuple(dict.fromkeys(f.placeholder for f in found))


def _find_in_fields(fields: Fields) -> dict[int, list[Found]]:
    """Placeholders in header (or trailer) values, by field index."""
    return {i: f for i, (_, value) in enumerate(fields) if (f := placeholders.find(value))}


def _fill_fields(fields: Fields, found: dict[int, list[Found]], values: dict[str, str]) -> Fields:
    out = list(fields)
    for i, f in found.items():
        out[i] = (out[i][0], inject.substitute(out[i][1], f, values, Context.HEADER))
    return tuple(out)


def _scrub_fields(scrubber: Scrubber, fields: Fields) -> Fields:
    return tuple((scrubber.scrub(k), scrubber.scrub(v)) for k, v in fields)


def _streams(headers: http.Headers, *, unknown_length: bool) -> bool:
    """True for an identity body that is large, or of unknown length (chunked, SSE, until close).

    unknown_length says whether a message without Content-Length has a body of unknown
    length (a response) or, unless chunked, none at all (an HTTP/1 request).
    """
    if bodies.codings(headers.get("content-encoding", "")) not in ([], ["identity"]):
        return False
    length = headers.get("content-length")
    if length is None:
        return unknown_length or "chunked" in headers.get("transfer-encoding", "").lower()
    return not length.isdigit() or int(length) > STREAM_OVER


def _reframe(message: http.Message, chunked: bool) -> None:
    """A body that is filled or scrubbed as it streams changes length: frame it by chunks (HTTP/1)."""
    if "content-length" in message.headers:
        del message.headers["content-length"]
    if chunked and "chunked" not in message.headers.get("transfer-encoding", "").lower():
        message.headers["transfer-encoding"] = "chunked"


def _scrub_websocket_control_frames(scrubber_for) -> None:
    """Scrub ping/pong payloads and close reasons on their way to a worker.

    mitmproxy relays WebSocket control frames without a hook, so the one place they all pass,
    the send method of its WebSocket connection, is wrapped (once per process)."""
    from mitmproxy.proxy.layers import websocket as ws_layer
    from wsproto.events import CloseConnection, Ping, Pong

    cls = ws_layer.WebsocketConnection
    original = getattr(cls.send2, "__wrapped__", cls.send2)

    @functools.wraps(original)
    def send2(self, event):
        scrubber = scrubber_for(self.conn)
        if scrubber and isinstance(event, (Ping, Pong)):
            payload = scrubber.scrub(bytes(event.payload))
            event = type(event)(payload=payload if len(payload) <= 125 else b"")
        elif scrubber and isinstance(event, CloseConnection) and event.reason:
            reason = scrubber.scrub_text(event.reason)
            event = CloseConnection(code=event.code, reason=reason if len(reason.encode()) <= 123 else "")
        return original(self, event)

    cls.send2 = send2


class _StreamFilter:
    """A mitmproxy stream callable around a StreamRewriter."""

    def __init__(self, rewriter: StreamRewriter, first_bytes=None, on_refused=None) -> None:
        self.rewriter, self.first_bytes, self.on_refused = rewriter, first_bytes, on_refused
        self.stopped = False

    def __call__(self, chunk: bytes) -> list[bytes]:
        if self.stopped:
            return []
        if self.first_bytes:
            self.first_bytes(chunk)
        try:
            out = self.rewriter.finish() if _end_of_message(chunk) else self.rewriter.feed(chunk)
        except _Refused as r:
            self.stopped = True
            self.on_refused(r.refusal)
            return []
        return [out] if out else []  # b"" would end the body early


def _end_of_message(chunk: bytes) -> bool:
    """mitmproxy calls a stream with b"" at the end of a message, and also for an empty HTTP/2
    DATA frame in the middle of one; only the event its caller handles tells them apart.
    Flushing early would let a value split by an empty frame through, so look."""
    if chunk:
        return False
    event = sys._getframe(2).f_locals.get("event")  # 0: here, 1: _StreamFilter.__call__, 2: mitmproxy
    return event is None or type(event).__name__.endswith("EndOfMessage")


class _Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal


def _facts(flow: http.HTTPFlow, found: tuple[placeholders.Placeholder, ...]) -> decision.RequestFacts:
    req = flow.request
    try:
        host = origins.normalise_host(req.host)
    except origins.OriginError:
        host = req.host.lower()
    hosts = tuple(req.headers.get_all("host"))
    if req.authority:
        hosts += (req.authority,)
    server = flow.server_conn
    tls_error = None
    if req.scheme == "https":
        if server.error:
            tls_error = server.error
        elif server.connected and not server.tls_established:
            tls_error = "the TLS handshake did not complete"
    return decision.RequestFacts(
        destination=decision.Destination(req.scheme, host, req.port),
        host_headers=hosts,
        sni=flow.client_conn.sni if flow.client_conn.tls else None,
        upstream_tls_error=tls_error,
        placeholders=found,
    )
