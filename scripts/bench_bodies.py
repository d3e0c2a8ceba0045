"""Large bodies through the proxies, streamed: a 100 MiB upload and long event-stream responses, each to
the lean upstream (scripts/bench_upstream.py, its own process). sealgate runs as `sealgate run --no-web`,
against plain mitmdump with `stream_large_bodies=1m` (without it mitmdump holds a body whole) and a
direct connection. The upload is sent by httpx from a generator, timed from the POST on a connection
already up; the streams are fetched by curl, timed from the answer's first byte to its last. Rates are
MiB/s of body; CPU is the proxy's (all its processes) per MiB; peak RSS is the proxy process's highest
VmRSS during the transfer, sampled every 20 ms."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
from bench_common import Column, PeakRss, Ratio, Section, Table, curl, median, ratio, rotated, rss_mib, settled_cpu
from bench_world import Proxy, World

MIB = 1 << 20
UPLOAD = 100 * MIB
PIECE = 256 * 1024  # what the client's generator yields at a time
SSE_BYTES = {512: 8 * MIB, 16 * 1024: 32 * MIB}  # bytes per event (one chunk each): stream size
STREAMING = ("--set", "stream_large_bodies=1m")


@dataclass
class Runs:
    name: str
    proxy: Proxy | None
    rates: list[float] = field(default_factory=list)  # MiB/s
    cpus: list[float] = field(default_factory=list)  # CPU s per MiB
    peaks: list[float] = field(default_factory=list)  # MiB

    def row(self) -> dict:
        cpu = median(self.cpus)
        return {"contender": self.name, "mib_s": median(self.rates), "cpu_ms_per_mib": cpu * 1000 if cpu else None,
                "peak_rss_mib": max(self.peaks, default=None),
                "rss_after_mib": rss_mib(self.proxy.proc.pid) if self.proxy else None, "rates": self.rates}


Transfer = Callable[[Proxy | None], tuple[int, float]]  # through a proxy (or none): (body bytes, seconds)


def measure(r: Runs, world: World, transfer: Transfer) -> None:
    """One transfer: its rate, and the proxy's CPU and peak RSS, into r."""
    roots = [r.proxy.proc.pid] if r.proxy else []
    cpu0 = settled_cpu(roots)
    peak = PeakRss(r.proxy.proc.pid) if r.proxy else None
    with peak or contextlib.nullcontext():
        try:
            size, elapsed = transfer(r.proxy)
        except SystemExit as e:
            raise SystemExit(f"{e} ({r.name})") from None
    r.rates.append(size / MIB / elapsed)
    if peak:
        r.cpus.append((settled_cpu(roots) - cpu0) / (size / MIB))
        r.peaks.append(peak.peak)


# --- upload -------------------------------------------------------------------------------

