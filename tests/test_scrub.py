"""scrub: a value is found in any mixture of per-character encodings, in base64 at any
alignment and in hex; nothing else is touched; streaming gives what scrubbing the whole does.

Values are made by random.Random(seed) (hypothesis shows the seed, never a value), and
asserts test precomputed booleans, so that no value reaches the test output.
"""

from __future__ import annotations

import array
import base64
import functools
import html
import html.entities
import json
import os
import random
import re
import secrets
import string
import sys
import unicodedata
from unittest import mock
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sealgate import placeholders, scrub
from sealgate.scrub import LONG_VALUE, Scrubber, stream_rewriter

KEY = os.urandom(32)
SID = "abcdefghijklmnop"
PH = placeholders.mint(KEY, SID, "API_KEY").encode()
PH2 = placeholders.mint(KEY, SID, "OTHER").encode()
SPECIAL = "\"\\/&<>'+ %=#;:?@!$*(),[]{}|^`~é€ß中😀𝔄"
SEEDS = st.integers(0, 2**64)  # values come from random.Random(seed): a failure shows the seed only
# examples per property test: 40 keeps the fast tier fast; SEALGATE_PROPERTY_EXAMPLES=1000 for a longer hunt
PROPERTY = settings(max_examples=int(os.environ.get("SEALGATE_PROPERTY_EXAMPLES", "40")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def new_value(n: int = 24, rng: random.Random | None = None) -> str:
    """A fresh value full of characters that need escaping somewhere."""
    rng = rng or secrets.SystemRandom()
    return "sk-" + "".join(rng.choice(string.ascii_letters + string.digits + SPECIAL) for _ in range(n)) + "Z"


def scrubber(*values: str) -> Scrubber:
    s = Scrubber()
    s.add_values((v, ph) for v, ph in zip(values, (PH, PH2, *(PH2,) * len(values))))
    return s


def reference(s: Scrubber, data: bytes) -> list[tuple[int, int, bytes]]:
    """What `matches` must give: a scan of the whole with the one regex, no anchors."""
    m = s._matcher
    return [(x.start(), x.end(), s._replacements[x.lastindex - 1]) for x in m.regex.finditer(data)] if m else []


def run_stream(s: Scrubber, data: bytes, cuts: list[int]) -> bytes:
    rewriter, out, pos = s.stream(), [], 0
    for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
        out.append(rewriter.feed(data[pos:cut]))
        pos = cut
    return b"".join(out) + rewriter.finish()


# -- encoders ------------------------------------------------------------------------------


def lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), text)


def utf16(c: str) -> list[int]:
    cp = ord(c)
    return [cp] if cp < 0x10000 else [0xD800 + ((cp - 0x10000) >> 10), 0xDC00 + ((cp - 0x10000) & 0x3FF)]


def json_u(v: str, upper: bool = False) -> str:
    return "".join(("\\u%04X" if upper else "\\u%04x") % u for c in v for u in utf16(c))


def html_dec(v: str, zeros: int = 0, semi: bool = True) -> str:
    return "".join("&#" + "0" * zeros + str(ord(c)) + (";" if semi else "") for c in v)


def html_hex(v: str, x: str = "x", zeros: int = 0, upper: bool = False) -> str:
    return "".join("&#" + x + "0" * zeros + (f"{ord(c):X}" if upper else f"{ord(c):x}") + ";" for c in v)


def go_json(v: str) -> str:  # Go's encoding/json: <, > and & as \u003c \u003e \u0026, non-ASCII raw
    raw = json.dumps(v, ensure_ascii=False)[1:-1]
    return raw.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def php_json(v: str) -> str:  # PHP's json_encode: \/ and \uXXXX
    return json.dumps(v)[1:-1].replace("/", "\\/")


def mixture(v: str) -> str:
    """Each character in the next of several encodings, round and round."""
    forms = [lambda c: c, lambda c: json_u(c), lambda c: quote(c, safe=""), lambda c: html_dec(c, 2),
             lambda c: html_hex(c, "X", 0, True), lambda c: lower_hex(quote(c, safe="")), lambda c: html.escape(c)]
    return "".join(forms[i % len(forms)](c) for i, c in enumerate(v))


