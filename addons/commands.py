"""What the CLI and the platform API both do, with one validation: a bad field raises `Invalid`, naming
the field, with the same sentence on both (the CLI prints `--field: sentence`, the API answers 422
problem+json with `field`). Values are never echoed.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import TypeVar

from . import ca, origins, policy, sessions, settings, validate
from .policy import Scope
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
            "cap": s.cap and s.cap.text, "rate": s.rate and s.rate.text, "used": used}


def add_secret(store: SecretStore, user: str, name: str, value: str | Callable[[], str], origin_text: str, *,
               allow_http: bool = False, replace: bool = False, scope: Scope | None = None,
               ) -> tuple[SecretInfo, list[str]]:
    """value: the value, or how to read it once every other field is known to be good (a prompt)."""
    name = checked("name", validate.secret_name, name)
    user = checked("user", validate.user_id, user)
    allowed, warnings = parse_origins(origin_text, allow_http=allow_http)
    value = checked("value", validate.secret_value, value() if callable(value) else value)
    store.add_secret(user, name, value, allowed, replace=replace, scope=scope)
    return _info(store, user, name), warnings


def set_scope(store: SecretStore, user: str, name: str, scope: Scope) -> SecretInfo:
    user, name = checked("user", validate.user_id, user), checked("name", validate.secret_name, name)
    store.set_scope(user, name, scope)
    return _info(store, user, name)


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
