"""Request signing that sealgate applies on the way out: plain HMAC-SHA256 and AWS SigV4.

Pure functions only (no mitmproxy, no I/O), so AWS's published test vectors can pin each
rule (tests/test_signing.py). Text arguments are the request as mitmproxy hands it
over: bytes that are not UTF-8 arrive as surrogate escapes and are signed as the raw bytes
they stand for, so the signature covers exactly what goes on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, unquote_to_bytes

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
"""What S3 accepts in place of a payload hash, for bodies the proxy streams without reading."""

_ALGORITHM = "AWS4-HMAC-SHA256"
_ACCESS_KEY_ID = re.compile(r"[A-Z0-9]{16,128}")
# What AWS's own signer (aws-c-auth) collapses in header values; a folded header line
# reaches us with its line break still in the value (vector get-header-value-multiline).
_WHITESPACE_RUN = re.compile(r"[ \t\n\v\f\r]+")


def hmac_sha256_hex(key: str, body: bytes) -> str:
    """Lowercase hex HMAC-SHA256 of `body`, the form webhook-style APIs expect in a header."""
    return hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class SigV4Key:
    """AWS credentials; the secret stays out of repr so logs and tracebacks never show it."""

    access_key_id: str
    secret_access_key: str = field(repr=False)


def parse_sigv4_value(value: str) -> SigV4Key:
    """Read a stored secret of the form ACCESS_KEY_ID:SECRET_ACCESS_KEY.

    Errors describe what is wrong without quoting either part: a malformed value may hold
    the secret anywhere (no colon, or the two parts swapped).
    """
    access_key_id, colon, secret = value.partition(":")
    if not colon:
        raise ValueError("SigV4 value must be ACCESS_KEY_ID:SECRET_ACCESS_KEY (no colon found)")
    if not access_key_id or not secret:
        raise ValueError("SigV4 value has an empty access key id or secret access key")
    if not _ACCESS_KEY_ID.fullmatch(access_key_id):
        raise ValueError(
            "SigV4 access key id must be 16-128 characters of A-Z and 0-9 "
            f"(got {len(access_key_id)} characters)"
        )
    if any(c.isspace() or not c.isprintable() for c in secret):
        raise ValueError("SigV4 secret access key contains whitespace or control characters")
    return SigV4Key(access_key_id, secret)


def payload_hash(body: bytes) -> str:
    """Lowercase hex SHA-256 of the body, as SigV4 and x-amz-content-sha256 carry it."""
    return hashlib.sha256(body).hexdigest()


def signed_header_names(headers: Sequence[tuple[str, str]]) -> list[str]:
    """The headers sealgate signs: host and every x-amz-* header.

    These are the ones AWS requires signed (date, token, content hash among them); leaving
    the rest out keeps the signature valid when a client or a later hop rewrites ordinary
    headers such as user-agent or accept-encoding.
    """
    names = {name.lower() for name, _ in headers}
    return sorted({"host"} | {name for name in names if name.startswith("x-amz-")})


def canonical_request(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    signed_headers: Sequence[str],
    payload_hash: str,
    *,
    service: str,
) -> str:
    """SigV4 step 1: the canonical form of the request, which both sides hash and sign.

    `target` is the request target as sent (path and optional ?query). A signed header
    missing from `headers` is a ValueError: signing a value the server never sees fails
    at the server with an opaque SignatureDoesNotMatch.
    """
    path, _, query = target.partition("?")
    names = _header_names(signed_headers)
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(_WHITESPACE_RUN.sub(" ", value).strip(" "))
    missing = [name for name in names if name not in values]
    if missing:
        raise ValueError(f"signed headers missing from the request: {', '.join(missing)}")
    header_block = "".join(f"{name}:{','.join(values[name])}\n" for name in names)
    return "\n".join(
        [
            method,
            _canonical_uri(path, service),
            _canonical_query(query),
            header_block,
            ";".join(names),
            payload_hash,
        ]
    )


def string_to_sign(amz_date: str, credential_scope: str, canonical_request: str) -> str:
    """SigV4 step 2: what the derived key signs, binding the request to its date and scope."""
    digest = hashlib.sha256(_wire(canonical_request)).hexdigest()
    return f"{_ALGORITHM}\n{amz_date}\n{credential_scope}\n{digest}"


def sigv4_authorization(
    key: SigV4Key,
    *,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    payload_hash: str,
    region: str,
    service: str,
    amz_date: str,
    signed_headers: Sequence[str] | None = None,
) -> tuple[str, str]:
    """Sign a request; return (Authorization header value, signature hex).

    `amz_date` (YYYYMMDDTHHMMSSZ) must equal the request's x-amz-date header, which the
    caller sets. `signed_headers` defaults to signed_header_names(headers).
    """
    if signed_headers is None:
        signed_headers = signed_header_names(headers)
    names = _header_names(signed_headers)
    date = amz_date[:8]
    scope = f"{date}/{region}/{service}/aws4_request"
    creq = canonical_request(method, target, headers, names, payload_hash, service=service)
    signing_key = ("AWS4" + key.secret_access_key).encode()
    for part in (date, region, service, "aws4_request"):
        signing_key = hmac.digest(signing_key, part.encode(), "sha256")
    signature = hmac.new(
        signing_key, string_to_sign(amz_date, scope, creq).encode(), hashlib.sha256
    ).hexdigest()
    authorization = (
        f"{_ALGORITHM} Credential={key.access_key_id}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return authorization, signature


def _header_names(names: Sequence[str]) -> list[str]:
    """Signed header names as SigV4 lists them: lower case, sorted, each once."""
    return sorted({name.lower() for name in names})


def _wire(text: str) -> bytes:
    """The bytes `text` stood for on the wire (mitmproxy decodes UTF-8 with surrogateescape)."""
    return text.encode("utf-8", "surrogateescape")


def _canonical_uri(path: str, service: str) -> str:
    """URI-encode the path as AWS does: S3 once, after decoding; every other service twice.

    S3 keys are literal, so its paths are neither normalised nor double-encoded
    ("my-object//example//photo.user" is a distinct key). Other services normalise the path
    and encode it as sent, so an already-encoded "%20" is signed as "%2520".
    """
    if service == "s3":
        return quote(unquote_to_bytes(_wire(path)), safe="/")
    return quote(_wire(_remove_dot_segments(path)), safe="/")


def _remove_dot_segments(path: str) -> str:
    """Drop '.', '..' and empty segments, keeping a trailing slash, as the AWS vectors do."""
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    trailing = "/" if segments and path.endswith("/") else ""
    return "/" + "/".join(segments) + trailing


def _canonical_query(query: str) -> str:
    """Decode then re-encode each name and value, so any client spelling signs the same."""
    pairs = sorted(
        (_encode_component(name), _encode_component(value))
        for name, _, value in (param.partition("=") for param in query.split("&") if param)
    )
    return "&".join(f"{name}={value}" for name, value in pairs)


def _encode_component(text: str) -> str:
    """AWS UriEncode of one query name or value: everything but A-Za-z0-9-._~ as %XX."""
    return quote(unquote_to_bytes(_wire(text)), safe="")
