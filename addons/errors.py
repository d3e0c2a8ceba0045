"""Every refusal sealgate makes, as a value with a stable code, rendered in one place.

A `Refusal` names the secret and the destination, never a value. The addon renders it
as RFC 9457 problem+json; the CLI prints its detail as one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

TYPE_BASE = "urn:sealgate:error:"  # a URN: no web page we would have to keep up

# code -> (HTTP status, title)
CODES: dict[str, tuple[int, str]] = {
    "proxy_auth_required": (407, "Proxy authentication required"),
    "origin_not_allowed": (403, "Destination not allowed for this secret"),
    "unknown_placeholder": (403, "Unknown placeholder"),
    "host_mismatch": (403, "Host header or SNI disagrees with the destination"),
    "insecure_upstream": (403, "Refusing to send a secret over an unverified connection"),
    "destination_blocked": (403, "Destination blocked by egress policy"),
    "destination_unresolved": (502, "Destination host name could not be resolved"),
    "scope_denied": (403, "Request outside the secret's scope"),
    "unreadable_body": (400, "Request body cannot be read"),
    "rate_limited": (429, "Rate limit reached"),
    "unsignable_request": (413, "Request body cannot be signed before it goes out"),
    "link_refresh_failed": (502, "The linked account's token could not be refreshed"),
    "internal_error": (500, "sealgate could not check this request"),
    "unscrubbable_response": (502, "Response cannot be checked for secret values"),
    "store_unavailable": (503, "Secret store unavailable"),
    "bad_request": (400, "The request could not be read"),
    "upstream_failed": (502, "The upstream failed; what it sent is not shown"),
    "upstream_timeout": (504, "The upstream did not answer in time"),
    "too_many_connections": (429, "This session has too many connections open"),
    "proxy_busy": (503, "The proxy has as many connections as it takes"),
    "request_head_too_large": (431, "Request head too large"),
}


def error_page(status: int) -> Refusal:
    """sealgate's answer where mitmproxy would send its own error page, which may quote what the
    upstream sent (a malformed status line, say): this quotes nothing."""
    if status < 500:
        return Refusal("bad_request", "the request could not be read as HTTP")
    if status == 504:
        return Refusal("upstream_timeout", "the upstream did not answer in time")
    return Refusal("upstream_failed", "the upstream connection failed or sent something that is not valid HTTP")


class StoreError(Exception):
    """The store, its key or a record in it cannot be read or written; says which."""


class StoreBusy(StoreError):
    """Another process holds the store's write lock (SQLite): a write that did not wait for it is tried again."""


class NotFound(StoreError):
    """What was named does not exist (the API answers 404)."""


class Conflict(StoreError):
    """What was to be made exists already (the API answers 409)."""


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: a stable `code` and a sentence for a person."""

    code: str
    detail: str
    retry_after: int | None = None  # seconds (rate_limited)

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown refusal code {self.code!r}")

    @property
    def status(self) -> int:
        return CODES[self.code][0]

    @property
    def title(self) -> str:
        return CODES[self.code][1]

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"

    def problem_json(self) -> bytes:
        """The RFC 9457 body for this refusal."""
        return json.dumps(
            {
                "type": TYPE_BASE + self.code,
                "title": self.title,
                "status": self.status,
                "detail": self.detail,
                "code": self.code,
            }
        ).encode()

    def http_response(self) -> bytes:
        """The refusal as a whole HTTP/1.1 response that closes the connection (where no flow exists to answer)."""
        body = self.problem_json()
        head = [f"HTTP/1.1 {self.status} {self.title}", *(f"{k}: {v}" for k, v in self.headers().items()),
                f"Content-Length: {len(body)}", "Connection: close"]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/problem+json", "X-Sealgate-Error": self.code}
        if self.code == "proxy_auth_required":
            h["Proxy-Authenticate"] = 'Basic realm="sealgate"'
        if self.retry_after is not None:
            h["Retry-After"] = str(self.retry_after)
        return h
