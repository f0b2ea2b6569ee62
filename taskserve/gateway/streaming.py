"""HTTP streaming: a generator ``__call__``'s chunks reach the HTTP client as they are yielded.

A replica serving an HTTP request whose ``__call__`` is a generator (sync or async)
answers with a *head*, ``{"status": 200, "headers": [], "stream": true}``, in the usual
result record, written in one transaction with its first stream entry; then it appends
its chunks to the Redis stream ``taskserve:stream:<task id>`` (entries of batches of
chunks, then the end: ok, or the error after the chunks before it; see
:mod:`taskserve.wire`). The gateway, given the head, reads the stream and writes each
chunk as it comes::

    curl -N http://127.0.0.1:8000/llm                                  # chunked, a chunk per yield
    curl -N -H 'Accept: text/event-stream' http://127.0.0.1:8000/llm    # data: "token"\\n\\n per yield

Chunked (:func:`body_piece`): a str as UTF-8, bytes as they are, any other value as JSON
and a newline; the content type is the first chunk's (text, octet-stream or NDJSON).
Server-sent events (:func:`event`) with ``Accept: text/event-stream``: each chunk is
``data: <json>``, then ``event: end`` once the generator returned. The status line and
headers go out with the first chunk, so a generator that fails before it yields anything
is an ordinary 500. An error after chunks (the generator raised, its replica died: the
node agent writes the end "stream interrupted", or no entry came for the deployment's
``request_timeout_s``) ends the response: with SSE an ``event: error`` carrying the JSON
error comes first; a chunked body is cut off without its last chunk, so the client can
tell it from a whole one (curl exits with 18, httpx raises ``RemoteProtocolError``).
A client that leaves mid-stream sets the call's cancel flag: the replica stops the
generator within a second.

Every stream the gateway is answering is read by **one** task on **one** connection of
its own (:class:`StreamReader`): an ``XREAD BLOCK`` over all their keys, from the last id
each one saw. Blocking reads hold their connection for as long as they wait, so they
never take one of the request path's pool (where they would starve the requests), and
one connection serves any number of streams. A stream that starts wakes the blocked
read with an entry on the gateway's own wake stream, which that read also follows; a
stream whose client reads slower than the replica writes is left out of the reads while
``MAX_BUFFERED`` of its entries wait in the gateway, so its chunks wait in Redis, not
in the gateway's memory.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextvars
import json
import logging
import time
from typing import Any, Awaitable, Callable, Mapping, Optional

import redis
import redis.asyncio

from ..errors import ReplicaError
from ..store.keys import stream_key
from ..wire import Answer, read_stream_entry
from .messaging import RECONNECT_PAUSE_S, RateLimitedLog

log = logging.getLogger("taskserve.gateway")

EVENT_STREAM = "text/event-stream"
TEXT_TYPE = "text/plain; charset=utf-8"
BYTES_TYPE = "application/octet-stream"
NDJSON_TYPE = "application/x-ndjson"
# How long one XREAD blocks at most: an idle reader's round trip this often, while streams are open.
BLOCK_MS = 5000
# The reader's connection gives up on a reply this long after a read was sent (Redis hung).
READ_SOCKET_TIMEOUT_S = BLOCK_MS / 1000 + 10
# Entries per stream in one read.
READ_COUNT = 100
# A stream with this many entries waiting for its client is read no more until it has half as many.
MAX_BUFFERED = 64
# The wake stream keeps its last entries only, and goes away this long after the last wake.
WAKE_TTL_S = 300


# --------------------------------------------------------------------------- the format


def wants_events(accept: str) -> bool:
    """Whether an ``Accept`` header asks for server-sent events.

    >>> wants_events("text/event-stream"), wants_events("text/html, text/event-stream;q=0.9")
    (True, True)
    >>> wants_events("*/*"), wants_events("text/event-stream;q=0"), wants_events("")
    (False, False, False)
    """
    for part in accept.split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        if media.lower() != EVENT_STREAM:
            continue
        quality = next((p.split("=", 1)[1] for p in params if p.lower().startswith("q=")), "1")
        try:
            return float(quality) > 0
        except ValueError:
            return True
    return False


class NotJSON(TypeError):
    """A chunk that HTTP cannot carry: neither str, bytes nor a JSON value."""


def json_bytes(value: Any) -> bytes:
    """``value`` as compact JSON (UTF-8), or :class:`NotJSON` naming its type.

    >>> json_bytes({"token": "é", "n": 1})
    b'{"token":"\\xc3\\xa9","n":1}'
    >>> json_bytes({1, 2})
    Traceback (most recent call last):
    ...
    taskserve.gateway.streaming.NotJSON: a chunk of type set cannot be sent as JSON (Object of type set is not JSON serializable); yield str, bytes, or JSON values
    """
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise NotJSON(f"a chunk of type {type(value).__name__} cannot be sent as JSON ({error}); "
                      "yield str, bytes, or JSON values") from None


def content_type(first_chunk: Any, events: bool) -> str:
    """The content type of a stream whose first chunk is ``first_chunk``.

    >>> content_type("hi", False), content_type(b"hi", False), content_type({"x": 1}, False)
    ('text/plain; charset=utf-8', 'application/octet-stream', 'application/x-ndjson')
    >>> content_type("hi", True)
    'text/event-stream'
    """
    if events:
        return EVENT_STREAM
    if isinstance(first_chunk, str):
        return TEXT_TYPE
    if isinstance(first_chunk, (bytes, bytearray)):
        return BYTES_TYPE
    return NDJSON_TYPE


def body_piece(chunk: Any) -> bytes:
    """One chunk as a piece of a chunked body: str as UTF-8, bytes as they are, any other
    value as JSON and a newline (NDJSON).

    >>> body_piece("tok"), body_piece(b"\\x00\\xff"), body_piece({"i": 1})
    (b'tok', b'\\x00\\xff', b'{"i":1}\\n')
    """
    if isinstance(chunk, str):
        return chunk.encode("utf-8")
    if isinstance(chunk, (bytes, bytearray)):
        return bytes(chunk)
    return json_bytes(chunk) + b"\n"


def event(chunk: Any, name: str = "") -> bytes:
    """One chunk as a server-sent event: ``data: <json>``. Bytes are not JSON: a bytes
    chunk is the event ``bytes`` whose data is their base64 (as a JSON string).

    >>> event("tok"), event({"i": 1}), event(b"\\x00\\xff")
    (b'data: "tok"\\n\\n', b'data: {"i":1}\\n\\n', b'event: bytes\\ndata: "AP8="\\n\\n')
    >>> event({"error": "ValueError"}, "error")
    b'event: error\\ndata: {"error":"ValueError"}\\n\\n'
    """
    if isinstance(chunk, (bytes, bytearray)):
        name, chunk = name or "bytes", base64.b64encode(chunk).decode("ascii")
    # JSON escapes every line break, so the data is one line.
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + json_bytes(chunk) + b"\n\n"


END_EVENT = b"event: end\ndata: null\n\n"


# --------------------------------------------------------------------------- reading


class OpenStream:
    """One stream the gateway answers a request from: its entries, as they are read.

    The reader :meth:`deliver` s entries; the request's task takes them with
    :meth:`next`. :meth:`leave` (the client left) wakes that task too.
    """

    __slots__ = ("task_id", "key", "last", "entries", "event", "paused", "left")

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.key = stream_key(task_id).encode()
        self.last = b"0-0"
        self.entries: collections.deque = collections.deque()
        self.event = asyncio.Event()
        self.paused = False        # too many entries wait for the client: not read meanwhile
        self.left = False

    def deliver(self, entries: list) -> None:
        for entry_id, fields in entries:
            self.last = entry_id
            self.entries.append(fields)
        self.paused = len(self.entries) >= MAX_BUFFERED
        self.event.set()

    def leave(self) -> None:
        """The client left: the request's task stops waiting."""
        self.left = True
        self.event.set()

    async def next(self, timeout_s: float) -> Optional[tuple[list, Optional[Answer]]]:
        """The next entry's (chunks, end or None); None once the client left;
        ``TimeoutError`` if none came within ``timeout_s``."""
        if not self.entries and not self.left:
            self.event.clear()
            loop = asyncio.get_running_loop()
            timer = loop.call_later(timeout_s, self.event.set)
            try:
                await self.event.wait()
            finally:
                timer.cancel()
        if self.left:
            return None
        if not self.entries:
            raise TimeoutError(self.task_id)
        return read_stream_entry(self.entries.popleft())


