"""`sealgate run --workers N`: N proxy processes on one port, and the process that runs them.

Each proxy process is the proxy `sealgate run` runs alone (`runner.serve_worker`), accepting on the same
listening sockets, which this process bound and passes on (`bind`, `internals.listen_on`): one accept queue,
each connection taken by a process that is free to take it, and kept while no process is up. Each has its
own store connection, audit queue, scrubbers and dashboard mirror; what must hold for the
whole gateway is in the store, shared by all: sessions (a revocation reaches every process), caps and rates
(one atomic count per request), the audit trail. Connection limits are split: each process takes
limit // N of `max_connections` and `max_session_connections` (settings refuse a limit below N), so the
gateway stays within them.

This process, the supervisor, proxies nothing. It starts the dashboard and the API once, then the proxy
processes (settings in their environment: a store URL or the master key is never on a command line), and
answers the probe port for all of them: each serves its probes on a Unix socket of its own, which the
supervisor asks (/readyz: ready when every process is; /metrics: every process's, labelled `worker`). A
process that dies after it listened is started again; one that cannot start stops the gateway (exit 1, for
the orchestrator to see). SIGTERM drains every process (`runner._stop`) and exits 0; every child dies with
the supervisor, however it ends (`runner._die_with_parent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector

from . import ca, internals, keys, runner
from .addon import AUDIT_FLUSH
from .probes import ProbeServer
from .settings import Settings

log = logging.getLogger("sealgate")

START_WITHIN = 60.0  # seconds a proxy process has to answer on its probe socket once started
RESTART_AFTER = 1.0  # seconds between a proxy process's death and its replacement
ASK_WITHIN = 5.0  # seconds a proxy process has to answer the supervisor's probe
ANSWER_MAX = 16 * 1024 * 1024  # bytes of a probe answer the supervisor reads from a proxy process
LOOK_EVERY = 0.2  # seconds between looks at whether each proxy process still runs


class Failed(Exception):
    """The gateway cannot run (a proxy process could not start, or did not stop): one line, exit 1."""


@dataclasses.dataclass
class Slot:
    """One proxy process of the gateway, and the ones started in its place."""

    index: int
    probes: str  # the Unix socket it answers the probes on
    proc: subprocess.Popen | None = None
    restarts: int = 0


class Supervisor:
    def __init__(self, settings: Settings, workdir: Path, mirror_socket: str | None,
                 listening: list[socket.socket] | None = None) -> None:
        n = settings.workers
        self.settings = settings
        self.sockets = listening or []  # the proxy's sockets (`bind`): every proxy process accepts on them
        # each process takes its share of the connection limits: the gateway stays within them
        self.shared = dataclasses.replace(settings, max_connections=settings.max_connections // n,
                                          max_session_connections=settings.max_session_connections // n)
        self.mirror_socket = mirror_socket
        self.slots = [Slot(i, str(workdir / f"proxy-{i}.sock")) for i in range(n)]
        self.loads = internals.Loads.create(n)  # each process's connections: a burst is shared (internals._Shared)
        self.stopping = False
        self.own = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.own)

    # the proxy processes ---------------------------------------------------------------------------

    def start(self, slot: Slot) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slot.probes)
        env = {k: v for k, v in os.environ.items() if k not in (keys.ENV_VAR, "SEALGATE_WEB_PASSWORD")}
        fds = [s.fileno() for s in self.sockets]
        self.loads.set(slot.index, internals.Loads.IDLE_SLOT)  # (until it accepts: none waits for it)
        env[runner.WORKER_ENV] = json.dumps({"index": slot.index, "settings": self.shared.to_json(),
                                             "probes": slot.probes, "mirror": self.mirror_socket, "listen": fds,
                                             "loads": [self.loads.fd, self.loads.slots]})
        if self.settings.master_key:
            env[keys.ENV_VAR] = self.settings.master_key
        slot.proc = subprocess.Popen([sys.executable, *runner.SAFE_PATH, "-m", "sealgate.runner"], stdin=subprocess.DEVNULL,
                                     env=env, pass_fds=[*fds, self.loads.fd], preexec_fn=runner._die_with_parent)

    async def listening(self, slot: Slot) -> None:
        """Wait until the process answers on its probe socket (it listens on the port before); Failed if it
        exits or takes longer than START_WITHIN."""
        end = time.monotonic() + START_WITHIN
        while (await self.ask(slot, "/healthz"))[0] != 200:
            if slot.proc is None or slot.proc.poll() is not None:
                raise Failed(f"proxy process {slot.index} {_ended(slot.proc)} before it listened")
            if time.monotonic() > end:
                raise Failed(f"proxy process {slot.index} did not start within {START_WITHIN:g} s")
            await asyncio.sleep(0.1)

    async def keep(self, slot: Slot) -> None:
        """Start the process again whenever it dies (the orchestrator sees nothing); Failed if the new one
        cannot start."""
        while True:
            while slot.proc is not None and slot.proc.poll() is None:
                await asyncio.sleep(LOOK_EVERY)
            self.loads.set(slot.index, internals.Loads.IDLE_SLOT)  # (the others take every connection meanwhile)
            log.error("sealgate: proxy process %d (pid %d) %s; starting another", slot.index, slot.proc.pid,
                      _ended(slot.proc))
            await asyncio.sleep(RESTART_AFTER)
            slot.restarts += 1
            self.start(slot)
            await self.listening(slot)
            log.warning("sealgate: proxy process %d (pid %d) listens again", slot.index, slot.proc.pid)

    async def stop(self, sig: int) -> list[str]:
        """Send sig to every process (SIGTERM: each drains; SIGINT: each stops at once) and wait for them to
        end; what went wrong, as sentences (a process that had to be killed, or that exited with an error)."""
        self.stopping = True
        for s in self.sockets:  # the port closes as the last process stops listening (no queue left unanswered)
            s.close()
        running = [s for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for slot in running:
            slot.proc.send_signal(sig)
        end = time.monotonic() + self.settings.shutdown_grace + AUDIT_FLUSH + 10
        while any(s.proc.poll() is None for s in running) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        wrong = []
        for slot in running:
            if slot.proc.poll() is None:
                slot.proc.kill()
                slot.proc.wait()
                wrong.append(f"proxy process {slot.index} did not stop in time and was killed")
            elif slot.proc.returncode not in (0, -sig):  # (-sig: stopped before it took signals: it had not listened)
                wrong.append(f"proxy process {slot.index} {_ended(slot.proc)} while stopping")
        return wrong

    # the probes, for the whole gateway --------------------------------------------------------------

    async def ask(self, slot: Slot, path: str) -> tuple[int, str]:
        """GET path from the process's probe server: (status, body); status 0 when it does not answer."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(slot.probes), ASK_WITHIN)
        except (OSError, TimeoutError):
            return 0, ""
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: sealgate\r\n\r\n".encode())
            data = await asyncio.wait_for(_at_most(reader, ANSWER_MAX), ASK_WITHIN)  # it closes after answering
            head, _, body = data.partition(b"\r\n\r\n")
            return int(head.split(b" ", 2)[1]), body.decode()
        except (OSError, TimeoutError, ValueError, IndexError):
            return 0, ""
        finally:
            writer.close()

    async def why_not_ready(self) -> str | None:
        """None when every process is ready, else why not (the first that is not)."""
        if self.stopping:
            return "the proxy is stopping"
        answers = await asyncio.gather(*(self.ask(s, "/readyz") for s in self.slots))
        for slot, (status, body) in zip(self.slots, answers, strict=True):
            if status == 0:
                return f"proxy process {slot.index} does not answer (starting, or gone)"
            if status != 200:
                with contextlib.suppress(ValueError, AttributeError):
                    body = json.loads(body).get("reason", body)
                return f"proxy process {slot.index}: {body}"
        return None

    async def metrics(self) -> str:
        """Every process's metrics labelled worker="<index>", the supervisor's own as worker="supervisor", and
        per process whether it answered, its pid and how many times it was started again."""
        answers = await asyncio.gather(*(self.ask(s, "/metrics") for s in self.slots))
        up = GaugeMetricFamily("sealgate_worker_up", "Whether each proxy process answered this scrape.",
                               labels=["worker"])
        pids = GaugeMetricFamily("sealgate_worker_pid", "The process id of each proxy process.", labels=["worker"])
        restarts = CounterMetricFamily("sealgate_worker_restarts", "Proxy processes started again after one died.",
                                       labels=["worker"])
        parts: list[tuple[str, Iterable[Metric]]] = [("supervisor", self.own.collect())]
        for slot, (status, body) in zip(self.slots, answers, strict=True):
            worker = str(slot.index)
            try:
                families = list(text_string_to_metric_families(body)) if status == 200 else None
            except ValueError:
                families = None
            up.add_metric([worker], 1 if families is not None else 0)
            if slot.proc is not None:
                pids.add_metric([worker], slot.proc.pid)
            restarts.add_metric([worker], slot.restarts)
            if families is not None:
                parts.append((worker, families))
        return merged(parts, [up, pids, restarts])


