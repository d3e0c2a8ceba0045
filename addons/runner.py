"""`sealgate run`: a lean mitmproxy master carrying only what the request path needs.

mitmdump's ~36 default addons cost most of its per-request CPU in hook dispatch
(MITMPROXY-NOTES.md, "A lean master"); sealgate loads the proxy server, layer
selection, TLS, error checking and its own addon, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import io
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import argon2
import yaml
from mitmproxy import master, options
from mitmproxy.addons import errorcheck, next_layer, proxyserver, tlsconfig

from . import ca, internals, keys
from .addon import Sealgate
from .connections import Undecided
from .dashboard import Mirror
from .probes import ProbeServer
from .settings import Settings
from .store import StoreError


def build_master(settings: Settings, *, with_termlog: bool = True) -> master.Master:
    settings.registry()  # a bad providers file stops `run` here, naming the file, the provider and the field
    certs = settings.certs_dir
    ca.ensure_ca(certs)
    bundle = ca.upstream_bundle(certs, settings.upstream_ca)
    opts = options.Options(listen_host=settings.listen_host, listen_port=settings.listen_port)
    m = master.Master(opts, with_termlog=with_termlog)
    internals.trim_master(m)
    # sealgate first: its server_connect check runs before anything else sees the connection,
    # and its tls_start_server names the destination before TlsConfig builds the context
    sealgate = Sealgate(settings.key_source())
    m.addons.add(sealgate, next_layer.NextLayer(), Undecided(sealgate.connections), proxyserver.Proxyserver(),
                 tlsconfig.TlsConfig(), errorcheck.ErrorCheck())
    opts.update(
        confdir=str(certs),
        rawtcp=False,  # after a non-WebSocket 101 nothing could be checked: close instead
        ssl_verify_upstream_trusted_ca=str(bundle) if bundle else None,
        sealgate_data_dir=str(settings.data_dir),
        sealgate_store_url=settings.store_url or "",
        sealgate_on_disallowed=settings.on_disallowed,
        sealgate_allow_private=settings.allow_private,
        sealgate_guard_ports=",".join(str(p) for p in settings.own_ports()),
        sealgate_providers_file=str(settings.providers_base or ""),
        sealgate_providers=str(settings.providers or ""),
        sealgate_audit_queue=settings.audit_queue,
        sealgate_upstream_timeout=settings.upstream_timeout,
        sealgate_header_timeout=settings.header_timeout,
        sealgate_max_head_bytes=settings.max_head_bytes,
        sealgate_max_connections=settings.max_connections,
        sealgate_max_session_connections=settings.max_session_connections,
        tcp_timeout=settings.idle_timeout,  # mitmproxy closes a connection silent both ways this long
    )
    if settings.metrics is not None:
        m.addons.add(_Probes(ProbeServer(*settings.metrics, sealgate.metrics, _readiness(sealgate, certs))))
    return m


def _readiness(sealgate: Sealgate, certs: Path):
    def why_not() -> str | None:
        if sealgate.connections.draining:
            return "the proxy is stopping"
        try:
            store = sealgate.store
            if store is None:
                return "sealgate_data_dir is not set"
            store.check()  # the file is the one opened, and the key opens it
        except StoreError as e:
            return str(e)
        if not (certs / ca.CA_CERT).exists():
            return f"the CA certificate {certs / ca.CA_CERT} is missing"
        return None
    return why_not


class _Probes:
    """Runs the probe server alongside the proxy."""

    def __init__(self, server: ProbeServer) -> None:
        self.server = server

    async def running(self) -> None:
        await self.server.start()

    async def done(self) -> None:
        await self.server.stop()


# children run `python -P -m ...`: without -P, -m puts the working directory first on the import path, and a
# yaml.py (say) in the folder sealgate was started from would run in a process that holds the master key
SAFE_PATH = ("-P",)


def start_dashboard(settings: Settings, workdir: Path) -> tuple[subprocess.Popen, str, str]:
    """Start mitmweb as its own process, fed by the mirror; (process, socket path, password).

    Its options, the password among them, go in a config file readable by its owner only,
    not on a command line that `ps` shows."""
    password = settings.web_password or secrets.token_urlsafe(18)
    socket_path = str(workdir / "mirror.sock")
    config = os.open(workdir / "config.yaml", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(config, "w") as f:
        yaml.safe_dump({"web_host": "127.0.0.1", "web_port": settings.web_port,
                        "web_password": argon2.PasswordHasher().hash(password),  # no plaintext in the file
                        "web_open_browser": False, "server": False, "sealgate_mirror_socket": socket_path,
                        "sealgate_dashboard_max_flows": settings.dashboard_max_flows,
                        # the comment says who (principal, runchat) and, for a blocked flow, why
                        "web_columns": ["tls", "icon", "path", "method", "status", "size", "time", "comment"]}, f)
    cmd = [sys.executable, *SAFE_PATH, "-m", "sealgate.dashboard_web", str(workdir)]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent), socket_path, password


def start_api(settings: Settings) -> subprocess.Popen:
    """`sealgate api` as its own process, its settings passed in its environment (not on a command line
    that `ps` shows: a store URL may hold a password)."""
    env = {**os.environ, "SEALGATE_DATA_DIR": str(settings.data_dir), "SEALGATE_CERTS_DIR": str(settings.certs_dir),
           "SEALGATE_LISTEN_HOST": settings.listen_host, "SEALGATE_LISTEN_PORT": str(settings.listen_port),
           "SEALGATE_SESSION_TTL": str(settings.session_ttl), "SEALGATE_API_PORT": ":".join(map(str, settings.api))}
    for var, text in (("SEALGATE_STORE_URL", settings.store_url), ("SEALGATE_KEY_HOOK", settings.key_hook),
                      (keys.ENV_VAR, settings.master_key)):
        if text:
            env[var] = text
    return subprocess.Popen([sys.executable, *SAFE_PATH, "-m", "sealgate.cli", "api"], stdin=subprocess.DEVNULL, env=env,
                            preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    """In a child, before it runs: SIGTERM when `sealgate run` dies, however (kill -9 included), so no
    dashboard or API outlives it holding its port (Linux; elsewhere the child is left to the caller)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