class StreamReader:
    """Reads every stream the gateway is answering, with one task on one connection.

    ``client`` is the request path's (a stream's first read, which never blocks, and the
    wakes); ``blocking`` a client of its own for the blocking reads; ``wake_key`` a
    stream only this gateway writes, followed by every blocking read so that a stream
    that opens (or a paused one resumed) ends the read under way at once.

    Example::

        reader = StreamReader(client, blocking_client, stream_key(f"{gateway_id}.wake"))
        stream = await reader.open(task_id)      # its entries so far, read at once
        entry = await stream.next(60.0)          # (chunks, end) as they come
        reader.close(stream)
    """

    def __init__(self, client: redis.asyncio.Redis, blocking: redis.asyncio.Redis, wake_key: str) -> None:
        self.client = client
        self.blocking = blocking
        self.wake_key = wake_key.encode()
        self.wake_last = b"0-0"
        self.streams: dict[bytes, OpenStream] = {}
        self.changed = asyncio.Event()
        self.reading = False        # a blocking read is under way
        self.wake_sent = False      # and a wake was sent for it
        self.task: Optional[asyncio.Task] = None
        self.waking: set[asyncio.Task] = set()
        self.error_log = RateLimitedLog(log)

    async def open(self, task_id: str) -> OpenStream:
        """Follow ``task_id``'s stream, its entries so far already read (one round trip,
        on the request path's client: no blocking read is waited for)."""
        stream = OpenStream(task_id)
        reply = await self.client.xread({stream.key: stream.last}, count=READ_COUNT)
        for _, entries in reply or ():
            stream.deliver(entries)
        self.streams[stream.key] = stream
        self._changed()
        return stream

    def resume(self, stream: OpenStream) -> None:
        """Read ``stream`` again: its client caught up."""
        if stream.paused and len(stream.entries) <= MAX_BUFFERED // 2:
            stream.paused = False
            self._changed()

    def close(self, stream: OpenStream) -> None:
        self.streams.pop(stream.key, None)

    async def stop(self) -> None:
        for task in (self.task, *self.waking):
            if task is not None:
                task.cancel()

    def _changed(self) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name="stream-reader")
        self.changed.set()
        if self.reading and not self.wake_sent:
            self.wake_sent = True
            task = asyncio.create_task(self._wake(), name="stream-wake")
            self.waking.add(task)
            task.add_done_callback(self.waking.discard)

    async def _wake(self) -> None:
        """End the blocking read under way: an entry on the wake stream it follows."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.xadd(self.wake_key, {b"w": b"1"}, maxlen=10, approximate=True)
                pipe.expire(self.wake_key, WAKE_TTL_S)
                await pipe.execute()
        except (redis.RedisError, OSError) as error:
            # The read ends by itself within BLOCK_MS; the new stream waits that long.
            self.error_log.warning("cannot wake the stream reader (%s)", error)

    async def _run(self) -> None:
        while True:
            wanted = {key: stream.last for key, stream in self.streams.items() if not stream.paused}
            if not wanted:
                self.changed.clear()
                await self.changed.wait()      # idle: nothing read until a stream opens
                continue
            self.changed.clear()
            self.reading, self.wake_sent = True, False
            try:
                reply = await self.blocking.xread({self.wake_key: self.wake_last, **wanted},
                                                  count=READ_COUNT, block=BLOCK_MS)
            except (redis.RedisError, OSError) as error:
                self.error_log.warning("cannot read the streams being answered (%s); trying again", error)
                await asyncio.sleep(RECONNECT_PAUSE_S)   # a pause between attempts, not a synchronisation
                continue
            except Exception:      # never let the one reader die: every stream would stall
                log.exception("cannot read the streams being answered; going on")
                await asyncio.sleep(RECONNECT_PAUSE_S)
                continue
            finally:
                self.reading = False
            for key, entries in reply or ():
                if key == self.wake_key:
                    self.wake_last = entries[-1][0]
                    continue
                stream = self.streams.get(key)
                if stream is not None and entries:
                    stream.deliver(entries)


# --------------------------------------------------------------------------- the answer

# Set in the request's task when it cuts a chunked body off on purpose: uvicorn's line for
# an answer left incomplete is then not logged (the gateway logs why itself).
CUT_OFF = contextvars.ContextVar("taskserve_stream_cut_off", default=False)
INCOMPLETE_MESSAGE = "ASGI callable returned without completing response."


class CutOffFilter(logging.Filter):
    """Drops uvicorn's error line for a streamed answer the gateway cut off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == INCOMPLETE_MESSAGE and CUT_OFF.get())


