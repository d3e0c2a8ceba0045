"""Real parts for the integration tests: a test CA, HTTPS upstreams on loopback that
record what they receive, sealgate itself, and real clients.

sealgate runs in this process by default: `Proxy.cli` calls `sealgate.cli.main`, and
`Proxy.start` runs the proxy `sealgate run --no-web` would run, on an event loop in a thread
of its own, logging to `Proxy.log`. Where only a real process proves the point (the
dashboard, a process of its own; the memory of the proxy process; the real executable's
argv, stdin and one-line errors; a stock mitmdump), the test is marked `e2e` and sealgate
runs as operators run it: `make_proxy(..., process=True)`, `start(web=True)`, or the
`proxy` fixture of a test marked e2e give the `.venv/bin/sealgate` executable and a
`sealgate run` process.

Only loopback addresses are used. Secret values are generated per test and searched
for in everything the test can see; the harness never prints one.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from upstream import TestPKI, Upstream, serve

ROOT = Path(__file__).resolve().parent.parent
SEALGATE = ROOT / ".venv" / "bin" / "sealgate"
NODE_DIR = ROOT / "tests" / "node"


@pytest.fixture(scope="session")
def pg():
    """A throwaway PostgreSQL cluster (tests/pg.py), started once when a test first needs one; its
    `database()` gives each test an empty database."""
    import pg as pgmod
    try:
        with pgmod.cluster() as cluster:
            yield cluster
    except pgmod.ClusterError as e:
        pytest.fail(f"the PostgreSQL tests need a throwaway cluster, and it cannot start: {e}", pytrace=False)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> TestPKI:
    return TestPKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def make_upstream(pki):
    servers = []

    def make(host: str = "127.0.0.1", *, tls: bool = True, cert: tuple[Path, Path] | None = None) -> Upstream:
        up, srv = serve(pki, host, tls=tls, cert=cert)
        servers.append(srv)
        return up

    yield make
    stopping = [threading.Thread(target=s.shutdown) for s in servers]  # each waits up to its poll interval
    for t in stopping:
        t.start()
    for t in stopping:
        t.join()


@pytest.fixture(scope="module")
def api(make_upstream) -> Upstream:
    """An HTTPS upstream on 127.0.0.1: the allowed origin of most tests."""
    return make_upstream("127.0.0.1")


@pytest.fixture(scope="module")
def evil(make_upstream) -> Upstream:
    """An HTTPS upstream on 127.0.0.2: somewhere a value must never go."""
    return make_upstream("127.0.0.2")


# --- the proxy -----------------------------------------------------------------------------

def _ephemeral_low() -> int:
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: one the kernel hands out for a bind to port 0 (an
    upstream's) could be this very number while a proxy holds it in its settings unbound (its API or metrics
    port in process), which sealgate then refuses as its own (destination_blocked: a flake seen once)."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10000, max(_EPHEMERAL_LOW, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # (a machine with no room below its ephemeral range)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proxy:
    dir: Path
    env: dict[str, str] = field(repr=False)  # this process's environment too: not in failure reports
    port: int
    log: Path
    process: bool = False  # the real executable and a `sealgate run` process, not this process
    proc: subprocess.Popen | None = None  # `sealgate run`, when it runs as a process
    _thread: threading.Thread | None = field(default=None, repr=False)
    _master: object = field(default=None, repr=False)
    _handler: logging.Handler | None = field(default=None, repr=False)
    _failure: BaseException | None = field(default=None, repr=False)
    _send2: tuple | None = field(default=None, repr=False)  # WebsocketConnection.send2 before, and as it wrapped it

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.env['SEALGATE_METRICS_PORT']}"

    @property
    def data_dir(self) -> Path:
        return Path(self.env["SEALGATE_DATA_DIR"])

    @property
    def ca_cert(self) -> Path:
        return Path(self.env["SEALGATE_CERTS_DIR"]) / "mitmproxy-ca-cert.pem"

    def cli(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """`sealgate *args` with self.env: in this process, or the real executable when self.process."""
        if args[:1] == ("audit",):
            self.audit_written()
        if self.process:
            p = subprocess.run([str(SEALGATE), *args], input=input, capture_output=True, text=True, env=self.env,
                               timeout=60)
        else:
            p = _cli_in_process(args, self.env, input)
        if check and p.returncode != 0:
            raise AssertionError(f"sealgate {' '.join(args)} failed: {p.stderr}")
        return p

    def audit_written(self, timeout: float = 10) -> None:
        """Wait until the proxy's audit queue has gone to the store (it writes every few tens of ms)."""
        if self._master is not None:
            if (queue := self._master.addons.get("sealgate").audit) is not None:  # (None: stopped)
                assert queue.flush(timeout), "the audit queue did not drain"
            return
        deadline = time.time() + timeout
        while self.proc is not None and self.proc.poll() is None and time.time() < deadline:
            with contextlib.suppress(OSError):
                text = urllib.request.urlopen(self.metrics_url + "/metrics", timeout=5).read().decode()
                if 'sealgate_bounded{name="audit_queue"} 0.0' in text:
                    return
            time.sleep(0.05)

    def add_secret(self, user: str, name: str, value: str, origins: str, *extra: str) -> None:
        self.cli("secret", "add", "--user", user, "--name", name, "--origins", origins, *extra, input=value + "\n")

    def issue(self, access: str = "signed-in", *, user: str | None = None, author: str | None = None,
              runchat: str = "rc1", instance: str = "in1", ttl: str | None = None) -> dict:
        args = ["session", "issue", "--access", access, "--runchat", runchat, "--instance", instance]
        if user:
            args += ["--user", user]
        if author:
            args += ["--author", author]
        if ttl:
            args += ["--ttl", ttl]
        return json.loads(self.cli(*args).stdout)

    def start(self, *, web: bool = False) -> None:
        """Run the proxy: in this process, or `sealgate run` as a process when self.process or web
        (the dashboard is a process of its own, started by `sealgate run`; SEALGATE_WEB_PORT and
        _PASSWORD are set)."""
        if web or self.process:
            self._start_process(web)
        else:
            self._start_in_process()
        deadline = time.time() + 30
        ports = [self.port, int(self.env["SEALGATE_METRICS_PORT"])]  # the proxy, its probes, its dashboard
        for port in ports + ([int(self.env["SEALGATE_WEB_PORT"])] if web else []):
            while True:
                self._check_running()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        self.stop()
                        raise AssertionError("sealgate run did not start listening") from None
                    time.sleep(0.05)
        if self._thread is not None:  # the WebSocket wrapper this proxy installed, now it runs
            self._send2 = (self._send2[0], _websocket_send2())

    def _start_process(self, web: bool) -> None:
        out = self.log.open("ab")
        if web:
            self.env.setdefault("SEALGATE_WEB_PORT", str(free_port()))
            self.env.setdefault("SEALGATE_WEB_PASSWORD", secrets.token_urlsafe(16))
        self.proc = subprocess.Popen([str(SEALGATE), "run", *([] if web else ["--no-web"])], env=self.env,
                                     stdout=out, stderr=subprocess.STDOUT)

    def _start_in_process(self) -> None:
        """What `sealgate run --no-web` does, minus signal handlers and its start-up line: the
        store and key first, then the lean master on an event loop of its own (in a thread).
        What would end the process ends the thread, with the same line in its output."""
        from sealgate import runner, settings
        from sealgate.store import open_store

        _mitmproxy_ctx_per_thread()
        errors = _cli_errors()
        self._master = self._failure = None
        try:
            s = settings.load({"no_web": True}, env=dict(self.env))
            store = open_store(s)
            store.key  # noqa: B018 - `sealgate run` makes the store and key before listening
            store.close()
        except errors as e:
            with self.log.open("a") as out:
                out.write(f"sealgate: error: {e}\n")
            raise AssertionError(f"sealgate run exited: {self.log.read_text()}") from None
        logging.getLogger().setLevel(logging.INFO)  # as runner.serve: one line per sealgate decision
        logging.getLogger("mitmproxy").setLevel(logging.WARNING)
        built = threading.Event()

        def serve() -> None:
            async def main() -> None:
                self._master = m = runner.build_master(s, with_termlog=False)  # needs the running loop
                built.set()
                try:
                    await m.run()
                finally:  # a process would exit now, and its listening sockets close with it
                    await m.addons.get("proxyserver").servers.update([])
            try:
                asyncio.run(main())
            except BaseException as e:  # noqa: BLE001 - the process would have exited
                self._failure = e
                with self.log.open("a") as out:  # the loop is closed: not through logging
                    if isinstance(e, errors):  # as `sealgate run` reports them
                        out.write(f"sealgate: error: {e}\n")
                    elif not isinstance(e, SystemExit):  # mitmproxy's start-up errors are in the log already
                        out.write(traceback.format_exc())
            finally:
                built.set()

        thread = threading.Thread(target=serve, name=f"sealgate-{self.port}", daemon=True)
        # the proxy's output: what its thread logs, from before `running` (the addon puts its
        # scrubbing filter on the root logger's handlers then)
        handler = logging.FileHandler(self.log, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(lambda record: record.thread == thread.ident)
        logging.getLogger().addHandler(handler)
        self._handler, self._thread, self._send2 = handler, thread, (_websocket_send2(), None)
        thread.start()
        built.wait(30)

    def _check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"sealgate run exited: {self.log.read_text()}")
        if self._thread is not None and not self._thread.is_alive():
            self.stop()
            raise AssertionError(f"sealgate run exited ({self._failure!r}): {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._thread is None:
            return
        thread, self._thread = self._thread, None
        if self._master is not None and thread.is_alive():
            self._master.shutdown()  # thread-safe
        thread.join(20)
        root = logging.getLogger()
        errorcheck = self._master and self._master.addons.get("errorcheck")
        for h in list(root.handlers):  # ours, and mitmproxy's own, left when it could not start
            if h in (self._handler, getattr(errorcheck, "logger", None)) or getattr(h, "master", 0) is self._master:
                root.removeHandler(h)
        self._handler.close()
        before, installed = self._send2
        if installed is not None and _websocket_send2() is installed:
            _websocket_send2(before)  # the proxy started before this one gets its wrapper back
        if thread.is_alive():
            raise AssertionError("sealgate run (in-process) did not stop within 20 s")

    def visible_to_operators(self) -> bytes:
        """The proxy's output and every file it wrote (store, key, CA), raw."""
        blobs = [self.log.read_bytes() if self.log.exists() else b""]
        for d in (self.data_dir, Path(self.env["SEALGATE_CERTS_DIR"])):
            for f in d.rglob("*"):
                if f.is_file():
                    blobs.append(f.read_bytes())
        return b"\n".join(blobs)


def make_proxy(tmp: Path, pki: TestPKI, *, process: bool = False, **env: str) -> Proxy:
    """A sealgate with its own data and certs dirs under tmp and free ports; process: the real
    executable and `sealgate run` process (for tests marked e2e), else in this process."""
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("SEALGATE_") and "PROXY" not in k.upper()}
    full.update(
        SEALGATE_DATA_DIR=str(tmp / "data"),
        SEALGATE_CERTS_DIR=str(tmp / "certs"),
        SEALGATE_LISTEN_HOST="127.0.0.1",
        SEALGATE_LISTEN_PORT=str(port),
        SEALGATE_UPSTREAM_CA=str(pki.ca_pem),
        SEALGATE_ALLOW_PRIVATE="127.0.0.1/32,127.0.0.2/32,::1/128",  # 127.0.0.3 stays blocked
        SEALGATE_METRICS_PORT=str(free_port()),
        SEALGATE_API_PORT=str(free_port()),  # (a process's API: never the default port another test holds)
    )
    full.update(env)
    return Proxy(tmp, full, port, tmp / "proxy.log", process=process)


