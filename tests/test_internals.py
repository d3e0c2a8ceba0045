"""The private parts of mitmproxy sealgate relies on: present here, checked at start-up, and
never a silent pass-through when one is missing."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
from contextlib import redirect_stderr

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import command, master, options
from mitmproxy.proxy import tunnel
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers import websocket as ws_layer

from conftest import free_port
from sealgate import cli, internals
from sealgate.streams import StreamFilter, StreamRewriter


def test_every_internal_is_present_in_the_installed_mitmproxy():
    assert internals.problems() == []


@pytest.mark.parametrize("owner, name", [
    (ws_layer.WebsocketConnection, "send2"),
    (http_layer.HttpStream, "state_stream_request_body"),
    (tunnel.TunnelLayer, "_handle_command"),  # (red team, session 19: whole_tls_writes calls it, unchecked)
])
def test_a_missing_internal_is_named(monkeypatch, owner, name):
    monkeypatch.delattr(owner, name)
    found = internals.problems()
    assert any(name in p for p in found) and "checked against mitmproxy" in found[-1]
    with pytest.raises(internals.InternalsMissing, match=name):
        internals.require()


def test_run_refuses_to_start_without_an_internal(monkeypatch, tmp_path):
    monkeypatch.delattr(ws_layer.WebsocketConnection, "send2")
    env = {"SEALGATE_DATA_DIR": str(tmp_path / "data"), "SEALGATE_CERTS_DIR": str(tmp_path / "certs"),
           "SEALGATE_LISTEN_PORT": str(free_port())}
    result: dict = {}
    err = io.StringIO()

    def run():
        with redirect_stderr(err):
            result["code"] = cli.main(["run", "--no-web", "--no-metrics"], env=env)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "sealgate run started although an internal is missing"
    assert result["code"] == 1
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sealgate: error:") and "send2" in lines[0]


class _Event:  # stands in for the event mitmproxy's stream caller handles
    pass


class RequestEndOfMessage(_Event):
    pass


class RequestData(_Event):
    pass


def _mitmproxy_calls(stream, chunk: bytes, event):  # noqa: ARG001 - `event` is read from this frame
    return stream(chunk)


def test_end_of_message_is_told_from_an_empty_frame_by_the_callers_event():
    seen = []
    f = StreamFilter(StreamRewriter(lambda b: [], lambda: 4), internals.end_of_message, seen.append)
    assert _mitmproxy_calls(f, b"abc", RequestData()) == []  # held back: a match may still span it
    assert _mitmproxy_calls(f, b"", RequestData()) == []  # an empty frame mid-body: nothing flushed
    assert _mitmproxy_calls(f, b"", RequestEndOfMessage()) == [b"abc"]  # the end: the rest goes
    assert seen == []


def test_end_of_message_without_the_callers_event_refuses_rather_than_flushes():
    refused = []
    f = StreamFilter(StreamRewriter(lambda b: [], lambda: 4), internals.end_of_message, refused.append)
    f(b"abcdef")
    assert f(b"") == [] and isinstance(refused[0], internals.InternalsMissing)
    assert f(b"more") == []  # and nothing after it


class _NewAddon:
    """An addon a future mitmweb might bring: not on the allowlist, so it must not run."""

    @command.command("newaddon.fetch")
    def fetch(self) -> None:
        raise AssertionError("must not be reachable")


def test_only_allowlisted_addons_and_their_commands_remain():
    async def go():
        m = master.Master(options.Options())
        m.addons.add(_NewAddon())
        assert "newaddon.fetch" in m.commands.commands
        removed = internals.keep_only_addons(m, ["Core"])
        return m, removed
    m, removed = asyncio.run(go())
    assert "_NewAddon" in removed
    assert "newaddon.fetch" not in m.commands.commands
    assert all(type(a).__name__ == "Core" for a in m.addons.chain)


# --- the package -----------------------------------------------------------------------------------

@pytest.mark.e2e
def test_the_package_imports_as_sealgate_and_not_as_addons(tmp_path):
    import subprocess
    import sys

    def imports(name: str) -> bool:
        return subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True).returncode == 0
    assert imports("sealgate") and imports("sealgate.addon")
    assert not imports("addons")


def test_default_paths_are_under_the_working_directory(tmp_path, monkeypatch):
    from sealgate import settings

    monkeypatch.chdir(tmp_path)
    s = settings.load({}, env={})
    assert (s.data_dir, s.certs_dir) == (tmp_path / "data", tmp_path / "certs")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "sealgate.yaml").write_text("data_dir: store\nlisten_port: 9999\n")
    s = settings.load({}, env={})
    assert s.data_dir == tmp_path / "config" / "store" and s.listen_port == 9999


def test_no_class_in_the_package_is_over_250_lines():
    import ast
    import pathlib

    import sealgate
    sizes = {f"{p.name}:{n.name}": n.end_lineno - n.lineno + 1
             for p in pathlib.Path(sealgate.__file__).parent.glob("*.py")
             for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef)}
    assert {k: v for k, v in sizes.items() if v > 250} == {}




def test_direct_hooks_run_each_addon_in_order_log_an_error_as_mitmproxy_does_and_stop_at_addon_halt(caplog):
    from mitmproxy import exceptions
    from mitmproxy.proxy.layers.http import HttpRequestHook
    from mitmproxy.test import tflow

    seen: list[str] = []

    class Named:
        def __init__(self, name: str, do=None) -> None:
            self.name, self.do = name, do

        def request(self, flow) -> None:
            seen.append(self.name)
            if self.do:
                raise self.do

    class Async:
        name = "async"

        async def request(self, flow) -> None:
            await asyncio.sleep(0)
            seen.append("async")

    async def go(*addons):
        m = master.Master(options.Options())
        internals.trim_master(m)
        m.addons.add(*addons)
        await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))

    asyncio.run(go(Named("a", ValueError("boom")), Async(), Named("b", exceptions.AddonHalt()), Named("c")))
    assert seen == ["a", "async", "b"]  # an error: logged, the next addon runs; AddonHalt: none after it
    [record] = [r for r in caplog.records if "Addon error" in r.getMessage()]
    assert record.getMessage() == "Addon error: boom" and record.exc_info and record.levelname == "ERROR"
    with pytest.raises(exceptions.OptionsError):
        asyncio.run(go(Named("d", exceptions.OptionsError("bad option"))))


def test_lean_handle_hook_disarms_the_idle_watchdog_for_the_hook_and_waits_for_an_intercepted_flow():
    from types import SimpleNamespace

    from mitmproxy.proxy.layers.http import HttpRequestHook
    from mitmproxy.proxy import mode_servers, server
    from mitmproxy.test import tflow

    internals.lean_hooks()
    during: list[tuple[int, bool]] = []

    async def go() -> None:
        async def timed_out() -> None: ...
        watchdog = server.TimeoutWatchdog(600, timed_out)

        async def handle_lifecycle(hook) -> None:
            during.append((watchdog.blocker, watchdog.can_timeout.is_set()))
            if getattr(hook, "fail", False):
                raise RuntimeError("addon failed")

        handler = SimpleNamespace(timeout_watchdog=watchdog,
                                  master=SimpleNamespace(addons=SimpleNamespace(handle_lifecycle=handle_lifecycle)))
        hook = HttpRequestHook(tflow.tflow())
        await mode_servers.ProxyConnectionHandler.handle_hook(handler, hook)
        assert (watchdog.blocker, watchdog.can_timeout.is_set()) == (0, True)

        hook.fail = True
        with pytest.raises(RuntimeError):
            await mode_servers.ProxyConnectionHandler.handle_hook(handler, hook)
        assert (watchdog.blocker, watchdog.can_timeout.is_set()) == (0, True)  # re-armed all the same

        flow = tflow.tflow()
        flow.intercept()
        task = asyncio.ensure_future(mode_servers.ProxyConnectionHandler.handle_hook(handler, HttpRequestHook(flow)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done() and watchdog.blocker == 1  # held while intercepted, not timed out meanwhile
        flow.resume()
        await asyncio.wait_for(task, 5)
        assert (watchdog.blocker, watchdog.can_timeout.is_set()) == (0, True)

    asyncio.run(go())
    assert during == [(1, False)] * 3


class _Handler:
    """A connection handler's event path as mitmproxy has it (one event at a time behind a lock, no await
    inside; a hook an eager task that asks for its HookCompleted when it is done), recording the order."""

    def __init__(self, loop_turns: list[int]) -> None:
        self._server_event_lock = asyncio.Lock()
        self.handled: list[str] = []
        self.turns = loop_turns
        self.inside = False

    async def server_event(self, event: str) -> None:
        async with self._server_event_lock:
            assert not self.inside, "an event was handled inside another (mitmproxy #7027)"
            self.inside = True
            self.handled.append(f"{event}@{self.turns[0]}")
            if event.startswith("start"):  # the layer asks for a hook: it runs at once, as an eager task does
                asyncio.get_running_loop().create_task(self.hook_task(event.removeprefix("start ")))
            self.inside = False

    async def hook_task(self, name: str) -> None:
        if name == "slow":
            await asyncio.sleep(0)  # a hook that waits (a linked account's refresh)
        await self.server_event(f"done {name}")


async def _turning(turns: list[int]) -> None:
    while True:
        await asyncio.sleep(0)
        turns[0] += 1


@pytest.mark.parametrize("inline", [False, True])
def test_a_hook_that_does_not_wait_is_completed_in_its_own_event_and_one_that_waits_as_before(inline):
    """mitmproxy's way: every HookCompleted waits a turn of the event loop for the lock its own event holds.
    inline_hook_completions: one that comes from inside the event is handled right after it, in the same
    turn; one from a hook that waited still takes the lock as any event; and the order is the same."""
    class Handler(_Handler):
        pass

    if inline:
        internals.inline_hook_completions(Handler)

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)
        turns = [0]
        ticker = asyncio.ensure_future(_turning(turns))
        h = Handler(turns)
        for event in ("start fast", "data", "start slow", "start fast"):
            await h.server_event(event)
            await asyncio.sleep(0.01)
        ticker.cancel()
        return h.handled

    handled = asyncio.run(main())
    order = [e.split("@")[0] for e in handled]
    assert order == ["start fast", "done fast", "data", "start slow", "done slow", "start fast", "done fast"]
    turn = dict(reversed([(e.split("@")[0], int(e.split("@")[1])) for e in handled]))  # (the first of each)
    same_turn = turn["done fast"] == turn["start fast"]
    assert same_turn == inline, "a hook that did not wait was completed a turn later" if inline else "?"
    assert turn["done slow"] > turn["start slow"]  # a hook that waited: its completion came in a later turn


def test_inline_completions_keep_an_event_that_waits_for_the_lock_behind_those_before_it():
    """An event from elsewhere that finds the lock taken waits for it, as with mitmproxy's lock."""
    class Handler(_Handler):
        pass

    internals.inline_hook_completions(Handler)

    async def main() -> list[str]:
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
        h = Handler([0])
        await h._server_event_lock.acquire()  # held by someone (as while another event is handled)
        waiting = [asyncio.ensure_future(h.server_event(e)) for e in ("first", "start fast", "last")]
        await asyncio.sleep(0)
        assert h.handled == []
        h._server_event_lock.release()
        await asyncio.gather(*waiting)
        return [e.split("@")[0] for e in h.handled]

    assert asyncio.run(main()) == ["first", "start fast", "done fast", "last"]


