"""Real upstreams for tests and benchmarks: a test CA, and HTTPS (or plain) servers on
loopback that record every request they receive. `/echo...` answers with what it got."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LOOPBACK_SANS = ["localhost", "127.0.0.1", "127.0.0.2", "127.0.0.3", "::1"]


# --- a test CA and certificates ---------------------------------------------------------

@dataclass
class TestPKI:
    dir: Path
    ca_pem: Path

    def issue(self, name: str, sans: list[str], *, expired: bool = False, self_signed: bool = False) -> tuple[Path, Path]:
        """A (cert, key) pair for the SANs (DNS names or IP addresses)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        start, end = (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)) if expired else (
            now - datetime.timedelta(hours=1), now + datetime.timedelta(days=30))
        alt = []
        for s in sans:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                alt.append(x509.DNSName(s))
        ca_key, ca_cert = (key, None) if self_signed else (self._ca_key, self._ca_cert)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject if self_signed else ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        )
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    @classmethod
    def create(cls, d: Path) -> TestPKI:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sealgate test upstream CA")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        ca_pem = d / "upstream-ca.pem"
        ca_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pki = cls(d, ca_pem)
        pki._ca_key, pki._ca_cert = key, cert
        return pki


@dataclass
class Received:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def dump(self) -> bytes:
        """Everything the upstream saw, for searching."""
        head = "\n".join(f"{k}: {v}" for k, v in self.headers)
        return f"{self.method} {self.path}\n{head}\n\n".encode("utf-8", "surrogateescape") + self.body


