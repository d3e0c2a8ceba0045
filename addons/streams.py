"""Rewrite matches in a stream of chunks exactly as in the whole body (pure).

A match is at most `max_len` bytes, so a match that starts `max_len - 1` bytes before
the end of what has arrived may still need bytes to come; everything before that is
final. The rewriter holds back only that tail, which keeps memory flat however large
the body, and finds a placeholder or a value split across any chunk boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

Match = tuple[int, int, bytes]  # start, end, replacement


class StreamRewriter:
    def __init__(self, find: Callable[[bytes], Iterable[Match]], max_len: Callable[[], int]) -> None:
        self._find = find
        self._max_len = max_len
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        """The part of the output that no later chunk can change."""
        buf = self._carry + chunk
        cut = max(len(buf) - max(self._max_len() - 1, 0), 0)
        out, pos = self._rewrite(buf, cut)
        cut = max(cut, pos)
        self._carry = buf[cut:]
        return out + buf[pos:cut]

    def finish(self) -> bytes:
        """The rest, at the end of the stream."""
        buf, self._carry = self._carry, b""
        out, pos = self._rewrite(buf, len(buf))
        return out + buf[pos:]

    def _rewrite(self, buf: bytes, cut: int) -> tuple[bytes, int]:
        """Rewritten bytes up to the end of the last match starting before cut, and that end."""
        out: list[bytes] = []
        pos = 0
        for start, end, replacement in self._find(buf):
            if start >= cut:
                break
            out += (buf[pos:start], replacement)
            pos = end
        return b"".join(out), pos