_NAMES = st.sampled_from([b"Host", b"host", b"HOST", b"Transfer-Encoding", b"content-length", b"X-\xff", b"\xc3\xa9",
                          b"Expect", b""])


@settings(max_examples=300, deadline=None)
@given(fields=st.lists(st.tuples(_NAMES, st.binary(max_size=6)), max_size=8),
       key=st.one_of(_NAMES, _NAMES.map(lambda b: b.decode("utf-8", "surrogateescape"))))
def test_quick_header_lookups_answer_as_mitmproxys(fields, key):
    """Headers.get and `in` without a KeyError raised and caught for each absent name: the same answers as
    Mapping's over mitmproxy's get_all (case, repeated names joined by ", ", bytes that are not UTF-8)."""
    from collections.abc import Mapping

    from mitmproxy.http import Headers
    internals.quick_header_lookups()
    h = Headers(fields)
    assert h.get(key) == Mapping.get(h, key) and h.get(key, "d") == Mapping.get(h, key, "d")
    assert (key in h) == Mapping.__contains__(h, key)


@pytest.mark.parametrize("bad", [None, 3, 3.5])
def test_quick_header_lookups_raise_for_a_name_that_is_no_text_as_mitmproxy_does(bad):
    from collections.abc import Mapping

    from mitmproxy.http import Headers
    internals.quick_header_lookups()
    h = Headers([(b"a", b"b")])
    for mine, theirs in ((h.get, lambda k: Mapping.get(h, k)), (h.__contains__, lambda k: Mapping.__contains__(h, k))):
        with pytest.raises(Exception) as expected:
            theirs(bad)
        with pytest.raises(expected.type):
            mine(bad)