@pytest.fixture(scope="module")
def proxy_in_process(tmp_path_factory, pki):
    p = make_proxy(tmp_path_factory.mktemp("sealgate"), pki)
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def proxy_process(tmp_path_factory, pki):
    p = make_proxy(tmp_path_factory.mktemp("sealgate-run"), pki, process=True)
    p.start()
    yield p
    p.stop()


@pytest.fixture
def proxy(request):
    """The module's sealgate: in this process; for a test marked e2e, a `sealgate run` process."""
    return request.getfixturevalue("proxy_process" if request.node.get_closest_marker("e2e") else "proxy_in_process")


# --- sealgate in this process ---------------------------------------------------------------

_CLI_LOCK = threading.Lock()  # sys.stdin, sys.stdout and sys.stderr are the process's


def _cli_errors() -> tuple[type[BaseException], ...]:
    """What `sealgate` reports as one line (sealgate.cli.main), and `run` its OptionsError."""
    import sqlite3

    from mitmproxy.exceptions import OptionsError
    from sealgate import ca, cli, settings, store

    return (cli.UsageError, ValueError, store.StoreError, settings.ConfigError, ca.CertError, sqlite3.Error,
            OptionsError)


def _cli_in_process(args: tuple[str, ...], env: dict[str, str], input: str | None) -> subprocess.CompletedProcess:
    """sealgate.cli.main as the executable runs it: stdin from input (not a terminal), stdout and
    stderr captured as text, SystemExit and uncaught exceptions turned into the exit code (with
    the traceback on stderr, as the interpreter prints it)."""
    from sealgate import cli

    stdin = io.TextIOWrapper(io.BytesIO((input or "").encode()), encoding="utf-8")
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # reconfigurable, as sys.stdout is
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    with _CLI_LOCK:
        saved, sys.stdin = sys.stdin, stdin
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = cli.main(list(args), env=dict(env))
                except SystemExit as e:  # argparse: usage errors (2) and --help (0)
                    code = e.code
                    if code is not None and not isinstance(code, int):
                        print(code, file=sys.stderr)
                        code = 1
                    code = code or 0
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                    code = 1
        finally:
            sys.stdin = saved
    return subprocess.CompletedProcess([str(SEALGATE), *args], code, _text(out), _text(err))


