"""The platform API: what the platform's Secrets page and its orchestrator call (FastAPI, served by
uvicorn in a process of its own; docs/architecture.md says why).

Bearer tokens with scopes (`tokens`); every operation and its validation is `commands`, the CLI's
own, so a bad field gets the same sentence here (422 problem+json naming the `field`). A value goes
in and never comes out: not in a response, an error (FastAPI's validation errors would quote the
input: they are rewritten) or a log line (uvicorn's access log has the path, never a body).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import commands, oauth, tokens
from .errors import TYPE_BASE, Conflict, NotFound, StoreError
from .settings import Settings
from .store import SecretStore

MAX_BODY = 1024 * 1024  # bytes; a larger body gets 413 before it is read
CLOSE = {"Connection": "close"}  # on an answer sent before the body was read: uvicorn would read it all to go on
STATIC = Path(__file__).with_name("static")  # the reference page: index.html and app.js
PROBLEMS = {  # code -> (status, title)
    "bad_request": (400, "The request could not be read"),
    "unauthorized": (401, "A valid API token is needed"),
    "forbidden": (403, "The token lacks the scope this needs"),
    "not_found": (404, "Not found"),
    "conflict": (409, "It exists already"),
    "method_not_allowed": (405, "Method not allowed"),
    "too_large": (413, "The body is larger than 1 MiB"),
    "invalid": (422, "A field is invalid"),
    "store_unavailable": (503, "Secret store unavailable"),
    "token_endpoint_failed": (502, "The provider's token endpoint could not be used"),
}


class Problem(HTTPException):
    """A refusal the API renders as problem+json (an HTTPException: FastAPI lets it through untouched
    even from inside reading the body)."""

    def __init__(self, code: str, detail: str, field: str | None = None) -> None:
        super().__init__(PROBLEMS[code][0], detail)
        self.code, self.field = code, field


class Gate:
    """Before anything of a /v1/ request is read: a body over MAX_BODY is refused (by its Content-Length,
    or as it streams), and so is a request without a valid token (401 before any 400 or 422)."""

    def __init__(self, app: Any, store: SecretStore) -> None:
        self.app, self.store = app, store

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            try:
                found = _bearer(dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"), self.store)
            except StoreError as e:
                await problem("store_unavailable", str(e), headers=CLOSE)(scope, receive, send)
                return
            if found is None:  # (and the connection closes: its body is never read)
                await problem("unauthorized", UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer", **CLOSE})(
                    scope, receive, send)
                return
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
                await problem("too_large", f"the body may be at most {MAX_BODY} bytes")(scope, receive, send)
                return
            received = 0

            async def bounded() -> dict:
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > MAX_BODY:
                    raise Problem("too_large", f"the body may be at most {MAX_BODY} bytes")
                return message
            await self.app(scope, bounded, send)
            return
        await self.app(scope, receive, send)


UNAUTHORIZED = "send Authorization: Bearer <token> (see `sealgate token issue`)"


def _bearer(authorization: str, store: SecretStore) -> tokens.Token | None:
    kind, _, token = authorization.partition(" ")
    return tokens.check(store, token.strip()) if kind.lower() == "bearer" else None


def problem(code: str, detail: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    status, title = PROBLEMS[code]
    if code == "too_large":  # and the connection closes: the rest of that body is never read
        headers = {**(headers or {}), **CLOSE}
    body = {"type": TYPE_BASE + code, "title": title, "status": status, "detail": detail, "code": code}
    if field:
        body["field"] = field
    return JSONResponse(body, status, headers=headers, media_type="application/problem+json")


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Scope(BaseModel):
    """A secret's scope beyond its origins (each field as the CLI's flag of the same name)."""

    methods: list[str] | None = None
    paths: list[str] | None = None
    inject: list[str] | None = None
    on_disallowed: str | None = None
    cap: str | None = None
    rate: str | None = None


class ScopeIn(_Scope, _Input):
    def scope(self):
        """As the CLI's scope: lists joined as its comma-separated flags are."""
        lists = {k: ",".join(v) if v is not None else None for k, v in
                 (("methods", self.methods), ("paths", self.paths), ("inject", self.inject))}
        return commands.parse_scope(**lists, on_disallowed=self.on_disallowed, cap=self.cap, rate=self.rate)


class SecretReplace(ScopeIn):
    value: str = Field(repr=False)
    origins: list[str]
    allow_http: bool = False
    sign: str | None = None  # hmac-sha256 | aws-sigv4 (set when added, kept after)
    sign_header: str | None = None
    region: str | None = None
    service: str | None = None

    def signing(self):
        return commands.parse_signing(self.sign, self.sign_header, self.region, self.service)


class SecretIn(SecretReplace):
    name: str


class OriginsIn(_Input):
    origins: list[str]
    allow_http: bool = False


class SessionIn(_Input):
    access: str
    runchat: str
    instance: str
    user: str | None = None
    author: str | None = None
    ttl: int | None = None