def test_quick_connection_equality_answers_as_mitmproxys():
    import copy

    from mitmproxy import connection
    internals.quick_connection_equality()
    original = connection.Connection.__eq__.__wrapped__
    client = connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=0)
    server = connection.Server(address=("127.0.0.1", 3))
    others = [client, copy.copy(client), server, copy.copy(server), connection.Server(address=None), "x", None, 1]
    for a in (client, server):
        for b in others:
            assert (a == b) == original(a, b) and (a != b) == (not original(a, b))
    assert client == copy.copy(client) and client != server and hash(client) == hash(copy.copy(client))


def test_quick_context_forks_make_the_context_mitmproxys_fork_made():
    from mitmproxy import connection, options
    from mitmproxy.proxy import context
    internals.quick_context_forks()
    client = connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=0)
    ctx = context.Context(client, options.Options())
    ctx.layers.append("a layer")
    mine, theirs = ctx.fork(), context.Context.fork.__wrapped__(ctx)
    for fork in (mine, theirs):
        assert type(fork) is context.Context and fork.client is client and fork.options is ctx.options
        assert fork.server is ctx.server and fork.layers == ["a layer"] and fork.layers is not ctx.layers
    assert vars(mine).keys() == vars(theirs).keys()


@pytest.mark.parametrize("owner, name, replacement", [
    ("mitmproxy.proxy.context.Context", "fork", lambda self: self),
    ("mitmproxy.connection.Connection", "__eq__", lambda self, other: self is other),
    ("mitmproxy.http.Headers", "get_all", lambda self, name: []),
    ("mitmproxy.proxy.tunnel.TunnelLayer", "event_to_child", lambda self, event: iter(())),
])
def test_a_changed_internal_that_sealgate_replaces_is_named(monkeypatch, owner, name, replacement):
    """What sealgate replaces with a quicker copy is checked against the source it was written for: a
    mitmproxy that changed it is named at start-up, not silently overridden."""
    import importlib
    module, cls = owner.rsplit(".", 1)
    monkeypatch.setattr(getattr(importlib.import_module(module), cls), name, replacement)
    assert any(f"{cls}." in p and name.strip("_") in p for p in internals.problems())


