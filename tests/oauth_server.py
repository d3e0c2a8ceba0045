"""A real OAuth2 authorization server and protected API on loopback over TLS, for tests of
OAuth through the proxy: the authorization code flow with PKCE (S256), refresh (optionally
rotating), revocation, stale access tokens and transient failures. It records every request
it receives and every token it issues, so tests can search for leaks.

Token errors answer exactly {"error": "<code>"}. Any path other than /authorize and /token
is the protected API: with a valid Bearer access token it echoes the request as JSON."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import secrets
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple, Self
from urllib.parse import parse_qs, unquote_plus, urlencode, urlsplit

from upstream import LOOPBACK_SANS, Received, TestPKI

CODE_TTL = 60.0  # seconds an authorization code stays valid

Answer = tuple[int, dict[str, str], object]  # status, extra headers, JSON body (None: empty body)


def s256(verifier: str) -> str:
    """The S256 code challenge of a PKCE code verifier: base64url, no padding, of its SHA-256."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def pkce_pair() -> tuple[str, str]:
    """A fresh (code_verifier, code_challenge)."""
    verifier = secrets.token_urlsafe(48)
    return verifier, s256(verifier)


class _Grant(NamedTuple):
    redirect_uri: str
    challenge: str
    scope: str
    expires: float  # time.monotonic()


