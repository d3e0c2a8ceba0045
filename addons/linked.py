"""Linked accounts on the request path: what a link gives a request (its current access token, to
the provider's origins only, in the provider's header form), and the refresh that keeps it valid.

A token expiring within a minute is refreshed before it is sent, and once after the provider
answers 401. Requests of one process that need the same refresh share it; nodes sharing a store
take a lease in it first, so one node spends the refresh token while the others wait for the
tokens it stores. A refresh the provider refuses marks the link broken (`link list` shows it), and
its placeholder is refused with link_refresh_failed until the account is linked again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import oauth, outbound
from .errors import Refusal, StoreError
from .links import BROKEN, Link
from .origins import Origin
from .policy import Scope
from .providers import Provider, ProviderError, Registry, env_name
from .store import SecretStore

LEASE = 40.0  # seconds one node may take to refresh a token (outbound.DEADLINE and more) before another may try
WAIT_STEP = 0.1  # seconds between looks at a token another node is refreshing
RETRY_AFTER_401 = 60.0  # seconds in which a token got by a refresh after a 401 is not refreshed again for one


@dataclass(frozen=True)
class LinkCredential:
    """A link as `decision.decide` sees a secret: the provider's origins, no scope beyond them."""

    provider: Provider
    link: Link
    scope: Scope = Scope()

    @property
    def value(self) -> str:
        return self.link.tokens.access_token

    @property
    def origins(self) -> tuple[Origin, ...]:
        return self.provider.origins

    @property
    def header_form(self) -> tuple[str, str]:
        return self.provider.header, self.provider.prefix

    @property
    def refresh_due(self) -> bool:
        return self.link.tokens.due(time.time())

    @property
    def expired(self) -> bool:
        return self.link.tokens.expired(time.time())

    @property
    def broken(self) -> str | None:
        if self.link.info.status != BROKEN:
            return None
        return f"the link to {self.provider.name} is broken ({self.link.info.detail}); link the account again"

    def __repr__(self) -> str:
        return f"LinkCredential({self.link.info.owner}/{self.provider.name})"