def test_pooled_ids_are_random_version_4_uuids_each_new_and_made_again_after_a_fork():
    import os
    import uuid

    from mitmproxy import connection, flow

    internals.pooled_ids()
    assert isinstance(flow.uuid, internals._PooledIds) and connection.uuid is flow.uuid
    ids = [flow.uuid.uuid4() for _ in range(3 * internals._ID_BATCH)]
    assert len(set(ids)) == len(ids)
    parsed = [uuid.UUID(i) for i in ids]
    assert all(str(u) == i and u.version == 4 and u.variant == uuid.RFC_4122 for u, i in zip(parsed, ids))
    free = [b for b in range(128) if b not in (62, 63, 76, 77, 78, 79)]  # (not the variant's and version's)
    assert all(any(u.int >> b & 1 for u in parsed) and not all(u.int >> b & 1 for u in parsed) for b in free)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child's next id is its own, not the parent's next
        os.write(write, flow.uuid.uuid4().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    assert child != flow.uuid.uuid4() and child not in ids


def _read_all(reader, buf) -> list:
    """What mitmproxy's read_body takes from reader in one DataReceived: events up to None or the end."""
    import h11
    events = []
    while (event := reader(buf)) is not None:
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    return events


def test_http1_body_readers_hand_on_the_chunks_that_arrived_together_as_one_piece_and_drop_trailers():
    import h11
    from h11._receivebuffer import ReceiveBuffer
    from mitmproxy.proxy.layers.http import _http1
    internals.http1_body_readers(lambda: 65536)
    reader, buf = _http1.make_body_reader(None), ReceiveBuffer()
    buf += b"5\r\ndata:\r\n3\r\n a\n\r\n4\r\n"  # two whole chunks and a part of the third
    [first] = _read_all(reader, buf)
    assert isinstance(first, h11.Data) and bytes(first.data) == b"data: a\n"
    buf += b"\n\nxy\r\n0\r\nx-key: v\r\n\r\n"
    [second, end] = _read_all(reader, buf)
    assert bytes(second.data) == b"\n\nxy" and isinstance(end, h11.EndOfMessage) and not end.headers
    sized, buf = _http1.make_body_reader(4), ReceiveBuffer()
    buf += b"abcd"
    assert [type(e) for e in _read_all(sized, buf)] == [h11.Data, h11.EndOfMessage]


def test_http1_body_readers_hand_on_the_good_chunks_before_a_protocol_error():
    import h11
    from h11._receivebuffer import ReceiveBuffer
    from mitmproxy.proxy.layers.http import _http1
    internals.http1_body_readers(lambda: 65536)
    reader, buf = _http1.make_body_reader(None), ReceiveBuffer()
    buf += b"3\r\nabc\r\nzz\r\n"
    assert bytes(reader(buf).data) == b"abc"
    with pytest.raises(h11.ProtocolError):
        reader(buf)


def _tls_pair(pki):
    """A client and a server TLS connection over memory BIOs, their handshake done."""
    from OpenSSL import SSL
    cert, key = pki.issue("whole-writes", ["localhost"])
    server_ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    server_ctx.use_certificate_file(str(cert))
    server_ctx.use_privatekey_file(str(key))
    server, client = SSL.Connection(server_ctx), SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD))
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(4):
        for a, b in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                a.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                b.bio_write(a.bio_read(1 << 20))
    return client, server


