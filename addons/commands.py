"""What the CLI and the platform API both do, with one validation: a bad field raises `Invalid`, naming
the field, with the same sentence on both (the CLI prints `--field: sentence`, the API answers 422
problem+json with `field`). Values are never echoed.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

from . import (
    ca,
    oauth,
    origins,
    outbound,
    policy,
    providers,
    sessions,
    settings,
    validate,
)
from . import signing as signing_module
from .links import LinkInfo, Pending, Tokens
from .policy import Scope
from .providers import Provider, ProviderError
from .store import SecretInfo, SecretStore

T = TypeVar("T")


class Invalid(ValueError):
    """A field that cannot be used; str() says why, `field` says which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def checked(field: str, check: Callable[..., T], *args, **kwargs) -> T:
    """check(*args, **kwargs), its ValueError as Invalid naming field."""
    try:
        return check(*args, **kwargs)
    except Invalid:
        raise
    except ValueError as e:
        raise Invalid(field, str(e)) from None


def parse_origins(text: str, *, allow_http: bool) -> tuple[list[origins.Origin], list[str]]:
    """Origins and the warnings they deserve (a wildcard)."""
    try:
        parsed = origins.parse_list(text, allow_http=allow_http)
    except origins.OriginError as e:
        raise Invalid("origins", str(e)) from None
    warnings = [f"{o} allows every subdomain of {o.host[2:]}; list exact hosts where you can"
                for o in parsed if o.is_wildcard]
    return parsed, warnings


def parse_signing(sign: str | None, header: str | None = None, region: str | None = None,
                  service: str | None = None) -> policy.Signing | None:
    """How a secret signs (`--sign`), or None."""
    if sign is None:
        if header or region or service:
            raise Invalid("sign", "--sign-header, --region and --service go with --sign")
        return None
    return checked("sign", policy.parse_signing, sign, header, region, service)


def parse_scope(methods: str | None = None, paths: str | None = None, inject: str | None = None,
                on_disallowed: str | None = None, cap: str | None = None, rate: str | None = None) -> Scope | None:
    """A scope from the CLI's (and the API's) texts; None when none of them is given."""
    given = {"methods": (methods, policy.parse_methods), "paths": (paths, policy.parse_paths),
             "inject": (inject, policy.parse_inject), "on_disallowed": (on_disallowed, policy.parse_on_disallowed),
             "cap": (cap, policy.parse_limit), "rate": (rate, policy.parse_limit)}
    if all(text is None for text, _ in given.values()):
        return None
    return Scope(**{field: checked(field, parse, text) if text is not None else None
                    for field, (text, parse) in given.items()})


def scope_json(store: SecretStore, info: SecretInfo, usage: dict | None = None) -> dict:
    """A secret's scope and, for its limits, how much of the current window is used."""
    s, now = info.scope, time.time()
    usage = store.usage.of(info.owner) if usage is None else usage
    used = {}
    for kind, limit in s.limits():
        start, count = usage.get((info.name, kind), (None, 0))
        used[kind] = f"{count if start == limit.window(now)[0] else 0}/{limit.text}"
    return {"methods": sorted(s.methods) if s.methods else None, "paths": list(s.paths) if s.paths else None,
            "inject": sorted(s.inject) if s.inject else None, "on_disallowed": s.on_disallowed,
            "cap": s.cap and s.cap.text, "rate": s.rate and s.rate.text, "used": used,
            "sign": s.sign.as_dict() if s.sign else None}


def add_secret(store: SecretStore, user: str, name: str, value: str | Callable[[], str], origin_text: str, *,
               allow_http: bool = False, replace: bool = False, scope: Scope | None = None,
               signing: policy.Signing | None = None) -> tuple[SecretInfo, list[str]]:
    """value: the value, or how to read it once every other field is known to be good (a prompt)."""
    name = checked("name", validate.secret_name, name)
    user = checked("user", validate.user_id, user)
    allowed, warnings = parse_origins(origin_text, allow_http=allow_http)
    if name in (p := {providers.env_name(p): p for p in store.links.providers(user)}):
        raise Invalid("name", f"user {user} has linked {p[name]}, which appears as {name}; choose another name")
    scope, sign = _kept_signing(store, user, name, scope, signing)
    value = checked("value", validate.secret_value, value() if callable(value) else value)
    if sign and sign.kind == "aws-sigv4":
        checked("value", signing_module.parse_sigv4_value, value)
    store.add_secret(user, name, value, allowed, replace=replace, scope=scope)
    return _info(store, user, name), warnings


def set_scope(store: SecretStore, user: str, name: str, scope: Scope) -> SecretInfo:
    user, name = checked("user", validate.user_id, user), checked("name", validate.secret_name, name)
    store.set_scope(user, name, _kept_signing(store, user, name, scope, None)[0] or scope)
    return _info(store, user, name)