class SecretOut(_Scope):
    sign: dict[str, str] | None = None
    name: str
    origins: list[str]
    created_at: str
    updated_at: str
    used: dict[str, str] = {}  # per limit: used/allowed in the current window
    warnings: list[str] = []  # what the CLI warns of (a wildcard origin)


class SessionOut(BaseModel):
    proxy_url: str
    ca_cert: str
    env: dict[str, str]
    expires_at: str
    session_id: str
    principal: str
    access: str


class LinkStartIn(_Input):
    redirect_uri: str


class LinkStartOut(BaseModel):
    authorization_url: str
    state: str
    provider: str
    user: str


class LinkFinishIn(_Input):
    state: str
    code: str = Field(repr=False)


class TokensIn(_Input):
    """A token response, as a platform that ran the consent itself got it."""

    access_token: str = Field(repr=False)
    refresh_token: str | None = Field(default=None, repr=False)
    expires_in: int | None = None
    token_type: str | None = None
    scope: str | None = None


class LinkOut(BaseModel):
    provider: str
    env: str
    status: str
    detail: str | None
    expires_at: str | None
    created_at: str
    updated_at: str


class AuditOut(BaseModel):
    at: str
    session: str
    runchat: str
    instance: str
    principal: str
    client: str | None
    secrets: list[str]
    method: str
    origin: str
    path: str
    decision: str
    code: str | None
    status: int | None


def _origin_text(items: list[str]) -> str:
    """The CLI's comma-separated form; an item holding a comma would be two origins: refused."""
    if not items:
        raise commands.Invalid("origins", "give at least one origin")
    if any("," in o for o in items):
        raise commands.Invalid("origins", "one origin per item (no commas inside one)")
    return ",".join(items)


