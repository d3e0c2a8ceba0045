"""Release: find the placeholders of a request, ask `decision.decide`, and fill the request.

The only caller of `decide`, for every place a placeholder can travel: URL, headers, Basic
auth and a buffered body; a streamed body chunk by chunk; trailers; WebSocket messages.
A refusal is returned (or, inside a stream, raised as `Refused`) for the one exit in
`record` to apply; what it fills is learnt by the session's scrubber first.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mitmproxy import http, websocket

from . import bodies, decision, inject, origins, placeholders, policy, signing
from .errors import Refusal
from .flowstate import Fields, FlowState, Sent
from .inject import Context
from .linked import Linked
from .placeholders import Found
from .scrubbing import Scrubbers
from .sessions import Session
from .store import SecretStore, StoreError
from .streams import StreamRewriter

REQUEST_BODY_LIMIT = 64 * 1024 * 1024  # decoded bytes scanned for placeholders
ENCODED_REQUEST_LIMIT = 16 * 1024 * 1024  # compressed bytes a request may bring (they are held whole to decode)
SIGNED_BODY_LIMIT = 16 * 1024 * 1024  # bytes of a body held whole to be signed (HMAC, SigV4 but for S3)


class Refused(Exception):
    """A refusal found where it cannot be returned (inside a stream callable)."""

    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal


class Releaser:
    def __init__(self, store: Callable[[], SecretStore], scrubbers: Scrubbers,
                 allowed: Callable[[http.HTTPFlow, decision.Allow], Refusal | None],
                 live: Callable[[Session], Session | Refusal], linked: Linked) -> None:
        self.store, self.scrubbers, self.allowed, self.live = store, scrubbers, allowed, live
        self.linked = linked
        self.on_disallowed = "block"  # for a secret that does not say (sealgate_on_disallowed)

    async def request(self, flow: http.HTTPFlow, state: FlowState, *, with_body: bool,
                      rejected: dict[str, str] | None = None) -> Refusal | None:
        """URL, headers, trailers and (with_body) the buffered body: fill them all, or refuse. Linked accounts'
        tokens due (or, rejected: refused by the provider) are refreshed first; signatures are made last, over
        the request as it goes."""
        if other := bodies.transfer_codings(flow.request.headers.get("transfer-encoding", "")):
            return Refusal("unreadable_body", f"Transfer-Encoding {other!r} is not supported (use chunked)")
        try:
            scan = Scan.of(flow.request, with_body=with_body)
        except bodies.BodyError as e:
            return Refusal("unreadable_body", str(e))
        if not scan.found:
            return None
        where = Where(scan.locations(), _Sites(scan, flow.request.headers.fields), buffered=with_body)
        result = self._decide(flow, state, scan.placeholders, where)
        if isinstance(result, decision.Allow) and (result.refresh or rejected):
            names = set(result.refresh) | set(rejected or {})
            if (refusal := await self.linked.refresh(state.session.principal, sorted(names), rejected)) is not None:
                return refusal
            result = self._decide(flow, state, scan.placeholders, where)  # with the tokens as refreshed
        if isinstance(result, decision.Allow):
            result = self._commit(flow, state, result)
        if isinstance(result, Refusal):
            return result
        req = flow.request
        state.sent = Sent(req.data.path, req.headers.fields, req.raw_content,
                          req.trailers.fields if req.trailers else None)
        if result.header_forms:
            state.links = {p.name: result.values[p.text] for p in scan.placeholders if p.text in result.header_forms}
        scan.apply(req, result.values, result.header_forms)
        self.scrubbers.learn(state, result, sign(req, result.signers, buffered=with_body) if result.signers else [])
        return None

    def holds_body(self, flow: http.HTTPFlow, state: FlowState) -> bool:
        """Whether a body that would stream is held whole instead, to be signed: a placeholder in the head is
        of a secret whose signature covers the body, and the body's length is known and at most
        SIGNED_BODY_LIMIT (else it streams, and `decide` refuses it as unsignable)."""
        length = flow.request.headers.get("content-length", "")
        if not length.isdigit() or int(length) > SIGNED_BODY_LIMIT:
            return False
        names = {f.placeholder.name for fs in find_in_fields(flow.request.headers.fields).values() for f in fs}
        try:
            found = self.store().secrets_for(state.session.principal, names)
        except StoreError:
            return False  # refused as it streams, with the reason
        return any((sign := s.scope.sign) and (sign.kind == "hmac-sha256" or sign.service != "s3")
                   for s in found.values())

    def stream_body(self, flow: http.HTTPFlow, state: FlowState) -> StreamRewriter:
        """A rewriter that fills a streamed body as it flows; it raises Refused for a refused placeholder."""
        content_type = flow.request.headers.get("content-type", "")
        filled: dict[str, bytes] = {}
        context: list[Context] = []  # decided by the first bytes that are not white space

        def find(buf: bytes):
            if not context and buf.strip():
                context.append(inject.body_context(content_type, buf.lstrip()))
            for f in placeholders.find(buf):
                text = f.placeholder.text
                if text not in filled:
                    result = self._decide_now(flow, state, (f.placeholder,), Where.all_in(BODY, (f.placeholder,)))
                    if isinstance(result, Refusal):
                        raise Refused(result)
                    self.scrubbers.learn(state, result)
                    value = result.values.get(text)  # none: forwarded as it is
                    filled[text] = f.placeholder.text.encode() if value is None else inject.escape(value, context[0])
                yield f.start, f.end, filled[text]

        return StreamRewriter(find, lambda: placeholders.MAX_LEN)

    def trailers(self, flow: http.HTTPFlow, state: FlowState) -> Refusal | None:
        """Trailers of a streamed request go out after the request hook: fill or refuse them."""
        trailers = flow.request.trailers
        found = find_in_fields(trailers.fields) if trailers else {}
        if not found:
            return None
        present = distinct([f for fs in found.values() for f in fs])
        result = self._decide_now(flow, state, present, Where.all_in(HEADERS, present, policy.TRAILER))
        if isinstance(result, Refusal):
            return result
        self.scrubbers.learn(state, result)
        req = flow.request
        state.sent = Sent(req.data.path, req.headers.fields, req.raw_content, trailers.fields)
        trailers.fields = fill_fields(trailers.fields, found, result.values)
        return None

    def websocket_message(self, flow: http.HTTPFlow, state: FlowState, message: websocket.WebSocketMessage,
                          ) -> Refusal | None:
        found = placeholders.find(message.content)
        if not found:
            return None
        present = distinct(found)
        result = self._decide_now(flow, state, present, Where.all_in(BODY, present))
        if isinstance(result, Refusal):
            return result
        self.scrubbers.learn(state, result)
        message.content = inject.substitute(message.content, found, result.values,
                                            inject.body_context("", message.content))
        return None

    def _decide(self, flow: http.HTTPFlow, state: FlowState, found: tuple[placeholders.Placeholder, ...],
                where: Where) -> decision.Allow | Refusal:
        session = self.live(state.session)  # expired or revoked since the request began: nothing more is filled
        if isinstance(session, Refusal):
            return session
        result = decision.decide(facts(flow, found, where, self.on_disallowed), session,
                                 self._lookup(session.principal))
        return result.refusal if isinstance(result, decision.Block) else result

    def _decide_now(self, flow: http.HTTPFlow, state: FlowState, found: tuple[placeholders.Placeholder, ...],
                    where: Where) -> decision.Allow | Refusal:
        """For what cannot wait for a refresh (a streamed body, trailers, a WebSocket message): a token that
        is due but still valid goes as it is; an expired one is refused."""
        result = self._decide(flow, state, found, where)
        return self._commit(flow, state, result) if isinstance(result, decision.Allow) else result

    def _commit(self, flow: http.HTTPFlow, state: FlowState, result: decision.Allow) -> decision.Allow | Refusal:
        """Count the request against caps and rates, and audit it: then it may go."""
        return self._counted(state.session.principal, result.limits) or self.allowed(flow, result) or result

    def _counted(self, principal: str, limits: tuple[tuple[str, str, policy.Limit], ...]) -> Refusal | None:
        """Count the request against each filled secret's cap and rate (on the store: every node's count);
        past one, rate_limited with when to retry."""
        try:
            for name, kind, limit in limits:
                count, retry = self.store().usage.count(principal, name, kind, limit)
                if count > limit.count:
                    return Refusal("rate_limited", f"{name} may be used {limit.text} ({kind}); that is used up, "
                                   f"retry in {retry} s", retry_after=retry)
        except StoreError as e:
            return Refusal("store_unavailable", f"cannot count the use of {', '.join(n for n, _, _ in limits)}: {e}")
        return None

    def _lookup(self, principal: str) -> decision.SecretLookup:
        def lookup(names: set[str]):
            try:
                found: dict[str, decision.SecretLike] = self.store().secrets_for(principal, names)  # (a copy)
                if rest := names - found.keys():  # linked accounts appear under their provider's env name
                    found.update(self.linked.credentials(principal, rest))
                return found
            except StoreError as e:
                raise decision.LookupFailed(str(e)) from None
        return lookup


def encoded_body_refusal(framing: bodies.Framing) -> Refusal | None:
    """A compressed request body is held whole before it can be decoded: refuse a large one, or one of
    unknown length, before any of it is read."""
    if bodies.codings(framing.content_encoding) in ([], ["identity"]):
        return None
    length = framing.content_length
    if length is None:
        return Refusal("unreadable_body", "a compressed request body needs a Content-Length")
    if not length.isdigit() or int(length) > ENCODED_REQUEST_LIMIT:
        return Refusal("unreadable_body", f"a compressed request body may be at most {ENCODED_REQUEST_LIMIT} bytes")
    return None


@dataclass
class Scan:
    """Where placeholders sit in a request: URL, header values, Basic auth, trailers, body."""

    path: list[Found]
    headers: dict[int, list[Found]]
    basic: dict[int, tuple[bytes, list[Found]]]
    trailers: dict[int, list[Found]]
    body: bytes | None
    body_found: list[Found]

    @classmethod
    def of(cls, req: http.Request, *, with_body: bool) -> Scan:
        headers = find_in_fields(req.headers.fields)
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
        trailers = find_in_fields(req.trailers.fields) if req.trailers else {}
        return cls(placeholders.find(req.data.path), headers, basic, trailers, body, body_found)

    @functools.cached_property
    def found(self) -> list[Found]:
        out = self.path + self.body_found
        for f in [*self.headers.values(), *self.trailers.values()]:
            out += f
        for _, f in self.basic.values():
            out += f
        return out

    @functools.cached_property
    def placeholders(self) -> tuple[placeholders.Placeholder, ...]:
        return distinct(self.found)

    def locations(self) -> dict[str, frozenset[str]]:
        """Where each secret's placeholders sit: the URL (query), a header (Basic and trailers too), the body."""
        where: dict[str, set[str]] = {}
        places = [(QUERY, self.path), (BODY, self.body_found),
                  *((HEADERS, f) for f in [*self.headers.values(), *self.trailers.values()]),
                  *((HEADERS, f) for _, f in self.basic.values())]
        for place, found in places:
            for f in found:
                where.setdefault(f.placeholder.name, set()).add(place)
        return {name: frozenset(places) for name, places in where.items()}

    def sites(self, fields: Fields) -> dict[str, frozenset[tuple[str, bool]]]:
        """The headers each secret's placeholders stand in, with whether one is the whole value."""
        where: dict[str, set[tuple[str, bool]]] = {}
        places = [*(((fields[i][0].decode("latin-1").lower(), len(fields[i][1])), f) for i, f in self.headers.items()),
                  *(((policy.BASIC, -1), f) for _, f in self.basic.values()),
                  *(((policy.TRAILER, -1), f) for f in self.trailers.values())]
        for (header, length), found in places:
            for f in found:
                where.setdefault(f.placeholder.name, set()).add((header, f.start == 0 and f.end == length))
        return {name: frozenset(s) for name, s in where.items()}

    def apply(self, req: http.Request, values: dict[str, str], forms: dict[str, tuple[str, str]]) -> None:
        """Fill the request; a placeholder standing alone in its header form's header gets the prefix."""
        if self.path:
            req.data.path = inject.substitute(req.data.path, self.path, values, Context.URL)
        if self.trailers and req.trailers:
            req.trailers.fields = fill_fields(req.trailers.fields, self.trailers, values)
        if self.headers or self.basic:
            alone = {i: forms[f[0].placeholder.text] for i, f in self.headers.items()
                     if len(f) == 1 and f[0].placeholder.text in forms and f[0].start == 0
                     and f[0].end == len(req.headers.fields[i][1])}
            fields = list(fill_fields(req.headers.fields, self.headers, values))
            for i, (header, prefix) in alone.items():
                if fields[i][0].decode("latin-1").lower() == header.lower():
                    fields[i] = (fields[i][0], prefix.encode() + fields[i][1])
            for i, (decoded, found) in self.basic.items():
                filled = inject.encode_basic(inject.substitute(decoded, found, values, Context.RAW)).encode()
                fields[i] = (fields[i][0], filled)
            req.headers.fields = tuple(fields)
        if self.body_found and self.body is not None:
            ctx_ = inject.body_context(req.headers.get("content-type", ""), self.body)
            # Forward the filled body decoded: a compressed copy would be one more derived form of the value.
            req.headers.pop("content-encoding", None)
            req.content = inject.substitute(self.body, self.body_found, values, ctx_)