def _kept_signing(store: SecretStore, user: str, name: str, scope: Scope | None, signing: policy.Signing | None,
                  ) -> tuple[Scope | None, policy.Signing | None]:
    """The scope to store (None: the one it has), and how the secret signs. That is set when it is added and
    kept by every change after: a scope or a value replaced without it would let the key go into requests."""
    info = next((i for i in store.list_secrets(user) if i.name == name), None)
    if info is None:
        return (dataclasses.replace(scope or Scope(), sign=signing) if signing else scope), signing
    old = info.scope.sign
    if signing is not None and signing != old:
        raise Invalid("sign", f"how {name} signs is set when it is added; remove it and add it again to change that")
    return (dataclasses.replace(scope, sign=old) if scope is not None and old else scope), old


def set_origins(store: SecretStore, user: str, name: str, origin_text: str, *,
                allow_http: bool = False) -> tuple[SecretInfo, list[str]]:
    user, name = checked("user", validate.user_id, user), checked("name", validate.secret_name, name)
    allowed, warnings = parse_origins(origin_text, allow_http=allow_http)
    store.set_origins(user, name, allowed)
    return _info(store, user, name), warnings


def remove_secret(store: SecretStore, user: str, name: str) -> None:
    store.remove_secret(checked("user", validate.user_id, user), checked("name", validate.secret_name, name))


def list_secrets(store: SecretStore, user: str) -> list[SecretInfo]:
    return store.list_secrets(checked("user", validate.user_id, user))


def _info(store: SecretStore, user: str, name: str) -> SecretInfo:
    return next(i for i in store.list_secrets(user) if i.name == name)


def secret_json(info: SecretInfo) -> dict:
    """What may be shown of a secret: never its value."""
    return {"name": info.name, "origins": [str(o) for o in info.origins], "created_at": iso(info.created_at),
            "updated_at": iso(info.updated_at)}


def issue_session(store: SecretStore, s: settings.Settings, *, access: str, runchat: str, instance: str,
                  user: str | None, author: str | None, ttl: str | int | None) -> dict:
    """A session, as the JSON document `session issue` prints and `POST /v1/sessions` answers."""
    if access not in sessions.ACCESS_MODES:
        raise Invalid("access", f"access must be one of {', '.join(sessions.ACCESS_MODES)}")
    seconds = s.session_ttl if ttl is None else checked("ttl", settings.ttl_seconds, ttl)
    for field, text in (("runchat", runchat), ("instance", instance)):
        checked(field, validate.run_id, text, f"{field} id")
    who = "author" if access == "app-view" and not user else "user"
    issued = checked(who, sessions.issue, store, access=access, runchat=runchat, instance=instance, user=user,
                     author=author, ttl_seconds=seconds)
    host = s.listen_host if s.listen_host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    record = issued.session.record
    return {
        "proxy_url": f"http://{record.id}:{issued.credential}@{origins.bracketed(host)}:{s.listen_port}",
        "ca_cert": str(ca.ensure_ca(s.certs_dir)),
        "env": issued.env,
        "expires_at": iso(record.expires_at),
        "session_id": record.id,
        "principal": record.principal,
        "access": record.access,
    }


# linked accounts ---------------------------------------------------------------------------

def link_start(store: SecretStore, s: settings.Settings, *, user: str, provider: str, redirect_uri: str) -> dict:
    """Begin linking: the authorization URL (state, PKCE S256) to send the user to."""
    user = checked("user", validate.user_id, user)
    p = _provider(s, provider, user, store)
    checked("provider", oauth.client_secret, p)  # now, not when the code comes back and the state is spent
    redirect_uri = checked("redirect_uri", _redirect_uri, redirect_uri)
    verifier, challenge = oauth.pkce()
    state = store.links.begin(user, p.name, redirect_uri, verifier)
    return {"authorization_url": oauth.authorization_url(p, redirect_uri, state, challenge), "state": state,
            "provider": p.name, "user": user}


def link_finish(store: SecretStore, s: settings.Settings, *, state: str, code: str) -> LinkInfo:
    """Exchange the code the provider sent back to the redirect URI, and keep the tokens."""
    pending, p = link_begun(store, s, state)
    return link_keep(store, pending.owner, p.name, link_exchange(s, p, pending, code))


def link_begun(store: SecretStore, s: settings.Settings, state: str) -> tuple[Pending, Provider]:
    """The linking a state names (used up), and its provider."""
    pending = store.links.take(checked("state", _token_text, state, "state"))
    return pending, _provider(s, pending.provider, pending.owner, store)


def link_exchange(s: settings.Settings, p: Provider, pending: Pending, code: str) -> Tokens:
    """The code exchanged at the provider's token endpoint (network only: the API runs it in a thread)."""
    try:
        return checked("provider", oauth.code_grant, p, checked("code", _token_text, code, "code"),
                       pending.redirect_uri, pending.verifier, _post(s))
    except oauth.TokenRefused as e:
        raise Invalid("code", f"{p.name} refused the code ({e.code}); run `sealgate link start` again") from None


