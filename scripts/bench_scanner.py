"""In-process microbenchmarks of the pure scanners on the request and response paths: `placeholders.find`
(every request body) and the session's `Scrubber` (every response body: whole, and streamed in 16 KiB
chunks as a streamed response is). Bodies are API-like text (JSON records with words, base64 and hex)
of 64 KiB, 1 MiB and 8 MiB holding one placeholder and one echo of a value; the scrubber knows 1, 10,
100 or 1000 values of the principal. MiB/s per cell (the fastest of 5 timings, taken in rounds that time every
secret count, in turn, so that the machine's other work hits them alike): a flat row means the cost does not
grow with the secret count; equal columns down a size mean cost linear in body size."""

from __future__ import annotations

import argparse
import base64
import random
import secrets
import sys
import time
from collections.abc import Callable

from bench_common import Column, Ratio, Section, Table, ratio
from bench_world import World
from sealgate import placeholders
from sealgate.scrub import Scrubber

MIB = 1 << 20
SIZES = {"64 KiB": 64 * 1024, "1 MiB": MIB, "8 MiB": 8 * MIB}
COUNTS = (1, 10, 100, 1000)
STREAM_CHUNK = 16 * 1024
TIMED = 0.05  # seconds a timing lasts, about (small bodies are scanned several times per timing)
REPEATS = 5  # timings per cell; the fastest counts (the least disturbed by the machine's other work)


def api_text(size: int, rng: random.Random) -> bytes:
    """JSON records: words, a base64 blob, a hex digest; what an API answers."""
    words = b"the quick brown fox jumps over lazy dog model content role assistant user token".split()
    out, total = [], 0
    while total < size:
        rec = b'{"id": %d, "text": "%s", "blob": "%s", "sha": "%s"},\n' % (
            rng.randrange(10**9), b" ".join(rng.choices(words, k=12)),
            base64.b64encode(rng.randbytes(48)), rng.randbytes(20).hex().encode())
        out.append(rec)
        total += len(rec)
    return b"".join(out)[:size]


def body(size: int, inserted: bytes, rng: random.Random) -> bytes:
    text = api_text(size, rng)
    mid = size // 2
    return text[:mid] + inserted + text[mid + len(inserted):]


def seconds(fn: Callable[[], object], size: int) -> float:
    """One timing: the seconds a call takes, over about TIMED s (at 100 MiB/s), at least one call."""
    loops = max(1, round(TIMED * 100 * MIB / size))
    t0 = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - t0) / loops


def streamed(scrubber: Scrubber, data: bytes) -> bytes:
    rewriter = scrubber.stream()
    out = [rewriter.feed(data[i:i + STREAM_CHUNK]) for i in range(0, len(data), STREAM_CHUNK)]
    return b"".join([*out, rewriter.finish()])


def run(world: World, args: argparse.Namespace) -> Section:
    rng = random.Random(14)
    values = [f"sk-{secrets.token_urlsafe(30)}" for _ in range(max(COUNTS))]  # never printed
    ph = placeholders.mint(b"k" * 32, "a" * 16, "K0")
    finds = Table("scanner: placeholders.find (the request side; it does not take the secrets)",
                  [Column("size", "body"), Column("mib_s", "MiB/s", "{:.0f}")])
    scrubs = Table("scanner: Scrubber, MiB/s by the principal's secret count (the response side)",
                   [Column("what", "what"), *(Column(str(n), f"{n} secrets", "{:.1f}") for n in COUNTS)])
    build: dict[str, object] = {"what": "build + first 64 KiB, ms"}
    first = body(64 * 1024, f" {ph} {values[0]} ".encode(), random.Random(14))  # (the 64 KiB body below)
    for n in COUNTS:  # each from nothing: a value's patterns are kept while a scrubber holds them
        scrubber = Scrubber()
        t0 = time.perf_counter()
        scrubber.add_values((v, f"sg.PH{i}") for i, v in enumerate(values[:n]))
        scrubber.scrub(first)
        build[str(n)] = (time.perf_counter() - t0) * 1000
        del scrubber
    cells: dict[tuple[str, str, int], float] = {}
    for label, size in SIZES.items():
        data = body(size, f" {ph} {values[0]} ".encode(), rng)
        assert len(placeholders.find(data)) == 1
        finds.rows.append({"size": label, "mib_s": size / MIB / min(seconds(lambda: placeholders.find(data), size)
                                                                     for _ in range(REPEATS))})
        scrubbers = {}
        for n in COUNTS:
            scrubber = scrubbers[n] = Scrubber()
            scrubber.add_values((v, f"sg.PH{i}") for i, v in enumerate(values[:n]))
            assert values[0].encode() not in scrubber.scrub(data) and values[0].encode() not in streamed(scrubber, data)
        times: dict[tuple[str, int], list[float]] = {}
        for rep in range(REPEATS):  # every count in every round, the order rotated: noise hits all alike
            for n in COUNTS[rep % len(COUNTS):] + COUNTS[:rep % len(COUNTS)]:
                scrubber = scrubbers[n]
                times.setdefault(("whole", n), []).append(seconds(lambda: scrubber.scrub(data), size))
                times.setdefault(("stream", n), []).append(seconds(lambda: streamed(scrubber, data), size))
        for (how, n), ts in times.items():
            cells[how, label, n] = size / MIB / min(ts)
        print(f"scanner: {label} done", file=sys.stderr, flush=True)
    for how in ("whole", "stream"):
        for label in SIZES:
            scrubs.rows.append({"what": f"{how} {label}", **{str(n): cells[how, label, n] for n in COUNTS}})
    scrubs.rows.append(build)
    big, small = max(COUNTS), min(COUNTS)
    ratios = [Ratio(f"scrub {how} 1 MiB: MiB/s with {big} secrets / with {small}",
                    ratio(cells[how, "1 MiB", big], cells[how, "1 MiB", small])) for how in ("whole", "stream")]
    ratios += [Ratio(f"scrub whole, {n} secrets: MiB/s at 8 MiB / at 64 KiB (1.0 = linear)",
                     ratio(cells["whole", "8 MiB", n], cells["whole", "64 KiB", n])) for n in (small, big)]
    return Section("scanner", [finds, scrubs], ratios,
                   [f"stream: fed in {STREAM_CHUNK // 1024} KiB chunks through Scrubber.stream(), as a streamed "
                    "response is; build: add_values of all the values and the first scrub (patterns compile lazily)"])