async def _at_most(reader: asyncio.StreamReader, most: int) -> bytes:
    """Everything until the other end closes; ValueError past `most` bytes."""
    data = b""
    while chunk := await reader.read(65536):
        data += chunk
        if len(data) > most:
            raise ValueError(f"an answer of more than {most} bytes")
    return data


def merged(parts: Iterable[tuple[str, Iterable[Metric]]], extra: Iterable[Metric] = ()) -> str:
    """Prometheus text of the metric families of each part, every sample labelled worker="<its part>", one
    family per name (HELP and TYPE once), then the extra families as they are."""
    extra = list(extra)
    reserved = {e.name for e in extra} | {s.name for e in extra for s in e.samples}  # the supervisor's own
    owner: dict[str, str] = {}  # a series name: the family it belongs to
    families: dict[str, Metric] = {}
    for worker, metrics in parts:
        for family in metrics:
            names = {family.name} | {s.name for s in family.samples}
            if names & reserved or any(owner.get(n, family.name) != family.name for n in names) or (
                    family.name in families and families[family.name].type != family.type):
                continue  # a process's family that would shadow or duplicate another's series: left out
            owner |= dict.fromkeys(names, family.name)
            into = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                           family.unit))
            into.samples += [s._replace(labels={**s.labels, "worker": worker}) for s in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), *extra]))
    return generate_latest(registry).decode()


