"""Every worker runtime of docs/workers.md, its recipe run word for word through a running sealgate with
the session in its environment only: the upstream gets the value, the worker never sees it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NODE_DIR, ROOT
from test_proxy import leaks

RECIPES = dict(re.findall(r"```sh (\w+)\n(.*?)\n```", (ROOT / "docs" / "workers.md").read_text(), re.S))


def test_the_docs_have_every_runtime():
    assert set(RECIPES) == {"curl", "requests", "httpx", "node", "deno"}


@pytest.fixture(scope="module")
def keyed(proxy_in_process, make_upstream):
    import secrets
    api = make_upstream("127.0.0.1")
    user, value = f"user-{secrets.token_hex(4)}", f"sk-test-{secrets.token_urlsafe(24)}"
    from conftest import CREATED_VALUES
    CREATED_VALUES.append(value)
    proxy_in_process.add_secret(user, "KEY", value, api.origin)
    return api, proxy_in_process.issue(user=user), value


@pytest.mark.parametrize("runtime", sorted(RECIPES))
def test_each_runtime_through_sealgate(keyed, runtime):
    api, s, value = keyed
    ca = s["ca_cert"]
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper() and not k.startswith("SEALGATE_")}
    env.update(HTTPS_PROXY=s["proxy_url"], HTTP_PROXY=s["proxy_url"], SSL_CERT_FILE=ca, REQUESTS_CA_BUNDLE=ca,
               NODE_EXTRA_CA_CERTS=ca, DENO_CERT=ca, URL=api.url(f"/{runtime}"), KEY=s["env"]["KEY"],
               PATH=os.pathsep.join([str(Path(sys.executable).parent), str(NODE_DIR / "node_modules" / ".bin"),
                                     env.get("PATH", "")]), DENO_NO_UPDATE_CHECK="1", DENO_DIR=str(NODE_DIR / ".deno"))
    before = len(api.received)
    done = subprocess.run(["bash", "-c", RECIPES[runtime]], env=env, cwd=NODE_DIR, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-600:]
    assert done.stdout.startswith(b"200") or runtime == "curl", done.stdout[:200]
    [got] = api.received[before:]
    assert got.path == f"/{runtime}" and got.header("X-Key") == value
    assert not leaks(value, done.stdout, done.stderr)
