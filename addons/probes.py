"""Liveness, readiness and metrics over HTTP, on their own port (127.0.0.1:9090 by default).

A tiny asyncio server in the proxy process: /healthz says the process answers, /readyz
that the store and key can be read and the CA is loaded, /metrics renders `Metrics`.
A worker of `sealgate run --workers N` serves them on a Unix socket instead, for the
supervisor that answers on the port for them all (workers.py).
Nothing here ever sees a secret value or a session credential.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from .metrics import Metrics

Readiness = Callable[[], str | None]  # None when ready, else why not


class ProbeServer:
    def __init__(self, host: str, port: int, metrics: Metrics, readiness: Readiness, *,
                 unix: str | None = None) -> None:
        """On host:port, or on the Unix socket unix when given (then host and port are not used)."""
        self.host, self.port, self.metrics, self.readiness, self.unix = host, port, metrics, readiness, unix
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        if self.unix is not None:
            self._server = await asyncio.start_unix_server(self._serve, self.unix)
        else:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def answer(self, path: str) -> tuple[int, str, str]:
        """(status, content type, body) for a GET of path."""
        if path == "/healthz":
            return 200, "text/plain", "ok\n"
        if path == "/readyz":
            why = self.readiness()
            body = json.dumps({"ready": why is None, **({"reason": why} if why else {})}) + "\n"
            return (200 if why is None else 503), "application/json", body
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", self.metrics.render()
        return 404, "text/plain", "not found: try /healthz, /readyz or /metrics\n"

    async def respond(self, path: str) -> tuple[int, str, str]:
        """answer(path), for a server whose answers must wait for something (workers.GatewayProbes)."""
        return self.answer(path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, ctype, body = await self.respond(path.split("?", 1)[0]) if method == "GET" else (
                405, "text/plain", "GET only\n")
            data = body.encode()
            writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, ConnectionError):
            pass
        finally:
            writer.close()
