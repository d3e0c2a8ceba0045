"""Soak: mixed traffic through a real `sealgate run` from many concurrent clients for a bounded time, to
find what a short test cannot: errors under load, memory that keeps growing, slow answers, and any
secret value where it must not be.

Kinds (shares set by --mix): `inject` (a placeholder in a header, sometimes in a JSON body too, to an
upstream that echoes the request: the value goes up and must come back scrubbed), `blocked` (a
placeholder to an origin its secret does not allow: 403 origin_not_allowed), `upload` (1.5 MiB chunked
with three placeholders, echoed back byte for byte), `sse` (an event stream repeating the filled value,
cut across chunks), `websocket` (placeholder-bearing messages, echoed), `garbage` (raw connections:
junk, half heads, stalls, missing or wrong credentials, junk inside a tunnel).

The load generator is one asyncio loop (httpx; raw streams for WebSocket and garbage), no thread per
client, so it stays cheap on a 2-core machine; the upstreams run in a process of their own so their
threads never hold its GIL. Clients are closed-loop: the proxy is saturated and latencies include its
queueing. Exit 1 when a value was seen, the error rate passed --max-error-rate, or the proxy died.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import multiprocessing
import os
import random
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from upstream import RawUpstream, TestPKI, header, serve  # (tests/ is on the path now)

SEALGATE = str(ROOT / ".venv" / "bin" / "sealgate")
KINDS = ("inject", "blocked", "upload", "sse", "websocket", "garbage")
REFUSING = ("blocked", "garbage")  # kinds whose right outcome is a refusal
MIX = "inject=40,blocked=15,upload=5,sse=10,websocket=15,garbage=15"
GARBAGE = ("junk", "half-head", "stall", "no-auth", "bad-auth", "tls-junk", "bad-request")
SSE_EVENTS, UPLOAD_BYTES, CHUNK, OP_TIMEOUT = 10, 3 << 19, 1 << 16, 30.0
STORE_FILES = re.compile(r"sealgate\.db(-wal|-shm|-journal)?$")  # the encrypted store: ciphertexts


class Unexpected(Exception):
    """An answer the proxy should not have given (the text is ours, never what was received)."""


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise Unexpected(what)


def status(head: bytes) -> str:
    return head.split(b"\r\n", 1)[0][:40].decode("latin-1") or "nothing"


def xor(data: bytes, key: bytes) -> bytes:
    n = len(data)
    return (int.from_bytes(data, "big") ^ int.from_bytes((key * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")


def ws_frame(payload: bytes, opcode: int = 1, mask: bool = False) -> bytes:
    """One final frame; a client's is masked (RFC 6455)."""
    n, key = len(payload), os.urandom(4) if mask else b""
    size = bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big") if n < 65536 else bytes([127]) + n.to_bytes(8, "big")
    return bytes([0x80 | opcode, size[0] | (0x80 if mask else 0)]) + size[1:] + key + (xor(payload, key) if mask else payload)


def ws_parse(buf: bytes) -> tuple[int, bytes, bytes] | None:
    """(opcode, unmasked payload, rest) of the first whole frame in buf; None while incomplete."""
    if len(buf) < 2:
        return None
    n, at, masked = buf[1] & 0x7F, 2, buf[1] & 0x80
    if n >= 126:
        at = 4 if n == 126 else 10
        n = int.from_bytes(buf[2:at], "big") if len(buf) >= at else 1 << 62
    key, at = buf[at:at + 4], at + (4 if masked else 0)
    if len(buf) < at + n:
        return None
    return buf[0] & 0x0F, xor(buf[at:at + n], key) if masked else buf[at:at + n], buf[at + n:]


