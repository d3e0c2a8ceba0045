"""placeholders, inject and scrub: the pure scanning, escaping and scrubbing core."""

import base64
import json
import os
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import assume, given, strategies as st

from sealgate import inject, placeholders
from sealgate.inject import Context
from sealgate.scrub import Scrubber

KEY = os.urandom(32)
SID = "abcdefghijklmnop"


def ph(name: str, sid: str = SID, key: bytes = KEY) -> str:
    return placeholders.mint(key, sid, name)


def test_placeholder_alphabet_survives_every_context():
    p = ph("OPENAI_KEY")
    assert all(c.isalnum() or c in "._-" for c in p)
    for c in Context:
        assert inject.escape(p, c) == p.encode()


def test_find_every_placeholder_in_order():
    a, b = ph("A"), ph("B_2")
    data = f'{{"x": "{a}", "y": "Bearer {b}"}}{a}'.encode()
    found = placeholders.find(data)
    assert [f.placeholder.text for f in found] == [a, b, a]
    assert all(data[f.start:f.end] == f.placeholder.text.encode() for f in found)
    assert found[1].placeholder.name == "B_2"


@given(st.lists(st.one_of(st.binary(max_size=40), st.sampled_from([b".", b"sg", b"sg.", b"s", b"g.", b".sg."]),
                         st.sampled_from(["A", "B_2"]).map(lambda n: ph(n).encode())), max_size=12))
def test_find_gives_what_the_grammar_matches_wherever_the_dots_are(pieces):
    """find looks for a dot first (one memchr passes over a body with none): no placeholder may be missed for
    it, before, at or after the first dot, at the very start of the data or right after another."""
    data = b"".join(pieces)
    expected = [(m.start(), m.end(), m.group(0).decode()) for m in placeholders.PATTERN.finditer(data)]
    assert [(f.start, f.end, f.placeholder.text) for f in placeholders.find(data)] == expected


def test_mac_binds_session_and_name():
    p = placeholders.find(ph("A").encode())[0].placeholder
    assert p.is_valid_for(SID, KEY)
    assert not p.is_valid_for("bbbbbbbbbbbbbbbb", KEY)
    assert not p.is_valid_for(SID, os.urandom(32))
    forged = placeholders.find(ph("A").replace(".A.", ".B.").encode())[0].placeholder
    assert not forged.is_valid_for(SID, KEY)


def test_near_misses_are_not_placeholders():
    good = ph("A")
    assert placeholders.find(good[:-1].encode()) == []
    assert placeholders.find(good.upper().encode()) == []
    assert placeholders.find(b"sg.short.A.0123") == []


@pytest.mark.parametrize("value", ['ab"c\\d', 'x", "admin": true, "y": "', "</script>\u2603"])
def test_json_escaping_keeps_the_string_closed(value):
    p = ph("K")
    body = json.dumps({"key": p, "other": 1}).encode()
    out = inject.substitute(body, placeholders.find(body), {p: value}, Context.JSON)
    assert json.loads(out) == {"key": value, "other": 1}


@pytest.mark.parametrize("value", ["a&admin=1", "a b+c/d?e#f", "100%ok=="])
def test_url_and_form_escaping_keep_one_parameter(value):
    p = ph("K")
    url = f"/v1?key={p}&x=1".encode()
    out = inject.substitute(url, placeholders.find(url), {p: value}, Context.URL)
    assert parse_qs(urlsplit(out.decode()).query) == {"key": [value], "x": ["1"]}
    form = f"key={p}&x=1".encode()
    out = inject.substitute(form, placeholders.find(form), {p: value}, Context.FORM)
    assert parse_qs(out.decode()) == {"key": [value], "x": ["1"]}


@pytest.mark.parametrize("content_type, body, expected", [
    ("application/json", b"{}", Context.JSON),
    ("application/vnd.api+json; charset=utf-8", b"{}", Context.JSON),
    ("application/x-www-form-urlencoded", b"a=b", Context.FORM),
    ("multipart/form-data; boundary=x", b"--x", Context.RAW),
    ("text/plain", b'  {"a": 1}', Context.JSON),
    ("", b"[1]", Context.JSON),
    ("text/plain", b"hello", Context.RAW),
])
def test_body_context(content_type, body, expected):
    assert inject.body_context(content_type, body) is expected


def test_basic_auth_round_trip():
    p = ph("PW")
    header = "Basic " + base64.b64encode(f"me:{p}".encode()).decode()
    decoded, found = inject.find_in_basic(header)
    assert decoded == f"me:{p}".encode() and found[0].placeholder.text == p
    assert inject.find_in_basic("Basic !!!notbase64") is None
    assert inject.find_in_basic("Bearer " + p) is None


def test_scrubber_replaces_all_derived_forms():
    value, p = 'sk-"live"/x y&z', ph("K")
    s = Scrubber(inject.derived_forms(value, p))
    for c in Context:
        assert value.encode() not in s.scrub(b"<" + inject.escape(value, c) + b">")
        assert s.scrub(b"<" + inject.escape(value, c) + b">") == b"<" + p.encode() + b">"


values = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=8, max_size=40)


@given(values, st.lists(st.sampled_from(["A", "B", "C"]), min_size=1, max_size=5), st.text(max_size=30))
def test_substitute_matches_reference(value, names, filler):
    tokens = {n: ph(n) for n in names}
    vals = {tokens[n]: value + n for n in names}
    data = filler.join(tokens[n] for n in names).encode()
    out = inject.substitute(data, placeholders.find(data), vals, Context.RAW)
    assert out == filler.join(value + n for n in names).encode()


@given(values, st.binary(max_size=60), st.binary(max_size=60), st.sampled_from(list(Context)))
def test_no_value_survives_scrubbing(value, before, after, context):
    p = ph("K")
    pairs = inject.derived_forms(value, p)
    assume(all(needle not in p.encode() for needle, _ in pairs))
    out = Scrubber(pairs).scrub(before + inject.escape(value, context) + after)
    assert all(needle not in out for needle, _ in pairs)
