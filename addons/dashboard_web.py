"""The mitmweb end of the dashboard mirror: `python -m addons.dashboard_web CONFDIR`.

It receives redacted flows on a Unix socket and shows them. It runs no proxy server,
kills every live flow (so a replay from the UI sends nothing), has no script loader (so
its API cannot load code: mitmweb's `scripts` option and `script.run` command are gone),
and refuses, once running, the options through which its API could open a proxy or read
files. It never holds a secret value, the master key or a session credential.
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

# options whose change after start would let the dashboard's API run code, read files or proxy
LOCKED = ("scripts", "server", "mode", "listen_host", "listen_port", "client_replay", "server_replay", "rfile",
          "save_stream_file", "hardump", "confdir", "map_local", "map_remote", "web_static_viewer")


class MirrorReceiver:
    def __init__(self) -> None:
        self.started = False
        self.server: asyncio.AbstractServer | None = None

    def load(self, loader) -> None:
        loader.add_option("sealgate_mirror_socket", str, "", "Unix socket the sealgate proxy mirrors flows to.")

    def configure(self, updated: set[str]) -> None:
        if self.started and updated & set(LOCKED):
            raise exceptions.OptionsError(f"the sealgate dashboard is read-only: {sorted(updated & set(LOCKED))[0]}")

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
    loader = m.addons.get("scriptloader")
    m.addons.remove(loader)
    for name, command in list(m.commands.commands.items()):
        if getattr(command.func, "__self__", None) is loader:
            del m.commands.commands[name]
    m.addons.add(MirrorReceiver())
    config = yaml.safe_load((confdir / "config.yaml").read_text())
    m.options.update(confdir=str(confdir), **config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, m.shutdown)
    await m.run()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1])))