class Linked:
    def __init__(self, store: Callable[[], SecretStore]) -> None:
        self.store = store
        self.registry = Registry()
        self.post: oauth.Post | None = None  # how the proxy reaches token endpoints (set when configured)
        self._refreshing: dict[tuple[str, str], asyncio.Future[Refusal | None]] = {}
        self._after_401: dict[tuple[str, str], tuple[str, float]] = {}  # (owner, env name) -> (token, when)

    def credentials(self, owner: str, names: set[str]) -> dict[str, LinkCredential]:
        """owner's linked accounts among names (env names), with their tokens as stored now."""
        found = {}
        for provider, link in self.store().links.open(owner).items():
            if (name := env_name(provider)) in names:
                # a provider no longer configured has no origins: its token goes nowhere
                found[name] = LinkCredential(self.registry.providers.get(provider, Provider(provider)), link)
        return found

    def values(self, owner: str) -> list[tuple[str, str]]:
        """(token, env name) of every token owner's links hold, to keep out of responses."""
        return [(token, env_name(provider)) for provider, link in self.store().links.open(owner).items()
                for token in (link.tokens.access_token, link.tokens.refresh_token) if token]

    async def refresh(self, owner: str, names: Iterable[str], rejected: dict[str, str] | None = None,
                      ) -> Refusal | None:
        """Refresh the tokens of owner's links among names (env names) that are due, or (rejected: env name ->
        the token the provider answered 401 to) that were refused; one refresh per link, shared."""
        by_env = {env_name(p): p for p in self.store().links.open(owner)}
        for name in names:
            key = (owner, by_env.get(name, name))
            task = self._refreshing.get(key)
            if task is None:
                task = self._refreshing[key] = asyncio.ensure_future(self._refresh(*key, (rejected or {}).get(name)))
                task.add_done_callback(lambda _, key=key: self._refreshing.pop(key, None))
            if (refusal := await asyncio.shield(task)) is not None:
                return refusal
        return None

    def worth_sending_again(self, owner: str, sent: dict[str, str]) -> bool:
        """Whether a 401 to the tokens sent (env name -> token) is worth a refresh and a second try: not when
        every one of them came from a refresh made after a 401 within RETRY_AFTER_401 seconds (the provider
        refuses a fresh token: a scope it lacks, not its age). Bounds the refreshes a worker can cause."""
        now = time.monotonic()
        for name, token in sent.items():
            got = self._after_401.get((owner, name))
            if got is None or got[0] != token or now - got[1] > RETRY_AFTER_401:
                return True
        return False

    async def _refresh(self, owner: str, provider: str, rejected: str | None) -> Refusal | None:
        try:
            return await self._refresh_now(owner, provider, rejected)
        except StoreError as e:
            return Refusal("store_unavailable", f"the link to {provider} cannot be read or written: {e}")

    async def _refresh_now(self, owner: str, provider: str, rejected: str | None) -> Refusal | None:
        links = self.store().links
        deadline = time.monotonic() + LEASE
        while True:  # until this node holds the lease, or another node's refresh is found done
            link = links.read(owner, provider).get(provider)
            if link is None:
                return _failed(provider, "the account is no longer linked")
            if link.info.status == BROKEN:
                return _failed(provider, f"the link is broken ({link.info.detail}); link the account again")
            if (link.tokens.access_token != rejected) if rejected else not link.tokens.due(time.time()):
                return None  # refreshed meanwhile
            if link.tokens.refresh_token is None:
                return _failed(provider, f"the token {'was refused' if rejected else 'expires'}, and the link holds "
                                         "no refresh token; link the account again")
            if links.lease(link, LEASE):
                break
            if time.monotonic() > deadline:
                return _failed(provider, f"another proxy took the refresh and did not finish it in {LEASE:g} s")
            await asyncio.sleep(WAIT_STEP)
        try:
            tokens = await outbound.off_loop(oauth.refresh_grant, self.registry.get(provider),
                                             link.tokens.refresh_token, self._post())
        except oauth.TokenRefused as e:
            if not e.revoked:
                return self._unrefreshed(link, rejected, f"{provider} refused the refresh ({e.code})")
            if not links.broken(link, f"the provider refused the refresh: {e.code}"):
                return _failed(provider, "the link changed while its token was refreshed; try again")
            return _failed(provider, f"{provider} refused to refresh the token ({e.code}); link the account again")
        except (oauth.TokenUnavailable, outbound.OutboundError, ProviderError) as e:
            return self._unrefreshed(link, rejected, f"the token could not be refreshed: {e}")
        except BaseException:
            links.release(owner, provider)
            raise
        if links.refreshed(link, tokens) and rejected:
            now = time.monotonic()
            if len(self._after_401) > 4096:
                self._after_401 = {k: v for k, v in self._after_401.items() if now - v[1] <= RETRY_AFTER_401}
            self._after_401[owner, env_name(provider)] = (tokens.access_token, now)
        return None  # (a link removed or linked again meanwhile: the request is decided on what is stored now)

    def _unrefreshed(self, link: Link, rejected: str | None, why: str) -> Refusal | None:
        """A refresh that failed for now: the link stays as it is; its token goes while it is valid."""
        self.store().links.release(link.info.owner, link.info.provider)
        if not rejected and not link.tokens.expired(time.time()):
            return None  # sent as it is; the next request tries again
        return _failed(link.info.provider, why)

    def _post(self) -> oauth.Post:
        if self.post is None:
            raise ProviderError("sealgate is not configured to reach token endpoints")
        return self.post


def _failed(provider: str, why: str) -> Refusal:
    return Refusal("link_refresh_failed", f"linked account {provider}: {why}")
