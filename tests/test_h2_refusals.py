"""A refusal on one HTTP/2 stream ends that stream only: the other streams of the worker's connection go on.

An HTTP/2 request refused at its head with a body of unknown length (no Content-Length, the stream still
open) cannot get a problem+json before mitmproxy has read and held its whole body; it was killed with its
whole connection (Answer.KILL), so every other stream on that connection went unanswered."""

from __future__ import annotations

import time

from test_redteam_session17 import _h2_pump_until, h2api  # noqa: F401 - h2api: a fixture
from wire import h2_tunnel


def test_a_stream_refused_at_its_head_with_a_body_of_unknown_length_is_reset_alone(proxy, h2api, evil, user,
                                                                                  value):
    proxy.add_secret(user, "API_KEY", value, h2api.origin)
    proxy.add_secret(user, "ELSEWHERE", value[::-1] + "Q", evil.origin)
    keyed = proxy.issue(user=user)
    ph, other = keyed["env"]["API_KEY"], keyed["env"]["ELSEWHERE"]
    target = h2api.target.encode()
    before = len(h2api.received)
    t, conn = h2_tunnel(keyed, proxy.port, h2api.target)

    def head(sid: int, method: bytes, auth: str, end: bool) -> None:
        conn.send_headers(sid, [(b":method", method), (b":scheme", b"https"), (b":authority", target),
                                (b":path", f"/echo/{sid}".encode()), (b"authorization", f"Bearer {auth}".encode())],
                          end_stream=end)

    refused = conn.get_next_available_stream_id()
    head(refused, b"POST", other, end=False)  # a body of unknown length follows (it never ends here)
    conn.send_data(refused, b"part of a body")
    t.sendall(conn.data_to_send())
    time.sleep(0.3)  # refused by now
    allowed = conn.get_next_available_stream_id()
    head(allowed, b"GET", ph, end=True)
    t.sendall(conn.data_to_send())
    streams = {allowed: {"got": [], "ended": False, "status": None},
               refused: {"got": [], "ended": False, "status": None}}
    _h2_pump_until(t, conn, streams, time.time() + 8)
    t.close()
    seen = b"".join(b for s in streams.values() for b in s["got"])
    assert streams[allowed]["status"] == b"200", "the other stream of the connection went unanswered"
    assert streams[refused]["status"] in (None, b"403") and streams[refused]["ended"]
    assert value.encode() not in seen
    paths = [h[b":path"] for h, _, _ in h2api.received[before:]]
    assert paths == [f"/echo/{allowed}".encode()], "the refused stream reached the upstream"

