"""The OAuth 2.0 client of linked accounts: authorization URLs with PKCE (S256, RFC 7636), and the
token endpoint's authorization_code and refresh_token grants (RFC 6749), posted by `outbound`.

A provider that says no (invalid_grant: revoked, expired, spent) raises TokenRefused with its error
code; one that cannot be reached or answers something unusable raises TokenUnavailable. Neither
quotes what the provider sent beyond a short error code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import ssl
import time
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode

from . import outbound, validate
from .egress import EgressPolicy
from .links import Tokens
from .outbound import Reply
from .providers import Provider, ProviderError

Post = Callable[[str, bytes, list[tuple[str, str]]], Reply]  # url, form body, headers -> the answer
GRANT_REVOKED = frozenset({"invalid_grant", "invalid_refresh_token", "bad_refresh_token"})
# what says the refresh token itself is bad (RFC 6749; Slack's; GitHub's): only these break a link
ERROR_CODES = GRANT_REVOKED | {"invalid_request", "invalid_client", "unauthorized_client", "unsupported_grant_type",
                               "invalid_scope", "access_denied", "server_error", "temporarily_unavailable",
                               "token_revoked", "bad_verification_code", "incorrect_client_credentials"}
# the codes a refusal names (RFC 6749 5.2; Slack's and GitHub's); any other is "refused": a token endpoint's
# `error` goes to the worker and `link list`, and could be anything, a token among them
MAX_EXPIRES_IN = 10 * 366 * 86400  # seconds; a token said to last longer is taken as lasting this long


class TokenRefused(Exception):
    """The provider refused the grant; `code` is its error code (invalid_grant, ...)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code

    @property
    def revoked(self) -> bool:
        """The grant itself is bad (revoked, expired, spent): linking again is the only way on. Other codes
        (invalid_client, temporarily_unavailable, ...) may pass."""
        return self.code in GRANT_REVOKED


class TokenUnavailable(Exception):
    """The token endpoint could not be reached, or its answer used."""


def poster(policy: EgressPolicy, context: ssl.SSLContext) -> Post:
    """How sealgate reaches a token endpoint: https only, the proxy's egress policy and trust."""
    def post(url: str, body: bytes, headers: list[tuple[str, str]]) -> Reply:
        try:
            return outbound.post_form(url, body, headers, policy=policy, context=context)
        except outbound.OutboundError as e:
            raise TokenUnavailable(str(e)) from None
    return post


def pkce() -> tuple[str, str]:
    """A verifier and its S256 challenge."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorization_url(p: Provider, redirect_uri: str, state: str, challenge: str) -> str:
    query = [("response_type", "code"), ("client_id", p.client_id), ("redirect_uri", redirect_uri),
             ("state", state), ("code_challenge", challenge), ("code_challenge_method", "S256")]
    if p.scopes:
        query.append(("scope", p.scope_separator.join(p.scopes)))
    query += list(p.authorize_params)
    return p.authorize_url + ("&" if "?" in p.authorize_url else "?") + urlencode(query)


def code_grant(p: Provider, code: str, redirect_uri: str, verifier: str, post: Post) -> Tokens:
    return _grant(p, {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                      "code_verifier": verifier}, post, None)


def refresh_grant(p: Provider, refresh_token: str, post: Post) -> Tokens:
    """New tokens; the refresh token kept when the provider does not rotate it."""
    return _grant(p, {"grant_type": "refresh_token", "refresh_token": refresh_token}, post, refresh_token)


def client_secret(p: Provider) -> str | None:
    if not p.client_secret_env:
        return None
    value = os.environ.get(p.client_secret_env)
    if not value:
        raise ProviderError(f"provider {p.name}: the environment variable {p.client_secret_env} (client_secret_env) "
                            "is not set in this process")
    return value


def _grant(p: Provider, form: dict[str, str], post: Post, refresh_token: str | None) -> Tokens:
    p.usable()
    form = {**form, "client_id": p.client_id}
    if (secret := client_secret(p)) is not None:
        form["client_secret"] = secret
    reply = post(p.token_url, urlencode(form).encode(), [("Content-Type", "application/x-www-form-urlencoded"),
                                                         ("Accept", "application/json")])
    return parse_tokens(reply, time.time(), refresh_token)


def parse_tokens(reply: Reply, now: float, refresh_token: str | None) -> Tokens:
    """The tokens of a token endpoint's answer (JSON, or a form as GitHub sends without Accept)."""
    try:
        if "application/x-www-form-urlencoded" in reply.header("content-type"):
            data: object = dict(parse_qsl(reply.body.decode()))
        else:
            data = json.loads(reply.body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise TokenUnavailable(f"the token endpoint answered {reply.status} with something that is not a token "
                               "response")
    error = data.get("error")
    if (reply.status in (400, 401) or reply.status == 200) and error:
        raise TokenRefused(error if isinstance(error, str) and error in ERROR_CODES else "refused")
    if reply.status != 200:
        raise TokenUnavailable(f"the token endpoint answered {reply.status}")
    access, refresh, expires_in = data.get("access_token"), data.get("refresh_token"), data.get("expires_in")
    if not isinstance(access, str) or not _usable(access) or (refresh is not None and (
            not isinstance(refresh, str) or not _usable(refresh))):
        raise TokenUnavailable("the token endpoint's answer holds no usable access_token")
    try:
        expires_at = now + min(max(int(expires_in), 0), MAX_EXPIRES_IN) if expires_in not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        raise TokenUnavailable("the token endpoint's expires_in is not a number of seconds") from None
    return Tokens(access, refresh or refresh_token, expires_at)


def _usable(token: str) -> bool:
    try:
        validate.secret_value(token)
    except ValueError:
        return False
    return True
