"""The one place that says allow or deny (pure).

Given the facts of a request (the destination as dialled, the hosts the client
claimed, the state of upstream TLS, the placeholders found) and the session, `decide`
returns Allow with the values to substitute, or Block with a Refusal. The addon
gathers the facts and applies the result; nothing else decides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from . import origins
from .errors import Refusal
from .origins import Origin, OriginError
from .placeholders import Placeholder
from .policy import Limit, Scope, Signing


@dataclass(frozen=True)
class Destination:
    """Where the proxy connects: CONNECT target or absolute-form authority."""

    scheme: str
    host: str  # normalised
    port: int

    def __str__(self) -> str:
        return origins.serialise(self.scheme, self.host, self.port)


@dataclass(frozen=True)
class RequestFacts:
    destination: Destination
    host_headers: tuple[str, ...]  # every Host header value and the :authority
    sni: str | None  # the client's TLS server name
    upstream_tls_error: str | None
    placeholders: tuple[Placeholder, ...]
    method: str = "GET"
    path: str = "/"  # as sent, query included
    locations: Mapping[str, frozenset[str]] = field(default_factory=dict)  # secret name -> where it sits
    on_disallowed: str = "block"  # the proxy's default for a secret that does not say
    overrides: tuple[str, ...] = ()  # what claims another method or path (policy.OVERRIDES, _method=)
    sites: Mapping[str, frozenset[tuple[str, bool]]] = field(default_factory=dict)
    # secret name -> the headers it sits in (lower case; policy.BASIC, policy.TRAILER), each with whether the
    # placeholder is the whole value
    buffered: bool = True  # the body is held whole (it can be hashed for a signature)
    can_refresh: bool = True  # the request can wait for a linked account's token to be refreshed


class SessionLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def principal(self) -> str: ...
    @property
    def mac_key(self) -> bytes: ...
    def global_values(self) -> dict[str, str]: ...


class SecretLike(Protocol):
    """A stored secret, or a linked account's current token (`linked.LinkCredential`)."""

    @property
    def value(self) -> str: ...
    @property
    def origins(self) -> tuple[Origin, ...]: ...
    @property
    def scope(self) -> Scope: ...
    header_form: tuple[str, str] | None  # (header, prefix): standing alone in that header, it gets the prefix
    refresh_due: bool  # a token to refresh before it is sent
    expired: bool
    broken: str | None  # why a linked account's token cannot be had


class LookupFailed(Exception):
    """The store or key could not be read."""


SecretLookup = Callable[[set[str]], Mapping[str, SecretLike]]


@dataclass(frozen=True)
class Signer:
    """A signing secret's placeholder, to be replaced by a signature over the request as sent."""

    text: str  # the placeholder
    name: str
    signing: Signing
    key: str

    def __repr__(self) -> str:
        return f"Signer({self.name}, {self.signing.kind})"


@dataclass(frozen=True)
class Allow:
    values: dict[str, str]  # placeholder text -> value
    secret_names: tuple[str, ...]  # the secrets (not globals) injected or signing
    forwarded: tuple[str, ...] = ()  # secrets whose placeholders go as they are (on-disallowed forward)
    limits: tuple[tuple[str, str, Limit], ...] = ()  # (secret, cap or rate, limit) the request counts against
    signers: tuple[Signer, ...] = ()
    header_forms: dict[str, tuple[str, str]] = field(default_factory=dict)  # placeholder text -> (header, prefix)
    refresh: tuple[str, ...] = ()  # linked accounts whose token is to be refreshed first (then decide again)

    def __repr__(self) -> str:
        return f"Allow({', '.join(self.secret_names) or 'globals only'})"


@dataclass(frozen=True)
class Block:
    refusal: Refusal


