"""The soak, short: 15 s of mixed traffic (injecting, blocked, streamed, SSE, WebSocket, garbage) from 8
clients through a real `sealgate run` with its dashboard and API (scripts/soak.py, run as operators run
it). Every kind must get its right answers, no value may show up anywhere a client or an operator can
see, and memory must not keep growing. The long run's figures are in the README."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFUSING = {"blocked", "garbage"}  # kinds whose right answer is a refusal


@pytest.mark.e2e  # real processes, 15 s of traffic by design
def test_short_soak_serves_every_kind_leaks_nothing_and_stays_flat(tmp_path):
    report = tmp_path / "soak.json"
    p = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "scripts" / "soak.py"), "--duration", "15",
                        "--clients", "8", "--json", str(report)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    print(p.stdout)  # the report (it never holds a value: the soak counts them, it does not print them)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(report.read_text())
    for kind, k in r["kinds"].items():
        assert k["refused" if kind in REFUSING else "served"] > 0, f"{kind}: {k}"
    assert r["values_seen"]["clients"] == 0 and not any(r["values_seen"].values()), r["values_seen"]
    assert {"dashboard", "audit --json", "proxy stdout/stderr", "data and certs dirs", "blocked upstream"} <= set(r["values_seen"])
    assert r["errors"] <= 0.01 * r["operations"], r["kinds"]
    assert {name.split()[0] for name in r["rss_mib"]} == {"proxy", "dashboard", "api"}, r["rss_mib"]
    for name, rss in r["rss_mib"].items():
        assert rss["second_half_growth"] < 50, f"{name} grew {rss['second_half_growth']:.1f} MiB in the second half"
