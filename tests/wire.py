"""Raw sockets through the proxy, for requests no well-behaved client would send."""

from __future__ import annotations

import base64
import socket
import ssl


def credential_header(session: dict) -> str:
    cred = session["proxy_url"].split("//", 1)[1].split("@", 1)[0]
    return f"Proxy-Authorization: Basic {base64.b64encode(cred.encode()).decode()}\r\n"


def connect(session: dict, proxy_port: int, target: str) -> tuple[socket.socket, bytes]:
    """Send CONNECT target; return the socket and the proxy's response head."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{credential_header(session)}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


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


def one_request(session: dict, proxy_port: int, target: str, sni: str | None, request: bytes) -> bytes:
    """One raw request through a tunnel (the request should say Connection: close)."""
    t = tunnel(session, proxy_port, target, sni)
    t.sendall(request)
    out = read_all(t)
    t.close()
    return out