def sign(req: http.Request, signers: tuple[decision.Signer, ...], *, buffered: bool) -> list[tuple[str, str]]:
    """Replace each signer's placeholder by a signature over the request as it goes (every other value is in
    by now); (signature, placeholder) pairs, to keep out of responses. `decide` saw to it that each placeholder
    stands where its signature goes, and that a body to hash is held whole."""
    derived = []
    for s in signers:
        if s.signing.kind == "hmac-sha256":
            signature = signing.hmac_sha256_hex(s.key, req.raw_content or b"")
            req.headers.fields = tuple((k, v.replace(s.text.encode(), signature.encode())) for k, v in req.headers.fields)
        else:
            key = signing.parse_sigv4_value(s.key)
            if "x-amz-date" not in req.headers:
                req.headers["X-Amz-Date"] = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            payload = signing.payload_hash(req.raw_content or b"") if buffered else signing.UNSIGNED_PAYLOAD
            req.headers["X-Amz-Content-Sha256"] = payload
            headers = [("host", req.host_header or ""), *((k, v) for k, v in req.headers.items(multi=True)
                                                          if k.lower() not in ("host", "authorization"))]
            authorization, signature = signing.sigv4_authorization(
                key, method=req.method, target=req.data.path.decode("utf-8", "surrogateescape"), headers=headers,
                payload_hash=payload, region=s.signing.region or "", service=s.signing.service or "",
                amz_date=req.headers["x-amz-date"])
            req.headers["Authorization"] = authorization
        derived.append((signature, s.text))
    return derived