def _records(server, data: bytes) -> list[bytes]:
    """The plaintext of each TLS record in `data`, as the server reads them one at a time."""
    from OpenSSL import SSL
    got, at = [], 0
    while at < len(data):
        length = int.from_bytes(data[at + 3:at + 5], "big")
        server.bio_write(data[at:at + 5 + length])
        at += 5 + length
        with contextlib.suppress(SSL.WantReadError):
            got.append(server.recv(1 << 20))
    return got


def _client_conn(transport: str = "tcp"):
    from mitmproxy import connection
    return connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=0,
                             transport_protocol=transport)


def _client_tls_layer(tls_conn, conn, child):
    """A ClientTLSLayer, open, on `tls_conn` (its handshake done), with `child` as its child layer."""
    from mitmproxy.proxy.layers import tls
    layer = tls.ClientTLSLayer.__new__(tls.ClientTLSLayer)
    layer.tls, layer.conn, layer.tunnel_connection, layer.child_layer = tls_conn, conn, conn, child
    layer.tunnel_state, layer.command_to_reply_to, layer._event_queue, layer.debug = \
        tunnel.TunnelState.OPEN, None, [], None
    return layer


def test_whole_tls_writes_send_all_a_tls_layer_has_encrypted_in_one_write(pki):
    """mitmproxy's own tls_interact sent a 300 KiB piece in five writes of 64 KiB."""
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.layers import tls
    client, server = _tls_pair(pki)
    internals.whole_tls_writes()
    layer = type("Layer", (), {"tls": client, "conn": object()})()
    client.sendall(b"x" * (300 << 10))
    writes = list(tls.TLSLayer.tls_interact(layer))
    assert len(writes) == 1 and isinstance(writes[0], commands.SendData)
    assert b"".join(_records(server, writes[0].data)) == b"x" * (300 << 10)