async def serve(settings: Settings) -> None:
    _output()
    m = build_master(settings)
    with tempfile.TemporaryDirectory(prefix="sealgate-dashboard-") as workdir:
        async with dashboard_and_api(settings, Path(workdir)) as (mirror_socket, password):
            if mirror_socket is not None:
                _add_mirror(m, mirror_socket)
            await _run(m, settings, password)


def _output() -> None:
    whole_lines()  # one log line at a time, in one write()
    logging.getLogger().setLevel(logging.INFO)  # one line per sealgate decision
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)  # not every connection
    # a line per request: no caller's frame, process or task looked up for a record (the logging HOWTO's
    # "Optimization"; no handler here prints them)
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logProcesses = logging.logMultiprocessing = logging.logAsyncioTasks = False


@contextlib.asynccontextmanager
async def dashboard_and_api(settings: Settings, workdir: Path) -> AsyncIterator[tuple[str | None, str | None]]:
    """The dashboard and the platform API, each a process of its own when it is on, for as long as the block
    runs (a line if one dies; both stopped at the end): (the mirror's socket, the dashboard's password), or
    (None, None) without a dashboard."""
    children: list[subprocess.Popen] = []
    watchers = []
    socket_path = password = None
    try:
        if settings.web_port is not None:
            dashboard, socket_path, password = start_dashboard(settings, workdir)
            children.append(dashboard)
            watchers.append(asyncio.get_running_loop().create_task(_watch(dashboard, "the dashboard", "its copies")))
        if settings.api is not None:
            children.append(start_api(settings))
            watchers.append(asyncio.get_running_loop().create_task(_watch(children[-1], "the platform API", "its calls")))
        yield socket_path, password
    finally:
        for w in watchers:
            w.cancel()
        for child in children:
            child.terminate()
        for child in children:
            child.wait(10)


def _add_mirror(m: master.Master, socket_path: str) -> None:
    """Send redacted copies of finished flows to the dashboard's socket."""
    sealgate = m.addons.get("sealgate")
    mirror = Mirror(socket_path, sealgate.flow_scrubber)
    m.addons.add(mirror)
    sealgate.metrics.size("mirror_bytes", lambda: mirror.queued_bytes)
    sealgate.metrics.size("mirror_dropped", lambda: mirror.dropped)


async def _watch(child: subprocess.Popen, what: str, lost: str) -> None:
    """Say so if a child process dies: the proxy goes on without it."""
    while child.poll() is None:
        await asyncio.sleep(1)
    logging.getLogger("sealgate").error(
        "sealgate: %s process exited (code %s); proxying goes on, %s fail", what, child.returncode, lost)


async def _run(m: master.Master, settings: Settings, web_password: str | None) -> None:
    _handle_signals(m, settings.shutdown_grace)
    m.addons.add(_Announce("\n".join(announcement(settings, web_password))))
    _freeze_start_up()
    await m.run()


def _freeze_start_up() -> None:
    """What start-up made (modules, the master, the addons: some 90,000 objects) lives as long as the process:
    out of the garbage collector's sight, each full collection scans what requests leave instead of all of
    it (one took 100 ms of the event loop, some 3% of the CPU under load)."""
    gc.collect()
    gc.freeze()