@dataclass
class Upstream:
    host: str
    port: int
    scheme: str
    received: list[Received] = field(default_factory=list)

    @property
    def origin(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{shown}:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.origin + path

    def seen(self) -> bytes:
        return b"\n".join(r.dump() for r in self.received)


def _handler(upstream: Upstream):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # answer in one segment: no delayed-ACK stalls on keep-alive
        wbufsize = 65536

        def log_message(self, *args) -> None:
            pass

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    body += self.rfile.read(size)
                    self.rfile.readline()
            else:
                body = self.rfile.read(length) if length else b""
            rec = Received(self.command, self.path, list(self.headers.items()), body)
            upstream.received.append(rec)
            if self.path.startswith("/echo"):
                out = json.dumps({"path": rec.path, "headers": rec.headers,
                                  "body": body.decode("utf-8", "replace")}).encode()
                self.send_response(200)
                self.send_header("X-Echo-Authorization", rec.header("Authorization") or "")
                self.send_header("X-Echo-Path", rec.path)
            else:
                out = b'{"ok": true}'
                self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    return Handler


def serve(pki: TestPKI, host: str = "127.0.0.1", *, tls: bool = True,
          cert: tuple[Path, Path] | None = None) -> tuple[Upstream, ThreadingHTTPServer]:
    """Start an upstream on host (port chosen by the OS) in a daemon thread."""
    up = Upstream(host, 0, "https" if tls else "http")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    srv = Server((host, 0), _handler(up))
    up.port = srv.server_address[1]
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        c, k = cert or pki.issue(f"upstream-{host}-{up.port}", LOOPBACK_SANS)
        ctx.load_cert_chain(c, k)
        # the handshake in each connection's thread, not in accept(): one silent peer must not stall the rest
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return up, srv


class RawUpstream:
    """A TLS server on loopback that answers each request with whatever `answer` makes of it,
    byte for byte, so tests can play upstreams that misbehave. answer(head, body, sock)
    returns the bytes to send, or None after writing to sock itself (the connection then ends)."""

    def __init__(self, pki: TestPKI, answer, host: str = "127.0.0.1", *, keep_bodies: bool = True,
                 tls: bool = True, cert: tuple[Path, Path] | None = None) -> None:
        self.answer = answer
        self.keep_bodies = keep_bodies  # False: record only each body's length and SHA-256 (huge uploads)
        self.received: list[tuple[bytes, bytes]] = []
        self.body_sizes: list[int] = []
        self.body_hashes: list[str] = []
        self.tls = tls
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*(cert or pki.issue(f"raw-{host}-{id(self)}", LOOPBACK_SANS)))
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.host, self.port = host, self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def origin(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{shown}:{self.port}"

    @property
    def target(self) -> str:
        """host:port as a CONNECT line names it."""
        return self.origin.split("://", 1)[1]

    def seen(self) -> bytes:
        return b"\n".join(h + b"\r\n\r\n" + b for h, b in self.received)

    def _serve(self) -> None:
        while True:
            s, _ = self.sock.accept()
            threading.Thread(target=self._one, args=(s,), daemon=True).start()

    def _one(self, s: socket.socket) -> None:
        try:
            t = self.ctx.wrap_socket(s, server_side=True) if self.tls else s
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    d = t.recv(65536)
                    if not d:
                        return
                    buf += d
                head, _, buf = buf.partition(b"\r\n\r\n")
                digest, size, kept = hashlib.sha256(), 0, []
                rest = buf
                for piece, rest in self._body(t, head, buf):
                    digest.update(piece)
                    size += len(piece)
                    if self.keep_bodies:
                        kept.append(piece)
                buf = rest
                self.body_sizes.append(size)
                self.body_hashes.append(digest.hexdigest())
                body = b"".join(kept)
                self.received.append((head, body))
                out = self.answer(head, body, t)
                if out is None:
                    return
                t.sendall(out)
        except (OSError, ssl.SSLError):
            pass


    @staticmethod
    def _body(t, head: bytes, buf: bytes):
        """Yield (piece of body, rest of buffer) for a Content-Length or chunked body."""
        def need(n: int) -> None:
            nonlocal buf
            while len(buf) < n:
                d = t.recv(1 << 20)
                if not d:
                    raise ConnectionError("the client went away mid-body")
                buf += d
        if b"chunked" in header(head, b"transfer-encoding").lower():
            while True:
                while b"\r\n" not in buf:
                    need(len(buf) + 1)
                line, _, buf = buf.partition(b"\r\n")
                size = int(line.split(b";")[0], 16)
                need(size + 2)
                piece, buf = buf[:size], buf[size + 2:]
                if size == 0:
                    yield b"", buf
                    return
                yield piece, buf
        left = int(header(head, b"content-length") or 0)
        while left:
            if not buf:
                need(1)
            piece, buf = buf[:left], buf[left:]
            left -= len(piece)
            yield piece, buf
        yield b"", buf


def header(head: bytes, name: bytes) -> bytes:
    """A header's value in a raw request head (b"" if absent)."""
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return b""


def raw_response(body: bytes, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/octet-stream\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)


class H2Upstream:
    """An HTTP/2 TLS server on loopback: answer(headers, body, conn, stream_id, sock) sends the frames
    (with h2's H2Connection), for tests that need HTTP/2 framing an HTTP/1 server cannot make."""

    def __init__(self, pki: TestPKI, answer, host: str = "127.0.0.1") -> None:
        import h2.config
        import h2.connection
        import h2.events
        self._h2 = (h2.config, h2.connection, h2.events)
        self.answer = answer
        self.received: list[tuple[dict, bytes, dict | None]] = []  # headers, body, trailers
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*pki.issue(f"h2-{host}-{id(self)}", LOOPBACK_SANS))
        self.ctx.set_alpn_protocols(["h2"])
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.origin, self.target = f"https://{host}:{self.port}", f"{host}:{self.port}"
        threading.Thread(target=self._serve, daemon=True).start()

    def seen(self) -> bytes:
        return b"\n".join(repr(h).encode() + b + repr(t).encode() for h, b, t in self.received)

    def _serve(self) -> None:
        while True:
            s, _ = self.sock.accept()
            threading.Thread(target=self._one, args=(s,), daemon=True).start()

    def _one(self, s: socket.socket) -> None:
        config, connection, events = self._h2
        try:
            t = self.ctx.wrap_socket(s, server_side=True)
            conn = connection.H2Connection(config.H2Configuration(client_side=False, header_encoding=None))
            conn.initiate_connection()
            t.sendall(conn.data_to_send())
            streams: dict[int, list] = {}
            while data := t.recv(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, events.RequestReceived):
                        streams[ev.stream_id] = [dict(ev.headers), b"", None]
                    elif isinstance(ev, events.DataReceived):
                        streams[ev.stream_id][1] += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, events.TrailersReceived):
                        streams[ev.stream_id][2] = dict(ev.headers)
                    elif isinstance(ev, events.StreamEnded):
                        h, b, tr = streams.pop(ev.stream_id)
                        self.received.append((h, b, tr))
                        self.answer(h, b, conn, ev.stream_id, t)
                t.sendall(conn.data_to_send())
        except (OSError, ssl.SSLError):
            pass
