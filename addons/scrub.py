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
pattern is compiled on its own, when first needed, and only run near anchors: places that any
of its matches holds. They are an 8-byte piece of a literal each pattern holds (a value's raw
bytes, the letters and digits of its base64 form, its hex), all found at once through a set
of aligned 8-byte words, or a shorter literal found with `bytes.find`; and an escape (`%`, `\\`,
`&`, `+`) of a character of a value, followed by what may follow that character. A match is at
most `max_len` bytes, so it lies within `max_len` of its anchor; in such a window, the patterns
anchored there are searched and their first match (the first pattern at a tie) taken, just as
the alternation would. A pattern without an anchor (a value or needle under 4 bytes) is
searched everywhere. In a value longer than 256 characters, letters, digits and `-._~` are
sought as themselves only: no encoder escapes those, and all forms of 16384 characters take
seconds to compile.

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
import sys
import weakref
from collections.abc import Callable, Iterable
from functools import lru_cache

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
_WORD = 8  # bytes in an aligned word of the anchor set
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


@lru_cache(maxsize=128)
def _b64_unit(c: str) -> tuple[bytes, int]:
    return _unit(_b64_forms(c))


def _b64_forms(c: str) -> tuple[_Form, ...]:
    """A base64 character: itself, or + and / in either alphabet and any form (\\/ in JSON)."""
    if c not in _B64_URL:
        return ((c.encode(), b"", 1),)
    return _forms(c) + _forms(_B64_URL[c])


# -- the patterns of one value -------------------------------------------------------------


class _Pattern:
    """One way a value (or needle) can appear: a regex, its longest and shortest lengths in bytes,
    and a literal every match holds (a value's forms: its raw bytes, unless an escape is in it).
    Compiled when first needed, once for all the matchers that hold it: most never are, and
    re takes some 2 ms per 10 characters of a value to compile its forms."""

    __slots__ = ("regex", "max_len", "min_len", "anchor", "_compiled")

    def __init__(self, regex: bytes, max_len: int, min_len: int, anchor: bytes) -> None:
        self.regex, self.max_len, self.min_len, self.anchor = regex, max_len, min_len, anchor
        self._compiled: re.Pattern[bytes] | None = None

    @property
    def compiled(self) -> re.Pattern[bytes]:
        if self._compiled is None:
            self._compiled = _compile(self.regex, 0)
        return self._compiled


class _ValuePatterns:
    __slots__ = ("patterns", "__weakref__")

    def __init__(self, patterns: list[_Pattern]) -> None:
        self.patterns = patterns


_VALUE_PATTERNS: weakref.WeakValueDictionary[str, _ValuePatterns] = weakref.WeakValueDictionary()


def _value_patterns(value: str) -> _ValuePatterns:
    """Made once for a value while any matcher holds it."""
    vp = _VALUE_PATTERNS.get(value)
    if vp is None:
        raw, long = _utf8(value), len(value) > LONG_VALUE
        first = (re.escape(value[0].encode()), 1) if long and value[0] in _UNRESERVED else _first_unit(_forms(value[0]))
        units = [(re.escape(c.encode()), 1) if long and c in _UNRESERVED else _char_unit(c) for c in value[1:]]
        patterns = [_Pattern(first[0] + b"".join(u for u, _ in units), first[1] + sum(n for _, n in units),
                             len(value), raw)]
        patterns += [p for k in range(3) if (p := _base64_pattern(raw, k)) is not None]
        patterns += [_Pattern(h, len(h), len(h), h) for h in (raw.hex().encode(), raw.hex().upper().encode())]
        vp = _VALUE_PATTERNS[value] = _ValuePatterns(patterns)
    return vp


