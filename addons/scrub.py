"""Replace secret values with placeholders, in whatever common encoding they come back (pure).

A `Scrubber` (one per session, knowing its principal's values) compiles one regular
expression. A value given to `add_value` is matched

- character by character, each character independently in any of these forms: itself (its
  UTF-8 bytes, each byte also as `%HH` or `\\xHH`, hex digits in either case); `+` for a
  space (form encoding); `%HH` and `\\xHH` of its Latin-1 byte (U+0080 to U+00FF);
  `\\uXXXX` and `%uXXXX` (a surrogate pair beyond the BMP, or `\\UXXXXXXXX`); the JSON and
  JavaScript short escapes `\\" \\\\ \\/ \\'`; HTML character references, decimal and hex
  (`&#NN;`, `&#xHH;`, `&#XHH;`, up to 7 leading zeros, the `;` optional, and the C1 numbers
  HTML reads as Windows-1252) and every named reference HTML5 has for that character
  (`&amp; &lt; &gt; &quot; &apos; &sol; &plus;` ...);
- as base64 of its UTF-8 bytes at any alignment inside a longer base64 text: standard and
  URL-safe alphabets, with or without padding, `+ / =` in any of the forms above (`\\/`
  in JSON, `%2F` in a URL): the characters that depend only on the value, and the one after
  them that depends on it in part (so a `Basic` header encoding `anyuser:value` is caught);
- as hex of its UTF-8 bytes, either case.

Byte strings given to `add` are matched exactly. Where several matches could start at one
position, the longest possible is tried first.

What it cannot catch: whatever an upstream makes of a value beyond these per-character
escapes and plain base64 or hex: its own encryption, a hash, compression, a custom or
stacked encoding (base64 of escaped text, JSON inside a JSON string, line-wrapped base64,
hex with separators, a reversed or split value). It leaves at most a few bits of a value
in the base64 character mixed with the bytes before it, and a match that overlaps another
value's match may leave that value's rest. Scrubbing is a net for echoes, not a boundary: an
upstream that can hand a value back in its own form must not be an allowed origin of that
value; the remedy is restricting where a value may be injected.
"""

from __future__ import annotations

import base64
import html.entities
import re
import weakref
from collections.abc import Iterable
from functools import lru_cache

from .streams import StreamRewriter

_Option = tuple[int, bytes, int]  # one form: its first byte, a regex for the rest, its longest length in bytes

HTML_ZEROS = 7  # leading zeros allowed in a numeric character reference
MIN_ENCODED = 8  # base64 forms with fewer characters that depend only on the value are not matched
_PCT, _BSL, _AMP, _PLUS = b"%\\&+"
_SHORT = {'"': '"', "\\": "\\", "/": "/", "'": "'", "\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t"}
_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_URL = {ord("+"): "-", ord("/"): "_"}
# bytes by how often they start a match attempt in ordinary text: the dispatch tries them in this order
_COMMON = b' etaoinsrhldcumfpgwybvkxjqz0123456789"ETAOINSRHLDCUMFPGWYBVKXJQZ:,.-_/'


def _lit(b: int) -> bytes:
    return re.escape(bytes([b]))


def _hex(n: int, width: int = 0) -> bytes:
    """n in hex, each letter digit matching either case."""
    return b"".join(
        d.encode() if d.isdigit() else b"[%s%s]" % (d.encode(), d.upper().encode()) for d in f"{n:0{width}x}"
    )


def _alternation(options: Iterable[_Option]) -> bytes:
    """A regex for any of the options: grouped by first byte, the longest forms first."""
    groups: dict[int, list[_Option]] = {}
    for o in options:
        groups.setdefault(o[0], []).append(o)
    if len(groups) > 1 and all(r == b"" for opts in groups.values() for _, r, _ in opts):
        return b"[" + b"".join(_lit(b) for b in groups) + b"]"
    parts = [_lit(first) + _rests(opts) for first, opts in groups.items()]
    return parts[0] if len(parts) == 1 else b"(?:" + b"|".join(parts) + b")"


def _rests(options: list[_Option]) -> bytes:
    rests = list(dict.fromkeys(r for _, r, _ in sorted(options, key=lambda o: -o[2])))
    return rests[0] if len(rests) == 1 else b"(?:" + b"|".join(rests) + b")"


def _byte_options(b: int) -> list[_Option]:
    return [(b, b"", 1), (_PCT, _hex(b, 2), 3), (_BSL, b"x" + _hex(b, 2), 4)]


