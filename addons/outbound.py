"""sealgate's own HTTPS requests (a token exchange or refresh, a request re-sent after a refresh):
only to an address the egress policy allows, resolved once and dialled as checked, over TLS
verified against the public roots plus SEALGATE_UPSTREAM_CA, bounded in time and size.

Blocking (http.client): the CLI calls it directly; the proxy through `off_loop`, on a few threads of
its own (never the default executor, whose threads resolve every destination's name: a slow token
endpoint must not hold up other sessions' connections), each call bounded by DEADLINE.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import certifi

from . import origins
from .egress import EgressPolicy

TIMEOUT = 10.0  # seconds to connect, and between bytes of the answer
DEADLINE = 30.0  # seconds a whole request and its answer may take
LIMIT = 16 * 1024 * 1024  # bytes of an answer held
THREADS = 8  # sealgate's own requests at once; more wait their turn
_POOL = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="sealgate-outbound")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (http.client lets a space through)


class OutboundError(Exception):
    """The request could not be made, or its answer read; says why, never quoting what came back."""


@dataclass(frozen=True)
class Reply:
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]  # as received, less the framing http.client undid (chunked)
    body: bytes

    def header(self, name: str) -> str:
        return next((v.decode("latin-1") for k, v in self.headers if k.decode("latin-1").lower() == name), "")


async def off_loop[T](call: Callable[..., T], *args) -> T:
    """call(*args) on sealgate's outbound threads, waited for at most DEADLINE (OutboundError after)."""
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(_POOL, call, *args), DEADLINE)
    except TimeoutError:
        raise OutboundError(f"no answer within {DEADLINE:g} s") from None


def trust(cafile: Path | str | None) -> ssl.SSLContext:
    """The roots upstream TLS is verified against: the bundle the proxy uses, or the public ones."""
    return ssl.create_default_context(cafile=str(cafile) if cafile else certifi.where())


def resolve(host: str, port: int, policy: EgressPolicy) -> str:
    """The first address of host the policy allows (the one to dial), or OutboundError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise OutboundError(f"{origins.bracketed(host)}:{port} could not be resolved ({e.__class__.__name__})") from None
    reasons = []
    for *_, addr in infos:
        if (why := policy.refusal_reason(addr[0], port)) is None:
            return addr[0]
        reasons.append(why)
    raise OutboundError(f"{origins.bracketed(host)}:{port} is not reachable through sealgate: {reasons[0]}")


def post_form(url: str, body: bytes, headers: list[tuple[str, str]], *, policy: EgressPolicy,
              context: ssl.SSLContext) -> Reply:
    """POST a form to an https URL, checked like any destination."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise OutboundError(f"{url!r} is not an https URL")
    host, port = parts.hostname, parts.port or 443
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    fields = [("Host", origins.bracketed(host) + (f":{port}" if port != 443 else "")), *headers,
              ("Content-Length", str(len(body)))]
    return send("POST", host, port, resolve(host, port, policy), target,
                [(k.encode(), v.encode()) for k, v in fields], body, context=context)


def send(method: str, host: str, port: int, ip: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes,
         *, context: ssl.SSLContext, timeout: float = TIMEOUT, limit: int = LIMIT) -> Reply:
    """One request to ip (already checked), verified as host; the whole answer, or OutboundError."""
    if bad := next((name for name, _ in headers if not _TOKEN.fullmatch(name)), None):
        raise OutboundError(f"the request cannot be written as HTTP/1.1 (header name {bad[:40]!r})")
    conn = _Connection(host, port, ip, context, timeout)
    shown, deadline = f"{origins.bracketed(host)}:{port}", time.monotonic() + DEADLINE
    watchdog = threading.Timer(DEADLINE, conn.abort)  # a peer that drips bytes never trips a per-read timeout
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders(body or None)
        resp = conn.getresponse()
        if (resp.getheader("transfer-encoding") or "chunked").strip().lower() != "chunked":
            # (named, not quoted: what an answer says goes to the worker in the refusal, unscrubbed)
            raise OutboundError(f"the answer of {shown} uses a Transfer-Encoding other than chunked, which "
                                "sealgate does not decode")
        data = b""
        while chunk := resp.read(min(65536, limit + 1 - len(data))):
            data += chunk
            if len(data) > limit:
                raise OutboundError(f"the answer of {shown} is larger than {limit} bytes")
            if time.monotonic() > deadline:
                raise OutboundError(f"the answer of {shown} took longer than {DEADLINE:g} s")
        if conn.aborted:  # (http.client takes the end of the connection for the end of the head or body)
            raise OutboundError(f"{shown} did not answer within {DEADLINE:g} s")
        fields = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.getheaders()
                  if k.lower() != "transfer-encoding"]
        return Reply(resp.status, resp.reason, fields, data)
    except ssl.SSLCertVerificationError as e:
        raise OutboundError(f"TLS to {shown} could not be verified ({e.verify_message})") from None
    except (ValueError, http.client.InvalidURL) as e:  # what http.client will not write: a space or control byte
        # in the path, a header name or value it refuses
        raise OutboundError(f"the request cannot be written as HTTP/1.1 ({e.__class__.__name__})") from None
    except (OSError, http.client.HTTPException) as e:
        if conn.aborted:
            raise OutboundError(f"{shown} did not answer within {DEADLINE:g} s") from None
        raise OutboundError(f"{shown} failed ({e.__class__.__name__})") from None
    finally:
        watchdog.cancel()
        conn.close()


class _Connection(http.client.HTTPSConnection):
    """Dials the checked address; verifies the certificate as the host's."""

    def __init__(self, host: str, port: int, ip: str, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._ip = ip
        self._raw: socket.socket | None = None
        self.aborted = False

    def connect(self) -> None:
        self._raw = sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]

    def abort(self) -> None:
        """From another thread: end the connection now; the read it is blocked in fails at once."""
        self.aborted = True
        target = self.sock or self._raw  # (wrapping in TLS detaches the plain socket from its descriptor)
        if target is not None:
            try:
                socket.socket.shutdown(target, socket.SHUT_RDWR)  # the descriptor's, past the TLS layer
            except OSError:
                pass

    def _encode_request(self, request: str) -> bytes:
        """The request line as the worker sent it (http.client would refuse a byte beyond ASCII)."""
        return request.encode("utf-8", "surrogateescape")