def upstreams(pki: TestPKI, values: list[bytes], conn) -> None:
    """The allowed origin (the tests' RawUpstream answering /echo, /upload, /sse, /ws) and the blocked one
    (the tests' echo server, on 127.0.0.2), in a process of their own. Every answer says how many values
    arrived filled in (X-Soak-Filled), so a client tells injection from a placeholder that went up as is."""
    def filled(data: bytes) -> int:
        return sum(data.count(v) for v in values)

    def websocket(head: bytes, sock) -> None:
        accept = base64.b64encode(hashlib.sha1(header(head, b"sec-websocket-key") + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        buf = b""
        while True:
            while (frame := ws_parse(buf)) is None:
                if not (data := sock.recv(65536)):
                    return None
                buf += data
            opcode, payload, buf = frame
            if opcode == 8:
                return sock.sendall(ws_frame(payload[:2], 8))
            if opcode in (1, 2):
                sock.sendall(ws_frame(b"filled=%d you sent " % filled(payload) + payload))

    def answer(head: bytes, body: bytes, sock) -> bytes | None:
        path, n = head.split(b" ", 2)[1], filled(head + body)
        if path.startswith(b"/ws"):
            return websocket(head, sock)
        if path.startswith(b"/sse"):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                         b"X-Soak-Filled: %d\r\n\r\n" % n)
            for i in range(SSE_EVENTS):
                event = b'id: %d\ndata: {"key": "%s"}\n\n' % (i, header(head, b"x-key"))
                cut = event.index(b'key": "') + 12  # inside the value: it arrives in two chunks
                for piece in (event[:cut], event[cut:]):
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                time.sleep(0.02)
            return b"0\r\n\r\n"
        if path.startswith(b"/upload"):
            out, kind = body, b"application/octet-stream"
        else:
            out, kind = json.dumps({"head": head.decode("latin-1"), "body": body.decode("latin-1")}).encode(), b"application/json"
        return b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\nX-Soak-Filled: %d\r\n\r\n%s" % (
            kind, len(out), n, out)

    allowed = RawUpstream(pki, answer)
    allowed.sock.listen(1024)  # its backlog of 16 drops connections under many clients' churn
    blocked, server = serve(pki, "127.0.0.2")
    server.socket.listen(1024)
    conn.send((allowed.port, blocked.port))
    leaked = 0
    while not conn.poll(0.5):  # flat memory: what arrived is checked, then dropped
        for kept in (allowed.received, allowed.body_sizes, allowed.body_hashes):
            kept.clear()
        while blocked.received:
            leaked += filled(blocked.received.pop().dump())
    conn.send(leaked)


@dataclass
class Session:
    proxy_url: str
    ph: str
    auth: str  # its Proxy-Authorization value


@dataclass
class Tally:
    served: int = 0
    refused: int = 0
    errors: Counter = field(default_factory=Counter)
    ms: list[float] = field(default_factory=list)


def raw(r: httpx.Response) -> bytes:
    return b"\n".join(k + b": " + v for k, v in r.headers.raw)


