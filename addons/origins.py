"""Allowed origins: parse, normalise and match `scheme://host[:port]` (pure, no I/O).

Stored normalised as the web's origin model has it: lower-case host, IDNA as punycode,
no trailing dot, default port dropped. A `*.example.com` wildcard matches strict
subdomains only. Every malformed origin raises `OriginError` saying what is wrong.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

import idna

DEFAULT_PORTS = {"https": 443, "http": 80}
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")  # each used with fullmatch
_DIGITS_OR_HEX = re.compile(r"0x[0-9a-f]*|[0-9]+")
_PORT = re.compile(r"[0-9]{1,5}")


def is_port_text(text: str) -> bool:
    """ASCII digits naming a TCP port (str.isdigit would accept '²', which int() refuses)."""
    return bool(_PORT.fullmatch(text)) and 0 < int(text) < 65536


class OriginError(ValueError):
    """An origin (or a host) that cannot be used, with the reason."""


@dataclass(frozen=True, order=True)
class Origin:
    scheme: str
    host: str  # normalised; IPv6 without brackets; may start with "*." (wildcard)
    port: int

    @property
    def is_wildcard(self) -> bool:
        return self.host.startswith("*.")

    def __str__(self) -> str:
        return serialise(self.scheme, self.host, self.port)

    def matches(self, scheme: str, host: str, port: int) -> bool:
        """True if a request to (scheme, normalised host, port) is to this origin."""
        if scheme != self.scheme or port != self.port:
            return False
        if self.is_wildcard:
            base = self.host[2:]
            return host.endswith("." + base)
        return host == self.host


def bracketed(host: str) -> str:
    """host as it stands in a URL or authority: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def serialise(scheme: str, host: str, port: int) -> str:
    """`scheme://host[:port]` with IPv6 bracketed and the default port left out."""
    if DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{bracketed(host)}"
    return f"{scheme}://{bracketed(host)}:{port}"


HOST_CACHED_MAX = 256  # a host name is at most 253 characters: longer text (a worker's Host header) is not kept


def normalise_host(host: str) -> str:
    """Lower-case, punycode, no trailing dot; IP literals in canonical form.

    Raises OriginError for anything that is not a plain DNS name or IP address,
    including IPv4 written in decimal, hex or octal shorthand. Asked on every request (the destination,
    Host headers, SNI), so the answers for short texts are kept (4096 at most, some 1 MiB).
    """
    return _normalised(host) if len(host) <= HOST_CACHED_MAX else _normalise(host)


def _normalise(host: str) -> str:
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
        try:
            return str(ipaddress.IPv6Address(h))
        except ValueError:
            raise OriginError(f"{host!r} is not a valid IPv6 address") from None
    if ":" in h:
        try:
            return str(ipaddress.IPv6Address(h))
        except ValueError:
            raise OriginError(f"{host!r} is not a valid host") from None
    if h.endswith("."):
        h = h[:-1]
    if not h:
        raise OriginError("the host is empty")
    if not h.isascii():
        try:
            h = idna.encode(h, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise OriginError(f"{host!r} is not a valid internationalised host name: {e}") from None
    h = h.lower()
    labels = h.split(".")
    if all(_DIGITS_OR_HEX.fullmatch(label) for label in labels):
        try:
            return str(ipaddress.IPv4Address(h))
        except ValueError:
            raise OriginError(
                f"{host!r} looks like an IPv4 address in a non-standard form; write it as a dotted quad"
            ) from None
    if _DIGITS_OR_HEX.fullmatch(labels[-1]):
        raise OriginError(f"{host!r} ends in a numeric label and is not a valid host name")
    if len(h) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise OriginError(f"{host!r} is not a valid host name")
    for label in labels:
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError:
                raise OriginError(f"{host!r} has an invalid punycode label {label!r}") from None
    return h


_normalised = functools.lru_cache(maxsize=4096)(_normalise)


def parse(text: str, *, allow_http: bool = False) -> Origin:
    """Parse one origin as a user wrote it; raise OriginError naming the problem."""
    raw = text.strip()
    if not raw:
        raise OriginError("an origin is empty")
    scheme, sep, rest = raw.partition("://")
    if not sep:
        raise OriginError("an origin has no scheme (it is not shown: it may be a value pasted in the wrong place); "
                          "write it as https://host")
    scheme = scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise OriginError(f"{raw!r} has scheme {scheme!r}; only https (and http with --allow-http) are allowed")
    if scheme == "http" and not allow_http:
        raise OriginError(
            f"{raw!r} would send the secret unencrypted; use https, or pass --allow-http to allow plain http"
        )
    if rest.endswith("/") and rest.count("/") == 1:
        rest = rest[:-1]  # "https://api.example.com/" is the origin itself
    for char, what in (("@", "userinfo"), ("/", "a path"), ("?", "a query"), ("#", "a fragment")):
        if char in rest:
            raise OriginError(f"{raw!r} contains {what}; an origin is only scheme://host[:port]")
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise OriginError(f"{raw!r} has an unclosed '[' in its IPv6 address")
        host_part, port_part = rest[: end + 1], rest[end + 1 :]
        if port_part and not port_part.startswith(":"):
            raise OriginError(f"{raw!r} has text after its IPv6 address")
        port_text = port_part[1:] if port_part else None
    else:
        if rest.count(":") > 1:
            raise OriginError(f"{raw!r}: write an IPv6 address in brackets, like https://[::1]:8443")
        host_part, colon, port_text = rest.partition(":")
        port_text = port_text if colon else None
    if port_text is None:
        port = DEFAULT_PORTS[scheme]
    elif not is_port_text(port_text):
        raise OriginError(f"{raw!r} has an invalid port {port_text!r}")
    else:
        port = int(port_text)
    if host_part.startswith("*."):
        base = normalise_host(host_part[2:])
        if base.count(".") < 1 or is_ip(base):
            raise OriginError(f"{raw!r}: a wildcard needs a domain of at least two labels, like *.example.com")
        return Origin(scheme, "*." + base, port)
    if "*" in host_part:
        raise OriginError(f"{raw!r}: a wildcard is only allowed as a leading '*.'")
    return Origin(scheme, normalise_host(host_part), port)


MAX_ORIGINS = 100  # per secret: a key used at more places than this is not scoped at all


def parse_list(text: str, *, allow_http: bool = False) -> list[Origin]:
    """Parse a comma-separated list: at least one origin, duplicates folded, order kept."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise OriginError("at least one allowed origin is required")
    if len(items) > MAX_ORIGINS:
        raise OriginError(f"{len(items)} origins are too many (at most {MAX_ORIGINS}): list the hosts the key is for")
    return list(dict.fromkeys(parse(item, allow_http=allow_http) for item in items))


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
