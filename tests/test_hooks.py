"""The addon's hooks in-process (mitmproxy's taddons and tflow): no sockets, no processes.

Each test drives the hooks in the order mitmproxy calls them and checks what the flow
carries afterwards (what would go upstream, what the worker would get), what the audit
trail and the metrics say, and that no value is in any of them where it must not be.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.test import taddons, tflow

from sealgate import decision, origins, sessions
from sealgate.addon import Sealgate
from sealgate.scrubbing import SCRUBBER_GRACE, Scrubbers
from sealgate.store import SecretStore, SessionRecord


@pytest.fixture
def world(tmp_path, user, value):
    """A store with K (allowed to https://api.example) for user, a session of theirs, and the addon."""
    store = SecretStore(tmp_path)
    store.add_secret(user, "K", value, [origins.parse("https://api.example")])
    issued = sessions.issue(store, access="signed-in", runchat="rc", instance="in", user=user, author=None,
                            ttl_seconds=600)
    addon = Sealgate()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, sealgate_data_dir=str(tmp_path))
        yield addon, store, issued


def credential(issued: sessions.Issued) -> str:
    return "Basic " + base64.b64encode(f"{issued.session.id}:{issued.credential}".encode()).decode()


def flow_to(url: str, issued: sessions.Issued | None, *, method: str = "GET", headers: dict | None = None,
            content: bytes = b"") -> http.HTTPFlow:
    f = tflow.tflow()
    f.request = http.Request.make(method, url, content, headers or {})
    f.server_conn.state = ConnectionState.OPEN  # as in a tunnel: connected (to where the test says) before the request
    if issued is not None:
        f.request.headers["Proxy-Authorization"] = credential(issued)
    return f


def through_request(addon: Sealgate, f: http.HTTPFlow) -> http.HTTPFlow:
    """requestheaders, then request (if still live): what mitmproxy would send upstream is f.request."""
    async def go():
        await addon.requestheaders(f)
        if f.response is None and not f.request.stream:
            await addon.request(f)
    asyncio.run(go())
    return f


def audit_of(addon: Sealgate, store):
    """The store's audit trail, once the addon's queue has written it."""
    assert addon.audit.flush(5)
    return store.audit


def blocks(addon: Sealgate, code: str) -> float:
    for line in addon.metrics.render().splitlines():
        if line.startswith(f'sealgate_blocks_total{{code="{code}"}}'):
            return float(line.split()[-1])
    return 0.0


def assert_refused(f: http.HTTPFlow, code: str) -> dict:
    assert f.response is not None and f.response.headers["X-Sealgate-Error"] == code
    problem = json.loads(f.response.content)
    assert problem["code"] == code
    return problem


# --- the request path ----------------------------------------------------------------------------

def test_header_is_filled_for_the_allowed_origin_and_audited_in_placeholder_form(world, value):
    addon, store, issued = world
    ph = issued.env["K"]
    f = through_request(addon, flow_to(f"https://api.example/v1/{ph}?q={ph}", issued, headers={"X-Key": ph}))
    assert f.response is None
    assert f.request.headers["X-Key"] == value and value in f.request.path  # what goes upstream
    assert "Proxy-Authorization" not in f.request.headers
    [row] = audit_of(addon, store)(user=issued.session.principal)
    assert (row.decision, row.secrets, row.path) == ("allow", ("K",), f"/v1/{ph}")  # placeholder form, no query
    f.response = http.Response.make(200, f"echo {value}".encode(), {"X-Echo": value})
    addon.responseheaders(f)
    asyncio.run(addon.response(f))
    assert f.request.headers["X-Key"] == ph  # the flow keeps the placeholder form once the request has gone
    assert f.response.content == f"echo {ph}".encode() and f.response.headers["X-Echo"] == ph
    assert audit_of(addon, store)(user=issued.session.principal)[0].status == 200


def test_placeholder_to_another_origin_is_refused_and_recorded(world, value):
    addon, store, issued = world
    f = through_request(addon, flow_to("https://evil.example/", issued, headers={"X-Key": issued.env["K"]}))
    problem = assert_refused(f, "origin_not_allowed")
    assert "K may not go to https://evil.example" in problem["detail"]
    assert value not in f.request.headers["X-Key"]
    [row] = audit_of(addon, store)(user=issued.session.principal)
    assert (row.decision, row.code, row.status) == ("block", "origin_not_allowed", 403)
    assert blocks(addon, "origin_not_allowed") == 1


