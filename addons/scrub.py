"""Replace secret values with placeholders, in whatever common encoding they come back in (pure).

A `Scrubber` (one per session, knowing its principal's values) finds each value given to
`add_value`

- character by character, each character independently in any of these forms: itself (its
  UTF-8 bytes, each byte also as `%HH` or `\\xHH`, hex digits in either case); `+` for a
  space (form encoding); `%HH`, `\\xHH` and `\\u00HH` of a Latin-1 character; `\\uXXXX` and
  `%uXXXX` (a surrogate pair beyond the BMP, or `\\UXXXXXXXX`); the JSON and JavaScript short
  escapes `\\" \\\\ \\/ \\'`; HTML character references, decimal and hex (`&#NN;`, `&#xHH;`,
  `&#XHH;`, up to 7 leading zeros, the `;` optional, and the C1 numbers HTML reads as
  Windows-1252) and every named reference HTML5 has for the character (`&amp; &lt; &gt;
  &quot; &apos; &sol; &plus;` ...);
- as base64 of its UTF-8 bytes at any alignment inside a longer base64 text, standard or
  URL-safe alphabet, with or without padding, `+ / =` in any of the forms above (`\\/` in
  JSON, `%2F` in a URL): the characters that depend on the value alone, and the one after
  them that depends on it in part (so `Basic base64(anyuser:value)` is caught too);
- as hex of its UTF-8 bytes, lower or upper case.

Byte strings given to `add` are found exactly, and signatures given to `add_signature` by their shape
(`derived`). Each match is replaced with the placeholder (or replacement) given for it.

How. The patterns, the longest first, make one regular expression, and `matches` gives what
its `finditer` would; but it is never run as such. Python's `re` tries every pattern at every
position where one could start, base64 and hex forms start at almost any letter, and spelling
out every form of every character is slow to compile (some 2 ms per 10 characters). So each
pattern is spelled out and compiled on its own, when first needed, and only run near anchors:
places that any of its matches holds. An anchor is one of three things. A literal every match
of the pattern holds (a value's raw bytes, the letters and digits of its base64 form, its hex):
a body is read as aligned 8-byte words, every stride-th of them (4th, when no literal is shorter
than 39 bytes), and a literal 8 * stride + 7 bytes or longer holds one of those read wherever it
lies; so the words it may show there, one for each offset modulo 8 * stride (taken from its end:
values of a kind share their first bytes), make a table that all the words read are looked up in
at once, one lookup a word, whatever the count of values. A word found anchors the patterns whose
literal is there around it. A shorter literal is found with `bytes.find`. Or an escape (`%`,
`\\`, `&`, `+`) of a character of a value, followed by what may follow that character; where
many values hold the character, it anchors only those in which the characters around it are
what the forms around the escape may stand for (a `%41` is no anchor for every value with an
`A`). A match is at most `max_len` bytes, so it lies within `max_len` of its anchor; in such a
window, the patterns anchored there are searched and their first match (the first pattern at a
tie) taken, just as the alternation would. A pattern without an anchor (a value or needle under
4 bytes) is searched everywhere. In a value longer than 256 characters, letters, digits and
`-._~` are sought as themselves only: no encoder escapes those, and all forms of 16384
characters take seconds to compile. The table grows with the values, some 190 words each: past
a few thousand words a lookup misses the CPU's caches, so a body of 8 KiB or more is not looked up
word by word: numpy tests all its words read at once against a Bloom filter of the table's words
(`_WordFilter`, 512 KiB at most), and only the few that pass are looked up; reading 1 MiB costs
some 0.2 ms with one value and 0.25 ms with 1000.

What it cannot catch: whatever an upstream makes of a value beyond these per-character
escapes and plain base64 or hex: its own encryption, a hash, compression, a custom or
stacked encoding (base64 of escaped text, JSON inside a JSON string, line-wrapped base64,
hex with separators, a reversed or split value). It leaves up to 4 bits of a value in the
base64 character shared with what precedes it, and where the matches of two values overlap,
the one that starts first wins and the rest of the other stays. Scrubbing is a net for
echoes, not a boundary: an upstream that can hand a value back in a form of its own must not
be an allowed origin of it; the remedy is restricting where a value may be injected.
"""

from __future__ import annotations

import array
import base64
import html.entities
import re
import weakref
from collections.abc import Callable, Collection, Container, Iterable
from functools import lru_cache

import numpy as np

from . import derived
from .streams import StreamRewriter

HTML_ZEROS = 7  # leading zeros allowed in a numeric character reference
MIN_BASE64 = 8  # a base64 form with fewer characters that depend on the value alone is not sought
MIN_ANCHOR = 4  # a shorter literal is no anchor: a pattern without one is sought everywhere
LONG_VALUE = 256  # in a longer value, letters, digits and -._~ are sought as themselves only
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_LEADS = b"%\\&+"  # every form of a character other than itself starts with one of these
_PB = b"[%\\\\]"  # % or \
_SHORT = {'"': '"', "\\": "\\", "/": "/", "'": "'"}
_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_URL = {"+": "-", "/": "_"}
_WORD = 8  # bytes in an aligned word of the anchor table
_SMALL_BODY = 8192  # bytes: a shorter body's words are looked up in the table one by one, not through numpy
_SMALL_TABLE = 4096  # words: a table this small stays in the caches, looked up one by one up to 4 * _SMALL_BODY
_FEW = 16  # an escape of a character this many values hold, or fewer, is an anchor for them all
_ALNUM = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

_Form = tuple[bytes, bytes, int]  # one form of a character: its lead byte(s), a regex for the rest, its longest length


# -- regex pieces --------------------------------------------------------------------------


def _cls(bs: Iterable[int]) -> bytes:
    return b"[" + b"".join(re.escape(bytes([b])) for b in sorted(set(bs))) + b"]"


def _lead(lead: bytes) -> bytes:
    return re.escape(lead) if len(lead) == 1 else _cls(lead)


def _hex(n: int, width: int = 0) -> bytes:
    """n in hex, each letter matching either case."""
    return b"".join(
        d.encode() if d.isdigit() else b"[%s%s]" % (d.encode(), d.upper().encode()) for d in f"{n:0{width}x}"
    )


def _alt(alts: Iterable[bytes]) -> bytes:
    alts = list(dict.fromkeys(alts))
    return alts[0] if len(alts) == 1 else b"(?:" + b"|".join(alts) + b")"