def decide(facts: RequestFacts, session: SessionLike, lookup: SecretLookup) -> Allow | Block:
    dest = facts.destination
    globals_ = session.global_values()
    for p in facts.placeholders:
        if not p.is_valid_for(session.id, session.mac_key):
            return Block(Refusal("unknown_placeholder", f"placeholder for {p.name} does not belong to this session"))
    wanted = {p.name for p in facts.placeholders if p.name not in globals_}
    values = {p.text: globals_[p.name] for p in facts.placeholders if p.name in globals_}
    if not wanted:
        return Allow(values, ())
    if (why := _claimed_host_mismatch(dest, facts.host_headers, facts.sni)) is not None:
        return Block(Refusal("host_mismatch", f"{why}; not sending {', '.join(sorted(wanted))} to {dest}"))
    try:
        found = lookup(wanted)
    except LookupFailed as e:
        return Block(Refusal("store_unavailable", f"cannot read {', '.join(sorted(wanted))}: {e}"))
    forwarded = []
    for name in sorted(wanted):
        secret = found.get(name)
        if secret is None:
            return Block(Refusal("unknown_placeholder", f"user {session.principal} has no secret named {name}"))
        allowed = secret.origins
        if not any(o.matches(dest.scheme, dest.host, dest.port) for o in allowed):
            if (secret.scope.on_disallowed or facts.on_disallowed) == "forward":
                forwarded.append(name)  # its placeholder goes as it is: the value never does
                continue
            if dest.scheme == "http" and any(
                o.matches("https", dest.host, 443 if dest.port == 80 else dest.port) for o in allowed
            ):
                return Block(Refusal("insecure_upstream", f"{name} may only go over https, not to {dest}"))
            return Block(Refusal("origin_not_allowed", f"{name} may not go to {dest}"))
        if why := secret.scope.denied(facts.method, facts.path, facts.locations.get(name, frozenset()),
                                      facts.overrides):
            return Block(Refusal("scope_denied", f"{name} may not go in this request: {why}"))
        if secret.scope.sign and (no := secret.scope.sign.denied(
                name, facts.locations.get(name, frozenset()), facts.sites.get(name, frozenset()), facts.buffered)):
            return Block(Refusal(*no))
        if secret.broken is not None:
            return Block(Refusal("link_refresh_failed", f"{name}: {secret.broken}"))
        if secret.expired and not facts.can_refresh:
            return Block(Refusal("link_refresh_failed", f"{name}: the token expired, and this part of a request (a "
                                 "streamed body, trailers, a WebSocket message) cannot wait for its refresh"))
    wanted -= set(forwarded)
    if dest.scheme == "https" and facts.upstream_tls_error:
        return Block(Refusal(
            "insecure_upstream",
            f"TLS to {dest} could not be verified ({facts.upstream_tls_error}); not sending {', '.join(sorted(wanted))}",
        ))
    signers, forms = [], {}
    for p in facts.placeholders:
        if p.name in wanted:
            secret = found[p.name]
            if secret.scope.sign:  # the value never goes in the request: a signature over it does
                signers.append(Signer(p.text, p.name, secret.scope.sign, secret.value))
                continue
            values[p.text] = secret.value
            if secret.header_form:
                forms[p.text] = secret.header_form
    limits = tuple((name, kind, limit) for name in sorted(wanted) for kind, limit in found[name].scope.limits())
    refresh = tuple(n for n in sorted(wanted) if found[n].refresh_due and facts.can_refresh)
    return Allow(values, tuple(sorted(wanted)), tuple(forwarded), limits, tuple(signers), forms, refresh)


def _claimed_host_mismatch(dest: Destination, host_headers: tuple[str, ...], sni: str | None) -> str | None:
    """Why a Host header, :authority or SNI names another host than the destination.

    A Host without a port means the scheme's default port; SNI carries no port.
    """
    claims = [(text, *_split_authority(text, dest.scheme)) for text in host_headers]
    if sni:
        claims.append((f"{sni} (TLS SNI)", sni, dest.port))
    for shown, host, port in claims:
        try:
            same = origins.normalise_host(host) == dest.host and port == dest.port
        except OriginError:
            same = False
        if not same:
            return f"the client named the host {shown!r} but the request goes to {dest}"
    return None


def _split_authority(text: str, scheme: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text.partition("]")
        host += "]"
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text:
        return host, origins.DEFAULT_PORTS[scheme]
    return host, int(port_text) if origins.is_port_text(port_text) else -1