def _body(first: bytes) -> Iterator[bytes]:
    """UPLOAD bytes in PIECE pieces, the first starting with `first`; never all held at once."""
    block = (b"0123456789abcdefghijklmnopqrstuvwxyz\n" * (PIECE // 37 + 1))[:PIECE]
    yield (first + block)[:PIECE]
    for _ in range(UPLOAD // PIECE - 1):
        yield block


def _expected_first_mib(sent: bytes, got: bytes) -> str:
    """The SHA-256 of the first MiB the upstream should get: the body sent, `sent` replaced by `got`."""
    digest, size = hashlib.sha256(), 0
    for piece in _body(sent):
        if size >= MIB:
            break
        piece = piece.replace(sent, got, 1) if sent else piece
        digest.update(piece[:MIB - size])
        size += len(piece)
    return digest.hexdigest()


def _uploader(world: World, in_body: bool, filled: bool) -> Transfer:
    """A POST of UPLOAD bytes with the placeholder in Authorization (and at the body's start when in_body);
    checks the upstream got what it should: the value where sealgate fills it, else the placeholder."""
    ph, value = world.session.placeholder, world.value
    sent = f"upload {ph} ".encode() if in_body else b""
    got = f"upload {value} ".encode() if in_body and filled else sent
    want = {"bytes": UPLOAD - len(sent) + len(got), "first_mib_sha256": _expected_first_mib(sent, got),
            "auth_sha256": hashlib.sha256(f"Bearer {value if filled else ph}".encode()).hexdigest()}

    def transfer(proxy: Proxy | None) -> tuple[int, float]:
        ctx = ssl.create_default_context(cafile=proxy.ca if proxy else world.pki.ca_pem)
        with httpx.Client(proxy=proxy.url() if proxy else None, verify=ctx, trust_env=False, timeout=300) as client:
            client.get(world.lean.url("/small"), headers=world.session.auth).raise_for_status()  # connected
            t0 = time.perf_counter()
            resp = client.post(world.lean.url("/upload"), content=_body(sent),
                               headers={**world.session.auth, "Content-Length": str(UPLOAD),
                                        "Content-Type": "application/octet-stream"})
            elapsed = time.perf_counter() - t0
        resp.raise_for_status()
        if resp.json() != want:  # (hashes and a length only: nothing secret is shown)
            raise SystemExit(f"bench: the upstream did not get the upload as expected: {resp.json()}")
        return UPLOAD, elapsed
    return transfer


def _measured(world: World, args: argparse.Namespace, section: str, runs: list, proxies: tuple) -> dict[str, dict]:
    """Every run in every round, rotated; then the proxies stop. Each run's row, by name."""
    for r in range(args.rounds):
        for each, transfer in rotated(runs, r):
            measure(each, world, transfer)
        print(f"{section}: round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    rows = {r.name: r.row() for r, _ in runs}  # (the proxies' memory: read before they stop)
    for proxy in proxies:
        world.procs.stop(proxy.proc)
    return rows


def upload(world: World, args: argparse.Namespace) -> Section:
    md, sg = world.mitmdump("mitmdump", *STREAMING), world.sealgate("sealgate --no-web")
    runs = [(Runs("direct", None), _uploader(world, False, False)),
            (Runs("mitmdump stream_large_bodies=1m", md), _uploader(world, False, False)),
            (Runs("sealgate --no-web, header placeholder", sg), _uploader(world, False, True)),
            (Runs("sealgate --no-web, + placeholder in body", sg), _uploader(world, True, True))]
    rows = _measured(world, args, "upload", runs, (md, sg))
    base = rows["mitmdump stream_large_bodies=1m"]
    ratios = [Ratio(f"MiB/s  {name} / mitmdump", ratio(rows[name]["mib_s"], base["mib_s"]), ">= 0.9")
              for name in list(rows)[2:]]
    ratios.append(Ratio("peak RSS  sealgate / mitmdump", ratio(max(rows[n]["peak_rss_mib"] for n in list(rows)[2:]),
                                                                base["peak_rss_mib"])))
    return Section("upload", [_table(f"upload: {UPLOAD // MIB} MiB POST with Content-Length, client-streamed in "
                                     f"{PIECE // 1024} KiB pieces; medians of {args.rounds} (peak RSS: max)",
                                     list(rows.values()), rss=True)], ratios)


def _table(title: str, rows: list[dict], rss: bool) -> Table:
    cols = [Column("contender", "contender"), Column("mib_s", "MiB/s", "{:.1f}"),
            Column("cpu_ms_per_mib", "CPU ms/MiB", "{:.1f}")]
    if rss:
        cols += [Column("peak_rss_mib", "peak RSS MiB"), Column("rss_after_mib", "RSS after MiB")]
    return Table(title, cols, rows)


# --- server-sent events ----------------------------------------------------------------------

def _reader(world: World, event: int) -> Transfer:
    """curl fetches the stream (a client far cheaper per chunk than Python's); timed from the first byte of
    the answer to the last, so connecting (CONNECT, both TLS handshakes) is not counted."""
    total = SSE_BYTES[event]

    def transfer(proxy: Proxy | None) -> tuple[int, float]:
        [[code, size, first, last]], _ = curl(
            world.tmp / "sse.conf", world.env, ca=proxy.ca if proxy else str(world.pki.ca_pem),
            proxy=proxy.url() if proxy else None, headers=world.session.auth,
            urls=[world.lean.url(f"/sse?bytes={total}&event={event}")],
            options=['write-out = "%{http_code} %{size_download} %{time_starttransfer} %{time_total}"'])
        if code != "200" or int(size) != total:
            raise SystemExit(f"bench: an event stream came back {code} with {size} of {total} bytes")
        return total, float(last) - float(first)
    return transfer


def sse(world: World, args: argparse.Namespace) -> Section:
    md, sg = world.mitmdump("mitmdump", *STREAMING), world.sealgate("sealgate --no-web")
    runs = [(Runs(f"{who}, {event} B events", proxy), _reader(world, event)) for event in SSE_BYTES
            for who, proxy in (("direct", None), ("mitmdump stream_large_bodies=1m", md), ("sealgate --no-web", sg))]
    rows = _measured(world, args, "sse", runs, (md, sg))
    ratios = [Ratio(f"MiB/s  sealgate / mitmdump, {event} B events",
                    ratio(rows[f"sealgate --no-web, {event} B events"]["mib_s"],
                          rows[f"mitmdump stream_large_bodies=1m, {event} B events"]["mib_s"]), ">= 0.9")
              for event in SSE_BYTES]
    return Section("sse", [_table("sse: text/event-stream, chunked, one chunk per event ("
                                  + ", ".join(f"{e} B events: {n // MIB} MiB" for e, n in SSE_BYTES.items())
                                  + f"), fetched by curl; medians of {args.rounds}", list(rows.values()), rss=False)], ratios,
                   ["sealgate scrubs every chunk of the stream of the principal's values (the session's user has one)",
                    "mitmdump with stream_large_bodies=1m holds the first MiB of a chunked answer before it streams "
                    "(an event stream's first events wait for it): that MiB goes out in one write"])