def _trie(items: dict[str, list[bytes]], hexa: bool = True) -> list[bytes]:
    """Alternatives for each key (hex digits in either case, or decimal digits) followed by one of
    its regexes, sharing prefixes, so that each alternative starts with a different digit."""
    groups: dict[str, dict[str, list[bytes]]] = {}
    leaves: list[bytes] = []
    for key, rests in items.items():
        if key:
            groups.setdefault(key[0], {}).setdefault(key[1:], []).extend(rests)
        else:
            leaves += rests
    out = [(_hex(int(d, 16)) if hexa else d.encode()) + _alt(_trie(sub, hexa)) for d, sub in groups.items()]
    return out + list(dict.fromkeys(leaves))


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


# -- the forms of one character ------------------------------------------------------------


def _references() -> tuple[dict[str, list[str]], dict[str, list[int]]]:
    named: dict[str, list[str]] = {}
    for name, text in html.entities.html5.items():
        if len(text) == 1:
            named.setdefault(text, []).append(name)
    c1: dict[str, list[int]] = {}  # HTML reads &#128; as the euro sign: the Windows-1252 character
    for n in range(0x80, 0xA0):
        try:
            c1.setdefault(bytes([n]).decode("cp1252"), []).append(n)
        except UnicodeDecodeError:
            pass
    return named, c1


_NAMED, _C1 = _references()


def _numbers(ch: str) -> list[int]:
    """The numbers of the HTML numeric references to ch."""
    return [ord(ch), *_C1.get(ch, [])]


@lru_cache(maxsize=8192)
def _forms(ch: str) -> tuple[_Form, ...]:
    """Every form of one character, itself first."""
    cp, raw = ord(ch), _utf8(ch)
    # its UTF-8 bytes after the first, each as itself, %HH or \\xHH
    rest = b"".join(b"(?:%s|%sx?%s)" % (re.escape(bytes([b])), _PB, _hex(b, 2)) for b in raw[1:])
    rest_len = 4 * (len(raw) - 1)
    forms: list[_Form] = [(raw[:1], rest, 1 + rest_len)]
    if cp <= 0xFF:  # %HH \\xHH \\u00HH %u00HH (and \\HH %xHH, which nobody writes: simpler than not)
        forms.append((b"%\\", b"(?:u00|x)?" + _hex(cp, 2), 6))
    if cp > 0x7F:  # the first UTF-8 byte as %HH or \\xHH too
        forms.append((b"%\\", b"x?" + _hex(raw[0], 2) + rest, 4 + rest_len))
    if 0xFF < cp < 0x10000:
        forms.append((b"%\\", b"u" + _hex(cp, 4), 6))
    elif cp >= 0x10000:
        hi, lo = 0xD800 + ((cp - 0x10000) >> 10), 0xDC00 + ((cp - 0x10000) & 0x3FF)
        forms += [(b"%\\", b"u" + _hex(hi, 4) + _PB + b"u" + _hex(lo, 4), 12), (b"\\", b"U" + _hex(cp, 8), 10)]
    numbers = _numbers(ch)
    forms.append((b"&", b"#(?:0{0,%d}%s|[xX]0{0,%d}%s);?" % (
        HTML_ZEROS, _alt(str(n).encode() for n in numbers), HTML_ZEROS, _alt(_hex(n) for n in numbers)),
        2 + HTML_ZEROS + max(len(str(n)) + 1 for n in numbers) + 1))
    forms += [(b"&", re.escape(name.encode()), 1 + len(name)) for name in _NAMED.get(ch, [])]
    if ch in _SHORT:
        forms.append((b"\\", re.escape(_SHORT[ch].encode()), 2))
    if ch == " ":
        forms.append((b"+", b"", 1))
    return tuple(forms)


def _unit(forms: Iterable[_Form]) -> tuple[bytes, int]:
    """A regex for any of the forms, the longest first, and its longest length."""
    ordered = sorted(forms, key=lambda f: -f[2])
    return _alt(_lead(lead) + rest for lead, rest, _ in ordered), ordered[0][2]


def _first_unit(forms: Iterable[_Form]) -> tuple[bytes, int]:
    """Like _unit, but a class of the lead bytes first, which re checks before it tries the rest."""
    ordered = sorted(forms, key=lambda f: -f[2])
    if len(ordered) == 1:
        return _lead(ordered[0][0]) + ordered[0][1], ordered[0][2]
    leads = _cls(b"".join(lead for lead, _, _ in ordered))
    return leads + _alt(b"(?<=" + _lead(lead) + b")" + rest for lead, rest, _ in ordered), ordered[0][2]


@lru_cache(maxsize=8192)
def _char_unit(ch: str) -> tuple[bytes, int]:
    return _unit(_forms(ch))


@lru_cache(maxsize=8192)
def _first_char_unit(ch: str) -> tuple[bytes, int]:
    return _first_unit(_forms(ch))


@lru_cache(maxsize=8192)
def _full_unit(ch: str) -> tuple[re.Pattern[bytes], int]:
    """The forms of ch, compiled as one regex, and their longest length."""
    regex, longest = _char_unit(ch)
    return _compile(regex, 0), longest


@lru_cache(maxsize=8192)
def _escape_unit(ch: str) -> tuple[re.Pattern[bytes], int]:
    """The forms of ch other than itself, compiled as one regex, and their longest length."""
    regex, longest = _unit(_forms(ch)[1:])
    return _compile(regex, 0), longest


@lru_cache(maxsize=128)
def _b64_unit(c: str) -> tuple[bytes, int]:
    return _unit(_b64_forms(c))


@lru_cache(maxsize=128)
def _first_b64_unit(c: str) -> tuple[bytes, int]:
    return _first_unit(_b64_forms(c))


def _b64_forms(c: str) -> tuple[_Form, ...]:
    """A base64 character: itself, or + and / in either alphabet and any form (\\/ in JSON)."""
    if c not in _B64_URL:
        return ((c.encode(), b"", 1),)
    return _forms(c) + _forms(_B64_URL[c])


# -- the patterns of one value -------------------------------------------------------------


class _Pattern:
    """One way a value (or needle) can appear: a regex, its longest and shortest lengths in bytes,
    and a literal every match holds (a value's forms: its raw bytes, unless an escape is in it).
    The regex is spelled out and compiled when first needed, once for all the matchers that hold
    it: most never are, a value's forms spelled out take some 3 KB, and re takes some 2 ms per 10
    characters of a value to compile them."""

    __slots__ = ("_regex", "max_len", "min_len", "anchor", "_compiled")

    def __init__(self, regex: bytes | Callable[[], bytes], max_len: int, min_len: int, anchor: bytes) -> None:
        self._regex, self.max_len, self.min_len, self.anchor = regex, max_len, min_len, anchor
        self._compiled: re.Pattern[bytes] | None = None

    @property
    def regex(self) -> bytes:
        if not isinstance(self._regex, bytes):
            self._regex = self._regex()
        return self._regex

    @property
    def compiled(self) -> re.Pattern[bytes]:
        if self._compiled is None:
            self._compiled = _compile(self.regex, 0)
        return self._compiled


