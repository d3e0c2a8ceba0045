"""The dashboard as a mirror: the process that holds secrets sends redacted copies of
finished flows to a separate mitmweb process, which never holds a value, the master key
or a session credential (MITMPROXY-NOTES.md: in one mitmweb process, values are readable
through its API while a flow is in flight, and an intercepted flow can be sent elsewhere).

`Mirror` runs in the proxy; `dashboard_web.py` is the mitmweb script on the other end.
Frames on the Unix socket between them: 4-byte big-endian length, then one flow as
mitmproxy's tnetstring state.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable

from mitmproxy import http
from mitmproxy.io import tnetstring

from . import bodies
from .scrub import Scrubber

log = logging.getLogger("sealgate")

QUEUE_BYTES = 64 * 1024 * 1024  # copies waiting for the dashboard; more are dropped, the proxy never waits
BODY_MAX = 1024 * 1024  # a larger body is not mirrored: the dashboard shows that it was left out


def redacted(flow: http.HTTPFlow, scrub: Scrubber) -> http.HTTPFlow:
    """A copy of a finished flow fit for operators: placeholder form, scrubbed, no credentials.

    By the time a flow finishes, sealgate has put its request back in placeholder form and
    scrubbed its response; this scrubs every field once more with the scrubber of the flow's
    session (WebSocket messages from the worker, for one, carry filled values), and decodes
    bodies here, within BODY_MAX, so the dashboard process never decodes anything."""
    f = http.HTTPFlow.from_state(flow.get_state())  # shares the bodies until they are replaced
    f.metadata = {k: v for k, v in f.metadata.items() if k in ("sealgate", "sealgate.refusal")}
    who = f.metadata.get("sealgate", {})
    f.comment = f"principal {who.get('principal', '?')}, runchat {who.get('runchat', '?')}" if who else ""
    if refusal := f.metadata.get("sealgate.refusal"):
        f.comment = f"{refusal} ({f.comment})" if f.comment else refusal
        f.marked = ":no_entry:"
    for message in (f.request, f.response):
        if message is None:
            continue
        message.headers.fields = tuple((scrub.scrub(k), scrub.scrub(v)) for k, v in message.headers.fields)
        if message.trailers:
            message.trailers.fields = tuple((scrub.scrub(k), scrub.scrub(v)) for k, v in message.trailers.fields)
        if message.raw_content:
            # decoded here, within the bound, so the dashboard never decodes anything (a bomb included)
            encoding = message.headers.pop("content-encoding", "")
            try:
                body = bodies.decode(message.raw_content, encoding, BODY_MAX)
                if len(body) > BODY_MAX:
                    raise bodies.BodyError("too large")
            except bodies.BodyError:
                body = f"[a body of {len(message.raw_content)} bytes ({encoding or 'identity'}), not mirrored]".encode()
            message.raw_content = scrub.scrub(body)
    f.request.data.path = scrub.scrub(f.request.data.path)
    if f.response is not None:
        f.response.reason = scrub.scrub_text(f.response.reason)
    if f.websocket is not None:
        for m in f.websocket.messages:
            m.content = scrub.scrub(m.content)
        f.websocket.close_reason = scrub.scrub_text(f.websocket.close_reason or "") or None
    if f.error is not None:
        f.error.msg = scrub.scrub_text(f.error.msg)
    return f


def frame(flow: http.HTTPFlow) -> bytes:
    blob = tnetstring.dumps(flow.get_state())
    return struct.pack(">I", len(blob)) + blob


class Mirror:
    """Sends a redacted copy of every finished flow to the dashboard's socket."""

    def __init__(self, socket_path: str, scrubber: Callable[[http.HTTPFlow], Scrubber]) -> None:
        self.socket_path = socket_path
        self.scrubber = scrubber
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.queued_bytes = 0
        self.task: asyncio.Task | None = None
        self.dropped = 0

    def running(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._send_forever())

    async def done(self) -> None:
        if self.task:
            self.task.cancel()

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self._mirror(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._mirror(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._mirror(flow)

    def _mirror(self, flow: http.HTTPFlow) -> None:
        if self.queued_bytes > QUEUE_BYTES:  # the dashboard is behind or gone: drop, before any work
            self.dropped += 1
            return
        data = frame(redacted(flow, self.scrubber(flow)))
        self.queued_bytes += len(data)
        self.queue.put_nowait(data)

    async def _send_forever(self) -> None:
        while True:
            try:
                _, writer = await asyncio.open_unix_connection(self.socket_path)
            except OSError:
                await asyncio.sleep(0.5)  # the dashboard is starting, or gone: try again
                continue
            try:
                while True:
                    data = await self.queue.get()
                    self.queued_bytes -= len(data)
                    writer.write(data)
                    await writer.drain()
            except OSError:
                log.warning("sealgate: the dashboard went away; reconnecting")
            finally:
                writer.close()