class _Families:
    """A collector of families already made."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class GatewayProbes(ProbeServer):
    """The probe port of the gateway: /healthz from the supervisor, /readyz and /metrics from every process."""

    def __init__(self, host: str, port: int, supervisor: Supervisor) -> None:
        super().__init__(host, port, None, lambda: None)  # type: ignore[arg-type]  # both answered below
        self.supervisor = supervisor

    async def respond(self, path: str) -> tuple[int, str, str]:
        if path == "/readyz":
            why = await self.supervisor.why_not_ready()
            return (200 if why is None else 503), "application/json", json.dumps(
                {"ready": why is None, **({"reason": why} if why else {})}) + "\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", await self.supervisor.metrics()
        return self.answer(path)


# the gateway ----------------------------------------------------------------------------------------

async def serve(settings: Settings) -> None:
    """`sealgate run` with settings.workers > 1: until SIGTERM (exit 0) or SIGINT; Failed when it cannot run."""
    _check(settings)
    listening = bind(settings.listen_host, settings.listen_port)
    settings = dataclasses.replace(settings, listen_port=listening[0].getsockname()[1])  # (port 0: the one it got)
    runner._output()
    said = logging.StreamHandler()  # the supervisor's lines, stamped as the proxy processes' are
    said.setFormatter(logging.Formatter("[%(asctime)s.%(msecs)03d] %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(said)
    with contextlib.ExitStack() as closing, tempfile.TemporaryDirectory(prefix="sealgate-gateway-") as workdir:
        for s in listening:
            closing.callback(s.close)
        async with runner.dashboard_and_api(settings, Path(workdir)) as (mirror_socket, password):
            supervisor = Supervisor(settings, Path(workdir), mirror_socket, listening)
            probes = GatewayProbes(*settings.metrics, supervisor) if settings.metrics is not None else None
            if probes is not None:
                try:
                    await probes.start()
                except OSError as e:
                    raise Failed(f"cannot serve the probes on {settings.metrics[0]}:{settings.metrics[1]}: "
                                 f"{e.strerror or e}") from None
            try:
                await _supervise(supervisor, runner.announcement(settings, password))
            finally:
                if probes is not None:
                    await probes.stop()


def _check(settings: Settings) -> None:
    """What would make every proxy process fail, found once: another mitmproxy, a bad providers file or upstream
    CA file. The CA and the upstream trust bundle are written here, once: N processes writing them at start
    would race (one reading what another has half written)."""
    if missing := internals.listen_problems():
        raise Failed("this mitmproxy lacks what `--workers` needs: " + "; ".join(missing))
    settings.registry()
    ca.ensure_ca(settings.certs_dir)
    ca.upstream_bundle(settings.certs_dir, settings.upstream_ca)  # the processes use it as it is (serve_worker)


def bind(host: str, port: int) -> list[socket.socket]:
    """The proxy's listening sockets, one per address the host has, bound and listening here, for the proxy
    processes to accept on (`internals.listen_on`): they inherit them, and they outlive any one of them. A
    port taken (by anything: no SO_REUSEPORT) is Failed."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise Failed(f"cannot listen on {host}:{port}: {e.strerror}") from None
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in addresses:
            if bound and not port:  # port 0: every address on the port the first one got
                address = (address[0], bound[0].getsockname()[1], *address[2:])
            s = socket.socket(family, kind, proto)
            bound.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does: TIME_WAIT is no owner
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(address)
            s.listen(internals.BACKLOG)
            # (not inheritable: pass_fds hands it to the proxy processes, and nothing else this process starts)
    except OSError as e:
        for s in bound:
            s.close()
        raise Failed(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return bound


async def _supervise(supervisor: Supervisor, announcement: list[str]) -> None:
    loop = asyncio.get_running_loop()
    asked: asyncio.Future[int] = loop.create_future()  # the signal that stops the gateway
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda sig=sig: asked.done() or asked.set_result(sig))
    keepers: list[asyncio.Task] = []
    failure: BaseException | None = None
    try:
        for slot in supervisor.slots:
            supervisor.start(slot)
        starting = loop.create_task(_all_listening(supervisor))
        await asyncio.wait([starting, asked], return_when=asyncio.FIRST_COMPLETED)
        if not asked.done():
            starting.result()  # Failed, if one could not start
            pids = ", ".join(str(s.proc.pid) for s in supervisor.slots)
            sys.stderr.write("\n".join([*announcement, f"sealgate: {len(supervisor.slots)} proxy processes share "
                                        f"{supervisor.settings.listen_host}:{supervisor.settings.listen_port} "
                                        f"(pids {pids})\n"]))  # one write: the processes' lines go there too
            keepers = [loop.create_task(supervisor.keep(s)) for s in supervisor.slots]
            await asyncio.wait([asked, *keepers], return_when=asyncio.FIRST_COMPLETED)
            failure = next((k.exception() for k in keepers if k.done()), None)
        else:
            starting.cancel()
    except Failed as e:
        failure = e
    finally:
        for k in keepers:
            k.cancel()
        if failure is not None:
            log.error("sealgate: %s; stopping every proxy process", failure)
        wrong = await supervisor.stop(asked.result() if asked.done() else signal.SIGTERM)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if failure is not None:
        raise failure if isinstance(failure, Failed) else Failed(str(failure))
    if wrong:
        raise Failed("; ".join(wrong))


async def _all_listening(supervisor: Supervisor) -> None:
    for slot in supervisor.slots:  # (all started already: each is waited for in turn)
        await supervisor.listening(slot)


def _ended(proc: subprocess.Popen | None) -> str:
    """How a process ended, as words."""
    code = None if proc is None else proc.poll()
    if code is None:
        return "is not running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"