class _ValuePatterns:
    __slots__ = ("patterns", "_words", "__weakref__")

    def __init__(self, patterns: list[_Pattern]) -> None:
        self.patterns = patterns
        self._words: tuple[int, _Words] | None = None

    def words(self, stride: int) -> _Words:
        """The words of the anchors long enough for the table at this stride (`_words`), kept for the
        next matcher: a principal's is made again whenever a value is added."""
        if self._words is None or self._words[0] != stride:
            self._words = (stride, _words(self.patterns, stride))
        return self._words[1]


_Words = dict[int, tuple[_Pattern, ...]]  # a word read -> the patterns whose anchors hold it


def _words(patterns: Iterable[_Pattern], stride: int) -> _Words:
    """The words that a read of every stride-th aligned word sees of each anchor 8 * stride + 7 bytes
    or more long, wherever it lies: one at each offset modulo 8 * stride, the last there is (values of
    one kind often share their first bytes: sk-proj-, ghp_, the base64 of {"alg":)."""
    span = _WORD * stride + _WORD - 1
    out: _Words = {}
    for p in patterns:
        if len(p.anchor) >= span:
            tail, found = p.anchor[len(p.anchor) - span:], array.array("Q")
            for offset in range(_WORD):  # the words at offset, offset + 8, ...
                found.frombytes(tail[offset: offset + _WORD * stride])
            both = {w: out[w] + (p,) for w in out.keys() & found}  # (the hex of digits, in either case)
            out.update(dict.fromkeys(found, (p,)))
            out.update(both)
    return out


_VALUE_PATTERNS: weakref.WeakValueDictionary[str, _ValuePatterns] = weakref.WeakValueDictionary()


def _value_patterns(value: str) -> _ValuePatterns:
    """Made once for a value while any matcher holds it."""
    vp = _VALUE_PATTERNS.get(value)
    if vp is None:
        raw = _utf8(value)
        patterns = [_mixture_pattern(value)]
        patterns += [p for k in range(3) if (p := _base64_pattern(raw, k)) is not None]
        patterns += [_Pattern(h, len(h), len(h), h) for h in (raw.hex().encode(), raw.hex().upper().encode())]
        vp = _VALUE_PATTERNS[value] = _ValuePatterns(patterns)
    return vp


def _mixture_pattern(value: str) -> _Pattern:
    """The value character by character, each in any of its forms (in a long value, letters, digits
    and -._~ as themselves only)."""
    long = len(value) > LONG_VALUE
    units = [(re.escape(c.encode()), 1) if long and c in _UNRESERVED else _char_unit(c) if i else _first_char_unit(c)
             for i, c in enumerate(value)]
    return _Pattern(lambda: b"".join([u for u, _ in units]), sum([n for _, n in units]), len(value), _utf8(value))


