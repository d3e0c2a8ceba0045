"""The mitmproxy addon: wires identity, egress, the decision and scrubbing into hooks.

Hooks gather facts and apply results; `decision.decide` is the only place that allows
or denies. mitmproxy types stay here. `addons/script.py` loads it into a stock mitmdump.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import connection, ctx, exceptions, http, tls
from mitmproxy.proxy import server_hooks

from addons import decision, inject, origins, placeholders, sessions
from addons.egress import EgressPolicy, parse_cidrs
from addons.errors import Refusal
from addons.inject import Context
from addons.placeholders import Found
from addons.scrub import Scrubber
from addons.store import SecretStore, StoreError

log = logging.getLogger("sealgate")

Fields = tuple[tuple[bytes, bytes], ...]


@dataclass
class _Sent:
    """The placeholder form of a request, put back once the request has gone out."""

    path: bytes
    fields: Fields
    raw_content: bytes | None


class Sealgate:
    def __init__(self) -> None:
        self.store: SecretStore | None = None
        self.policy = EgressPolicy()
        self.tunnel_sessions: weakref.WeakKeyDictionary[connection.Client, sessions.Session] = (
            weakref.WeakKeyDictionary()
        )
        self.refused: weakref.WeakKeyDictionary[connection.Server, Refusal] = weakref.WeakKeyDictionary()
        self.dialled_from: weakref.WeakKeyDictionary[connection.Server, tuple[str, int]] = (
            weakref.WeakKeyDictionary()
        )
        self.sent: weakref.WeakKeyDictionary[http.HTTPFlow, _Sent] = weakref.WeakKeyDictionary()
        self.flow_sessions: weakref.WeakKeyDictionary[http.HTTPFlow, sessions.Session] = weakref.WeakKeyDictionary()
        self.scrubbers: dict[str, tuple[float, Scrubber]] = {}  # session id -> (expires_at, values injected)

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
            guard = {int(p) for p in ctx.options.sealgate_guard_ports.split(",") if p.strip().isdigit()}
            guard.add(ctx.options.listen_port or 8080)
            self.policy = EgressPolicy(tuple(allow), frozenset(guard))

    def running(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.addFilter(self._scrub_log_record)

    def done(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._scrub_log_record)

    def _scrub_log_record(self, record: logging.LogRecord) -> bool:
        """Whatever any addon logs, no injected value reaches the log."""
        if self.scrubbers:
            text = record.getMessage()
            for _, scrubber in self.scrubbers.values():
                text = scrubber.scrub_text(text)
            record.msg, record.args = text, None
        return True

    # identity -----------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        session = self._authenticate(flow)
        if session is not None:
            self.tunnel_sessions[flow.client_conn] = session

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.client_conn in self.tunnel_sessions:
            session = self.tunnel_sessions[flow.client_conn]
            if time.time() >= session.record.expires_at:
                self._respond(flow, Refusal("proxy_auth_required", "this session has expired"))
                return
            flow.request.headers.pop("Proxy-Authorization", None)  # never forward a credential
        else:
            session = self._authenticate(flow)
        if session is not None:
            self.flow_sessions[flow] = session
            flow.metadata["sealgate"] = {
                "session": session.id, "principal": session.principal,
                "runchat": session.record.runchat, "instance": session.record.instance,
            }

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
        ip, refusal = await self._checked_address(host, port)
        if refusal is not None:
            self.refused[server] = refusal
            server.error = str(refusal)
            return
        if ip is not None:
            server.sni = server.sni or host  # verify upstream TLS against the host we dial, not the client's SNI
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

    async def _checked_address(self, host: str, port: int) -> tuple[str | None, Refusal | None]:
        """The first address of host that policy allows, or the refusal."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            return None, None  # mitmproxy reports the failure to resolve
        reasons = []
        for *_, sockaddr in infos:
            why = self.policy.refusal_reason(sockaddr[0], port)
            if why is None:
                return sockaddr[0], None
            reasons.append(why)
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return None, Refusal("destination_blocked", f"{shown} is not reachable through sealgate: {reasons[0]}")

    # the request path ---------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        session = self._session_of(flow)
        if session is None:
            return
        if flow.request.scheme == "http" and not flow.server_conn.connected:
            _, refusal = await self._checked_address(flow.request.host, flow.request.port)
            if refusal is not None:
                return self._block(flow, session, refusal)
        try:
            scan = _Scan.of(flow.request)
        except ValueError as e:
            return self._block(flow, session, Refusal("unreadable_body", str(e)))
        if not scan.found:
            return
        result = decision.decide(
            _facts(flow, scan), session, session.record.mac_key, self._lookup(session.principal)
        )
        if isinstance(result, decision.Block):
            return self._block(flow, session, result.refusal)
        self.sent[flow] = _Sent(flow.request.data.path, flow.request.headers.fields, flow.request.raw_content)
        scrubber = self._scrubber(session)
        scrubber.add(
            pair
            for p in scan.placeholders
            if p.name in result.secret_names
            for pair in inject.derived_forms(result.values[p.text], p.text)
        )
        scan.apply(flow.request, result.values, scrubber)
        self._log(flow, session, "allow", None, result.secret_names)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._restore_request(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._restore_request(flow)
        session = self._session_of(flow)
        entry = self.scrubbers.get(session.id) if session else None
        if entry is None or flow.response is None:
            return
        scrubber = entry[1]
        resp = flow.response
        resp.headers.fields = tuple((k, scrubber.scrub(v)) for k, v in resp.headers.fields)
        resp.reason = scrubber.scrub_text(resp.reason)
        if resp.trailers:
            resp.trailers.fields = tuple((k, scrubber.scrub(v)) for k, v in resp.trailers.fields)
        if resp.raw_content:
            try:
                body = resp.get_content(strict=True)
            except ValueError:
                resp.raw_content = scrubber.scrub(resp.raw_content)
            else:
                scrubbed = scrubber.scrub(body or b"")
                if scrubbed != body:
                    resp.content = scrubbed

    def error(self, flow: http.HTTPFlow) -> None:
        self._restore_request(flow)

    def _restore_request(self, flow: http.HTTPFlow) -> None:
        if (sent := self.sent.pop(flow, None)) is not None:
            flow.request.data.path = sent.path
            flow.request.headers.fields = sent.fields
            flow.request.raw_content = sent.raw_content

    # helpers ------------------------------------------------------------------------

    def _session_of(self, flow: http.HTTPFlow) -> sessions.Session | None:
        return self.flow_sessions.get(flow)

    def _lookup(self, principal: str) -> decision.SecretLookup:
        def lookup(names: set[str]):
            try:
                return self._store().secrets_for(principal, names)
            except StoreError as e:
                raise decision.LookupFailed(str(e)) from None
        return lookup

    def _scrubber(self, session: sessions.Session) -> Scrubber:
        now = time.time()
        if session.id not in self.scrubbers:
            for sid in [sid for sid, (exp, _) in self.scrubbers.items() if exp < now]:
                del self.scrubbers[sid]  # an expired session can send nothing more
            self.scrubbers[session.id] = (session.record.expires_at, Scrubber())
        return self.scrubbers[session.id][1]

    def _block(self, flow: http.HTTPFlow, session: sessions.Session, refusal: Refusal) -> None:
        self._respond(flow, refusal)
        self._log(flow, session, "block", refusal, ())

    @staticmethod
    def _respond(flow: http.HTTPFlow, refusal: Refusal) -> None:
        flow.response = http.Response.make(refusal.status, refusal.problem_json(), refusal.headers())
        flow.metadata["sealgate.refusal"] = str(refusal)

    @staticmethod
    def _log(flow: http.HTTPFlow, session: sessions.Session, verdict: str, refusal: Refusal | None,
             names: tuple[str, ...]) -> None:
        r = flow.request
        log.info(
            "sealgate decision=%s code=%s session=%s principal=%s runchat=%s secrets=%s method=%s origin=%s path=%s",
            verdict, refusal.code if refusal else "-", session.id, session.principal, session.record.runchat,
            ",".join(names) or "-", r.method, origins.serialise(r.scheme, r.host, r.port), r.path.split("?", 1)[0],
        )


@dataclass
class _Scan:
    """Where placeholders sit in a request: URL, header values, Basic auth, body."""

    path: list[Found]
    headers: dict[int, list[Found]]
    basic: dict[int, tuple[bytes, list[Found]]]
    body: bytes | None
    body_found: list[Found]

    @classmethod
    def of(cls, req: http.Request) -> _Scan:
        headers: dict[int, list[Found]] = {}
        basic: dict[int, tuple[bytes, list[Found]]] = {}
        for i, (name, value) in enumerate(req.headers.fields):
            if found := placeholders.find(value):
                headers[i] = found
            elif name.lower() == b"authorization":
                if (b := inject.find_in_basic(value.decode("latin-1"))) is not None:
                    basic[i] = b
        body: bytes | None = None
        body_found: list[Found] = []
        if req.raw_content:
            try:
                body = req.get_content(strict=True)
            except ValueError:
                enc = req.headers.get("content-encoding", "")
                raise ValueError(f"the request body cannot be decoded as Content-Encoding {enc!r}") from None
            body_found = placeholders.find(body or b"")
        return cls(placeholders.find(req.data.path), headers, basic, body, body_found)

    @property
    def found(self) -> list[Found]:
        out = self.path + self.body_found
        for f in self.headers.values():
            out += f
        for _, f in self.basic.values():
            out += f
        return out

    @property
    def placeholders(self) -> tuple[placeholders.Placeholder, ...]:
        return tuple(dict.fromkeys(f.placeholder for f in self.found))

    def apply(self, req: http.Request, values: dict[str, str], scrubber: Scrubber) -> None:
        if self.path:
            req.data.path = inject.substitute(req.data.path, self.path, values, Context.URL)
        if self.headers or self.basic:
            fields = list(req.headers.fields)
            for i, found in self.headers.items():
                fields[i] = (fields[i][0], inject.substitute(fields[i][1], found, values, Context.HEADER))
            for i, (decoded, found) in self.basic.items():
                filled = inject.encode_basic(inject.substitute(decoded, found, values, Context.RAW)).encode()
                scrubber.add([(filled[6:], fields[i][1].split(b" ", 1)[-1].strip())])
                fields[i] = (fields[i][0], filled)
            req.headers.fields = tuple(fields)
        if self.body_found and self.body is not None:
            ctx_ = inject.body_context(req.headers.get("content-type", ""), self.body)
            req.content = inject.substitute(self.body, self.body_found, values, ctx_)


def _facts(flow: http.HTTPFlow, scan: _Scan) -> decision.RequestFacts:
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
        placeholders=scan.placeholders,
    )

