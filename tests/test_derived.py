"""Signatures found again by their shape (derived.py), and through the session's Scrubber: hex in either case,
base64 of them at any alignment in either alphabet, a stream cut anywhere finding what the whole does."""

from __future__ import annotations

import base64
import secrets

from hypothesis import given, settings, strategies as st

from sealgate import derived
from sealgate.scrub import Scrubber

SIG = secrets.token_hex(32)


def _scrubber() -> Scrubber:
    s = Scrubber()
    s.add_signature(SIG, "sg.x.SIGNED.y")
    return s


@settings(max_examples=200, deadline=None)
@given(before=st.binary(max_size=5), after=st.binary(max_size=5), url_safe=st.booleans(), upper=st.booleans(),
       left=st.sampled_from([b"", b" ", b'"', b"=", b"\n"]), right=st.sampled_from([b"", b" ", b'"', b"\n"]))
def test_a_signature_is_found_in_every_form_and_nothing_of_it_is_left(before, after, url_safe, upper, left, right):
    sig = (SIG.upper() if upper else SIG).encode()
    encode = base64.urlsafe_b64encode if url_safe else base64.b64encode
    for text in (sig, encode(before + sig + after)):
        out = _scrubber().scrub(left + text + right)
        assert b"sg.x.SIGNED.y" in out and SIG.encode() not in out.lower()
        rest = out.replace(b"sg.x.SIGNED.y", b"")
        assert not _scrubber().signatures.matches(rest)


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6), url_safe=st.booleans(),
       pad=st.binary(max_size=3))
def test_streamed_as_whole(cuts, url_safe, pad):
    encode = base64.urlsafe_b64encode if url_safe else base64.b64encode
    body = (b'{"echo": "' + SIG.encode() + b'", "b64": "' + encode(pad + SIG.encode()) + b'"}\n') * 2
    whole = _scrubber().scrub(body)
    s = _scrubber()
    rewriter, out, pos = s.stream(), b"", 0
    for cut in sorted(c for c in cuts if c <= len(body)):
        out += rewriter.feed(body[pos:cut])
        pos = cut
    out += rewriter.feed(body[pos:]) + rewriter.finish()
    assert out == whole and SIG.encode() not in out


def test_a_value_match_is_never_cut_short_by_a_signature():
    value = "v-" + SIG[:40]  # a value sharing hex digits with the signature
    s = Scrubber()
    s.add_value(value, "sg.x.V.y")
    s.add_signature(SIG, "sg.x.S.y")
    assert s.scrub(value.encode() + SIG[40:].encode()) == b"sg.x.V.y" + SIG[40:].encode()


def test_only_the_most_recent_are_kept():
    sigs = derived.Signatures()
    first = secrets.token_hex(32)
    sigs.add(first, b"x")
    for _ in range(derived.KEPT):
        sigs.add(secrets.token_hex(32), b"y")
    assert sigs.matches(first.encode()) == [] and len(sigs._seen) == derived.KEPT


def test_nothing_is_sought_without_signatures_and_a_scrubber_with_one_is_not_empty():
    assert not Scrubber() and _scrubber() and _scrubber().max_len >= derived.MAX_LEN