def _base64_pattern(raw: bytes, k: int) -> _Pattern | None:
    """The base64 characters of raw after k bytes of anything, that depend on raw alone."""
    end_bits = 8 * (k + len(raw))
    start, stop = -(-8 * k // 6), end_bits // 6
    if stop - start < MIN_BASE64:
        return None
    encoded = base64.b64encode(bytes(k) + raw)
    chars = encoded[start:stop].decode()
    units = [_first_b64_unit(chars[0]), *map(_b64_unit, chars[1:])]
    if known := end_bits - 6 * stop:  # the next character holds the last 2 or 4 bits of raw
        pad = (3 - (k + len(raw)) % 3) % 3  # as many = as end the text if raw does
        units.append(_b64_tail(known, _B64.index(encoded[stop]) >> (6 - known), pad))
    runs = re.findall(r"[A-Za-z0-9]+", chars)  # letters and digits have no other form: every match holds them
    return _Pattern(lambda: b"".join([u for u, _ in units]), sum([n for _, n in units]), len(chars),
                    max(runs, key=len).encode() if runs else b"")


@lru_cache(maxsize=64)
def _b64_tail(known: int, top: int, pad: int) -> tuple[bytes, int]:
    """Optionally, the character whose first `known` bits are `top`, then up to pad `=`."""
    tail = bytes(c for i, c in enumerate(_B64) if i >> (6 - known) == top)
    pad_regex, pad_len = _char_unit("=")
    return b"(?:%s%s)?" % (_cls(tail + tail.translate(bytes.maketrans(b"+/", b"-_"))),
                           b"(?:%s){0,%d}" % (pad_regex, pad) if pad else b""), 1 + pad * pad_len


# -- escape anchors ------------------------------------------------------------------------


def _escapes(values: Iterable[str]) -> bytes:
    """A regex that matches where any form but itself of a character of values starts. Where
    such forms are common in ordinary text (%HH, \\uXXXX, \\/ and the like, named references,
    + for a space), it must be followed by what may follow that character in a value: the raw
    first byte of one, or an escape that is not a short one of something else (`\\/\\/` in a
    URL in PHP's JSON is no anchor for a value with no `//`). It may match more: it only says
    where to look. Built as tries, so that re turns down most escapes of anything else early."""
    follow: dict[str, set[str] | None] = {}  # None: ends a value
    for v in values:
        long = len(v) > LONG_VALUE
        for i, c in enumerate(v):
            if long and c in _UNRESERVED:
                continue  # sought as itself only
            f = follow.setdefault(c, set())
            if f is not None:
                if i == len(v) - 1:
                    follow[c] = None
                else:
                    f.add(v[i + 1])
    thens: dict[frozenset[str], bytes] = {}

    def then(f: set[str] | None) -> bytes:
        if f is None:
            return b""
        key = frozenset(f)
        if key not in thens:
            shorts = {ord(_SHORT[d]) for d in f if d in _SHORT}
            thens[key] = _alt([_cls({_utf8(d)[0] for d in f} | set(b"%&+")),
                               b"\\\\" + _cls(set(b"uxU0123456789abcdefABCDEF") | shorts)])
        return thens[key]

    hex2: dict[str, list[bytes]] = {}  # %HH \\xHH \\u00HH: Latin-1 characters and UTF-8 bytes
    hex4: dict[str, list[bytes]] = {}  # \\uXXXX %uXXXX (of a surrogate pair: the second, then what follows)
    hex8: dict[str, list[bytes]] = {}  # \\UXXXXXXXX
    dec: dict[str, list[bytes]] = {}  # &#NN; (rare in ordinary text: anything may follow)
    hexn: dict[str, list[bytes]] = {}  # &#xHH;
    named: list[bytes] = []
    short: list[bytes] = []
    plus: list[bytes] = []
    for c, f in follow.items():
        cp, raw = ord(c), _utf8(c)
        if cp <= 0xFF:
            hex2.setdefault(f"{cp:02x}", []).append(then(f))
        if cp > 0x7F:  # a UTF-8 byte escaped: what follows it is the next byte, or anything
            for b in raw:
                hex2.setdefault(f"{b:02x}", []).append(b"")
        if 0xFF < cp < 0x10000:
            hex4.setdefault(f"{cp:04x}", []).append(then(f))
        elif cp >= 0x10000:
            hi = 0xD800 + ((cp - 0x10000) >> 10)
            hex4.setdefault(f"{hi:04x}", []).append(b"")
            hex8.setdefault(f"{cp:08x}", []).append(b"")
        for n in _numbers(c):
            dec.setdefault(str(n), []).append(b"")
            hexn.setdefault(f"{n:x}", []).append(b"")
        named += [re.escape(name.encode()) + then(f) for name in _NAMED.get(c, [])]
        if c in _SHORT:
            short.append(re.escape(_SHORT[c].encode()) + then(f))
        if c == " ":
            plus.append(then(f))
    hex2 = {k: [b""] if b"" in v else v for k, v in hex2.items()}  # anything may follow: no need to say what
    # One class of the lead bytes first (re looks for it alone), then which lead it was.
    alts = [b"(?<=[%\\\\])(?:u00|x)?" + _alt(_trie(hex2))] if hex2 else []
    alts += [b"(?<=[%\\\\])u" + _alt(_trie(hex4))] if hex4 else []
    alts += [b"(?<=\\\\)U" + _alt(_trie(hex8))] if hex8 else []
    alts += [b"(?<=\\\\)" + _alt(short)] if short else []
    alts.append(b"(?<=&)" + _alt([b"#(?:[xX]0{0,%d}%s|0{0,%d}%s)" % (
        HTML_ZEROS, _alt(_trie(hexn)), HTML_ZEROS, _alt(_trie(dec, hexa=False))), *named]))
    alts += [b"(?<=\\+)" + _alt(plus)] if plus else []
    return _cls(_LEADS) + _alt(alts)


# -- the matcher ---------------------------------------------------------------------------

# Compiled past re's own cache, which would keep 512 of these large patterns for the life of
# the process: a value's patterns are shared through _VALUE_PATTERNS while a matcher holds them.
_compile = getattr(getattr(re, "_compiler", None), "compile", None) or re.compile


class _Matcher:
    """The patterns of one set of values and needles, in the order of the one regex (the longest
    first), and their anchors."""

    __slots__ = ("_values", "_held", "_mixtures", "_escapes", "patterns", "keys", "max_len", "min_len", "anywhere",
                 "escapable", "leads", "stride", "words", "literals", "breaker", "_index", "_regex", "_word_filter",
                 "__weakref__")

    def __init__(self, values: tuple[str, ...], needles: tuple[bytes, ...]) -> None:
        self._values = values
        value_patterns = [_value_patterns(v) for v in values]
        self._held = value_patterns  # (while this matcher lives, the next one for these values reuses them)
        keyed = [(p, i) for i, vp in enumerate(value_patterns) for p in vp.patterns]
        keyed += [(_Pattern(re.escape(n), len(n), len(n), n), len(values) + i) for i, n in enumerate(needles)]
        keyed.sort(key=lambda pk: -pk[0].max_len)  # the longest first, where several match at one position
        self.patterns = [p for p, _ in keyed]
        self.keys = [k for _, k in keyed]  # the index of each pattern's value (then needle)
        self.max_len = self.patterns[0].max_len
        self.min_len = min(p.min_len for p in self.patterns)
        self._regex: re.Pattern[bytes] | None = None
        self._index = index = {id(p): i for i, p in enumerate(self.patterns)}
        self.anywhere = [i for i, p in enumerate(self.patterns) if len(p.anchor) < MIN_ANCHOR]
        by_literal: dict[bytes, list[int]] = {}
        for i, p in enumerate(self.patterns):
            if len(p.anchor) >= MIN_ANCHOR:
                by_literal.setdefault(p.anchor, []).append(i)
        # An escape stands for some characters (or UTF-8 bytes): it is an anchor for the mixtures of
        # the values that hold one as other than itself (`_Escapes`, made when a body first has a lead).
        self._mixtures = [index[id(vp.patterns[0])] for vp in value_patterns]
        self._escapes: _Escapes | None = None
        self.escapable = any(len(v) <= LONG_VALUE or not _UNRESERVED.issuperset(v) for v in values)
        self.leads = [b"%", b"\\", b"&"] + ([b"+"] if any(" " in v for v in values) else [])
        # A byte no form of anything holds (a newline; a space or JSON punctuation, unless a value
        # has one): no match crosses it. Forms are made of letters, digits, %\\&+#;=-_/ and the
        # bytes of the values themselves; needles, of their own bytes.
        allowed = set(_ALNUM + b"%\\&+#;=-_/").union(*map(_utf8, values), *needles)
        self.breaker = _compile(b"[^" + b"".join(re.escape(bytes([b])) for b in sorted(allowed)) + b"]", 0)
        # Long literals go to the table of aligned words, of which every stride-th is read (each such
        # literal holds one whole), others are found one by one: the stride that costs least
        # (some 0.8 ms a MiB to read every word, 0.4 ms to find a literal).
        lengths = [len(a) for a in by_literal]
        self.stride = min((1, 2, 3, 4), key=lambda s: (0.8 / s if max(lengths) >= _WORD * s + _WORD - 1 else 0)
                          + 0.4 * sum(n < _WORD * s + _WORD - 1 for n in lengths)) if lengths else 1
        span = _WORD * self.stride + _WORD - 1  # a literal this long holds a word read at this stride
        self.literals = [(literal, pats) for literal, pats in by_literal.items() if len(literal) < span]
        tables = [vp.words(self.stride) for vp in value_patterns]
        tables.append(_words((p for p, k in keyed if k >= len(values)), self.stride))  # the needles'
        self.words: _Words = {}
        self._word_filter: _WordFilter | None = None  # (made when a body is first read)
        for table in tables:
            shared = {w: self.words[w] + table[w] for w in self.words.keys() & table.keys()}  # words of
            self.words |= table  # several values (their hex can share 8 digits): the patterns of them all
            self.words |= shared

    @property
    def regex(self) -> re.Pattern[bytes]:
        """The one regex, all patterns in order, each ending in an empty group: what `matches`
        gives is its `finditer`, with the pattern of each match `lastindex - 1`. Not used to
        scrub (it is costly to compile, and slow where many patterns could start); tests check
        against it."""
        if self._regex is None:
            self._regex = _compile(b"|".join(p.regex + b"()" for p in self.patterns), 0)
        return self._regex

    @property
    def escapes(self) -> _Escapes:
        if self._escapes is None:
            self._escapes = _Escapes(self._values, self._mixtures)
        return self._escapes

    def matches(self, data: bytes) -> list[tuple[int, int, int]]:
        """(start, end, pattern index) of every match, in order."""
        out: list[tuple[int, int, int]] = []
        for lo, hi, candidates in self._windows(data):
            out += self._scan(data, lo, hi, candidates)
        return out

    def _scan(self, data: bytes, lo: int, hi: int, candidates: list[int]) -> list[tuple[int, int, int]]:
        """finditer of the alternation of the candidates (in order) over data[lo:hi], from their searches."""
        regexes = [self.patterns[i].compiled for i in candidates]
        found = [r.search(data, lo, hi) for r in regexes]
        out: list[tuple[int, int, int]] = []
        while True:
            best = -1
            for j, m in enumerate(found):
                if m is not None and (best < 0 or m.start() < found[best].start()):  # the first in order at a tie
                    best = j
            if best < 0:
                return out
            start, end = found[best].span()
            out.append((start, end, candidates[best]))
            for j, m in enumerate(found):
                if m is not None and m.start() < end:
                    found[j] = regexes[j].search(data, end, hi)

    def _windows(self, data: bytes) -> list[tuple[int, int, list[int]]]:
        """Disjoint spans, in order, that hold every match, and the patterns that may match in each."""
        n = len(data)
        if n < self.min_len:
            return []
        anchors: list[tuple[int, int, Collection[int]]] = []
        if self.words and n >= _WORD:
            anchors += self._read(data, self._filter().places(data))
        for literal, pats in self.literals:
            anchors += _occurrences(data, literal, pats)
        if self.escapable:
            anchors += self._escaped(data)
        if self.anywhere:
            return [(0, n, sorted({*self.anywhere, *(i for _, _, pats in anchors for i in pats)}))]
        if not anchors:
            return []
        anchors.sort(key=lambda a: a[0])
        reach = self.max_len
        out: list[tuple[int, int, set[int]]] = []
        for a, b, pats in anchors:
            lo, hi = max(a - reach, 0), min(b + reach, n)
            if out and lo <= out[-1][1]:
                out[-1] = (out[-1][0], max(hi, out[-1][1]), out[-1][2] | set(pats))
            else:
                out.append((lo, hi, set(pats)))
        return [(lo, hi, sorted(pats)) for lo, hi, pats in out]

    def _filter(self) -> _WordFilter:
        if self._word_filter is None:
            self._word_filter = _WordFilter(self.words, self.stride)
        return self._word_filter

    def _read(self, data: bytes, places: list[tuple[int, int]]) -> list[tuple[int, int, list[int]]]:
        """The anchors at the words read that are in the table, each for the patterns whose literal is
        there around it (a piece of a value alone anchors nothing)."""
        step, out = _WORD * self.stride, []
        for j, w in places:
            at = j * step
            pats = [self._index[id(p)] for p in self.words[w]
                    if data.find(p.anchor, max(at + _WORD - len(p.anchor), 0), at + len(p.anchor)) >= 0]
            if pats:
                out.append((at, at + _WORD, pats))
        return out

    def _escaped(self, data: bytes) -> list[tuple[int, int, Collection[int]]]:
        """The escape anchors; past a budget, one scan of the whole is cheaper than a look at each."""
        out: list[tuple[int, int, Collection[int]]] = []
        budget = 64 + len(data) // 256
        memo: _Memo = {}
        for lead in self.leads:
            i = data.find(lead)
            while i >= 0:
                budget -= 1
                if budget < 0:
                    return self._escaped_all(data, memo)
                escapes = self.escapes
                if escapes.regex.match(data, i) and (pats := escapes.standing_for(data, i, memo)):
                    out.append((i, i + 1, pats))
                i = data.find(lead, i + 1)
        return out

    def _escaped_all(self, data: bytes, memo: _Memo) -> list[tuple[int, int, Collection[int]]]:
        escapes = self.escapes
        out: list[tuple[int, int, Collection[int]]] = []
        for m in escapes.regex.finditer(data):
            start, end = m.span()  # an escape may start inside this one, which finditer does not report
            pats = {i for at in range(start, end) if data[at] in _LEADS for i in escapes.standing_for(data, at, memo)}
            if pats:
                out.append((start, end, pats))
        return out


class _Escapes:
    """Where an escape of a character of a value may start (a regex), and which values' mixtures an
    escape may be part of. Made for a matcher when a body first holds a lead byte (most never do),
    and what it knows of a character, when an escape first stands for it."""

    __slots__ = ("regex", "_values", "_held", "_chars", "_bytes")

    def __init__(self, values: tuple[str, ...], mixtures: list[int]) -> None:
        self.regex = _escape_regex(values)
        self._values = list(zip(mixtures, values))
        self._held = frozenset().union(*values)  # (an escape may stand for any character: most are in no value)
        self._chars: dict[str, _Holders] = {}
        self._bytes: dict[int, list[str]] = {}

    def standing_for(self, data: bytes, at: int, memo: _Memo) -> set[int]:
        """The mixtures an escape at data[at] may be part of: those of the values that hold what it
        may stand for, or where many values hold a character, those in which the forms around the
        form it is in stand for the characters around it (`_Holders`)."""
        out: set[int] = set()
        for key in _decode(data, at):
            if isinstance(key, int):  # a UTF-8 byte: in a form of a character beyond ASCII that starts before
                for ch in self._byte_chars(key):
                    holders = self._holders(ch)
                    if holders.places is None:
                        out |= holders.all
                        continue
                    for start in range(max(at - _full_unit(ch)[1] + 1, 0), at + 1):
                        if ends := [end for end in _unit_ends(ch, start, data, memo) if end > at]:
                            out |= holders.standing_for(data, start, ends, memo)
            elif key in self._held:
                holders = self._holders(key)
                if holders.places is None:
                    out |= holders.all
                elif ends := _form_ends(key, data, at):  # (none: no form of it but itself starts here)
                    out |= holders.standing_for(data, at, ends, memo)
        return out

    def _holders(self, ch: str) -> _Holders:
        h = self._chars.get(ch)
        if h is None:
            h = self._chars[ch] = _Holders(ch, [(m, v) for m, v in self._values
                                                if ch in v and not (ch in _UNRESERVED and len(v) > LONG_VALUE)])
        return h

    def _byte_chars(self, b: int) -> list[str]:
        """The characters beyond ASCII of the values whose UTF-8 holds byte b."""
        chars = self._bytes.get(b)
        if chars is None:
            chars = self._bytes[b] = [c for c in self._held if ord(c) > 0x7F and b in _utf8(c)]
        return chars


_Memo = dict[tuple[bool, str, int], list[int]]  # (forward?, a character, a place) -> `_unit_ends` or `_unit_starts`
_Place = tuple[int, str, int]  # a mixture, its value, where a character is in it


class _Holders:
    """The values that hold a character (other than as itself only), and where many do, where. A form
    of the character in a body is part of a match of a value only where the forms after it and before
    it stand for the characters after it and before it in the value: where many values hold it, these
    are looked at, a character at a time, until one place is left or `_LOOKS` characters were, after
    it, then before it. Else a %41 in a body would be an anchor for every value with an A, and each
    value it is an anchor for is compiled and searched. The places are kept in a trie for each
    direction (values often share their first characters, sk- or ghp_, and their last, ==: a walk
    goes past them at once)."""

    __slots__ = ("all", "places", "_roots")

    def __init__(self, ch: str, holders: list[tuple[int, str]]) -> None:
        self.all = {m for m, _ in holders}
        self.places: list[_Place] | None = None  # (else an anchor for them all: a closer look costs more)
        if len(holders) > _FEW:
            self.places = [(m, v, i) for m, v in holders for i, c in enumerate(v) if c == ch]
        self._roots: dict[int, _Node] = {}  # by the step to the next character looked at: 1 or -1

    def standing_for(self, data: bytes, start: int, ends: list[int], memo: _Memo) -> set[int]:
        """The mixtures a form of the character spanning data[start:end], for an end in ends, may be part of."""
        places = self._walk(1, data, ends, memo)
        if len(places) > 1:
            places = set(places) & set(self._walk(-1, data, [start], memo))
        return {m for m, _, _ in places}

    def _walk(self, step: int, data: bytes, at: list[int], memo: _Memo) -> list[_Place]:
        """The places where the forms from `at` on (step 1; or back, -1) stand for the characters after
        (before) this one, one after another, or all there are of them."""
        if step not in self._roots:
            assert self.places is not None
            self._roots[step] = _Node(self.places, step)
        frontier, ended = [(self._roots[step], at)], []
        for _ in range(_LOOKS):
            if len(ended) + sum(len(node.places) for node, _ in frontier) <= 1:
                break
            reached = []
            for node, places in frontier:
                ended += node.after.get(None, ())
                found: dict[str, set[int]] = {}
                for p in places:
                    for key in _starting(data, p) if step > 0 else _ending(data, p, node.keys):
                        for ch in [key] if isinstance(key, str) else node.by_byte.get(key, ()):
                            if ch in node.after and (more := _unit_ends(ch, p, data, memo) if step > 0
                                                     else _unit_starts(ch, p, data, memo)):
                                found.setdefault(ch, set()).update(more)
                reached += [(node.child(ch), sorted(more)) for ch, more in found.items()]
            frontier = reached
            if not frontier:
                break
        return ended + [place for node, _ in frontier for place in node.places]


class _Node:
    """Of a trie of `_Holders`: places, by the next character looked at (None: the value ends), and
    those beyond ASCII by what `_starting` (their first UTF-8 byte) or `_ending` (`_BEYOND_ASCII`) names
    them by. A child is kept while it holds many places: fewer are sorted again when a walk goes there."""

    __slots__ = ("places", "step", "after", "by_byte", "keys", "_children")

    def __init__(self, places: list[_Place], step: int) -> None:
        self.places, self.step = places, step
        self.after: dict[str | None, list[_Place]] = {}
        self.by_byte: dict[int, set[str]] = {}
        for place in places:
            _, v, i = place
            ch = v[i + step] if 0 <= i + step < len(v) else None
            self.after.setdefault(ch, []).append(place)
            if ch is not None and ord(ch) > 0x7F:
                self.by_byte.setdefault(_utf8(ch)[0] if step > 0 else _BEYOND_ASCII, set()).add(ch)
        self.keys = {*self.after, *self.by_byte}
        self._children: dict[str, _Node] = {}

    def child(self, ch: str) -> _Node:
        node = self._children.get(ch)
        if node is None:
            node = _Node(self.after[ch], self.step + (1 if self.step > 0 else -1))
            if len(node.places) > _FEW:
                self._children[ch] = node
        return node


_LOOKS = 32  # characters looked at around an escape, at most, before the values left are taken
_BEYOND_ASCII = -1  # what `_ending` names a character beyond ASCII by
_LONGEST_ESCAPE = max(2 + 1 + HTML_ZEROS + 7 + 1, 1 + max(map(len, html.entities.html5)), 16)  # bytes: of &#x...;,
# &name; and a character beyond ASCII with its first UTF-8 byte escaped


def _starting(data: bytes, at: int) -> set[str | int]:
    """What a form starting at data[at] may stand for: itself (an ASCII character, or the first UTF-8
    byte of another), or what an escape there may (a superset)."""
    if at >= len(data):
        return set()
    keys = _decode(data, at)
    keys.add(chr(data[at]) if data[at] < 0x80 else data[at])
    return keys


def _ending(data: bytes, at: int, wanted: Container[str | int]) -> set[str | int]:
    """What of wanted a form ending at data[at] may stand for: the ASCII character before (or one
    beyond ASCII, `_BEYOND_ASCII`), or what an escape ending there may (a superset). Only the wanted
    are looked for: a body chooses the characters its escapes stand for."""
    if at == 0:
        return set()
    before = chr(data[at - 1]) if data[at - 1] < 0x80 else _BEYOND_ASCII
    keys: set[str | int] = {before} if before in wanted else set()
    for start in range(max(at - _LONGEST_ESCAPE, 0), at):
        if data[start] in _LEADS:
            for key in _decode(data, start):
                if isinstance(key, int):
                    if key > 0x7F and _BEYOND_ASCII in wanted:
                        keys.add(_BEYOND_ASCII)  # an escaped UTF-8 byte
                elif key in wanted and _escape_unit(key)[0].fullmatch(data, start, at):
                    keys.add(key)
    return keys


def _unit_ends(ch: str, at: int, data: bytes, memo: _Memo) -> list[int]:
    """Where a form of ch that starts at data[at] may end."""
    ends = memo.get((True, ch, at))
    if ends is None:
        regex, longest = _full_unit(ch)
        ends = memo[True, ch, at] = [end for end in range(at + 1, min(at + longest, len(data)) + 1)
                                     if regex.fullmatch(data, at, end)] if _may_start(ch, data, at) else []
    return ends


def _unit_starts(ch: str, at: int, data: bytes, memo: _Memo) -> list[int]:
    """Where a form of ch that ends at data[at] may start."""
    starts = memo.get((False, ch, at))
    if starts is None:
        regex, longest = _full_unit(ch)
        starts = memo[False, ch, at] = [start for start in range(max(at - longest, 0), at)
                                        if _may_start(ch, data, start) and regex.fullmatch(data, start, at)]
    return starts


def _may_start(ch: str, data: bytes, at: int) -> bool:
    """Whether a form of ch may start at data[at]: each starts with its first UTF-8 byte or a lead."""
    return at < len(data) and (data[at] in _LEADS or data[at] == _utf8(ch)[0])


def _form_ends(ch: str, data: bytes, at: int) -> list[int]:
    """Where a form of ch other than itself that starts at data[at] may end."""
    regex, longest = _escape_unit(ch)
    return [end for end in range(at + 1, min(at + longest, len(data)) + 1) if regex.fullmatch(data, at, end)]


def _decode(data: bytes, at: int) -> set[str | int]:
    """What a form of a character starting at data[at] may stand for: characters, and the bytes of
    %HH and \\xHH (a UTF-8 byte). A superset of what `_forms` reads there (it must never miss one)."""
    lead, rest = data[at], data[at + 1: at + 40]
    out: set[str | int] = set()
    if lead in b"%\\":
        for pre in (b"", b"x", b"u00"):  # %HH \\xHH \\u00HH (and \\HH %xHH)
            if rest.startswith(pre) and _is_hex(h := rest[len(pre):len(pre) + 2], 2):
                out |= {int(h, 16), chr(int(h, 16))}
        if rest[:1] == b"u" and _is_hex(rest[1:5], 4):  # \\uXXXX %uXXXX, a surrogate pair
            u = int(rest[1:5], 16)
            if 0xD800 <= u < 0xDC00 and rest[5:6] in (b"%", b"\\") and rest[6:7] == b"u" and _is_hex(rest[7:11], 4):
                lo = int(rest[7:11], 16)
                if 0xDC00 <= lo < 0xE000:
                    out.add(chr(0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00)))
            out.add(chr(u))
        if lead == ord("\\"):
            if rest[:1] == b"U" and _is_hex(rest[1:9], 8) and int(rest[1:9], 16) < 0x110000:
                out.add(chr(int(rest[1:9], 16)))
            if rest[:1] and rest[:1] in b"\"\\/'":
                out.add(rest[:1].decode())
    elif lead == ord("&"):
        if rest[:1] == b"#":  # &#NN; &#xHH;: every number the digits start with (the ; is optional)
            hexa = rest[1:2] in (b"x", b"X")
            digits = rest[2:] if hexa else rest[1:]
            zeros = len(digits) - len(digits.lstrip(b"0"))
            run = re.match(rb"[0-9a-fA-F]*" if hexa else rb"[0-9]*", digits[zeros:]).group()
            if 0 < zeros <= HTML_ZEROS + 1:  # &#0; to &#00000000;: U+0000, whose digits are all zeros
                out.add("\0")
            if zeros <= HTML_ZEROS:
                for j in range(1, min(len(run), 8) + 1):
                    n = int(run[:j], 16 if hexa else 10)
                    if n < 0x110000:
                        out |= {chr(n), *_C1_BY_NUMBER.get(n, ())}
        elif name := _NAME_RUN.match(rest):
            run = name.group()
            for j in range(2, len(run) + 1):
                out.update(_NAME_CHARS.get(run[:j], ()))
    elif lead == ord("+"):
        out.add(" ")
    return out