def _base64_pattern(raw: bytes, k: int) -> _Pattern | None:
    """The base64 characters of raw after k bytes of anything, that depend on raw alone."""
    end_bits = 8 * (k + len(raw))
    start, stop = -(-8 * k // 6), end_bits // 6
    if stop - start < MIN_BASE64:
        return None
    encoded = base64.b64encode(bytes(k) + raw)
    chars = encoded[start:stop].decode()
    regex, max_len = _first_unit(_b64_forms(chars[0]))
    for c in chars[1:]:
        r, n = _b64_unit(c)
        regex, max_len = regex + r, max_len + n
    if known := end_bits - 6 * stop:  # the next character holds the last 2 or 4 bits of raw
        top = _B64.index(encoded[stop]) >> (6 - known)
        tail = bytes(c for i, c in enumerate(_B64) if i >> (6 - known) == top)
        pad = (3 - (k + len(raw)) % 3) % 3  # as many = as end the text if raw does
        pad_regex, pad_len = _char_unit("=")
        regex += b"(?:%s%s)?" % (_cls(tail + tail.translate(bytes.maketrans(b"+/", b"-_"))),
                                 b"(?:%s){0,%d}" % (pad_regex, pad) if pad else b"")
        max_len += 1 + pad * pad_len
    runs = re.findall(r"[A-Za-z0-9]+", chars)  # letters and digits have no other form: every match holds them
    return _Pattern(regex, max_len, len(chars), max(runs, key=len).encode() if runs else b"")


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

    __slots__ = ("_values", "patterns", "keys", "max_len", "min_len", "anywhere", "escapes", "leads",
                 "by_char", "stride", "words", "literals", "breaker", "_regex", "__weakref__")

    def __init__(self, values: tuple[str, ...], needles: tuple[bytes, ...]) -> None:
        self._values = [_value_patterns(v) for v in values]
        keyed = [(p, i) for i, vp in enumerate(self._values) for p in vp.patterns]
        keyed += [(_Pattern(re.escape(n), len(n), len(n), n), len(values) + i) for i, n in enumerate(needles)]
        keyed.sort(key=lambda pk: -pk[0].max_len)  # the longest first, where several match at one position
        self.patterns = [p for p, _ in keyed]
        self.keys = [k for _, k in keyed]  # the index of each pattern's value (then needle)
        self.max_len = self.patterns[0].max_len
        self.min_len = min(p.min_len for p in self.patterns)
        self._regex: re.Pattern[bytes] | None = None
        index = {id(p): i for i, p in enumerate(self.patterns)}
        self.anywhere = [i for i, p in enumerate(self.patterns) if len(p.anchor) < MIN_ANCHOR]
        by_literal: dict[bytes, list[int]] = {}
        for i, p in enumerate(self.patterns):
            if len(p.anchor) >= MIN_ANCHOR:
                by_literal.setdefault(p.anchor, []).append(i)
        # An escape stands for some characters (or UTF-8 bytes): it is an anchor for the patterns
        # of the values that hold one as other than itself.
        by_char: dict[str | int, set[int]] = {}
        for vp, v in zip(self._values, values):
            mixture = index[id(vp.patterns[0])]
            for c in set(v) - (_UNRESERVED if len(v) > LONG_VALUE else set()):
                for key in [c, *(_utf8(c) if ord(c) > 0x7F else b"")]:
                    by_char.setdefault(key, set()).add(mixture)
        self.by_char = {key: sorted(pats) for key, pats in by_char.items()}
        self.escapes = _escape_regex(values) if self.by_char else None
        self.leads = [b"%", b"\\", b"&"] + ([b"+"] if " " in self.by_char else [])
        # A byte no form of anything holds (a newline; a space or JSON punctuation, unless a value
        # has one): no match crosses it. Forms are made of letters, digits, %\\&+#;=-_/ and the
        # bytes of the values themselves; needles, of their own bytes.
        allowed = set(_ALNUM + b"%\\&+#;=-_/") | {b for v in values for b in _utf8(v)} | {b for n in needles for b in n}
        self.breaker = _compile(b"[^" + b"".join(re.escape(bytes([b])) for b in sorted(allowed)) + b"]", 0)
        # Long literals go to the set of aligned words, of which every stride-th is read (each such
        # literal holds one whole), others are found one by one: the stride that costs least
        # (some 9 ms a MiB to read every word, 0.7 ms to find a literal).
        lengths = [len(a) for a in by_literal]
        self.stride = min((1, 2, 3, 4), key=lambda s: (9 / s if max(lengths) >= _WORD * s + _WORD - 1 else 0)
                          + 0.7 * sum(n < _WORD * s + _WORD - 1 for n in lengths)) if lengths else 1
        span = _WORD * self.stride + _WORD - 1  # a literal this long holds a word read at this stride
        self.words: dict[int, list[int]] = {}
        self.literals: list[tuple[bytes, list[int]]] = []
        for literal, pats in by_literal.items():
            if len(literal) >= span:
                for j in range(_WORD * self.stride):
                    self.words.setdefault(int.from_bytes(literal[j:j + _WORD], sys.byteorder), []).extend(pats)
            else:
                self.literals.append((literal, pats))

    @property
    def regex(self) -> re.Pattern[bytes]:
        """The one regex, all patterns in order, each ending in an empty group: what `matches`
        gives is its `finditer`, with the pattern of each match `lastindex - 1`. Not used to
        scrub (it is costly to compile, and slow where many patterns could start); tests check
        against it."""
        if self._regex is None:
            self._regex = _compile(b"|".join(p.regex + b"()" for p in self.patterns), 0)
        return self._regex

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
        anchors: list[tuple[int, int, list[int]]] = []
        if self.words and n >= _WORD:
            words = array.array("Q")
            words.frombytes(memoryview(data)[: n - n % _WORD])
            if self.stride > 1:
                words = words[:: self.stride]
            if hits := self.words.keys() & words:  # (one pass over the words, whatever the count of values)
                step = _WORD * self.stride
                anchors += [(j * step, j * step + _WORD, self.words[w]) for j, w in enumerate(words) if w in hits]
        for literal, pats in self.literals:
            anchors += _occurrences(data, literal, pats)
        if self.escapes is not None:
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

    def _escaped(self, data: bytes) -> list[tuple[int, int, list[int]]]:
        """The escape anchors; past a budget, one scan of the whole is cheaper than a look at each."""
        assert self.escapes is not None
        out: list[tuple[int, int, list[int]]] = []
        budget = 64 + len(data) // 256
        match = self.escapes.match
        for lead in self.leads:
            i = data.find(lead)
            while i >= 0:
                budget -= 1
                if budget < 0:
                    return self._escaped_all(data)
                if match(data, i) and (pats := self._standing_for(data, i)):
                    out.append((i, i + 1, pats))
                i = data.find(lead, i + 1)
        return out

    def _escaped_all(self, data: bytes) -> list[tuple[int, int, list[int]]]:
        assert self.escapes is not None
        out: list[tuple[int, int, list[int]]] = []
        for m in self.escapes.finditer(data):
            start, end = m.span()  # an escape may start inside this one, which finditer does not report
            pats = {i for at in range(start, end) if data[at] in _LEADS for i in self._standing_for(data, at)}
            if pats:
                out.append((start, end, sorted(pats)))
        return out

    def _standing_for(self, data: bytes, at: int) -> list[int]:
        """The patterns of the values holding a character that an escape at data[at] may stand for."""
        out: list[int] = []
        for key in _decode(data, at):
            out += self.by_char.get(key, ())
        return out


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
        last = m.breaker.search(chunk[::-1]) if m is not None else None
        if last is None:
            return super().feed(chunk)
        end = len(chunk) - last.start()  # just past the last such byte
        return super().feed(chunk[:end]) + super().finish() + super().feed(chunk[end:])

    def finish(self) -> bytes:
        self._now = self._current()
        return super().finish()
