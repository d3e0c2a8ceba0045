"""Signatures found again by their shape (derived.py), and through the session's Scrubber: hex in either case,
base64 of them at any alignment in either alphabet, a stream cut anywhere finding what the whole does."""

from __future__ import annotations

import base64
import secrets

from hypothesis import given, settings, strategies as st

from sealgate import derived
from sealgate.scrub import Scrubber

SIG = secrets.token_hex(32)


def _decodes_to(text: bytes, needle: bytes) -> bool:
    """Whether base64 text, read from any of its first four characters, decodes to something holding needle."""
    text = text.translate(bytes.maketrans(b"-_", b"+/"))
    for off in range(4):
        usable = text[off:][: len(text[off:]) // 4 * 4]
        try:
            if needle in base64.b64decode(usable):
                return True
        except ValueError:
            pass
    return False


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
    for text in (sig, encode(before + SIG.encode() + after)):  # (base64 of the upper-case form is not sought)
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
    assert s.scrub(value.encode() + SIG[40:].encode()) == b"sg.x.V.y" + b"sg.x.S.y"  # one span: nothing left


@settings(max_examples=200, deadline=None)
@given(length=st.integers(min_value=8, max_value=40), sep=st.sampled_from([b"", b":", b" ", b"\n", b"=", b"ab"]),
       lead=st.binary(max_size=3), url_safe=st.booleans(), cuts=st.lists(st.integers(0, 300), max_size=4))
def test_a_signature_next_to_a_value_in_base64_leaves_nothing_of_either(length, sep, lead, url_safe, cuts):
    """The red team's (round 14): a signature's base64 group can share a character with a value's base64;
    the signature was dropped as overlapping, and came back in clear. Now both go, whole or streamed."""
    value = "v" + secrets.token_urlsafe(length)[:length - 1]
    s = Scrubber()
    s.add_value(value, "sg.x.V.y")
    s.add_signature(SIG, "sg.x.S.y")
    encode = base64.urlsafe_b64encode if url_safe else base64.b64encode
    body = b"echo: " + encode(lead + value.encode() + sep + SIG.encode()) + b"\n"
    whole = s.scrub(body)
    assert not s.signatures.matches(whole) and value.encode() not in whole
    rest = whole.split(b": ", 1)[1]
    for piece in rest.replace(b"sg.x.S.y", b" ").replace(b"sg.x.V.y", b" ").split():
        assert not _decodes_to(piece, SIG.encode()) and not _decodes_to(piece, value.encode())
    rewriter, out, pos = s.stream(), b"", 0
    for cut in sorted(c for c in cuts if c <= len(body)):
        out += rewriter.feed(body[pos:cut])
        pos = cut
    assert out + rewriter.feed(body[pos:]) + rewriter.finish() == whole


def test_scrubbing_stays_linear_whatever_the_shape():
    """The red team's (round 14): 8 MiB of hex, or of base64 of hex, took 3 to 4 s to scrub once a session had
    signed anything (a lookup at every position); now every 32nd. Checked by counting lookups, not by time."""
    sigs = derived.Signatures()
    for _ in range(derived.KEPT):
        sigs.add(secrets.token_hex(32), b"x")
    looked: list[bytes] = []

    class Counting(dict):
        def get(self, key, default=None):
            looked.append(key)
            return super().get(key, default)
    sigs._hex.pieces, sigs._b64.pieces = Counting(sigs._hex.pieces), Counting(sigs._b64.pieces)
    data = b"0123456789abcdef" * (1 << 16)  # 1 MiB of hex, which is base64 text too
    assert sigs.matches(data) == [] and len(looked) <= 2 * (len(data) // 32 + 1)
    looked.clear()
    assert sigs.matches(base64.b64encode(data)) == [] and len(looked) <= 2 * (len(data) // 32 + 1)


def test_only_the_most_recent_are_kept():
    sigs = derived.Signatures()
    first = secrets.token_hex(32)
    sigs.add(first, b"x")
    for _ in range(derived.KEPT):
        sigs.add(secrets.token_hex(32), b"y")
    assert sigs.matches(first.encode()) == [] and len(sigs._seen) == derived.KEPT


def test_nothing_is_sought_without_signatures_and_a_scrubber_with_one_is_not_empty():
    assert not Scrubber() and _scrubber() and _scrubber().max_len >= derived.MAX_LEN
