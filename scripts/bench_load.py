"""A cheap closed-loop HTTP/1.1 load generator (wrk-like, stdlib only) for scripts/bench.py's workers section.

C keep-alive connections, each through an HTTP proxy (`CONNECT host:port`, with Proxy-Authorization from the
proxy URL's user:password) or straight to the server, TLS to the server inside (verified against --cacert),
then one GET at a time per connection (no pipelining): each response is read to its end (Content-Length,
chunked, or until the server closes), its status counted, and the next request sent on that connection at
once, until N requests are done. A connection the server closes is opened again (and counted in `connects`);
a request in flight on a kept-alive connection that closed before any byte of its answer is sent again (the
server may close an idle connection as the request goes out), otherwise it counts as `closed`; a connection
that cannot be set up counts its request as `connect-...`, `proxy-407`, `tls-error` and so on.

It prints one JSON line: {"requests", "elapsed" (s, from the first connect to the last response), "statuses",
"connects", "cpu" (its own user + system seconds over that time), "steady": {"requests", "elapsed", "cpu",
"after"}}: "steady" is the same from the moment every connection was set up ("after" seconds in), without
the CONNECTs and TLS handshakes (some 2 ms of CPU each here). With --mark it first prints {"mark": "steady"}
at that moment, for a caller that measures other processes over the same stretch.

What keeps it cheap: one thread, one epoll loop, TLS over memory buffers (one recv() per wake-up, where an
SSLSocket makes two per TLS record), each request made once as bytes, responses parsed on the bytes, no
garbage collector. Measured on the bench's 2-core VM: ~0.04 ms of CPU a request when it runs flat out against
nginx, ~0.15-0.2 ms through sealgate, where it wakes for each response (about 1.7 wake-ups a request: the
proxy writes head and body apart) and each wake-up starts from caches the proxy just went through; curl
--parallel took ~0.5 ms. Two ways to make it cheaper were tried and left out: waking at most a few times per
trip of the closed loop (a response waits a little, several are handled per wake-up: ~0.08 ms) starves the
proxy, whose concurrent requests finish together and whose core then idles until the client's next wake-up
(busy 0.6-0.85 instead of 1.0); SO_RCVLOWAT set to the response's size (one wake-up a response) saved only
~10% and can stall on a shorter answer.

Usage: python scripts/bench_load.py URL [-n N] [-c C] [--proxy URL] [--cacert FILE] [-H 'Name: value']...
                                        [--timeout S] [--mark]
The proxy URL (it may hold a credential) can come from the environment, BENCH_LOAD_PROXY, instead of argv.
As a module: bench_load.run(url, n, concurrency, proxy=..., cafile=..., headers=...) -> the same dict.
"""

from __future__ import annotations

import argparse
import base64
import errno
import gc
import json
import os
import resource
import select
import socket
import ssl
import sys
import time
from urllib.parse import unquote, urlsplit

IN, OUT = select.EPOLLIN, select.EPOLLOUT
RECV = 65536
HEAD_MAX = 64 * 1024
NO_BODY = {204, 304}

# phases of a connection: being set up, then reading a response (from HEAD on, a request is out)
TCP, TUNNEL, TLS, HEAD, BODY, CHUNKS, UNTIL_CLOSE = range(7)


class Failure(Exception):
    """This connection cannot go on (what is said is the status its request is counted under)."""


class Conn:
    __slots__ = ("sock", "fd", "tls", "inc", "outg", "phase", "buf", "need", "pos", "status", "close", "served",
                 "got", "events", "out", "up")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.fd = -1
        self.tls: ssl.SSLObject | None = None  # TLS over memory buffers: one recv() per wake-up, not two per record
        self.inc = self.outg = ssl.MemoryBIO()
        self.phase = TCP
        self.buf = b""
        self.need = 0  # BODY: bytes of the body still to come
        self.pos = 0  # CHUNKS: where the next chunk's size line starts in buf
        self.status = 0
        self.close = False  # the response said the connection ends after it
        self.served = 0  # responses read on this connection
        self.got = False  # any byte of the current response read
        self.events = 0
        self.out = b""  # bytes still to send (a partial write)
        self.up = False  # set up once (its first TLS handshake done)


def _recv(c: Conn) -> bytes | None:
    """What the socket has: None while nothing (would block), b"" once closed (or broken)."""
    try:
        return c.sock.recv(RECV)
    except BlockingIOError:
        return None
    except OSError:
        return b""


