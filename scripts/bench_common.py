"""What every section of scripts/bench.py shares: processes (started, waited for, stopped, their CPU and
memory read from /proc, children included), rounds in rotated order, and results as tables and ratios
that print and serialise alike."""

from __future__ import annotations

import os
import platform
import re
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
TICK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


# --- processes -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_listening(proc: subprocess.Popen, *ports: int, timeout: float = 60, poll: float = 0.05) -> float:
    """Seconds until every port accepts; SystemExit if proc exits or the time runs out."""
    start = time.perf_counter()
    while not all(map(accepts, ports)):
        if proc.poll() is not None:
            raise SystemExit(f"bench: exited early (code {proc.returncode}): {' '.join(map(str, proc.args[:3]))} ...")
        if time.perf_counter() - start > timeout:
            raise SystemExit(f"bench: not listening on {ports} after {timeout} s: {proc.args[0]}")
        time.sleep(poll)
    return time.perf_counter() - start


class Procs:
    """The processes a section started; all stopped (by their own pid) when it ends."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, cmd: Sequence[str | Path], env: dict[str, str] | None = None, *, cwd: Path | None = None,
              output: bool = False) -> subprocess.Popen:
        """output: stdout (with stderr) as a text pipe, for a line the caller reads; else discarded."""
        proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if output else subprocess.DEVNULL,
                                stderr=subprocess.STDOUT if output else subprocess.DEVNULL, text=output)
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.started.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.started[:]):
            self.stop(proc)


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 60) -> re.Match[str]:
    """The first match of pattern in proc's output; the rest of its output is then read and dropped
    (a thread), so it never blocks on a full pipe. What is read is never printed."""
    assert proc.stdout is not None
    found: list[re.Match[str]] = []
    ready = threading.Event()

    def pump() -> None:
        with proc.stdout:  # type: ignore[union-attr]  # closed here, at the end of the output
            for line in proc.stdout:  # type: ignore[union-attr]
                if not found and (m := re.search(pattern, line)):
                    found.append(m)
                    ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout) or not found:
        raise SystemExit(f"bench: {proc.args[0]} never printed what was awaited ({pattern!r})")
    return found[0]


def tree(pid: int) -> list[int]:
    """pid and all its descendants, now (/proc/PID/task/*/children, recursively)."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            out += tree(int(child))
    return out


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0  # gone meanwhile
    return (int(fields[11]) + int(fields[12])) / TICK


def cpu_seconds(roots: Sequence[int]) -> float:
    """User + system CPU of roots and every descendant they have now."""
    return sum(process_cpu(p) for root in roots for p in tree(root))


def machine_busy() -> float:
    """CPU seconds every core of the machine has spent busy (not idle or waiting on I/O) since boot."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / TICK


def settled_cpu(roots: Sequence[int], quiet: float = 0.005, step: float = 0.1, limit: float = 3.0) -> float:
    """cpu_seconds once work left behind (a dashboard's copies, a websocket's sends) is done: when a step
    adds less than `quiet` seconds of CPU, or after `limit` seconds."""
    end = time.monotonic() + limit
    last = cpu_seconds(roots)
    while time.monotonic() < end:
        time.sleep(step)
        now = cpu_seconds(roots)
        if now - last < quiet:
            return now
        last = now
    return last


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakRss:
    """The highest VmRSS of a process while the `with` block runs (sampled every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mib(self.pid))
            if self._stop.wait(0.02):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rotated(items: Sequence[T], r: int) -> list[T]:
    """Round r starts at item r mod n: every item is measured early and late alike."""
    k = r % len(items)
    return [*items[k:], *items[:k]]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# --- the machine -------------------------------------------------------------------------------

def _version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else None


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)
    mitm = subprocess.run([BIN / "python", "-c", "from mitmproxy.version import VERSION; print(VERSION)"],
                          capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return {"cpu": model.group(1) if model else platform.processor(), "cores": os.cpu_count(),
            "ram_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
            "load_avg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "mitmproxy": mitm, "kernel": platform.release(), "commit": commit.stdout.strip() + (" (with changes)" if dirty else "") or None,
            "curl": _version(["curl", "--version"]), "nginx": _version(["nginx", "-v"])}


def machine_text(m: dict[str, Any]) -> str:
    end = f", at the end {m['load_avg_end']}" if "load_avg_end" in m else ""
    return (f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, load {m['load_avg']}{end}; "
            f"Python {m['python']}, mitmproxy {m['mitmproxy']}, commit {m['commit']}")


# --- results --------------------------------------------------------------------------------

@dataclass
class Column:
    key: str
    title: str
    fmt: str = "{:.0f}"

    def cell(self, row: dict[str, Any]) -> str:
        v = row.get(self.key)
        return "-" if v is None else self.fmt.format(v) if isinstance(v, int | float) else str(v)


@dataclass
class Table:
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def render(self) -> str:
        cells = [[c.title for c in self.columns]] + [[c.cell(r) for c in self.columns] for r in self.rows]
        widths = [max(len(line[i]) for line in cells) for i in range(len(self.columns))]
        lines = ["  ".join(t.ljust(w) if i == 0 else t.rjust(w) for i, (t, w) in enumerate(zip(line, widths)))
                 for line in cells]
        return "\n".join([self.title, *lines])

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "rows": self.rows}


@dataclass
class Ratio:
    what: str
    value: float | None
    target: str | None = None  # ">= 1.3" or "<= 0.75"

    @property
    def met(self) -> bool | None:
        if self.value is None or self.target is None:
            return None
        op, bound = self.target.split()
        return self.value >= float(bound) if op == ">=" else self.value <= float(bound)

    def render(self) -> str:
        value = "-" if self.value is None else f"{self.value:.2f}"
        verdict = "" if self.met is None else "  ok" if self.met else "  MISSED"
        target = f"  (target {self.target}){verdict}" if self.target else ""
        return f"  {self.what}: {value}{target}"


@dataclass
class Section:
    name: str
    tables: list[Table] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    def render(self) -> str:
        head = f"== {self.name} " + "=" * max(0, 70 - len(self.name))
        if self.skipped:
            return f"{head}\nskipped: {self.skipped}"
        parts = [head, *(t.render() for t in self.tables)]
        if self.ratios:
            parts.append("ratios:\n" + "\n".join(r.render() for r in self.ratios))
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "tables": [t.to_json() for t in self.tables],
                "ratios": [{**asdict(r), "met": r.met} for r in self.ratios], "notes": self.notes}


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0



def curl(config: Path, env: dict[str, str], *, ca: str, proxy: str | None, headers: dict[str, str],
         urls: Sequence[str], options: Sequence[str] = ()) -> tuple[list[list[str]], float]:
    """Run curl on a config file written with these settings (the proxy URL holds a session's credential:
    it goes in a file of mode 0600, not on argv); (each transfer's --write-out fields, seconds)."""
    lines = [f'cacert = "{ca}"', "http1.1", "silent", "show-error", *options,
             *(f'header = "{k}: {v}"' for k, v in headers.items()), *([f'proxy = "{proxy}"'] if proxy else []),
             *(f'url = "{u}"\noutput = "/dev/null"' for u in urls)]
    config.touch(0o600)
    config.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    out = subprocess.run(["curl", "-K", str(config)], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"bench: curl exited {out.returncode}: {out.stderr.strip()[-300:]}")
    return [line.split() for line in out.stdout.splitlines()], elapsed
