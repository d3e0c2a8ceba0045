"""`sealgate run`: a lean mitmproxy master carrying only what the request path needs.

mitmdump's ~36 default addons cost most of its per-request CPU in hook dispatch
(MITMPROXY-NOTES.md, "A lean master"); sealgate loads the proxy server, layer
selection, TLS, error checking and its own addon, nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from mitmproxy import master, options
from mitmproxy.addons import errorcheck, next_layer, proxyserver, tlsconfig

from pathlib import Path

from addons import ca
from addons.addon import Sealgate
from addons.probes import ProbeServer
from addons.settings import Settings
from addons.store import StoreError


def build_master(settings: Settings, *, with_termlog: bool = True) -> master.Master:
    certs = settings.certs_dir
    ca.ensure_ca(certs)
    bundle = ca.upstream_bundle(certs, settings.upstream_ca)
    opts = options.Options(listen_host=settings.listen_host, listen_port=settings.listen_port)
    m = master.Master(opts, with_termlog=with_termlog)
    # sealgate first: its server_connect check runs before anything else sees the connection,
    # and its tls_start_server names the destination before TlsConfig builds the context
    m.addons.add(Sealgate(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(),
                 errorcheck.ErrorCheck())
    opts.update(
        confdir=str(certs),
        rawtcp=False,  # after a non-WebSocket 101 nothing could be checked: close instead
        ssl_verify_upstream_trusted_ca=str(bundle) if bundle else None,
        sealgate_data_dir=str(settings.data_dir),
        sealgate_allow_private=settings.allow_private,
        sealgate_guard_ports=",".join(str(p) for p in (settings.web_port, settings.metrics and settings.metrics[1]) if p),
    )
    if settings.metrics is not None:
        sealgate = m.addons.get("sealgate")
        m.addons.add(_Probes(ProbeServer(*settings.metrics, sealgate.metrics, _readiness(sealgate, certs))))
    return m


def _readiness(sealgate: Sealgate, certs: Path):
    def why_not() -> str | None:
        try:
            store = sealgate._store()
            store.key  # noqa: B018 - the key must be loadable
            store.secrets_signature("")  # and the store readable
        except StoreError as e:
            return str(e)
        if not (certs / ca.CA_CERT).exists():
            return f"the CA certificate {certs / ca.CA_CERT} is missing"
        return None
    return why_not


class _Probes:
    """Runs the probe server alongside the proxy."""

    def __init__(self, server: ProbeServer) -> None:
        self.server = server

    async def running(self) -> None:
        await self.server.start()

    async def done(self) -> None:
        await self.server.stop()


async def serve(settings: Settings) -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # one log line at a time
    logging.getLogger().setLevel(logging.INFO)  # one line per sealgate decision
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)  # not every connection
    m = build_master(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, m.shutdown)
    lines = [f"sealgate: proxy on {settings.listen_host}:{settings.listen_port}; "
             f"workers trust {settings.certs_dir / ca.CA_CERT}"]
    if settings.metrics is not None:
        lines.append(f"sealgate: probes and metrics on http://{settings.metrics[0]}:{settings.metrics[1]}"
                     "/healthz, /readyz, /metrics")
    if settings.web_port is not None:
        lines.append("sealgate: the dashboard is not part of this build yet; running the proxy only")
    m.addons.add(_Announce("\n".join(lines)))
    await m.run()


class _Announce:
    """Says where the proxy listens, once it really does."""

    def __init__(self, text: str) -> None:
        self.text = text

    def running(self) -> None:
        print(self.text, file=sys.stderr)
