"""Signatures sealgate made for a session, found again in what comes back (pure).

A signature is new with every request, so it cannot join the patterns of a `scrub.Scrubber` (its
matcher is rebuilt with every addition, in milliseconds). Signatures are found by their forms
instead: the hex itself (either case), and its base64 at each of the three alignments (either
alphabet): the characters that depend on it alone, and the one on each side that holds some of its
bits. Runs of hex digits and of base64 characters are found in C (each byte mapped by
`bytes.translate`, then a long enough run sought with `bytes.find`); in a run, every 32nd position
is looked up in an index of each form's 32-character pieces (every stretch as long as a form holds
one such aligned piece whole). The time is linear in the data whatever its shape (about 5 ms a MiB),
and nothing is decoded. The most recent `KEPT` signatures of a session are kept.

What it does not catch (like the values' own scrubbing, a net for echoes, not a boundary): base64
broken into lines, a signature's characters escaped one by one (%61, \\u0061, &#97;), hex of its
hex, base64 of its raw digest or of UTF-16.
"""

from __future__ import annotations

import base64
from collections import OrderedDict

KEPT = 128  # signatures a session remembers
SIGNATURE_HEX = 64  # HMAC-SHA256 and SigV4 signatures: 32 bytes, as hex
_PIECE = 32  # looked up at every _PIECE-th position of a run
MAX_LEN = 96  # a form and the partial characters around it (88 at most), and a margin
_URL_SAFE = bytes.maketrans(b"-_", b"+/")
_HEX_MASK = bytes(ord("x") if chr(b) in "0123456789abcdefABCDEF" else ord(".") for b in range(256))
_B64_MASK = bytes(ord("x") if chr(b).isascii() and (chr(b).isalnum() or chr(b) in "+/_-") else ord(".")
                  for b in range(256))

Match = tuple[int, int, bytes]
_Form = tuple[bytes, int, int]  # the text, and how many characters before and after it hold some of its bits


def _forms(sig: bytes) -> tuple[list[_Form], list[_Form]]:
    """The hex form, and the base64 forms (standard alphabet) at each alignment."""
    b64 = []
    for k in range(3):  # bytes before the signature in the encoded whole, modulo 3
        enc = base64.b64encode(bytes(k) + sig)
        first, stop = -(-8 * k // 6), 8 * (k + len(sig)) // 6  # the characters that depend on it alone
        b64.append((enc[first:stop], int(8 * k % 6 != 0), int(8 * (k + len(sig)) % 6 != 0)))
    return [(sig, 0, 0)], b64


def _runs(data: bytes, mask: bytes, least: int):
    """(start, end) of every run of the bytes mask allows that is at least `least` long."""
    marked, needle = data.translate(mask), b"x" * least
    i = marked.find(needle)
    while i >= 0:
        end = marked.find(b".", i + least)
        end = len(marked) if end < 0 else end
        yield i, end
        i = marked.find(needle, end)


class _Index:
    """Forms by their 32-character pieces at every offset."""

    def __init__(self) -> None:
        self.pieces: dict[bytes, list[tuple[_Form, int, bytes]]] = {}  # piece -> (form, offset, signature)

    def add(self, forms: list[_Form], sig: bytes) -> None:
        for form in forms:
            for off in range(len(form[0]) - _PIECE + 1):
                self.pieces.setdefault(form[0][off:off + _PIECE], []).append((form, off, sig))

    def remove(self, forms: list[_Form]) -> None:
        for form in forms:
            for off in range(len(form[0]) - _PIECE + 1):
                piece = form[0][off:off + _PIECE]
                if left := [e for e in self.pieces[piece] if e[0] != form]:
                    self.pieces[piece] = left
                else:
                    del self.pieces[piece]

    def find(self, run: bytes, at: int, seen: OrderedDict[bytes, bytes]) -> list[Match]:
        """Every form in run (data[at:at + len(run)], as compared), with the partial characters around it."""
        out = []
        get = self.pieces.get
        for j in range(0, len(run) - _PIECE + 1, _PIECE):
            for (text, before, after), off, sig in get(run[j:j + _PIECE], ()):
                start = j - off
                if start >= 0 and run[start:start + len(text)] == text:
                    out.append((at + max(start - before, 0), at + min(start + len(text) + after, len(run)), seen[sig]))
        return out


class Signatures:
    def __init__(self) -> None:
        self._seen: OrderedDict[bytes, bytes] = OrderedDict()  # lower-case hex -> replacement
        self._hex, self._b64 = _Index(), _Index()

    def add(self, signature: str, replacement: bytes) -> None:
        sig = signature.lower().encode()
        if sig not in self._seen:
            hex_forms, b64_forms = _forms(sig)
            self._hex.add(hex_forms, sig)
            self._b64.add(b64_forms, sig)
        self._seen[sig] = replacement
        self._seen.move_to_end(sig)
        while len(self._seen) > KEPT:
            old, _ = self._seen.popitem(last=False)
            hex_forms, b64_forms = _forms(old)
            self._hex.remove(hex_forms)
            self._b64.remove(b64_forms)

    def __bool__(self) -> bool:
        return bool(self._seen)

    def matches(self, data: bytes) -> list[Match]:
        """(start, end, replacement) of every signature found, in order, none overlapping."""
        if not self._seen or len(data) < SIGNATURE_HEX:
            return []
        found = [m for a, b in _runs(data, _HEX_MASK, SIGNATURE_HEX)
                 for m in self._hex.find(data[a:b].lower(), a, self._seen)]
        found += [m for a, b in _runs(data, _B64_MASK, 84)
                  for m in self._b64.find(data[a:b].translate(_URL_SAFE), a, self._seen)]
        found.sort()
        out: list[Match] = []
        for m in found:
            if not out or m[0] >= out[-1][1]:
                out.append(m)
            elif m[1] > out[-1][1]:  # overlapping forms: one span
                out[-1] = (out[-1][0], m[1], out[-1][2])
        return out


def merged(values: list[Match], signed: list[Match]) -> list[Match]:
    """Value and signature matches, in order; where they overlap (a signature's base64 can share a
    character with a value's), one span that covers both, replaced by both: nothing of either is left."""
    out: list[Match] = []
    for m in sorted(values + signed, key=lambda m: m[0]):
        if out and m[0] < out[-1][1]:
            start, end, replacement = out[-1]
            if m[1] > end:
                out[-1] = (start, m[1], replacement + m[2])
        else:
            out.append(m)
    return out
