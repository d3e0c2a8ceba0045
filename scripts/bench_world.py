"""The world scripts/bench.py measures in: a temporary folder with a test CA and two local HTTPS upstreams
(tests/upstream.py's recording server in this process, scripts/bench_upstream.py in its own), a sealgate
store holding one secret of user `bench` allowed to both, a session for it, and the proxies under test
started the way a user starts them. The secret's value is generated here and never printed."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench_common import BIN, ROOT, Procs, free_port, read_until, wait_listening

sys.path.insert(0, str(ROOT / "tests"))
from upstream import LOOPBACK_SANS, TestPKI, Upstream, serve  # noqa: E402

SEALGATE = BIN / "sealgate"
SECRET = "K"  # the one secret's name: its placeholder is session.placeholder


@dataclass
class Session:
    id: str
    credential: str
    placeholder: str  # of SECRET

    def proxy_url(self, port: int) -> str:
        return f"http://{self.id}:{self.credential}@127.0.0.1:{port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.placeholder}"}


@dataclass
class Proxy:
    """A proxy under test: its process (CPU counted with all its children), where it listens, and for a
    dashboard where its websocket is and what opens it (a password or mitmweb's token: never printed)."""

    name: str
    proc: subprocess.Popen
    port: int
    ca: str  # what a client trusts to talk TLS through it
    session: Session | None = None  # sealgate: the proxy authenticates the session
    web_port: int | None = None
    web_token: str | None = None

    def url(self) -> str:
        return self.session.proxy_url(self.port) if self.session else f"http://127.0.0.1:{self.port}"


def cli(cmd: list[str], env: dict[str, str], cwd: Path, stdin: str | None = None) -> str:
    out = subprocess.run(cmd, input=stdin, env=env, cwd=cwd, capture_output=True, text=True)
    if out.returncode:  # sealgate's own messages never hold a value
        raise SystemExit(f"bench: {' '.join(cmd[1:3])} failed: {out.stderr.strip()[-500:]}")
    return out.stdout


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 60) -> None:
    """Until the probe answers 200 (with --workers: every proxy process is up)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"bench: {url} never said ready")


class World:
    def __init__(self, tmp: Path, procs: Procs, store_url: str | None = None) -> None:
        self.tmp, self.procs = tmp, procs
        self.pki = TestPKI.create(tmp)
        self.value = f"sk-bench-{secrets.token_urlsafe(24)}"
        self.recording, _ = serve(self.pki)  # the main table's upstream: it records what it got
        cert, key = self.pki.issue("lean", LOOPBACK_SANS)
        self.lean_proc = procs.start([BIN / "python", ROOT / "scripts" / "bench_upstream.py", cert, key], output=True)
        self.lean = Upstream("127.0.0.1", int(read_until(self.lean_proc, r"^(\d+)$").group(1)), "https")
        base = {k: v for k, v in os.environ.items() if not k.startswith("SEALGATE_") and "PROXY" not in k.upper()}
        self.env = {**base, "SEALGATE_DATA_DIR": str(tmp / "data"), "SEALGATE_CERTS_DIR": str(tmp / "certs"),
                    "SEALGATE_UPSTREAM_CA": str(self.pki.ca_pem), "SEALGATE_ALLOW_PRIVATE": "127.0.0.1/32",
                    **({"SEALGATE_STORE_URL": store_url} if store_url else {})}
        self.origins = [self.recording.origin, self.lean.origin]
        self.session = self.issue(SEALGATE, self.env, ROOT)
        self.baseline_session: Session | None = None
        self.ca = str(tmp / "certs" / "mitmproxy-ca-cert.pem")

    def issue(self, sealgate: Path, env: dict[str, str], cwd: Path) -> Session:
        """Add the secret (allowed to the upstreams) to the store env names, and a session for its user."""
        cli([str(sealgate), "secret", "add", "--user", "bench", "--name", SECRET, "--origins", ",".join(self.origins)],
             env, cwd, stdin=self.value)
        doc = json.loads(cli([str(sealgate), "session", "issue", "--access", "signed-in", "--user", "bench",
                               "--runchat", "r", "--instance", "i"], env, cwd))
        cred = doc["proxy_url"].split("//", 1)[1].split("@", 1)[0].split(":", 1)[1]
        return Session(doc["session_id"], cred, doc["env"][SECRET])

    def allow(self, origin: str) -> None:
        """One more origin for the secret (the proxies see it within a second)."""
        self.origins.append(origin)
        cli([str(SEALGATE), "secret", "set-origins", "--user", "bench", "--name", SECRET, "--origins",
              ",".join(self.origins)], self.env, ROOT)

    def sealgate(self, name: str, *args: str, web: bool = False, sealgate: Path = SEALGATE, cwd: Path = ROOT,
                 env: dict[str, str] | None = None, session: Session | None = None,
                 launcher: Sequence[str] = (), wait: float = 60) -> Proxy:
        """`sealgate run ARGS` on fresh ports (API and metrics on, as `./scripts/run` has them); web: with
        its dashboard (password generated here), else --no-web; launcher: what runs it (e.g. valgrind)."""
        port, web_port, password = free_port(), free_port(), secrets.token_urlsafe(18)
        run_env = {**(env or self.env), "SEALGATE_LISTEN_PORT": str(port), "SEALGATE_API_PORT": str(free_port()),
                   "SEALGATE_METRICS_PORT": str(free_port()),
                   **({"SEALGATE_WEB_PORT": str(web_port), "SEALGATE_WEB_PASSWORD": password} if web else {})}
        proc = self.procs.start([*launcher, sealgate, "run", *([] if web else ["--no-web"]), *args], run_env, cwd=cwd)
        wait_listening(proc, port, *([web_port] if web else []), timeout=wait)
        wait_ready(proc, f"http://127.0.0.1:{run_env['SEALGATE_METRICS_PORT']}/readyz", timeout=wait)
        return Proxy(name, proc, port, self.ca, session or self.session, web_port if web else None,
                     password if web else None)

    def _mitm_opts(self, port: int) -> list[str]:
        return ["--listen-host", "127.0.0.1", "-p", str(port), "--set", f"confdir={self.tmp / 'certs'}",
                "--set", f"ssl_verify_upstream_trusted_ca={self.pki.ca_pem}"]

    def mitmdump(self, name: str, *extra: str, launcher: Sequence[str] = (), wait: float = 60) -> Proxy:
        port = free_port()
        proc = self.procs.start([*launcher, BIN / "mitmdump", "-q", *self._mitm_opts(port), *extra], self.env)
        wait_listening(proc, port, timeout=wait)
        return Proxy(name, proc, port, self.ca)

    def mitmweb(self, name: str) -> Proxy:
        """mitmweb as a user starts it; the token it prints for its UI is read from its output, kept, and
        the rest of its output dropped."""
        port, web_port = free_port(), free_port()
        proc = self.procs.start([BIN / "mitmweb", "--no-web-open-browser", *self._mitm_opts(port),
                                 "--web-port", str(web_port)], self.env, output=True)
        token = read_until(proc, r"\?token=([0-9a-f]+)").group(1)
        wait_listening(proc, port, web_port)
        return Proxy(name, proc, port, self.ca, web_port=web_port, web_token=token)

    def baseline(self, checkout: Path, launcher: Sequence[str] = (), wait: float = 60) -> Proxy:
        """That checkout's `sealgate run --no-web`, on a store of its own (it may not read this one's)."""
        sealgate = checkout / ".venv" / "bin" / "sealgate"
        env = {**self.env, "SEALGATE_DATA_DIR": str(self.tmp / "baseline-data")}
        env.pop("SEALGATE_STORE_URL", None)
        if self.baseline_session is None:  # (once: a second start of it shares the first's store)
            self.baseline_session = self.issue(sealgate, env, checkout)
        session = self.baseline_session
        return self.sealgate("baseline sealgate --no-web", sealgate=sealgate, cwd=checkout, env=env, session=session,
                             launcher=launcher, wait=wait)
