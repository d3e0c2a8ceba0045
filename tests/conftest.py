"""Real parts for the integration tests: a test CA, HTTPS upstreams on loopback that
record what they receive, a real `sealgate run` process, and real clients.

Only loopback addresses are used. Secret values are generated per test and searched
for in everything the test can see.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from upstream import TestPKI, Upstream, serve

ROOT = Path(__file__).resolve().parent.parent
SEALGATE = ROOT / ".venv" / "bin" / "sealgate"
NODE_DIR = ROOT / "tests" / "node"


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
    for s in servers:
        s.shutdown()


@pytest.fixture(scope="module")
def api(make_upstream) -> Upstream:
    """An HTTPS upstream on 127.0.0.1: the allowed origin of most tests."""
    return make_upstream("127.0.0.1")


@pytest.fixture(scope="module")
def evil(make_upstream) -> Upstream:
    """An HTTPS upstream on 127.0.0.2: somewhere a value must never go."""
    return make_upstream("127.0.0.2")


# --- the proxy -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proxy:
    dir: Path
    env: dict[str, str]
    port: int
    log: Path
    proc: subprocess.Popen | None = None

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
        p = subprocess.run([str(SEALGATE), *args], input=input, capture_output=True, text=True, env=self.env,
                           timeout=60)
        if check and p.returncode != 0:
            raise AssertionError(f"sealgate {' '.join(args)} failed: {p.stderr}")
        return p

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
        """Run `sealgate run` (with the dashboard when web: SEALGATE_WEB_PORT and _PASSWORD are set)."""
        out = self.log.open("ab")
        if web:
            self.env.setdefault("SEALGATE_WEB_PORT", str(free_port()))
            self.env.setdefault("SEALGATE_WEB_PASSWORD", secrets.token_urlsafe(16))
        self.proc = subprocess.Popen([str(SEALGATE), "run", *([] if web else ["--no-web"])], env=self.env,
                                     stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        ports = [self.port, int(self.env["SEALGATE_METRICS_PORT"])]  # the proxy, its probes, its dashboard
        for port in ports + ([int(self.env["SEALGATE_WEB_PORT"])] if web else []):
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"sealgate run exited: {self.log.read_text()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise AssertionError("sealgate run did not start listening") from None
                    time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def visible_to_operators(self) -> bytes:
        """The proxy's output and every file it wrote (store, key, CA), raw."""
        blobs = [self.log.read_bytes() if self.log.exists() else b""]
        for d in (self.data_dir, Path(self.env["SEALGATE_CERTS_DIR"])):
            for f in d.rglob("*"):
                if f.is_file():
                    blobs.append(f.read_bytes())
        return b"\n".join(blobs)


def make_proxy(tmp: Path, pki: TestPKI, **env: str) -> Proxy:
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
    )
    full.update(env)
    return Proxy(tmp, full, port, tmp / "proxy.log")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, pki):
    p = make_proxy(tmp_path_factory.mktemp("sealgate"), pki)
    p.start()
    yield p
    p.stop()


# --- per-test identities and values ---------------------------------------------------------

@pytest.fixture
def user() -> str:
    return f"user-{secrets.token_hex(4)}"


@pytest.fixture
def value() -> str:
    """A fresh secret value; every test that makes one checks it never shows up where it must not."""
    return f"sk-test-{secrets.token_urlsafe(24)}"


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
