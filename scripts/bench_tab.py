"""One browser tab open on a dashboard, for scripts/bench.py: a websocket client on mitmweb's `/updates`
(mitmweb itself, or sealgate's dashboard process) that reads and discards every message, as the web UI
would. Authenticated like the UI's `?token=`: `Authorization: Bearer` with the token or password taken
from BENCH_TAB_TOKEN (never argv, never printed). Prints `open` once connected; on SIGTERM prints
`messages N` and exits.

Usage: BENCH_TAB_TOKEN=... python scripts/bench_tab.py ws://127.0.0.1:PORT/updates
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect


async def watch(url: str, token: str) -> int:
    conn = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"Bearer {token}"}),
                                   max_message_size=256 << 20)
    print("open", flush=True)
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    count = 0
    while True:
        message = asyncio.ensure_future(conn.read_message())
        await asyncio.wait([message, stop], return_when=asyncio.FIRST_COMPLETED)
        if stop.done() or message.result() is None:
            message.cancel()
            conn.close()
            return count
        count += 1


if __name__ == "__main__":
    print(f"messages {asyncio.run(watch(sys.argv[1], os.environ['BENCH_TAB_TOKEN']))}", flush=True)
