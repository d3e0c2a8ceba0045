"""A lean HTTPS upstream for scripts/bench.py, in a process of its own (so it never holds the load
generator's GIL): one asyncio loop, HTTP/1.1 keep-alive.

  GET /small                      a 12-byte JSON answer
  POST /upload                    drains the body (Content-Length or chunked); answers its length, the
                                  SHA-256 of its first MiB and of the Authorization header it got
  GET /sse?bytes=N&event=E        text/event-stream of N bytes, chunked, one chunk per event of E bytes

Usage: python scripts/bench_upstream.py CERT KEY   (prints the port it listens on, on 127.0.0.1)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import sys
from urllib.parse import parse_qs, urlsplit

HEAD_LIMIT = 64 * 1024
HASHED = 1 << 20  # bytes of an upload whose SHA-256 is answered (where the bench puts a placeholder)


def _head(raw: bytes) -> tuple[str, str, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return method, target, headers


async def _pieces(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The request body, piece by piece."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            yield await reader.readexactly(size)
            await reader.readexactly(2)
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass
        return
    left = int(headers.get("content-length") or 0)
    while left:
        piece = await reader.read(min(left, 1 << 20))
        if not piece:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(piece)
        yield piece


def _answer(body: bytes, ctype: str = "application/json") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)


async def _upload(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    size, first = 0, hashlib.sha256()
    async for piece in _pieces(reader, headers):
        if size < HASHED:
            first.update(piece[:HASHED - size])
        size += len(piece)
    auth = hashlib.sha256(headers.get("authorization", "").encode()).hexdigest()
    return _answer(json.dumps({"bytes": size, "first_mib_sha256": first.hexdigest(), "auth_sha256": auth}).encode())


async def _sse(writer: asyncio.StreamWriter, query: dict[str, list[str]]) -> None:
    total, event = int(query["bytes"][0]), int(query["event"][0])
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    filler = b"the quick brown fox jumps over the lazy dog; " * (event // 45 + 1)
    sent, n = 0, 0
    while sent < total:
        size = min(event, total - sent)
        head = b'data: {"n": %d, "text": "' % n
        data = (head + filler)[:max(size - 4, 0)] + b'"}\n\n'
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        sent, n = sent + len(data), n + 1
        if n % 64 == 0:
            await writer.drain()
    writer.write(b"0\r\n\r\n")


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            method, target, headers = _head(await reader.readuntil(b"\r\n\r\n"))
            url = urlsplit(target)
            if url.path == "/upload":
                writer.write(await _upload(reader, headers))
            elif url.path == "/sse":
                await _sse(writer, parse_qs(url.query))
            else:
                async for _ in _pieces(reader, headers):
                    pass
                writer.write(_answer(b'{"ok": true}'))
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ssl.SSLError, ValueError):
        pass
    finally:
        writer.close()


async def main(cert: str, key: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    server = await asyncio.start_server(_serve, "127.0.0.1", 0, ssl=ctx, limit=HEAD_LIMIT)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