def _text(stream: io.TextIOWrapper) -> str:
    """What subprocess.run(text=True) would have read: decoded, with universal newlines."""
    stream.flush()
    return io.TextIOWrapper(io.BytesIO(stream.buffer.getvalue()), encoding="utf-8").read()


def _mitmproxy_ctx_per_thread() -> None:
    """mitmproxy keeps its master and options in the globals of `mitmproxy.ctx`, one set per
    process, and reads them for every new connection. Several proxies in this process (a
    module's and a test's own) each get theirs, per thread, as each process would; a thread
    that set none (the tests') reads the last set."""
    from mitmproxy import ctx

    if getattr(type(ctx), "per_thread", False):
        return
    local, last = threading.local(), {}
    names = ("master", "options", "log")
    for name in names:
        if name in ctx.__dict__:
            last[name] = ctx.__dict__.pop(name)

    def attribute(name: str) -> property:
        def get(_):
            if name in local.__dict__:
                return local.__dict__[name]
            if name in last:
                return last[name]
            raise AttributeError(f"module 'mitmproxy.ctx' has no attribute {name!r}")

        def put(_, value):
            setattr(local, name, value)
            last[name] = value
        return property(get, put)

    ctx.__class__ = type("PerThreadCtx", (types.ModuleType,), {"per_thread": True,
                                                               **{n: attribute(n) for n in names}})