def _is_hex(b: bytes, n: int) -> bool:
    return len(b) == n and all(c in b"0123456789abcdefABCDEF" for c in b)


_C1_BY_NUMBER: dict[int, list[str]] = {}
for _ch, _ns in _C1.items():
    for _n in _ns:
        _C1_BY_NUMBER.setdefault(_n, []).append(_ch)
_NAME_CHARS: dict[bytes, set[str]] = {}
for _ch, _names in _NAMED.items():
    for _name in _names:
        _NAME_CHARS.setdefault(_name.encode(), set()).add(_ch)
_NAME_RUN = re.compile(rb"[A-Za-z][A-Za-z0-9]{0,%d};?" % max(map(len, _NAME_CHARS)))


class _WordFilter:
    """Which of a body's words read (every stride-th aligned 8-byte word) are in the table, at nearly the same
    cost whatever the table holds: a Bloom filter of two hashes (multiplied, their top bits kept) in a bitmap
    of 16 to 32 bits per word of the table (512 KiB at most, half a core's second-level cache here), tested in
    numpy for all the words read at once; only the words that pass both (those of the table, and under 1% of
    others) are looked up in the table itself. A dict of 190,000 words (1000 values) misses the caches at
    every lookup; with one hash and a bitmap of 1 MiB, 1000 values scrubbed 1 MiB at 0.54-0.73x the speed of
    one, with two in 512 KiB at 0.76-0.84x."""

    __slots__ = ("_words", "_stride", "_bits", "_shift", "_numpy_from")

    _MULTIPLIERS = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F))  # (odd: every bit counts)

    def __init__(self, words: _Words, stride: int) -> None:
        self._words, self._stride = words, stride
        # numpy's dozen calls cost some 16 us whatever the body; a lookup, some 1.1 ns a byte read (a small
        # table) to 1.5 and more (a large one, as it misses the caches): 16 KiB chunks of an event stream
        # cost 1.1x as much through numpy with one value
        self._numpy_from = _SMALL_BODY * (4 if len(words) <= _SMALL_TABLE else 1)
        bits = min(max((16 * len(words)).bit_length(), 12), 22)  # 16-32 bits a word (to 262,144 words), 512 KiB at most
        self._shift = np.uint64(64 - bits)
        keys = np.fromiter(words, dtype=np.uint64, count=len(words))
        self._bits = np.zeros(1 << (bits - 3), dtype=np.uint8)
        for m in self._MULTIPLIERS:
            h = (keys * m) >> self._shift
            np.bitwise_or.at(self._bits, h >> np.uint64(3), np.left_shift(1, h & np.uint64(7)).astype(np.uint8))

    def _hit(self, read: np.ndarray, multiplier: np.uint64) -> np.ndarray:
        h = (read * multiplier) >> self._shift
        return (self._bits[h >> np.uint64(3)] >> (h & np.uint64(7)).astype(np.uint8)) & 1

    def places(self, data: bytes) -> list[tuple[int, int]]:
        """(index among the words read, word) of each word read that is in the table, in order."""
        words = self._words
        if len(data) < self._numpy_from:  # a few words: looked up one by one (numpy's calls cost more)
            small = array.array("Q")
            small.frombytes(memoryview(data)[: len(data) - len(data) % _WORD])
            small = small[:: self._stride]
            return [(j, w) for j, w in enumerate(small) if w in words] if words.keys() & small else []
        read = np.frombuffer(data, dtype=np.uint64, count=len(data) // _WORD)[:: self._stride]
        first = np.flatnonzero(self._hit(read, self._MULTIPLIERS[0]))
        maybe = first[np.flatnonzero(self._hit(read[first], self._MULTIPLIERS[1]))]
        return [(j, w) for j, w in zip(maybe.tolist(), read[maybe].tolist(), strict=True) if w in words]


def _occurrences(data: bytes, needle: bytes, pats: list[int]) -> list[tuple[int, int, list[int]]]:
    out = []
    i = data.find(needle)
    while i >= 0:
        out.append((i, i + len(needle), pats))
        i = data.find(needle, i + 1)
    return out


_ESCAPES: weakref.WeakValueDictionary[tuple[str, ...], re.Pattern[bytes]] = weakref.WeakValueDictionary()


def _escape_regex(values: tuple[str, ...]) -> re.Pattern[bytes]:
    """Compiled once for a set of values (a needle added, say a Basic header, leaves it as it is)."""
    r = _ESCAPES.get(values)
    if r is None:
        r = _ESCAPES[values] = _compile(_escapes(values), 0)
    return r


_MATCHERS: weakref.WeakValueDictionary[tuple, _Matcher] = weakref.WeakValueDictionary()


def _matcher(values: tuple[str, ...], needles: tuple[bytes, ...]) -> _Matcher:
    """Shared by every scrubber with the same values and needles (the sessions of one principal)."""
    m = _MATCHERS.get((values, needles))
    if m is None:
        m = _MATCHERS[values, needles] = _Matcher(values, needles)
    return m


class Scrubber:
    """Replaces every value (in every form above) and every exact needle with its placeholder."""

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self._pairs: dict[bytes, bytes] = {}  # exact needle -> replacement
        self._values: dict[str, bytes] = {}  # value -> placeholder
        self._raw: set[bytes] = set()  # the values' UTF-8 bytes, for `in`
        self._matcher: _Matcher | None = None
        self.signatures = derived.Signatures()
        self._signed = False  # a signature was added (a flag: it is asked on every scrub)
        self._replacements: list[bytes] = []  # by pattern index
        self.max_len = 0  # the longest match: how much of a stream must be held back
        self.add(pairs)

    def add(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """Exact byte strings, each replaced by its replacement."""
        changed = False
        for needle, replacement in pairs:
            if needle and self._pairs.get(needle) != replacement:
                self._pairs[needle] = replacement
                changed = True
        if changed:
            self._update()

    def add_value(self, value: str, placeholder: bytes | str) -> None:
        """A value, replaced by placeholder in every form the module docstring lists."""
        self.add_values([(value, placeholder)])

    def add_values(self, pairs: Iterable[tuple[str, bytes | str]]) -> None:
        """Values and their placeholders, at once."""
        changed = False
        for value, placeholder in pairs:
            if isinstance(placeholder, str):
                placeholder = placeholder.encode()
            if value and self._values.get(value) != placeholder:
                self._values[value] = placeholder
                self._raw.add(_utf8(value))
                changed = True
        if changed:
            self._update()

    def add_signature(self, signature: str, placeholder: str) -> None:
        """A signature made with a value (new with every request: found by shape, `derived`)."""
        self.signatures.add(signature, placeholder.encode())
        self._signed = True
        self.max_len = (self._matcher.max_len if self._matcher else 0) + derived.MAX_LEN

    def _update(self) -> None:
        self._matcher = m = _matcher(tuple(self._values), tuple(self._pairs))
        by_key = [*self._values.values(), *self._pairs.values()]
        self._replacements = [by_key[k] for k in m.keys]
        self.max_len = m.max_len + (derived.MAX_LEN if self._signed else 0)  # (a value's match and a signature's
        # can be one span: `derived.merged`)

    def __contains__(self, needle: bytes) -> bool:
        """Whether this needle, or this value (its UTF-8 bytes), was added."""
        return needle in self._pairs or needle in self._raw

    def __bool__(self) -> bool:
        return self._matcher is not None or self._signed

    def matches(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """(start, end, replacement) of every match, in order: those of `finditer` of the one regex, then
        the signatures that overlap none of them."""
        found: list[tuple[int, int, bytes]] = []
        if self._matcher is not None:
            replacements = self._replacements
            found = [(start, end, replacements[i]) for start, end, i in self._matcher.matches(bytes(data))]
        if not self._signed:
            return found
        signed = self.signatures.matches(bytes(data))
        return derived.merged(found, signed) if found and signed else found or signed

    def scrub(self, data: bytes) -> bytes:
        found = self.matches(data)
        if not found:
            return data
        out, pos = [], 0
        for start, end, replacement in found:
            out += (data[pos:start], replacement)
            pos = end
        out.append(data[pos:])
        return b"".join(out)

    def stream(self) -> StreamRewriter:
        """A rewriter for one streamed body; it sees values added while the body flows."""
        return stream_rewriter(lambda: self)

    def scrub_text(self, text: str) -> str:
        return self.scrub(text.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")


def stream_rewriter(current: Callable[[], Scrubber]) -> StreamRewriter:
    """A rewriter for one streamed body, scrubbing each chunk with the scrubber `current()` gives
    as it passes; like StreamRewriter(lambda buf: current().matches(buf), lambda: current().max_len)
    but it lets go of what it holds at each byte no match can hold (see _Rewriter)."""
    return _Rewriter(current)


_TAIL = 256  # bytes of a chunk's end looked at first for a byte no match holds


class _Rewriter(StreamRewriter):
    """A StreamRewriter that also lets go of all it holds at a byte no match can hold (the newline
    that ends an SSE event, a space in text): no match crosses it, nor grows past it, so all
    before it is final, as in the whole body. It holds back `max_len - 1` bytes otherwise, and a
    value's match may be far longer than the value (`&#x0000000073;` for an `s`)."""

    def __init__(self, current: Callable[[], Scrubber]) -> None:
        super().__init__(lambda buf: self._now.matches(buf), lambda: self._now.max_len)
        self._current = current
        self._now = Scrubber()  # current(), asked once per chunk

    def feed(self, chunk: bytes) -> bytes:
        self._now = scrubber = self._current()
        m = scrubber._matcher
        end = self._after_last(m.breaker, chunk) if m is not None else 0
        if not end:
            return super().feed(chunk)
        # all up to end is final: scanned once with what was held, as the whole body would be
        return self.final(chunk[:end]) + super().feed(chunk[end:])

    @staticmethod
    def _after_last(breaker: re.Pattern[bytes], chunk: bytes) -> int:
        """Just past the last byte no match holds, or 0: looked for in the chunk's tail first (text
        has one every few bytes), as reversing all of a 64 KiB chunk costs more than scanning it."""
        for tail in (chunk[-_TAIL:], chunk) if len(chunk) > _TAIL else (chunk,):
            last = breaker.search(tail[::-1])
            if last is not None:
                return len(chunk) - last.start()
        return 0

    def finish(self) -> bytes:
        self._now = self._current()
        return super().finish()
