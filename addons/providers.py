"""The registry of linked-account providers: `config/providers.yaml`, plus the file SEALGATE_PROVIDERS
names, whose entries add providers or override fields of shipped ones (a platform sets its own
`client_id` for `github` without repeating the rest).

Parsed and validated once: a bad entry raises ProviderError naming the file, the provider and the
field. An entry may be incomplete in the shipped file (the generic one, or one without a client id):
it is refused where it is used, saying which field to set and where.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from . import origins, validate

FILE_NAME = "providers.yaml"  # in the config folder, beside sealgate.yaml
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where PyYAML has it: every command reads YAML
_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")  # an HTTP token
REQUIRED = ("origins", "authorize_url", "token_url", "client_id")  # before a provider can be used


class ProviderError(ValueError):
    """A provider entry, or a use of one, that cannot work; says which file, provider and field."""


@dataclass(frozen=True)
class Provider:
    name: str
    origins: tuple[origins.Origin, ...] = ()
    authorize_url: str = ""
    token_url: str = ""
    client_id: str = ""
    client_secret_env: str = ""  # the variable holding the client secret (none: a public client, PKCE only)
    scopes: tuple[str, ...] = ()
    header: str = "Authorization"
    prefix: str = "Bearer "
    scope_separator: str = " "
    authorize_params: tuple[tuple[str, str], ...] = ()  # extra query parameters (Google's access_type=offline)
    where: str = field(default="", compare=False)  # the file(s) it came from, for messages

    @property
    def env_name(self) -> str:
        return env_name(self.name)

    def usable(self) -> Provider:
        """The provider, or ProviderError naming the first field still to set."""
        for name in REQUIRED:
            if not getattr(self, name):
                raise ProviderError(f"provider {self.name} ({self.where}) has no {name}: set it in the file "
                                    "SEALGATE_PROVIDERS names")
        return self


def check_name(text: str) -> str:
    """A provider's name as the registry allows it (ValueError, never quoting more than a short prefix)."""
    if not _NAME.fullmatch(text):
        raise ValueError(f"provider name {text[:40]!r} is invalid: use a lower-case letter, then up to 62 of "
                         "a-z 0-9 _ . -")
    return text


def env_name(provider: str) -> str:
    """How a linked account appears in a session's env: upper case, non-alphanumerics as `_`."""
    return re.sub(r"[^A-Z0-9]", "_", provider.upper())


@dataclass(frozen=True)
class Registry:
    providers: dict[str, Provider] = field(default_factory=dict)

    def get(self, name: str) -> Provider:
        found = self.providers.get(name)
        if found is None:
            known = ", ".join(sorted(self.providers)) or "none"
            raise ProviderError(f"there is no provider {name!r} (known: {known})")
        return found


def load(base: Path | None, extra: Path | None) -> Registry:
    """The shipped file (absent: no shipped providers), then the extra file's entries over it."""
    found: dict[str, Provider] = {}
    for path, required in ((base, False), (extra, True)):
        if path is None:
            continue
        for name, entry in _read(path, required).items():
            found[name] = _entry(path, name, entry, found.get(name))
    by_env: dict[str, str] = {}
    for p in found.values():
        if (other := by_env.setdefault(p.env_name, p.name)) != p.name:
            raise ProviderError(f"{p.where}: providers {other} and {p.name} would both appear as {p.env_name}")
    return Registry(found)


def _read(path: Path, required: bool) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=SAFE_LOADER)
    except FileNotFoundError:
        if not required:
            return {}
        raise ProviderError(f"{path}: providers file not found") from None
    except OSError as e:
        raise ProviderError(f"{path}: cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ProviderError(f"{path}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    if not isinstance(data, dict) or set(data) != {"providers"} or not isinstance(data["providers"], dict):
        raise ProviderError(f"{path}: must hold one key, providers, a mapping of provider names to entries")
    return data["providers"]


def _entry(path: Path, name: Any, entry: Any, base: Provider | None) -> Provider:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ProviderError(f"{path}: provider name {str(name)[:40]!r} is invalid: use a lower-case letter, then up "
                            "to 62 of a-z 0-9 _ . -")
    try:
        validate.secret_name(env_name(name))
    except ValueError:
        raise ProviderError(f"{path}: provider {name} would appear as {env_name(name)}, which is not a usable "
                            "name") from None
    if not isinstance(entry, dict):
        raise ProviderError(f"{path}: provider {name}: must be a mapping of fields")
    known = {f.name for f in fields(Provider)} - {"name", "where"}
    values: dict[str, Any] = {}
    for key, raw in entry.items():
        if key not in known:
            raise ProviderError(f"{path}: provider {name}: unknown field {key!r} (known: {', '.join(sorted(known))})")
        try:
            values[key] = _PARSERS[key](raw)
        except (ValueError, TypeError) as e:
            raise ProviderError(f"{path}: provider {name}, field {key}: {e}") from None
    where = f"{base.where}, {path}" if base else str(path)
    return replace(base or Provider(name), **values, where=where)


def _text(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError("must be text")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise ValueError("holds a control character")
    return raw


def _list(raw: Any) -> list[str]:
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list):
        raise ValueError("must be a list (or comma-separated text)")
    return [_text(i).strip() for i in items if _text(i).strip()]


def _https_url(raw: Any) -> str:
    text = _text(raw)
    if not text:
        return ""
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{text!r} must be an https:// URL without user info or fragment")
    origins.normalise_host(parts.hostname)
    return text


def _origins(raw: Any) -> tuple[origins.Origin, ...]:
    return tuple(origins.parse(o) for o in _list(raw))  # https only


def _matching(pattern: re.Pattern[str], what: str, *, empty: bool = True):
    def parse(raw: Any) -> str:
        text = _text(raw)
        if (text or not empty) and not pattern.fullmatch(text):
            raise ValueError(f"{text!r} is not {what}")
        return text
    return parse


def _client_secret_env(raw: Any) -> str:
    """A variable's name; none of sealgate's own settings (its master key, its store URL) can be named."""
    text = _matching(_ENV_VAR, "an environment variable name")(raw)
    if text.upper().startswith("SEALGATE_") and not text.upper().endswith("_CLIENT_SECRET"):
        raise ValueError(f"{text!r} is one of sealgate's own settings (a SEALGATE_ name must end in _CLIENT_SECRET)")
    return text


def _params(raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        raise ValueError("must be a mapping of query parameters to values")
    return tuple((_text(k), _text(str(v))) for k, v in raw.items())


_PARSERS = {
    "origins": _origins,
    "authorize_url": _https_url,
    "token_url": _https_url,
    "client_id": _text,
    "client_secret_env": _client_secret_env,
    "scopes": lambda raw: tuple(_list(raw)),
    "header": _matching(_HEADER, "a header name", empty=False),
    "prefix": _text,
    "scope_separator": _text,
    "authorize_params": _params,
}
