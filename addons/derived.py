"""Signatures sealgate made for a session, found again in what comes back (pure).

A signature is new with every request, so it cannot join the patterns of a `scrub.Scrubber` (its
matcher is rebuilt with every addition, in milliseconds). Signatures are found by their shape instead,
with regexes compiled once: a run of 64 hex digits, in either case, is looked up in the session's set;
a base64 text long enough to hold one (either alphabet) is decoded at each of the four alignments
and searched the same way, and the characters that carry it are replaced. The most recent `KEPT` of a
session are kept. A match is at most `MAX_LEN` bytes and holds no byte outside [0-9A-Za-z+/=_-].
"""

from __future__ import annotations

import binascii
import re
from collections import OrderedDict

KEPT = 4096  # signatures a session remembers
SIGNATURE_HEX = 64  # HMAC-SHA256 and SigV4 signatures: 32 bytes, as hex
MAX_LEN = 96  # the base64 characters that can carry one: 86, 3 more back to their group's start, and a margin
_HEX = re.compile(rb"[0-9a-fA-F]{64,}")
_B64 = re.compile(rb"[A-Za-z0-9+/_-]{85,}")
_URL_SAFE = bytes.maketrans(b"-_", b"+/")


class Signatures:
    def __init__(self) -> None:
        self._seen: OrderedDict[bytes, bytes] = OrderedDict()  # lower-case hex -> replacement

    def add(self, signature: str, replacement: bytes) -> None:
        self._seen[signature.lower().encode()] = replacement
        self._seen.move_to_end(signature.lower().encode())
        while len(self._seen) > KEPT:
            self._seen.popitem(last=False)

    def __bool__(self) -> bool:
        return bool(self._seen)

    def matches(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """(start, end, replacement) of every signature found, in order, none overlapping."""
        if not self._seen or len(data) < SIGNATURE_HEX:
            return []
        found = [m for run in _HEX.finditer(data) for m in self._in_hex(run.group(), run.start())]
        found += [m for run in _B64.finditer(data) for m in self._in_base64(run.group(), run.start())]
        found.sort()
        out: list[tuple[int, int, bytes]] = []
        for m in found:
            if not out or m[0] >= out[-1][1]:
                out.append(m)
        return out

    def _in_hex(self, run: bytes, at: int) -> list[tuple[int, int, bytes]]:
        lower = run.lower()
        if len(run) == SIGNATURE_HEX:
            return [(at, at + SIGNATURE_HEX, r)] if (r := self._seen.get(lower)) is not None else []
        out = []
        for i in range(len(run) - SIGNATURE_HEX + 1):
            if (r := self._seen.get(lower[i:i + SIGNATURE_HEX])) is not None:
                out.append((at + i, at + i + SIGNATURE_HEX, r))
        return out

    def _in_base64(self, run: bytes, at: int) -> list[tuple[int, int, bytes]]:
        out = []
        for offset in range(4):
            chunk = run[offset:len(run) - (1 if (len(run) - offset) % 4 == 1 else 0)]  # a lone last char holds no byte
            try:
                decoded = binascii.a2b_base64(chunk.translate(_URL_SAFE) + b"=" * (-len(chunk) % 4))
            except binascii.Error:
                continue
            for hexrun in _HEX.finditer(decoded):
                for start, end, r in self._in_hex(hexrun.group(), hexrun.start()):
                    # from the start of the 4-character group that holds its first bit (so that what starts
                    # there is aligned, as a stream's held-back tail may start there) to the last character
                    # that holds any bit of it
                    first, last = at + offset + start * 8 // 6 // 4 * 4, at + offset + (end * 8 - 1) // 6
                    out.append((first, last + 1, r))
        return out