def _websocket_send2(replacement=None):
    """mitmproxy's WebSocketConnection.send2, which each proxy wraps when it starts (once per
    process: sealgate.internals.wrap_websocket_send); with replacement, put that back."""
    from mitmproxy.proxy.layers import websocket

    if replacement is not None:
        websocket.WebsocketConnection.send2 = replacement
    return websocket.WebsocketConnection.__dict__.get("send2")


# --- per-test identities and values ---------------------------------------------------------

@pytest.fixture
def user() -> str:
    return f"user-{secrets.token_hex(4)}"


CREATED_VALUES: list[str] = []  # every value the `value` fixture made, searched for once the suite ends


@pytest.fixture
def value() -> str:
    """A fresh secret value; every test that makes one checks it never shows up where it must not."""
    v = f"sk-test-{secrets.token_urlsafe(24)}"
    CREATED_VALUES.append(v)
    return v


@pytest.fixture(scope="session", autouse=True)
def no_value_in_any_file(tmp_path_factory):
    """After the whole suite: no value any test made is in any file any test's sealgate wrote (every
    data dir's store, WAL and key folder, every log, every certs dir, every flow file), in clear."""
    yield
    if not CREATED_VALUES:
        return
    needles = [v.encode() for v in CREATED_VALUES]
    found = []
    for f in tmp_path_factory.getbasetemp().rglob("*"):
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            found += [str(f) for n in needles if n in data]
    # the paths only: printing a value would be the leak this looks for
    assert not found, f"a secret value is in clear in {len(found)} file(s): {sorted(set(found))[:10]}"