class OAuthServer:
    """Serves https://127.0.0.1:<port> in a daemon thread from construction until close()."""

    def __init__(self, pki: TestPKI, *, client_id: str = "test-client", client_secret: str | None = None,
                 expires_in: int = 3600, rotate_refresh: bool = False, delay: float = 0.0) -> None:
        self.pki = pki
        self.client_id, self.client_secret = client_id, client_secret
        self.expires_in, self.rotate_refresh, self.delay = expires_in, rotate_refresh, delay
        self.received: list[Received] = []
        self.api_tokens_seen: list[str | None] = []  # the Bearer token of each API request (None: none)
        self.access_tokens: set[str] = set()  # every token ever issued
        self.refresh_tokens: set[str] = set()
        self.refresh_calls = self.code_calls = 0
        self._lock = threading.Lock()
        self._codes: dict[str, _Grant] = {}
        self._live_access: dict[str, float] = {}  # token -> expiry (time.monotonic())
        self._live_refresh: dict[str, str] = {}  # token -> scope
        self._failures: list[int] = []  # statuses the next token requests answer
        self._srv = _Server(self)
        port = self._srv.server_address[1]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*pki.issue(f"oauth-127.0.0.1-{port}", LOOPBACK_SANS))
        self._srv.socket = ctx.wrap_socket(self._srv.socket, server_side=True)
        self.origin = f"https://127.0.0.1:{port}"
        self.authorize_url, self.token_url = self.origin + "/authorize", self.origin + "/token"
        threading.Thread(target=self._srv.serve_forever, args=(0.05,), daemon=True).start()  # close() waits a poll

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- for tests ---------------------------------------------------------------------------

    def authorize(self, url: str) -> tuple[str, str]:
        """What a browser does with the authorize URL: GET it (directly, TLS verified against the
        test CA) and read the code and state from the redirect, without following it."""
        parts = urlsplit(url)
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=10,
                                           context=ssl.create_default_context(cafile=str(self.pki.ca_pem)))
        try:
            conn.request("GET", f"{parts.path}?{parts.query}")
            r = conn.getresponse()
            body = r.read()
        finally:
            conn.close()
        if r.status != 302:
            raise AssertionError(f"/authorize answered {r.status}: {body!r}")
        query = parse_qs(urlsplit(r.getheader("Location", "")).query)
        return query["code"][0], query["state"][0]

    def revoke(self, refresh_token: str) -> None:
        with self._lock:
            self._live_refresh.pop(refresh_token, None)

    def revoke_all(self) -> None:
        with self._lock:
            self._live_refresh.clear()

    def expire_access_tokens(self) -> None:
        """Every access token issued so far is refused by the API from now on."""
        with self._lock:
            self._live_access.clear()

    def fail_next(self, n: int = 1, status: int = 503) -> None:
        """The next n token requests answer status with {"error": "temporarily_unavailable"}."""
        with self._lock:
            self._failures += [status] * n

    def seen(self) -> bytes:
        """Everything received, for leak searches."""
        return b"\n".join(r.dump() for r in list(self.received))

    def close(self) -> None:
        self._srv.close()

    # --- the endpoints -------------------------------------------------------------------------

    def _answer(self, rec: Received) -> Answer:
        with self._lock:
            self.received.append(rec)
        path = urlsplit(rec.path).path
        if path == "/authorize":
            return self._authorize(rec) if rec.method == "GET" else (405, {"Allow": "GET"}, {"error": "invalid_request"})
        if path == "/token":
            status, headers, body = self._token(rec) if rec.method == "POST" else (
                405, {"Allow": "POST"}, {"error": "invalid_request"})
            return status, {"Cache-Control": "no-store", **headers}, body
        return self._api(rec)

    def _authorize(self, rec: Received) -> Answer:
        q = {k: v[0] for k, v in parse_qs(urlsplit(rec.path).query).items()}
        if q.get("response_type") != "code":
            return 400, {}, {"error": "unsupported_response_type"}
        if (q.get("client_id") != self.client_id or q.get("code_challenge_method") != "S256"
                or not all(q.get(k) for k in ("redirect_uri", "state", "code_challenge"))):
            return 400, {}, {"error": "invalid_request"}
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = _Grant(q["redirect_uri"], q["code_challenge"], q.get("scope", ""),
                                       time.monotonic() + CODE_TTL)
        sep = "&" if "?" in q["redirect_uri"] else "?"
        return 302, {"Location": q["redirect_uri"] + sep + urlencode({"code": code, "state": q["state"]})}, None

    def _token(self, rec: Received) -> Answer:
        fields = parse_qs(rec.body.decode("utf-8", "replace"), keep_blank_values=True)
        form = {k: v[0] for k, v in fields.items()}
        grant_type = form.get("grant_type")
        with self._lock:
            if grant_type == "refresh_token":
                self.refresh_calls += 1
            elif grant_type == "authorization_code":
                self.code_calls += 1
        time.sleep(self.delay)
        with self._lock:
            if self._failures:
                return self._failures.pop(0), {}, {"error": "temporarily_unavailable"}
        content_type = (rec.header("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded" or any(len(v) > 1 for v in fields.values()):
            return 400, {}, {"error": "invalid_request"}
        refused = self._client_refused(rec, form)
        if refused:
            return refused
        if grant_type == "authorization_code":
            with self._lock:
                grant = self._codes.pop(form.get("code", ""), None)
                if (grant is None or time.monotonic() > grant.expires
                        or form.get("redirect_uri") != grant.redirect_uri
                        or not hmac.compare_digest(s256(form.get("code_verifier", "")).encode(),
                                                   grant.challenge.encode())):
                    return 400, {}, {"error": "invalid_grant"}
                return 200, {}, self._issue(grant.scope, None)
        if grant_type == "refresh_token":
            with self._lock:
                old = form.get("refresh_token", "")
                scope = self._live_refresh.get(old)
                if scope is None:
                    return 400, {}, {"error": "invalid_grant"}
                if self.rotate_refresh:
                    del self._live_refresh[old]
                return 200, {}, self._issue(scope, None if self.rotate_refresh else old)
        return 400, {}, {"error": "unsupported_grant_type"}

    def _client_refused(self, rec: Received, form: dict[str, str]) -> Answer | None:
        """client_secret_basic or client_secret_post (not both); None when the client is authenticated."""
        scheme, _, credentials = (rec.header("Authorization") or "").partition(" ")
        basic = scheme.lower() == "basic"
        if basic:
            if "client_secret" in form:
                return 400, {}, {"error": "invalid_request"}
            try:
                cid, _, secret = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
            except ValueError:
                cid = secret = ""
            client_id, client_secret = unquote_plus(cid), unquote_plus(secret)
        else:
            client_id, client_secret = form.get("client_id", ""), form.get("client_secret", "")
        if client_id == self.client_id and (self.client_secret is None or hmac.compare_digest(
                client_secret.encode(), self.client_secret.encode())):
            return None
        return 401, {"WWW-Authenticate": 'Basic realm="oauth"'} if basic else {}, {"error": "invalid_client"}

    def _issue(self, scope: str, refresh_token: str | None) -> dict:
        """A new access token (and a new refresh token unless one is kept); the lock is held."""
        access = secrets.token_urlsafe(24)
        refresh = refresh_token or secrets.token_urlsafe(24)
        self._live_access[access] = time.monotonic() + self.expires_in
        self._live_refresh[refresh] = scope
        self.access_tokens.add(access)
        self.refresh_tokens.add(refresh)
        return {"access_token": access, "token_type": "Bearer", "expires_in": self.expires_in,
                "refresh_token": refresh, "scope": scope}

    def _api(self, rec: Received) -> Answer:
        scheme, _, token = (rec.header("Authorization") or "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        with self._lock:
            self.api_tokens_seen.append(token)
            expiry = self._live_access.get(token) if token else None
        if expiry is None or expiry <= time.monotonic():
            return 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}, {"error": "invalid_token"}
        return 200, {}, {"method": rec.method, "path": rec.path, "headers": [list(h) for h in rec.headers],
                         "body": rec.body.decode("utf-8", "replace")}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, oauth: OAuthServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.oauth = oauth
        self.open: set[socket.socket] = set()  # live connections, cut by close()

    def process_request_thread(self, request, client_address) -> None:
        self.open.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.open.discard(request)

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        for s in list(self.open):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = 65536
    server: _Server

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def _handle(self) -> None:
        rec = Received(self.command, self.path, list(self.headers.items()), self._body())
        status, headers, body = self.server.oauth._answer(rec)
        out = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle
