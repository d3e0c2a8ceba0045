"""A secret's scope beyond its origins (pure): which methods may carry it, under which paths, where in a
request it may be substituted, and what a request to a destination it does not allow gets.

Paths are matched on the normalised path: percent-encoded unreserved characters (`.` among them) decoded
first; a path that then holds a `.` or `..` segment or an empty one (`//`), an encoded slash or a
backslash, a `;` path parameter, a `#` or an encoded `%` is under no prefix at all, so `/v1/models/../admin`,
`/v1/models/%2e%2e/admin`, `/v1/models//x`, `/v1/models/%2F..%2Fadmin`, `/v1/models/..;/admin` and
`/v1/models/%252e%252e/admin` never pass as `/v1/models/...`. A request that claims another method or path
(X-HTTP-Method-Override and its kin, X-Original-URL, `_method=`) never carries a secret scoped by either.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from . import signing

LOCATIONS = ("headers", "query", "body")  # query: the whole URL (path and query string)
WINDOWS = {"s": 1, "second": 1, "minute": 60, "m": 60, "hour": 3600, "h": 3600, "day": 86400, "d": 86400}
POLICIES = ("block", "forward")
_METHOD = re.compile(r"[A-Z][A-Z-]{0,19}")
_UNRESERVED = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")  # A-Z a-z 0-9 - . _ ~
_AMBIGUOUS = re.compile(r"%2[fF]|%5[cC]|\\|;|#|%25")
# an encoded slash, a backslash, a path parameter (`..;` is `..` to Tomcat and Jetty), a fragment (some servers
# clean the path after it), an encoded percent (decoded twice by some gateways): servers differ on what they
# mean, so a path that holds one is under no prefix
OVERRIDES = ("x-http-method-override", "x-http-method", "x-method-override", "x-original-url", "x-rewrite-url")
# headers (and the query parameter _method) by which frameworks let a request claim another method or path


SIGNERS = ("hmac-sha256", "aws-sigv4")
_REGION = re.compile(r"[a-z0-9-]{1,32}")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
BASIC, TRAILER = "(basic auth)", "(trailer)"  # header sites that are not a header value of the head


@dataclass(frozen=True)
class Signing:
    """A secret that signs requests instead of going in them: its value never leaves the proxy."""

    kind: str  # hmac-sha256 | aws-sigv4
    header: str | None = None  # hmac-sha256: the one header its placeholder may stand in
    region: str | None = None  # aws-sigv4
    service: str | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in (("kind", self.kind), ("header", self.header), ("region", self.region),
                                  ("service", self.service)) if v}

    def describe(self) -> str:
        return " ".join([f"sign={self.kind}"] + [f"{k}={v}" for k, v in self.as_dict().items() if k != "kind"])

    def denied(self, name: str, locations: frozenset[str], sites: frozenset[tuple[str, bool]], buffered: bool,
               ) -> tuple[str, str] | None:
        """(code, why) when this request cannot be signed with the secret: its placeholder stands where the
        signature cannot go, or the body it must cover streams past before it could be hashed."""
        if outside := sorted(locations - {"headers"}):
            return "scope_denied", (f"{name} only signs requests; its placeholder may stand in a header, not in "
                                    f"the {', '.join(outside)}")
        if self.kind == "aws-sigv4":
            if any(site != ("authorization", True) for site in sites):
                return "scope_denied", (f"{name} signs with AWS SigV4: its placeholder must be the whole "
                                        "Authorization header and stand nowhere else")
            if not buffered and self.service != "s3":
                return "unsignable_request", (f"{name} signs the body, which streams (over 16 MiB, or of unknown "
                                              f"length); only service s3 accepts UNSIGNED-PAYLOAD, not {self.service}")
            return None
        if bad := sorted(h for h, _ in sites if h in (BASIC, TRAILER) or (self.header and h != self.header.lower())):
            return "scope_denied", (f"{name} signs with HMAC-SHA256; its placeholder may stand only in "
                                    f"{self.header or 'a header of the request head'}, not in {bad[0]}")
        if not buffered:
            return "unsignable_request", (f"{name} signs the body with HMAC-SHA256, and a body that streams (over "
                                          "16 MiB, or of unknown length) cannot be hashed before its head goes out: "
                                          "send it with a Content-Length of at most 16 MiB")
        return None

    def parts(self, value: str) -> list[str]:
        """What of the value is kept out of responses besides the whole: an AWS key's two halves."""
        if self.kind != "aws-sigv4":
            return []
        key = signing.parse_sigv4_value(value)
        return [key.access_key_id, key.secret_access_key]


