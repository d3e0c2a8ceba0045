"""The dashboard as a mirror: the process that holds secrets sends redacted copies of
finished flows to a separate mitmweb process, which never holds a value, the master key
or a session credential (MITMPROXY-NOTES.md: in one mitmweb process, values are readable
through its API while a flow is in flight, and an intercepted flow can be sent elsewhere).

`Mirror` runs in the proxy; `dashboard_web.py` is the mitmweb script on the other end.
Frames on the Unix socket between them: 4-byte big-endian length, then a copy: 4-byte length
of a JSON head (what the dashboard shows of the flow, text as Latin-1), then the bodies it
points at. Not mitmproxy's own flow format: its generic (de)serialisation cost some 2 ms
of CPU per flow on each side, more than proxying the request did.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import Callable

from mitmproxy import connection, flow, http, websocket

from . import bodies
from .scrub import Scrubber

log = logging.getLogger("sealgate")

QUEUE_BYTES = 64 * 1024 * 1024  # copies waiting for the dashboard; more are dropped, the proxy never waits
BODY_MAX = 1024 * 1024  # a larger body is not mirrored: the dashboard shows that it was left out
SEND_EVERY = 0.1  # copies go in batches: the dashboard wakes ten times a second, not once per flow
FIELDS_MAX = 64 * 1024  # a message's header fields past this many bytes are not mirrored (an upstream's head
# has no bound in mitmproxy; its copy, escaped as JSON, would be several times larger)
MESSAGE_MAX = 64 * 1024  # a larger WebSocket message is not mirrored (a flow keeps up to 100)


def frame(f: http.HTTPFlow, scrub: Scrubber) -> bytes:
    """A copy of a finished flow fit for operators: placeholder form, scrubbed, no credentials.

    By the time a flow finishes, sealgate has put its request back in placeholder form and
    scrubbed its response; this scrubs every field once more with the scrubber of the flow's
    session (WebSocket messages from the worker, for one, carry filled values), and decodes
    bodies here, within BODY_MAX, so the dashboard process never decodes anything."""
    blobs: list[bytes] = []

    def blob(data: bytes) -> int:
        blobs.append(data)
        return len(blobs) - 1

    def text(data: bytes | str) -> str:
        return scrub.scrub(data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape")).decode("latin-1")

    def fields(headers: http.Headers | None) -> list[list[str]] | None:
        if headers is None:
            return None
        if (size := sum(len(k) + len(v) for k, v in headers.fields)) > FIELDS_MAX:
            return [["x-sealgate-dashboard", f"{len(headers.fields)} fields of {size} bytes, not mirrored"]]
        return [[text(k), text(v)] for k, v in headers.fields]

    def message(content: bytes) -> int:
        return blob(scrub.scrub(content) if len(content) <= MESSAGE_MAX
                    else f"[a message of {len(content)} bytes, not mirrored]".encode())

    def body(message: http.Message) -> int | None:
        if not message.raw_content:
            return None
        encoding = message.headers.get("content-encoding", "")
        try:  # decoded here, within the bound, so the dashboard never decodes anything (a bomb included)
            data = bodies.decode(message.raw_content, encoding, BODY_MAX)
            if len(data) > BODY_MAX:
                raise bodies.BodyError("too large")
        except bodies.BodyError:
            data = f"[a body of {len(message.raw_content)} bytes ({encoding or 'identity'}), not mirrored]".encode()
        return blob(scrub.scrub(data))

    def message_head(message: http.Message) -> dict:
        headers = http.Headers(message.headers.fields)
        headers.pop("content-encoding", None)  # the body is shown decoded
        return {"http_version": message.data.http_version.decode("latin-1"), "headers": fields(headers),
                "trailers": fields(message.trailers), "body": body(message),
                "timestamp_start": message.timestamp_start, "timestamp_end": message.timestamp_end}

    who = f.metadata.get("sealgate", {})
    comment = f"principal {who.get('principal', '?')}, runchat {who.get('runchat', '?')}" if who else ""
    refusal = f.metadata.get("sealgate.refusal")
    req = f.request
    head: dict = {
        "id": f.id, "created": f.timestamp_created, "marked": ":no_entry:" if refusal else "",
        "comment": f"{refusal} ({comment})" if refusal and comment else refusal or comment,
        "client": [f.client_conn.id, f.client_conn.peername, f.client_conn.sockname, f.client_conn.timestamp_start],
        "server": [f.server_conn.id, f.server_conn.address, f.server_conn.peername, f.server_conn.tls_established],
        "request": {**message_head(req), "method": text(req.data.method), "scheme": req.data.scheme.decode("latin-1"),
                    "authority": text(req.data.authority), "host": text(req.host), "port": req.port,
                    "path": text(req.data.path)},
        "error": text(f.error.msg) if f.error else None,
    }
    if (resp := f.response) is not None:
        head["response"] = {**message_head(resp), "status_code": resp.status_code, "reason": text(resp.data.reason)}
    if (ws := f.websocket) is not None:
        head["websocket"] = {
            "messages": [[m.from_client, int(m.type), message(m.content), m.timestamp] for m in ws.messages],
            "closed_by_client": ws.closed_by_client, "close_code": ws.close_code,
            "close_reason": text(ws.close_reason) if ws.close_reason else None, "timestamp_end": ws.timestamp_end}
    encoded = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()  # Latin-1 text: 2 bytes
    copy = b"".join([struct.pack(">I", len(encoded)), encoded, *(struct.pack(">I", len(b)) + b for b in blobs)])
    return struct.pack(">I", len(copy)) + copy


def unframe(copy: bytes) -> http.HTTPFlow:
    """The flow a copy describes (in the dashboard process), not live: nothing can send it anywhere.
    ValueError (or KeyError, TypeError, IndexError) for a copy that is not one: every field is checked for its
    type here, since mitmproxy's constructors do not check (`internals.unchecked_messages`) and the view would
    fail on a flow with a wrong one at every later flow."""
    (n,) = struct.unpack_from(">I", copy)
    head = json.loads(copy[4:4 + n])
    blobs, at = [], 4 + n
    while at < len(copy):
        (size,) = struct.unpack_from(">I", copy, at)
        blobs.append(copy[at + 4:at + 4 + size])
        at += 4 + size

    def raw(text: object) -> bytes:
        return _typed(text, str).encode("latin-1")

    def headers(fields: object) -> http.Headers | None:
        return None if fields is None else http.Headers([(raw(k), raw(v)) for k, v in _typed(fields, list)])

    def content(index: object) -> bytes | None:
        return None if index is None else blobs[_typed(index, int)]

    client_id, peer, sock, started = _typed(head["client"], list)
    server_id, address, server_peer, tls = _typed(head["server"], list)
    f = http.HTTPFlow(connection.Client(id=_typed(client_id, str), peername=_address(peer), sockname=_address(sock),
                                        timestamp_start=_time(started)),
                      connection.Server(id=_typed(server_id, str), address=_address(address),
                                        peername=_address(server_peer)))
    f.server_conn.timestamp_tls_setup = f.server_conn.timestamp_start if _typed(tls, bool) else None
    f.id, f.timestamp_created, f.live = _typed(head["id"], str), _time(head["created"]), False
    f.marked, f.comment = _typed(head["marked"], str), _typed(head["comment"], str)
    r = _typed(head["request"], dict)
    f.request = http.Request(_typed(r["host"], str), _typed(r["port"], int), raw(r["method"]), raw(r["scheme"]),
                             raw(r["authority"]), raw(r["path"]), raw(r["http_version"]), headers(r["headers"]),
                             content(r["body"]), headers(r["trailers"]), _time(r["timestamp_start"]),
                             _time(r["timestamp_end"], None))
    if (r := head.get("response")) is not None:
        f.response = http.Response(raw(r["http_version"]), _typed(r["status_code"], int), raw(r["reason"]),
                                   headers(r["headers"]), content(r["body"]), headers(r["trailers"]),
                                   _time(r["timestamp_start"]), _time(r["timestamp_end"], None))
    if (w := head.get("websocket")) is not None:
        f.websocket = websocket.WebSocketData(
            messages=[websocket.WebSocketMessage(_typed(kind, int), _typed(from_client, bool), blobs[_typed(i, int)],
                                                 _time(at))
                      for from_client, kind, i, at in _typed(w["messages"], list)],
            closed_by_client=_typed(w["closed_by_client"], bool, None), close_code=_typed(w["close_code"], int, None),
            close_reason=_typed(w["close_reason"], str, None), timestamp_end=_time(w["timestamp_end"], None))
    if head["error"] is not None:
        f.error = flow.Error(_typed(head["error"], str))
    return f


def _typed(value: object, kind: type, *optional: None):
    """value if it is a kind (or None, when allowed); else TypeError."""
    if (optional and value is None) or (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
        return value
    raise TypeError(f"{type(value).__name__} where {kind.__name__} was expected")


def _time(value: object, *optional: None) -> float | None:
    if optional and value is None:
        return None
    return float(value) if isinstance(value, float) else float(_typed(value, int))


def _address(a: object) -> tuple[str, int] | None:
    """(host, port) of a connection's address (an IPv6 one has two more fields, not shown)."""
    if not a:
        return None
    host, port = _typed(a, list)[:2]
    return _typed(host, str), _typed(port, int)


class Mirror:
    """Sends a redacted copy of every finished flow to the dashboard's socket, in batches."""

    def __init__(self, socket_path: str, scrubber: Callable[[http.HTTPFlow], Scrubber]) -> None:
        self.socket_path = socket_path
        self.scrubber = scrubber
        self.waiting: list[bytes] = []  # copies not yet written to the socket
        self.queued_bytes = 0  # theirs, and those of the batch being written
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
        data = frame(flow, self.scrubber(flow))
        self.queued_bytes += len(data)
        self.waiting.append(data)

    async def _send_forever(self) -> None:
        while True:
            try:
                _, writer = await asyncio.open_unix_connection(self.socket_path)
            except OSError:
                await asyncio.sleep(0.5)  # the dashboard is starting, or gone: try again
                continue
            try:
                while True:
                    await asyncio.sleep(SEND_EVERY)
                    batch, self.waiting = self.waiting, []
                    try:
                        writer.write(b"".join(batch))
                        await writer.drain()
                    finally:
                        self.queued_bytes -= sum(map(len, batch))
            except OSError:
                log.warning("sealgate: the dashboard went away; reconnecting")
            finally:
                writer.close()
