"""Every place sealgate reaches into mitmproxy's private parts, and a start-up self-test.

Checked against mitmproxy 12.0 to 12.3 (pyproject pins 12.x). Each touch exists because no
public hook does the job; each is named below with why. `problems()` checks that every
one of them is still there, and `sealgate run` refuses to start when one is not: a missing
internal must never turn into a silent pass-through.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import mmap
import os
import re
import socket
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

CHECKED_VERSIONS = "12.0-12.3"


class InternalsMissing(RuntimeError):
    """A private part of mitmproxy sealgate relies on is not there (another mitmproxy version)."""


def problems() -> list[str]:
    """What is missing from the installed mitmproxy, as sentences (empty: all present)."""
    from mitmproxy import connection, version
    from mitmproxy.addons import proxyserver
    from mitmproxy.proxy import context, server, tunnel
    from mitmproxy.proxy.layers import http as http_layer
    from mitmproxy.proxy.layers import tls
    from mitmproxy.proxy.layers import websocket as ws_layer

    found: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            found.append(what)

    stream = getattr(http_layer, "HttpStream", None)
    for name in ("state_stream_request_body", "state_stream_response_body"):
        method = getattr(stream, name, None)
        need(method is not None and "event" in inspect.signature(method).parameters,
             f"mitmproxy.proxy.layers.http.HttpStream.{name}(event) (end of a streamed message)")
    need("address" in getattr(connection.Server, "__dataclass_fields__", {}),
         "mitmproxy.connection.Server.address (the dialled address)")
    need(callable(getattr(getattr(ws_layer, "WebsocketConnection", None), "send2", None)),
         "mitmproxy.proxy.layers.websocket.WebsocketConnection.send2 (WebSocket control frames)")
    need("connections" in inspect.getsource(proxyserver.Proxyserver.__init__),
         "mitmproxy.addons.proxyserver.Proxyserver.connections (cutting an upstream connection)")
    handler = getattr(server, "ConnectionHandler", None)
    need(handler is not None and callable(getattr(handler, "close_connection", None))
         and "self.transports" in inspect.getsource(handler.__init__),
         "mitmproxy.proxy.server.ConnectionHandler.transports and close_connection")
    from mitmproxy.proxy.layers.http import _http1, _http2

    need(callable(getattr(_http1, "make_error_response", None)) and callable(getattr(_http2, "format_error", None)),
         "mitmproxy.proxy.layers.http._http1.make_error_response and _http2.format_error (error pages)")
    need(callable(getattr(getattr(_http1, "Http1Client", None), "read_headers", None)),
         "mitmproxy.proxy.layers.http._http1.Http1Client.read_headers (informational responses)")
    need(callable(getattr(stream, "check_killed", None)) and hasattr(http_layer, "DropStream"),
         "mitmproxy.proxy.layers.http.HttpStream.check_killed and DropStream (killed HTTP/2 streams)")
    need(callable(getattr(stream, "state_wait_for_request_headers", None)),
         "mitmproxy.proxy.layers.http.HttpStream.state_wait_for_request_headers (whether a request has a body)")
    tls_layer, tunnel_layer = getattr(tls, "TLSLayer", None), getattr(tunnel, "TunnelLayer", None)
    interact = getattr(tls_layer, "tls_interact", None)
    own_to_child = vars(tls_layer).get("event_to_child") if tls_layer is not None else None
    to_child = getattr(tunnel_layer, "event_to_child", None)
    need(interact is not None and _ends(interact, _TLS_INTERACT)
         and (own_to_child is None or hasattr(own_to_child, "__wrapped__"))  # (TLSLayer has none of its own)
         and all(callable(getattr(tunnel_layer, n, None)) for n in ("_handle_command", "send_data"))
         and isinstance(getattr(tls_layer, "is_dtls", None), property)
         and to_child is not None and _ends(to_child, _TUNNEL_TO_CHILD),
         "mitmproxy.proxy.layers.tls.TLSLayer.tls_interact and is_dtls, mitmproxy.proxy.tunnel.TunnelLayer."
         "event_to_child (as whole_tls_writes copies it), _handle_command and send_data (TLS writes)")
    need(callable(getattr(_http1, "make_body_reader", None)),
         "mitmproxy.proxy.layers.http._http1.make_body_reader (HTTP/1 bodies)")
    need(callable(getattr(getattr(_http1, "Http1Server", None), "wait", None)),
         "mitmproxy.proxy.layers.http._http1.Http1Server.wait (bytes pipelined behind a request)")
    need(callable(getattr(getattr(_http1, "Http1Server", None), "read_headers", None)),
         "mitmproxy.proxy.layers.http._http1.Http1Server.read_headers (the request head's size)")
    need(callable(getattr(getattr(_http2, "Http2Server", None), "handle_h2_event", None))
         and callable(getattr(getattr(_http2, "Http2Server", None), "protocol_error", None)),
         "mitmproxy.proxy.layers.http._http2.Http2Server.handle_h2_event and protocol_error (HTTP/2 resets)")
    need(callable(getattr(getattr(tls, "ClientTLSLayer", None), "receive_handshake_data", None))
         and "recv_buffer" in inspect.getsource(tls.ClientTLSLayer.__init__),
         "mitmproxy.proxy.layers.tls.ClientTLSLayer.receive_handshake_data and recv_buffer (the ClientHello's size)")
    need(callable(getattr(stream, "handle_protocol_error", None)),
         "mitmproxy.proxy.layers.http.HttpStream.handle_protocol_error (an upstream that timed out)")
    from mitmproxy import http, master
    from mitmproxy import addonmanager
    need(all(callable(getattr(addonmanager, n, None)) for n in ("traverse", "cut_traceback"))
         and "UpdateHook" in inspect.getsource(addonmanager.AddonManager.handle_lifecycle),
         "mitmproxy.addonmanager.AddonManager.handle_lifecycle, cut_traceback and traverse (direct_hooks)")
    from mitmproxy.proxy import mode_servers
    handle_hook = mode_servers.ProxyConnectionHandler.handle_hook
    need(all(n in inspect.getsource(getattr(handle_hook, "__wrapped__", handle_hook))  # (mitmproxy's, once replaced)
             for n in ("timeout_watchdog.disarm()", "hook.args()", "handle_lifecycle(hook)", "wait_for_resume()"))
         and all(n in inspect.getsource(server.TimeoutWatchdog.disarm)
                 for n in ("can_timeout.clear()", "blocker += 1", "blocker -= 1", "register_activity()")),
         "mitmproxy.proxy.mode_servers.ProxyConnectionHandler.handle_hook and TimeoutWatchdog.disarm (lean_hooks)")
    event = getattr(handler, "server_event", None)
    need(event is not None and "async with self._server_event_lock:" in inspect.getsource(
        getattr(event, "__wrapped__", event)) and "await self.server_event(events.HookCompleted(hook))" in
         inspect.getsource(handler.hook_task),
         "mitmproxy.proxy.server.ConnectionHandler.server_event and hook_task (inline_hook_completions)")
    from mitmproxy import connection as conn_module, flow as flow_module
    need(all(inspect.getsource(m).count("uuid.") == 1 and "str(uuid.uuid4())" in inspect.getsource(m)
             for m in (conn_module, flow_module)),
         "mitmproxy.flow and mitmproxy.connection: ids made by str(uuid.uuid4()) and nothing else of uuid (pooled_ids)")
    headers, multidict = http.Headers, http.Headers.__mro__[1]
    need(getattr(headers.get, "__wrapped__", headers.get) is Mapping.get
         and getattr(headers.__contains__, "__wrapped__", headers.__contains__) is Mapping.__contains__
         and headers.__getitem__ is multidict.__getitem__ and _ends(multidict.__getitem__, _MULTIDICT_GETITEM)
         and callable(getattr(http, "_always_bytes", None)) and callable(getattr(http, "_native", None))
         and _ends(headers.get_all, "name = _always_bytes(name) return [_native(x) for x in super().get_all(name)]")
         and _ends(multidict.get_all, "return [value for k, value in self.fields if self._kconv(k) == key]")
         and headers._kconv(b"Ab") == b"ab" and headers._reduce_values(["a", "b"]) == "a, b",
         "mitmproxy.http.Headers.get, __contains__ (Mapping's), __getitem__, get_all, _kconv and _reduce_values "
         "(quick_header_lookups)")
    need(_ends(context.Context.fork, "ret = Context(self.client, self.options) ret.server = self.server ret.layers = self.layers.copy() "
                     "return ret") and _ends(context.Context.__init__, "self.client = client self.options = options "
                     "self.server = connection.Server( address=None, transport_protocol=client.transport_protocol ) "
                     "self.layers = []"),
         "mitmproxy.proxy.context.Context.fork and __init__ (quick_context_forks)")
    need(_ends(connection.Connection.__eq__, "if isinstance(other, Connection): return self.id == other.id return False"),
         "mitmproxy.connection.Connection.__eq__ (quick_connection_equality)")
    need((hasattr(http.MessageData, "__post_init__") or not __debug__)
         and "_legacy_log_events" in inspect.getsource(master.Master.__init__),
         "mitmproxy.http.MessageData.__post_init__ and mitmproxy.master.Master._legacy_log_events (trim_master)")
    if found:
        found.append(f"(sealgate was checked against mitmproxy {CHECKED_VERSIONS}; this is {version.VERSION})")
    return found


_TLS_INTERACT = """while True: try: data = self.tls.bio_read(65535) except SSL.WantReadError: return # Okay, nothing more
    waiting to be sent. else: yield commands.SendData(self.conn, data)"""  # mitmproxy 12's TLSLayer.tls_interact
_MULTIDICT_GETITEM = """values = self.get_all(key) if not values: raise KeyError(key) return self._reduce_values(values)"""
_TUNNEL_TO_CHILD = """if ( self.tunnel_state is TunnelState.ESTABLISHING and not self.command_to_reply_to ):
    self._event_queue.append(event) return for command in self.child_layer.handle_event(event): yield from
    self._handle_command(command)"""  # mitmproxy 12's body of what whole_tls_writes replaces


def _ends(func: Callable, body: str) -> bool:
    """Whether the source of func (mitmproxy's, where sealgate replaced it) ends with body, whitespace aside:
    the body of what sealgate replaces is the one it was written against (no source to read: False)."""
    try:
        source = inspect.getsource(getattr(func, "__wrapped__", func))
    except (OSError, TypeError):
        return False
    return " ".join(source.split()).endswith(" " + " ".join(body.split()))


def require() -> None:
    """Raise InternalsMissing naming what is missing, or return."""
    if missing := problems():
        raise InternalsMissing("this mitmproxy lacks what sealgate needs: " + "; ".join(missing))


def end_of_message(chunk: bytes) -> bool:
    """Whether mitmproxy called a stream callable for the end of the message; call it straight
    from that callable (`streams.StreamFilter`), which mitmproxy called.

    mitmproxy calls it with b"" at the end, and also for an empty HTTP/2 DATA frame in the
    middle; only the `event` its caller handles tells them apart. Flushing early would let a
    value split by an empty frame through, so without that event: refuse."""
    if chunk:
        return False
    event = sys._getframe(2).f_locals.get("event")  # 0: here, 1: the stream callable, 2: mitmproxy
    if event is None:
        raise InternalsMissing("cannot tell the end of a streamed message from an empty frame")
    return type(event).__name__.endswith("EndOfMessage")


def set_dialled_address(server: Any, address: tuple[str, int]) -> None:
    """Give a server connection its name back after the dial to the checked address.

    mitmproxy matches connections to requests by name; its guard forbids changing the
    address of an open connection, which this only undoes, hence object.__setattr__."""
    object.__setattr__(server, "address", address)


def wrap_websocket_send(rewrite: Callable[[Any, Any], Any]) -> None:
    """Route every WebSocket frame mitmproxy sends through rewrite(connection, event).

    mitmproxy relays control frames (ping, pong, close) without a hook; the one place they
    all pass is its WebSocket connection's send method, wrapped here once per process."""
    from mitmproxy.proxy.layers import websocket as ws_layer

    cls = ws_layer.WebsocketConnection
    original = getattr(cls.send2, "__wrapped__", cls.send2)

    @functools.wraps(original)
    def send2(self, event):
        return original(self, rewrite(self.conn, event))

    cls.send2 = send2


def cut_connections(master: Any, client: Any, server: Any) -> None:
    """Close an upstream connection at once, so nothing queued after this is written, and then
    the worker's, so it learns at once that its request went nowhere.

    Used when a refused placeholder is found in a request body that is already streaming:
    the upstream must never see a complete request."""
    proxy = master.addons.get("proxyserver")
    handler = proxy.connections.get(client.id) if proxy else None
    if handler is None or server not in handler.transports:
        raise InternalsMissing("cannot cut the upstream connection")
    handler.transports[server].writer.close()
    handler.close_connection(server)
    if client in handler.transports:
        handler.close_connection(client)


def close_client(master: Any, client: Any) -> None:
    """Close the worker's connection now. A flow killed while its client is still sending the body (no
    `Expect: 100-continue`) would otherwise leave the worker waiting for an answer until its own timeout."""
    proxy = master.addons.get("proxyserver")
    handler = proxy.connections.get(client.id) if proxy else None
    if handler is not None and client in handler.transports:
        handler.transports[client].writer.close()
        handler.close_connection(client)


def keep_only_addons(master: Any, allowed: Iterable[str]) -> list[str]:
    """Remove every addon whose class is not allowed, with its commands, before any ran.

    The names of the removed classes are returned (for the dashboard's start-up line)."""
    allowed = set(allowed)
    removed = [a for a in master.addons.chain if type(a).__name__ not in allowed]
    master.addons.chain = [a for a in master.addons.chain if a not in removed]
    for name in [n for n, a in master.addons.lookup.items() if a in removed]:
        del master.addons.lookup[name]
    for name, command in list(master.commands.commands.items()):
        if getattr(command.func, "__self__", None) in removed:
            del master.commands.commands[name]
    return [type(a).__name__ for a in removed]


def trim_master(master: Any) -> None:
    """Drop two per-request costs of a mitmproxy master that buy `sealgate run` nothing (a tenth of its CPU):
    the type check of every field of every request and response mitmproxy parses (run only when Python
    runs without -O: the parser makes the right types), the deprecated `add_log` event, which wakes the
    event loop and runs every addon for every log line (no addon of the lean master has an `add_log`), and
    the generic machinery around each hook (`direct_hooks`, `lean_hooks`)."""
    unchecked_messages()
    master._legacy_log_events.uninstall()
    direct_hooks(master)
    lean_hooks()
    inline_hook_completions()
    pooled_ids()
    quick_header_lookups()
    quick_connection_equality()
    quick_context_forks()


def direct_hooks(master: Any) -> None:
    """Run each hook on the addons that have it, straight from a table (built again when the chain changes).

    mitmproxy's AddonManager takes every event of a flow through every addon of the chain twice (the hook,
    then `update`), with two generators, a coroutine and a context manager per addon: most of the cost of a
    hook for a handful of addons that have it. Here: the same addons in the same order, each call as under
    mitmproxy's own `safecall` (an addon's error is logged as it logs it, AddonHalt ends the event), and
    `update` only if an addon has one."""
    import types

    from mitmproxy import exceptions
    from mitmproxy import flow as mflow
    from mitmproxy.addonmanager import traverse

    addons = master.addons
    tables: dict[str, list[Callable]] = {}
    built_for: list[tuple[int, int]] = [(0, 0)]

    def hooks(name: str) -> list[Callable]:
        if built_for[0] != (key := (id(addons.chain), len(addons.chain))):
            tables.clear()
            built_for[0] = key
        if (table := tables.get(name)) is None:
            table = tables[name] = [f for a in traverse(addons.chain) if (f := getattr(a, name, None))
                                    and callable(f) and not isinstance(f, types.ModuleType)]
        return table

    async def run(name: str, args: list) -> None:
        for func in hooks(name):
            try:
                result = func(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:  # noqa: BLE001 - as mitmproxy's safecall: logged, and the next addon runs
                _addon_error(e)

    async def handle_lifecycle(event: Any) -> None:
        args = hook_args(event)
        await run(event.name, args)
        if hooks("update") and isinstance(args[0], mflow.Flow):
            await run("update", [[args[0]]])

    addons.handle_lifecycle = handle_lifecycle


def _addon_error(e: Exception) -> None:
    """What mitmproxy's `safecall` logs for an addon's error (its context manager costs a generator per call)."""
    import logging

    from mitmproxy.addonmanager import cut_traceback

    tb = cut_traceback(cut_traceback(e.__traceback__, "invoke_addon_sync"), "invoke_addon")
    logging.getLogger("mitmproxy.addonmanager").error(f"Addon error: {e}", exc_info=(type(e), e, tb))


def hook_args(hook: Any) -> list[Any]:
    """mitmproxy's Hook.args(), with the dataclass's field names looked up once per hook class."""
    if (names := _HOOK_FIELDS.get(type(hook))) is None:
        names = _HOOK_FIELDS[type(hook)] = tuple(f.name for f in dataclasses.fields(hook))
    return [getattr(hook, name) for name in names]


_HOOK_FIELDS: dict[type, tuple[str, ...]] = {}


def lean_hooks() -> None:
    """mitmproxy's ProxyConnectionHandler.handle_hook, four times per request, without its generic parts: the
    watchdog disarmed inline (not by a generator-based context manager), the hook's one argument read by
    name (`hook_args`), the flow waited for only if intercepted."""
    from mitmproxy import flow as mflow
    from mitmproxy.proxy import mode_servers

    async def handle_hook(self: Any, hook: Any) -> None:
        watchdog = self.timeout_watchdog
        watchdog.can_timeout.clear()
        watchdog.blocker += 1
        try:
            (data,) = hook_args(hook)  # (mitmproxy: "we currently only support single-argument hooks")
            await self.master.addons.handle_lifecycle(hook)
            if isinstance(data, mflow.Flow) and data.intercepted:
                await data.wait_for_resume()
        finally:
            watchdog.blocker -= 1
            if watchdog.blocker == 0:
                watchdog.register_activity()
                watchdog.can_timeout.set()

    original = mode_servers.ProxyConnectionHandler.handle_hook
    handle_hook.__wrapped__ = getattr(original, "__wrapped__", original)  # type: ignore[attr-defined]
    mode_servers.ProxyConnectionHandler.handle_hook = handle_hook


class _Held:
    """Stands in for a connection handler's event lock while `inline_hook_completions` holds the real one:
    a `server_event` that finds it was called from inside that handler's own event (see there)."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_HELD = _Held()


def inline_hook_completions(handler: type | None = None) -> None:
    """mitmproxy handles a connection's events one at a time, behind a lock held while the layers run (with no
    await: `server_event`). A hook starts as an eager task inside that; one that finishes without waiting (most
    do) then asks `server_event` for its HookCompleted, finds the lock held, and waits for it: a future, a
    suspended task and one more turn of the event loop each, four times per request. Here such an event, from
    inside the handler's own event, is handled as soon as that event is, under the same hold of the lock;
    every other event waits for the lock as before. (Events queued on the lock before this hold wait as they
    would have, behind the hook's: no order results that timing could not have made.)"""
    from mitmproxy.proxy import server

    handler = handler or server.ConnectionHandler
    original = handler.server_event
    if hasattr(original, "__wrapped__"):
        return  # (installed)

    async def server_event(self: Any, event: Any) -> None:
        lock = self._server_event_lock
        if lock is _HELD:  # from an eager task inside this handler's event (the lock is held only without await)
            self._inline_events.append(event)
            return
        async with lock:
            self._server_event_lock, self._inline_events = _HELD, [event]
            try:
                while self._inline_events:
                    await original(self, self._inline_events.pop(0))  # (it finds _HELD: no wait, no hold)
            finally:
                self._server_event_lock = lock

    server_event.__wrapped__ = original  # type: ignore[attr-defined]
    handler.server_event = server_event


_ID_BATCH = 256  # ids made from one read of the kernel's random source


class _PooledIds:
    """What mitmproxy's flow and connection modules call `uuid` (they ask it for `str(uuid.uuid4())`): random
    version-4 UUIDs as text, as good as uuid.uuid4()'s (os.urandom), made _ID_BATCH at a time. Two per request
    (the flow, and the placeholder server connection of its context) each cost a getrandom call and
    uuid.UUID's checks, some 2-3% of a request."""

    def __init__(self) -> None:
        self._ready: list[str] = []

    def uuid4(self) -> str:
        if not self._ready:
            raw = os.urandom(16 * _ID_BATCH).hex()
            self._ready.extend(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"
                               for h in (raw[i:i + 32] for i in range(0, len(raw), 32)))
        return self._ready.pop()

    def forget(self) -> None:
        self._ready.clear()


def pooled_ids() -> None:
    """mitmproxy's flow and connection ids from `_PooledIds`."""
    from mitmproxy import connection, flow

    if isinstance(flow.uuid, _PooledIds):
        return
    ids = _PooledIds()
    os.register_at_fork(after_in_child=ids.forget)  # (a forked child makes its own)
    flow.uuid = connection.uuid = ids  # type: ignore[assignment]


def quick_header_lookups() -> None:
    """`headers.get(name)` and `name in headers` without an exception for a header that is not there:
    mitmproxy's (Mapping's) raise and catch a KeyError for each, and mitmproxy asks for absent ones (Transfer-
    Encoding, Expect, Upgrade...) a dozen times a request. The same answers: the values of every field whose
    name is the same without case, joined by ", "; a name that is neither str nor bytes raises as it did."""
    from mitmproxy import http

    to_bytes, native = http._always_bytes, http._native

    @functools.wraps(getattr(http.Headers.get, "__wrapped__", http.Headers.get))
    def get(self, key, default=None):
        key = to_bytes(key).lower()
        values = [native(v) for k, v in self.fields if k.lower() == key]
        return ", ".join(values) if values else default

    @functools.wraps(getattr(http.Headers.__contains__, "__wrapped__", http.Headers.__contains__))
    def contains(self, key) -> bool:
        key = to_bytes(key).lower()
        for k, _ in self.fields:
            if k.lower() == key:
                return True
        return False

    http.Headers.get, http.Headers.__contains__ = get, contains


def quick_context_forks() -> None:
    """mitmproxy's `Context.fork` (some six a request: each HTTP stream and connection layer gets one) made a
    `Server` for the new context and threw it away for the one it copies: a dataclass of thirty fields, each
    set through `Server.__setattr__`, a twentieth of the proxy's work per request. The same context, without."""
    from mitmproxy.proxy import context

    Context = context.Context

    @functools.wraps(getattr(Context.fork, "__wrapped__", Context.fork))
    def fork(self):
        ret = Context.__new__(Context)
        ret.client, ret.options, ret.server, ret.layers = self.client, self.options, self.server, self.layers.copy()
        return ret

    Context.fork = fork


def quick_connection_equality() -> None:
    """mitmproxy compares connections by id (`==`), every layer at every event, each time through
    `isinstance(other, Connection)`, which for an abstract class is a Python call of ABCMeta's. The same
    answers, with the object itself and the two kinds of connection first."""
    from mitmproxy import connection

    kinds = (connection.Client, connection.Server)

    @functools.wraps(getattr(connection.Connection.__eq__, "__wrapped__", connection.Connection.__eq__))
    def __eq__(self, other):
        if self is other:
            return True
        if type(other) in kinds or isinstance(other, connection.Connection):
            return self.id == other.id
        return False

    connection.Connection.__eq__ = __eq__


def unchecked_messages() -> None:
    """mitmproxy type-checks every field of every request and response it makes (without -O): not ours."""
    from mitmproxy import http

    http.MessageData.__post_init__ = _unchecked


def _unchecked(self: Any) -> None:
    """mitmproxy's MessageData.__post_init__ without its type checks."""


def quiet_web_broadcasts() -> None:
    """mitmweb turns every flow it shows into JSON for its web UI's websockets, also when none is open:
    skipped then (the dashboard's cost while nobody watches). A UI that connects asks for the flows anew."""
    from mitmproxy.tools.web import app

    cls = app.ClientConnection
    original = getattr(cls.broadcast_flow, "__wrapped__", cls.broadcast_flow.__func__)

    @functools.wraps(original)
    def broadcast_flow(cls, type, f):
        if cls.connections:
            original(cls, type, f)

    cls.broadcast_flow = classmethod(broadcast_flow)


def put_addon_first(master: Any, addon: Any) -> None:
    """Add addon at the head of the chain, so it sees every event (and refuses options) first."""
    master.addons.add(addon)
    master.addons.chain.insert(0, master.addons.chain.pop())


def replace_error_pages(page: Callable[[int], tuple[bytes, dict[str, str]]]) -> None:
    """Answer with page(status) (body, headers) wherever mitmproxy would send its own error page.

    mitmproxy's page quotes the error, which can quote what the upstream sent (a malformed
    status line, Python- and HTML-escaped: a value inside is recoverable). HTTP/2 keeps
    mitmproxy's content type (text/html); the body is page's all the same."""
    from mitmproxy import http
    from mitmproxy.net.http import http1
    from mitmproxy.proxy.layers.http import _http1, _http2

    def make_error_response(status_code: int, message: str = "") -> bytes:
        body, headers = page(status_code)
        return http1.assemble_response(http.Response.make(status_code, body, {**headers, "Connection": "close"}))

    _http1.make_error_response = make_error_response
    _http2.format_error = lambda status_code, message: page(status_code)[0]


def skip_informational_responses() -> None:
    """Drop 1xx responses (other than 101) an HTTP/1 upstream sends before its final one.

    mitmproxy 12 takes a `103 Early Hints` for the final response and the client then waits
    for a body that never comes; dropping them delivers the final response (HTTP allows a
    proxy to drop informational responses)."""
    from mitmproxy.proxy import events
    from mitmproxy.proxy.layers.http import _http1

    cls = _http1.Http1Client
    original = getattr(cls.read_headers, "__wrapped__", cls.read_headers)

    @functools.wraps(original)
    def read_headers(self, event):
        if isinstance(event, events.DataReceived):
            while _starts_with_informational_head(bytes(self.buf)):
                self.buf.maybe_extract_lines()
        return (yield from original(self, event))

    cls.read_headers = read_headers


def _starts_with_informational_head(data: bytes) -> bool:
    return (data.startswith(b"HTTP/1.") and data[9:10] == b"1" and data[9:12] != b"101"
            and b"\r\n\r\n" in data)


def http1_body_readers(most: Callable[[], int]) -> None:
    """Wrap mitmproxy's HTTP/1 body readers: trailers are dropped, chunks that arrived together go on as
    one piece, and a chunk-size line or trailer section is bounded.

    Trailers: mitmproxy 12 raises NotImplementedError on them, which closes the connection; HTTP lets
    a proxy drop trailers, and nothing of them then goes anywhere, unchecked or unscrubbed.
    One piece: h11 reads a chunked body a chunk at a time, and mitmproxy passes each chunk through
    every layer, the stream's scrubber and a write of its own; an event stream's 512-byte events
    arrive a hundred to a read. What the buffer already holds goes on at once (nothing waits for
    more), and HTTP lets an intermediary chunk a body anew. A protocol error after good chunks is
    raised at the next call, after those chunks went on, as it would have been.
    Bounded: mitmproxy calls h11's readers without the bound h11's own Connection sets on what it
    holds unparsed, so a chunk-size line or trailer section that never ends was held whole (a worker
    or an upstream could fill the proxy's memory). What a reader leaves unread is at most `most()`
    bytes (the bound of a request head), else the message is a protocol error and its connection closes."""
    import h11
    from mitmproxy.proxy.layers.http import _http1

    original = getattr(_http1.make_body_reader, "__wrapped__", _http1.make_body_reader)

    class Reader:
        __slots__ = ("reader", "after")

        def __init__(self, reader) -> None:
            self.reader = reader
            self.after: Any = None  # an end or an error met while gathering, for the next call

        def __call__(self, buf):
            if self.after is not None:
                after, self.after = self.after, None
                if isinstance(after, Exception):
                    raise after
                return after
            event = self._read(buf)
            if not isinstance(event, h11.Data):
                return event
            pieces = [event.data]
            while True:
                try:
                    more = self._read(buf)
                except h11.ProtocolError as e:
                    more = e
                if not isinstance(more, h11.Data):
                    break
                pieces.append(more.data)
            self.after = more
            return event if len(pieces) == 1 else h11.Data(data=b"".join(pieces))

        def _read(self, buf):
            event = self.reader(buf)
            if event is None and len(buf) > most():  # (readers of a length or to the close leave nothing)
                raise h11.RemoteProtocolError(f"a chunk-size line or trailer section longer than {most()} bytes")
            if isinstance(event, h11.EndOfMessage) and event.headers:
                return h11.EndOfMessage()
            return event

        def read_eof(self):
            return self.reader.read_eof()

    @functools.wraps(original)
    def make_body_reader(expected_size):
        return Reader(original(expected_size))

    _http1.make_body_reader = make_body_reader


TLS_WRITE_MOST = 1 << 20  # bytes of a TLS layer's output sent in one write
HOLD_MOST = 64 * 1024  # a piece a TLS layer's child sends that is this long or longer is not held to be joined


def whole_tls_writes() -> None:
    """Fewer, larger TLS writes. What a TLS layer's child sends while one event runs (a response's head, its
    body and its end) goes into the connection together: as few records (16 KiB at most each) and writes as
    TLS allows, where mitmproxy made a record and a write per piece, and the peer woke for each. A piece of
    HOLD_MOST or more goes as it is, after what was held (joined, it would be copied whole). What a TLS layer
    has encrypted goes out in one write, where mitmproxy took it 64 KiB at a time (a 256 KiB piece of an
    upload went out in four). Order is kept: any other command the child gives sends what was held first."""
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.layers import tls
    from mitmproxy.proxy.tunnel import TunnelState
    from OpenSSL import SSL

    layer = tls.TLSLayer

    @functools.wraps(getattr(layer.tls_interact, "__wrapped__", layer.tls_interact))
    def tls_interact(self):
        while True:
            try:
                data = self.tls.bio_read(TLS_WRITE_MOST)  # (not zeroed: no dearer than 64 KiB)
            except SSL.WantReadError:
                return
            yield commands.SendData(self.conn, data)

    @functools.wraps(getattr(layer.event_to_child, "__wrapped__", layer.event_to_child))
    def event_to_child(self, event):
        if self.tunnel_state is TunnelState.ESTABLISHING and not self.command_to_reply_to:
            self._event_queue.append(event)
            return
        held: list[bytes] = []
        whole = not self.is_dtls  # (a DTLS record is a datagram: its sizes are the child's)
        try:
            for command in self.child_layer.handle_event(event):
                if (whole and type(command) is commands.SendData and command.connection == self.conn
                        and len(command.data) < HOLD_MOST):
                    held.append(command.data)
                    continue
                if held:
                    yield from self.send_data(_taken(held))
                yield from self._handle_command(command)  # (a long piece of ours: sent as mitmproxy sends it)
        except Exception:  # (mitmproxy logs a layer's crash and goes on: what the child sent is sent, as before)
            if held:
                yield from self.send_data(_taken(held))
            raise
        if held:
            yield from self.send_data(_taken(held))

    layer.tls_interact, layer.event_to_child = tls_interact, event_to_child


def _taken(held: list[bytes]) -> bytes:
    """What was held, in one piece; held is emptied."""
    data = b"".join(held)
    held.clear()
    return data


def forget_killed_streams() -> None:
    """A killed HTTP/2 stream is reset, and mitmproxy kept it (the stream, its flow and the request head)
    until its connection ended: a worker whose streams sealgate refuses at the head (Answer.RESET) could
    pile them up on one connection without bound, 30 MiB for 1000 (the red team's find). It is forgotten
    now, as mitmproxy forgets a stream after a protocol error (DropStream); what comes for it later is
    passed over, as for any stream the layer forgot."""
    from mitmproxy.proxy.layers.http import DropStream, HttpStream

    original = getattr(HttpStream.check_killed, "__wrapped__", HttpStream.check_killed)

    @functools.wraps(original)
    def check_killed(self, emit_error_hook):
        killed = yield from original(self, emit_error_hook)
        if killed and self.context.client.alpn in (b"h2", b"h3"):  # (HTTP/1: the connection closes)
            yield DropStream(self.stream_id)
        return killed

    HttpStream.check_killed = check_killed


_BODYLESS: weakref.WeakSet = weakref.WeakSet()  # requests whose head ended the stream (HTTP/2 and 3)


def note_bodyless_requests() -> None:
    """Remember which requests came without a body. An HTTP/2 request needs no Content-Length, and
    only the event mitmproxy handles says whether a body follows the head: see `has_no_body`."""
    from mitmproxy.proxy.layers.http import HttpStream, RequestHeaders

    original = getattr(HttpStream.state_wait_for_request_headers, "__wrapped__",
                       HttpStream.state_wait_for_request_headers)

    @functools.wraps(original)
    def state_wait_for_request_headers(self, event):
        if isinstance(event, RequestHeaders) and event.end_stream:
            _BODYLESS.add(event.request)
        return (yield from original(self, event))

    HttpStream.state_wait_for_request_headers = state_wait_for_request_headers


def has_no_body(request: Any) -> bool:
    """True if the request's head ended its stream (no body follows), as far as mitmproxy said."""
    return request in _BODYLESS


UPSTREAM_TIMED_OUT = "sealgate: the upstream did not answer in time"
H2_SLICE = 16 * 1024  # bytes of a worker's HTTP/2 data parsed at a time
CONTROL_PER_RESET = 10  # an HTTP/2 worker may send this many control frames for each reset it may send
PIPELINED_MAX = 512 * 1024  # bytes a worker may send ahead while its request waits (beyond a head's worth)
_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 ends a head
_TIMED_OUT: weakref.WeakSet = weakref.WeakSet()  # flows whose upstream sealgate gave up on


class _GatewayTimeout:
    """Stands in for mitmproxy's ErrorCode where an upstream timed out: its status is 504, not 502."""

    @staticmethod
    def http_status_code() -> int:
        return 504


def abort_upstream(master: Any, client: Any, server: Any, flow: Any = None) -> bool:
    """Give up on an upstream connection (still being opened, or not answering flow): its task is cancelled
    with UPSTREAM_TIMED_OUT, and the worker's request, if any, is answered 504 (`answer_timeouts`). False if
    the connection is gone already."""
    if flow is not None:
        _TIMED_OUT.add(flow)
    proxy = master.addons.get("proxyserver")
    handler = proxy.connections.get(client.id) if proxy else None
    io = handler.transports.get(server) if handler is not None else None
    if io is None or io.handler is None:
        return False
    io.handler.cancel(UPSTREAM_TIMED_OUT)
    return True


def timed_out(flow: Any) -> bool:
    return flow in _TIMED_OUT


def answer_timeouts() -> None:
    """Answer 504 where sealgate gave up on the upstream (`abort_upstream`): mitmproxy would answer 502, as
    for any failed upstream. Its error for the flow carries no status; the code it maps to one is replaced."""
    import copy

    from mitmproxy.proxy.layers.http import HttpStream, ResponseProtocolError

    original = getattr(HttpStream.handle_protocol_error, "__wrapped__", HttpStream.handle_protocol_error)

    @functools.wraps(original)
    def handle_protocol_error(self, event):
        if isinstance(event, ResponseProtocolError) and (event.message == UPSTREAM_TIMED_OUT or self.flow in _TIMED_OUT):
            _TIMED_OUT.add(self.flow)
            event = copy.copy(event)
            object.__setattr__(event, "code", _GatewayTimeout())  # its constructor takes only ErrorCodes
        return (yield from original(self, event))

    HttpStream.handle_protocol_error = handle_protocol_error


def refuse_connection(master: Any, client: Any, answer: bytes) -> None:
    """From the client_connected hook: send answer (a whole HTTP/1.1 response), and have mitmproxy close
    the connection before it reads a byte of it."""
    proxy = master.addons.get("proxyserver")
    handler = proxy.connections.get(client.id) if proxy else None
    if handler is not None and client in handler.transports:
        handler.transports[client].writer.write(answer)
    client.error = "refused: too many connections"


def limit_request_heads(limit: Callable[[], int], answer: Callable[[], bytes]) -> None:
    """Bound by limit() what mitmproxy buffers without bound from a worker: an HTTP/1 request head until it
    ends (the worker gets answer(), a whole response), bytes pipelined behind a waiting request and a TLS
    ClientHello until whole (closed). Empty lines before a head are dropped (h11's buffer, `_data`):
    mitmproxy took them for an unfinished head."""
    from mitmproxy.proxy import commands, events
    from mitmproxy.proxy.layers.http import _http1

    cls = _http1.Http1Server
    original = getattr(cls.read_headers, "__wrapped__", cls.read_headers)

    @functools.wraps(original)
    def read_headers(self, event):
        while isinstance(event, events.DataReceived) and self.buf._data[:1] in (b"\r", b"\n"):
            # empty lines before a request line are ignored (RFC 9112 2.2); mitmproxy would wait for more bytes
            data = bytes(self.buf._data[:4096])
            self.buf.maybe_extract_at_most(len(data) - len(data.lstrip(b"\r\n")))
        if isinstance(event, events.DataReceived) and len(self.buf) > (most := limit()):
            if not _HEAD_END.search(bytes(self.buf._data[:most + 4])):  # h11's end of a head
                yield commands.SendData(self.conn, answer())
                yield from _close(self.conn)
                self.state = self.done
                return
        return (yield from original(self, event))

    cls.read_headers = read_headers

    wait = getattr(cls.wait, "__wrapped__", cls.wait)

    @functools.wraps(wait)
    def waiting(self, event):
        """While a request waits for its answer, mitmproxy keeps what the worker sends next (pipelined) in
        the buffer, without bound: past a head's worth and PIPELINED_MAX, the connection is closed."""
        if isinstance(event, events.DataReceived) and len(self.buf) > limit() + PIPELINED_MAX:
            yield from _close(self.conn)
            return
        return (yield from wait(self, event))

    cls.wait = waiting

    from mitmproxy.proxy.layers import tls
    hello = getattr(tls.ClientTLSLayer.receive_handshake_data, "__wrapped__", tls.ClientTLSLayer.receive_handshake_data)

    @functools.wraps(hello)
    def receive_handshake_data(self, data):
        """A ClientHello is buffered until whole (its header may claim 16 MiB) and parsed again on every read:
        past limit() bytes, the handshake fails and the connection is closed."""
        if not self.client_hello_parsed and len(self.recv_buffer) + len(data) > limit():
            return False, "ClientHello too large"
        return (yield from hello(self, data))

    tls.ClientTLSLayer.receive_handshake_data = receive_handshake_data


def limit_h2_floods(most: int, window: float, closed: Callable[[str], None]) -> None:
    """Close an HTTP/2 worker connection that resets more than `most` streams within `window` seconds (rapid
    reset, CVE-2023-44487: each request costs a flow and its hooks however soon it is reset, and a whole
    request reset after its end still goes upstream), or sends more than CONTROL_PER_RESET times as many
    control frames (a PING or SETTINGS flood: about 100 µs of parsing each). mitmproxy sets no limit. The
    connection gets GOAWAY (ENHANCE_YOUR_CALM) and is closed; closed(kind) is told ("resets", "control_frames")."""
    import time

    import h2.errors
    import h2.events
    from mitmproxy.proxy import events
    from mitmproxy.proxy.layers.http import _http2

    cls = _http2.Http2Server
    original = getattr(cls.handle_h2_event, "__wrapped__", cls.handle_h2_event)
    # (WINDOW_UPDATE never gets here: mitmproxy's connection takes it; a reading worker sends many)
    _CONTROL = (h2.events.PingReceived, h2.events.RemoteSettingsChanged, h2.events.PriorityUpdated)

    @functools.wraps(original)
    def handle_h2_event(self, event):
        kind = "resets" if isinstance(event, h2.events.StreamReset) and event.remote_reset else \
            "control_frames" if isinstance(event, _CONTROL) else None
        if kind is not None:
            now = time.monotonic()
            counts, since = getattr(self, "_sealgate_counts", None) or ({"resets": 0, "control_frames": 0}, now)
            if now - since >= window:
                counts, since = {"resets": 0, "control_frames": 0}, now
            counts[kind] += 1
            self._sealgate_counts = (counts, since)
            if counts[kind] > (most if kind == "resets" else most * CONTROL_PER_RESET):
                closed(kind)
                self._sealgate_closed = True
                yield from self.protocol_error(f"too many {kind.replace('_', ' ')} within {window:g} s",
                                               h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                yield from _close(self.conn)
                return True
        return (yield from original(self, event))

    handle_event = getattr(cls._handle_event, "__wrapped__", cls._handle_event)

    @functools.wraps(handle_event)
    def _handle_event(self, event):
        """What arrives is parsed a slice at a time: h2 parses a whole read (64 KiB: 0.4 s of frames at
        worst) before any of it is looked at, and a connection closed for its resets stops at the slice."""
        if not isinstance(event, events.DataReceived) or len(event.data) <= H2_SLICE:
            return (yield from handle_event(self, event))
        for at in range(0, len(event.data), H2_SLICE):
            if getattr(self, "_sealgate_closed", False):
                return
            yield from handle_event(self, events.DataReceived(event.connection, event.data[at:at + H2_SLICE]))

    cls.handle_h2_event = handle_h2_event
    cls._handle_event = _handle_event


def closing_layer(context: Any) -> Any:
    """A layer that closes the worker's connection at once (for what no layer should be decided on)."""
    from mitmproxy.proxy import layer

    class Closing(layer.Layer):
        def _handle_event(self, event):
            yield from _close(self.context.client)

    return Closing(context)


def _close(client: Any):
    """Close a worker's connection from inside a layer, and its socket too: mitmproxy's close, when it cancels
    the connection's reading task while that task waits for the event lock, ends the task and leaves the
    socket open (seen one time in three)."""
    import asyncio

    from mitmproxy import ctx
    from mitmproxy.proxy import commands

    yield commands.CloseConnection(client)
    asyncio.get_running_loop().call_soon(close_client, ctx.master, client)


# --- several processes on one port (`sealgate run --workers N`) ---------------------------------------

_LISTEN_CALL = "asyncio.start_server(self.handle_stream, host, port)"  # mitmproxy's bind of a TCP proxy mode
BACKLOG = 1024  # connections the shared sockets queue (asyncio's default, 100, is one burst of a busy gateway)


class Loads:
    """How many connections each proxy process of a gateway holds, in memory they share (a memfd the supervisor
    makes and passes on): a process writes its own as it accepts one and as one closes (`_Own`); the supervisor
    writes IDLE_SLOT for a process that is not running, so that no process waits for one that cannot accept."""

    IDLE_SLOT = 1 << 62

    def __init__(self, fd: int, slots: int) -> None:
        self.fd, self.slots = fd, slots
        os.set_inheritable(fd, False)  # (a process started from here gets it only by pass_fds)
        self._view = memoryview(mmap.mmap(fd, 8 * slots)).cast("q")

    @classmethod
    def create(cls, slots: int) -> Loads:
        fd = os.memfd_create("sealgate-loads", os.MFD_CLOEXEC)
        os.ftruncate(fd, 8 * slots)
        loads = cls(fd, slots)
        for i in range(slots):
            loads.set(i, cls.IDLE_SLOT)
        return loads

    def set(self, slot: int, count: int) -> None:
        self._view[slot] = count

    def fewest_but(self, slot: int) -> int:
        return min((self._view[i] for i in range(self.slots) if i != slot), default=self.IDLE_SLOT)


STEP_BACK_SLACK = 2  # connections a process may hold beyond the fewest another holds, before it steps back
STEP_BACK_MOST = 0.002  # seconds a process steps back for a burst at most (another may be wedged), then accepts
STEP_BACK_OVER = 1.0  # seconds without a step back after which the last one is over (another took its connection)


class _Own:
    """This process's connections of the shared sockets, its count published as each opens and closes (a count
    written only at accepts stayed high after a burst closed: the next burst went 28/4, the other process
    stepping back for connections it no longer held)."""

    def __init__(self, loads: Loads, slot: int) -> None:
        self.loads, self.slot, self.count = loads, slot, 0
        loads.set(slot, 0)

    def more_than_its_share(self) -> bool:
        return self.count > self.loads.fewest_but(self.slot) + STEP_BACK_SLACK

    def opened(self) -> None:
        self.count += 1
        self.loads.set(self.slot, self.count)

    def closed(self) -> None:
        self.count -= 1
        self.loads.set(self.slot, self.count)


class _Counted(socket.socket):
    """An accepted connection that tells its process's `_Own` when it closes (asyncio's transport closes it)."""

    own: _Own | None = None

    def close(self) -> None:
        super().close()
        if (own := self.own) is not None:
            self.own = None
            own.closed()


class _Shared(socket.socket):
    """A listening socket the proxy processes share: asyncio's `listen(backlog)` as it starts serving keeps
    the queue at BACKLOG (the backlog asyncio is given, 1, is how many it accepts per wake-up). With `own`,
    a process that holds more than STEP_BACK_SLACK connections beyond another's leaves a waiting connection to
    the others (for STEP_BACK_MOST at most): every process is woken by a new connection, and the one that is
    on a core takes it, so a burst of connections that ask little of it went to one process (31 of 32). The
    STEP_BACK_MOST is a burst's: a wait ends when this process accepts, or once STEP_BACK_OVER passes without
    a step back (another took the connection); a connection within that time after one was left to another
    is taken at once if the wait is used up."""

    own: _Own | None = None
    _since: float | None = None  # when it began to step back
    _last: float = 0.0  # when it last stepped back: while a connection waits, asyncio asks again at every turn

    def listen(self, backlog: int = 0) -> None:
        super().listen(BACKLOG)

    def accept(self) -> tuple[socket.socket, Any]:
        if (own := self.own) is None:
            return super().accept()
        if own.more_than_its_share():
            now = time.monotonic()
            if self._since is None or now - self._last > STEP_BACK_OVER:  # (another took the last one: a new wait)
                self._since = now
            self._last = now
            if now - self._since < STEP_BACK_MOST:
                os.sched_yield()
                raise BlockingIOError  # (asyncio: nothing to accept now; it asks again at the next wake-up)
        self._since = None
        fd, address = self._accept()  # (socket.accept, making a _Counted)
        conn = _Counted(self.family, self.type, self.proto, fileno=fd)
        if socket.getdefaulttimeout() is None and self.gettimeout():
            conn.setblocking(True)
        conn.own = own
        own.opened()
        return conn, address


def listen_problems() -> list[str]:
    """What `listen_on` needs and the installed mitmproxy lacks, as sentences (empty: all there).
    `sealgate run --workers N` checks it before it starts a worker, as every run checks `problems()`."""
    from mitmproxy.proxy import mode_servers

    listen = getattr(getattr(mode_servers, "AsyncioServerInstance", None), "listen", None)
    listen = getattr(listen, "__wrapped__", listen)
    try:
        found = listen is not None and _LISTEN_CALL in inspect.getsource(listen)
    except (OSError, TypeError):
        found = False
    return [] if found else [f"mitmproxy.proxy.mode_servers.AsyncioServerInstance.listen calling {_LISTEN_CALL} "
                             f"(several workers on one port; checked against mitmproxy {CHECKED_VERSIONS})"]


def listen_on(sockets: list, loads: tuple[Loads, int] | None = None) -> None:
    """Have this process's proxy listener accept on sockets, listening already, that it shares with the other
    proxy processes of `sealgate run --workers N` (the supervisor bound them and keeps them: `workers.bind`).
    One accept queue for them all: a connection goes to whichever process accepts first, which is one that is
    not busy (SO_REUSEPORT's hash of each connection's addresses put 20 of 32 on one of two processes), and one
    that waits while no process is up (between a death and the restart) is not reset.

    mitmproxy binds a TCP proxy mode with `_LISTEN_CALL` and no option for it; that one call is replaced here
    for the address the sockets are bound to (UDP modes and other addresses go to mitmproxy as they are).
    With loads (the gateway's counts and this process's slot), a process with more connections than another
    leaves new ones to it (`_Shared`). Raises InternalsMissing when mitmproxy binds another way."""
    import asyncio

    from mitmproxy.proxy import mode_servers

    if missing := listen_problems():
        raise InternalsMissing("this mitmproxy lacks what sealgate needs: " + "; ".join(missing))
    cls = mode_servers.AsyncioServerInstance
    original = getattr(cls.listen, "__wrapped__", cls.listen)
    ports = {s.getsockname()[1] for s in sockets}
    for s in sockets:  # (inherited: nothing this process starts gets them in turn)
        s.set_inheritable(False)
    own = _Own(*loads) if loads is not None else None

    def shared(s: socket.socket) -> _Shared:
        copy = _Shared(fileno=os.dup(s.fileno()))
        copy.own = own
        return copy

    @functools.wraps(original)
    async def listen(self, host, port):
        if self.mode.transport_protocol != "tcp" or port not in ports:
            return await original(self, host, port)
        # one accept per wake-up (asyncio's loop takes up to `backlog` at once: the first process woken for a
        # burst took all of it, 31 of 32), on a copy (a server closed, when mitmproxy stops or restarts a
        # mode, closes its own)
        return [await asyncio.start_server(self.handle_stream, sock=shared(s), backlog=1) for s in sockets]

    cls.listen = listen
    _SHARED[:] = sockets


_SHARED: list = []  # this process's own copies of the sockets `listen_on` accepts on (its listeners' are dups)


def stop_sharing() -> None:
    """A draining process lets go of the shared sockets (its listeners closed their copies as mitmproxy stopped
    them): once the supervisor and every process have, the port is closed and a new connection is refused,
    not left in the queue with no one to accept it until the gateway exits."""
    for s in _SHARED:
        s.close()
    _SHARED.clear()