class Load:
    def __init__(self, url: str, n: int, concurrency: int, *, proxy: str | None = None, cafile: str | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 30.0, mark: bool = False) -> None:
        u = urlsplit(url)
        if u.scheme != "https":
            raise ValueError("only https:// URLs (TLS inside the tunnel)")
        self.host, self.port = u.hostname or "", u.port or 443
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        name = f"[{self.host}]" if ":" in self.host else self.host
        authority = name if self.port == 443 else f"{name}:{self.port}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.request = f"GET {path} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n".encode("latin-1")
        self.n, self.concurrency, self.timeout, self.mark = n, max(1, min(concurrency, n)), timeout, mark
        to = (self.host, self.port)
        self.tunnel = b""
        if proxy:
            p = urlsplit(proxy)
            if p.scheme != "http":
                raise ValueError("the proxy URL must be http://")
            to = (p.hostname or "127.0.0.1", p.port or 8080)
            auth = ""
            if p.username is not None:
                token = base64.b64encode(f"{unquote(p.username)}:{unquote(p.password or '')}".encode()).decode()
                auth = f"Proxy-Authorization: Basic {token}\r\n"
            self.tunnel = f"CONNECT {name}:{self.port} HTTP/1.1\r\nHost: {name}:{self.port}\r\n{auth}\r\n".encode(
                "latin-1")
        # resolved once: connect_ex with a name would look it up (blocking) for every connection
        self.family, _, _, _, self.connect_to = socket.getaddrinfo(*to, type=socket.SOCK_STREAM)[0]
        self.ctx = ssl.create_default_context(cafile=cafile)
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}  # by fd, while open
        self.gone: set[int] = set()  # fds closed while handling the current batch of events
        self.statuses: dict[int | str, int] = {}
        self.issued = 0  # requests handed to a connection (sent, or to be once it is set up)
        self.done = 0
        self.connects = 0
        self.up = 0  # connections set up at least once: the steady state starts when all are
        self.steady: tuple[resource.struct_rusage, float, int] | None = None

    # --- connections -------------------------------------------------------------------------------

    def _watch(self, c: Conn, events: int) -> None:
        if events != c.events:
            (self.ep.modify if c.events else self.ep.register)(c.fd, events)
            c.events = events

    def _open(self, c: Conn) -> None:
        """A new TCP connection for c; its request (already issued) goes out once it is set up."""
        self.connects += 1
        s = socket.socket(self.family, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sock, c.fd, c.tls, c.phase, c.buf, c.served, c.got, c.events, c.out = \
            s, s.fileno(), None, TCP, b"", 0, False, 0, b""
        self.conns[c.fd] = c
        if (err := s.connect_ex(self.connect_to)) not in (0, errno.EINPROGRESS):
            raise Failure(f"connect-{errno.errorcode.get(err, err)}")
        self._watch(c, OUT)

    def _drop(self, c: Conn) -> None:
        if c.sock is not None:
            if c.events:
                self.ep.unregister(c.fd)
            del self.conns[c.fd]
            self.gone.add(c.fd)
            c.sock.close()
            c.sock, c.tls, c.events = None, None, 0

    def _start_tls(self, c: Conn) -> None:
        c.inc, c.outg = ssl.MemoryBIO(), ssl.MemoryBIO()
        c.tls = self.ctx.wrap_bio(c.inc, c.outg, server_hostname=self.host)
        c.phase = TLS
        self._handshake(c)

    def _handshake(self, c: Conn) -> None:
        try:
            c.tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLError as e:
            raise Failure("tls-error") from e
        if c.outg.pending:
            try:
                c.sock.sendall(c.outg.read())  # a flight of a few KiB, into an empty socket buffer
            except OSError as e:
                raise Failure("tls-error") from e
        self._watch(c, IN)
        if done:
            if not c.up:
                c.up = True
                self.up += 1
                if self.up == self.concurrency:
                    self.steady = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), self.done
                    if self.mark:  # for a caller that measures other processes over the same stretch
                        sys.stdout.write('{"mark": "steady"}\n')
                        sys.stdout.flush()
            self._send(c)

    # --- requests and responses ----------------------------------------------------------------------

    def _send(self, c: Conn) -> None:
        """Send c's request (issued before); HEAD waits for its answer."""
        c.phase, c.got, c.buf = HEAD, False, b""
        c.tls.write(self.request)
        data = c.outg.read()
        try:
            sent = c.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:  # as a close: sent again when the connection had served others
            self._closed(c)
            return
        if sent < len(data):
            c.out = data[sent:]
            self._watch(c, IN | OUT)

    def _flush(self, c: Conn) -> None:
        try:
            sent = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            self._closed(c)
            return
        c.out = c.out[sent:]
        if not c.out:
            self._watch(c, IN)

    def _next(self, c: Conn) -> None:
        """c's response is read: count it, then the next request on c (or a new connection, or none)."""
        self.statuses[c.status] = self.statuses.get(c.status, 0) + 1
        self.done += 1
        c.served += 1
        if self.issued >= self.n:
            self._drop(c)
            return
        self.issued += 1
        if c.close:
            self._drop(c)
            self._open(c)
        else:
            self._send(c)

    def _head(self, c: Conn) -> bool:
        """Parse the head in c.buf if it is all there (True: the response may be complete now)."""
        buf = c.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > HEAD_MAX:
                raise Failure("bad-response")
            return False
        if buf[:5] != b"HTTP/" or buf[12:13] not in (b" ", b"\r"):
            raise Failure("bad-response")
        try:
            status = int(buf[9:12])
        except ValueError:
            raise Failure("bad-response") from None
        head = buf[:end + 2].lower()  # every header line ends in \r\n and starts after one
        if 100 <= status < 200:  # an interim answer (100 Continue): the final one follows
            c.buf = buf[end + 4:]
            return self._head(c) if c.buf else False
        c.status = status
        c.close = b"\r\nconnection: close" in head or (buf[5:8] == b"1.0" and b"\r\nconnection: keep-alive" not in head)
        te = head.find(b"\r\ntransfer-encoding:")
        if status in NO_BODY:
            c.phase, c.need = BODY, 0
        elif te >= 0 and b"chunked" in head[te:head.find(b"\r\n", te + 2)]:
            c.phase, c.pos = CHUNKS, 0
        elif (cl := head.find(b"\r\ncontent-length:")) >= 0:
            try:
                c.phase, c.need = BODY, int(head[cl + 17:head.find(b"\r\n", cl + 2)])
            except ValueError:
                raise Failure("bad-response") from None
        else:
            c.phase, c.close = UNTIL_CLOSE, True
        c.buf = buf[end + 4:]
        return True

    def _body(self, c: Conn) -> bool:
        """Consume what c.buf holds of the body; True when the response is complete."""
        if c.phase == BODY:
            have = len(c.buf)
            if have < c.need:
                c.need -= have
                c.buf = b""
                return False
            if have > c.need:  # more than the answer: nothing was asked for it
                raise Failure("bad-response")
            return True
        if c.phase == CHUNKS:
            buf, pos = c.buf, c.pos
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                try:
                    size = int(buf[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    raise Failure("bad-response") from None
                if size == 0:  # the last chunk, trailers, an empty line
                    end = eol + 2 if buf[eol + 2:eol + 4] == b"\r\n" else buf.find(b"\r\n\r\n", eol)
                    if end < 0:
                        break
                    if len(buf) > end + 4:
                        raise Failure("bad-response")
                    return True
                if len(buf) < eol + 2 + size + 2:
                    break
                pos = eol + 2 + size + 2
            c.buf, c.pos = buf[pos:], 0  # keep only what is not parsed yet
            return False
        c.buf = b""  # UNTIL_CLOSE: the end is the server's close
        return False

    def _readable(self, c: Conn) -> None:
        if (data := _recv(c)) is None:
            return
        if not data:
            self._closed(c)
            return
        c.inc.write(data)
        tls = c.tls
        while True:
            try:
                plain = tls.read(RECV)
            except ssl.SSLWantReadError:  # the rest of a record is still to come
                return
            except ssl.SSLError:  # close_notify, or worse
                self._closed(c)
                return
            if not plain:
                self._closed(c)
                return
            c.got = True
            c.buf = c.buf + plain if c.buf else plain
            if c.phase == HEAD:
                done = self._head(c) and self._body(c)
            else:
                done = self._body(c)
            if done:
                self._next(c)
                return
            if not (c.inc.pending or tls.pending()):
                return

    def _closed(self, c: Conn) -> None:
        """The server closed c: its response ends here (UNTIL_CLOSE), or is sent again (nothing of it came
        on a connection that served others), or counts as `closed`."""
        self._drop(c)
        if c.phase == UNTIL_CLOSE:
            self.statuses[c.status] = self.statuses.get(c.status, 0) + 1
            self.done += 1
            if self.issued >= self.n:
                return
            self.issued += 1
        elif not (c.served and not c.got):
            raise Failure("closed")
        self._open(c)  # the next request, or the same one again

    def _tunnel_reply(self, c: Conn) -> None:
        if (data := _recv(c)) is None:
            return
        if not data:
            raise Failure("proxy-closed")
        c.buf += data
        end = c.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(c.buf) > HEAD_MAX:
                raise Failure("proxy-error")
            return
        if c.buf[9:12] != b"200" or len(c.buf) > end + 4:
            raise Failure(f"proxy-{c.buf[9:12].decode('latin-1', 'replace')}")
        c.buf = b""
        self._start_tls(c)

    def _event(self, c: Conn, mask: int) -> None:
        phase = c.phase
        if phase >= HEAD:
            if mask & OUT and c.out:
                s = c.sock
                self._flush(c)
                if c.sock is not s or c.out:
                    return
            if mask & ~OUT:  # in, or an error or hang-up: recv says which
                self._readable(c)
        elif phase == TLS:
            if (data := _recv(c)) is None:
                return
            if not data:
                raise Failure("tls-error")
            c.inc.write(data)
            self._handshake(c)
        elif phase == TCP:
            if err := c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                raise Failure(f"connect-{errno.errorcode.get(err, err)}")
            if self.tunnel:
                c.phase = TUNNEL
                try:
                    c.sock.sendall(self.tunnel)  # a few hundred bytes into an empty socket buffer
                except OSError:
                    raise Failure("proxy-closed") from None
                self._watch(c, IN)
            else:
                self._start_tls(c)
        else:
            self._tunnel_reply(c)

    def _fail(self, c: Conn, what: str | None) -> None:
        """c's request counts under `what` (None: no request yet); c goes on with the next request on a new
        connection, and so on while connections cannot even be opened."""
        while True:
            self._drop(c)
            if what is not None:
                self.statuses[what] = self.statuses.get(what, 0) + 1
                self.done += 1
            if self.issued >= self.n:
                return
            self.issued += 1
            try:
                self._open(c)
                return
            except Failure as e:
                what = str(e)

    # --- the loop -----------------------------------------------------------------------------------

    def run(self) -> dict:
        gc_was = gc.isenabled()
        gc.disable()  # nothing here makes cycles
        conns = [Conn() for _ in range(self.concurrency)]
        cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        try:
            for c in conns:
                self._fail(c, None)
            poll, by_fd, gone, event = self.ep.poll, self.conns, self.gone, self._event
            while self.done < self.n:
                ready = poll(self.timeout)
                if not ready:
                    self.statuses["timeout"] = self.statuses.get("timeout", 0) + self.n - self.done
                    break
                gone.clear()
                for fd, mask in ready:
                    if fd in gone:
                        continue  # closed by an earlier event of this batch (its number may be reused already)
                    c = by_fd[fd]
                    try:
                        event(c, mask)
                    except Failure as e:
                        self._fail(c, str(e))
            t1, cpu1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        finally:
            for c in conns:
                self._drop(c)
            self.ep.close()
            if gc_was:
                gc.enable()
        def cpu(a: resource.struct_rusage) -> float:
            return round(cpu1.ru_utime + cpu1.ru_stime - a.ru_utime - a.ru_stime, 6)
        out = {"requests": self.n, "elapsed": round(t1 - t0, 6),
               "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)},
               "connects": self.connects, "cpu": cpu(cpu0)}
        if self.steady is not None:  # from the moment every connection was set up: no handshakes in it
            at, t, done = self.steady
            out["steady"] = {"requests": self.n - done, "elapsed": round(t1 - t, 6), "cpu": cpu(at)}
        return out


def run(url: str, n: int, concurrency: int, *, proxy: str | None = None, cafile: str | None = None,
        headers: dict[str, str] | None = None, timeout: float = 30.0) -> dict:
    """N GETs of url over `concurrency` keep-alive connections: {requests, elapsed, statuses, connects, cpu}."""
    return Load(url, n, concurrency, proxy=proxy, cafile=cafile, headers=headers, timeout=timeout).run()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\nUsage:")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="https://host:port/path")
    ap.add_argument("-n", "--requests", type=int, default=1000, help="requests in all (1000)")
    ap.add_argument("-c", "--concurrency", type=int, default=32, help="keep-alive connections (32)")
    ap.add_argument("--proxy", default=os.environ.get("BENCH_LOAD_PROXY") or None,
                    help="http://[user:password@]host:port (default: $BENCH_LOAD_PROXY; none: straight to the server)")
    ap.add_argument("--cacert", help="CA file to verify the server (or the intercepting proxy) against")
    ap.add_argument("-H", "--header", action="append", default=[], help="'Name: value', repeatable")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds without any event before giving up (30)")
    ap.add_argument("--mark", action="store_true",
                    help='print {"mark": "steady"} when every connection is set up (before the result line)')
    args = ap.parse_args()
    headers = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            ap.error(f"header without a colon: {name!r}")
        headers[name.strip()] = value.strip()
    out = Load(args.url, args.requests, args.concurrency, proxy=args.proxy, cafile=args.cacert, headers=headers,
               timeout=args.timeout, mark=args.mark).run()
    print(json.dumps(out), flush=True)
    sys.exit(0 if out["statuses"].keys() <= {str(s) for s in range(200, 400)} else 1)


if __name__ == "__main__":
    main()
