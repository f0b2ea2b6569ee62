"""Streaming calls: a generator's chunks reach the caller as they are yielded.

Each streaming call writes to a Redis stream of its own (``taskserve:stream:<task id>``,
see :mod:`taskserve.wire` for its entries): batches of chunks, then the end (the error,
if the generator raised, after the chunks before it). Why a Redis stream rather than
pub/sub: a caller that subscribes late, or whose connection is re-established, misses
nothing (it reads from the last id it saw), the entries keep their order, and the key
expires on its own. Why batches: one thread (:class:`StreamWriter`) writes every open
stream's new chunks in one round trip, so a chunk never waits for a later one (the first
goes out at once) and a fast generator costs one ``XADD`` per round trip, not per chunk.

The same thread asks, every ``CANCEL_POLL_S`` and only while there is something to ask
about, whether the callers of the open streams and of the async calls in flight
(:meth:`StreamWriter.watch`) left: one ``MGET`` of their cancel flags, in the round trip
that writes chunks when there is one. A generator whose caller left is closed
(``GeneratorExit`` in it; an async one's task is cancelled) within ``CANCEL_POLL_S``; an
async call's task is cancelled (a sync call cannot be interrupted: it runs to its end).
The stream's end and the message's acknowledgement are one transaction.

Example (what :class:`~taskserve.node.celery_server.CeleryServer` does)::

    stream = writer.open(call, message, on_cancel=lambda: task.cancel())
    for chunk in generator:
        if not writer.put(stream, chunk):      # the caller left
            generator.close()
            break
    writer.end(stream, outcome, done=lambda: server.settled([call]))   # frees its slot, wakes the consumer

    writer.watch(call.task_id, lambda: loop.call_soon_threadsafe(task.cancel))   # an async call
    ...
    writer.unwatch(call.task_id)
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..store import Store
from ..store.keys import cancel_key, result_key, stream_key
from ..wire import Call, Outcome, stream_chunks, stream_end
from .transport import REDIS_UNREACHABLE, _why, retry_while_unreachable

log = logging.getLogger("taskserve.node.streams")

# How often the writer asks whether the callers of the open streams and async calls left,
# while there are some.
CANCEL_POLL_S = 0.5
# At most this many chunks in one entry.
MAX_BATCH = 1000


@dataclass(eq=False)
class Stream:
    """One streaming call of this replica."""

    call: Call
    message: Any
    key: str
    on_cancel: Optional[Callable[[], None]] = None
    head: Optional[bytes] = None          # an HTTP stream's answer (its response head), written once
    pending: list = field(default_factory=list)
    end: Optional[dict] = None
    done: Optional[Callable[[], None]] = None
    cancelled: bool = False
    written: int = 0


class StreamWriter:
    """Writes the chunks of every open stream of a replica, and asks whether the callers of
    its streams and async calls left, from one thread."""

    def __init__(self, store: Store, ttl_s: float) -> None:
        self.store = store
        self.ttl_s = max(1, int(ttl_s))
        self.streams: dict[str, Stream] = {}
        self.calls: dict[str, Callable[[], None]] = {}    # watched calls: task id -> what stops it
        self.next_ask = 0.0                                # when the cancel flags are read next
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="stream-writer", daemon=True)
        self.stopping = False

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        if self.thread.is_alive():
            self.thread.join(5.0)

    def open(self, call: Call, message: Any, on_cancel: Optional[Callable[[], None]] = None,
             head: Optional[bytes] = None) -> Stream:
        """A stream for ``call`` (``head``: an HTTP stream's answer, written with its first chunk)."""
        stream = Stream(call, message, stream_key(call.task_id), on_cancel, head)
        with self.lock:
            self._start_asking()
            self.streams[call.task_id] = stream
            self.lock.notify_all()
        return stream

    def watch(self, task_id: str, on_cancel: Callable[[], None]) -> None:
        """Call ``on_cancel`` (once, from the writer's thread) if ``task_id``'s caller leaves
        (its cancel flag appears) before :meth:`unwatch`: an async call in flight."""
        with self.lock:
            if self._start_asking():
                self.lock.notify_all()        # the writer may wait with no timer
            self.calls[task_id] = on_cancel

    def unwatch(self, task_id: str) -> None:
        with self.lock:
            self.calls.pop(task_id, None)

    def put(self, stream: Stream, chunk: Any) -> bool:
        """Queue ``chunk`` for the caller; False once the caller left (stop yielding)."""
        with self.lock:
            if not stream.cancelled:
                stream.pending.append(chunk)
                self.lock.notify_all()
            return not stream.cancelled

    def end(self, stream: Stream, outcome: Optional[Outcome], done: Callable[[], None]) -> None:
        """End ``stream`` with ``outcome`` (None or ok: ended; else its error) after its
        chunks; ``done`` is called once that and the acknowledgement are written."""
        with self.lock:
            stream.end = stream_end(outcome)
            stream.done = done
            self.lock.notify_all()

    # ------------------------------------------------------------------ the writer

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self._has_work():
                    if not self._asking():
                        self.lock.wait()          # nothing to write or ask about: no timer
                        continue
                    wait_s = self.next_ask - time.monotonic()
                    if wait_s <= 0:
                        break                     # time to ask about cancellations
                    self.lock.wait(wait_s)
                if self.stopping and not self._has_work():
                    return
                batch = [(stream, stream.pending[:MAX_BATCH], stream.end if len(stream.pending) <= MAX_BATCH
                          else None) for stream in self.streams.values() if stream.pending or stream.end is not None]
                for stream, chunks, _ in batch:
                    del stream.pending[:len(chunks)]
                asks: list[tuple[str, Any]] = []
                if time.monotonic() >= self.next_ask:
                    asks = self._asks()
                    self.next_ask = time.monotonic() + CANCEL_POLL_S
            try:
                self._write(batch, asks)
            except Exception as error:     # a bug or a long outage: end what can be ended, never hang a caller
                log.error("cannot write %d stream(s) (%s)", len(batch), _why(error))

    def _has_work(self) -> bool:
        return any(stream.pending or stream.end is not None for stream in self.streams.values())

    def _asks(self) -> list[tuple[str, Any]]:
        """What to ask about: (task id, its stream or what stops its call) of each open stream
        and watched call."""
        return [(task_id, stream) for task_id, stream in self.streams.items()
                if stream.end is None and not stream.cancelled] + list(self.calls.items())

    def _asking(self) -> bool:
        return bool(self.calls) or any(stream.end is None and not stream.cancelled
                                       for stream in self.streams.values())

    def _start_asking(self) -> bool:
        """Before something is added to ask about: the first ask is ``CANCEL_POLL_S`` from now
        if nothing was asked about until now. True if so."""
        if self._asking():
            return False
        self.next_ask = time.monotonic() + CANCEL_POLL_S
        return True

    def _write(self, batch: list[tuple[Stream, list, Optional[dict]]], asks: list[tuple[str, Any]]) -> None:
        def write() -> list:
            with self.store.redis.pipeline(transaction=bool(batch)) as pipe:
                for stream, chunks, end in batch:
                    if stream.head is not None and (chunks or end is not None):
                        key = result_key(stream.call.task_id)
                        pipe.set(key, stream.head, ex=self.ttl_s)
                        pipe.publish(key, stream.head)
                    if chunks:
                        pipe.xadd(stream.key, stream_chunks(chunks))
                    if end is not None:
                        pipe.xadd(stream.key, end)
                        tag = stream.message.delivery_tag
                        stream.message.channel.qos._remove_from_indices(tag, pipe)
                    if chunks or end is not None:
                        pipe.expire(stream.key, self.ttl_s)
                if asks:
                    pipe.mget([cancel_key(task_id) for task_id, _ in asks])
                return pipe.execute()

        try:
            replies = retry_while_unreachable(write, "write the chunks of a stream")
        except REDIS_UNREACHABLE:
            raise
        for stream, chunks, end in batch:
            # What was written, not what is there now: an end put meanwhile is written next
            # round, and the head with it.
            if stream.head is not None and (chunks or end is not None):
                stream.head = None
            stream.written += len(chunks)
        if asks:
            for (task_id, asked), flag in zip(asks, replies[-1]):
                if not flag:
                    continue
                if isinstance(asked, Stream):
                    if not asked.cancelled:
                        self._cancel(asked)
                else:
                    self._cancel_call(task_id)
        for stream, _, end in batch:
            if end is not None:
                stream.message.channel.qos.acknowledged_in_redis(stream.message.delivery_tag)
                with self.lock:
                    self.streams.pop(stream.call.task_id, None)
                if stream.done is not None:
                    stream.done()

    def _cancel_call(self, task_id: str) -> None:
        with self.lock:
            stop = self.calls.pop(task_id, None)
        if stop is None:       # it ended meanwhile
            return
        log.info("the caller of request %s left: cancelling it", task_id)
        try:
            stop()
        except Exception as error:
            log.warning("cannot cancel request %s (%s)", task_id, _why(error))

    def _cancel(self, stream: Stream) -> None:
        log.info("the caller of stream %s left: stopping its generator", stream.call.task_id)
        with self.lock:
            stream.cancelled = True
            stream.pending.clear()
        if stream.on_cancel is not None:
            try:
                stream.on_cancel()
            except Exception as error:
                log.warning("cannot stop the generator of stream %s (%s)", stream.call.task_id, _why(error))