IN_JSON = [
    ("raw", lambda v: json.dumps(v, ensure_ascii=False)[1:-1]),
    ("json_ascii", lambda v: json.dumps(v)[1:-1]),
    ("json_every_char_u_lower", json_u),
    ("json_every_char_u_upper", lambda v: json_u(v, upper=True)),
    ("go_u0026_style", go_json),
    ("php_escaped_slash", php_json),
    ("mixture", mixture),
]
IN_URL = [
    ("percent", lambda v: quote(v, safe="")),
    ("percent_slash_unescaped", lambda v: quote(v, safe="/")),
    ("percent_lower_hex", lambda v: lower_hex(quote(v, safe=""))),
    ("percent_lower_hex_slash_unescaped", lambda v: lower_hex(quote(v, safe="/:@"))),
    ("form_plus_for_space", lambda v: quote_plus(v, safe="")),
    ("javascript_escape_u", lambda v: "".join(
        c if c.isascii() and c.isalnum() else "".join(f"%u{u:04X}" for u in utf16(c)) for c in v)),
]
IN_HTML = [
    ("html_escape", lambda v: html.escape(v, quote=True)),
    ("html_decimal", html_dec),
    ("html_decimal_leading_zeros_no_semicolon", lambda v: html_dec(v, zeros=7, semi=False)),
    ("html_hex_lower", html_hex),
    ("html_hex_upper_X_zeros", lambda v: html_hex(v, "X", 3, upper=True)),
    ("html_named_where_any", lambda v: "".join(
        "&" + min((n for n, t in html.entities.html5.items() if t == c), key=len, default="#" + str(ord(c)) + ";")
        if c in "&<>\"'/=+" else c for c in v)),
]


# (where a value is echoed: what comes before and after it, the encodings it is echoed in there)
SURROUNDINGS = {
    "json": (b'{"data": {"echo": "', b'", "n": 1}}', IN_JSON),
    "url": (b"https://api.example.com/v1/cb?state=xyz&token=", b"&next=%2Fhome", IN_URL),
    "html": (b'<div class="x"><input value="', b'"></div>', IN_HTML),
}
ECHOES = [(where, name, encode) for where, (_, _, cases) in SURROUNDINGS.items() for name, encode in cases]


@pytest.mark.parametrize("where,name,encode", ECHOES, ids=[f"{w}-{n}" for w, n, _ in ECHOES])
def test_value_echoed_in_json_a_url_or_html(where, name, encode):
    v = new_value()
    before, after, _ = SURROUNDINGS[where]
    out = scrubber(v).scrub(before + encode(v).encode() + after)
    exact = out == before + PH + after
    assert exact, "not replaced by the placeholder exactly"


def test_location_header_with_slash_unescaped_and_lower_case_hex():
    v = new_value()
    location = ("https://app.example/oauth/return?code=abc&token=" + lower_hex(quote(v, safe="/"))).encode()
    s = scrubber(v)
    fields = s.scrub(b"location"), s.scrub(location)
    exact = fields == (b"location", b"https://app.example/oauth/return?code=abc&token=" + PH)
    assert exact, "location not scrubbed exactly"


def b64(data: bytes, url: bool, pad: bool) -> bytes:
    out = base64.urlsafe_b64encode(data) if url else base64.b64encode(data)
    return out if pad else out.rstrip(b"=")