def test_streamed_body_with_placeholder_in_the_path_is_audited_in_placeholder_form(world, value):
    """The audit row of a request whose head is filled before the body streams holds no value."""
    addon, store, issued = world
    ph = issued.env["K"]
    f = flow_to(f"https://api.example/bot{ph}/send", issued, method="POST",
                headers={"Transfer-Encoding": "chunked"})
    through_request(addon, f)
    assert callable(f.request.stream) and value in f.request.path
    f.request.stream(f"k={ph}".encode())
    rows = audit_of(addon, store)(user=issued.session.principal)
    assert rows and all(value not in json.dumps(r.__dict__) for r in rows)
    assert {r.path for r in rows} == {f"/bot{ph}/send"}


# --- every refusal leaves by one exit: answered, logged, counted, audited ------------------------

def test_a_407_is_audited_and_counted(world):
    addon, store, issued = world
    f = through_request(addon, flow_to("https://api.example/", None))
    assert f.response.status_code == 407 and f.response.headers["Proxy-Authenticate"]
    assert blocks(addon, "proxy_auth_required") == 1
    [row] = audit_of(addon, store)()
    assert (row.decision, row.code, row.session, row.status) == ("block", "proxy_auth_required", "", 407)
    assert row.client == "127.0.0.1:22"


def test_a_bad_credential_at_connect_is_audited_and_counted(world):
    addon, store, issued = world
    f = tflow.tflow()
    f.request = http.Request.make("CONNECT", "https://api.example:443/")
    f.request.headers["Proxy-Authorization"] = "Basic " + base64.b64encode(b"nosuchsession:guess").decode()
    addon.http_connect(f)
    assert_refused(f, "proxy_auth_required")
    assert "guess" not in f.response.text
    assert [r.code for r in audit_of(addon, store)()] == ["proxy_auth_required"]
    assert blocks(addon, "proxy_auth_required") == 1


def test_a_connect_to_a_blocked_address_is_audited_and_counted(world):
    addon, store, issued = world
    f = tflow.tflow()
    f.request = http.Request.make("CONNECT", "https://127.0.0.3:443/")
    f.request.headers["Proxy-Authorization"] = credential(issued)
    addon.http_connect(f)
    assert f.response is None
    from mitmproxy.proxy import server_hooks
    f.server_conn.address = ("127.0.0.3", 443)
    f.server_conn.error = None
    f.server_conn.state = f.server_conn.state.__class__.CLOSED
    asyncio.run(addon.server_connect(server_hooks.ServerConnectionHookData(f.server_conn, f.client_conn)))
    assert f.server_conn.error.startswith("destination_blocked")
    addon.http_connect_error(f)
    assert_refused(f, "destination_blocked")
    [row] = audit_of(addon, store)(user=issued.session.principal)
    assert (row.code, row.session, row.origin) == ("destination_blocked", issued.session.id, "https://127.0.0.3")
    assert blocks(addon, "destination_blocked") == 1


def test_a_refused_body_is_audited_and_counted(world):
    addon, store, issued = world
    f = flow_to("https://api.example/", issued, method="POST", headers={"Content-Encoding": "gzip"})
    f.request.raw_content = b"not gzip"
    through_request(addon, f)
    assert_refused(f, "unreadable_body")
    assert [r.code for r in audit_of(addon, store)()] == ["unreadable_body"]
    assert blocks(addon, "unreadable_body") == 1


