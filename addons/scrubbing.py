"""The response side: every byte an upstream sends back is scrubbed before the worker sees it.

`Scrubbers` keeps one `Scrubber` per session, knowing every value of its principal (a value
stored at an allowed origin by one run comes back scrubbed in any other, and after a
restart) and every form sealgate derived from one; it reloads when the principal's secrets
change, never forgetting an old value. The functions below apply it to response heads,
buffered and streamed bodies, trailers, WebSocket messages and control frames, and raw TCP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import http

from . import bodies, decision, inject, internals, placeholders, sessions
from .errors import Refusal
from .flowstate import Fields, FlowState
from .scrub import Scrubber, stream_rewriter
from .store import SecretStore, StoreError
from .streams import StreamFilter, StreamRewriter

RESPONSE_BODY_LIMIT = 256 * 1024 * 1024  # decoded bytes scrubbed of values
STREAM_OVER = 1024 * 1024  # identity bodies larger than this (or of unknown length) stream through
SCRUBBER_GRACE = 3600  # seconds a session's scrubber outlives the session, for slow responses
SCRUBBERS_MAX = 10_000  # sessions' scrubbers kept at once (expired ones go first, then the oldest)


@dataclass
class _Entry:
    expires_at: float
    scrubber: Scrubber
    signature: tuple = ()  # of the principal's secrets when last loaded
    version: object = None  # of the store when the signature was last checked


class Scrubbers:
    def __init__(self, store: Callable[[], SecretStore],
                 linked_values: Callable[[str], list[tuple[str, str]]] = lambda owner: []) -> None:
        self.store = store
        self.linked_values = linked_values  # (token, env name) of a principal's linked accounts
        self.sessions: dict[str, _Entry] = {}  # by session id
        self.logs = Scrubber()  # every value ever loaded, kept out of every log line

    def for_session(self, session: sessions.Session) -> Scrubber:
        """The session's scrubber, up to date with its principal's secrets. StoreError if unreadable.

        Flows hold their own reference, so pruning an expired session never strands one."""
        store = self.store()
        entry = self.sessions.get(session.id)
        if entry is None:
            if len(self.sessions) >= SCRUBBERS_MAX:
                self._prune()
            entry = self.sessions[session.id] = _Entry(session.record.expires_at, Scrubber())
        version = store.version()
        if entry.version == version:
            return entry.scrubber  # nothing was written to the store since the last look
        signature = store.secrets_signature(session.principal)
        if entry.signature != signature:
            self._add(entry.scrubber, [
                *((value, session.placeholder(name)) for name, secret in store.secrets_for(session.principal).items()
                  for value in [secret.value, *(secret.scope.sign.parts(secret.value) if secret.scope.sign else [])]),
                *((token, session.placeholder(name)) for token, name in self.linked_values(session.principal))])
            entry.signature = signature
        entry.version = version  # only once loaded: a failure is tried again, and refused again
        return entry.scrubber

    def _prune(self) -> None:
        """Forget expired sessions' scrubbers; if that is not enough, the oldest quarter (a session whose
        scrubber goes loads its principal's values again, but forgets the signatures it made)."""
        now = time.time()
        self.sessions = {sid: e for sid, e in self.sessions.items() if e.expires_at + SCRUBBER_GRACE >= now}
        if len(self.sessions) >= SCRUBBERS_MAX:
            self.sessions = dict(list(self.sessions.items())[SCRUBBERS_MAX // 4:])

    def learn(self, state: FlowState, result: decision.Allow, signatures: list[tuple[str, str]] = ()) -> None:
        """Scrub values just filled into a flow that the session's scrubber does not know yet (a secret
        added since it loaded). What sealgate derives from a value (escapes, a re-encoded Basic header,
        whatever its user name) is one of the forms each value is matched in: the forms a principal's
        scrubber holds are bounded by its values, whatever the requests send. Signatures are new with every
        request: the session's scrubber finds them by their shape (`derived`), in every later response and
        WebSocket message of the session too."""
        state.injected = state.injected or bool(result.secret_names)
        for signature, text in signatures:
            state.scrubber.add_signature(signature, text)
        scrubber = state.scrubber
        self._add(scrubber, [
            (value, text) for text, value in result.values.items()
            if value.encode() not in scrubber and placeholders.find(text.encode())[0].placeholder.name in result.secret_names
        ])

    def log_filter(self, record: logging.LogRecord) -> bool:
        """Whatever any addon logs, no known value reaches the log."""
        if self.logs:
            record.msg, record.args = self.logs.scrub_text(record.getMessage()), None
            if record.exc_info:
                record.exc_text = self.logs.scrub_text(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True

    def _add(self, scrubber: Scrubber, values: list[tuple[str, str]]) -> None:
        """(value, placeholder) pairs, to the session's scrubber (every encoding) and to the one that keeps
        them out of every log line. That one holds every value the process has seen, so it takes exact
        forms only (what sealgate writes, and Python's repr of the bytes, as log lines quote them): its
        cost stays flat however many principals a proxy serves. sealgate's own lines hold no value at
        all (they are built from the placeholder form); this guards what other code logs."""
        if values:
            scrubber.add_values(values)
            self.logs.add([pair for value, placeholder in values
                           for pair in [*inject.derived_forms(value, placeholder),
                                        (repr(value.encode())[2:-1].encode(), placeholder.encode())]])


Current = Callable[[], Scrubber]  # the session's scrubber with the principal's values as they are now


def response_head(flow: http.HTTPFlow, current: Current, broken: Callable[[Exception], None]) -> None:
    """Before the head goes out: scrub it now if the body is to stream (SSE, chunked, large, or
    compressed and large or of unknown length: decoded as it streams and forwarded decoded). A
    streamed body is scrubbed with the values the principal has as each chunk passes; a chunk that
    cannot be (a compressed body that turns out not to be) stops it, and `broken` is told."""
    resp = flow.response
    assert resp is not None
    try:
        scrubber = current()
    except StoreError:
        resp.stream = False  # held whole, and refused in `response` unless the store is back by then
        return
    has_body = flow.request.method != "HEAD" and resp.status_code >= 200 and resp.status_code not in (204, 304)
    framing = bodies.Framing.of(resp.headers.fields)
    coding = bodies.codings(framing.content_encoding)
    if bodies.transfer_codings(framing.transfer_encoding):
        resp.stream = False  # buffered, to be refused whole in `response`: nothing of it goes out
    elif has_body and (streams(framing, unknown_length=True) or _large_single_coding(framing, coding)):
        scrub_head(scrubber, resp)
        rewriter = stream_rewriter(current)
        if coding not in ([], ["identity"]):
            del resp.headers["content-encoding"]  # forwarded decoded, as it was checked
            rewriter = _Decoding(bodies.StreamDecoder(coding[0], RESPONSE_BODY_LIMIT), rewriter)
        resp.stream = StreamFilter(rewriter, internals.end_of_message, broken)
        reframe(resp, chunked=flow.request.http_version.startswith("HTTP/1"))
    elif resp.stream:
        resp.stream = False  # someone asked to stream an encoded body: buffer it, so it can be scrubbed


def _large_single_coding(framing: bodies.Framing, coding: list[str]) -> bool:
    """A compressed body too large (or of unknown length) to hold whole, in one coding that decodes as it streams."""
    length = framing.content_length
    return (len(coding) == 1 and coding[0] in bodies.SUPPORTED and coding[0] != "identity"
            and (length is None or not length.isdigit() or int(length) > STREAM_OVER))


class _Decoding:
    """A rewriter fed with what a decoder makes of each chunk."""

    def __init__(self, decoder: bodies.StreamDecoder, rewriter: StreamRewriter) -> None:
        self.decoder, self.rewriter = decoder, rewriter

    def feed(self, chunk: bytes) -> bytes:
        return self.rewriter.feed(self.decoder.feed(chunk))

    def finish(self) -> bytes:
        return self.rewriter.feed(self.decoder.finish()) + self.rewriter.finish()


def response(flow: http.HTTPFlow, current: Current) -> Refusal | None:
    """The whole response: head, trailers and a buffered body, decoded to be checked."""
    resp = flow.response
    assert resp is not None
    try:
        scrubber = current()
    except StoreError as e:
        return Refusal("store_unavailable", f"the response cannot be checked for the session's values: {e}")
    if not scrubber:
        return None
    scrub_head(scrubber, resp)
    if resp.trailers:
        resp.trailers.fields = scrub_fields(scrubber, resp.trailers.fields)
    framing = bodies.Framing.of(resp.headers.fields)
    if other := bodies.transfer_codings(framing.transfer_encoding):
        return Refusal("unscrubbable_response", f"the upstream used Transfer-Encoding {other!r}, which sealgate "
                                                "does not decode")
    if resp.raw_content and not resp.stream:
        encoding = framing.content_encoding
        try:
            body = bodies.decode(resp.raw_content, encoding, RESPONSE_BODY_LIMIT)
        except bodies.BodyError as e:
            return Refusal("unscrubbable_response", f"the upstream response cannot be checked: {e}")
        scrubbed = scrubber.scrub(body)
        if scrubbed != body or bodies.codings(encoding) not in ([], ["identity"]):
            # forward exactly what was checked: decoded (an encoded copy can hide bytes, like a gzip file
            # name, that decoding drops) and scrubbed; no re-encoded copy to reason about
            resp.headers.pop("content-encoding", None)
            resp.content = scrubbed
    return None



def websocket_control_frame(scrubber: Scrubber | None, event):
    """A ping/pong payload or close reason on its way to a worker, scrubbed (within the frame's limits)."""
    from wsproto.events import CloseConnection, Ping, Pong

    if scrubber and isinstance(event, (Ping, Pong)):
        payload = scrubber.scrub(bytes(event.payload))
        return type(event)(payload=payload if len(payload) <= 125 else b"")
    if scrubber and isinstance(event, CloseConnection) and event.reason:
        reason = scrubber.scrub_text(event.reason)
        return CloseConnection(code=event.code, reason=reason if len(reason.encode()) <= 123 else "")
    return event


def scrub_head(scrubber: Scrubber, resp: http.Response) -> None:
    """The reason phrase as its bytes, as the worker gets them: `resp.reason` is mitmproxy's Latin-1 reading
    of them, which re-encoded as UTF-8 no longer holds a value with a character beyond ASCII."""
    if _any_match(scrubber, [resp.data.reason, *_flat(resp.headers.fields)]):
        resp.headers.fields = _each(scrubber, resp.headers.fields)
        resp.data.reason = scrubber.scrub(resp.data.reason)


def scrub_fields(scrubber: Scrubber, fields: Fields) -> Fields:
    return _each(scrubber, fields) if _any_match(scrubber, _flat(fields)) else fields


def _any_match(scrubber: Scrubber, parts: list[bytes]) -> bool:
    """Whether any part holds a match, in one scan of them joined by a line feed. A match within one part is
    one there too (the feed is none of the escape bytes a pattern looks behind for, and shape-matched
    signatures end at it as at the end of a part); one that only spans parts costs a scan of each, no more."""
    return bool(parts) and bool(scrubber.matches(b"\n".join(parts)))


def _flat(fields: Fields) -> list[bytes]:
    return [part for field in fields for part in field]


def _each(scrubber: Scrubber, fields: Fields) -> Fields:
    return tuple((scrubber.scrub(k), scrubber.scrub(v)) for k, v in fields)


def streams(framing: bodies.Framing, *, unknown_length: bool) -> bool:
    """True for an identity body that is large, or of unknown length (chunked, SSE, until close).

    unknown_length says whether a message without Content-Length has a body of unknown
    length (a response) or, unless chunked, none at all (an HTTP/1 request).
    """
    if bodies.codings(framing.content_encoding) not in ([], ["identity"]):
        return False
    length = framing.content_length
    if length is None:
        return unknown_length or "chunked" in framing.transfer_encoding.lower()
    return not length.isdigit() or int(length) > STREAM_OVER


def reframe(message: http.Message, chunked: bool) -> None:
    """A body that is filled or scrubbed as it streams changes length: frame it by chunks (HTTP/1)."""
    if "content-length" in message.headers:
        del message.headers["content-length"]
    if chunked and "chunked" not in message.headers.get("transfer-encoding", "").lower():
        message.headers["transfer-encoding"] = "chunked"
