"""Replace secret values (and the forms sealgate derived from them) with placeholders (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from .streams import StreamRewriter


class Scrubber:
    """Replaces every needle with its placeholder, longest needle first, in one pass."""

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self._pairs: dict[bytes, bytes] = {}
        self._pattern: re.Pattern[bytes] | None = None
        self.max_len = 0  # the longest needle: how much of a stream must be held back
        self.add(pairs)

    def add(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        changed = False
        for needle, replacement in pairs:
            if needle and self._pairs.get(needle) != replacement:
                self._pairs[needle] = replacement
                changed = True
        if changed:
            ordered = sorted(self._pairs, key=len, reverse=True)
            self.max_len = len(ordered[0])
            self._pattern = re.compile(b"|".join(re.escape(n) for n in ordered))

    def __contains__(self, needle: bytes) -> bool:
        return needle in self._pairs

    def __bool__(self) -> bool:
        return self._pattern is not None

    def scrub(self, data: bytes) -> bytes:
        if self._pattern is None:
            return data
        return self._pattern.sub(lambda m: self._pairs[m.group(0)], data)

    def matches(self, data: bytes) -> list[tuple[int, int, bytes]]:
        if self._pattern is None:
            return []
        return [(m.start(), m.end(), self._pairs[m.group(0)]) for m in self._pattern.finditer(data)]

    def stream(self) -> StreamRewriter:
        """A rewriter for one streamed body; it sees values added while the body flows."""
        return StreamRewriter(self.matches, lambda: self.max_len)

    def scrub_text(self, text: str) -> str:
        return self.scrub(text.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")