def _references() -> tuple[dict[str, list[bytes]], dict[str, list[int]]]:
    named: dict[str, list[bytes]] = {}
    for name, text in html.entities.html5.items():
        if len(text) == 1:
            named.setdefault(text, []).append(name.encode())
    c1: dict[str, list[int]] = {}  # HTML reads &#128; as the euro sign: the Windows-1252 character
    for n in range(0x80, 0xA0):
        try:
            c1.setdefault(bytes([n]).decode("cp1252"), []).append(n)
        except UnicodeDecodeError:
            pass
    return named, c1


_NAMED, _C1 = _references()


@lru_cache(maxsize=8192)
def _char_options(ch: str) -> tuple[_Option, ...]:
    """Every form of one character."""
    cp = ord(ch)
    raw = ch.encode("utf-8", "surrogatepass")
    rest, rest_len = b"", 0
    for b in raw[1:]:  # the other UTF-8 bytes, each raw or escaped
        rest += _alternation(_byte_options(b))
        rest_len += 4
    opts: list[_Option] = [
        (raw[0], rest, 1 + rest_len),
        (_PCT, _hex(raw[0], 2) + rest, 3 + rest_len),
        (_BSL, b"x" + _hex(raw[0], 2) + rest, 4 + rest_len),
    ]
    if ch == " ":
        opts.append((_PLUS, b"", 1))
    if 0x80 <= cp <= 0xFF:  # Latin-1: JavaScript's escape(), \\x in JavaScript strings
        opts += [(_PCT, _hex(cp, 2), 3), (_BSL, b"x" + _hex(cp, 2), 4)]
    units = [cp] if cp < 0x10000 else [0xD800 + ((cp - 0x10000) >> 10), 0xDC00 + ((cp - 0x10000) & 0x3FF)]
    for lead in (_BSL, _PCT):  # \\uXXXX (JSON, JavaScript, Java, Python) and %uXXXX
        more = b"".join(_lit(lead) + b"u" + _hex(u, 4) for u in units[1:])
        opts.append((lead, b"u" + _hex(units[0], 4) + more, 6 * len(units)))
    if cp > 0xFFFF:
        opts.append((_BSL, b"U" + _hex(cp, 8), 10))
    if ch in _SHORT:
        opts.append((_BSL, re.escape(_SHORT[ch].encode()), 2))
    numbers = [cp, *_C1.get(ch, [])]
    dec = [str(n).encode() for n in numbers]
    hexa = [_hex(n) for n in numbers]
    longest = max(max(len(d) for d in dec), 1 + max(len(f"{n:x}") for n in numbers))
    opts.append((_AMP, b"#(?:0{0,%d}(?:%s)|[xX]0{0,%d}(?:%s));?" % (
        HTML_ZEROS, b"|".join(dec), HTML_ZEROS, b"|".join(hexa)), 2 + HTML_ZEROS + longest + 1))
    opts += [(_AMP, re.escape(name), 1 + len(name)) for name in _NAMED.get(ch, [])]
    return tuple(opts)


@lru_cache(maxsize=8192)
def _char_unit(ch: str) -> tuple[bytes, int]:
    opts = _char_options(ch)
    return _alternation(opts), max(o[2] for o in opts)


_Entry = tuple[list[_Option], bytes, int]  # a pattern: the forms of its first unit, the regex and length of the rest


def _value_entries(value: str) -> list[_Entry]:
    """The patterns matching one value: per character, base64 at three alignments, hex."""
    entries: list[_Entry] = []
    units = [_char_unit(c) for c in value[1:]]
    entries.append((list(_char_options(value[0])), b"".join(u[0] for u in units), sum(u[1] for u in units)))
    raw = value.encode("utf-8", "surrogatepass")
    for k in range(3):
        if (entry := _base64_entry(raw, k)) is not None:
            entries.append(entry)
    digits = raw.hex()
    entries.append((
        [(ord(d), b"", 1) for d in {digits[0], digits[0].upper()}],
        b"".join(_hex(int(d, 16)) for d in digits[1:]),
        len(digits) - 1,
    ))
    return entries


