"""`sealgate secret check`: what the platform's docs advise (minimum scope, narrow origins), checked and
explained (pure: the secrets and the origins the audit trail saw them used at are passed in).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from . import origins
from .store import SecretInfo

MANY_ORIGINS = 5  # more than this: probably not one API's key
UNUSED_DAYS = 30


@dataclass(frozen=True)
class Warning:
    owner: str
    name: str
    text: str

    def __str__(self) -> str:
        return f"{self.owner}/{self.name}: {self.text}"


def check(infos: Iterable[SecretInfo], used: set[tuple[str, str, str]] | None) -> list[Warning]:
    """Warnings for each secret. used: (owner, name, origin) the audit trail saw a value go to in the last
    UNUSED_DAYS days, or None when there is no trail to judge by."""
    out: list[Warning] = []
    for info in infos:
        def warn(text: str, info: SecretInfo = info) -> None:
            out.append(Warning(info.owner, info.name, text))
        for o in info.origins:
            if o.is_wildcard:
                warn(f"{o} allows every subdomain of {o.host[2:]}: list the exact hosts the key is for")
            if o.scheme == "http":
                warn(f"{o} is http: the value crosses the network in clear")
            if origins.is_ip(o.host):
                warn(f"{o} is an IP address: it names no one, and its owner may change; use the API's host name")
        if len(info.origins) > MANY_ORIGINS:
            warn(f"{len(info.origins)} allowed origins: a key for one API needs one or two")
        s = info.scope
        if s.methods is None and s.paths is None and s.inject is None:
            warn("no scope beyond its origins: add --inject headers (most API keys go in a header), and "
                 "--methods or --paths where the key needs only some of the API")
        if s.cap is None and s.rate is None:
            warn("no cap or rate: a runaway run can spend without limit (--cap 1000/day, --rate 5/s)")
        if used is not None:
            for o in info.origins:
                if not o.is_wildcard and (info.owner, info.name, str(o)) not in used:
                    warn(f"{o}: no request used it in {UNUSED_DAYS} days; remove it if nothing needs it")
    return out