def create_app(settings: Settings, store: SecretStore) -> FastAPI:
    app = FastAPI(title="sealgate platform API", version="1", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", redirect_slashes=False)

    def scope(needed: str):
        async def check(authorization: Annotated[str | None, Header()] = None) -> tokens.Token:
            """(async: every store call of this process runs on its one event loop thread, one at a time)"""
            found = _bearer(authorization or "", store)
            if found is None:
                raise Problem("unauthorized", UNAUTHORIZED)
            if needed not in found.scopes:
                raise Problem("forbidden", f"token {found.name} lacks the scope {needed}")
            return found
        return Depends(check)

    @app.exception_handler(Problem)
    async def _problem(request: Request, e: Problem) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.code == "unauthorized" else None
        return problem(e.code, e.detail, e.field, headers)

    @app.exception_handler(commands.Invalid)
    async def _invalid(request: Request, e: commands.Invalid) -> JSONResponse:
        return problem("invalid", str(e), e.field)

    @app.exception_handler(StoreError)
    async def _store(request: Request, e: StoreError) -> JSONResponse:
        if isinstance(e, NotFound):
            return problem("not_found", str(e))
        if isinstance(e, Conflict):
            return problem("conflict", str(e))
        return problem("store_unavailable", str(e))

    @app.exception_handler(oauth.TokenUnavailable)
    async def _token_endpoint(request: Request, e: oauth.TokenUnavailable) -> JSONResponse:
        return problem("token_endpoint_failed", str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """FastAPI's and Starlette's own refusals (a body that is not UTF-8, no such route) as problem+json."""
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(e.status_code, "bad_request")
        return problem(code, "no such resource" if code == "not_found" else PROBLEMS[code][1].lower())

    @app.exception_handler(RequestValidationError)
    async def _unreadable(request: Request, e: RequestValidationError) -> JSONResponse:
        """FastAPI's own errors quote the input (a value among it): only where and what kind."""
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return problem("bad_request", "the body is not valid JSON")
        field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return problem("invalid", f"{field or 'the body'}: {first.get('msg', 'invalid')}", field)

    app.add_middleware(Gate, store=store)

    secret_path = "/v1/users/{user}/secrets/{name}"

    @app.post("/v1/users/{user}/secrets", status_code=201, response_model=SecretOut,
              dependencies=[scope("secrets:write")], summary="Add a secret (409 if it exists)")
    async def add_secret(user: str, body: SecretIn) -> Any:
        info, warnings = commands.add_secret(store, user, body.name, body.value, _origin_text(body.origins),
                                             allow_http=body.allow_http, scope=body.scope(), signing=body.signing())
        return shown(info, warnings)

    @app.put(secret_path, response_model=SecretOut, dependencies=[scope("secrets:write")],
             summary="Add or replace a secret's value and origins")
    async def replace_secret(user: str, name: str, body: SecretReplace) -> Any:
        info, warnings = commands.add_secret(store, user, name, body.value, _origin_text(body.origins),
                                             allow_http=body.allow_http, replace=True, scope=body.scope(),
                                             signing=body.signing())
        return shown(info, warnings)

    @app.get("/v1/users/{user}/secrets", response_model=list[SecretOut], dependencies=[scope("secrets:read")],
             summary="A user's secrets: names, origins, times (never a value)")
    async def list_secrets(user: str) -> Any:
        infos = commands.list_secrets(store, user)
        usage = store.usage.of(infos[0].owner) if infos else {}
        return [shown(i, [], usage) for i in infos]

    @app.put(secret_path + "/origins", response_model=SecretOut, dependencies=[scope("secrets:write")],
             summary="Replace a secret's allowed origins")
    async def set_origins(user: str, name: str, body: OriginsIn) -> Any:
        info, warnings = commands.set_origins(store, user, name, _origin_text(body.origins), allow_http=body.allow_http)
        return shown(info, warnings)

    @app.put(secret_path + "/scope", response_model=SecretOut, dependencies=[scope("secrets:write")],
             summary="Replace a secret's scope (methods, paths, inject, on_disallowed, cap, rate; none: no scope)")
    async def set_scope(user: str, name: str, body: ScopeIn) -> Any:
        return shown(commands.set_scope(store, user, name, body.scope() or commands.Scope()), [])

    def shown(info, warnings: list[str], usage: dict | None = None) -> dict:
        return {**commands.secret_json(info), **commands.scope_json(store, info, usage), "warnings": warnings}

    @app.delete(secret_path, status_code=204, dependencies=[scope("secrets:write")], summary="Remove a secret")
    async def remove_secret(user: str, name: str) -> Response:
        commands.remove_secret(store, user, name)
        return Response(status_code=204)

    link_path = "/v1/users/{user}/links/{provider}"

    @app.post(link_path + "/start", response_model=LinkStartOut, dependencies=[scope("secrets:write")],
              summary="Begin linking an account: the authorization URL to send the user to (state, PKCE S256)")
    async def link_start(user: str, provider: str, body: LinkStartIn) -> Any:
        return commands.link_start(store, settings, user=user, provider=provider, redirect_uri=body.redirect_uri)

    @app.post("/v1/links/finish", response_model=LinkOut, dependencies=[scope("secrets:write")],
              summary="Finish linking: exchange the code the redirect URI received")
    async def link_finish(body: LinkFinishIn) -> Any:
        pending, provider = commands.link_begun(store, settings, body.state)
        tokens = await run_in_threadpool(commands.link_exchange, settings, provider, pending, body.code)
        return commands.link_json(commands.link_keep(store, pending.owner, provider.name, tokens))

    @app.put(link_path, response_model=LinkOut, dependencies=[scope("secrets:write")],
             summary="Link an account with tokens the platform got itself (a token response)")
    async def link_add(user: str, provider: str, body: TokensIn) -> Any:
        return commands.link_json(commands.link_add(store, settings, user=user, provider=provider,
                                                    token_json=body.model_dump_json(exclude_none=True).encode()))

    @app.get("/v1/users/{user}/links", response_model=list[LinkOut], dependencies=[scope("secrets:read")],
             summary="A user's linked accounts and their state (never a token)")
    async def link_list(user: str) -> Any:
        return [commands.link_json(i) for i in commands.link_list(store, user)]

    @app.delete(link_path, status_code=204, dependencies=[scope("secrets:write")], summary="Remove a link")
    async def link_remove(user: str, provider: str) -> Response:
        commands.link_remove(store, user, provider)
        return Response(status_code=204)

    @app.post("/v1/sessions", status_code=201, response_model=SessionOut, dependencies=[scope("sessions:write")],
              summary="Issue a worker session: exactly what `sealgate session issue` prints")
    async def issue_session(body: SessionIn) -> Any:
        return commands.issue_session(store, settings, access=body.access, runchat=body.runchat,
                                      instance=body.instance, user=body.user, author=body.author, ttl=body.ttl)

    @app.delete("/v1/sessions/{session_id}", status_code=204, dependencies=[scope("sessions:write")],
                summary="Revoke a session: every proxy refuses it within a second")
    async def revoke_session(session_id: str) -> Response:
        store.revoke_session(session_id)
        return Response(status_code=204)

    @app.get("/v1/audit", response_model=list[AuditOut], dependencies=[scope("audit:read")],
             summary="The audit trail, newest first")
    async def audit(user: str | None = None, runchat: str | None = None, since: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> Any:
        return commands.audit(store, user=user, runchat=runchat, since=since, limit=limit)

    page_headers = {"Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'",
                    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=page_headers)

    @app.get("/app.js", include_in_schema=False)
    async def script() -> FileResponse:
        return FileResponse(STATIC / "app.js", media_type="text/javascript; charset=utf-8", headers=page_headers)

    return app


def serve(settings: Settings, store: SecretStore) -> None:
    """Run the API on settings.api (blocking) until SIGTERM or SIGINT."""
    import uvicorn
    host, port = settings.api
    uvicorn.run(create_app(settings, store), host=host, port=port, log_level="warning", access_log=True,
                server_header=False)
