"""Red team on the matcher's speed path (lazy patterns, cached word tables, the escape trie).

Values are made by random.Random(seed) and asserts test precomputed booleans: no value reaches
the test output."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import test_scrub as T  # noqa: E402  (its encoders, `reference` and `run_stream`)

from sealgate import scrub  # noqa: E402
from sealgate.scrub import Scrubber  # noqa: E402

POOLS = ["ab1&%é€😀 /+=\\\"<#;", "aA%&;#x0\\u+ ", "é€😀𝔄ß中a", "ab", "&amp;lt", "\\/\"'u0", "A1=+/", "%25%41"]


def crowded_values(rng: random.Random) -> list[str]:
    """More than 16 values over a few characters: short ones, pieces of others, others extended."""
    pool, values = rng.choice(POOLS), []
    for _ in range(rng.choice([17, 20, 25, 40])):
        kind = rng.random()
        if kind < 0.15:
            v = "".join(rng.choice(pool) for _ in range(rng.randint(1, 3)))
        elif kind < 0.25 and values:
            b = rng.choice(values)
            i = rng.randrange(len(b))
            v = b[i:i + rng.randint(1, 8)]
        elif kind < 0.35 and values:
            v = rng.choice(values) + "".join(rng.choice(pool) for _ in range(rng.randint(1, 5)))
        elif kind < 0.45 and values:
            v = "".join(rng.choice(pool) for _ in range(rng.randint(1, 5))) + rng.choice(values)
        else:
            v = "".join(rng.choice(pool) for _ in range(rng.randint(4, 20)))
        if v:
            values.append(v)
    return list(dict.fromkeys(values))


def crowded_body(rng: random.Random, values: list[str]) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 8)):
        r, v = rng.random(), rng.choice(values)
        if r < 0.4:
            parts.append(T.encode(v, rng))
        elif r < 0.6:
            parts.append(T.noise(rng, values))
        elif r < 0.7:
            parts.append(T.encode(v[:rng.randrange(len(v) + 1)], rng))
        elif r < 0.8:
            parts.append(rng.choice([b"%", b"\\", b"&", b"+", b"&#", b"\\u00", b"%2", b";", b"=", b"&amp", b"\\\\"]))
        else:
            parts.append(T.encode(v[rng.randrange(len(v)):], rng))
    return b"".join(parts)


@pytest.mark.parametrize("few", [16, 0])
def test_crowded_values_anchored_equals_full_scan(few, monkeypatch):
    """Differential: > 16 values sharing characters, prefixes, suffixes, pieces of each other (and the
    trie for every held character, _FEW = 0), bodies of their escapes, streamed in random chunks."""
    monkeypatch.setattr(scrub, "_FEW", few)
    for seed in range(12):
        rng = random.Random(seed)
        values = crowded_values(rng)
        s = Scrubber()
        s.add_values((v, f"[V{i}]") for i, v in enumerate(values))
        for _ in range(4):
            data = crowded_body(rng, values)
            same = s.matches(data) == T.reference(s, data)
            cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 10))]
            streamed = T.run_stream(s, data, cuts) == s.scrub(data)
            assert same, f"seed {seed}: the anchors missed a match"
            assert streamed, f"seed {seed}: streaming differs from the whole"


@pytest.mark.parametrize("ref", ["&#0;", "&#x0;", "&#X0", "&#00000000;", "&#x00000000"])
@pytest.mark.parametrize("count", [1, 20])
def test_html_reference_to_nul_anchors(ref, count):
    """&#0; (digits all zeros) stood for nothing in `_decode`: a value holding U+0000 escaped so was missed."""
    rng = random.Random(count)
    values = ["\0\0\0\0"] + ["\0" + "".join(rng.choice("abc\0") for _ in range(8)) for _ in range(count - 1)]
    s = Scrubber()
    s.add_values((v, f"[V{i}]") for i, v in enumerate(dict.fromkeys(values)))
    data = b"<" + ref.encode() * 4 + b">"
    same = s.matches(data) == T.reference(s, data)
    assert same and s.scrub(data) == b"<[V0]>", "a value of NULs escaped as &#0; survived"


def test_values_added_while_streaming_are_found_in_later_chunks():
    rng = random.Random(4)
    values = crowded_values(rng)
    s = Scrubber()
    s.add_values((v, f"[V{i}]") for i, v in enumerate(values[:-1]))
    new = "sk-late-" + "".join(rng.choice("abc%&é😀") for _ in range(20))
    rewriter = s.stream()
    first = rewriter.feed(b"head\n")
    s.add_value(new, "[NEW]")
    encoded = T.encode(new, rng)
    rest = rewriter.feed(b"<" + encoded[:7]) + rewriter.feed(encoded[7:] + b">\n") + rewriter.finish()
    whole = s.scrub(b"head\n<" + encoded + b">\n")  # (a short value of the others may match in head)
    assert first + rest == whole and whole.endswith(b"<[NEW]>\n"), "a value added mid-stream survived"


def test_word_tables_are_not_shared_across_value_sets():
    """Scrubbers of overlapping value sets: each finds its own values, and none of the other's."""
    rng = random.Random(9)
    a, b, c = (T.new_value(50, rng) for _ in range(3))
    one, two = Scrubber(), Scrubber()
    one.add_values([(a, "[A]"), (b, "[B]")])
    two.add_values([(b, "[B]"), (c, "[C]")])
    data = b"<" + a.encode() + b"|" + b.encode().hex().encode() + b"|" + c.encode() + b">"
    assert one.scrub(data) == b"<[A]|[B]|" + c.encode() + b">" and two.scrub(data) == b"<" + a.encode() + b"|[B]|[C]>"


@pytest.mark.xfail(strict=True, reason="known: each escape of a character 17+ values hold is walked in Python "
                   "(~0.5 ms with 1000 values, 10-30 us with few): a body of dense escapes stalls the loop")
def test_a_body_of_dense_escapes_is_scanned_within_a_second_a_mib():
    rng = random.Random(7)
    values = ["sk-" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(40)) for _ in range(17)]
    s = Scrubber()
    s.add_values((v, f"[V{i}]") for i, v in enumerate(values))
    body = b"%73" * 20000  # 60 KB of an escaped s, which all 17 values hold
    t = time.perf_counter()
    s.matches(body)
    per_mib = (time.perf_counter() - t) * (1 << 20) / len(body)
    assert per_mib < 1.0
