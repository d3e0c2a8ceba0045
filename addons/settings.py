"""Settings: `DEFAULTS`, then a config file, then SEALGATE_* variables, then flags.

The defaults live here and nowhere else. The config file is the one SEALGATE_CONFIG names,
else `config/sealgate.yaml` under the working directory when there is one; relative paths in
it are relative to its folder, and relative default paths to the working directory (never
to where the package is installed). Parsed and validated once, apart from the mechanism; a
bad value raises ConfigError naming where it came from (file and key, variable or flag).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from . import keys, providers
from .egress import EgressPolicy, parse_cidrs
from .origins import is_port_text
from .policy import parse_on_disallowed

DEFAULT_CONFIG = Path("config") / "sealgate.yaml"  # under the working directory, if it exists

DEFAULTS: dict[str, Any] = {
    "listen_host": "127.0.0.1",
    "listen_port": 8080,
    "web_port": 8081,  # the dashboard; `run --no-web` turns it off
    "web_password": None,  # generated and printed by `run` when unset
    "data_dir": "data",  # the SQLite store and the master key
    "certs_dir": "certs",  # the proxy's CA, made on first use
    "upstream_ca": None,  # a PEM file of extra CAs trusted for upstream TLS
    "allow_private": "",  # CIDRs reachable although loopback or private
    "session_ttl": 3600,  # seconds a session's proxy credential and placeholders live
    "metrics": "127.0.0.1:9090",  # /healthz, /readyz, /metrics; `run --no-metrics` turns them off
    "api": "127.0.0.1:8082",  # the platform API; `run --no-api` turns it off
    "store_url": None,  # sqlite:///path or postgresql://user@host:port/db; unset: the data dir's SQLite file
    "key_hook": None,  # module:object whose wrap()/unwrap() call a KMS for the master key (keys.py)
    "on_disallowed": "block",  # a placeholder bound for a destination its secret does not allow: block | forward
    "providers": None,  # a YAML file of linked-account providers added to (or overriding) config/providers.yaml
    # bounds (docs/architecture.md, "Bounds"): each refusal is a problem+json and a metric
    "upstream_timeout": 120,  # seconds to connect upstream, and then for the response's head to begin (504)
    "header_timeout": 30,  # seconds a worker's connection has to bring a complete request head (idle too)
    "idle_timeout": 300,  # seconds a connection may stay silent both ways (a stalled body, a quiet WebSocket)
    "max_head_bytes": 65536,  # a request head larger than this is refused (431)
    "max_connections": 2000,  # worker connections open at once (more are refused: 503)
    "max_session_connections": 100,  # of them, one session's (429): a runaway worker cannot starve the rest
    "audit_queue": 10000,  # audit rows waiting for the store; past it, injecting requests are refused (503)
    "shutdown_grace": 20,  # seconds SIGTERM waits for requests in flight before the proxy exits
    "dashboard_max_flows": 5000,  # finished flows the dashboard keeps (the oldest go)
    "workers": 1,  # proxy processes sharing the listen port (`run --workers N`, workers.py); 1: one process
}
# The master key itself is never a config key: the file in the data dir, or SEALGATE_MASTER_KEY.


class ConfigError(Exception):
    """A setting that cannot be used; the message says where it came from."""


@dataclass(frozen=True)
class Settings:
    listen_host: str
    listen_port: int
    web_port: int | None
    web_password: str | None
    data_dir: Path
    certs_dir: Path
    upstream_ca: Path | None
    allow_private: str
    session_ttl: int
    metrics: tuple[str, int] | None  # host and port of /healthz, /readyz, /metrics; None: off
    api: tuple[str, int] | None = None  # host and port of the platform API; None: off
    store_url: str | None = None
    key_hook: str | None = None
    on_disallowed: str = "block"
    master_key: str | None = field(default=None, repr=False)  # SEALGATE_MASTER_KEY's hex, if set
    providers: Path | None = None  # SEALGATE_PROVIDERS
    providers_base: Path | None = None  # providers.yaml beside the config file
    upstream_timeout: int = DEFAULTS["upstream_timeout"]
    header_timeout: int = DEFAULTS["header_timeout"]
    idle_timeout: int = DEFAULTS["idle_timeout"]
    max_head_bytes: int = DEFAULTS["max_head_bytes"]
    max_connections: int = DEFAULTS["max_connections"]
    max_session_connections: int = DEFAULTS["max_session_connections"]
    audit_queue: int = DEFAULTS["audit_queue"]
    shutdown_grace: int = DEFAULTS["shutdown_grace"]
    dashboard_max_flows: int = DEFAULTS["dashboard_max_flows"]
    workers: int = DEFAULTS["workers"]

    def key_source(self) -> keys.KeySource:
        return keys.source(self.data_dir / "master.key", self.master_key, self.key_hook)

    def registry(self) -> providers.Registry:
        """The linked-account providers; ConfigError names the file, provider and field of a bad entry."""
        try:
            return providers.load(self.providers_base, self.providers)
        except providers.ProviderError as e:
            raise ConfigError(str(e)) from None

    def own_ports(self) -> tuple[int, ...]:
        """sealgate's own services besides the proxy, never reachable through it."""
        return tuple(p for p in (self.web_port, self.metrics and self.metrics[1], self.api and self.api[1]) if p)

    def egress_policy(self) -> EgressPolicy:
        """What sealgate's own requests (a token exchange) may reach: the proxy's policy."""
        return EgressPolicy(tuple(parse_cidrs(self.allow_private)), frozenset((self.listen_port, *self.own_ports())))

    def to_json(self) -> str:
        """Every setting but the dashboard's password and the master key, for a worker process of `run --workers`
        (in its environment, never on a command line): the settings as resolved, no config file read again."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("web_password", "master_key")}
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in data.items()})

    @classmethod
    def from_json(cls, text: str, master_key: str | None) -> Settings:
        """What to_json wrote, with the master key (SEALGATE_MASTER_KEY's hex, or None)."""
        data = json.loads(text)
        data.update({k: Path(data[k]) for k in _PATH_FIELDS if data.get(k) is not None})
        data.update({k: tuple(data[k]) for k in ("metrics", "api") if data.get(k) is not None})
        return cls(**data, web_password=None, master_key=master_key)


def _port(v: Any) -> int:
    if isinstance(v, bool) or not is_port_text(str(v)):
        raise ValueError("must be a port number from 1 to 65535")
    return int(v)


def _whole(low: int, high: int, unit: str = ""):
    """A parser of whole numbers from low to high."""
    def parse(v: Any) -> int:
        if isinstance(v, bool) or not (str(v).isascii() and str(v).isdigit()) or not low <= int(v) <= high:
            raise ValueError(f"must be a whole number{unit} from {low} to {high}")
        return int(v)
    return parse


ttl_seconds = _whole(60, 7 * 86400, " of seconds")


def _text(v: Any) -> str:
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise ValueError("must be text")
    return str(v)


def _host_port(v: Any) -> tuple[str, int]:
    """'9090' or '127.0.0.1:9090' (default host 127.0.0.1)."""
    text = _text(v)
    host, _, port = text.rpartition(":")
    return (host.strip("[]") or "127.0.0.1", _port(port))


def _store_url(v: Any) -> str:
    text = _text(v)
    scheme = text.split(":", 1)[0].lower()
    if scheme == "sqlite" and not text.startswith("sqlite:///"):
        raise ValueError("write sqlite:///absolute/path/to/file.db")
    if scheme not in ("sqlite", "postgresql", "postgres") or "://" not in text:
        raise ValueError("must be sqlite:///path/to/file.db or postgresql://user@host:port/db")
    return text


def _hook(v: Any) -> str:
    text = _text(v)
    if not text.count(":") == 1 or not all(text.split(":")):
        raise ValueError("must be module:object")
    return text


def _cidrs(v: Any) -> str:
    text = "" if v is None else _text(v)
    parse_cidrs(text)
    return text


# key -> (environment variable, parser)
_KEYS: dict[str, tuple[str, Any]] = {
    "listen_host": ("SEALGATE_LISTEN_HOST", _text),
    "listen_port": ("SEALGATE_LISTEN_PORT", _port),
    "web_port": ("SEALGATE_WEB_PORT", _port),
    "web_password": ("SEALGATE_WEB_PASSWORD", _text),
    "data_dir": ("SEALGATE_DATA_DIR", _text),
    "certs_dir": ("SEALGATE_CERTS_DIR", _text),
    "upstream_ca": ("SEALGATE_UPSTREAM_CA", _text),
    "allow_private": ("SEALGATE_ALLOW_PRIVATE", _cidrs),
    "session_ttl": ("SEALGATE_SESSION_TTL", ttl_seconds),
    "metrics": ("SEALGATE_METRICS_PORT", _host_port),
    "api": ("SEALGATE_API_PORT", _host_port),
    "store_url": ("SEALGATE_STORE_URL", _store_url),
    "key_hook": ("SEALGATE_KEY_HOOK", _hook),
    "on_disallowed": ("SEALGATE_ON_DISALLOWED", lambda v: parse_on_disallowed(_text(v))),
    "providers": ("SEALGATE_PROVIDERS", _text),
    "upstream_timeout": ("SEALGATE_UPSTREAM_TIMEOUT", _whole(1, 3600, " of seconds")),
    "header_timeout": ("SEALGATE_HEADER_TIMEOUT", _whole(1, 3600, " of seconds")),
    "idle_timeout": ("SEALGATE_IDLE_TIMEOUT", _whole(1, 86400, " of seconds")),
    "max_head_bytes": ("SEALGATE_MAX_HEAD_BYTES", _whole(1024, 1024 * 1024, " of bytes")),
    "max_connections": ("SEALGATE_MAX_CONNECTIONS", _whole(1, 1_000_000)),
    "max_session_connections": ("SEALGATE_MAX_SESSION_CONNECTIONS", _whole(1, 1_000_000)),
    "audit_queue": ("SEALGATE_AUDIT_QUEUE", _whole(1, 10_000_000, " of rows")),
    "shutdown_grace": ("SEALGATE_SHUTDOWN_GRACE", _whole(0, 3600, " of seconds")),
    "dashboard_max_flows": ("SEALGATE_DASHBOARD_MAX_FLOWS", _whole(1, 10_000_000, " of flows")),
    "workers": ("SEALGATE_WORKERS", _whole(1, 64, " of processes")),
}
_BOUNDS = ("upstream_timeout", "header_timeout", "idle_timeout", "max_head_bytes", "max_connections",
           "max_session_connections", "audit_queue", "shutdown_grace", "dashboard_max_flows")
_PATHS = ("data_dir", "certs_dir", "upstream_ca", "providers")
_PATH_FIELDS = (*_PATHS, "providers_base")


def load(flags: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    config_path = Path(env.get("SEALGATE_CONFIG") or DEFAULT_CONFIG)
    values: dict[str, Any] = {key: _parse(key, raw, f"default {key}") for key, raw in DEFAULTS.items()
                              if raw is not None}
    values.update({key: Path(values[key]).absolute() for key in _PATHS if key in values})
    for key, raw in _read_yaml(config_path).items():
        if key not in _KEYS:
            raise ConfigError(f"{config_path}: unknown key {key!r} (known: {', '.join(_KEYS)})")
        if raw is not None:
            values[key] = _parse(key, raw, f"{config_path}: key {key!r}")
            if key in _PATHS:  # relative to the config file's folder
                values[key] = config_path.parent.absolute() / values[key]
    flags = dict(flags or {})
    no_web = bool(flags.pop("no_web", False))
    no_metrics = bool(flags.pop("no_metrics", False))
    no_api = bool(flags.pop("no_api", False))
    overrides = [(key, env.get(var, ""), f"environment variable {var}") for key, (var, _) in _KEYS.items()]
    overrides += [(key, raw, f"--{key.replace('_', '-')}") for key, raw in flags.items()]
    for key, raw, where in overrides:
        if raw is not None and raw != "":
            values[key] = _parse(key, raw, where)
            if key in _PATHS:  # relative to where the command runs
                values[key] = Path(values[key]).absolute()
    for limit in ("max_connections", "max_session_connections"):  # each proxy process takes limit // workers
        if values[limit] < values["workers"]:
            raise ConfigError(f"{limit} ({values[limit]}) is below workers ({values['workers']}): each proxy "
                              "process needs at least one connection of its own")
    return Settings(
        listen_host=values["listen_host"],
        listen_port=values["listen_port"],
        web_port=None if no_web else values["web_port"],
        web_password=values.get("web_password"),
        data_dir=Path(values["data_dir"]),
        certs_dir=Path(values["certs_dir"]),
        upstream_ca=Path(values["upstream_ca"]) if values.get("upstream_ca") else None,
        allow_private=values["allow_private"],
        session_ttl=values["session_ttl"],
        metrics=None if no_metrics else values["metrics"],
        api=None if no_api else values["api"],
        store_url=values.get("store_url"),
        key_hook=values.get("key_hook"),
        on_disallowed=values["on_disallowed"],
        master_key=env.get(keys.ENV_VAR) or None,
        providers=Path(values["providers"]) if values.get("providers") else None,
        providers_base=config_path.parent.absolute() / providers.FILE_NAME,
        **{key: values[key] for key in _BOUNDS},
        workers=values["workers"],
    )


def _parse(key: str, raw: Any, where: str) -> Any:
    try:
        return _KEYS[key][1](raw)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        if path == DEFAULT_CONFIG:
            return {}
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=providers.SAFE_LOADER)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values")
    return data