def parse_signing(kind: str, header: str | None = None, region: str | None = None,
                  service: str | None = None) -> Signing:
    if kind not in SIGNERS:
        raise ValueError(f"{kind!r} is not a way to sign (one of {', '.join(SIGNERS)})")
    if kind == "aws-sigv4":
        if header:
            raise ValueError("--sign-header is for hmac-sha256; aws-sigv4 signs the Authorization header")
        for what, text in (("region", region), ("service", service)):
            if not text or not _REGION.fullmatch(text):
                raise ValueError(f"aws-sigv4 needs --{what} (lower-case letters, digits and -), e.g. "
                                 f"{'us-east-1' if what == 'region' else 's3'}")
        return Signing(kind, None, region, service)
    if region or service:
        raise ValueError("--region and --service are for aws-sigv4")
    if header is not None and not _HEADER.fullmatch(header):
        raise ValueError(f"{header!r} is not a header name")
    return Signing(kind, header)


@dataclass(frozen=True)
class Scope:
    methods: frozenset[str] | None = None  # None: any
    paths: tuple[str, ...] | None = None
    inject: frozenset[str] | None = None
    on_disallowed: str | None = None  # None: the proxy's default
    cap: Limit | None = None  # requests per minute, hour or day
    rate: Limit | None = None  # requests per second (or any window)
    sign: Signing | None = None  # the value signs requests, never goes in one

    def limits(self) -> list[tuple[str, Limit]]:
        return [(kind, limit) for kind, limit in (("cap", self.cap), ("rate", self.rate)) if limit]

    def to_json(self) -> str | None:
        """As stored (sealed with the row); None for a secret with no scope beyond its origins."""
        data = {k: v for k, v in (("methods", sorted(self.methods) if self.methods else None),
                                  ("paths", list(self.paths) if self.paths else None),
                                  ("inject", sorted(self.inject) if self.inject else None),
                                  ("on_disallowed", self.on_disallowed),
                                  ("cap", self.cap and self.cap.text), ("rate", self.rate and self.rate.text),
                                  ("sign", self.sign and self.sign.as_dict())) if v}
        return json.dumps(data, sort_keys=True) if data else None

    @classmethod
    def from_json(cls, text: str | None) -> Scope:
        data = json.loads(text) if text else {}
        return cls(frozenset(data["methods"]) if "methods" in data else None,
                   tuple(data["paths"]) if "paths" in data else None,
                   frozenset(data["inject"]) if "inject" in data else None, data.get("on_disallowed"),
                   parse_limit(data["cap"]) if "cap" in data else None,
                   parse_limit(data["rate"]) if "rate" in data else None,
                   Signing(**data["sign"]) if "sign" in data else None)

    def describe(self) -> str:
        parts = [f"methods={','.join(sorted(self.methods))}" if self.methods else "",
                 f"paths={','.join(self.paths)}" if self.paths else "",
                 f"inject={','.join(sorted(self.inject))}" if self.inject else "",
                 f"on-disallowed={self.on_disallowed}" if self.on_disallowed else "",
                 f"cap={self.cap.text}" if self.cap else "", f"rate={self.rate.text}" if self.rate else "",
                 self.sign.describe() if self.sign else ""]
        return " ".join(p for p in parts if p) or "-"

    def denied(self, method: str, raw_path: str, locations: frozenset[str], overrides: tuple[str, ...] = ()
               ) -> str | None:
        """Why this request may not carry the secret, or None. overrides: what in the request claims another
        method or path (OVERRIDES present, or _method in the query)."""
        if (self.methods is not None or self.paths is not None) and overrides:
            return f"it carries {overrides[0]}, which could make it another method or path than the one checked"
        if self.methods is not None and method.upper() not in self.methods:
            return f"method {method} is not one of {', '.join(sorted(self.methods))}"
        if self.paths is not None and not path_allowed(self.paths, raw_path):
            return f"the path is not under {', '.join(self.paths)}"
        if self.inject is not None and (outside := sorted(locations - self.inject)):
            return f"it may be substituted only in {', '.join(sorted(self.inject))}, not in {', '.join(outside)}"
        return None