class StreamedAnswer:
    """The ASGI answer to a request whose ``__call__`` streams: the status line and headers
    with the first chunk, then each chunk as it is read, until the stream's end.

    ``first`` holds the entries read before the answer started (at least one chunk, or
    the end); ``cancel`` sets the call's cancel flag (the client left, or gave up);
    ``ended(outcome)`` is called once the answer is over, with "" (whole), "client_left",
    "timeout" or "stream_error".
    """

    def __init__(self, reader: StreamReader, stream: OpenStream, first: list, events: bool,
                 headers: list[tuple[bytes, bytes]], idle_timeout_s: float,
                 cancel: Callable[[], Awaitable[None]], ended: Callable[[str], None],
                 stop_watching: Callable[[], None]) -> None:
        self.reader = reader
        self.stream = stream
        self.first = first
        self.events = events
        self.headers = headers
        self.idle_timeout_s = idle_timeout_s
        self.cancel = cancel
        self.ended = ended
        self.stop_watching = stop_watching
        self.status_code = 200

    async def __call__(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        outcome = "stream_error"
        try:
            outcome = await self._answer(send)
        except asyncio.CancelledError:     # the gateway stops (its shutdown ran out of time)
            await self.cancel()
            raise
        finally:
            self.reader.close(self.stream)
            self.stop_watching()
            self.ended(outcome)

    async def _answer(self, send: Any) -> str:
        first_chunk = next((chunks[0] for chunks, _ in self.first if chunks), "")
        headers = [(b"content-type", content_type(first_chunk, self.events).encode()), *self.headers]
        if self.events:
            headers.append((b"cache-control", b"no-cache"))
        headers.append((b"x-accel-buffering", b"no"))     # a proxy such as nginx passes each chunk on at once
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        entries = collections.deque(self.first)
        while True:
            if entries:
                chunks, end = entries.popleft()
            else:
                try:
                    entry = await self.stream.next(self.idle_timeout_s)
                except TimeoutError:
                    await self.cancel()
                    return await self._fail(send, "timeout", ReplicaError(
                        "Timeout", f"no chunk within the deployment's request_timeout_s of {self.idle_timeout_s:g}s"))
                if entry is None:       # the client left: its generator is stopped
                    await self.cancel()
                    return "client_left"
                chunks, end = entry
                self.reader.resume(self.stream)
            for chunk in chunks:
                try:
                    piece = event(chunk) if self.events else body_piece(chunk)
                except NotJSON as error:
                    await self.cancel()
                    return await self._fail(send, "stream_error", ReplicaError("BadChunk", str(error)))
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            if end is not None:
                if end.error is not None:
                    return await self._fail(send, "stream_error", end.error)
                self.stop_watching()    # the answer completes: the connection's end is no client leaving
                await send({"type": "http.response.body", "body": END_EVENT if self.events else b"",
                            "more_body": False})
                return ""

    async def _fail(self, send: Any, outcome: str, error: ReplicaError) -> str:
        """End the answer after an error: an ``error`` event, or a body cut off."""
        log.warning("stream %s ended after its first chunks: %s: %s", self.stream.task_id, error.type_name,
                    error.message)
        if self.events:
            self.stop_watching()
            await send({"type": "http.response.body", "more_body": False,
                        "body": event({"error": error.type_name, "message": error.message}, "error")})
        else:
            CUT_OFF.set(True)       # uvicorn closes the connection without the last chunk
        return outcome


def stream_error(entries: list) -> Optional[ReplicaError]:
    """The error of a stream that failed before its first chunk (then the answer is an
    ordinary error), else None.

    >>> from taskserve.wire import Outcome, stream_end
    >>> stream_error([read_stream_entry(stream_end(Outcome.failure("ValueError", "no")))])
    ReplicaError('ValueError: no')
    >>> stream_error([(["t0"], None)]) is None
    True
    """
    for chunks, end in entries:
        if chunks:
            return None
        if end is not None:
            return end.error
    return None


async def first_entries(stream: OpenStream, timeout_s: float) -> Optional[list]:
    """The stream's entries up to its first chunk or its end (what the answer starts
    with); None if the client left meanwhile; ``TimeoutError`` after ``timeout_s``
    without an entry."""
    entries: list = []
    deadline = time.monotonic() + timeout_s
    while True:
        entry = await stream.next(max(0.0, deadline - time.monotonic()))
        if entry is None:
            return None
        entries.append(entry)
        chunks, end = entry
        if chunks or end is not None:
            return entries