@pytest.mark.parametrize("dtls", [False, True])
def test_whole_tls_writes_send_what_a_child_sends_in_one_event_as_one_record_in_order(pki, dtls):
    """A response's head, body and end went out as a TLS record and a write each (the worker woke for each).
    Now what the child sends in one event goes as one record; any other command sends what was held before
    it, so nothing changes order. DTLS keeps the child's pieces: each record is a datagram."""
    from mitmproxy import connection
    from mitmproxy.proxy import commands
    client, server = _tls_pair(pki)
    conn = _client_conn("udp" if dtls else "tcp")
    other = connection.Server(address=("127.0.0.1", 3))
    log, close = commands.Log("between"), commands.CloseConnection(conn)

    class Child:
        def handle_event(self, event):
            yield commands.SendData(conn, b"HTTP/1.1 200 OK\r\n\r\n")
            yield commands.SendData(conn, b"body")
            yield commands.SendData(other, b"to the other side")
            yield commands.SendData(conn, b"more")
            yield log
            yield commands.SendData(conn, b"last")
            yield close

    internals.whole_tls_writes()
    out = list(_client_tls_layer(client, conn, Child()).event_to_child(None))
    kinds = [(type(c).__name__, getattr(c, "connection", None) is conn) for c in out]
    mine = [_records(server, c.data) for c in out if isinstance(c, commands.SendData) and c.connection is conn]
    if dtls:
        assert mine == [[b"HTTP/1.1 200 OK\r\n\r\n"], [b"body"], [b"more"], [b"last"]]
        return
    assert kinds == [("SendData", True), ("SendData", False), ("SendData", True), ("Log", False),
                     ("SendData", True), ("CloseConnection", True)]
    assert mine == [[b"HTTP/1.1 200 OK\r\n\r\nbody"], [b"more"], [b"last"]]
    assert out[1].data == b"to the other side" and out[3] is log and out[5] is close


def test_whole_tls_writes_send_a_long_piece_as_it_is_after_what_was_held(pki):
    """Review (session 19): a head and a large body joined were copied whole; a piece of HOLD_MOST or more
    goes as it is, after what was held before it, and what follows it is held again."""
    from mitmproxy.proxy import commands
    body = b"b" * internals.HOLD_MOST

    class Child:
        def handle_event(self, event):
            yield commands.SendData(conn, b"head")
            yield commands.SendData(conn, body)
            yield commands.SendData(conn, b"end")
            yield commands.SendData(conn, b"!")

    client, server = _tls_pair(pki)
    conn = _client_conn()
    internals.whole_tls_writes()
    out = list(_client_tls_layer(client, conn, Child()).event_to_child(None))
    assert [b"".join(_records(server, c.data)) for c in out] == [b"head", body, b"end!"]


def test_whole_tls_writes_send_what_was_held_when_the_child_raises(pki):
    """Red team (session 19): mitmproxy logs a layer's crash and keeps the connection, so what the child sent
    before it raised had gone out, as its protocol state (h11's, HPACK's, flow control's) counts it. Held and
    dropped, a response's head was lost before its body went later (HTTP/1), or every later head decoded wrong
    (HTTP/2). It is sent before the exception goes on."""
    from mitmproxy.proxy import commands

    class Boom(Exception):
        pass

    class Child:
        def handle_event(self, event):
            yield commands.SendData(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
            yield commands.SendData(conn, b"body")
            raise Boom("a layer fails midway")

    client, server = _tls_pair(pki)
    conn = _client_conn()
    internals.whole_tls_writes()
    out = []
    with pytest.raises(Boom):
        for command in _client_tls_layer(client, conn, Child()).event_to_child(None):
            out.append(command)
    assert [b"".join(_records(server, c.data)) for c in out] == [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"]


@pytest.mark.parametrize("opening, filler", [(b"2\r\nok\r\n1;", b"a"), (b"2\r\nok\r\n0\r\n", b"X-A: b\r\n")])
def test_http1_body_readers_bound_a_chunk_size_line_or_trailer_section_that_does_not_end(opening, filler):
    """h11's ChunkedReader held all of a line that never ended (mitmproxy calls it without h11.Connection's
    bound): past `most` bytes left unread the message is a protocol error; up to it, the reader waits."""
    import h11
    from h11._receivebuffer import ReceiveBuffer
    from mitmproxy.proxy.layers.http import _http1
    internals.http1_body_readers(lambda: 1000)
    reader, buf = _http1.make_body_reader(None), ReceiveBuffer()
    buf += opening + filler * (900 // len(filler))
    assert bytes(reader(buf).data) == b"ok" and reader(buf) is None  # (within the bound: more may come)
    buf += filler * (200 // len(filler))
    with pytest.raises(h11.RemoteProtocolError, match="longer than 1000 bytes"):
        reader(buf)
