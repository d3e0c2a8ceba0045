"""The dashboard: a separate mitmweb process fed redacted copies of finished flows. Polled
hard while slow flows carrying placeholders go through, its API and websocket never show a
value or a session credential; and nothing done in it can send a value anywhere."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
import requests
from mitmproxy import http
from mitmproxy.test import tflow

from conftest import curl, free_port, make_proxy
from upstream import RawUpstream, header, raw_response


def slow_echo(head: bytes, body: bytes, sock) -> bytes:
    time.sleep(1.5)
    return raw_response(b"you sent " + header(head, b"x-key") + b" " + body)


@pytest.fixture(scope="module")
def dash(tmp_path_factory, pki):
    p = make_proxy(tmp_path_factory.mktemp("dash"), pki)
    p.start(web=True)
    yield p
    p.stop()


class Dashboard:
    def __init__(self, p) -> None:
        self.base = f"http://127.0.0.1:{p.env['SEALGATE_WEB_PORT']}"
        self.password = p.env["SEALGATE_WEB_PASSWORD"]
        self.http = requests.Session()
        self.http.trust_env = False
        self.http.headers["Authorization"] = f"Bearer {self.password}"
        self.http.get(self.base + "/updates", timeout=5)  # sets the XSRF cookie that writes need, as the UI's does
        self.http.headers["X-XSRFToken"] = self.http.cookies.get("_mitmproxy_xsrf", "")

    def get(self, path: str) -> requests.Response:
        return self.http.get(self.base + path, timeout=5)

    def flows(self) -> list[dict]:
        return self.get("/flows").json()

    def websocket(self, seconds: float, enough: Callable[[bytes], bool] = lambda out: False) -> bytes:
        """Everything the dashboard's /updates websocket pushes in that time (or until it is enough)."""
        sock = socket.create_connection(("127.0.0.1", int(self.base.rsplit(":", 1)[1])), timeout=seconds + 2)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(f"GET /updates HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                     f"Authorization: Bearer {self.password}\r\n\r\n".encode())
        sock.settimeout(0.2)
        out, end = b"", time.time() + seconds
        while time.time() < end and not enough(out):
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                out += chunk
            except TimeoutError:
                pass
        sock.close()
        assert out.startswith(b"HTTP/1.1 101"), out[:200]
        return out


@pytest.mark.e2e  # the dashboard is a process of its own, started by `sealgate run`
def test_dashboard_needs_its_password(dash):
    base = f"http://127.0.0.1:{dash.env['SEALGATE_WEB_PORT']}"
    assert requests.get(base + "/flows", timeout=5).status_code == 403
    assert requests.get(base + "/flows", headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 403
    assert dash.env["SEALGATE_WEB_PASSWORD"] not in (dash.data_dir / "sealgate.db").read_bytes().decode("latin-1")


@pytest.mark.e2e
def test_polling_the_dashboard_never_shows_a_value_or_credential(dash, pki, user, value):
    api = RawUpstream(pki, slow_echo)
    evil = RawUpstream(pki, slow_echo, host="127.0.0.2")
    dash.add_secret(user, "K", value, api.origin)
    s = dash.issue(user=user, runchat="rc-dash")
    ph = s["env"]["K"]
    credential = s["proxy_url"].split("@")[0].rsplit(":", 1)[1]
    board = Dashboard(dash)
    seen: list[bytes] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            listing = board.get("/flows")
            assert listing.status_code == 200, listing.status_code
            seen.append(listing.content)
            seen.append(board.get("/flows/dump").content)
            for f in listing.json():
                for part in ("request", "response"):
                    seen.append(board.get(f"/flows/{f['id']}/{part}/content.data").content)
            time.sleep(0.03)

    pollers = [threading.Thread(target=poll) for _ in range(2)]
    ws_out: list[bytes] = []
    ws = threading.Thread(target=lambda: ws_out.append(board.websocket(6)))
    for t in [*pollers, ws]:
        t.start()
    results = []
    workers = [
        threading.Thread(target=lambda: results.append(curl(s, api.origin + f"/q?key={ph}", "-H", f"X-Key: {ph}",
                                                            "--data-binary", f'{{"k": "{ph}"}}',
                                                            "-H", "Content-Type: application/json"))),
        threading.Thread(target=lambda: results.append(curl(s, evil.origin + "/steal", "-H", f"X-Key: {ph}"))),
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    time.sleep(1)
    stop.set()
    for t in [*pollers, ws]:
        t.join()
    assert sorted(r.status for r in results) == [200, 403]
    assert any(value.encode() in h + b"\r\n\r\n" + b for h, b in api.received)  # the value did go out
    everything = b"".join(seen) + b"".join(ws_out)
    assert len(seen) > 40, "the dashboard was not polled many times"
    assert value.encode() not in everything and credential.encode() not in everything
    flows = {f["request"]["host"]: f for f in board.flows() if f["type"] == "http"}
    shown = flows[api.host]
    assert ph in shown["request"]["path"] and shown["response"]["status_code"] == 200
    assert board.get(f"/flows/{shown['id']}/request/content.data").content == f'{{"k": "{ph}"}}'.encode()
    assert shown["comment"] == f"principal {user}, runchat rc-dash"
    blocked = flows[evil.host]
    assert blocked["comment"].startswith("origin_not_allowed: K may not go to") and blocked["marked"]
    assert blocked["comment"].endswith(f"(principal {user}, runchat rc-dash)")
    dump = board.get("/flows/dump").content
    assert b"rc-dash" in dump and user.encode() in dump  # principal and runchat, for operators


@pytest.mark.e2e
def test_nothing_done_in_the_dashboard_sends_a_value_anywhere(dash, pki, user, value):
    api = RawUpstream(pki, lambda head, body, sock: raw_response(b"ok"))
    evil = RawUpstream(pki, lambda head, body, sock: raw_response(b"got it"), host="127.0.0.2")
    dash.add_secret(user, "K", value, api.origin)
    s = dash.issue(user=user)
    board = Dashboard(dash)
    assert board.http.put(board.base + "/options", json={"intercept": "~q"}, timeout=5).status_code == 200
    r = curl(s, api.origin + "/x", "-H", f"X-Key: {s['env']['K']}")  # not paused: the dashboard sees only copies
    assert r.status == 200 and header(api.received[-1][0], b"x-key") == value.encode()
    time.sleep(0.5)
    flow = next(f for f in board.flows() if f["request"]["host"] == api.host)
    edit = {"request": {"host": evil.host, "port": evil.port}}
    board.http.put(f"{board.base}/flows/{flow['id']}", json=edit, timeout=5)
    for action in ("resume", "replay", "duplicate"):
        board.http.post(f"{board.base}/flows/{flow['id']}/{action}", timeout=5)
    time.sleep(1.5)
    assert evil.received == [] and len(api.received) == 1
    script = dash.dir / "evil.py"
    marker = dash.dir / "evil-ran"
    script.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    board.http.put(board.base + "/options", json={"scripts": [str(script)]}, timeout=5)
    board.http.post(board.base + "/commands/script.run", json={"arguments": [flow["id"], str(script)]}, timeout=5)
    board.http.put(board.base + "/options", json={"server": True, "mode": ["regular@127.0.0.1:0"]}, timeout=5)
    time.sleep(0.5)
    assert not marker.exists()  # no code loaded through the API
    assert board.get("/options").json()["server"]["value"] is False  # no proxy opened: rolled back
    assert value.encode() not in board.get("/flows/dump").content


@pytest.mark.e2e
def test_dashboard_is_not_reachable_through_the_proxy(dash, user):
    s = dash.issue(user=user)
    r = curl(s, f"http://127.0.0.1:{dash.env['SEALGATE_WEB_PORT']}/flows")
    assert r.status == 403 and r.headers["x-sealgate-error"] == "destination_blocked" and b"own port" in r.body


@pytest.mark.e2e
def test_dashboard_api_cannot_write_files_or_connect_anywhere(dash, pki, user, value, tmp_path):
    api = RawUpstream(pki, lambda head, body, sock: raw_response(b"ok"))
    dash.add_secret(user, "K", value, api.origin)
    s = dash.issue(user=user)
    curl(s, api.origin + "/x", "-H", f"X-Key: {s['env']['K']}")
    time.sleep(0.5)
    board = Dashboard(dash)
    flow = next(f for f in board.flows() if f["request"]["host"] == api.host)
    target = tmp_path / "evil.pth"
    for command, args in (("export.file", ["raw_request", "@all", str(target)]), ("save.file", ["@all", str(target)]),
                          ("options.save", [str(target)]), ("cut.save", ["@all", "request.path", str(target)]),
                          ("save.har", ["@all", str(target)]), ("script.run", [flow["id"], str(target)])):
        board.http.post(f"{board.base}/commands/{command}", json={"arguments": args}, timeout=5)
    assert not target.exists()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(1.5)
    port = listener.getsockname()[1]
    for update in ({"proxyauth": f"ldap:127.0.0.1:{port}:cn=x:pw:ou=x"}, {"command_history": True},
                   {"web_password": "taken-over"}, {"upstream_auth": "a:b"}):
        board.http.put(board.base + "/options", json=update, timeout=5)
    with pytest.raises(TimeoutError):
        listener.accept()  # nobody connected
    listener.close()
    assert board.get("/flows").status_code == 200  # the password did not change


def _rss_mib(pid: int) -> int:
    return int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")).split()[1]) // 1024


@pytest.mark.e2e
def test_a_stalled_dashboard_does_not_grow_the_proxy(tmp_path, pki, user, value):
    import signal
    import subprocess as sp

    body = os.urandom(900 * 1024)
    up = RawUpstream(pki, lambda head, b, sock: raw_response(body))
    p = make_proxy(tmp_path, pki)
    p.add_secret(user, "K", value, up.origin)
    s = p.issue(user=user)
    p.start(web=True)
    dashboard = int(sp.run(["pgrep", "-P", str(p.proc.pid)], capture_output=True, text=True).stdout.split()[0])
    try:
        os.kill(dashboard, signal.SIGSTOP)
        before = _rss_mib(p.proc.pid)
        with requests.Session() as c:
            c.trust_env = False
            for _ in range(300):  # 270 MB of mirrored copies if the queue were unbounded
                r = c.get(up.origin + "/x", proxies={"https": s["proxy_url"]}, verify=s["ca_cert"], timeout=10)
                assert r.status_code == 200
        grown = _rss_mib(p.proc.pid) - before
        assert grown < 140, f"the proxy grew by {grown} MiB while the dashboard was stopped"
    finally:
        os.kill(dashboard, signal.SIGCONT)
        p.stop()


@pytest.mark.e2e
def test_the_proxy_goes_on_and_says_so_when_the_dashboard_dies(tmp_path, pki, user, value):
    import signal
    import subprocess as sp

    up = RawUpstream(pki, lambda head, b, sock: raw_response(b"ok"))
    p = make_proxy(tmp_path, pki)
    p.add_secret(user, "K", value, up.origin)
    s = p.issue(user=user)
    p.start(web=True)
    try:
        dashboard = int(sp.run(["pgrep", "-P", str(p.proc.pid)], capture_output=True, text=True).stdout.split()[0])
        os.kill(dashboard, signal.SIGKILL)
        time.sleep(2)
        r = curl(s, up.origin + "/x", "-H", f"X-Key: {s['env']['K']}")
        assert r.status == 200 and header(up.received[-1][0], b"x-key") == value.encode()
        assert "the dashboard process exited" in p.log.read_text()
    finally:
        p.stop()


@pytest.mark.e2e
def test_filled_websocket_messages_reach_the_dashboard_scrubbed(dash, pki, user, value):
    """A worker's WebSocket message is filled in the proxy's own flow: its copy must not carry the value."""
    import hashlib

    def answer(head, body, sock):
        accept = base64.b64encode(hashlib.sha1(header(head, b"sec-websocket-key")
                                               + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        frame = sock.recv(4096)
        n, mask = frame[1] & 0x7F, frame[2:6]
        got.append(bytes(b ^ mask[i % 4] for i, b in enumerate(frame[6:6 + n])))
        sock.sendall(bytes([0x88, 2]) + b"\x03\xe8")  # close
        time.sleep(0.5)
    got: list[bytes] = []
    up = RawUpstream(pki, answer)
    dash.add_secret(user, "K", value, up.origin)
    s = dash.issue(user=user)
    from wire import read_all, tunnel
    t = tunnel(s, dash.port, up.target, None)
    t.sendall(f"GET /ws HTTP/1.1\r\nHost: {up.target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    time.sleep(0.3)
    payload, key = f"auth {s['env']['K']}".encode(), os.urandom(4)
    t.sendall(bytes([0x81, 0x80 | len(payload)]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload)))
    read_all(t, 2)
    time.sleep(1)
    assert got == [f"auth {value}".encode()]  # the upstream got the value
    board = Dashboard(dash)
    dump = board.get("/flows/dump").content
    ws_flow = next(f for f in board.flows() if f["request"]["host"] == up.host)
    messages = board.get(f"/flows/{ws_flow['id']}/messages/content.data").content
    assert s["env"]["K"].encode() in dump + messages
    assert value.encode() not in dump + messages


# --- at most dashboard_max_flows flows ---------------------------------------------------------

def _tflows(n: int, start: int = 0, body: bytes = b"ok") -> list[http.HTTPFlow]:
    """n finished flows, in arrival order: /n<i>, started i seconds apart."""
    flows = []
    for i in range(start, start + n):
        f = tflow.tflow(resp=True)
        f.request.path = f"/n{i}"
        f.timestamp_created = 1_700_000_000.0 + i  # the view's order (the same for all, it would be O(n) per flow)
        f.request.timestamp_start = f.request.timestamp_end = 1_700_000_000.0 + i
        f.response.timestamp_start = f.response.timestamp_end = 1_700_000_000.5 + i
        f.response.content = body
        flows.append(f)
    return flows


def test_the_dashboard_keeps_only_the_newest_flows():
    """In-process, through the receiver's own socket handler into mitmproxy's View: past the bound the
    oldest go (the web UI told of each), also after a user removed or cleared flows in the UI."""
    from mitmproxy.addons.view import View
    from mitmproxy.test import taddons

    from sealgate.dashboard import frame
    from sealgate.dashboard_web import MirrorReceiver
    from sealgate.scrub import Scrubber

    async def feed(receiver: MirrorReceiver, flows: list[http.HTTPFlow]) -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"".join(frame(f, Scrubber()) for f in flows))
        reader.feed_eof()
        await receiver._receive(reader, mock.Mock())

    async def go() -> None:
        receiver, view = MirrorReceiver(), View()
        with taddons.context(receiver, view) as tctx:
            assert tctx.options.sealgate_dashboard_max_flows == 5000
            tctx.options.update(sealgate_dashboard_max_flows=10)
            told: list[str] = []

            def tell(flow: http.HTTPFlow, index: int) -> None:  # the web UI's "flows/remove"; held weakly
                told.append(flow.id)
            view.sig_view_remove.connect(tell)
            sent = _tflows(25)
            await feed(receiver, sent)
            assert [f.id for f in view] == [f.id for f in sent[-10:]] and view.store_count() == 10
            assert told == [f.id for f in sent[:15]]  # each one a "flows/remove" to the web UI, oldest first
            by_user = [view.get_by_id(f.id) for f in (sent[16], sent[20], sent[24])]
            view.remove(by_user)
            more = _tflows(5, start=25)
            await feed(receiver, more)
            gone = {f.id for f in by_user}
            assert [f.id for f in view] == [f.id for f in sent + more if f.id not in gone][-10:]
            for n in range(10):  # a user clearing the view often: the ids kept stay bounded too
                view.clear()
                await feed(receiver, _tflows(9, start=100 + 10 * n))
            assert view.store_count() == 9 and len(receiver.arrived) <= 20

    asyncio.run(go())


@contextlib.contextmanager
def dashboard_process(max_flows: int) -> Iterator[tuple[int, str, Dashboard]]:
    """The dashboard process alone, started as `sealgate run` starts it: (its pid, its mirror socket, its API)."""
    from sealgate.runner import start_dashboard
    from sealgate.settings import Settings

    with tempfile.TemporaryDirectory(prefix="sg-dash-") as workdir:  # short: a Unix socket's path
        port = free_port()
        settings = Settings(listen_host="127.0.0.1", listen_port=0, web_port=port, web_password=None,
                            data_dir=Path(workdir), certs_dir=Path(workdir), upstream_ca=None, allow_private="",
                            session_ttl=60, metrics=None, dashboard_max_flows=max_flows)
        proc, socket_path, password = start_dashboard(settings, Path(workdir))
        try:
            end = time.time() + 30
            while not (os.path.exists(socket_path) and _answers(port)):
                assert proc.poll() is None and time.time() < end, "the dashboard did not start"
                time.sleep(0.1)
            yield proc.pid, socket_path, Dashboard(types.SimpleNamespace(
                env={"SEALGATE_WEB_PORT": str(port), "SEALGATE_WEB_PASSWORD": password}))
        finally:
            proc.terminate()
            proc.wait(10)


def _answers(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/", timeout=1).status_code > 0
    except requests.ConnectionError:
        return False


def _mirror(socket_path: str, board: Dashboard, flows: list[http.HTTPFlow]) -> list[dict]:
    """Send flows as the proxy's Mirror does; the dashboard's flows once it shows the last one."""
    from sealgate.dashboard import frame
    from sealgate.scrub import Scrubber

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(socket_path)
        s.sendall(b"".join(frame(f, Scrubber()) for f in flows))
    end = time.time() + 60
    while True:
        shown = board.flows()
        if flows[-1].id in {f["id"] for f in shown}:
            return shown
        assert time.time() < end, "the dashboard did not show the last flow"
        time.sleep(0.2)


@pytest.mark.e2e
def test_the_dashboard_process_keeps_only_the_newest_flows():
    with dashboard_process(max_flows=50) as (_, socket_path, board):
        sent = _tflows(500)
        pushed: list[bytes] = []
        ws = threading.Thread(target=lambda: pushed.append(
            board.websocket(30, enough=lambda out: out.count(b'"flows/remove"') >= 450)))
        ws.start()
        time.sleep(0.5)
        shown = _mirror(socket_path, board, sent)
        ws.join()
        assert [f["id"] for f in shown] == [f.id for f in sent[-50:]]
        assert pushed[0].count(b'"flows/remove"') == 450  # the open UI was told of each
        refused = board.http.put(board.base + "/options", json={"sealgate_dashboard_max_flows": 10 ** 6}, timeout=5)
        assert refused.status_code != 200
        assert board.get("/options").json()["sealgate_dashboard_max_flows"]["value"] == 50


@pytest.mark.e2e
def test_the_dashboard_does_not_grow_past_its_bound():
    body = os.urandom(8 * 1024)
    with dashboard_process(max_flows=1000) as (pid, socket_path, board):
        _mirror(socket_path, board, _tflows(5000, body=body))
        before = _rss_mib(pid)
        shown = _mirror(socket_path, board, _tflows(5000, start=5000, body=body))
        grown = _rss_mib(pid) - before  # some 80 MiB if every flow were kept
        assert grown < 30, f"the dashboard grew by {grown} MiB over 5,000 flows past its bound of 1,000"
        assert len(shown) == 1000