# --- real clients ----------------------------------------------------------------------------

@dataclass
class ClientResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)

    def seen(self) -> bytes:
        return json.dumps(self.headers).encode() + b"\n" + self.body


def curl(session: dict, url: str, *args: str) -> ClientResult:
    """curl through the proxy; returns what the worker received."""
    if not shutil.which("curl"):
        pytest.fail("curl is needed for the integration tests (apt-get install curl)")
    cmd = ["curl", "-sS", "-D", "-", "--proxy", session["proxy_url"], "--cacert", session["ca_cert"],
           "--max-time", "20", *args, url]
    p = subprocess.run(cmd, capture_output=True, timeout=30)
    raw = p.stdout
    # with a CONNECT, curl prints the proxy's "200 Connection established" head first
    while raw.startswith(b"HTTP/") and b" 200 Connection established" in raw.split(b"\r\n", 1)[0]:
        raw = raw.split(b"\r\n\r\n", 1)[1]
    if not raw.startswith(b"HTTP/"):
        raise AssertionError(f"curl failed ({p.returncode}): {p.stderr.decode()}")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return ClientResult(status, headers, body)


def node_fetch(session: dict, url: str, *, method: str = "GET", headers: dict | None = None,
               body: str | None = None) -> ClientResult:
    """Node's fetch (undici) with EnvHttpProxyAgent and NODE_EXTRA_CA_CERTS, as a worker runs it."""
    if not (NODE_DIR / "node_modules" / "undici").exists():
        pytest.fail("tests/node/node_modules is missing: run ./scripts/test, which installs it")
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper()}
    env.update(HTTPS_PROXY=session["proxy_url"], HTTP_PROXY=session["proxy_url"],
               NODE_EXTRA_CA_CERTS=session["ca_cert"])
    spec = json.dumps({"url": url, "method": method, "headers": headers or {}, "body": body})
    p = subprocess.run(["node", str(NODE_DIR / "fetch.mjs"), spec], capture_output=True, env=env, timeout=60)
    if p.returncode != 0:
        raise AssertionError(f"node fetch failed: {p.stderr.decode()}")
    out = json.loads(p.stdout)
    return ClientResult(out["status"], out["headers"], out["body"].encode("utf-8", "surrogateescape"))


@pytest.fixture(scope="module")
def webgateway(tmp_path_factory, pki):
    """A `sealgate run --workers 2` with its dashboard and API (the processes it starts besides the proxies)."""
    from test_workers import start_gateway
    p = start_gateway(tmp_path_factory.mktemp("webgateway"), pki, web=True)
    yield p
    p.stop()