def test_an_exception_while_deciding_blocks_the_request_and_is_recorded(world, monkeypatch, value):
    addon, store, issued = world
    ph = issued.env["K"]

    def boom(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(decision, "decide", boom)
    f = through_request(addon, flow_to("https://api.example/", issued, headers={"X-Key": ph}))
    assert f.response.status_code == 500 and f.response.headers["X-Sealgate-Error"] == "internal_error"
    assert f.request.headers["X-Key"] == ph  # nothing filled, nothing sent
    assert [r.code for r in audit_of(addon, store)()] == ["internal_error"]
    assert blocks(addon, "internal_error") == 1


def test_websocket_message_after_the_session_expired_is_not_filled(world, value):
    addon, store, issued = world
    f = tflow.twebsocketflow()
    f.request = http.Request.make("GET", "https://api.example/ws")
    f.request.headers["Proxy-Authorization"] = credential(issued)
    asyncio.run(addon.requestheaders(f))
    state = addon.states.get(f)
    expired = sessions.Session(SessionRecord(**{**issued.session.record.__dict__, "expires_at": time.time() - 1}))
    state.session = expired
    f.websocket.messages.append(tflow.websocket.WebSocketMessage(1, True, issued.env["K"].encode()))
    addon.websocket_message(f)  # (closing with a message needs a live connection: the flow is killed instead)
    assert value.encode() not in f.websocket.messages[-1].content
    assert f.error is not None and audit_of(addon, store)()[0].decision == "block"


# --- collaborators -------------------------------------------------------------------------------

def test_scrubber_survives_session_pruning(monkeypatch, tmp_path):
    """A slow response of an expired session is still scrubbed after another session prunes it."""
    from sealgate import scrubbing

    store = SecretStore(tmp_path)
    scrubbers = Scrubbers(lambda: store)
    now = time.time()
    old = sessions.Session(SessionRecord("a" * 16, "", b"k" * 32, "signed-in", "r", "i", "u", now - 100, now - 50))
    new = sessions.Session(SessionRecord("b" * 16, "", b"k" * 32, "signed-in", "r", "i", "u", now, now + 600))
    kept = scrubbers.for_session(old)
    kept.add([(b"sk-the-old-value", b"PLACEHOLDER")])
    monkeypatch.setattr(scrubbing.time, "time", lambda: now + SCRUBBER_GRACE + 10)
    monkeypatch.setattr(scrubbing, "SCRUBBERS_MAX", 1)  # the table is full: the expired go
    scrubbers.for_session(new)
    assert old.id not in scrubbers.sessions  # pruned from the table, but the flow's reference still scrubs
    assert kept.scrub(b"late echo: sk-the-old-value") == b"late echo: PLACEHOLDER"


def test_plain_http_is_resolved_once(monkeypatch):
    """The address checked in the request hook is the one dialled: no second lookup."""
    import socket

    from mitmproxy import connection
    from mitmproxy.proxy import server_hooks

    from sealgate.dial import Dialer
    from sealgate.egress import EgressPolicy

    calls = []

    async def getaddrinfo(host, port, **kw):
        calls.append(host)
        ip = "93.184.215.14" if len(calls) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    async def go():
        asyncio.get_running_loop().getaddrinfo = getaddrinfo
        dialer = Dialer(EgressPolicy())
        client = connection.Client(peername=("127.0.0.1", 5555), sockname=("127.0.0.1", 8080))
        assert await dialer.check_ahead(client, "plain.example", 80) is None
        server = connection.Server(address=("plain.example", 80))
        await dialer.server_connect(server_hooks.ServerConnectionHookData(server=server, client=client))
        return server
    server = asyncio.run(go())
    assert calls == ["plain.example"] and server.address == ("93.184.215.14", 80)


def test_decide_is_called_from_release_only():
    import pathlib

    import sealgate
    callers = [p.name for p in pathlib.Path(sealgate.__file__).parent.glob("*.py")
               if "decision.decide(" in p.read_text()]
    assert callers == ["release.py"]


def test_a_row_edited_without_the_key_fails_closed_at_the_proxy(world, tmp_path, value):
    import sqlite3
    addon, store, issued = world
    con = sqlite3.connect(tmp_path / "sealgate.db")
    con.execute("update secrets set origins = ?", [json.dumps(["https://evil.example"])])
    con.commit()
    con.close()
    f = through_request(addon, flow_to("https://evil.example/", issued, headers={"X-Key": issued.env["K"]}))
    problem = assert_refused(f, "store_unavailable")
    assert "secret K" in problem["detail"] and "changed without the master key" in problem["detail"]
    assert value not in f.request.headers["X-Key"]


@pytest.mark.parametrize("length", [str(200 * 1024 * 1024), None])
def test_a_large_or_unbounded_compressed_body_is_refused_before_it_is_read(world, length):
    addon, store, issued = world
    headers = {"Content-Encoding": "gzip", **({"Content-Length": length} if length else {"Transfer-Encoding": "chunked"})}
    f = flow_to("https://api.example/", issued, method="POST", headers=headers)
    f.request.headers.pop("content-length", None)
    if length is not None:
        f.request.headers["content-length"] = length
    asyncio.run(addon.requestheaders(f))  # the head only: nothing of the body has been read
    assert f.error is not None and f.response is None  # closed: an answer would wait for the whole body
    assert [r.code for r in audit_of(addon, store)()] == ["unreadable_body"]


# --- the dashboard's copy and what its API may run --------------------------------------------------

def test_the_dashboard_copy_is_decoded_here_within_a_bound_and_scrubbed_with_the_flows_own_scrubber(value):
    import gzip

    from sealgate.dashboard import BODY_MAX, frame, unframe
    from sealgate.scrub import Scrubber

    f = tflow.tflow(resp=True)
    f.response.headers["Content-Encoding"] = "gzip"
    f.response.raw_content = gzip.compress(b"\0" * (BODY_MAX * 4))  # a bomb: small, decodes past the bound
    f.request.headers["Content-Encoding"] = "gzip"
    f.request.raw_content = gzip.compress(f"k={value}".encode())
    sent = frame(f, Scrubber([(value.encode(), b"PLACEHOLDER")]))
    assert value.encode() not in sent
    copy = unframe(sent[4:])
    assert "content-encoding" not in copy.response.headers and b"not mirrored" in copy.response.raw_content
    assert copy.request.raw_content == b"k=PLACEHOLDER" and "content-encoding" not in copy.request.headers


def test_the_dashboard_keeps_only_viewing_commands():
    from sealgate import dashboard_web

    async def go():
        from mitmproxy.tools.web.master import WebMaster
        m = WebMaster(__import__("mitmproxy.options").options.Options(), with_termlog=False)
        dashboard_web.restrict(m)
        return m
    m = asyncio.run(go())
    names = set(m.commands.commands)
    assert {"options.reset", "options.reset.one", "options.load", "options.save", "view.flows.load", "script.run",
            "replay.client", "inject.websocket", "save.file", "export.file"}.isdisjoint(names)
    assert {"set", "view.clear", "flow.mark"} <= names
    assert type(m.addons.chain[0]).__name__ == "MirrorReceiver"


def test_an_http2_body_of_unknown_length_streams_rather_than_being_held_whole(world):
    addon, store, issued = world
    f = flow_to("https://api.example/up", issued, method="POST")
    f.request.http_version = "HTTP/2.0"
    f.request.headers.pop("content-length", None)
    asyncio.run(addon.requestheaders(f))
    assert f.response is None and callable(f.request.stream)


@pytest.mark.parametrize("headers", [{"Content-Length": str(400 << 20)}, {"Transfer-Encoding": "chunked"}])
def test_a_refused_request_bringing_a_large_body_is_closed_not_held_and_answered(world, headers):
    """mitmproxy reads a whole body before it sends an answer set in requestheaders: a 407 for a 400 MiB
    upload would hold 400 MiB. Closed instead, and recorded."""
    addon, store, issued = world
    f = flow_to("https://api.example/", None, method="POST", headers=headers)
    f.request.headers.pop("content-length", None)
    f.request.headers.update(headers)
    asyncio.run(addon.requestheaders(f))
    assert f.error is not None and f.response is None  # killed
    assert [(r.code, r.status) for r in audit_of(addon, store)()] == [("proxy_auth_required", 0)]
    assert blocks(addon, "proxy_auth_required") == 1


def test_a_non_utf8_byte_in_the_path_is_still_audited(world, value):
    addon, store, issued = world
    f = flow_to("https://evil.example/", issued, headers={"X-Key": issued.env["K"]})
    f.request.data.path = b"/steal\xff/" + issued.env["K"].encode()
    through_request(addon, f)
    assert_refused(f, "origin_not_allowed")
    [row] = audit_of(addon, store)()
    assert row.code == "origin_not_allowed" and row.path == f"/steal\\xff/{issued.env['K']}"


def test_absolute_form_https_to_a_blocked_address_is_refused_by_the_one_exit(world):
    """No CONNECT, so no connection yet: the destination is checked in the request hook, like plain http."""
    addon, store, issued = world
    f = flow_to("https://127.0.0.3/", issued, headers={"X-Key": issued.env["K"]})
    f.server_conn.state = ConnectionState.CLOSED
    through_request(addon, f)
    assert_refused(f, "destination_blocked")
    assert [r.code for r in audit_of(addon, store)()] == ["destination_blocked"] and blocks(addon, "destination_blocked") == 1


def test_websocket_history_is_bounded(world):
    from sealgate.addon import WEBSOCKET_HISTORY
    addon, store, issued = world
    f = tflow.twebsocketflow()
    f.request = http.Request.make("GET", "https://api.example/ws")
    f.request.headers["Proxy-Authorization"] = credential(issued)
    f.server_conn.state = ConnectionState.OPEN
    asyncio.run(addon.requestheaders(f))
    for i in range(WEBSOCKET_HISTORY * 3):
        f.websocket.messages.append(tflow.websocket.WebSocketMessage(1, False, b"m%d" % i))
        addon.websocket_message(f)
    assert len(f.websocket.messages) <= WEBSOCKET_HISTORY
    assert f.websocket.messages[-1].content == b"m%d" % (WEBSOCKET_HISTORY * 3 - 1)


def test_what_other_code_logs_is_scrubbed_of_values_in_the_forms_log_lines_quote(world):
    import logging
    addon, store, issued = world
    odd = "sk-é-" + "x" * 12  # non-ASCII: repr() writes it as \xNN escapes
    store.add_secret(issued.session.principal, "ODD", odd, [origins.parse("https://api.example")])
    addon.scrubbers.for_session(issued.session)
    for text in (f"Unexpected data from server: {odd.encode()!r}", f"got {odd}", f"q=sk-%C3%A9-{'x' * 12}"):
        record = logging.LogRecord("mitmproxy", logging.INFO, "x", 1, text, None, None)
        addon.scrubbers.log_filter(record)
        assert odd not in record.getMessage() and "\\xc3\\xa9" not in record.getMessage()
        assert "sg." in record.getMessage()