def _handle_signals(m: master.Master, grace: float) -> None:
    """SIGINT stops at once; SIGTERM drains (`_stop`)."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, m.shutdown)
    stopping: list[asyncio.Task] = []
    loop.add_signal_handler(signal.SIGTERM, lambda: stopping or stopping.append(loop.create_task(_stop(m, grace))))


def announcement(settings: Settings, web_password: str | None) -> list[str]:
    """The start-up lines: where the proxy, its probes, the API and the dashboard are."""
    lines = [f"sealgate: proxy on {settings.listen_host}:{settings.listen_port}; "
             f"workers trust {settings.certs_dir / ca.CA_CERT}"]
    if settings.metrics is not None:
        lines.append(f"sealgate: probes and metrics on http://{settings.metrics[0]}:{settings.metrics[1]}"
                     "/healthz, /readyz, /metrics")
    if settings.api is not None:
        lines.append(f"sealgate: platform API on http://{settings.api[0]}:{settings.api[1]}/ "
                     "(tokens: `sealgate token issue`)")
    if web_password is not None:
        shown = "as set in SEALGATE_WEB_PASSWORD" if settings.web_password else web_password
        lines.append(f"sealgate: dashboard on http://127.0.0.1:{settings.web_port}/ (password: {shown})")
    return lines


async def _stop(m: master.Master, grace: float) -> None:
    """SIGTERM: stop listening (and say not ready), let the requests in flight finish for up to grace
    seconds, then shut down; the audit queue is written out as the addon stops."""
    sealgate = m.addons.get("sealgate")
    connections = sealgate.connections
    connections.drain()
    await m.addons.get("proxyserver").servers.update([])  # stop listening; the connections open stay
    internals.stop_sharing()  # (--workers: the port closes once every process has stopped listening)
    log = logging.getLogger("sealgate")
    log.warning("sealgate: stopping: %d connections open, waiting up to %s s for them", connections.busy, grace)
    end = time.monotonic() + grace
    while connections.busy and time.monotonic() < end:
        await asyncio.sleep(0.05)
    if connections.busy:
        log.warning("sealgate: stopping with %d connections still open", connections.busy)
        for flow in list(connections.flows):  # cut off: the status their rows get is "closed"
            sealgate.recorder.answered(flow, 0)
    m.shutdown()


class _Announce:
    """Says where the proxy listens, once it really does."""

    def __init__(self, text: str) -> None:
        self.text = text

    def running(self) -> None:
        print(self.text, file=sys.stderr)


# --- one of the proxy processes of `sealgate run --workers N` (workers.py) -----------------------------

WORKER_ENV = "SEALGATE_WORKER"  # a proxy process's index, settings and sockets (JSON), set by workers.Supervisor


async def serve_worker(settings: Settings, probes: str, mirror_socket: str | None, listen: list[int],
                       loads: tuple[internals.Loads, int] | None = None) -> None:
    """The proxy `serve` runs, accepting on the sockets it shares with the other proxy processes (the
    supervisor's, inherited: descriptors `listen`), its probes on the Unix socket `probes` (the supervisor
    answers the probe port for all of them), its copies sent to the dashboard's socket (None: no dashboard).
    No dashboard, API or start-up lines of its own."""
    _output()
    internals.listen_on([socket.socket(fileno=fd) for fd in listen], loads)
    # its probes: on the socket, not on the port; the upstream trust bundle: written once, by the supervisor
    # (each process rewriting it at start would have another read it half-written)
    m = build_master(dataclasses.replace(settings, metrics=None, upstream_ca=None))
    bundle = settings.certs_dir / ca.UPSTREAM_BUNDLE if settings.upstream_ca else None
    m.options.update(sealgate_guard_ports=",".join(str(p) for p in settings.own_ports()),  # the probe port too
                     ssl_verify_upstream_trusted_ca=str(bundle) if bundle else None)
    sealgate = m.addons.get("sealgate")
    m.addons.add(_Probes(ProbeServer("", 0, sealgate.metrics, _readiness(sealgate, settings.certs_dir), unix=probes)))
    if mirror_socket is not None:
        _add_mirror(m, mirror_socket)
    _handle_signals(m, settings.shutdown_grace)
    _freeze_start_up()
    await m.run()


def whole_lines() -> None:
    """Write each line of stdout and stderr in one write(): a line written in two (as Python writes a print
    when unbuffered, PYTHONUNBUFFERED, as images often set it) costs a system call more per request, and
    could get another of the gateway's processes' lines in between. A stream the caller redirected (not the
    one Python opened) is left as it is."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if stream is not getattr(sys, f"__{name}__"):
            continue
        stream.flush()
        setattr(sys, name, io.TextIOWrapper(io.BufferedWriter(io.FileIO(fd, "w", closefd=False), 1 << 16),
                                            encoding=stream.encoding, errors=stream.errors, line_buffering=True))


def worker_main() -> int:
    """`python -m sealgate.runner`, as workers.Supervisor starts it (settings in WORKER_ENV and, for the master
    key, SEALGATE_MASTER_KEY: never on a command line); an error is one line, as `sealgate run` gives it."""
    import sqlite3

    from mitmproxy.exceptions import OptionsError

    from .settings import ConfigError
    spec = json.loads(os.environ[WORKER_ENV])
    try:
        settings = Settings.from_json(spec["settings"], os.environ.get(keys.ENV_VAR) or None)
        fd, slots = spec["loads"]
        asyncio.run(serve_worker(settings, spec["probes"], spec.get("mirror"), spec["listen"],
                                 (internals.Loads(fd, slots), spec["index"])))
    except KeyboardInterrupt:
        pass
    except (OptionsError, internals.InternalsMissing, StoreError, ConfigError, ca.CertError, ValueError, OSError,
            sqlite3.Error) as e:
        print(f"sealgate: error: proxy process {spec['index']}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
