"""Sessions: one worker run, its principal, its proxy credential and its ENV map.

Who the principal is follows the platform's rules: signed in, the user's own
credentials; called via the API, the API key owner's; app view while signed out, the
workflow author's. Only a hash of the proxy credential is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass

from . import placeholders, providers, validate
from .store import SecretStore, SessionRecord

ACCESS_MODES = ("signed-in", "api", "app-view")


def principal_for(access: str, user: str | None, author: str | None) -> str:
    """The user whose credentials resolve for a run; ValueError says what is missing."""
    if access in ("signed-in", "api"):
        if not user:
            who = "the signed-in user" if access == "signed-in" else "the owner of the API key that made the call"
            raise ValueError(f"--access {access} needs --user ({who})")
        return validate.user_id(user)
    if access == "app-view":
        if user:  # a signed-in viewer uses their own credentials
            return validate.user_id(user)
        if not author:
            raise ValueError("--access app-view without --user (signed out) needs --author (the workflow author)")
        return validate.user_id(author, "author id")
    raise ValueError(f"--access must be one of {', '.join(ACCESS_MODES)}, not {access!r}")


@dataclass(frozen=True)
class Session:
    record: SessionRecord

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def principal(self) -> str:
        return self.record.principal

    @property
    def mac_key(self) -> bytes:
        """The key of this session's placeholder MACs."""
        return self.record.mac_key

    def global_values(self) -> dict[str, str]:
        """Identifying variables; they resolve for any destination."""
        r = self.record
        return dict(zip(validate.GLOBAL_NAMES, (r.runchat, r.instance, r.principal), strict=True))

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.record.expires_at

    def placeholder(self, name: str) -> str:
        return placeholders.mint(self.record.mac_key, self.record.id, name)


@dataclass(frozen=True)
class Issued:
    session: Session
    credential: str
    env: dict[str, str]


def _hash(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


def issue(store: SecretStore, *, access: str, runchat: str, instance: str,
          user: str | None, author: str | None, ttl_seconds: int) -> Issued:
    principal = principal_for(access, user, author)
    validate.run_id(runchat, "runchat id")
    validate.run_id(instance, "instance id")
    now = time.time()
    session_id = "".join(secrets.choice(placeholders.SESSION_ID_ALPHABET) for _ in range(placeholders.SESSION_ID_LENGTH))
    credential = secrets.token_urlsafe(32)
    record = SessionRecord(
        id=session_id, credential_hash=_hash(credential), mac_key=os.urandom(32), access=access,
        runchat=runchat, instance=instance, principal=principal, created_at=now, expires_at=now + ttl_seconds,
    )
    store.add_session(record)
    session = Session(record)
    names = [s.name for s in store.list_secrets(principal)] + [
        providers.env_name(p) for p in store.links.providers(principal)] + list(session.global_values())
    return Issued(session, credential, {n: session.placeholder(n) for n in names})


def authenticate(store: SecretStore, session_id: str, credential: str, now: float | None = None) -> Session | None:
    """The live session these proxy credentials name, or None. StoreError if unreadable."""
    if not session_id or not credential:
        return None
    record = store.session(session_id)
    if record is None or not hmac.compare_digest(record.credential_hash, _hash(credential)):
        return None
    session = Session(record)
    return None if session.expired(now) else session
