"""Substitute values for placeholders with the escaping each context needs (pure).

A value is validated when added (no control characters), and escaped here for where it
lands: a header takes it as is, a URL percent-encodes it, a form uses form encoding, a
JSON string JSON-escapes it. So a value can never split a header or leave a JSON string
or a query parameter. `derived_forms` lists the byte strings sealgate itself writes for a
value: exact forms, kept out of log lines (responses are scrubbed of every common encoding
of a value by `scrub.Scrubber.add_value`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from enum import Enum
from urllib.parse import quote, quote_plus

from . import placeholders
from .placeholders import Found


class Context(Enum):
    HEADER = "header"
    URL = "url"
    FORM = "form"
    JSON = "json"
    RAW = "raw"


_ESCAPERS: dict[Context, Callable[[str], str]] = {
    Context.HEADER: lambda v: v,
    Context.URL: lambda v: quote(v, safe=""),
    Context.FORM: lambda v: quote_plus(v, safe=""),
    Context.JSON: lambda v: json.dumps(v, ensure_ascii=False)[1:-1],
    Context.RAW: lambda v: v,
}


def escape(value: str, context: Context) -> bytes:
    return _ESCAPERS[context](value).encode("utf-8")


def substitute(data: bytes, found: list[Found], values: Mapping[str, str], context: Context) -> bytes:
    """data with each found placeholder replaced by its value escaped for context (one without a value, a
    forwarded one, stays as it is)."""
    out: list[bytes] = []
    pos = 0
    for f in found:
        out.append(data[pos : f.start])
        value = values.get(f.placeholder.text)
        out.append(data[f.start : f.end] if value is None else escape(value, context))
        pos = f.end
    out.append(data[pos:])
    return b"".join(out)


def body_context(content_type: str, body: bytes) -> Context:
    """Where a placeholder in a body lands: JSON and form bodies need escaping."""
    ct = content_type.split(";", 1)[0].strip().lower()
    if ct == "application/json" or ct.endswith("+json"):
        return Context.JSON
    if ct == "application/x-www-form-urlencoded":
        return Context.FORM
    if ct.startswith("multipart/"):
        return Context.RAW
    if body.lstrip()[:1] in (b"{", b"["):
        return Context.JSON  # JSON sent as text/plain or without a type
    return Context.RAW


def decode_basic(header_value: str) -> bytes | None:
    """The decoded `user:pass` of a Basic Authorization value, or None."""
    scheme, _, token = header_value.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        return base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def encode_basic(credentials: bytes) -> str:
    return "Basic " + base64.b64encode(credentials).decode("ascii")


def derived_forms(value: str, placeholder: str) -> list[tuple[bytes, bytes]]:
    """(what sealgate may have produced from value, what to show instead) pairs: the exact byte
    strings `substitute` writes, for `Scrubber.add`. To scrub responses, `Scrubber.add_value`
    (value, placeholder) finds these and every other common encoding of the value (any mixture
    of per-character escapes, base64 at any alignment, hex)."""
    pairs = {escape(value, c): placeholder.encode() for c in Context}
    pairs[json.dumps(value)[1:-1].encode()] = placeholder.encode()  # JSON with non-ASCII as \\uXXXX
    return list(pairs.items())


def find_in_basic(header_value: str) -> tuple[bytes, list[Found]] | None:
    """Placeholders inside a Basic Authorization value (decoded), if any."""
    decoded = decode_basic(header_value)
    if decoded is None:
        return None
    found = placeholders.find(decoded)
    return (decoded, found) if found else None