@dataclass(frozen=True)
class Limit:
    """At most `count` requests carrying the secret per fixed window of `seconds`."""

    count: int
    seconds: int
    text: str  # as given: 1000/day

    def window(self, now: float) -> tuple[float, float]:
        """This window's start, and the seconds until the next one."""
        start = now - now % self.seconds
        return start, start + self.seconds - now


def parse_limit(text: str) -> Limit:
    count, _, per = text.strip().partition("/")
    if not (count.isascii() and count.isdigit()) or int(count) < 1 or per not in WINDOWS:
        raise ValueError(f"{text!r} is not a limit like 1000/day or 5/s (windows: s, minute, hour, day)")
    return Limit(int(count), WINDOWS[per], f"{int(count)}/{per}")


def _items(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what} is empty")
    return items


def parse_methods(text: str) -> frozenset[str]:
    methods = [m.upper() for m in _items(text, "the method list")]
    if bad := [m for m in methods if not _METHOD.fullmatch(m)]:
        raise ValueError(f"{bad[0]!r} is not an HTTP method")
    return frozenset(methods)


def parse_paths(text: str) -> tuple[str, ...]:
    paths = _items(text, "the path list")
    for p in paths:
        if not p.startswith("/") or normalised_path(p) != p or "?" in p or "#" in p:
            raise ValueError(f"{p!r} is not a plain path prefix (starting with /, no . or .. or // segments, "
                             "no query)")
    return tuple(dict.fromkeys(paths))


def parse_inject(text: str) -> frozenset[str]:
    where = _items(text, "the inject list")
    if bad := [w for w in where if w not in LOCATIONS]:
        raise ValueError(f"{bad[0]!r} is not a place to substitute (one of {', '.join(LOCATIONS)})")
    return frozenset(where)


def parse_on_disallowed(text: str) -> str:
    if text not in POLICIES:
        raise ValueError(f"{text!r} must be one of {', '.join(POLICIES)}")
    return text


def normalised_path(raw: str) -> str | None:
    """The path without its query, percent-encoded unreserved characters (`.` among them) decoded; None if
    it then holds a `.`, `..` or empty segment, or anything of _AMBIGUOUS (a trick, or a path no prefix
    should match: what the upstream makes of it may not be what sealgate checked)."""
    path = raw.split("?", 1)[0]
    if _AMBIGUOUS.search(path):
        return None
    path = _UNRESERVED.sub(lambda m: chr(int(m.group(1), 16)), path)
    segments = path.split("/")[1:]
    if not path.startswith("/") or any(s in ("", ".", "..") for s in segments[:-1]) or segments[-1] in (".", ".."):
        return None
    return path


def path_allowed(prefixes: tuple[str, ...], raw_path: str) -> bool:
    """Under one of the prefixes, segment by segment (`/v1/models` covers `/v1/models/x`, not `/v1/modelsx`)."""
    path = normalised_path(raw_path)
    if path is None:
        return False
    return any(path == p or path.startswith(p if p.endswith("/") else p + "/") for p in prefixes)
