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
        return self.final(b"")

    def final(self, chunk: bytes) -> bytes:
        """chunk with all held before it, rewritten whole: the caller knows no match runs past its end."""
        buf, self._carry = self._carry + chunk, b""
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


class StreamFilter:
    """A stream callable (as mitmproxy takes one) around a StreamRewriter.

    `is_end(chunk)` tells the end of the message from an empty chunk in the middle of it. An
    exception stops the stream: `on_error` is told (nothing more goes out), or without one it
    propagates and the connection is closed."""

    def __init__(self, rewriter: StreamRewriter, is_end: Callable[[bytes], bool],
                 on_error: Callable[[Exception], None] | None = None) -> None:
        self.rewriter, self.is_end, self.on_error = rewriter, is_end, on_error
        self.stopped = False

    def __call__(self, chunk: bytes) -> list[bytes]:
        if self.stopped:
            return []
        try:
            out = self.rewriter.finish() if self.is_end(chunk) else self.rewriter.feed(chunk)
        except Exception as e:
            self.stopped = True
            if self.on_error is None:
                raise
            self.on_error(e)
            return []
        return [out] if out else []  # b"" would end the body early
