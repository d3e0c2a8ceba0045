"""Raw sockets through the proxy, for requests no well-behaved client would send."""

from __future__ import annotations

import base64
import socket
import ssl
import time

import pytest


def credential_header(session: dict) -> str:
    cred = session["proxy_url"].split("//", 1)[1].split("@", 1)[0]
    return f"Proxy-Authorization: Basic {base64.b64encode(cred.encode()).decode()}\r\n"


def connect(session: dict, proxy_port: int, target: str) -> tuple[socket.socket, bytes]:
    """Send CONNECT target; return the socket and the proxy's response head."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{credential_header(session)}\r\n".encode())
    return sock, read_head(sock)


def read_head(sock: socket.socket) -> bytes:
    """What arrives until the end of a head (or the connection's end)."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


def full_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket that never accepts, its backlog full: SYNs to it go unanswered."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(full.getsockname())
        fillers.append(c)
    time.sleep(0.2)
    return full, fillers


def tunnel(session: dict, proxy_port: int, target: str, sni: str | None) -> ssl.SSLSocket:
    """A TLS socket through a CONNECT tunnel to target, with the given SNI (None: none)."""
    sock, head = connect(session, proxy_port, target)
    assert b" 200 " in head.split(b"\r\n")[0], head
    ctx = ssl.create_default_context(cafile=session["ca_cert"])
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx.wrap_socket(sock, server_hostname=sni)


def read_all(sock: socket.socket, timeout: float = 5) -> bytes:
    """Everything until the peer closes or goes quiet for timeout seconds."""
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, ssl.SSLError, ConnectionResetError):
        pass
    return out


def read_until(sock: socket.socket, marker: bytes, timeout: float = 5) -> bytes:
    """What arrives until marker has (or the peer closes, or goes quiet for timeout seconds)."""
    sock.settimeout(timeout)
    out = b""
    try:
        while marker not in out and (chunk := sock.recv(65536)):
            out += chunk
    except (TimeoutError, ssl.SSLError, ConnectionResetError):
        pass
    return out


def one_request(session: dict, proxy_port: int, target: str, sni: str | None, request: bytes) -> bytes:
    """One raw request through a tunnel (the request should say Connection: close)."""
    t = tunnel(session, proxy_port, target, sni)
    t.sendall(request)
    out = read_all(t)
    t.close()
    return out


def h2_tunnel(session: dict, proxy_port: int, target: str, *, window: int | None = None, timeout: float = 8):
    """An HTTP/2 connection through a tunnel, its preamble sent: (the TLS socket, the client's h2 connection);
    `window`: the streams' initial window the client announces."""
    import h2.config
    import h2.connection
    import h2.settings

    sock, head = connect(session, proxy_port, target)
    assert b" 200 " in head.split(b"\r\n")[0], head
    ctx = ssl.create_default_context(cafile=session["ca_cert"])
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    t = ctx.wrap_socket(sock, server_hostname=None)
    assert t.selected_alpn_protocol() == "h2"
    t.settimeout(timeout)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    if window is not None:
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    t.sendall(conn.data_to_send())
    return t, conn


def h2_received(t: ssl.SSLSocket, conn, streams: dict[int, dict], deadline: float, size: int = 65536):
    """The events of each read on an HTTP/2 connection (a list a read), until every one of `streams` has
    "ended", the deadline passes or the connection ends; what the client has to send then is sent after each."""
    while time.time() < deadline and not all(s["ended"] for s in streams.values()):
        try:
            data = t.recv(size)
        except (TimeoutError, ssl.SSLError):
            return
        if not data:
            return
        yield conn.receive_data(data)
        t.sendall(conn.data_to_send())


_LOG_AT: dict = {}  # a proxy's log size when the running test began


@pytest.fixture(autouse=True)
def log_mark(request):
    """(Autouse where imported.) Notes where the proxy's log stood as the test began, for `clean_log`."""
    if "proxy" in request.fixturenames:
        p = request.getfixturevalue("proxy")
        _LOG_AT[p.log] = p.log.stat().st_size if p.log.exists() else 0
    yield


def clean_log(proxy) -> bool:
    """No crash in what the proxy logged during this test (a module's proxy is shared)."""
    if not proxy.log.exists():
        return True
    with proxy.log.open("rb") as f:
        f.seek(_LOG_AT.get(proxy.log, 0))
        text = f.read().decode(errors="replace")
    return "has crashed" not in text and "Traceback" not in text


def h2_request(session: dict, proxy_port: int, target: str, headers: list[tuple[bytes, bytes]], *,
               body_parts: tuple[bytes, ...] = (), trailers: list[tuple[bytes, bytes]] | None = None,
               method: bytes = b"GET", timeout: float = 4) -> bytes:
    """One HTTP/2 request through a tunnel, sent as the given DATA frames (an empty part is an
    empty DATA frame; large parts are split as flow control allows); returns every header,
    data and trailer byte the worker received."""
    import h2.events

    t, conn = h2_tunnel(session, proxy_port, target, timeout=timeout)
    got: list[bytes] = []
    ended = False

    def pump() -> None:
        nonlocal ended
        data = t.recv(65536)
        if not data:
            ended = True
        for ev in conn.receive_data(data):
            if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                got.append(repr(ev.headers).encode())
            elif isinstance(ev, h2.events.DataReceived):
                got.append(ev.data)
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                ended = True
        t.sendall(conn.data_to_send())

    try:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(b":method", method), (b":scheme", b"https"), (b":authority", target.encode()),
                                (b":path", b"/")] + headers, end_stream=not body_parts and trailers is None)
        t.sendall(conn.data_to_send())
        for i, part in enumerate(body_parts):
            last = i == len(body_parts) - 1 and trailers is None
            while True:
                room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(part))
                if part and room <= 0:
                    pump()
                    if ended:
                        raise ConnectionResetError
                    continue
                conn.send_data(sid, part[:room], end_stream=last and room == len(part))
                t.sendall(conn.data_to_send())
                part = part[room:]
                if not part:
                    break
        if trailers is not None:
            conn.send_headers(sid, trailers, end_stream=True)
            t.sendall(conn.data_to_send())
        while not ended:
            pump()
    except (TimeoutError, ssl.SSLError, ConnectionResetError, h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
        pass
    t.close()
    return b"".join(got)