def _base64_entry(raw: bytes, k: int) -> _Entry | None:
    """The base64 characters of raw after k bytes of anything, that depend on raw alone."""
    end_bits = 8 * (k + len(raw))
    first, stop = -(-8 * k // 6), end_bits // 6
    if stop - first < MIN_ENCODED:
        return None
    encoded = base64.b64encode(bytes(k) + raw)
    units = [_b64_options(c) for c in encoded[first:stop]]
    rest = [(_alternation(u), max(o[2] for o in u)) for u in units[1:]]
    regex, length = b"".join(r for r, _ in rest), sum(n for _, n in rest)
    if known := end_bits - 6 * stop:  # the next character holds the last 2 or 4 bits of raw
        top = _B64.index(encoded[stop]) >> (6 - known)
        chars = bytes(c for i, c in enumerate(_B64) if i >> (6 - known) == top)
        chars += chars.translate(bytes.maketrans(b"+/", b"-_"))
        pad = (3 - (k + len(raw)) % 3) % 3
        pad_regex, pad_len = _char_unit("=")
        regex += b"(?:[%s](?:%s){0,%d})?" % (b"".join(_lit(c) for c in dict.fromkeys(chars)), pad_regex, pad)
        length += 1 + pad * pad_len
    return units[0], regex, length


def _b64_options(c: int) -> list[_Option]:
    if c not in _B64_URL:
        return [(c, b"", 1)]
    return [*_char_options(chr(c)), *_char_options(_B64_URL[c])]


def _compile(pattern: bytes) -> re.Pattern[bytes]:
    """Compiled without re's module cache (512 patterns, kept for the process): sessions
    whose principal has the same values share one compiled pattern while any of them lives."""
    compiled = _COMPILED.get(pattern)
    if compiled is None:
        compiled = _COMPILED[pattern] = _compile_uncached(pattern)
    return compiled


_COMPILED: weakref.WeakValueDictionary[bytes, re.Pattern[bytes]] = weakref.WeakValueDictionary()
_compile_uncached = getattr(getattr(re, "_compiler", None), "compile", None) or re.compile


class Scrubber:
    """Replaces every value (in any form above) and every exact needle with its placeholder, in one pass."""

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self._pairs: dict[bytes, bytes] = {}  # exact needle -> replacement
        self._values: dict[str, bytes] = {}  # value -> placeholder
        self._raw: set[bytes] = set()  # the values' UTF-8 bytes, for `in`
        self._pattern: re.Pattern[bytes] | None = None
        self._replacements: list[bytes] = []  # by group number
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
            self._compile()

    def add_value(self, value: str, placeholder: bytes | str) -> None:
        """A value, to be replaced by placeholder in any of the forms the module docstring lists."""
        self.add_values([(value, placeholder)])

    def add_values(self, pairs: Iterable[tuple[str, bytes | str]]) -> None:
        """Values and their placeholders, compiled once."""
        changed = False
        for value, placeholder in pairs:
            if isinstance(placeholder, str):
                placeholder = placeholder.encode()
            if value and self._values.get(value) != placeholder:
                self._values[value] = placeholder
                self._raw.add(value.encode("utf-8", "surrogatepass"))
                changed = True
        if changed:
            self._compile()

    def _compile(self) -> None:
        buckets: dict[int, list[tuple[int, bytes, bytes]]] = {}  # first byte: (length, rest, replacement)
        entries = [(e, ph) for value, ph in self._values.items() for e in _value_entries(value)]
        entries += [(([(n[0], b"", 1)], re.escape(n[1:]), len(n) - 1), r) for n, r in self._pairs.items()]
        for (first, rest, rest_len), replacement in entries:
            by_byte: dict[int, list[_Option]] = {}
            for o in first:
                by_byte.setdefault(o[0], []).append(o)
            for b, opts in by_byte.items():
                buckets.setdefault(b, []).append((max(o[2] for o in opts) + rest_len, _rests(opts) + rest, replacement))
        # One alternative per first byte, so that re scans for the first bytes alone and tries
        # only the patterns starting with the byte found; within it the longest first. An empty
        # group ends each pattern: the last group matched says whose placeholder it is.
        parts, replacements = [], [b""]
        for b in sorted(buckets, key=lambda b: (_COMMON.find(b) if b in _COMMON else len(_COMMON), b)):
            alts = sorted(buckets[b], key=lambda a: -a[0])
            replacements += [r for _, _, r in alts]
            parts.append(_lit(b) + b"(?:" + b"|".join(rest + b"()" for _, rest, _ in alts) + b")")
        self._pattern = _compile(b"|".join(parts))
        self._replacements = replacements
        self.max_len = max(length for alts in buckets.values() for length, _, _ in alts)

    def __contains__(self, needle: bytes) -> bool:
        """Whether this exact needle, or this value (its UTF-8 bytes), was added."""
        return needle in self._pairs or needle in self._raw

    def __bool__(self) -> bool:
        return self._pattern is not None

    def scrub(self, data: bytes) -> bytes:
        if self._pattern is None:
            return data
        replacements = self._replacements
        return self._pattern.sub(lambda m: replacements[m.lastindex], data)

    def matches(self, data: bytes) -> list[tuple[int, int, bytes]]:
        if self._pattern is None:
            return []
        replacements = self._replacements
        return [(m.start(), m.end(), replacements[m.lastindex]) for m in self._pattern.finditer(data)]

    def stream(self) -> StreamRewriter:
        """A rewriter for one streamed body; it sees values added while the body flows."""
        return StreamRewriter(self.matches, lambda: self.max_len)

    def scrub_text(self, text: str) -> str:
        return self.scrub(text.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")
