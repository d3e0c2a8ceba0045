"""The mitmweb end of the dashboard mirror: `python -m addons.dashboard_web CONFDIR`.

It receives redacted flows on a Unix socket and shows them. It runs no proxy server and
kills every live flow (a replay sends nothing). mitmweb's API can run any command and set
any option, so the addons whose commands or options load code, read or write files, or
connect anywhere (scripts, saving, exporting, replay, proxy auth over LDAP, ...) are taken
out with their commands, and once running only the options of viewing may change: the
guard is first in the chain, so a refused change reaches no other addon. It never holds a
secret value, the master key or a session credential.
"""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import struct
import sys
from pathlib import Path

import yaml
from mitmproxy import ctx, exceptions, http, options
from mitmproxy.io import FlowReader

log = logging.getLogger("sealgate.dashboard")

# addons of mitmweb whose commands or options load code, touch files or connect anywhere
REMOVED = ("Browser", "ClientPlayback", "CommandHistory", "Cut", "Export", "ProxyAuth", "ScriptLoader",
           "ServerPlayback", "MapRemote", "MapLocal", "Save", "SaveHar", "UpstreamAuth", "ReadFileStdin",
           "StaticViewer")
REMOVED_COMMANDS = ("options.load", "options.save", "view.flows.load")
# the only options the dashboard's API may change once it runs
VIEWING = ("view_filter", "view_order", "view_order_reversed", "intercept", "intercept_active", "web_columns",
           "showhost", "content_view_lines_cutoff")


class MirrorReceiver:
    def __init__(self) -> None:
        self.started = False
        self.server: asyncio.AbstractServer | None = None

    def load(self, loader) -> None:
        loader.add_option("sealgate_mirror_socket", str, "", "Unix socket the sealgate proxy mirrors flows to.")

    def configure(self, updated: set[str]) -> None:
        if self.started and (refused := sorted(updated - set(VIEWING))):
            raise exceptions.OptionsError(f"the sealgate dashboard is read-only: {refused[0]} cannot change")

    async def running(self) -> None:
        if ctx.options.server:
            raise exceptions.OptionsError("the sealgate dashboard runs without a proxy server (server=false)")
        self.server = await asyncio.start_unix_server(self._receive, ctx.options.sealgate_mirror_socket)
        self.started = True

    async def done(self) -> None:
        if self.server:
            self.server.close()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.live:  # a replay: this process sends nothing anywhere
            flow.kill()

    def request(self, flow: http.HTTPFlow) -> None:
        self.requestheaders(flow)

    async def _receive(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                blob = await reader.readexactly(length)
                for flow in FlowReader(io.BytesIO(blob)).stream():
                    flow.live = False
                    await ctx.master.load_flow(flow)
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()


async def serve(confdir: Path) -> None:
    from mitmproxy.tools.web.master import WebMaster

    m = WebMaster(options.Options(), with_termlog=True)
    removed = [a for a in m.addons.chain if type(a).__name__ in REMOVED]
    m.addons.chain = [a for a in m.addons.chain if a not in removed]  # before they ever ran: nothing to end
    for name in [n for n, a in m.addons.lookup.items() if a in removed]:
        del m.addons.lookup[name]
    for name, command in list(m.commands.commands.items()):
        if name in REMOVED_COMMANDS or getattr(command.func, "__self__", None) in removed:
            del m.commands.commands[name]
    guard = MirrorReceiver()
    m.addons.add(guard)
    m.addons.chain.insert(0, m.addons.chain.pop())  # first: a refused option reaches no other addon
    config = yaml.safe_load((confdir / "config.yaml").read_text())
    m.options.update(confdir=str(confdir), **config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, m.shutdown)
    await m.run()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1])))