def value_part(encoded: bytes, k: int, n: int) -> bytes:
    """The base64 characters that depend only on the n value bytes after k others."""
    return encoded[-(-8 * k // 6): 8 * (k + n) // 6]


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("url", [False, True], ids=["standard", "urlsafe"])
@pytest.mark.parametrize("pad", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("tail", [b"", b"+ more bytes after it"], ids=["at_end", "inside"])
def test_base64_inside_longer_base64(k, url, pad, tail):
    v = new_value(40)
    raw = v.encode()
    text = b64(os.urandom(30 + k) + raw + tail, url, pad)  # 30 + k bytes before it: alignment k
    out = scrubber(v).scrub(b'{"blob": "' + text + b'"}')
    gone = value_part(text, 30 + k, len(raw)) not in out
    assert gone and PH in out, "base64 of the value survived"


def test_base64_in_php_json_with_escaped_slashes():
    v = new_value(40)
    raw = v.encode()
    for k in range(3):
        text = base64.b64encode(bytes(k) + raw * 2)
        out = scrubber(v).scrub(b'{"b":"' + text.replace(b"/", b"\\/") + b'"}')
        gone = all(value_part(text, at, len(raw)).replace(b"/", b"\\/") not in out for at in (k, k + len(raw)))
        assert gone and out.count(PH) == 2, "base64 with escaped slashes survived"


def test_basic_header_of_any_user():
    v = new_value()
    s = scrubber(v)
    for user in ("anyuser", "me", "x", "someone-else@example.com", ""):
        header = b"Basic " + base64.b64encode(f"{user}:{v}".encode())
        out = s.scrub(header)
        gone = value_part(header[6:], len(user.encode()) + 1, len(v.encode())) not in out
        assert gone and out.startswith(b"Basic ") and PH in out, "the value survived in a Basic header"


@pytest.mark.parametrize("case", [str.lower, str.upper], ids=["lower", "upper"])
def test_hex(case):
    v = new_value()
    hexed = case(v.encode().hex()).encode()
    out = scrubber(v).scrub(b"id=0x" + hexed + b";")
    exact = out == b"id=0x" + PH + b";"
    assert exact, "hex survived"


def test_a_value_several_times_in_several_forms():
    v, w = new_value(), new_value(30)
    s = scrubber(v, w)
    body = json.dumps({"a": v, "b": [quote(w), html.escape(v)], "c": base64.b64encode(w.encode()).decode(),
                       "d": v.encode().hex()}).encode() + b"\n" + json_u(w).encode()
    out = s.scrub(body)
    survived = v.encode() in out or w.encode() in out
    assert not survived and out.count(PH) == 3 and out.count(PH2) == 3, "a form survived"


# -- no false positives --------------------------------------------------------------------


def ordinary_texts(rng: random.Random) -> list[bytes]:
    words = "the quick brown fox jumps over lazy dogs while api keys tokens and secrets stay home".split()
    records = [{"id": f"{rng.getrandbits(128):032x}", "name": " ".join(rng.choices(words, k=3)), "n": rng.random(),
                "tags": rng.choices(words, k=4), "note": "café & <b>bold</b> \"quoted\" 'single' / 100% ü€😀"}
               for _ in range(40)]
    blob = rng.randbytes(3000)
    return [
        json.dumps(records).encode(),
        json.dumps(records, ensure_ascii=False).encode(),
        php_json(json.dumps(records)).encode(),
        html.escape(json.dumps(records, ensure_ascii=False)).encode(),
        quote(json.dumps(records), safe="/").encode(),
        base64.b64encode(blob), base64.urlsafe_b64encode(blob).rstrip(b"="),
        blob.hex().encode(), blob.hex().upper().encode(), blob,
        html_dec(" ".join(words)).encode(), json_u(" ".join(words)).encode(),
    ]


def test_ordinary_text_is_left_alone():
    values = [new_value(n) for n in (8, 16, 40, 100, 300)]
    s = scrubber(*values)
    for text in ordinary_texts(random.Random(1)):
        unchanged = s.scrub(text) == text
        assert unchanged, "text without a value was changed"


@PROPERTY
@given(SEEDS)
def test_random_text_without_the_value_is_left_alone(seed):
    rng = random.Random(seed)
    values = [new_value(rng.randint(5, 30), rng) for _ in range(3)]
    s = scrubber(*values)
    text = b"".join(rng.choice(ordinary_texts(rng))[rng.randrange(100):][: rng.randrange(2000)] for _ in range(3))
    unchanged = s.scrub(text) == text
    assert unchanged, "text without a value was changed"


def test_near_misses_are_left_alone():
    v = new_value(30)
    s = scrubber(v)
    for near in (v[:-1], v[1:], v[:10] + "\x00" + v[11:]):
        for text in (near.encode(), json_u(near).encode(), quote(near).encode(), near.encode().hex().encode()):
            unchanged = s.scrub(b"[" + text + b"]") == b"[" + text + b"]"
            assert unchanged, "a near miss was changed"


# -- property: any mixture, any alignment --------------------------------------------------

_POOL = [chr(c) for c in (*range(0x20, 0x7F), *range(0xA0, 0x180), *range(0x391, 0x3CA), *range(0x4E00, 0x4E40),
                          *range(0x1F600, 0x1F620), *range(0x1D504, 0x1D520), 0x2212, 0x20AC, 0x2026)]
_POOL = [c for c in _POOL if unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")]
_NAMES: dict[str, list[str]] = {}
for _name, _text in html.entities.html5.items():
    if len(_text) == 1:
        _NAMES.setdefault(_text, []).append(_name)


def random_value(rng: random.Random, lo: int = 8, hi: int = 40) -> str:
    pool = rng.choice([_POOL, SPECIAL + "ab1", string.ascii_letters + SPECIAL])
    v = "".join(rng.choice(pool) for _ in range(rng.randint(lo, hi))).strip()
    return v if len(v) >= lo else v + "x" * (lo - len(v))


def encode_char(c: str, rng: random.Random) -> bytes:
    """c in a random one of the forms that apply to it."""
    raw, cp = c.encode(), ord(c)
    hexcase = rng.choice(["%02X", "%02x"])
    forms = [
        lambda: raw,
        lambda: "".join("%" + hexcase % b for b in raw).encode(),
        lambda: "".join("\\x" + hexcase % b for b in raw).encode(),
        lambda: raw[:1] + b"".join(rng.choice([bytes([b]), b"%%%02X" % b, b"\\x%02x" % b]) for b in raw[1:]),
        lambda: json_u(c, rng.random() < .5).encode(),
        lambda: "".join("%u" + "%04X" % u for u in utf16(c)).encode(),
        lambda: html_dec(c, rng.randint(0, 7), rng.random() < .7).encode(),
        lambda: html_hex(c, rng.choice("xX"), rng.randint(0, 7), rng.random() < .5).encode(),
    ]
    if c == " ":
        forms.append(lambda: b"+")
    if 0x80 <= cp <= 0xFF:
        forms += [lambda: b"%%%02X" % cp, lambda: b"\\x%02x" % cp]
    if c in "\"\\/'":
        forms.append(lambda: b"\\" + raw)
    if c in _NAMES:
        forms.append(lambda: b"&" + rng.choice(_NAMES[c]).encode())
    if cp > 0xFFFF:
        forms.append(lambda: b"\\U%08x" % cp)
    return rng.choice(forms)()


def encode(v: str, rng: random.Random) -> bytes:
    return b"".join(encode_char(c, rng) for c in v)


@PROPERTY
@given(SEEDS)
def test_any_mixture_of_encodings_is_scrubbed(seed):
    rng = random.Random(seed)
    v = random_value(rng)
    s = scrubber(v)
    encoded = encode(v, rng)
    before, after = rng.choice([(b"", b""), (b'{"k": "', b'"}'), (b"<p>", b"</p>"), (b"?t=", b"&x=1"),
                                (b"\x00", b"\x00")])
    out = s.scrub(before + encoded + after)
    found = s.matches(before + encoded + after)
    clean = encoded not in out and v.encode() not in out and PH in out
    bounded = all(end - start <= s.max_len for start, end, _ in found)
    assert clean and bounded, "an encoded value survived"


@PROPERTY
@given(SEEDS)
def test_base64_at_any_alignment_either_alphabet(seed):
    rng = random.Random(seed)
    v = random_value(rng)
    raw = v.encode()
    k, url, pad = rng.randrange(12), rng.random() < .5, rng.random() < .5
    text = b64(rng.randbytes(k) + raw + rng.randbytes(rng.randrange(6)), url, pad)
    out = scrubber(v).scrub(b"data:" + text + b"!")
    gone = value_part(text, k, len(raw)) not in out and PH in out
    assert gone, "base64 of the value survived"


@PROPERTY
@given(SEEDS)
def test_basic_header_any_user_property(seed):
    rng = random.Random(seed)
    v = random_value(rng)
    user = "".join(rng.choice(string.ascii_letters + "@.-_" + "é") for _ in range(rng.randrange(20)))
    header = base64.b64encode(f"{user}:{v}".encode())
    out = scrubber(v).scrub(b"Basic " + header)
    gone = value_part(header, len(user.encode()) + 1, len(v.encode())) not in out and PH in out
    assert gone, "the value survived in a Basic header"


def noise(rng: random.Random, values: list[str]) -> bytes:
    """Text meant to trip the anchors: escapes of the values' characters, pieces of their forms."""
    v = rng.choice(values)
    pieces = [
        lambda: rng.randbytes(rng.randrange(30)),
        lambda: encode(v[rng.randrange(len(v)):][: rng.randrange(1, 6)], rng),
        lambda: v.encode()[: rng.randrange(len(v.encode()))],
        lambda: base64.b64encode(rng.randbytes(rng.randrange(3)) + v.encode())[: rng.randrange(40)],
        lambda: v.encode().hex().encode()[rng.randrange(20):],
        lambda: rng.choice([b"%", b"\\", b"&", b"+", b"&#", b"\\u00", b"%2", b";", b"="]),
        lambda: encode(v, rng),
        lambda: base64.b64encode(rng.randbytes(rng.randrange(3)) + v.encode()),
        lambda: b"Basic " + base64.b64encode(b"u:" + v.encode()),
        lambda: v.encode().hex().upper().encode(),
    ]
    return b"".join(rng.choice(pieces)() for _ in range(rng.randrange(1, 12)))


@PROPERTY
@given(SEEDS, st.lists(st.integers(0, 10**6), max_size=12))
def test_streamed_equals_whole_and_anchored_equals_full_scan(seed, cuts):
    rng = random.Random(seed)
    values = [random_value(rng) for _ in range(rng.randint(1, 3))]
    s = scrubber(*values)
    data = noise(rng, values)
    whole = s.scrub(data)
    same_matches = s.matches(data) == reference(s, data)
    same_stream = run_stream(s, data, cuts) == whole
    assert same_matches, "the anchors missed a match"
    assert same_stream, "streaming differs from the whole"


def test_streaming_in_small_chunks_finds_values_split_anywhere():
    v = new_value(40)
    s = scrubber(v)
    data = b"".join([b"x" * 100, json_u(v).encode(), b"y" * 10, base64.b64encode(b"u:" + v.encode()), b"z",
                     quote(v).encode(), v.encode().hex().encode(), b"end"])
    for size in (1, 2, 3, 7, 64):
        rewriter = s.stream()
        got = b"".join(rewriter.feed(data[i:i + size]) for i in range(0, len(data), size)) + rewriter.finish()
        same = got == s.scrub(data)
        assert same and got.count(PH) == 4, "streamed output differs"


def test_stream_lets_go_at_a_byte_no_match_holds():
    """An SSE event goes out whole as it comes: nothing waits for max_len more bytes."""
    v = new_value(40).replace(" ", "")
    s = scrubber(v)
    rewriter = s.stream()
    first = rewriter.feed(b"data: {\"echo\": \"" + json_u(v).encode() + b"\"}\n\n")
    assert first == b"data: {\"echo\": \"" + PH + b"\"}\n\n"
    held = rewriter.feed(b"data: " + v.encode()[:5])  # may be the start of a match: held
    assert held == b"data: " and rewriter.finish() == v.encode()[:5]


def test_stream_of_a_value_with_a_space_split_at_the_space():
    v = "sk-with a space-" + secrets.token_hex(8)
    s = scrubber(v)
    data = b"x " + quote_plus(v).encode() + b" " + v.encode() + b" y\n"
    for cut in range(len(data) + 1):
        rewriter = s.stream()
        got = rewriter.feed(data[:cut]) + rewriter.feed(data[cut:]) + rewriter.finish()
        same = got == b"x " + PH + b" " + PH + b" y\n"
        assert same, "a value with a space survived a split stream"


def test_stream_rewriter_follows_the_current_scrubber():
    v, w = new_value(), new_value()
    scrubbers = [scrubber(v)]
    rewriter = stream_rewriter(lambda: scrubbers[-1])
    first = rewriter.feed(b"<" + v.encode() + b">\n")
    scrubbers.append(scrubber(v, w))  # the principal's values changed: the next chunks see them
    rest = rewriter.feed(b"<" + quote(w).encode()) + rewriter.feed(b">\n") + rewriter.finish()
    assert first + rest == b"<" + PH + b">\n<" + PH2 + b">\n"


def test_many_escapes_take_the_scan_everything_path():
    v = new_value(20)
    s = scrubber(v)
    filler = ("%2F\\u00e9&amp;\\\"+" * 2000).encode()  # past the budget of escapes looked at one by one
    data = filler + html_dec(v).encode() + filler + quote(v).encode() + filler
    out = s.scrub(data)
    same = s.matches(data) == reference(s, data)
    assert same and out.count(PH) == 2 and out.replace(PH, b"") == filler * 3, "dense escapes broke scrubbing"


# -- API -----------------------------------------------------------------------------------


def test_api_contains_bool_and_exact_pairs():
    v = new_value()
    s = Scrubber([(b"exact-needle-1", b"[N]")])
    assert s and b"exact-needle-1" in s and v.encode() not in s
    s.add_value(v, PH.decode())  # a str placeholder is taken too
    known = v.encode() in s and quote(v).encode() not in s
    assert known, "`in` should mean: this raw value was added"
    out = s.scrub(b"a exact-needle-1 b " + json_u(v).encode())
    assert out == b"a [N] b " + PH
    assert not Scrubber() and Scrubber().scrub(b"abc") == b"abc" and Scrubber().matches(b"abc") == []


def test_add_values_updates_max_len_and_placeholder():
    s = Scrubber()
    v = new_value(10)
    s.add_values([(v, PH)])
    small = s.max_len
    s.add_values([(new_value(60), PH2)])
    assert s.max_len > small
    s.add_value(v, b"[NEW]")
    replaced = s.scrub(v.encode()) == b"[NEW]"
    assert replaced, "a new placeholder for a known value was not used"


def test_longest_match_at_a_position_wins():
    short = new_value(10)
    longer = short + "-and-more-of-it"
    s = scrubber(short, longer)  # short -> PH, longer -> PH2
    assert s.scrub(b"<" + longer.encode() + b">") == b"<" + PH2 + b">"
    assert s.scrub(b"<" + quote(longer, safe="").encode() + b">") == b"<" + PH2 + b">"
    assert s.scrub(b"<" + short.encode() + b"!>") == b"<" + PH + b"!>"


def test_stream_sees_values_added_while_it_flows():
    s = Scrubber([(b"needle-one", b"[1]")])
    v = new_value()
    rewriter = s.stream()
    first = rewriter.feed(b"needle-one ")
    s.add_value(v, PH)
    rest = rewriter.feed(json_u(v).encode()) + rewriter.finish()
    assert first + rest == b"[1] " + PH


def test_scrub_text_keeps_undecodable_bytes():
    v = new_value()
    s = scrubber(v)
    text = "caf\udce9 " + html.escape(v) + " \u20ac"
    assert s.scrub_text(text) == "caf\udce9 " + PH.decode() + " \u20ac"


def test_short_needles_and_values_are_found_everywhere():
    s = Scrubber([(b"ab", b"[AB]")])
    s.add_value("x&y", b"[XY]")  # shorter than any anchor: the regex runs over everything
    assert s.scrub(b"ab x&amp;y %78%26%79 ab") == b"[AB] [XY] [XY] [AB]"


def test_long_value():
    rng = random.Random(7)
    v = "".join(rng.choice(string.ascii_letters + string.digits + SPECIAL) for _ in range(LONG_VALUE * 4))
    s = scrubber(v)
    special = "".join(c if c in string.ascii_letters + string.digits + "-._~" else json_u(c) for c in v)
    for text in (v.encode(), json.dumps(v)[1:-1].encode(), php_json(v).encode(), quote(v).encode(),
                 lower_hex(quote(v, safe="/")).encode(), html.escape(v).encode(), special.encode(),
                 base64.b64encode(v.encode()), v.encode().hex().encode()):
        exact = s.scrub(b"[" + text + b"]") == b"[" + PH + b"]"
        assert exact, "a long value survived"


def test_max_length_value_compiles_and_scrubs():
    v = secrets.token_urlsafe(16384)[:16384]
    s = scrubber(v)
    for text in (v.encode(), json.dumps(v).encode(), base64.b64encode(b"me:" + v.encode())):
        out = s.scrub(b"<" + text + b">")
        clean = v.encode()[100:200] not in out and PH in out
        assert clean, "a 16384-character value survived"


# -- many values -----------------------------------------------------------------------------
# The table of words is read in one pass whatever the count of values, a word found anchors only the
# patterns whose literal is there, and an escape of a character many values hold anchors only those
# in which it is next to what the forms around it may stand for: none of it may lose a match.


def every_form(v: str, rng: random.Random) -> list[bytes]:
    """v in every form the module docstring lists that is replaced whole: each encoder above, two
    mixtures of escapes, hex in either case."""
    out = [enc(v).encode() for _, (_, _, cases) in SURROUNDINGS.items() for _, enc in cases]
    return out + [mixture(v).encode(), encode(v, rng), v.encode().hex().encode(), v.encode().hex().upper().encode()]


def base64_forms(v: str, rng: random.Random) -> list[tuple[bytes, bytes]]:
    """(text, the part of it that depends on v alone): v's base64 at each alignment inside longer base64,
    in either alphabet, padded or not, and in a Basic header."""
    raw, out = v.encode(), []
    for k in range(3):
        for url in (False, True):
            text = b64(rng.randbytes(30 + k) + raw + rng.randbytes(rng.randrange(4)), url, rng.random() < .5)
            out.append((text, value_part(text, 30 + k, len(raw))))
    header = base64.b64encode(b"someone:" + raw)
    return out + [(b"Basic " + header, value_part(header, 9, len(raw)))]


def test_with_1000_values_each_is_found_in_every_form():
    rng = random.Random(1000)
    values = [new_value(rng.randint(10, 60), rng) for _ in range(1000)]
    s = Scrubber()
    s.add_values((v, f"[V{i}]") for i, v in enumerate(values))
    for i in rng.sample(range(len(values)), 12):  # (all 1000 would compile 6000 patterns: a minute)
        forms = every_form(values[i], rng)
        body = b"\n".join(b"<" + form + b">" for form in forms)
        exact = s.scrub(body) == b"\n".join([b"<[V%d]>" % i] * len(forms))
        assert exact, f"value {i} survived in a form, among 1000 values"
        for text, part in base64_forms(values[i], rng):
            out = s.scrub(b'{"b": "' + text + b'"}')
            gone = part not in out and b"[V%d]" % i in out
            assert gone, f"the base64 of value {i} survived, among 1000 values"


@functools.cache
def crowd() -> tuple[list[str], Scrubber]:
    """40 values of a few characters, each held by some 20 of them: escapes of them are looked at closely."""
    rng = random.Random(3)
    pool = "ab1&%é€😀 /+=\\\"<#;"
    values = list(dict.fromkeys("".join(rng.choice(pool) for _ in range(rng.randint(8, 16))) for _ in range(40)))
    return values, scrubber(*values)


@PROPERTY
@given(SEEDS, st.lists(st.integers(0, 10**6), max_size=8))
def test_many_values_anchored_equals_full_scan(seed, cuts):
    values, s = crowd()
    rng = random.Random(seed)
    data = b"".join(noise(rng, values) for _ in range(rng.randint(1, 4)))
    same_matches = s.matches(data) == reference(s, data)
    with mock.patch.object(s._matcher._filter(), "_numpy_from", 0):  # the words read through numpy, as in a large body
        same_read = s.matches(data) == reference(s, data)
    same_stream = run_stream(s, data, cuts) == s.scrub(data)
    assert same_matches and same_read, "the anchors missed a match"
    assert same_stream, "streaming differs from the whole"


@PROPERTY
@given(st.integers(1, 4), st.integers(0, 6000), st.integers(0, 64), st.integers(0, 2**32))
def test_the_word_filter_finds_every_word_of_the_table_read_and_no_other(stride, table_size, planted, seed):
    """The bitmap is a prefilter only: what `places` gives is exactly the words read (every stride-th
    aligned word) that the table holds, in order, for a small body (looked up one by one) and a large
    one (hashed in numpy), whatever the table's size (the bitmap's size follows it)."""
    rng = random.Random(seed)
    table = {rng.getrandbits(64): () for _ in range(table_size)}
    keys = list(table)
    large = scrub._WordFilter(table, stride)._numpy_from
    for size in (rng.randrange(0, large), large + rng.randrange(0, 5000)):
        words = [rng.getrandbits(64) for _ in range(size // 8)]
        for _ in range(planted if keys and words else 0):  # words of the table, some at places not read
            words[rng.randrange(len(words))] = rng.choice(keys)
        data = b"".join(w.to_bytes(8, sys.byteorder) for w in words) + b"x" * (size % 8)
        expected = [(j, w) for j, w in enumerate(words[::stride]) if w in table]
        assert scrub._WordFilter(table, stride).places(data) == expected, "the word filter lost or made up a word"


def test_a_piece_of_a_value_where_the_table_is_read_loses_no_match():
    """The table's words of a literal without the literal (its last bytes, at every alignment to the
    words read), pieces of the other forms, and escapes of characters many values hold, right next to
    echoes: false hits anchor nothing, and change nothing."""
    rng = random.Random(11)
    values = [new_value(44, rng) for _ in range(30)]
    s = scrubber(*values)
    period = 8 * s._matcher.stride  # a word is read every period bytes: the table holds a literal's last period + 7
    v, tail = values[0].encode(), period + 7
    pieces = [v[-tail:], v.hex().encode()[-tail:], base64.b64encode(v)[-tail:], v[:tail], b"%73%6B", b"&#115;k-"]
    for offset in range(period):
        for piece in pieces:
            data = b"x" * offset + piece + v + b" " + piece + json_u(values[0]).encode() + piece
            same = s.matches(data) == reference(s, data)
            exact = s.scrub(data) == b"x" * offset + piece + PH + b" " + piece + PH + piece
            assert same and exact, "a false hit lost a match"


def test_values_that_share_their_first_or_last_bytes_are_each_found():
    """The table holds each literal's last words: values with a common end share them, and a word then
    anchors the patterns of every value that holds it."""
    end, start = secrets.token_urlsafe(40), "sk-proj-" + secrets.token_urlsafe(8)
    values = ["sk-a" + end, "sk-b" + end, start + secrets.token_urlsafe(32), start + secrets.token_urlsafe(32)]
    s = Scrubber()
    s.add_values((v, f"[V{i}]") for i, v in enumerate(values))
    for i, v in enumerate(values):
        for form in (v.encode(), v.encode().hex().encode(), quote(v).encode(), json_u(v).encode()):
            exact = s.scrub(b"<" + form + b">") == b"<[V%d]>" % i
            assert exact, f"value {i} survived next to one sharing its ends"
        header = base64.b64encode(b"me:" + v.encode())
        gone = value_part(header, 3, len(v)) not in s.scrub(header)
        assert gone, f"the base64 of value {i} survived next to one sharing its ends"


def test_an_escape_of_a_character_many_values_hold_anchors_few():
    rng = random.Random(5)
    values = ["A" + new_value(20, rng) for _ in range(200)]  # every value holds an A
    s = Scrubber()
    s.add_values((v, f"[V{i}]") for i, v in enumerate(values))
    windows = s._matcher._windows(b'{"q": "%41b", "r": "\\u0041=", "s": "&#65;"}')
    assert sum(len(pats) for _, _, pats in windows) <= 8
    for i, v in enumerate(values[:20]):
        for form in (b"%41" + quote(v[1:]).encode(), b"\\u0041" + v[1:].encode(), b"&#65" + html.escape(v[1:]).encode()):
            exact = s.scrub(b"<" + form + b">") == b"<[V%d]>" % i
            assert exact, f"value {i} survived with its A escaped"
    last = ["sk-" + new_value(10, rng) + "A" for _ in range(40)]  # ... and ends it
    s = Scrubber()
    s.add_values((v, f"[V{i}]") for i, v in enumerate(last))
    for i, v in enumerate(last[:10]):
        exact = s.scrub(b"<" + quote(v[:-1]).encode() + b"%41>") == b"<[V%d]>" % i
        assert exact, f"value {i} survived with its last A escaped"


def test_no_escape_form_is_longer_than_looked_back():
    chars = {chr(c) for c in (*range(0x800), 0x20AC, 0xFFFD, 0x10000, 0x1F600, 0x10FFFF)}
    chars |= {text for text in html.entities.html5.values() if len(text) == 1}
    longest = max(scrub._unit(scrub._forms(c)[1:])[1] for c in chars)
    assert longest <= scrub._LONGEST_ESCAPE


@pytest.mark.parametrize("large", [False, True])
def test_words_read_are_found_only_where_they_were_read(large):
    words = array.array("Q", [1, 2, 1, 3, 0x1122334455667788, 0x99AABBCCDDEEFF00])
    packed = words.tobytes() + (bytes(4 * scrub._SMALL_BODY) if large else b"")  # (the rest: zero words)
    across = int.from_bytes(packed[36:44], sys.byteorder)  # the halves of two words read
    assert scrub._WordFilter(dict.fromkeys([1, 3, across], ()), 1).places(packed) == [(0, 1), (2, 1), (3, 3)]
    assert scrub._WordFilter(dict.fromkeys([1, 3], ()), 2).places(packed) == [(0, 1), (1, 1)]  # (words 0, 2, 4...)
