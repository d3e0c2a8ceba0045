"""The mitmweb end of the dashboard mirror: `python -m sealgate.dashboard_web CONFDIR`.

It receives redacted flows on a Unix socket and shows them. It runs no proxy server and
kills every live flow (a replay sends nothing). mitmweb's API can run any command and set
any option, so it keeps only an allowlist of mitmweb's addons (viewing, the web UI and its
password); every other (scripts, saving, exporting, replay, proxy auth over LDAP, and any a
new mitmweb brings) is taken out with its commands, and once running only the options of viewing may change: the
guard is first in the chain, so a refused change reaches no other addon. It never holds a
secret value, the master key or a session credential, and it keeps at most
`sealgate_dashboard_max_flows` flows (the oldest go), so it does not grow over months.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import struct
import sys
from pathlib import Path

import yaml
from mitmproxy import ctx, exceptions, http, options
from mitmproxy.addons.view import View
from mitmproxy.flow import Flow

from . import internals
from .dashboard import unframe

log = logging.getLogger("sealgate.dashboard")

# the mitmweb addons the dashboard runs; any other (a new mitmweb's among them) is removed
# with its commands before it ever runs: whatever loads code, touches files or connects
KEPT = ("TermLog", "Core", "Comment", "Proxyserver", "NextLayer", "WebAddon", "WebAuth", "Intercept", "View",
        "EventStore", "ErrorCheck")  # (NextLayer: inert without a server, but Proxyserver warns at start without it)
# the commands the dashboard's API may run: viewing and marking flows; every other (options.reset,
# options.load/save, inject.*, view.flows.load, ...) is removed, so nothing is applied before a check
KEPT_COMMAND_PREFIXES = ("view.", "flow.", "eventstore.")  # and `set`, whose options the guard checks
REFUSED_COMMANDS = ("view.flows.load",)
# the only options the dashboard's API may change once it runs
VIEWING = ("view_filter", "view_order", "view_order_reversed", "intercept", "intercept_active", "web_columns",
           "showhost", "content_view_lines_cutoff")


class MirrorReceiver:
    def __init__(self) -> None:
        self.started = False
        self.server: asyncio.AbstractServer | None = None
        self.arrived: collections.deque[str] = collections.deque()  # ids of received flows, oldest first

    def load(self, loader) -> None:
        loader.add_option("sealgate_mirror_socket", str, "", "Unix socket the sealgate proxy mirrors flows to.")
        loader.add_option("sealgate_dashboard_max_flows", int, 5000, "Finished flows kept; the oldest go.")

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
                copy = await reader.readexactly(length)
                try:
                    self.keep(unframe(copy))
                except (ValueError, KeyError, TypeError, IndexError, struct.error) as e:
                    log.warning("sealgate dashboard: a copy that is not one was dropped (%s)", type(e).__name__)
        except (asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the proxy went away, or this process stops (a cancelled task here is logged as an error by 3.12)
        finally:
            writer.close()

    def keep(self, f: Flow) -> None:
        """Show a received flow (the view alone: the flow is finished, no other addon has anything to do
        with it), then drop the oldest past the bound: the dashboard runs for months."""
        view: View = ctx.master.addons.get("view")
        if view.get_by_id(f.id) is None:
            self.arrived.append(f.id)
            view.add([f])
        self.trim(view)

    def trim(self, view: View) -> None:
        """Remove the oldest received flows until at most the bound remain, one `view.remove` each
        (the web UI gets "flows/remove"; a batch would also log an alert). An id whose flow a user
        already removed is skipped; once such ids are half the deque, it is rebuilt (amortised O(1))."""
        limit = ctx.options.sealgate_dashboard_max_flows
        while view.store_count() > limit and self.arrived:
            if (old := view.get_by_id(self.arrived.popleft())) is not None:
                view.remove([old])
        if len(self.arrived) > 2 * limit:
            self.arrived = collections.deque(i for i in self.arrived if view.get_by_id(i) is not None)


def restrict(m) -> None:
    """Keep only the allowlisted addons and commands, before any ran; the guard goes first."""
    internals.keep_only_addons(m, KEPT)
    for name in list(m.commands.commands):
        if name in REFUSED_COMMANDS or not (name == "set" or name.startswith(KEPT_COMMAND_PREFIXES)):
            del m.commands.commands[name]
    internals.put_addon_first(m, MirrorReceiver())  # a refused option reaches no other addon


async def serve(confdir: Path) -> None:
    from mitmproxy.tools.web.master import WebMaster

    m = WebMaster(options.Options(), with_termlog=True)
    restrict(m)
    internals.quiet_web_broadcasts()
    internals.unchecked_messages()
    config = yaml.safe_load((confdir / "config.yaml").read_text())
    m.options.update(confdir=str(confdir), **config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, m.shutdown)
    await m.run()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1])))
