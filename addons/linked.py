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

from . import oauth
from .errors import Refusal, StoreError
from .links import BROKEN, Link
from .origins import Origin
from .policy import Scope
from .providers import Provider, ProviderError, Registry, env_name
from .store import SecretStore

LEASE = 15.0  # seconds one node may take to refresh a token before another may try
WAIT_STEP = 0.1  # seconds between looks at a token another node is refreshing


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
            tokens = await asyncio.to_thread(oauth.refresh_grant, self.registry.get(provider),
                                             link.tokens.refresh_token, self._post())
        except oauth.TokenRefused as e:
            if not links.broken(link, f"the provider refused the refresh: {e.code}"):
                return _failed(provider, "the link changed while its token was refreshed; try again")
            return _failed(provider, f"{provider} refused to refresh the token ({e.code}); link the account again")
        except (oauth.TokenUnavailable, ProviderError) as e:
            links.release(owner, provider)
            if not rejected and not link.tokens.expired(time.time()):
                return None  # still valid for now: sent as it is; the next request tries again
            return _failed(provider, f"the token could not be refreshed: {e}")
        links.put(owner, provider, tokens)
        return None

    def _post(self) -> oauth.Post:
        if self.post is None:
            raise ProviderError("sealgate is not configured to reach token endpoints")
        return self.post


def _failed(provider: str, why: str) -> Refusal:
    return Refusal("link_refresh_failed", f"linked account {provider}: {why}")