def distinct(found: list[Found]) -> tuple[placeholders.Placeholder, ...]:
    return tuple(dict.fromkeys(f.placeholder for f in found))


def find_in_fields(fields: Fields) -> dict[int, list[Found]]:
    """Placeholders in header (or trailer) values, by field index."""
    return {i: f for i, (_, value) in enumerate(fields) if (f := placeholders.find(value))}


def fill_fields(fields: Fields, found: dict[int, list[Found]], values: dict[str, str]) -> Fields:
    out = list(fields)
    for i, f in found.items():
        out[i] = (out[i][0], inject.substitute(out[i][1], f, values, Context.HEADER))
    return tuple(out)


HEADERS, QUERY, BODY = "headers", "query", "body"  # where a placeholder sits (policy.LOCATIONS)


class _Sites(Mapping):
    """Scan.sites, worked out when first looked at: only a signing secret's placeholder needs them."""

    def __init__(self, scan: Scan, fields: Fields) -> None:
        self._scan, self._fields, self._sites = scan, fields, None

    def _all(self) -> dict[str, frozenset[tuple[str, bool]]]:
        if self._sites is None:
            self._sites = self._scan.sites(self._fields)
        return self._sites

    def __getitem__(self, name: str) -> frozenset[tuple[str, bool]]:
        return self._all()[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


@dataclass(frozen=True)
class Where:
    """Where a request's placeholders sit: each secret's locations (policy.LOCATIONS) and header sites
    (decision.RequestFacts.sites), and whether the body is held whole."""

    locations: dict[str, frozenset[str]]
    sites: Mapping[str, frozenset[tuple[str, bool]]]
    buffered: bool
    can_refresh: bool = True

    @classmethod
    def all_in(cls, place: str, present: tuple[placeholders.Placeholder, ...], site: str | None = None) -> Where:
        """Placeholders that all sit in one place (a streamed body, trailers, a WebSocket message): nothing
        there can wait for a refresh or be signed."""
        return cls({p.name: frozenset({place}) for p in present},
                   {p.name: frozenset({(site, False)}) for p in present} if site else {}, buffered=False,
                   can_refresh=False)


def facts(flow: http.HTTPFlow, found: tuple[placeholders.Placeholder, ...], where: Where | None = None,
          on_disallowed: str = "block") -> decision.RequestFacts:
    """What `decide` needs to know about a flow: the destination as dialled and what the client claimed."""
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
        method=req.method,
        path=req.path,
        locations=where.locations if where else {},
        on_disallowed=on_disallowed,
        overrides=_overrides(req),
        sites=where.sites if where else {},
        buffered=where.buffered if where else True,
        can_refresh=where.can_refresh if where else True,
    )




_OVERRIDES = tuple(name.encode() for name in policy.OVERRIDES)


def _overrides(req: http.Request) -> tuple[str, ...]:
    """What in the request claims another method or path than its own (the header names in one pass)."""
    names = {k.lower() for k, _ in req.headers.fields}
    found = tuple(name for name, raw in zip(policy.OVERRIDES, _OVERRIDES, strict=True) if raw in names)
    query = req.path.partition("?")[2].lower()
    return found + (("_method=",) if "_method=" in query or "_method%3d" in query else ())
