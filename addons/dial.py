"""Where the proxy connects: resolve once (with a timeout), check the address against the
egress policy, and dial exactly the address that was checked (no second lookup a DNS
rebinding could answer differently).

A CONNECT target is checked when mitmproxy opens the server connection. A plain-http
request is checked in the request hook (so a refused one gets a clean answer before any
placeholder is looked at) and the address found then is the one dialled.
"""

from __future__ import annotations

import asyncio
import socket
import weakref
from dataclasses import dataclass

from mitmproxy import connection
from mitmproxy.proxy import server_hooks

from . import internals, origins
from .egress import EgressPolicy
from .errors import Refusal

RESOLVE_TIMEOUT = 10.0  # seconds


@dataclass(frozen=True)
class Checked:
    """An address the policy allows for a destination."""

    host: str
    port: int
    ip: str


class Dialer:
    def __init__(self, policy: EgressPolicy | None = None) -> None:
        self.policy = policy or EgressPolicy()
        # a plain-http request's checked address, until its server connection is opened
        self._ahead: weakref.WeakKeyDictionary[connection.Client, Checked] = weakref.WeakKeyDictionary()
        self._refused: weakref.WeakKeyDictionary[connection.Server, Refusal] = weakref.WeakKeyDictionary()
        self._names: weakref.WeakKeyDictionary[connection.Server, tuple[str, int]] = weakref.WeakKeyDictionary()

    async def check(self, host: str, port: int) -> Checked | Refusal:
        """The first address of host that the policy allows, or why there is none."""
        shown = f"{origins.bracketed(host)}:{port}"
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
        except TimeoutError:
            return Refusal("destination_unresolved", f"{shown} could not be resolved in {RESOLVE_TIMEOUT:g} s")
        except (OSError, UnicodeError) as e:
            return Refusal("destination_unresolved", f"{shown} could not be resolved ({e.__class__.__name__})")
        reasons = []
        for *_, sockaddr in infos:
            why = self.policy.refusal_reason(sockaddr[0], port)
            if why is None:
                return Checked(host, port, sockaddr[0])
            reasons.append(why)
        return Refusal("destination_blocked", f"{shown} is not reachable through sealgate: {reasons[0]}")

    async def check_ahead(self, client: connection.Client, host: str, port: int) -> Refusal | None:
        """Check a plain-http destination before its connection exists; remember the address."""
        found = await self.check(host, port)
        if isinstance(found, Refusal):
            return found
        self._ahead[client] = found
        return None

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Point the connection at the checked address, or refuse it (server.error)."""
        server = data.server
        if server.error or not server.address or server.via:
            return
        host, port = server.address
        ahead = self._ahead.pop(data.client, None)
        if ahead is not None and (ahead.host, ahead.port) == (host, port):
            found: Checked | Refusal = ahead
        else:
            try:
                found = await self.check(host, port)
            except Exception as e:
                found = Refusal("internal_error", f"egress check failed ({e.__class__.__name__})")
        if isinstance(found, Refusal):
            self._refused[server] = found
            server.error = str(found)
            return
        self._names[server] = (host, port)
        server.address = (found.ip, port)

    def dialled(self, server: connection.Server) -> None:
        """The dial is done (or failed): give the connection its name back for mitmproxy's bookkeeping."""
        if (name := self._names.pop(server, None)) is not None:
            internals.set_dialled_address(server, name)

    def refusal(self, server: connection.Server) -> Refusal | None:
        """Why a connection was refused, if it was."""
        return self._refused.get(server)