def link_add(store: SecretStore, s: settings.Settings, *, user: str, provider: str, token_json: bytes) -> LinkInfo:
    """Keep tokens a platform got itself (a token response: access_token, refresh_token, expires_in)."""
    user = checked("user", validate.user_id, user)
    p = _provider(s, provider, user, store, complete=False)
    try:
        tokens = oauth.parse_tokens(outbound.Reply(200, "", [], token_json), time.time(), None)
    except (oauth.TokenRefused, oauth.TokenUnavailable) as e:
        raise Invalid("tokens", f"not a usable token response ({e}); give JSON with access_token, and "
                                "refresh_token and expires_in where the provider gave them") from None
    return link_keep(store, user, p.name, tokens)


def link_list(store: SecretStore, user: str) -> list[LinkInfo]:
    return store.links.list(checked("user", validate.user_id, user))


def link_remove(store: SecretStore, user: str, provider: str) -> None:
    store.links.remove(checked("user", validate.user_id, user), checked("provider", providers.check_name, provider))


def link_json(info: LinkInfo) -> dict:
    """What may be shown of a link: never a token."""
    return {"provider": info.provider, "env": providers.env_name(info.provider), "status": info.status,
            "detail": info.detail or None, "expires_at": None if info.expires_at is None else iso(info.expires_at),
            "created_at": iso(info.created_at), "updated_at": iso(info.updated_at)}


def link_keep(store: SecretStore, user: str, provider: str, tokens: Tokens) -> LinkInfo:
    store.links.put(user, provider, tokens)
    return next(i for i in store.links.list(user) if i.provider == provider)


def _provider(s: settings.Settings, name: str, user: str, store: SecretStore, *, complete: bool = True) -> Provider:
    """The provider, usable (complete: for the consent and the exchange), whose env name none of user's
    secrets has."""
    try:
        p = s.registry().get(checked("provider", providers.check_name, name))
        p = p.usable() if complete else p
    except ProviderError as e:
        raise Invalid("provider", str(e)) from None
    if any(i.name == p.env_name for i in store.list_secrets(user)):
        raise Invalid("provider", f"user {user} has a secret named {p.env_name}, which a link to {p.name} would "
                                  "appear as; rename or remove it first")
    return p


def _post(s: settings.Settings) -> oauth.Post:
    return oauth.poster(s.egress_policy(), outbound.trust(ca.upstream_bundle(s.certs_dir, s.upstream_ca)))


def _redirect_uri(text: str) -> str:
    """https, or http on loopback (a native app's, RFC 8252); no fragment."""
    try:
        parts = urlsplit(text)
        host = parts.hostname or ""
    except ValueError:
        parts, host = None, ""
    loopback = host in ("localhost", "127.0.0.1", "::1")
    if parts is None or not host or parts.fragment or (parts.scheme != "https" and not (
            parts.scheme == "http" and loopback)) or any(ord(c) <= 0x20 for c in text):
        raise ValueError("the redirect URI must be an https:// URL (http:// only on loopback) without a fragment")
    return text


def _token_text(text: str, what: str) -> str:
    if not 1 <= len(text) <= 2048 or any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in text):
        raise ValueError(f"the {what} must be 1 to 2048 printable ASCII characters")
    return text


def audit(store: SecretStore, *, user: str | None, runchat: str | None, since: str | None,
          limit: int = 1000) -> list[dict]:
    when = checked("since", parse_since, since) if since else None
    user = checked("user", validate.user_id, user) if user else None
    return [{**r.__dict__, "at": iso(r.at), "secrets": list(r.secrets)}
            for r in store.audit(user=user, runchat=runchat, since=when, limit=limit)]


def check_secrets(store: SecretStore, user: str | None) -> list:
    """`secret check`: every secret of user (of every user for None), linted against the audit trail."""
    from . import lint
    owners = [checked("user", validate.user_id, user)] if user else store.owners()
    infos = [i for owner in owners for i in store.list_secrets(owner)]
    since = time.time() - lint.UNUSED_DAYS * 86400
    records = [r for owner in owners for r in store.audit(user=owner, since=since, limit=1_000_000)]
    used = {(r.principal, name, r.origin) for r in records if r.decision == "allow" for name in r.secrets}
    return lint.check(infos, used if store.audit(limit=1) else None)


def parse_since(text: str) -> float:
    """'30m', '2h', '7d' ago, or an ISO 8601 time."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[:-1].isdigit() and text[-1:] in units:
            return datetime.datetime.now(datetime.UTC).timestamp() - int(text[:-1]) * units[text[-1]]
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        return (when if when.tzinfo else when.replace(tzinfo=datetime.UTC)).timestamp()
    except (ValueError, OverflowError):
        raise ValueError(f"{text[:40]!r} is neither a duration like 30m, 2h, 7d nor a time like "
                         "2026-11-27T10:00:00Z") from None


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