class Load:
    """The clients, what they counted, and the RSS samples taken meanwhile."""

    def __init__(self, args: argparse.Namespace, sessions: list[Session], values: list[str], port: int,
                 allowed: int, blocked: int, ca: str) -> None:
        self.args, self.sessions, self.values, self.port = args, sessions, [v.encode() for v in values], port
        self.target, self.allowed, self.blocked = f"127.0.0.1:{allowed}", f"https://127.0.0.1:{allowed}", f"https://127.0.0.2:{blocked}"
        self.ctx, self.raw_ctx = ssl.create_default_context(cafile=ca), ssl.create_default_context(cafile=ca)
        self.raw_ctx.set_alpn_protocols(["http/1.1"])
        mix = dict(part.split("=") for part in args.mix.split(","))
        self.weights = [float(mix.get(k, 0)) for k in KINDS]
        self.tally = {k: Tally() for k in KINDS}
        self.variants: Counter = Counter()
        self.seen = 0  # occurrences of a value in anything a client received
        self.filler = bytes(random.Random(args.seed).choices(b"abcdefghijklmnopqrstuvwxyz ,:\n", k=UPLOAD_BYTES))
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.t0 = self.elapsed = 0.0

    def saw(self, data: bytes) -> None:
        self.seen += sum(data.count(v) for v in self.values)

    def http(self, s: Session) -> httpx.AsyncClient:
        return httpx.AsyncClient(proxy=s.proxy_url, verify=self.ctx, trust_env=False, timeout=OP_TIMEOUT)

    async def client(self, i: int, deadline: float) -> None:
        rng, s = random.Random(self.args.seed * 1000 + i), self.sessions[i % len(self.sessions)]
        http = self.http(s)
        while time.monotonic() < deadline:
            kind, t0 = rng.choices(KINDS, self.weights)[0], time.perf_counter()
            try:
                outcome = await asyncio.wait_for(getattr(self, f"op_{kind}")(s, http, rng), OP_TIMEOUT)
                setattr(self.tally[kind], outcome, getattr(self.tally[kind], outcome) + 1)
            except Exception as e:  # noqa: BLE001 - every failure is counted, by kind and reason
                text = f"{type(e).__name__}: {e}"[:100].encode()
                self.saw(text)
                self.tally[kind].errors[re.sub(b"|".join(map(re.escape, self.values)), b"<VALUE>", text).decode()] += 1
                await http.aclose()  # its connections may be broken: new ones below
            self.tally[kind].ms.append((time.perf_counter() - t0) * 1000)
            if http.is_closed or rng.random() < self.args.churn:  # new tunnels and handshakes, as new workers bring
                await http.aclose()
                http = self.http(s)
        await http.aclose()

    async def op_inject(self, s: Session, http: httpx.AsyncClient, rng: random.Random) -> str:
        headers = {"Authorization": f"Bearer {s.ph}"}
        if rng.random() < 0.4:
            r, want = await http.post(self.allowed + "/echo", headers=headers, json={"key": s.ph, "n": rng.random()}), 2
        else:
            r, want = await http.get(self.allowed + f"/echo?n={rng.randrange(1 << 30)}", headers=headers), 1
        self.saw(raw(r) + r.content)
        expect(r.status_code == 200, f"inject: status {r.status_code}")
        expect(r.headers.get("x-soak-filled") == str(want), f"inject: {r.headers.get('x-soak-filled')} filled of {want}")
        expect(r.content.count(s.ph.encode()) >= want, "inject: the echo lacks the placeholder")
        return "served"

    async def op_blocked(self, s: Session, http: httpx.AsyncClient, rng: random.Random) -> str:
        if rng.random() < 0.5:
            r = await http.get(self.blocked + "/echo", headers={"X-Api-Key": s.ph})
        else:
            r = await http.post(self.blocked + "/echo", json={"key": s.ph})
        self.saw(raw(r) + r.content)
        code = r.headers.get("x-sealgate-error")
        expect(r.status_code == 403 and code == "origin_not_allowed", f"blocked: status {r.status_code} {code}")
        expect(r.headers.get("content-type", "").startswith("application/problem+json"), "blocked: not problem+json")
        return "refused"

    async def op_upload(self, s: Session, http: httpx.AsyncClient, rng: random.Random) -> str:
        ph, mid = s.ph.encode(), CHUNK * rng.randint(2, 20) - 7  # the middle placeholder straddles two chunks
        body = ph + self.filler[len(ph):mid] + ph + self.filler[mid + len(ph):-len(ph)] + ph

        async def chunks():
            for at in range(0, len(body), CHUNK):
                yield body[at:at + CHUNK]
        async with http.stream("POST", self.allowed + "/upload", content=chunks(),
                               headers={"Content-Type": "application/octet-stream"}) as r:
            data = b"".join([c async for c in r.aiter_bytes()])
        self.saw(raw(r) + data)
        expect(r.status_code == 200, f"upload: status {r.status_code}")
        expect(r.headers.get("x-soak-filled") == "3", f"upload: {r.headers.get('x-soak-filled')} filled of 3")
        expect(data == body, "upload: the echo differs from the body sent")
        return "served"

    async def op_sse(self, s: Session, http: httpx.AsyncClient, rng: random.Random) -> str:
        async with http.stream("GET", self.allowed + "/sse", headers={"X-Key": s.ph, "Accept": "text/event-stream"}) as r:
            data = b"".join([c async for c in r.aiter_bytes()])
        self.saw(raw(r) + data)
        expect(r.status_code == 200 and r.headers.get("x-soak-filled") == "1", f"sse: status {r.status_code}")
        expect(data.count(s.ph.encode()) == SSE_EVENTS, f"sse: {data.count(s.ph.encode())} events of {SSE_EVENTS}")
        return "served"

    async def tunnel(self, auth: str | None, tls: bool = True, refused: bool = False):
        """A raw CONNECT to the allowed upstream (then TLS); refused: expect 407 instead."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        cred = f"Proxy-Authorization: {auth}\r\n" if auth else ""
        writer.write(f"CONNECT {self.target} HTTP/1.1\r\nHost: {self.target}\r\n{cred}\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        self.saw(head)
        expect(status(head).split(" ")[1:2] == (["407"] if refused else ["200"]), f"CONNECT: {status(head)}")
        if tls and not refused:
            await writer.start_tls(self.raw_ctx, server_hostname="127.0.0.1")
        return reader, writer

    async def frame(self, reader: asyncio.StreamReader, buf: bytes) -> tuple[int, bytes, bytes]:
        while (got := ws_parse(buf)) is None:
            data = await reader.read(65536)
            expect(bool(data), "websocket: closed mid-session")
            buf += data
        return got

    async def op_websocket(self, s: Session, http: httpx.AsyncClient, rng: random.Random) -> str:
        reader, writer = await self.tunnel(s.auth)
        try:
            writer.write(f"GET /ws HTTP/1.1\r\nHost: {self.target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                         "Sec-WebSocket-Version: 13\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            self.saw(head)
            expect(head.startswith(b"HTTP/1.1 101"), f"websocket: {status(head)}")
            buf = b""
            for i in range(rng.randint(2, 6)):
                writer.write(ws_frame(json.dumps({"i": i, "auth": s.ph}).encode(), mask=True))
                opcode, payload, buf = await self.frame(reader, buf)
                self.saw(payload)
                expect(opcode == 1 and payload.startswith(b"filled=1 ") and s.ph.encode() in payload,
                       "websocket: a message came back wrong")
            writer.write(ws_frame(b"\x03\xe8", 8, mask=True))
            expect((await self.frame(reader, buf))[0] == 8, "websocket: no close frame")
            return "served"
        finally:
            writer.close()

    async def op_garbage(self, s: Session, http: httpx.AsyncClient, rng: random.Random) -> str:
        """What a broken or hostile worker sends; the proxy must refuse or close, and go on serving."""
        variant = rng.choice(GARBAGE)
        self.variants[variant] += 1
        if variant in ("no-auth", "bad-auth"):
            wrong = "Basic " + base64.b64encode(b"soak-wrong:x").decode()
            (await self.tunnel(None if variant == "no-auth" else wrong, refused=True))[1].close()
            return "refused"
        # junk with a head's end: answered at once. Not from 0x16 (a TLS record) or CR/LF (mitmproxy 12 waits for
        # more data after a blank line): those are held until header_timeout (30 s), found by this soak
        junk = os.urandom(rng.randint(1, 4096)) + b"\r\n\r\n"
        junk = b"\x00" + junk[1:] if junk[0] in b"\x16\r\n" else junk
        if variant in ("tls-junk", "bad-request"):
            reader, writer = await self.tunnel(s.auth, tls=variant == "bad-request")
            writer.write(junk if variant == "tls-junk" else b"GET /\x00 HTTP/9.9\r\nHost\r\n\r\n")
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            if variant != "junk":  # a half head, or nothing at all, then the worker goes away
                writer.write(f"CONNECT {self.target} HTTP/1.1\r\nHost: ".encode() if variant == "half-head" else b"")
                await asyncio.sleep(rng.uniform(0.1, 2))
                writer.close()
                return "refused"
            writer.write(junk)
        out = b""
        try:
            async with asyncio.timeout(10):
                while chunk := await reader.read(65536):
                    out += chunk
        except (ConnectionError, ssl.SSLError):
            pass
        except TimeoutError:
            raise Unexpected(f"garbage: {variant} kept open for 10 s") from None
        finally:
            writer.close()
        self.saw(out)
        expect(not out or out.startswith(b"HTTP/1.1 4"), f"garbage: {variant} answered {status(out)}")
        return "refused"

    async def run(self, root: int) -> None:
        """The clients until the deadline (each finishes its operation), sampling RSS meanwhile."""
        self.t0 = time.monotonic()
        clients = asyncio.gather(*(self.client(i, self.t0 + self.args.duration) for i in range(self.args.clients)))
        while not clients.done():
            self.samples.append((time.monotonic() - self.t0, {n: kib for pid, n in tree(root).items()
                                                              if (kib := rss_kib(pid)) is not None}))
            await asyncio.wait([clients], timeout=self.args.sample_every)
        await clients
        self.elapsed = time.monotonic() - self.t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(root: int) -> dict[int, str]:
    """The proxy and its descendants, by pid, named for what they run."""
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            name = "proxy" if pid == root else "dashboard" if "dashboard_web" in cmd else "api" if cmd.endswith(" api") else cmd[-30:]
            out[pid] = f"{name} ({pid})"
            todo += [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    return out


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def rss_kib(pid: int) -> int | None:
    with contextlib.suppress(OSError, StopIteration):
        return int(next(ln for ln in open(f"/proc/{pid}/status") if ln.startswith("VmRSS")).split()[1])
    return None


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_now(root: int, upstreams: int) -> dict[str, float]:
    """CPU seconds so far of each process of the proxy, the upstreams, this process, and the whole machine
    (busy time of every CPU: what other processes took during the run is the difference)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return {**{n: cpu_s(pid) for pid, n in tree(root).items()}, "upstreams": cpu_s(upstreams),
            "load generator": sum(os.times()[:2]), "machine": (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")}


def metrics(port: int) -> dict[str, float]:
    """The proxy's counters and process gauges, by name and labels."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
    except httpx.HTTPError:
        return {}
    pairs = (ln.rpartition(" ") for ln in text.splitlines() if ln and not ln.startswith("#"))
    return {k: float(v) for k, _, v in pairs if k.startswith(("sealgate_", "process_"))
            and "_bucket" not in k and not k.split("{")[0].endswith("_created")}


def cli(env: dict[str, str], *args: str, input: str | None = None) -> str:
    p = subprocess.run([SEALGATE, *args], input=input, env=env, capture_output=True, text=True, timeout=300, check=False)
    if p.returncode:
        raise SystemExit(f"soak: sealgate {' '.join(args[:2])} failed: {p.stderr.strip()}")
    return p.stdout


def soak(tmp: Path, args: argparse.Namespace) -> dict:
    values = [f"sk-soak-{secrets.token_urlsafe(24)}" for _ in range(args.principals)]

    def count(data: bytes) -> int:
        return sum(data.count(v.encode()) for v in values)

    pki = TestPKI.create(tmp)
    ours, theirs = multiprocessing.Pipe()
    up = multiprocessing.get_context("fork").Process(target=upstreams, args=(pki, [v.encode() for v in values], theirs),
                                                     daemon=True)
    up.start()
    allowed, blocked = ours.recv()
    port, mport, wport, aport = (free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEALGATE_") and "PROXY" not in k.upper()}
    env.update(SEALGATE_DATA_DIR=str(tmp / "data"), SEALGATE_CERTS_DIR=str(tmp / "certs"), SEALGATE_LISTEN_HOST="127.0.0.1",
               SEALGATE_LISTEN_PORT=str(port), SEALGATE_UPSTREAM_CA=str(pki.ca_pem), SEALGATE_ALLOW_PRIVATE="127.0.0.0/8",
               SEALGATE_METRICS_PORT=str(mport), SEALGATE_WEB_PORT=str(wport), SEALGATE_API_PORT=str(aport),
               SEALGATE_WEB_PASSWORD=secrets.token_urlsafe(16))

    def principal(i: int) -> Session:
        """A user with a fresh secret allowed only at the echoing upstream, and a session of theirs."""
        cli(env, "secret", "add", "--user", f"soak{i}", "--name", "K", "--origins", f"https://127.0.0.1:{allowed}",
            input=values[i] + "\n")
        d = json.loads(cli(env, "session", "issue", "--access", "signed-in", "--user", f"soak{i}", "--runchat",
                           f"soak-run{i}", "--instance", "soak", "--ttl", str(max(3600, int(args.duration) + 900))))
        cred = d["proxy_url"].split("//", 1)[1].split("@", 1)[0]
        return Session(d["proxy_url"], d["env"]["K"], "Basic " + base64.b64encode(cred.encode()).decode())

    sessions = [principal(0)]  # the first makes the store and the master key, alone
    with ThreadPoolExecutor(4) as pool:
        sessions += pool.map(principal, range(1, args.principals))
    with (tmp / "proxy.out").open("wb") as out, (tmp / "proxy.err").open("wb") as err:
        proc = subprocess.Popen([SEALGATE, "run", *["--no-web"] * args.no_web, *["--no-api"] * args.no_api], env=env,
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    try:
        for p in [port, mport] + [wport] * (not args.no_web) + [aport] * (not args.no_api):
            deadline = time.time() + 60
            while not listening(p):
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"soak: the proxy did not start: {(tmp / 'proxy.err').read_text()[-2000:]}")
                time.sleep(0.1)
        before, cpu0 = metrics(mport), cpu_now(proc.pid, up.pid)
        load = Load(args, sessions, values, port, allowed, blocked, str(tmp / "certs" / "mitmproxy-ca-cert.pem"))
        print(f"soak: {args.clients} clients for {args.duration:.0f} s ...", file=sys.stderr)
        asyncio.run(load.run(proc.pid))
        died, after = proc.poll(), metrics(mport)
        cpu = {n: round(v - cpu0.get(n, 0.0), 1) for n, v in cpu_now(proc.pid, up.pid).items()}
        cpu["other processes"] = round(cpu["machine"] - sum(v for n, v in cpu.items() if n != "machine"), 1)
        seen, board_flows = {"clients": load.seen, "metrics": count(json.dumps(after).encode())}, None
        if not args.no_web:  # everything the dashboard holds, as an operator could download it
            with contextlib.suppress(httpx.HTTPError), httpx.Client(timeout=120, trust_env=False, headers={
                    "Authorization": f"Bearer {env['SEALGATE_WEB_PASSWORD']}"}) as board:
                seen["dashboard"] = count(board.get(f"http://127.0.0.1:{wport}/flows/dump").raise_for_status().content)
                board_flows = len(board.get(f"http://127.0.0.1:{wport}/flows").raise_for_status().json())
        seen["audit --json"] = count(cli(env, "audit", "--json", "--limit", "1000000").encode())
    finally:
        stopping = time.monotonic()
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutdown = time.monotonic() - stopping
    ours.send("report")
    seen["blocked upstream"] = ours.recv()
    up.terminate()
    logs = (tmp / "proxy.out").read_bytes() + (tmp / "proxy.err").read_bytes()
    seen["proxy stdout/stderr"] = count(logs)
    files = [f for d in ("data", "certs") for f in (tmp / d).rglob("*") if f.is_file()]
    seen["data and certs dirs"] = sum(count(f.read_bytes()) for f in files if not STORE_FILES.search(f.name))
    other = Counter(re.sub(r"^\[[\d:.]+\] ", "", ln)[:120] for ln in logs.decode("utf-8", "replace").splitlines()
                    if "decision=" not in ln and not count(ln.encode()))  # never print a value (counted above)
    kinds = {}
    for k, t in load.tally.items():
        n = t.served + t.refused + sum(t.errors.values())
        ms = sorted(t.ms) or [None]
        kinds[k] = {"served": t.served, "refused": t.refused, "errors": sum(t.errors.values()), "per_s": round(n / load.elapsed, 1),
                    "p50_ms": ms[len(ms) // 2], "p99_ms": ms[int(len(ms) * 0.99)], "error_reasons": dict(t.errors.most_common(5))}
    total, errors = sum(v["served"] + v["refused"] + v["errors"] for v in kinds.values()), sum(v["errors"] for v in kinds.values())
    rss = {}
    for name in sorted({n for _, s in load.samples for n in s}):
        series = [(t, s[name] / 1024) for t, s in load.samples if name in s]
        half = [v for t, v in series if t >= args.duration / 2] or [0.0]
        rss[name] = {"start": series[0][1], "max": max(v for _, v in series), "end": series[-1][1],
                     "second_half_growth": half[-1] - half[0]}
    failures = [f"a value was seen: {seen}"] * (sum(seen.values()) > 0)
    if errors > args.max_error_rate * max(total, 1):
        failures.append(f"{errors} unexpected errors in {total} operations (over {args.max_error_rate:.1%})")
    if died is not None:
        failures.append(f"the proxy exited during the run (status {died})")
    mem = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    return {
        "machine": {"nproc": os.cpu_count(), "mem_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
                    "cpu": model.group(1) if model else "?", "python": sys.version.split()[0], "load_avg_1m": os.getloadavg()[0]},
        "config": {k: v for k, v in vars(args).items() if k != "json"}, "elapsed_s": round(load.elapsed, 1),
        "operations": total, "errors": errors, "per_s": round(total / load.elapsed, 1), "kinds": kinds,
        "garbage_variants": dict(load.variants), "rss_mib": rss, "dashboard_flows": board_flows,
        "rss_mib_series": [[round(t, 1), {n: round(kib / 1024, 1) for n, kib in s.items()}] for t, s in load.samples],
        "cpu_s_during_traffic": cpu,
        "metrics": {k: [before.get(k, 0.0), v] for k, v in after.items() if v != before.get(k)},
        "values_seen": seen, "values_in_store_files": sum(count(f.read_bytes()) for f in files if STORE_FILES.search(f.name)),
        "proxy_output_other_lines": dict(other.most_common(12)), "shutdown_s": round(shutdown, 1),
        "failures": failures, "ok": not failures,
    }


def show(r: dict) -> None:
    m, c = r["machine"], r["config"]
    print(f"sealgate soak: {c['clients']} clients, {c['principals']} principals, {r['elapsed_s']} s, dashboard "
          f"{'off' if c['no_web'] else 'on'}, API {'off' if c['no_api'] else 'on'}; {m['nproc']} CPUs ({m['cpu']}), "
          f"{m['mem_gib']} GiB, Python {m['python']}, load average at the end {m['load_avg_1m']:.1f}")
    print(f"\n{'kind':10} {'served':>8} {'refused':>8} {'errors':>7} {'per s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for k, v in r["kinds"].items():
        p50, p99 = (f"{v[p]:8.1f}" if v[p] is not None else f"{'-':>8}" for p in ("p50_ms", "p99_ms"))
        print(f"{k:10} {v['served']:8} {v['refused']:8} {v['errors']:7} {v['per_s']:7} {p50} {p99}")
        for why, n in v["error_reasons"].items():
            print(f"{'':12}{n:6} x {why}")
    print(f"all: {r['operations']} operations, {r['errors']} errors, {r['per_s']}/s; garbage sent: {r['garbage_variants']}")
    print(f"\n{'RSS MiB':22} {'start':>7} {'max':>7} {'end':>7} {'2nd-half growth':>16} {'CPU s':>7}")
    for n, v in r["rss_mib"].items():
        print(f"{n:22} {v['start']:7.1f} {v['max']:7.1f} {v['end']:7.1f} {v['second_half_growth']:16.1f} {r['cpu_s_during_traffic'].get(n, 0):7.1f}")
    print("CPU s during the traffic:", ", ".join(f"{n} {v}" for n, v in r["cpu_s_during_traffic"].items()))
    print("\nmetrics (before -> after):")
    for k, (a, b) in sorted(r["metrics"].items()):
        print(f"  {k}: {a:g} -> {b:g}")
    print(f"\ndashboard: {r['dashboard_flows']} flows held at the end")
    print("\nproxy output other than decision lines:")
    for ln, n in r["proxy_output_other_lines"].items():
        print(f"  {n:6} x {ln}")
    print(f"\nvalues seen: {r['values_seen']} (store database files, ciphertexts: {r['values_in_store_files']})")
    print(f"shutdown after SIGTERM: {r['shutdown_s']} s")
    print("OK" if r["ok"] else "FAILED: " + "; ".join(r["failures"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=120, help="seconds of traffic (120)")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients (32)")
    ap.add_argument("--principals", type=int, default=8, help="users, each with a fresh secret and a session (8)")
    ap.add_argument("--mix", default=MIX, help=f"shares of each kind ({MIX})")
    ap.add_argument("--churn", type=float, default=0.02, help="chance after an operation of new connections (0.02)")
    ap.add_argument("--no-web", action="store_true", help="run the proxy without the dashboard")
    ap.add_argument("--no-api", action="store_true", help="run the proxy without the platform API")
    ap.add_argument("--max-error-rate", type=float, default=0.01, help="unexpected errors allowed, of all operations (0.01)")
    ap.add_argument("--sample-every", type=float, default=2.0, help="seconds between RSS samples (2)")
    ap.add_argument("--seed", type=int, default=1, help="of the mix and the choices (values are always fresh)")
    ap.add_argument("--json", type=Path, help="write the report as JSON here too")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (store, key, proxy output)")
    args = ap.parse_args()
    share = rf"({'|'.join(KINDS)})=\d+(\.\d+)?"
    if not re.fullmatch(rf"{share}(,{share})*", args.mix):
        ap.error(f"--mix: KIND=SHARE,... with kinds among {', '.join(KINDS)}")
    tmp = Path(tempfile.mkdtemp(prefix="sealgate-soak-"))
    try:
        report = soak(tmp, args)
    finally:
        print(f"soak: kept {tmp}", file=sys.stderr) if args.keep else shutil.rmtree(tmp, ignore_errors=True)
    show(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
