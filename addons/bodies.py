"""Message bodies: undo Content-Encoding, never beyond a size bound (pure).

Only the codings HTTP clients really send are accepted (gzip, x-gzip, deflate, br,
zstd, identity), each decoded incrementally so a small compressed body cannot expand
into gigabytes. Anything else raises BodyError: a body sealgate cannot read is a body
it cannot check.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import brotli

try:
    from compression import zstd  # Python 3.14+
except ImportError:  # pragma: no cover - depends on the Python version
    from backports import zstd

SUPPORTED = ("identity", "gzip", "x-gzip", "deflate", "br", "zstd")


class BodyError(ValueError):
    """A body that cannot be decoded within the bound; says why."""


@dataclass(frozen=True)
class Framing:
    """A message's Content-Encoding, Content-Length (None: absent) and Transfer-Encoding, each as
    mitmproxy's `Headers.get` gives it (repeated fields joined by ", "), read in one look at the fields:
    every request and response asks for several of them."""

    content_encoding: str = ""
    content_length: str | None = None
    transfer_encoding: str = ""

    @classmethod
    def of(cls, fields: Iterable[tuple[bytes, bytes]]) -> Framing:
        found: dict[bytes, list[bytes]] = {}
        for name, value in fields:
            if (name := name.lower()) in _FRAMING:
                found.setdefault(name, []).append(value)
        if not found:
            return _NO_FRAMING

        def text(name: bytes) -> str | None:
            return None if (values := found.get(name)) is None else b", ".join(values).decode("utf-8", "surrogateescape")
        return cls(text(b"content-encoding") or "", text(b"content-length"), text(b"transfer-encoding") or "")


_FRAMING = frozenset({b"content-encoding", b"content-length", b"transfer-encoding"})
_NO_FRAMING = Framing()


def take_headers(headers, names: frozenset[bytes]) -> list[bytes]:
    """Remove every field of these (lower-case) names from mitmproxy Headers, looking at the fields once;
    their values, in order (most requests have none of them: nothing is rebuilt then)."""
    found = [v for k, v in headers.fields if k.lower() in names]
    if found:
        headers.fields = tuple((k, v) for k, v in headers.fields if k.lower() not in names)
    return found


def codings(content_encoding: str) -> list[str]:
    return [c.strip().lower() for c in content_encoding.split(",") if c.strip()]


def transfer_codings(transfer_encoding: str) -> str:
    """Transfer codings other than chunked (which mitmproxy undoes), or '': sealgate decodes none of
    them, so a message that has one cannot be checked."""
    return ", ".join(c for c in codings(transfer_encoding) if c != "chunked")


def decode(raw: bytes, content_encoding: str, limit: int) -> bytes:
    """raw with every listed coding undone (last applied, first undone), at most limit bytes."""
    data = raw
    for coding in reversed(codings(content_encoding)):
        if coding not in SUPPORTED:
            raise BodyError(f"Content-Encoding {coding!r} is not supported (use one of {', '.join(SUPPORTED)})")
        try:
            data = _DECODERS[coding](data, limit)
        except BodyError:
            raise
        except Exception as e:  # zlib.error, brotli.error, zstd.ZstdError, EOFError
            raise BodyError(f"the body is not valid {coding}: {e.__class__.__name__}") from None
        if len(data) > limit:
            raise BodyError(f"the decoded body is larger than {limit} bytes")
    return data


def _zlib(data: bytes, limit: int, wbits: int) -> bytes:
    """Every member (gzip allows several); bytes after the end are an error, never passed over:
    what is checked must be all that is forwarded."""
    out = bytearray()
    while data:
        d = zlib.decompressobj(wbits)
        out += d.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            raise BodyError(f"the decoded body is larger than {limit} bytes")
        if d.unconsumed_tail:
            raise BodyError(f"the decoded body is larger than {limit} bytes")
        if not d.eof:
            raise BodyError("the compressed body is truncated")
        data = d.unused_data
        if data and wbits != 16 + zlib.MAX_WBITS:
            raise BodyError(f"{len(data)} bytes follow the end of the compressed body")
    return bytes(out)


def _gzip(data: bytes, limit: int) -> bytes:
    return _zlib(data, limit, 16 + zlib.MAX_WBITS)


def _deflate(data: bytes, limit: int) -> bytes:
    try:
        return _zlib(data, limit, zlib.MAX_WBITS)
    except zlib.error:
        return _zlib(data, limit, -zlib.MAX_WBITS)  # raw deflate, as some clients send it


def _brotli(data: bytes, limit: int) -> bytes:
    d = brotli.Decompressor()
    out = d.process(data, output_buffer_limit=limit + 1)
    if len(out) > limit or not d.is_finished():
        raise BodyError(
            f"the decoded body is larger than {limit} bytes" if len(out) > limit else "the compressed body is truncated"
        )
    return out  # brotli refuses bytes after the end itself


def _zstd(data: bytes, limit: int) -> bytes:
    """Every frame: a second frame is content too."""
    out = bytearray()
    while data:
        d = zstd.ZstdDecompressor()
        out += d.decompress(data, max_length=limit + 1 - len(out))
        if len(out) > limit:
            raise BodyError(f"the decoded body is larger than {limit} bytes")
        if not d.eof:
            raise BodyError("the compressed body is truncated")
        data = d.unused_data
    return bytes(out)


_DECODERS = {
    "identity": lambda data, limit: data,
    "gzip": _gzip,
    "x-gzip": _gzip,
    "deflate": _deflate,
    "br": _brotli,
    "zstd": _zstd,
}


class StreamDecoder:
    """Undo one Content-Encoding chunk by chunk, with flat memory: for bodies too large, or of
    unknown length, to hold whole. Every member and frame is decoded; bytes after the end of a
    deflate or brotli stream, or a stream cut short, raise BodyError at `finish`."""

    def __init__(self, coding: str, chunk_limit: int) -> None:
        if coding not in _STREAMING:
            raise BodyError(f"Content-Encoding {coding!r} cannot be decoded as it streams")
        self.coding, self.chunk_limit = coding, chunk_limit
        self._d = None
        self._done = False

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        data = chunk
        while data:
            if self._d is None:
                self._d = _STREAMING[self.coding](data)
            elif self._done:
                if self.coding not in ("gzip", "x-gzip", "zstd"):
                    raise BodyError(f"{len(data)} bytes follow the end of the compressed body")
                self._d, self._done = _STREAMING[self.coding](data), False
            try:
                out += self._d.decompress(data) if self.coding != "br" else self._d.process(data)
            except Exception as e:  # zlib.error, brotli.error, zstd.ZstdError, EOFError
                raise BodyError(f"the body is not valid {self.coding}: {e.__class__.__name__}") from None
            if len(out) > self.chunk_limit:
                raise BodyError(f"a chunk of the body decodes to more than {self.chunk_limit} bytes")
            data, self._done = self._rest()
        return bytes(out)

    def finish(self) -> bytes:
        if self._d is not None and not self._done:
            raise BodyError("the compressed body is truncated")
        return b""

    def _rest(self) -> tuple[bytes, bool]:
        """What the decoder did not consume, and whether its stream (member, frame) ended."""
        if self.coding == "br":
            return b"", self._d.is_finished()
        ended = self._d.eof
        return (self._d.unused_data if ended else b""), ended


def _zlib_for(data: bytes, gzip: bool):
    if gzip:
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] * 256 + data[1]) % 31 == 0
    return zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)  # raw deflate, as some send


_STREAMING = {
    "gzip": lambda data: _zlib_for(data, True),
    "x-gzip": lambda data: _zlib_for(data, True),
    "deflate": lambda data: _zlib_for(data, False),
    "br": lambda data: brotli.Decompressor(),
    "zstd": lambda data: zstd.ZstdDecompressor(),
}
